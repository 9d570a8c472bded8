//! What a run needs, as `RUN_DIR/config.toml`: every setting that decides the result, so a
//! run can be resumed or reproduced from its directory alone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The learning-rate schedule's shape. `lr` is the base rate and `warmup` the warm-up steps
/// of every kind; steps are optimizer steps, counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// The reference's: `lr · min(s^−0.5, s·W^−1.5)` (ModelScope's PALM card, Noam-style).
    #[default]
    InverseSqrt,
    /// Linear warm-up to `lr`, then linear decay to 0 at the last step.
    Linear,
    /// Linear warm-up to `lr`, then half a cosine down to 0 at the last step.
    Cosine,
    /// Linear warm-up to `lr`, then constant.
    Constant,
}

/// The validation metric that picks the best checkpoint and drives early stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BestMetric {
    /// Label-smoothed loss per target token (lower is better).
    Loss,
    /// ROUGE-1 F of decoded predictions.
    Rouge1,
    /// ROUGE-2 F.
    Rouge2,
    /// ROUGE-L F.
    #[default]
    RougeL,
    /// Corpus BLEU-4.
    Bleu4,
}

impl BestMetric {
    /// Whether a larger value is better.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, BestMetric::Loss)
    }

    /// Whether the metric needs decoded predictions.
    pub fn needs_decoding(self) -> bool {
        !matches!(self, BestMetric::Loss)
    }

    /// Name as in `config.toml` and the metric logs.
    pub fn name(self) -> &'static str {
        match self {
            BestMetric::Loss => "loss",
            BestMetric::Rouge1 => "rouge-1",
            BestMetric::Rouge2 => "rouge-2",
            BestMetric::RougeL => "rouge-l",
            BestMetric::Bleu4 => "bleu-4",
        }
    }
}

/// Every setting of a run; written to `RUN_DIR/config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Training data (jsonl with `src`/`tgt`).
    pub train: PathBuf,
    /// Validation data.
    pub valid: PathBuf,
    /// Test data, decoded and scored at the end (optional).
    pub test: Option<PathBuf>,
    /// Start from this model directory (ModelScope or native); a fresh `preset` otherwise.
    pub model: Option<PathBuf>,
    /// The architecture of a fresh model: `tiny` or `base-zh`.
    pub preset: String,
    /// Run directory.
    pub out: PathBuf,
    /// Epochs.
    pub epochs: usize,
    /// Pairs per batch (per forward pass).
    pub batch_size: usize,
    /// Batches whose gradients are summed into one optimizer step.
    pub grad_accumulation: usize,
    /// Clip the global gradient norm to this value (PyTorch's `clip_grad_norm_`); none if unset.
    pub max_grad_norm: Option<f64>,
    /// Base learning rate of the schedule.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Learning-rate schedule.
    pub schedule: ScheduleKind,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Override the model's dropout (encoder hidden/attention and decoder) when set.
    pub dropout: Option<f64>,
    /// Override the model's label smoothing when set.
    pub label_smoothing: Option<f64>,
    /// Source ids at most.
    pub max_src_len: usize,
    /// Target ids at most.
    pub max_tgt_len: usize,
    /// Vocabulary size when training one (no `model`).
    pub vocab_size: usize,
    /// Shuffling, initialisation and dropout seed.
    pub seed: u64,
    /// Beams when decoding the validation and test splits.
    pub beam_size: usize,
    /// Validation rows decoded at each epoch end for ROUGE/BLEU (0: none).
    pub valid_decode: usize,
    /// Also checkpoint every this many optimizer steps (besides every epoch end).
    pub checkpoint_every: Option<usize>,
    /// Checkpoints kept besides the best one.
    pub keep_last: usize,
    /// Validation metric that selects the best checkpoint (written as `RUN_DIR/model`).
    pub best_metric: BestMetric,
    /// Stop after this many epochs without improving `best_metric`.
    pub early_stopping: Option<usize>,
    /// The smallest change of `best_metric` that counts as an improvement.
    pub min_delta: f64,
    /// Use this `vocab.txt` for a fresh model instead of training one on the data.
    pub vocab: Option<PathBuf>,
    /// Shuffle-buffer rows when `train` is a prepared shard directory (streamed).
    pub shuffle_buffer: usize,
    /// Batches are padded to a multiple of this many tokens (source and decoder input): fewer
    /// distinct shapes for backends that compile and tune kernels per shape (CUDA); 1 pads to
    /// the longest row only.
    pub pad_multiple: usize,
    /// Pre-train on raw documents (`train`/`valid` are text or jsonl documents) with PALM's
    /// objective instead of fine-tuning on pairs.
    pub pretrain: Option<crate::pretrain::PretrainConfig>,
}

