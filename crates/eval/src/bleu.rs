//! Corpus BLEU as NLTK's `corpus_bleu` computes it, with one reference per hypothesis and
//! `SmoothingFunction().method3` (NIST geometric smoothing), as ModelScope's metric calls it.

use std::collections::HashMap;

/// Clipped n-gram matches and totals summed over a corpus, with the lengths for the brevity
/// penalty. Build once, then ask for BLEU with any weights.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusStats {
    /// Clipped matches per order (index 0 is unigrams).
    pub numerators: Vec<u64>,
    /// Hypothesis n-gram counts per order, each sentence contributing at least 1.
    pub denominators: Vec<u64>,
    /// Total hypothesis length in tokens.
    pub hyp_len: u64,
    /// Total reference length in tokens.
    pub ref_len: u64,
}

fn counts<'a>(tokens: &'a [&'a str], n: usize) -> HashMap<&'a [&'a str], u64> {
    let mut map = HashMap::new();
    if tokens.len() >= n {
        for g in tokens.windows(n) {
            *map.entry(g).or_insert(0) += 1;
        }
    }
    map
}

impl CorpusStats {
    /// Statistics of an empty corpus, for n-gram orders `1..=max_order`.
    pub fn empty(max_order: usize) -> Self {
        CorpusStats {
            numerators: vec![0; max_order],
            denominators: vec![0; max_order],
            hyp_len: 0,
            ref_len: 0,
        }
    }

    /// Collects statistics for n-gram orders `1..=max_order`.
    pub fn new<H: AsRef<[S]>, R: AsRef<[S]>, S: AsRef<str>>(
        hyps: &[H],
        refs: &[R],
        max_order: usize,
    ) -> Self {
        let mut stats = CorpusStats::empty(max_order);
        for (hyp, reference) in hyps.iter().zip(refs) {
            stats.add(hyp.as_ref(), reference.as_ref());
        }
        stats
    }

    /// Adds one hypothesis and its reference.
    pub fn add<S: AsRef<str>>(&mut self, hyp: &[S], reference: &[S]) {
        let hyp: Vec<&str> = hyp.iter().map(AsRef::as_ref).collect();
        let reference: Vec<&str> = reference.iter().map(AsRef::as_ref).collect();
        for n in 1..=self.numerators.len() {
            let hc = counts(&hyp, n);
            let rc = counts(&reference, n);
            let clipped: u64 = hc
                .iter()
                .map(|(g, &c)| c.min(rc.get(g).copied().unwrap_or(0)))
                .sum();
            let total: u64 = hc.values().sum();
            self.numerators[n - 1] += clipped;
            self.denominators[n - 1] += total.max(1);
        }
        self.hyp_len += hyp.len() as u64;
        // With one reference, the closest reference length is its length.
        self.ref_len += reference.len() as u64;
    }

    /// NLTK's brevity penalty.
    pub fn brevity_penalty(&self) -> f64 {
        if self.hyp_len > self.ref_len {
            1.0
        } else if self.hyp_len == 0 {
            0.0
        } else {
            (1.0 - self.ref_len as f64 / self.hyp_len as f64).exp()
        }
    }

    /// BLEU with the given weights (one per order, at most `max_order`) and smoothing
    /// method 3: an order with no match gets precision 1 / (2^k · total), k counting such
    /// orders from 1.
    pub fn bleu(&self, weights: &[f64]) -> f64 {
        if self.numerators.first().copied().unwrap_or(0) == 0 {
            return 0.0;
        }
        let mut k = 0i32;
        let precisions: Vec<f64> = self
            .numerators
            .iter()
            .zip(&self.denominators)
            .map(|(&num, &den)| {
                if num == 0 {
                    k += 1;
                    1.0 / (2f64.powi(k) * den as f64)
                } else {
                    num as f64 / den as f64
                }
            })
            .collect();
        let terms: Vec<f64> = weights
            .iter()
            .zip(&precisions)
            .filter(|(_, p)| **p > 0.0)
            .map(|(w, p)| w * p.ln())
            .collect();
        self.brevity_penalty() * fsum(&terms).exp()
    }
}

/// Correctly rounded sum of floats, as Python's `math.fsum` (Shewchuk's exact partials).
pub fn fsum(values: &[f64]) -> f64 {
    let mut partials: Vec<f64> = Vec::new();
    for &v in values {
        let mut x = v;
        let mut i = 0;
        for j in 0..partials.len() {
            let mut y = partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[i] = lo;
                i += 1;
            }
            x = hi;
        }
        partials.truncate(i);
        partials.push(x);
    }
    // Round the exact sum of the partials, most significant first, with the half-way fix-up.
    let Some(mut hi) = partials.pop() else {
        return 0.0;
    };
    let mut lo = 0.0;
    while let Some(p) = partials.pop() {
        let x = hi;
        let y = p;
        hi = x + y;
        let yr = hi - x;
        lo = y - yr;
        if lo != 0.0 {
            break;
        }
    }
    if let Some(&next) = partials.last()
        && ((lo < 0.0 && next < 0.0) || (lo > 0.0 && next > 0.0))
    {
        let y = lo * 2.0;
        let x = hi + y;
        if y == x - hi {
            hi = x;
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<&str> {
        s.split(' ').collect()
    }

    #[test]
    fn identical_corpus_scores_one() {
        let h = vec![toks("a b c d e")];
        let s = CorpusStats::new(&h, &h, 4);
        assert!((s.bleu(&[0.25; 4]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn no_unigram_match_is_zero() {
        let s = CorpusStats::new(&[toks("x y")], &[toks("a b")], 4);
        assert_eq!(s.bleu(&[0.25; 4]), 0.0);
    }

    #[test]
    fn smoothing_method3_halves_for_each_missing_order() {
        // Unigrams match 2/2, no bigram matches (1 bigram): p2 = 1/(2*1).
        let s = CorpusStats::new(&[toks("a b")], &[toks("b a")], 2);
        assert!((s.bleu(&[0.5, 0.5]) - (0.5f64).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn fsum_is_exact_where_naive_sum_is_not() {
        assert_eq!(fsum(&[1e100, 1.0, -1e100, 1e-100]), 1.0);
        assert_eq!(fsum(&[0.1; 10]), 1.0);
        assert_eq!(fsum(&[]), 0.0);
    }
}
