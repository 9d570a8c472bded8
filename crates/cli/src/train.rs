//! `palm train`: fine-tune or train a PALM model; with no arguments, the embedded demo.

use std::path::PathBuf;

use anyhow::{Result, bail};
use palm_train::run::{RunConfig, ScoreRow, run};

use crate::model_dir::cpu_device;

#[derive(clap::Args)]
pub struct Args {
    /// Start from this model directory (ModelScope or palm); a fresh tiny model otherwise.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data (jsonl with src/tgt); default: the demo set.
    #[arg(long)]
    train: Option<PathBuf>,
    /// Validation data; default: the demo set.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Test data decoded and scored at the end; default: the demo set when training on it.
    #[arg(long)]
    test: Option<PathBuf>,
    /// Run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Pairs per batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Base learning rate of the warm-up schedule lr·min(s^-0.5, s·w^-1.5).
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps.
    #[arg(long)]
    warmup: Option<usize>,
    /// Source ids at most.
    #[arg(long)]
    max_src_len: Option<usize>,
    /// Target ids at most.
    #[arg(long)]
    max_tgt_len: Option<usize>,
    /// cpu (cuda needs a CUDA build).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn row(name: &str, s: &Option<ScoreRow>) {
    if let Some(s) = s {
        println!(
            "{name:<22} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            s.rouge_1, s.rouge_2, s.rouge_l, s.bleu_4
        );
    }
}

pub fn run_cmd(args: Args) -> Result<()> {
    let device = cpu_device(&args.device)?;
    let mut c = RunConfig::demo(std::path::Path::new("."));
    let custom_data = args.train.is_some();
    if let Some(p) = args.train {
        c.train = p;
        c.test = None;
    }
    if let Some(p) = args.valid {
        c.valid = p;
    } else if custom_data {
        bail!("--valid is required with --train");
    }
    if let Some(p) = args.test {
        c.test = Some(p);
    }
    c.model = args.model;
    if let Some(o) = args.out {
        c.out = o;
    }
    c.epochs = args.epochs.unwrap_or(c.epochs);
    c.batch_size = args.batch_size.unwrap_or(c.batch_size);
    c.lr = args.lr.unwrap_or(c.lr);
    c.warmup = args.warmup.unwrap_or(c.warmup);
    c.max_src_len = args.max_src_len.unwrap_or(c.max_src_len);
    c.max_tgt_len = args.max_tgt_len.unwrap_or(c.max_tgt_len);
    type Train = burn_autodiff::Autodiff<crate::model_dir::Cpu>;
    let summary = run::<Train>(&c, &device)?;
    if summary.model.is_some() {
        println!(
            "\n{:<22} {:>8} {:>8} {:>8} {:>8}",
            "test split", "ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU-4"
        );
        row("palm", &summary.model);
        row("copy the source", &summary.copy_source);
        row("most frequent target", &summary.most_frequent);
    }
    println!(
        "\nvalidation loss per target token: {:.4} before training, {:.4} after",
        summary.valid_loss_before, summary.valid_loss_after
    );
    println!("model: {}", summary.model_dir.display());
    Ok(())
}