impl Default for RunConfig {
    /// The card's fine-tuning recipe (`palm-reference.md` §4): lr 1e-3, 500 warm-up steps,
    /// 15 epochs, batch 8, length 128.
    fn default() -> Self {
        RunConfig {
            train: PathBuf::from("train.jsonl"),
            valid: PathBuf::from("valid.jsonl"),
            test: None,
            model: None,
            preset: "tiny".into(),
            out: PathBuf::from("runs/run"),
            epochs: 15,
            batch_size: 8,
            grad_accumulation: 1,
            max_grad_norm: None,
            lr: 1e-3,
            warmup: 500,
            schedule: ScheduleKind::InverseSqrt,
            weight_decay: 0.01,
            dropout: None,
            label_smoothing: None,
            max_src_len: 128,
            max_tgt_len: 128,
            vocab_size: 21128,
            seed: 42,
            beam_size: 4,
            valid_decode: 500,
            checkpoint_every: None,
            keep_last: 2,
            best_metric: BestMetric::RougeL,
            early_stopping: None,
            min_delta: 0.0,
            vocab: None,
            shuffle_buffer: 100_000,
            pad_multiple: 8,
            pretrain: None,
        }
    }
}

impl RunConfig {
    /// The embedded demo: the `tiny` preset on `datasets/demo`, tuned to finish in a few
    /// minutes on two CPU cores.
    pub fn demo(root: &Path) -> Self {
        let d = root.join("datasets/demo");
        RunConfig {
            train: d.join("train.jsonl"),
            valid: d.join("valid.jsonl"),
            test: Some(d.join("test.jsonl")),
            out: root.join("runs/demo"),
            epochs: 4,
            batch_size: 32,
            lr: 2e-2,
            warmup: 200,
            max_src_len: 64,
            max_tgt_len: 64,
            vocab_size: 2000,
            beam_size: 3,
            valid_decode: 100,
            ..RunConfig::default()
        }
    }

    /// Reads a `config.toml`; unknown keys and bad values are errors naming the file and line.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: RunConfig = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: toml_message(&text, &e),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a run config serializes")
    }

    /// Rejects settings no run can use.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |message: String| {
            Err(Error::Config {
                path: origin.to_path_buf(),
                message,
            })
        };
        let positive = [
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("grad_accumulation", self.grad_accumulation),
            ("max_src_len", self.max_src_len),
            ("beam_size", self.beam_size),
            ("pad_multiple", self.pad_multiple),
        ];
        for (key, value) in positive {
            if value == 0 {
                return bad(format!("`{key}` must be at least 1"));
            }
        }
        if self.max_tgt_len < 2 {
            return bad("`max_tgt_len` must be at least 2 ([CLS] and [SEP])".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("`lr` must be a positive number, not {}", self.lr));
        }
        if self.checkpoint_every == Some(0) {
            return bad("`checkpoint_every` must be at least 1".into());
        }
        if let Some(n) = self.max_grad_norm
            && !(n.is_finite() && n > 0.0)
        {
            return bad(format!("`max_grad_norm` must be positive, not {n}"));
        }
        for (key, value) in [
            ("dropout", self.dropout),
            ("label_smoothing", self.label_smoothing),
        ] {
            if let Some(p) = value
                && !(0.0..1.0).contains(&p)
            {
                return bad(format!("`{key}` must be in [0, 1), not {p}"));
            }
        }
        if self.model.is_none() && !matches!(self.preset.as_str(), "tiny" | "base-zh") {
            return bad(format!(
                "`preset` must be `tiny` or `base-zh`, not `{}`",
                self.preset
            ));
        }
        if let Some(p) = &self.pretrain {
            if !((0.0..1.0).contains(&p.mask_probability) && 0.0 < p.split && p.split < 1.0) {
                return bad(
                    "`pretrain.mask_probability` must be in [0, 1) and `pretrain.split` in (0, 1)"
                        .into(),
                );
            }
            if p.mlm_weight < 0.0 || p.lm_weight < 0.0 || p.mlm_weight + p.lm_weight == 0.0 {
                return bad(
                    "`pretrain.mlm_weight` and `pretrain.lm_weight` must be ≥ 0, not both 0".into(),
                );
            }
        }
        if self.best_metric.needs_decoding() && self.valid_decode == 0 {
            return bad(format!(
                "`best_metric = \"{}\"` needs decoded validation rows; set `valid_decode` above 0 \
                 or use `best_metric = \"loss\"`",
                self.best_metric.name()
            ));
        }
        Ok(())
    }
}

/// toml's message with its position as `line N`, on one line.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().to_owned();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_toml() {
        let mut c = RunConfig::demo(Path::new("/data"));
        c.max_grad_norm = Some(1.0);
        c.schedule = ScheduleKind::Cosine;
        c.checkpoint_every = Some(50);
        let back: RunConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "epochs = 3\nlearning_rate = 0.1\n").unwrap();
        let e = RunConfig::from_toml_file(&path).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("line 2"), "{e}");
        assert!(e.contains("learning_rate"), "{e}");
        std::fs::write(&path, "epochs = 3\nschedule = \"wavy\"\n").unwrap();
        let e = RunConfig::from_toml_file(&path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(&path, "batch_size = 0\n").unwrap();
        let e = RunConfig::from_toml_file(&path).unwrap_err().to_string();
        assert!(e.contains("batch_size"), "{e}");
    }

    #[test]
    fn a_partial_file_takes_the_card_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "train = \"t.jsonl\"\nvalid = \"v.jsonl\"\n").unwrap();
        let c = RunConfig::from_toml_file(&path).unwrap();
        assert_eq!((c.lr, c.warmup, c.epochs, c.batch_size), (1e-3, 500, 15, 8));
        assert_eq!(c.max_src_len, 128);
    }
}
