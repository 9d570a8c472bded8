//! BERT WordPiece tokenization for PALM, id-for-id compatible with HF `BertTokenizer`.
//!
//! `palm-tokenizer` owns everything between text and token ids: the BERT basic tokenizer and
//! WordPiece (through the `tokenizers` crate), PALM's `[CLS] … [SEP]` framing with truncation,
//! decoding with ModelScope's Chinese de-spacing, and training a `vocab.txt` in the
//! bert-base-chinese layout. Its main type is [`PalmTokenizer`]; [`train_vocab`] makes
//! vocabularies. It must not depend on burn or arrow; ModelScope's Chinese text utilities come
//! from the std-only `palm-eval`.
//!
//! ```
//! use palm_tokenizer::PalmTokenizer;
//!
//! let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "你", "好", "，", "世", "界"];
//! let tok = PalmTokenizer::from_tokens(vocab.iter().map(|s| s.to_string())).unwrap();
//! let ids = tok.encode("你好，世界", 128);
//! assert_eq!(ids, vec![2, 5, 6, 7, 8, 9, 3]); // [CLS] 你 好 ， 世 界 [SEP]
//! assert_eq!(tok.decode(&ids), "你好，世界");
//! ```

pub mod vocab;

/// ModelScope's de-spacing of decoded Chinese text (it lives with the rest of ModelScope's
/// `chinese_utils` in `palm-eval`).
pub use palm_eval::text::remove_space_between_chinese_chars;
pub use vocab::{TrainOptions, train_vocab};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, TokenizerImpl};

/// The special tokens PALM needs, by their bert-base-chinese names.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vocabulary file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A vocabulary file is not UTF-8.
    #[error("{path}:{line}: invalid UTF-8")]
    Utf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// The vocabulary lacks a special token.
    #[error("{vocab}: missing special token {token}")]
    MissingSpecial {
        /// Where the vocabulary came from.
        vocab: String,
        /// The token.
        token: &'static str,
    },
    /// The vocabulary is empty.
    #[error("{0}: empty vocabulary")]
    EmptyVocab(String),
    /// The `tokenizers` crate failed.
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

type Inner =
    TokenizerImpl<WordPiece, BertNormalizer, BertPreTokenizer, BertProcessing, WordPieceDecoder>;

/// Ids of the special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `[PAD]`, also the padding id of the model.
    pub pad: u32,
    /// `[UNK]`.
    pub unk: u32,
    /// `[CLS]`: the decoder's BOS.
    pub cls: u32,
    /// `[SEP]`: the decoder's EOS.
    pub sep: u32,
    /// `[MASK]`.
    pub mask: u32,
}

/// A BERT WordPiece tokenizer with `do_lower_case=True`, configured as PALM uses it.
#[derive(Clone)]
pub struct PalmTokenizer {
    inner: Inner,
    id_to_token: Vec<String>,
    special: SpecialIds,
}

