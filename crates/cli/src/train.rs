//! `palm train`: fine-tune or train a PALM model; with no arguments, the embedded demo.
//!
//! Settings come from, in rising precedence: the card's defaults (the demo's when no data is
//! named), `--config FILE.toml`, then flags. `--resume` takes them all from
//! `RUN_DIR/config.toml` instead.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use palm_train::config::{BestMetric, RunConfig, ScheduleKind};
use palm_train::pretrain::PretrainConfig;
use palm_train::run::{ScoreRow, Start, resume_config, run};

use burn::prelude::Backend;

use crate::device::{DeviceArgs, dispatch};

#[derive(clap::Args)]
pub struct Args {
    /// Read settings from this TOML file (the keys of RUN_DIR/config.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in --out from its newest complete checkpoint, with its config.toml.
    #[arg(long)]
    resume: bool,
    /// Run directory [default: runs/demo, or the next free runs/demo-N].
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    set: Settings,
}

/// Flags that override the configuration (all optional).
#[derive(clap::Args, Default)]
struct Settings {
    /// Start from this model directory (ModelScope or palm); a fresh --preset model otherwise.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Architecture of a fresh model: tiny or base-zh.
    #[arg(long)]
    preset: Option<String>,
    /// Training data: jsonl with src/tgt, or a `palm prepare` shard directory (streamed);
    /// default: the demo set.
    #[arg(long)]
    train: Option<PathBuf>,
    /// Validation data; default: the demo set.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Test data decoded and scored at the end; default: the demo set when training on it.
    #[arg(long)]
    test: Option<PathBuf>,
    /// Epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Pairs per batch (per forward pass).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Batches summed into one optimizer step.
    #[arg(long)]
    grad_accumulation: Option<usize>,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Base learning rate of the schedule.
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps (optimizer steps).
    #[arg(long)]
    warmup: Option<usize>,
    /// inverse-sqrt (the reference's lr·min(s^-0.5, s·w^-1.5)), linear, cosine or constant.
    #[arg(long, value_parser = parse_schedule)]
    schedule: Option<ScheduleKind>,
    /// AdamW weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Dropout of encoder and decoder (default: the model's).
    #[arg(long)]
    dropout: Option<f64>,
    /// Label smoothing (default: the model's, 0.1).
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Source ids at most.
    #[arg(long)]
    max_src_len: Option<usize>,
    /// Target ids at most.
    #[arg(long)]
    max_tgt_len: Option<usize>,
    /// Vocabulary size when training one (no --model).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Seed of initialisation, data order and dropout.
    #[arg(long)]
    seed: Option<u64>,
    /// Beams when decoding validation and test rows.
    #[arg(long)]
    beam_size: Option<usize>,
    /// Validation rows decoded for ROUGE/BLEU at each epoch end (0: none).
    #[arg(long)]
    valid_decode: Option<usize>,
    /// Also checkpoint every N optimizer steps.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Checkpoints kept besides the best.
    #[arg(long)]
    keep_last: Option<usize>,
    /// Validation metric for the best checkpoint: loss, rouge-1, rouge-2, rouge-l or bleu-4.
    #[arg(long, value_parser = parse_metric)]
    best_metric: Option<BestMetric>,
    /// Stop after N epochs without improving --best-metric.
    #[arg(long)]
    early_stopping: Option<usize>,
    /// Use this vocab.txt for a fresh model instead of training one.
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Shuffle-buffer rows when --train is a `palm prepare` shard directory (streamed).
    #[arg(long)]
    shuffle_buffer: Option<usize>,
    /// Pad batches to a multiple of this many tokens (fewer shapes for CUDA's per-shape
    /// kernels; 1: to the longest row).
    #[arg(long)]
    pad_multiple: Option<usize>,
}

