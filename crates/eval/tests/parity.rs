//! Parity with the reference packages: golden values made by `fixtures/make_metric_fixtures.py`
//! from ModelScope's `TextGenerationMetric`, `rouge` 1.0.1 and NLTK.

use palm_eval::{TextGenerationMetric, rouge, text};
use serde::Deserialize;

#[derive(Deserialize)]
struct Prf {
    f: f64,
    p: f64,
    r: f64,
}

#[derive(Deserialize)]
struct PairRouge {
    #[serde(rename = "rouge-1")]
    rouge_1: Prf,
    #[serde(rename = "rouge-2")]
    rouge_2: Prf,
    #[serde(rename = "rouge-l")]
    rouge_l: Prf,
}

#[derive(Deserialize)]
struct Pair {
    hyp: String,
    #[serde(rename = "ref")]
    reference: String,
    hyp_rebuilt: String,
    ref_rebuilt: String,
    rouge: Option<PairRouge>,
}

#[derive(Deserialize)]
struct CorpusScores {
    #[serde(rename = "rouge-1")]
    rouge_1: f64,
    #[serde(rename = "rouge-2")]
    rouge_2: f64,
    #[serde(rename = "rouge-l")]
    rouge_l: f64,
    #[serde(rename = "bleu-1")]
    bleu_1: f64,
    #[serde(rename = "bleu-4")]
    bleu_4: f64,
    count: usize,
}

#[derive(Deserialize)]
struct Corpus {
    start: usize,
    len: usize,
    scores: CorpusScores,
}

#[derive(Deserialize)]
struct Fixture {
    pairs: Vec<Pair>,
    corpora: Vec<Corpus>,
}

fn fixture() -> Fixture {
    let raw = include_str!("fixtures/metric_pairs.json");
    serde_json::from_str(raw).expect("fixture parses")
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-6, "{what}: palm {a} vs reference {b}");
}

#[test]
fn fixture_covers_the_hard_cases() {
    let f = fixture();
    assert!(f.pairs.len() >= 500);
    assert!(f.pairs.iter().any(|p| p.hyp.is_empty()));
    assert!(f.pairs.iter().any(|p| p.hyp.contains('.')));
    assert!(f.pairs.iter().any(|p| p.rouge.is_none()));
    assert!(f.pairs.iter().any(|p| p.hyp.contains("PALM")));
}

#[test]
fn rebuild_chinese_str_matches_modelscope() {
    for p in fixture().pairs {
        assert_eq!(
            text::rebuild_chinese_str(&p.hyp),
            p.hyp_rebuilt,
            "{:?}",
            p.hyp
        );
        assert_eq!(text::rebuild_chinese_str(&p.reference), p.ref_rebuilt);
    }
}

#[test]
fn per_pair_rouge_matches_the_rouge_package() {
    let mut checked = 0;
    for p in fixture().pairs {
        let Some(expected) = p.rouge else { continue };
        let got = rouge::score(&p.hyp_rebuilt, &p.ref_rebuilt);
        for (name, g, e) in [
            ("rouge-1", got.rouge_1, &expected.rouge_1),
            ("rouge-2", got.rouge_2, &expected.rouge_2),
            ("rouge-l", got.rouge_l, &expected.rouge_l),
        ] {
            let what = format!("{name} of {:?} vs {:?}", p.hyp_rebuilt, p.ref_rebuilt);
            close(g.f, e.f, &what);
            close(g.p, e.p, &what);
            close(g.r, e.r, &what);
        }
        checked += 1;
    }
    assert!(checked > 400, "only {checked} pairs had reference ROUGE");
}

#[test]
fn corpus_scores_match_text_generation_metric() {
    let f = fixture();
    for c in &f.corpora {
        let mut m = TextGenerationMetric::default();
        for p in &f.pairs[c.start..c.start + c.len] {
            m.add(&p.hyp, &p.reference);
        }
        let s = m.evaluate().unwrap();
        let what = format!("corpus {}..{}", c.start, c.start + c.len);
        close(s.rouge_1, c.scores.rouge_1, &format!("{what} rouge-1"));
        close(s.rouge_2, c.scores.rouge_2, &format!("{what} rouge-2"));
        close(s.rouge_l, c.scores.rouge_l, &format!("{what} rouge-l"));
        close(s.bleu_1, c.scores.bleu_1, &format!("{what} bleu-1"));
        close(s.bleu_4, c.scores.bleu_4, &format!("{what} bleu-4"));
        assert_eq!(s.count, c.scores.count);
    }
}