impl std::fmt::Debug for PalmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PalmTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl PalmTokenizer {
    /// Loads a `vocab.txt` (one token a line; the line number is the id).
    pub fn from_vocab_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let tokens = vocab::read_vocab_file(path)?;
        Self::build(tokens, &path.display().to_string())
    }

    /// Builds a tokenizer from tokens in id order.
    pub fn from_tokens(tokens: impl IntoIterator<Item = String>) -> Result<Self> {
        Self::build(tokens.into_iter().collect(), "vocabulary")
    }

    fn build(tokens: Vec<String>, origin: &str) -> Result<Self> {
        if tokens.is_empty() {
            return Err(Error::EmptyVocab(origin.to_owned()));
        }
        // As in HF's `load_vocab`, a token listed twice keeps its last id.
        let mut map: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            map.insert(t.clone(), i as u32);
        }
        let id = |token: &'static str| {
            map.get(token).copied().ok_or(Error::MissingSpecial {
                vocab: origin.to_owned(),
                token,
            })
        };
        let special = SpecialIds {
            pad: id("[PAD]")?,
            unk: id("[UNK]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
        };
        let model = WordPiece::builder()
            .vocab(map.into_iter().collect::<tokenizers::models::bpe::Vocab>())
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| Error::Tokenizers(e.to_string()))?;
        let mut inner = TokenizerImpl::new(model);
        // clean_text, handle_chinese_chars, strip_accents follows lowercase, lowercase.
        inner.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), special.sep),
            ("[CLS]".into(), special.cls),
        )));
        inner.with_decoder(Some(WordPieceDecoder::default()));
        // Special tokens written in the text (e.g. DuReader-QG's literal "[SEP]") are matched
        // before normalization, exactly and case-sensitively, as the slow tokenizer does.
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(PalmTokenizer {
            inner,
            id_to_token: tokens,
            special,
        })
    }

    /// Number of tokens in the vocabulary (lines of `vocab.txt`).
    pub fn vocab_size(&self) -> usize {
        self.id_to_token.len()
    }

    /// The special token ids.
    pub fn special_ids(&self) -> SpecialIds {
        self.special
    }

    /// The token of an id, if in range.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.id_to_token.get(id as usize).map(String::as_str)
    }

    /// The id of a token, if in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The word pieces of `text`, without `[CLS]`/`[SEP]` (HF's `tokenize`).
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        self.pieces(text)
            .into_iter()
            .map(|id| self.id_to_token[id as usize].clone())
            .collect()
    }

    /// Ids of `text` without special tokens around it.
    pub fn pieces(&self, text: &str) -> Vec<u32> {
        match self.inner.encode_fast(text, false) {
            Ok(enc) => enc.get_ids().to_vec(),
            // The normalizer, pre-tokenizer and WordPiece used here cannot fail on a `&str`.
            Err(e) => unreachable!("BERT WordPiece failed on valid UTF-8: {e}"),
        }
    }

    /// `[CLS] pieces [SEP]`, the pieces cut so that the whole has at most `max_len` ids
    /// (HF's `tokenizer(text, max_length=max_len, truncation=True)`). `max_len` is at least 2.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        self.frame(self.pieces(text), max_len)
    }

    /// [`encode`](Self::encode) for many texts, in parallel.
    pub fn encode_batch<S: AsRef<str> + Send + Sync>(
        &self,
        texts: &[S],
        max_len: usize,
    ) -> Vec<Vec<u32>> {
        self.encode_batch_untruncated(texts)
            .into_iter()
            .map(|pieces| self.frame(pieces, max_len))
            .collect()
    }

    /// Ids of many texts without special tokens around them (HF `tokenize` + ids), in parallel.
    pub fn encode_batch_untruncated<S: AsRef<str> + Send + Sync>(
        &self,
        texts: &[S],
    ) -> Vec<Vec<u32>> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        match self.inner.encode_batch_fast(inputs, false) {
            Ok(encs) => encs.into_iter().map(|e| e.get_ids().to_vec()).collect(),
            Err(e) => unreachable!("BERT WordPiece failed on valid UTF-8: {e}"),
        }
    }

    /// Frames pieces as `[CLS] pieces [SEP]`, cutting pieces so the whole fits in `max_len`
    /// (at least 2).
    pub fn frame(&self, mut pieces: Vec<u32>, max_len: usize) -> Vec<u32> {
        let max_len = max_len.max(2);
        pieces.truncate(max_len - 2);
        let mut ids = Vec::with_capacity(pieces.len() + 2);
        ids.push(self.special.cls);
        ids.extend(pieces);
        ids.push(self.special.sep);
        ids
    }

    /// Whether `id` is one of the special tokens that decoding skips.
    pub fn is_special(&self, id: u32) -> bool {
        let s = self.special;
        id == s.pad || id == s.unk || id == s.cls || id == s.sep || id == s.mask
    }

    /// Text of `ids` as ModelScope's pipeline prints it: special tokens skipped, word pieces
    /// joined (HF `decode(skip_special_tokens=True)` with its clean-up of English spacing), then
    /// the spaces between Chinese characters removed.
    pub fn decode(&self, ids: &[u32]) -> String {
        remove_space_between_chinese_chars(&self.decode_pieces(ids))
    }

    /// HF `decode(ids, skip_special_tokens=True)` without the Chinese de-spacing.
    pub fn decode_pieces(&self, ids: &[u32]) -> String {
        let mut joined = String::new();
        for &id in ids {
            if self.is_special(id) {
                continue;
            }
            let Some(tok) = self.id_to_token(id) else {
                continue;
            };
            if !joined.is_empty() {
                joined.push(' ');
            }
            joined.push_str(tok);
        }
        let joined = joined.replace(" ##", "");
        clean_up_tokenization(joined.trim())
    }
}

/// HF's `clean_up_tokenization`: no space before English punctuation and contractions.
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> PalmTokenizer {
        let v = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "##b", "你", "好", ".",
        ];
        PalmTokenizer::from_tokens(v.iter().map(|s| s.to_string())).unwrap()
    }

    #[test]
    fn truncation_keeps_cls_and_sep() {
        let t = tiny();
        assert_eq!(t.encode("你好你好", 4), vec![2, 7, 8, 3]);
        assert_eq!(t.encode("你好", 2), vec![2, 3]);
    }

    #[test]
    fn missing_special_token_is_named() {
        let err = PalmTokenizer::from_tokens(["[PAD]".to_string()]).unwrap_err();
        assert_eq!(err.to_string(), "vocabulary: missing special token [UNK]");
    }

    #[test]
    fn decode_joins_pieces_and_skips_specials() {
        let t = tiny();
        assert_eq!(t.decode(&[2, 5, 6, 1, 7, 8, 9, 3, 0]), "ab 你好.");
    }

    #[test]
    fn literal_sep_in_text_is_the_special_token() {
        let t = tiny();
        assert_eq!(t.pieces("你[SEP]好"), vec![7, 3, 8]);
        assert_eq!(t.pieces("你[sep]好"), vec![7, 1, 1, 1, 8]);
    }
}
