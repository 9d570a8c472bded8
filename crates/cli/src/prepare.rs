//! `palm prepare`: any supported corpus → zstd Parquet shards of token ids.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use palm_data::prepare::{PrepareOptions, prepare};
use palm_data::reader::{Format, ReaderOptions, open_input};
use palm_tokenizer::PalmTokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// The corpus file.
    #[arg(long)]
    input: PathBuf,
    /// auto, jsonl, csv, tsv, parquet, lcsts, adgen, dureader-qg, or documents (raw text for
    /// `palm pretrain`: one document per line, or a jsonl `text` field via --src-field).
    #[arg(long, default_value = "auto")]
    format: Format,
    /// Source field or column (default: src; content for adgen, text1 for dureader-qg).
    #[arg(long)]
    src_field: Option<String>,
    /// Target field or column (default: tgt; summary for adgen, text2 for dureader-qg).
    #[arg(long)]
    tgt_field: Option<String>,
    /// The vocab.txt to tokenize with.
    #[arg(long)]
    vocab: PathBuf,
    /// Output directory for the shards (must not exist).
    #[arg(long)]
    output: PathBuf,
    /// Source ids per row at most, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 512)]
    max_src_len: usize,
    /// Target ids per row at most, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 512)]
    max_tgt_len: usize,
    /// Rows per shard file.
    #[arg(long, default_value_t = 500_000)]
    shard_rows: usize,
    /// Skip malformed rows and report how many, instead of stopping at the first.
    #[arg(long)]
    skip_invalid: bool,
    /// LCSTS: keep documents whose human_label is at least this (3 on Part III gives the
    /// standard test split).
    #[arg(long)]
    lcsts_min_label: Option<u8>,
    /// Documents: context share of each span (split at the preceding sentence end).
    #[arg(long, default_value_t = 0.8)]
    split: f64,
    /// Write the rows in a random order fixed by this seed (an external shuffle in bounded
    /// memory) instead of the input order.
    #[arg(long)]
    shuffle_seed: Option<u64>,
    /// Documents: characters per span at most.
    #[arg(long, default_value_t = 256)]
    max_chars: usize,
}

pub fn run(args: Args) -> Result<()> {
    let tokenizer = PalmTokenizer::from_vocab_file(&args.vocab)?;
    let mut reader = ReaderOptions::new(args.format);
    if args.format == Format::Documents {
        if !(args.split > 0.0 && args.split < 1.0) {
            anyhow::bail!("--split must be in (0, 1), not {}", args.split);
        }
        reader.documents = palm_data::documents::DocumentOptions {
            split: args.split,
            max_chars: args.max_chars.max(2),
            text_field: args.src_field.clone().unwrap_or_else(|| "text".into()),
        };
    }
    reader.src_field = args.src_field;
    reader.tgt_field = args.tgt_field;
    reader.lcsts_min_label = args.lcsts_min_label;
    let input = open_input(&args.input, &reader)?;
    let options = PrepareOptions {
        max_src_len: args.max_src_len,
        max_tgt_len: args.max_tgt_len,
        shard_rows: args.shard_rows,
        skip_invalid: args.skip_invalid,
        shuffle_seed: args.shuffle_seed,
        ..PrepareOptions::default()
    };
    let bar = ProgressBar::with_draw_target(Some(input.total_bytes), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
        )
        .context("progress template")?,
    );
    let bytes = input.bytes_read.clone();
    let start = Instant::now();
    let report = prepare(
        input.examples,
        &args.input,
        &tokenizer,
        &args.output,
        &options,
        |p| {
            bar.set_position(bytes.get());
            bar.set_message(format!("{} rows", p.rows));
        },
    );
    bar.finish_and_clear();
    let report = report?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "prepared {} rows into {} shard(s) in {} ({:.1} s, {:.0} rows/s)",
        report.rows,
        report.shards.len(),
        args.output.display(),
        secs,
        report.rows as f64 / secs.max(1e-9)
    );
    if let Some(kib) = peak_rss_kib() {
        println!("peak memory: {:.0} MiB", kib as f64 / 1024.0);
    }
    if report.skipped > 0 {
        println!("skipped {} invalid row(s)", report.skipped);
    }
    println!(
        "source ids: mean {:.1}, max {} ({} truncated to {}); target ids: mean {:.1}, max {} ({} truncated to {})",
        report.mean_src_len,
        report.max_src_len,
        report.truncated_src,
        args.max_src_len,
        report.mean_tgt_len,
        report.max_tgt_len,
        report.truncated_tgt,
        args.max_tgt_len
    );
    Ok(())
}

/// Peak resident memory of this process (Linux `VmHWM`), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
