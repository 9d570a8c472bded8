//! ROUGE and BLEU exactly as ModelScope's text-generation metric computes them.
//!
//! `palm-eval` owns the scores that PALM's model cards report: ROUGE-1, ROUGE-2 and ROUGE-L
//! (F1, with the `rouge` 1.0.1 package's set semantics and summary-level union LCS) and corpus
//! BLEU-1/BLEU-4 (NLTK's `corpus_bleu` with smoothing method 3), after ModelScope's
//! `rebuild_chinese_str` turns Chinese text into characters. The numbers match the reference
//! packages to 1e-6 (see `tests/parity.rs` and the fixture script beside it).
//!
//! It depends on the standard library only: no burn, no tokenizers.
//!
//! ```
//! use palm_eval::TextGenerationMetric;
//!
//! let mut metric = TextGenerationMetric::default();
//! metric.add("今天天气很好", "今天天气不错");
//! metric.add("", "空的预测记为零分");
//! let scores = metric.evaluate().unwrap();
//! assert_eq!(scores.count, 2);
//! // Unique characters: 今天气 are shared, 3 of 5 on each side (F1 0.6); the empty
//! // prediction scores 0 and still counts in the mean.
//! assert!((scores.rouge_1 - 0.3).abs() < 1e-6);
//! println!("ROUGE-L {:.2}", scores.percent().rouge_l);
//! ```

pub mod bleu;
pub mod rouge;
pub mod text;

use std::path::{Path, PathBuf};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing to score.
    #[error("no predictions to score")]
    Empty,
    /// The hypothesis and reference files hold different numbers of lines.
    #[error("{hyp} has {hyp_lines} lines but {reference} has {ref_lines}")]
    LineCount {
        /// Hypothesis file.
        hyp: PathBuf,
        /// Its line count.
        hyp_lines: usize,
        /// Reference file.
        reference: PathBuf,
        /// Its line count.
        ref_lines: usize,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A line is not valid UTF-8.
    #[error("{path}:{line}: invalid UTF-8")]
    Utf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Corpus scores as fractions in `[0, 1]`, the way ModelScope's metric returns them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scores {
    /// Mean ROUGE-1 F1 over all pairs (dropped pairs count as 0).
    pub rouge_1: f64,
    /// Mean ROUGE-2 F1, computed the same way as ROUGE-1.
    pub rouge_2: f64,
    /// Mean summary-level ROUGE-L F1.
    pub rouge_l: f64,
    /// Corpus BLEU with weights (1, 0, 0, 0).
    pub bleu_1: f64,
    /// Corpus BLEU with uniform weights over 1..4-grams.
    pub bleu_4: f64,
    /// Number of scored pairs.
    pub count: usize,
}

impl Scores {
    /// The same scores ×100, as model cards print them.
    pub fn percent(&self) -> Scores {
        Scores {
            rouge_1: self.rouge_1 * 100.0,
            rouge_2: self.rouge_2 * 100.0,
            rouge_l: self.rouge_l * 100.0,
            bleu_1: self.bleu_1 * 100.0,
            bleu_4: self.bleu_4 * 100.0,
            count: self.count,
        }
    }
}

/// Accumulates prediction/reference pairs and scores them like ModelScope's
/// `TextGenerationMetric` (`palm-reference.md` §6.1), with ROUGE-2 added.
///
/// Scores are accumulated as pairs arrive, so [`evaluate`](Self::evaluate) is cheap at any
/// point (a training loop reads running values after every batch).
#[derive(Debug, Clone)]
pub struct TextGenerationMetric {
    count: usize,
    rouge_sums: [f64; 3],
    bleu: bleu::CorpusStats,
}

impl Default for TextGenerationMetric {
    fn default() -> Self {
        TextGenerationMetric {
            count: 0,
            rouge_sums: [0.0; 3],
            bleu: bleu::CorpusStats::empty(4),
        }
    }
}

