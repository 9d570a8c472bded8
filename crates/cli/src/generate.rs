//! `palm generate`: beam search (or greedy) from a model directory.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use palm_data::reader::{Format, ReaderOptions, open};
use palm_decode::{BeamConfig, beam_search};

use burn::prelude::Backend;

use crate::device::{DeviceArgs, dispatch_inference};
use crate::model_dir::{load, pad_batch};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (ModelScope or written by palm).
    #[arg(long)]
    model: PathBuf,
    /// Input: jsonl with one source per row, or a `palm prepare` directory.
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    input: Option<PathBuf>,
    /// A single source text; the prediction is printed.
    #[arg(long)]
    text: Option<String>,
    /// Output jsonl ({"src", "pred"} per input row, in input order); stdout when absent.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Field of the source text in the input rows.
    #[arg(long, default_value = "src")]
    src_field: String,
    /// Field of the reference target, copied to the output as "tgt" when present [default: tgt].
    #[arg(long)]
    tgt_field: Option<String>,
    /// Beams (1 = greedy); default from the model's config.
    #[arg(long)]
    beam_size: Option<usize>,
    /// Length-penalty exponent; default from the model's config.
    #[arg(long)]
    alpha: Option<f64>,
    /// Generated tokens before EOS is allowed; default from the model's config.
    #[arg(long)]
    min_length: Option<usize>,
    /// Decoding steps at most; default from the model's config.
    #[arg(long)]
    max_length: Option<usize>,
    /// Source ids at most, [CLS] and [SEP] included; default the model's max_pos.
    #[arg(long)]
    max_src_len: Option<usize>,
    /// Sources decoded together.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: Args) -> Result<()> {
    let target = args.device.target()?;
    dispatch_inference!(target, run_on(args))
}

fn run_on<B: Backend>(device: &B::Device, args: Args) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    // Targets ride along to the output when the input has them (`palm eval` reads them there).
    let (texts, targets): (Vec<String>, Vec<String>) = match (&args.text, &args.input) {
        (Some(t), _) => (vec![t.clone()], vec![String::new()]),
        (None, Some(path)) => {
            let mut o = ReaderOptions::new(Format::Jsonl);
            o.src_field = Some(args.src_field.clone());
            o.tgt_field = args.tgt_field.clone();
            o.allow_missing_target = true;
            open(path, &o)?
                .map(|r| r.map(|e| (e.src, e.tgt)))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .unzip()
        }
        (None, None) => unreachable!("clap requires one of them"),
    };
    let with_targets = targets.iter().any(|t| !t.is_empty());
    let loaded = load::<B>(&args.model, device)?;
    let p = &loaded.config.palm;
    let special = loaded.tokenizer.special_ids();
    let config = BeamConfig {
        beam_size: args.beam_size.unwrap_or(p.beam_size),
        alpha: args.alpha.unwrap_or(p.alpha),
        min_length: args.min_length.unwrap_or(p.min_length),
        max_length: args.max_length.unwrap_or(p.max_length),
        bos: special.cls,
        eos: special.sep,
    };
    let max_src = args.max_src_len.unwrap_or(p.max_pos).min(p.max_pos);
    let ids = loaded.tokenizer.encode_batch(&texts, max_src);
    // Decode in batches of similar length; write in input order.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
    let mut preds = vec![String::new(); ids.len()];
    let mut generated = 0usize;
    let start = std::time::Instant::now();
    for chunk in order.chunks(args.batch_size) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
        let src = pad_batch::<B>(&rows, special.pad, device);
        for (&i, hyp) in chunk.iter().zip(beam_search(&loaded.model, src, &config)) {
            generated += hyp.tokens.len();
            preds[i] = loaded.tokenizer.decode(&hyp.tokens);
        }
    }
    if args.text.is_some() {
        println!("{}", preds[0]);
        return Ok(());
    }
    let mut out = Vec::new();
    for ((src, pred), tgt) in texts.iter().zip(&preds).zip(&targets) {
        let row = match with_targets {
            true => serde_json::json!({"src": src, "pred": pred, "tgt": tgt}),
            false => serde_json::json!({"src": src, "pred": pred}),
        };
        serde_json::to_writer(&mut out, &row)?;
        out.push(b'\n');
    }
    let secs = start.elapsed().as_secs_f64();
    match &args.output {
        Some(path) => {
            crate::write_atomic(path, &out)?;
            println!(
                "wrote {} predictions to {} ({generated} tokens in {secs:.2} s, {:.0} tokens/s)",
                preds.len(),
                path.display(),
                generated as f64 / secs.max(1e-9)
            );
            Ok(())
        }
        None => std::io::stdout()
            .write_all(&out)
            .context("writing to stdout"),
    }
}
