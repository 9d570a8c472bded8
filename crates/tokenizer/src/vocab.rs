//! Reading `vocab.txt` files and training new ones with the `tokenizers` WordPiece trainer.

use std::path::Path;

use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Model, TokenizerImpl};

use crate::{Error, Result, SPECIAL_TOKENS};

/// Reads a `vocab.txt`: one token a line, the line number (from 0) is its id.
pub(crate) fn read_vocab_file(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tokens = Vec::new();
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    if body.is_empty() {
        return Err(Error::EmptyVocab(path.display().to_string()));
    }
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let s = std::str::from_utf8(line).map_err(|_| Error::Utf8 {
            path: path.to_path_buf(),
            line: i + 1,
        })?;
        tokens.push(s.to_owned());
    }
    Ok(tokens)
}

/// Options of [`train_vocab`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Size of the whole vocabulary, the 104 reserved entries included.
    pub size: usize,
    /// Pieces seen fewer times are not merged.
    pub min_frequency: u64,
    /// Keep at most this many distinct characters (the most frequent); `None` keeps all.
    pub limit_alphabet: Option<usize>,
    /// Show the trainer's progress bars.
    pub show_progress: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            size: 21128,
            min_frequency: 2,
            limit_alphabet: None,
            show_progress: false,
        }
    }
}

/// Number of entries before the learned pieces: `[PAD]`, `[unused1]`…`[unused99]`, `[UNK]`,
/// `[CLS]`, `[SEP]`, `[MASK]`, as in bert-base-chinese (ids 0, 1..=99, 100, 101, 102, 103).
pub const RESERVED: usize = 104;

/// The reserved head of a vocabulary in the bert-base-chinese layout.
pub fn reserved_tokens() -> Vec<String> {
    let mut v = vec!["[PAD]".to_owned()];
    v.extend((1..100).map(|i| format!("[unused{i}]")));
    v.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    v
}

/// Trains a WordPiece vocabulary on texts with BERT's lower-casing basic tokenizer, and
/// returns it in the bert-base-chinese layout: the [`RESERVED`] entries, then the learned
/// pieces (characters first, then merges, in the trainer's order), at most `size` in all.
pub fn train_vocab<I, S>(texts: I, options: &TrainOptions) -> Result<Vec<String>>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let learned = options.size.saturating_sub(RESERVED).max(1);
    let mut trainer = WordPieceTrainer::builder()
        .vocab_size(learned)
        .min_frequency(options.min_frequency)
        .show_progress(options.show_progress)
        .continuing_subword_prefix("##".into())
        .build();
    trainer.set_limit_alphabet(options.limit_alphabet);
    let mut tok: TokenizerImpl<
        WordPiece,
        BertNormalizer,
        BertPreTokenizer,
        BertProcessing,
        tokenizers::decoders::wordpiece::WordPiece,
    > = TokenizerImpl::new(WordPiece::default());
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.train(&mut trainer, texts)
        .map_err(|e| Error::Tokenizers(e.to_string()))?;
    let mut pieces: Vec<(String, u32)> = tok.get_model().get_vocab().into_iter().collect();
    pieces.sort_by_key(|(_, id)| *id);
    let mut vocab = reserved_tokens();
    vocab.extend(
        pieces
            .into_iter()
            .map(|(t, _)| t)
            .filter(|t| !SPECIAL_TOKENS.contains(&t.as_str()) && !t.is_empty()),
    );
    vocab.truncate(options.size.max(RESERVED));
    Ok(vocab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_layout_matches_bert_base_chinese() {
        let r = reserved_tokens();
        assert_eq!(r.len(), RESERVED);
        assert_eq!(r[0], "[PAD]");
        assert_eq!(r[1], "[unused1]");
        assert_eq!(r[99], "[unused99]");
        assert_eq!(&r[100..], ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]);
    }

    #[test]
    fn trained_vocab_covers_the_corpus_characters() {
        let texts = [
            "今天天气很好",
            "今天是个好日子",
            "hello world",
            "hello palm",
        ];
        let opts = TrainOptions {
            size: 150,
            min_frequency: 1,
            ..TrainOptions::default()
        };
        let v = train_vocab(texts.iter(), &opts).unwrap();
        assert!(v.len() <= 150);
        assert_eq!(&v[..RESERVED], reserved_tokens().as_slice());
        for c in ["今", "天", "好", "h", "##e"] {
            assert!(v.iter().any(|t| t == c), "missing {c}");
        }
        let tok = crate::PalmTokenizer::from_tokens(v).unwrap();
        assert_eq!(tok.decode(&tok.encode("今天天气很好", 64)), "今天天气很好");
        assert!(!tok.pieces("hello").contains(&tok.special_ids().unk));
    }
}
