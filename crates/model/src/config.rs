//! Model configuration: the reference `config.json` of a ModelScope PALM directory and the
//! HF BERT config of its encoder, read as they are published (`palm-reference.md` §1).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The encoder's HF `BertConfig` (`encoder_pth/config.json`). Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    /// Vocabulary size (bert-base-chinese: 21128).
    pub vocab_size: usize,
    /// Hidden size, also the decoder's model size (768).
    pub hidden_size: usize,
    /// Encoder layers (12).
    pub num_hidden_layers: usize,
    /// Encoder attention heads (12).
    pub num_attention_heads: usize,
    /// Feed-forward inner size (3072).
    pub intermediate_size: usize,
    /// Activation; only `gelu` (exact, erf) is supported.
    pub hidden_act: String,
    /// Learned position embeddings (512).
    pub max_position_embeddings: usize,
    /// Token-type embeddings (2); PALM always uses type 0.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon (1e-12).
    pub layer_norm_eps: f64,
    /// Dropout after embeddings and sublayers (0.1).
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (0.1).
    pub attention_probs_dropout_prob: f64,
    /// Padding id (0).
    pub pad_token_id: usize,
}

impl Default for BertConfig {
    fn default() -> Self {
        BertConfig {
            vocab_size: 21128,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            pad_token_id: 0,
        }
    }
}

/// PALM's own `config.json` keys with the reference constructor defaults. Inherited HF keys
/// (`architectures`, `torch_dtype`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PalmConfig {
    /// `bert`, `zh_bert` or `roberta` (default `roberta`); the Chinese model uses a BERT encoder.
    pub encoder: String,
    /// Subfolder holding the encoder's HF config and vocab (default `roberta-base`).
    pub encoder_pth: String,
    /// Maximum source positions; the reference cannot exceed 512 (default 512).
    pub max_pos: usize,
    /// Share encoder and decoder embeddings; crashes in the reference, so must be false.
    pub share_emb: bool,
    /// Decoder layers (default 12).
    pub dec_layers: usize,
    /// Decoder model size; must equal the encoder hidden size (default 768).
    pub dec_hidden_size: usize,
    /// Decoder attention heads (default 8).
    pub dec_heads: usize,
    /// Decoder feed-forward inner size (default 3072).
    pub dec_ff_size: usize,
    /// Decoder dropout, training only (default 0.2).
    pub dec_dropout: f64,
    /// Initialise decoder embeddings from the encoder's when no checkpoint is given (default true).
    pub use_bert_emb: bool,
    /// Label smoothing of the training loss (default 0.1).
    pub label_smoothing: f64,
    /// Length-penalty exponent of beam search (default 0.95).
    pub alpha: f64,
    /// Beam size (default 5).
    pub beam_size: usize,
    /// Minimum generated tokens before EOS is allowed (default 40).
    pub min_length: usize,
    /// Maximum decoding steps (default 130).
    pub max_length: usize,
    /// Sampling mode instead of beam search (default false).
    pub sample_topk: bool,
    /// Trigram blocking; has no effect in the reference (default false).
    pub block_trigram: bool,
}

impl Default for PalmConfig {
    fn default() -> Self {
        PalmConfig {
            encoder: "roberta".into(),
            encoder_pth: "roberta-base".into(),
            max_pos: 512,
            share_emb: false,
            dec_layers: 12,
            dec_hidden_size: 768,
            dec_heads: 8,
            dec_ff_size: 3072,
            dec_dropout: 0.2,
            use_bert_emb: true,
            label_smoothing: 0.1,
            alpha: 0.95,
            beam_size: 5,
            min_length: 40,
            max_length: 130,
            sample_topk: false,
            block_trigram: false,
        }
    }
}

/// Everything needed to build the network: PALM's config and its encoder's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// PALM's `config.json`.
    pub palm: PalmConfig,
    /// The encoder's `config.json`.
    pub encoder: BertConfig,
}

impl ModelConfig {
    /// PALM 2.0 Chinese base: BERT-base-chinese encoder, 12-layer decoder with 8 heads.
    pub fn base_zh() -> Self {
        ModelConfig {
            palm: PalmConfig {
                encoder: "bert".into(),
                encoder_pth: "bert-base-chinese".into(),
                ..PalmConfig::default()
            },
            encoder: BertConfig::default(),
        }
    }

    /// A tiny model for tests and the CPU demo: d_model 64, 2+2 layers, vocab of `vocab_size`.
    pub fn tiny(vocab_size: usize) -> Self {
        ModelConfig {
            palm: PalmConfig {
                encoder: "bert".into(),
                encoder_pth: "encoder".into(),
                max_pos: 128,
                dec_layers: 2,
                dec_hidden_size: 64,
                dec_heads: 2,
                dec_ff_size: 128,
                dec_dropout: 0.1,
                min_length: 1,
                max_length: 32,
                beam_size: 4,
                ..PalmConfig::default()
            },
            encoder: BertConfig {
                vocab_size,
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 128,
                max_position_embeddings: 128,
                ..BertConfig::default()
            },
        }
    }

