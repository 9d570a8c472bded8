//! PALM's pre-training objective (`palm-reference.md` §7.1) on raw text: each document is cut
//! into spans of whole sentences, each span split near 80% of its characters at a sentence end
//! into a context (encoder input) and a continuation (decoder target). The encoder input is
//! masked BERT-style for the masked-LM loss; the decoder learns the continuation with the
//! label-smoothed loss; the objective is their weighted sum. Documents become pairs in
//! `palm_data::documents` (read by `palm_data::reader` with `Format::Documents`); this module
//! holds the objective's settings and the masking.

use rand::RngExt;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// Settings of the pre-training objective (`[pretrain]` in `config.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Fraction of encoder tokens selected for the masked-LM loss.
    pub mask_probability: f64,
    /// Weight of the masked-LM loss.
    pub mlm_weight: f64,
    /// Weight of the decoder's (autoregressive) loss.
    pub lm_weight: f64,
    /// Where a span is split into context and continuation, as a fraction of its characters.
    pub split: f64,
    /// Field of the document text in jsonl input.
    pub text_field: String,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            mask_probability: 0.15,
            mlm_weight: 1.0,
            lm_weight: 1.0,
            split: 0.8,
            text_field: "text".into(),
        }
    }
}

/// The ids the masking treats specially.
#[derive(Debug, Clone, Copy)]
pub struct MaskIds {
    /// `[MASK]`.
    pub mask: u32,
    /// `[PAD]` (also the "not a target" label).
    pub pad: u32,
    /// First id a random replacement may take (after the special and unused tokens).
    pub first_regular: u32,
    /// Vocabulary size.
    pub vocab: u32,
}

/// BERT's masking of one sequence: each non-special position is selected with probability `p`;
/// a selected token becomes `[MASK]` (80%), a random regular token (10%) or stays (10%). Returns
/// the masked ids and the labels (the original id at selected positions, PAD elsewhere).
/// Special tokens (`[CLS]`, `[SEP]`, `[PAD]`, …, every id below `first_regular`) are never
/// selected.
pub fn mask_tokens(ids: &[u32], p: f64, m: MaskIds, rng: &mut StdRng) -> (Vec<u32>, Vec<u32>) {
    let mut masked = ids.to_vec();
    let mut labels = vec![m.pad; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        if id < m.first_regular || !rng.random_bool(p) {
            continue;
        }
        labels[i] = id;
        let r: f64 = rng.random();
        masked[i] = if r < 0.8 {
            m.mask
        } else if r < 0.9 {
            rng.random_range(m.first_regular..m.vocab)
        } else {
            id
        };
    }
    (masked, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn masking_rates_match_bert_and_specials_are_never_masked() {
        let m = MaskIds {
            mask: 103,
            pad: 0,
            first_regular: 106,
            vocab: 5000,
        };
        let mut rng = StdRng::seed_from_u64(3);
        let (mut selected, mut as_mask, mut random, mut kept, mut regular) = (0, 0, 0, 0, 0);
        for _ in 0..2000 {
            // [CLS] … [SEP] [PAD] with an [UNK] (100) and a [MASK] already in the text.
            let mut ids = vec![101];
            ids.extend((0..60).map(|i| 106 + (i * 37) % 4800));
            ids.extend([100, 103, 102, 0]);
            let (masked, labels) = mask_tokens(&ids, 0.15, m, &mut rng);
            for (i, (&orig, (&new, &label))) in
                ids.iter().zip(masked.iter().zip(&labels)).enumerate()
            {
                if orig < 106 {
                    assert_eq!(
                        (new, label),
                        (orig, 0),
                        "special id {orig} at {i} was touched"
                    );
                    continue;
                }
                regular += 1;
                if label == 0 {
                    assert_eq!(new, orig);
                    continue;
                }
                assert_eq!(label, orig);
                selected += 1;
                if new == 103 {
                    as_mask += 1;
                } else if new == orig {
                    kept += 1;
                } else {
                    assert!((106..5000).contains(&new));
                    random += 1;
                }
            }
        }
        let rate = |a: usize, b: usize| a as f64 / b as f64;
        assert!(
            (rate(selected, regular) - 0.15).abs() < 0.005,
            "{}",
            rate(selected, regular)
        );
        assert!((rate(as_mask, selected) - 0.8).abs() < 0.01);
        // A random replacement can draw the original id (1 in 4894): it then counts as kept.
        assert!((rate(random, selected) - 0.1).abs() < 0.01);
        assert!((rate(kept, selected) - 0.1).abs() < 0.01);
    }
}
