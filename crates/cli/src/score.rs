//! `palm score`: per-example negative log-likelihood of targets under a model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use palm_data::reader::{Format, ReaderOptions, open};

use burn::prelude::Backend;

use crate::device::{DeviceArgs, dispatch_inference};
use crate::model_dir::{load, pad_batch};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (ModelScope or written by palm).
    #[arg(long)]
    model: PathBuf,
    /// Input jsonl with a source and a target per row.
    #[arg(long)]
    input: PathBuf,
    /// Output jsonl ({"nll", "tokens"} per row); stdout when absent.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Field of the source text.
    #[arg(long, default_value = "src")]
    src_field: String,
    /// Field of the target text.
    #[arg(long, default_value = "tgt")]
    tgt_field: String,
    /// Source ids at most, [CLS] and [SEP] included; default the model's max_pos.
    #[arg(long)]
    max_src_len: Option<usize>,
    /// Target ids at most, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 512)]
    max_tgt_len: usize,
    /// Rows scored together.
    #[arg(long, default_value_t = 32)]
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
    let mut o = ReaderOptions::new(Format::Jsonl);
    o.src_field = Some(args.src_field.clone());
    o.tgt_field = Some(args.tgt_field.clone());
    let rows: Vec<_> = open(&args.input, &o)?.collect::<Result<_, _>>()?;
    let loaded = load::<B>(&args.model, device)?;
    let max_src = args
        .max_src_len
        .unwrap_or(loaded.config.palm.max_pos)
        .min(loaded.config.palm.max_pos);
    let srcs: Vec<&str> = rows.iter().map(|r| r.src.as_str()).collect();
    let tgts: Vec<&str> = rows.iter().map(|r| r.tgt.as_str()).collect();
    let src_ids = loaded.tokenizer.encode_batch(&srcs, max_src);
    let tgt_ids = loaded
        .tokenizer
        .encode_batch(&tgts, args.max_tgt_len.max(2));
    let pad = loaded.tokenizer.special_ids().pad;
    let mut out = Vec::new();
    for start in (0..rows.len()).step_by(args.batch_size) {
        let end = (start + args.batch_size).min(rows.len());
        let s: Vec<&[u32]> = src_ids[start..end].iter().map(Vec::as_slice).collect();
        let t: Vec<&[u32]> = tgt_ids[start..end].iter().map(Vec::as_slice).collect();
        let src = pad_batch::<B>(&s, pad, device);
        let tgt = pad_batch::<B>(&t, pad, device);
        let [b, len] = tgt.dims();
        let lp = loaded
            .model
            .forward(src, tgt.clone().slice([0..b, 0..len - 1]));
        // Sum of -log p over the target after BOS up to and including EOS; PAD excluded.
        let gold = tgt.slice([0..b, 1..len]);
        let mask = gold.clone().not_equal_elem(pad as i64).float();
        let token_lp = lp.gather(2, gold.unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2);
        let nll: Vec<f32> = (token_lp * mask.clone())
            .sum_dim(1)
            .neg()
            .into_data()
            .iter::<f32>()
            .collect();
        let counts: Vec<f32> = mask.sum_dim(1).into_data().iter::<f32>().collect();
        for (n, c) in nll.iter().zip(&counts) {
            serde_json::to_writer(
                &mut out,
                &serde_json::json!({"nll": n, "tokens": *c as u64}),
            )?;
            out.push(b'\n');
        }
    }
    match &args.output {
        Some(path) => crate::write_atomic(path, &out),
        None => std::io::stdout()
            .write_all(&out)
            .context("writing to stdout"),
    }
}