impl TextGenerationMetric {
    /// Adds one pair of raw texts; both are rebuilt to character level here.
    pub fn add(&mut self, prediction: &str, reference: &str) {
        let pred = text::rebuild_chinese_str(prediction);
        let reference = text::rebuild_chinese_str(reference);
        self.count += 1;
        // A pair whose prediction or reference is empty after removing spaces and '.' is left
        // out of ROUGE but still counts in the mean's denominator.
        if has_content(&pred) && has_content(&reference) {
            let s = rouge::score(&pred, &reference);
            self.rouge_sums[0] += s.rouge_1.f;
            self.rouge_sums[1] += s.rouge_2.f;
            self.rouge_sums[2] += s.rouge_l.f;
        }
        self.bleu.add(&bleu_tokens(&pred), &bleu_tokens(&reference));
    }

    /// Number of pairs added.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no pair was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Scores all pairs added so far.
    ///
    /// Unlike the reference, which fails on a corpus where every pair is left out of ROUGE,
    /// this returns ROUGE 0 there.
    pub fn evaluate(&self) -> Result<Scores> {
        if self.count == 0 {
            return Err(Error::Empty);
        }
        let total = self.count as f64;
        Ok(Scores {
            rouge_1: self.rouge_sums[0] / total,
            rouge_2: self.rouge_sums[1] / total,
            rouge_l: self.rouge_sums[2] / total,
            bleu_1: self.bleu.bleu(&[1.0, 0.0, 0.0, 0.0]),
            bleu_4: self.bleu.bleu(&[0.25; 4]),
            count: self.count,
        })
    }
}

/// The reference's filter: something other than spaces and '.' must remain.
fn has_content(s: &str) -> bool {
    s.chars().any(|c| c != ' ' && c != '.')
}

/// BLEU tokens: `s.strip().split(' ')`, so an empty text is one empty token, as in the reference.
fn bleu_tokens(s: &str) -> Vec<&str> {
    text::py_strip(s).split(' ').collect()
}

/// Scores a hypothesis file against a reference file, one text per line (empty lines are
/// valid, empty predictions score 0).
pub fn evaluate_files(hyp: &Path, reference: &Path) -> Result<Scores> {
    let hyps = read_lines(hyp)?;
    let refs = read_lines(reference)?;
    if hyps.len() != refs.len() {
        return Err(Error::LineCount {
            hyp: hyp.to_path_buf(),
            hyp_lines: hyps.len(),
            reference: reference.to_path_buf(),
            ref_lines: refs.len(),
        });
    }
    let mut metric = TextGenerationMetric::default();
    for (h, r) in hyps.iter().zip(&refs) {
        metric.add(h, r);
    }
    metric.evaluate()
}

/// Reads a text file as lines (`\n` or `\r\n`; a final newline does not start a new line).
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut lines = Vec::new();
    let mut body: &[u8] = &bytes;
    if let Some(stripped) = body.strip_suffix(b"\n") {
        body = stripped;
    } else if body.is_empty() {
        return Ok(lines);
    }
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|_| Error::Utf8 {
            path: path.to_path_buf(),
            line: i + 1,
        })?;
        lines.push(line.to_owned());
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_prediction_counts_as_zero_in_the_mean() {
        let mut m = TextGenerationMetric::default();
        m.add("你好", "你好");
        m.add("", "你好");
        let s = m.evaluate().unwrap();
        assert!((s.rouge_1 - 0.5).abs() < 1e-6, "{s:?}");
        assert!((s.rouge_l - 0.5).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn nothing_to_score_is_an_error() {
        assert!(matches!(
            TextGenerationMetric::default().evaluate(),
            Err(Error::Empty)
        ));
    }

    #[test]
    fn all_pairs_filtered_scores_zero_rouge() {
        let mut m = TextGenerationMetric::default();
        m.add("...", "好");
        let s = m.evaluate().unwrap();
        assert_eq!(s.rouge_1, 0.0);
        assert_eq!(s.count, 1);
    }

    #[test]
    fn read_lines_keeps_empty_lines_and_handles_crlf() {
        let dir = std::env::temp_dir().join(format!("palm-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.txt");
        std::fs::write(&p, "a\r\n\nb\n").unwrap();
        assert_eq!(read_lines(&p).unwrap(), vec!["a", "", "b"]);
        std::fs::write(&p, b"ok\n\xff\n").unwrap();
        let err = read_lines(&p).unwrap_err().to_string();
        assert!(err.ends_with(":2: invalid UTF-8"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
