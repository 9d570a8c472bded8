//! `palm eval`: corpus ROUGE/BLEU of a hypothesis file against a reference file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use palm_eval::TextGenerationMetric;

#[derive(clap::Args)]
pub struct Args {
    /// Predictions: one text a line, or jsonl (`.jsonl`) with the field of --hyp-field.
    #[arg(long)]
    hyp: PathBuf,
    /// References: one text a line, or jsonl (`.jsonl`) with the field of --ref-field.
    #[arg(long = "ref")]
    reference: PathBuf,
    /// Field of the predictions in a jsonl file (`palm generate` writes "pred").
    #[arg(long, default_value = "pred")]
    hyp_field: String,
    /// Field of the references in a jsonl file.
    #[arg(long, default_value = "tgt")]
    ref_field: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Score against the references as the reference trainer does: tokenized with this
    /// vocab.txt, cut to --ref-max-len ids and decoded back (lower-cased, [UNK] dropped).
    #[arg(long, value_name = "VOCAB")]
    decode_refs_with: Option<PathBuf>,
    /// Ids per reference, [CLS] and [SEP] included, with --decode-refs-with (the cards' 128).
    #[arg(long, default_value_t = 128, requires = "decode_refs_with")]
    ref_max_len: usize,
}

pub fn run(args: Args) -> Result<()> {
    let hyps = read_texts(&args.hyp, &args.hyp_field)?;
    let mut refs = read_texts(&args.reference, &args.ref_field)?;
    if let Some(vocab) = &args.decode_refs_with {
        let tokenizer = palm_tokenizer::PalmTokenizer::from_vocab_file(vocab)?;
        refs = tokenizer
            .encode_batch(&refs, args.ref_max_len.max(2))
            .iter()
            .map(|ids| tokenizer.decode(ids))
            .collect();
    }
    if hyps.len() != refs.len() {
        bail!(
            "{} has {} lines but {} has {}",
            args.hyp.display(),
            hyps.len(),
            args.reference.display(),
            refs.len()
        );
    }
    if hyps.is_empty() {
        bail!("{}: no predictions to score", args.hyp.display());
    }
    let mut metric = TextGenerationMetric::default();
    for (h, r) in hyps.iter().zip(&refs) {
        metric.add(h, r);
    }
    let s = metric.evaluate()?.percent();
    if args.json {
        let obj = serde_json::json!({
            "rouge-1": s.rouge_1,
            "rouge-2": s.rouge_2,
            "rouge-l": s.rouge_l,
            "bleu-1": s.bleu_1,
            "bleu-4": s.bleu_4,
            "count": s.count,
        });
        println!("{obj}");
    } else {
        println!("{:<8} {:>7}", "metric", "score");
        for (name, v) in [
            ("ROUGE-1", s.rouge_1),
            ("ROUGE-2", s.rouge_2),
            ("ROUGE-L", s.rouge_l),
            ("BLEU-1", s.bleu_1),
            ("BLEU-4", s.bleu_4),
        ] {
            println!("{name:<8} {v:>7.2}");
        }
        println!("{:<8} {:>7}", "pairs", s.count);
    }
    Ok(())
}

fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
}

/// Texts of a file: its lines, or one field of each jsonl row.
fn read_texts(path: &Path, field: &str) -> Result<Vec<String>> {
    let lines = palm_eval::read_lines(path)?;
    if !is_jsonl(path) {
        return Ok(lines);
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let line_no = i + 1;
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{line_no}: invalid JSON", path.display()))?;
            match v.get(field) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => bail!(
                    "{}:{line_no}: field {field:?} is not a string",
                    path.display()
                ),
                None => bail!("{}:{line_no}: missing field {field:?}", path.display()),
            }
        })
        .collect()
}