    /// Sets every training dropout, the encoder's (hidden and attention) and the decoder's, to
    /// `p` (`--dropout`).
    pub fn set_dropout(&mut self, p: f64) {
        self.palm.dec_dropout = p;
        self.encoder.hidden_dropout_prob = p;
        self.encoder.attention_probs_dropout_prob = p;
    }

    /// Reads `config.json` of a ModelScope PALM directory and the encoder config in the
    /// subfolder it names. A missing `config.json` means the reference defaults.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let palm: PalmConfig = if path.exists() {
            read_json(&path)?
        } else {
            PalmConfig::default()
        };
        let enc_path = dir.join(&palm.encoder_pth).join("config.json");
        let encoder: BertConfig = read_json(&enc_path)?;
        let config = ModelConfig { palm, encoder };
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Rejects configurations the reference cannot run or this crate does not implement.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |key: &str, message: String| {
            Err(Error::Config {
                path: origin.to_owned(),
                key: key.to_owned(),
                message,
            })
        };
        if !matches!(self.palm.encoder.as_str(), "bert" | "zh_bert") {
            return bad(
                "encoder",
                format!(
                    "{:?} is not supported; only bert and zh_bert",
                    self.palm.encoder
                ),
            );
        }
        if self.palm.dec_hidden_size != self.encoder.hidden_size {
            return bad(
                "dec_hidden_size",
                format!(
                    "{} differs from the encoder hidden_size {}",
                    self.palm.dec_hidden_size, self.encoder.hidden_size
                ),
            );
        }
        if self.palm.dec_heads == 0
            || !self
                .palm
                .dec_hidden_size
                .is_multiple_of(self.palm.dec_heads)
        {
            return bad(
                "dec_heads",
                format!(
                    "{} does not divide {}",
                    self.palm.dec_heads, self.palm.dec_hidden_size
                ),
            );
        }
        let (h, n) = (self.encoder.hidden_size, self.encoder.num_attention_heads);
        if n == 0 || !h.is_multiple_of(n) {
            return bad(
                "num_attention_heads",
                format!("{n} does not divide hidden_size {h}"),
            );
        }
        if self.palm.max_pos > 512 || self.palm.max_pos > self.encoder.max_position_embeddings {
            return bad(
                "max_pos",
                format!("{} exceeds the encoder's position table", self.palm.max_pos),
            );
        }
        if self.palm.share_emb {
            return bad(
                "share_emb",
                "true is not supported (the reference crashes on it)".into(),
            );
        }
        if self.encoder.hidden_act != "gelu" {
            return bad(
                "hidden_act",
                format!("{:?} is not supported; only gelu", self.encoder.hidden_act),
            );
        }
        Ok(())
    }

    /// Model size.
    pub fn d_model(&self) -> usize {
        self.encoder.hidden_size
    }

    /// Number of parameters: the encoder with its pooler, the decoder, the final LayerNorm, the
    /// decoder embedding (tied with the generator, counted once) and the generator bias.
    pub fn num_params(&self) -> usize {
        let e = &self.encoder;
        let d = e.hidden_size;
        let linear = |i: usize, o: usize| i * o + o;
        let ln = 2 * d;
        let embeddings = (e.vocab_size + e.max_position_embeddings + e.type_vocab_size) * d + ln;
        let enc_layer = 4 * linear(d, d)
            + ln
            + linear(d, e.intermediate_size)
            + linear(e.intermediate_size, d)
            + ln;
        let pooler = linear(d, d);
        let ff = self.palm.dec_ff_size;
        let dec_layer = 8 * linear(d, d) + 3 * ln + linear(d, ff) + linear(ff, d);
        embeddings
            + e.num_hidden_layers * enc_layer
            + pooler
            + self.palm.dec_layers * dec_layer
            + ln
            + e.vocab_size * d
            + e.vocab_size
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.display().to_string(),
        key: String::new(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_zh_has_the_published_parameter_count() {
        assert_eq!(ModelConfig::base_zh().num_params(), 231_937_928);
    }

    #[test]
    fn reference_config_json_parses_with_defaults_and_extra_keys() {
        let palm: PalmConfig = serde_json::from_str(
            r#"{"architectures": ["PalmForConditionalGeneration"], "encoder": "zh_bert",
                "encoder_pth": "bert-base-chinese", "dec_heads": 12, "min_length": 10,
                "torch_dtype": "float32"}"#,
        )
        .unwrap();
        assert_eq!(palm.dec_heads, 12);
        assert_eq!(palm.min_length, 10);
        assert_eq!(palm.dec_layers, 12);
        assert_eq!(palm.alpha, 0.95);
    }

    #[test]
    fn invalid_configs_name_the_key() {
        let mut c = ModelConfig::tiny(100);
        c.palm.dec_heads = 3;
        let e = c.validate("config.json").unwrap_err().to_string();
        assert!(e.contains("dec_heads"), "{e}");
        let mut c = ModelConfig::tiny(100);
        c.palm.encoder = "roberta".into();
        assert!(c.validate("x").unwrap_err().to_string().contains("encoder"));
    }
}
