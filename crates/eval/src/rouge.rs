//! ROUGE-N and summary-level ROUGE-L with the semantics of the `rouge` 1.0.1 package
//! (pltrdy), which ModelScope's metric uses with its defaults (`exclusive=True`).
//!
//! The package's quirks are kept on purpose: texts are split into "sentences" on ASCII '.',
//! n-grams run across sentence boundaries, n-grams and LCS tokens are counted as sets (a
//! repeated n-gram counts once), and ROUGE-L takes the union of the LCS *words* over all
//! sentence pairs. The LCS is rebuilt with the package's tie-breaking, because which of several
//! longest subsequences is chosen changes the union.

use std::collections::HashSet;

/// Precision, recall and F1 of one score.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Prf {
    /// F1 (with the package's `+ 1e-8` in the denominator).
    pub f: f64,
    /// Precision.
    pub p: f64,
    /// Recall.
    pub r: f64,
}

/// The three scores of one hypothesis/reference pair.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairScores {
    /// ROUGE-1.
    pub rouge_1: Prf,
    /// ROUGE-2.
    pub rouge_2: Prf,
    /// Summary-level ROUGE-L.
    pub rouge_l: Prf,
}

/// Splits a text the way `Rouge.get_scores` does: on '.', dropping empty pieces, and
/// re-joining each piece's whitespace-separated words with single spaces.
pub fn sentences(text: &str) -> Vec<String> {
    text.split('.')
        .filter(|s| !s.is_empty())
        .map(|s| crate::text::py_split(s).collect::<Vec<_>>().join(" "))
        .collect()
}

/// All words of all sentences, split on single spaces (so an empty sentence is one empty word).
fn words(sentences: &[String]) -> Vec<&str> {
    sentences.iter().flat_map(|s| s.split(' ')).collect()
}

fn prf(evaluated: usize, reference: usize, overlap: usize) -> Prf {
    let p = if evaluated == 0 {
        0.0
    } else {
        overlap as f64 / evaluated as f64
    };
    let r = if reference == 0 {
        0.0
    } else {
        overlap as f64 / reference as f64
    };
    Prf {
        f: 2.0 * ((p * r) / (p + r + 1e-8)),
        p,
        r,
    }
}

/// ROUGE-N of hypothesis sentences against reference sentences (both non-empty).
pub fn rouge_n(hyp: &[String], reference: &[String], n: usize) -> Prf {
    let hw = words(hyp);
    let rw = words(reference);
    let hs: HashSet<&[&str]> = hw.windows(n).collect();
    let rs: HashSet<&[&str]> = rw.windows(n).collect();
    let overlap = hs.intersection(&rs).count();
    prf(hs.len(), rs.len(), overlap)
}

/// The words of one longest common subsequence of `x` and `y`, rebuilt from the end with the
/// package's tie-breaking (step in `x` only when that keeps a strictly longer LCS).
fn lcs_words<'a>(x: &[&'a str], y: &[&str]) -> Vec<&'a str> {
    let (n, m) = (x.len(), y.len());
    let w = m + 1;
    let mut table = vec![0u32; (n + 1) * w];
    for i in 1..=n {
        for j in 1..=m {
            table[i * w + j] = if x[i - 1] == y[j - 1] {
                table[(i - 1) * w + j - 1] + 1
            } else {
                table[(i - 1) * w + j].max(table[i * w + j - 1])
            };
        }
    }
    let mut out = Vec::new();
    let (mut i, mut j) = (n, m);
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            out.push(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[(i - 1) * w + j] > table[i * w + j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    out.reverse();
    out
}

/// Summary-level ROUGE-L: the union of LCS words over every (reference sentence, hypothesis
/// sentence) pair, against the unique word counts of each side.
pub fn rouge_l_summary_level(hyp: &[String], reference: &[String]) -> Prf {
    let m = words(reference).into_iter().collect::<HashSet<_>>().len();
    let n = words(hyp).into_iter().collect::<HashSet<_>>().len();
    let mut union: HashSet<&str> = HashSet::new();
    for ref_s in reference {
        let ref_words: Vec<&str> = ref_s.split(' ').collect();
        for hyp_s in hyp {
            let hyp_words: Vec<&str> = hyp_s.split(' ').collect();
            union.extend(lcs_words(&ref_words, &hyp_words));
        }
    }
    let llcs = union.len() as f64;
    let r = llcs / m as f64;
    let p = llcs / n as f64;
    Prf {
        f: 2.0 * ((p * r) / (p + r + 1e-8)),
        p,
        r,
    }
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one pair, both sides already rebuilt to words.
///
/// Both must contain a sentence (the metric filters out pairs that would not).
pub fn score(hyp: &str, reference: &str) -> PairScores {
    let h = sentences(hyp);
    let r = sentences(reference);
    if h.is_empty() || r.is_empty() {
        return PairScores::default();
    }
    PairScores {
        rouge_1: rouge_n(&h, &r, 1),
        rouge_2: rouge_n(&h, &r, 2),
        rouge_l: rouge_l_summary_level(&h, &r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Vec<String> {
        sentences(x)
    }

    #[test]
    fn repeated_ngrams_count_once() {
        let p = rouge_n(&s("a a a b"), &s("a b"), 1);
        assert_eq!((p.p, p.r), (1.0, 1.0));
    }

    #[test]
    fn bigrams_cross_sentence_boundaries() {
        // "a . b" is two sentences, but the word list is [a, b], so "a b" is a bigram.
        let p = rouge_n(&s("a . b"), &s("a b"), 2);
        assert_eq!(p.p, 1.0);
    }

    #[test]
    fn whitespace_only_piece_becomes_an_empty_word() {
        assert_eq!(s("a. ."), vec!["a".to_string(), String::new()]);
    }

    #[test]
    fn lcs_tie_breaking_prefers_moving_in_y() {
        // x = [a, b], y = [b, a]: both "a" and "b" are LCSs; the package keeps "b".
        assert_eq!(lcs_words(&["a", "b"], &["b", "a"]), vec!["b"]);
    }

    #[test]
    fn union_lcs_example_from_lin_2004() {
        let r = s("w1 w2 w3 w4 w5");
        let c = s("w1 w2 w6 w7 w8 . w1 w3 w8 w9 w5");
        let l = rouge_l_summary_level(&c, &r);
        assert!((l.r - 4.0 / 5.0).abs() < 1e-12);
    }
}