/// `palm pretrain`: the training flags plus the objective's.
#[derive(clap::Args)]
pub struct PretrainArgs {
    #[command(flatten)]
    train: Args,
    /// Fraction of encoder tokens selected for the masked-LM loss.
    #[arg(long)]
    mask_probability: Option<f64>,
    /// Weight of the masked-LM loss.
    #[arg(long)]
    mlm_weight: Option<f64>,
    /// Weight of the decoder's (continuation) loss.
    #[arg(long)]
    lm_weight: Option<f64>,
    /// Context share of each span (split at the preceding sentence end).
    #[arg(long)]
    split: Option<f64>,
    /// Field of the document text in jsonl input.
    #[arg(long)]
    text_field: Option<String>,
}

fn parse_schedule(s: &str) -> std::result::Result<ScheduleKind, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("`{s}`: expected inverse-sqrt, linear, cosine or constant"))
}

fn parse_metric(s: &str) -> std::result::Result<BestMetric, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("`{s}`: expected loss, rouge-1, rouge-2, rouge-l or bleu-4"))
}

impl Settings {
    fn any(&self) -> bool {
        let s = self;
        s.model.is_some()
            || s.preset.is_some()
            || s.train.is_some()
            || s.valid.is_some()
            || s.test.is_some()
            || s.epochs.is_some()
            || s.batch_size.is_some()
            || s.grad_accumulation.is_some()
            || s.max_grad_norm.is_some()
            || s.lr.is_some()
            || s.warmup.is_some()
            || s.schedule.is_some()
            || s.weight_decay.is_some()
            || s.dropout.is_some()
            || s.label_smoothing.is_some()
            || s.max_src_len.is_some()
            || s.max_tgt_len.is_some()
            || s.vocab_size.is_some()
            || s.seed.is_some()
            || s.beam_size.is_some()
            || s.valid_decode.is_some()
            || s.checkpoint_every.is_some()
            || s.keep_last.is_some()
            || s.best_metric.is_some()
            || s.early_stopping.is_some()
            || s.vocab.is_some()
            || s.shuffle_buffer.is_some()
            || s.pad_multiple.is_some()
    }

    fn apply(self, c: &mut RunConfig) {
        fn set<T>(slot: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *slot = v;
            }
        }
        if let Some(p) = self.train {
            c.train = p;
            // A test split belongs to its data: the demo's is dropped with the demo's train.
            c.test = None;
        }
        set(&mut c.valid, self.valid);
        if self.test.is_some() {
            c.test = self.test;
        }
        if self.model.is_some() {
            c.model = self.model;
        }
        set(&mut c.preset, self.preset);
        set(&mut c.epochs, self.epochs);
        set(&mut c.batch_size, self.batch_size);
        set(&mut c.grad_accumulation, self.grad_accumulation);
        if self.max_grad_norm.is_some() {
            c.max_grad_norm = self.max_grad_norm;
        }
        set(&mut c.lr, self.lr);
        set(&mut c.warmup, self.warmup);
        set(&mut c.schedule, self.schedule);
        set(&mut c.weight_decay, self.weight_decay);
        if self.dropout.is_some() {
            c.dropout = self.dropout;
        }
        if self.label_smoothing.is_some() {
            c.label_smoothing = self.label_smoothing;
        }
        set(&mut c.max_src_len, self.max_src_len);
        set(&mut c.max_tgt_len, self.max_tgt_len);
        set(&mut c.vocab_size, self.vocab_size);
        set(&mut c.seed, self.seed);
        set(&mut c.beam_size, self.beam_size);
        set(&mut c.valid_decode, self.valid_decode);
        if self.checkpoint_every.is_some() {
            c.checkpoint_every = self.checkpoint_every;
        }
        set(&mut c.keep_last, self.keep_last);
        set(&mut c.best_metric, self.best_metric);
        if self.early_stopping.is_some() {
            c.early_stopping = self.early_stopping;
        }
        if self.vocab.is_some() {
            c.vocab = self.vocab;
        }
        set(&mut c.shuffle_buffer, self.shuffle_buffer);
        set(&mut c.pad_multiple, self.pad_multiple);
    }
}

fn row(name: &str, s: &Option<ScoreRow>) {
    if let Some(s) = s {
        println!(
            "{name:<22} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            s.rouge_1, s.rouge_2, s.rouge_l, s.bleu_4
        );
    }
}

