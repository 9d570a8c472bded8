//! `palm`: the command-line front end. It parses flags, sets up logging and calls one library
//! function per subcommand; the work lives in the `palm-*` crates.

mod bench;
mod cublaslt;
mod device;
mod eval;
mod export;
mod generate;
mod host_profile;
#[cfg(feature = "cuda")]
mod kernels;
mod model_dir;
mod prepare;
mod score;
mod trace;
mod train;
mod vocab;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Train, fine-tune, decode and evaluate PALM encoder-decoder models.
#[derive(Parser)]
#[command(
    name = "palm",
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  palm vocab --input corpus.txt --size 21128 --output vocab.txt\n  palm prepare --input train.jsonl --vocab vocab.txt --output data/train\n  palm eval --hyp pred.txt --ref gold.txt --json"
)]
struct Cli {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a WordPiece vocab.txt (bert-base-chinese layout) from text files.
    #[command(
        after_help = "Example:\n  palm vocab --input a.txt b.txt --size 21128 --output vocab.txt"
    )]
    Vocab(vocab::Args),
    /// Tokenize a corpus into zstd Parquet shards (src_ids, tgt_ids and the texts).
    #[command(
        after_help = "Examples:\n  palm prepare --input train.jsonl --vocab vocab.txt --output data/train\n  palm prepare --input AdvertiseGen/train.json --format adgen --vocab vocab.txt --output data/adgen\n  palm prepare --input PART_I.txt --format lcsts --vocab vocab.txt --output data/lcsts"
    )]
    Prepare(prepare::Args),
    /// Generate text with beam search (or greedy) from a ModelScope or palm model directory.
    #[command(
        after_help = "Examples:\n  palm generate --model pretrained/ --text \"类型#上衣*颜色#白色\"\n  palm generate --model run/model --input test.jsonl --output pred.jsonl --beam-size 4 --batch-size 16"
    )]
    Generate(generate::Args),
    /// Per-example NLL of targets under a model: {"nll", "tokens"} per input row.
    #[command(
        after_help = "Example:\n  palm score --model pretrained/ --input dev.jsonl --output nll.jsonl"
    )]
    Score(score::Args),
    /// Export a model's weights as safetensors with the reference (ModelScope) key names.
    #[command(after_help = "Example:\n  palm export --model run/model --output palm.safetensors")]
    Export(export::Args),
    /// Train or fine-tune a model; with no arguments, the tiny model on the embedded demo set.
    #[command(
        after_help = "Examples:\n  palm train\n  palm train --model pretrained/ --train train.jsonl --valid dev.jsonl --out runs/ft"
    )]
    Train(Box<train::Args>),
    /// Pre-train with PALM's objective (masked LM on the context + its continuation) on raw text.
    #[command(
        after_help = "Example:\n  palm pretrain --train corpus.txt --valid heldout.txt --out runs/pt --epochs 2\n  palm train --model runs/pt/model --train train.jsonl --valid dev.jsonl"
    )]
    Pretrain(Box<train::PretrainArgs>),
    /// Measure training or decoding throughput on random data (JSON lines).
    #[command(
        after_help = "Examples:\n  palm bench train --device cuda --precision bf16 --batch-size 8,64,256\n  palm bench decode --device cuda --batch-size 1,64 --beam-size 5"
    )]
    Bench(bench::Args),
    /// Score predictions against references: ROUGE-1/2/L and BLEU-1/4 as ModelScope computes them.
    #[command(after_help = "Example:\n  palm eval --hyp pred.txt --ref gold.txt --json")]
    Eval(eval::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    let result = match cli.command {
        Command::Vocab(args) => vocab::run(args),
        Command::Prepare(args) => prepare::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Export(args) => export::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Score(args) => score::run(args),
        Command::Train(args) => train::run_cmd(*args),
        Command::Pretrain(args) => train::pretrain_cmd(*args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, each cause once: the crates' errors already name
/// their source in their message (`{path}: {source}`), which `{:#}` would print again.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Writes `contents` to `path` atomically: a temporary name in the same directory, then a
/// rename, so a failed or interrupted run leaves no partial file. The file gets the
/// permissions of any new file (0666 less the umask), not a temporary file's 0600.
pub(crate) fn write_atomic(path: &std::path::Path, contents: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder
        .tempfile_in(dir)
        .with_context(|| format!("{}", dir.display()))?;
    tmp.write_all(contents)
        .with_context(|| format!("{}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("{}", path.display()))?;
    Ok(())
}