/// `runs/demo`, or the first `runs/demo-N` that holds no run yet.
fn free_demo_dir() -> PathBuf {
    let base = Path::new("runs/demo");
    (1..)
        .map(|n| match n {
            1 => base.to_path_buf(),
            n => PathBuf::from(format!("runs/demo-{n}")),
        })
        .find(|p| !p.join("config.toml").exists())
        .expect("an unused directory name")
}

fn configure(args: Args, pretrain: Option<PretrainConfig>) -> Result<(RunConfig, Start)> {
    if args.resume {
        let Some(out) = args.out else {
            bail!("--resume needs --out RUN_DIR (the run to continue)");
        };
        if args.set.any() || args.config.is_some() {
            bail!(
                "--resume takes every setting from {}; drop the other flags",
                out.join("config.toml").display()
            );
        }
        return Ok((resume_config(&out)?, Start::Resume));
    }
    let mut c = match (&args.config, &pretrain) {
        (Some(path), _) => RunConfig::from_toml_file(path)?,
        (None, Some(_)) => RunConfig {
            // Pre-training scores the decoder's loss; decoding continuations says little.
            valid_decode: 0,
            best_metric: BestMetric::Loss,
            ..RunConfig::default()
        },
        (None, None) if args.set.train.is_some() => RunConfig::default(),
        (None, None) => RunConfig::demo(Path::new(".")),
    };
    if pretrain.is_some() {
        if args.set.train.is_none() && args.config.is_none() {
            bail!("palm pretrain needs --train (raw text or jsonl documents) and --valid");
        }
        c.pretrain = pretrain;
    }
    if args.set.train.is_some() && args.set.valid.is_none() && args.config.is_none() {
        bail!("--valid is required with --train");
    }
    args.set.apply(&mut c);
    c.out = match args.out {
        Some(o) => o,
        None if args.config.is_some() => c.out,
        None if c.pretrain.is_some() => bail!("palm pretrain needs --out RUN_DIR"),
        None => free_demo_dir(),
    };
    let origin = args
        .config
        .unwrap_or_else(|| PathBuf::from("the command line"));
    c.validate(&origin)?;
    Ok((c, Start::Fresh))
}

pub fn run_cmd(args: Args) -> Result<()> {
    let target = args.device.target()?;
    let (c, start) = configure(args, None)?;
    eprintln!("run directory: {}", c.out.display());
    dispatch!(target, train_on(&c, start))
}

/// `palm pretrain`.
pub fn pretrain_cmd(args: PretrainArgs) -> Result<()> {
    let target = args.train.device.target()?;
    let mut p = PretrainConfig::default();
    if let Some(v) = args.mask_probability {
        p.mask_probability = v;
    }
    if let Some(v) = args.mlm_weight {
        p.mlm_weight = v;
    }
    if let Some(v) = args.lm_weight {
        p.lm_weight = v;
    }
    if let Some(v) = args.split {
        p.split = v;
    }
    if let Some(v) = args.text_field {
        p.text_field = v;
    }
    let (c, start) = configure(args.train, Some(p))?;
    eprintln!("run directory: {}", c.out.display());
    dispatch!(target, train_on(&c, start))
}

fn train_on<B: Backend>(device: &B::Device, c: &RunConfig, start: Start) -> Result<()> {
    let summary = run::<burn_autodiff::Autodiff<B>>(c, start, device)?;
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
    if let Some(best) = summary.best {
        println!(
            "best checkpoint: epoch {} (step {}), {} {:.4}{}",
            best.epoch,
            best.step,
            c.best_metric.name(),
            best.value,
            if summary.stopped_early {
                "; stopped early"
            } else {
                ""
            }
        );
    }
    if let Some(last) = summary.epochs.last()
        && let (Some(loss), Some(acc)) = (last.valid_mlm_loss, last.valid_mlm_accuracy)
    {
        println!("validation masked-LM loss per masked token {loss:.4}, accuracy {acc:.2}%");
    }
    println!("model: {}", summary.model_dir.display());
    Ok(())
}
