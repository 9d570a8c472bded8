//! `palm bench`: training and decoding throughput on random data, as JSON lines. The
//! counterpart of `xtask/bench/torch_palm.py` (the PyTorch eager reference of the same
//! architecture); `cargo xtask bench gpu` runs both side by side.

use std::io::Write;
use std::time::Instant;

use anyhow::{Result, bail};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use palm_decode::{BeamConfig, Reads, beam_search_with};
use palm_model::{ModelConfig, Palm};
use palm_train::batch::PalmBatch;
use palm_train::model::PalmTraining;

use crate::device::{DeviceArgs, dispatch, dispatch_inference};

#[derive(clap::Args)]
pub struct Args {
    /// What to measure.
    #[arg(value_parser = ["train", "decode"])]
    what: String,
    /// Architecture: base-zh (PALM 2.0 Chinese base) or tiny.
    #[arg(long, default_value = "base-zh")]
    preset: String,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    batch_size: Vec<usize>,
    /// Source tokens per row.
    #[arg(long, default_value_t = 128)]
    src_len: usize,
    /// Target tokens per row (training).
    #[arg(long, default_value_t = 64)]
    tgt_len: usize,
    /// Timed steps (training) or timed repetitions (decoding).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (autotuning and kernel compilation).
    #[arg(long, default_value_t = 3)]
    warmup_steps: usize,
    /// Beams (decoding).
    #[arg(long, default_value_t = 5)]
    beam_size: usize,
    /// Forced decoding steps (EOS is blocked until then).
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Decoding: read the beams' choices back only where a source can finish (deferred) or
    /// after every step.
    #[arg(long, default_value = "deferred", value_parser = ["deferred", "every-step"])]
    reads: String,
    /// Training dropout of the encoder (hidden and attention) and the decoder, as `palm train
    /// --dropout` sets it; without it, the preset's (the reference's training dropouts).
    #[arg(long)]
    dropout: Option<f64>,
    /// After the timed steps, trace this many more on the device (CUDA: every kernel's device
    /// time, through CUPTI) and write the per-kernel summary to FILE, one JSON line per batch
    /// size; the table is printed on stderr.
    #[arg(long, value_name = "FILE")]
    trace: Option<std::path::PathBuf>,
    /// Training: read the losses every N steps (1: every step, as `palm train` does).
    #[arg(long, default_value_t = 1)]
    read_every: usize,
    /// Sample the host's stacks (every thread, on the CPU) while it runs the timed steps and
    /// write them to DIR/<train|decode>_<precision>_b<batch>.folded, one line per stack
    /// (palm built with the `host-profile` feature, as `cargo xtask bench gpu` builds it).
    #[arg(long, value_name = "DIR")]
    host_profile: Option<std::path::PathBuf>,
    /// Steps (training) or beam searches (decoding) traced with --trace.
    #[arg(long, default_value_t = 3)]
    trace_steps: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: Args) -> Result<()> {
    let target = args.device.target()?;
    if args.batch_size.contains(&0) || args.steps == 0 || args.read_every == 0 {
        bail!("--batch-size, --steps and --read-every must be at least 1");
    }
    if let Some(p) = args.dropout
        && !(0.0..1.0).contains(&p)
    {
        bail!("--dropout must be in [0, 1), got {p}");
    }
    if args.trace.is_some() && (!args.device.device.starts_with("cuda") || args.trace_steps == 0) {
        bail!("--trace needs --device cuda and --trace-steps of at least 1");
    }
    if args.host_profile.is_some() && !crate::host_profile::AVAILABLE {
        bail!("--host-profile needs a palm built with the `host-profile` feature");
    }
    if args.what == "decode" {
        dispatch_inference!(target, decode(&args))
    } else {
        dispatch!(target, train_on(&args))
    }
}

fn train_on<B: Backend>(device: &B::Device, args: &Args) -> Result<()> {
    train::<burn_autodiff::Autodiff<B>>(device, args)
}

fn config(args: &Args) -> ModelConfig {
    let mut mc = match args.preset.as_str() {
        "tiny" => ModelConfig::tiny(21128),
        _ => ModelConfig::base_zh(),
    };
    if let Some(p) = args.dropout {
        mc.set_dropout(p);
    }
    mc
}

/// Deterministic pseudo-random ids in `[lo, hi)`.
fn ids<B: Backend>(
    rows: usize,
    len: usize,
    seed: u64,
    lo: u64,
    hi: u64,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<i64> = (0..rows * len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (lo + (x >> 33) % (hi - lo)) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(data, [rows, len]), device)
}

/// Model FLOPs of one training sample (forward + backward = 6 × parameters × tokens, with the
/// encoder's parameters over source tokens and the decoder's and generator's over target
/// tokens; attention excluded), as `docs/gpu.md` counts them.
fn train_flops(config: &ModelConfig, src: usize, tgt: usize) -> f64 {
    let e = &config.encoder;
    let d = e.hidden_size as f64;
    let enc = e.num_hidden_layers as f64 * (4.0 * d * d + 2.0 * d * e.intermediate_size as f64);
    let p = &config.palm;
    let dd = p.dec_hidden_size as f64;
    let dec = p.dec_layers as f64 * (8.0 * dd * dd + 2.0 * dd * p.dec_ff_size as f64);
    let generator = dd * e.vocab_size as f64;
    6.0 * (enc * src as f64 + (dec + generator) * tgt as f64)
}

/// Which kernels the linear layers' large products ran on: `cublaslt` (CUDA, unless
/// `PALM_GEMM=burn`; `cublaslt-drain` when each waits for the device because CubeCL's stream
/// was not found) or `burn`.
fn gemm_route<B: Backend>() -> &'static str {
    if !palm_model::dense::has_gemm::<B>() {
        "burn"
    } else if crate::cublaslt::on_backend_stream() == Some(false) {
        "cublaslt-drain"
    } else {
        "cublaslt"
    }
}

/// The host sampler for one part (`--host-profile`), if asked for.
fn host_sampler(
    args: &Args,
    what: &str,
    batch: usize,
) -> Result<Option<crate::host_profile::Sampler>> {
    args.host_profile
        .as_deref()
        .map(|dir| {
            let part = format!("{what}_{}_b{batch}", args.device.precision);
            crate::host_profile::start(dir, &part)
        })
        .transpose()
}

/// Runs `work` `args.trace_steps` times with every kernel recorded, then waits for the device
/// and returns the per-kernel summary labelled with the bench, batch and precision (printed on
/// stderr as a table).
fn traced<B: Backend>(
    device: &B::Device,
    args: &Args,
    batch: usize,
    mut work: impl FnMut(),
) -> Result<serde_json::Value> {
    let steps = args.trace_steps;
    B::sync(device).map_err(|e| anyhow::anyhow!("waiting for the device: {e:?}"))?;
    crate::trace::start()?;
    for _ in 0..steps {
        work();
    }
    let synced = B::sync(device).map_err(|e| anyhow::anyhow!("waiting for the device: {e:?}"));
    let launches = crate::trace::finish()?;
    synced?;
    let mut summary = crate::trace::summarize(&launches, steps, 60);
    eprintln!(
        "{} batch {batch}, traced:\n{}",
        args.what,
        crate::trace::table(&summary)
    );
    summary["bench"] = args.what.clone().into();
    summary["batch"] = batch.into();
    summary["precision"] = args.device.precision.clone().into();
    Ok(summary)
}

/// Writes the traces, one JSON line each, to the file as a whole (nothing partial).
fn write_traces(path: &std::path::Path, traces: &[serde_json::Value]) -> Result<()> {
    let text: String = traces.iter().map(|t| format!("{t}\n")).collect();
    std::fs::write(path, text)
        .map_err(|e| anyhow::anyhow!("writing the trace to {}: {e}", path.display()))
}

fn emit(line: serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn train<B: AutodiffBackend>(device: &B::Device, args: &Args) -> Result<()> {
    let mc = config(args);
    let vocab = mc.encoder.vocab_size as u64;
    let flops = train_flops(&mc, args.src_len, args.tgt_len);
    let mut traces = vec![];
    for &batch in &args.batch_size {
        B::seed(device, 1);
        let mut model = PalmTraining::new(Palm::<B>::new(&mc, device), mc.palm.label_smoothing);
        let mut optim = palm_train::optim::adamw(0.01);
        let src = ids::<B>(batch, args.src_len, 1, 106, vocab, device);
        let tgt = ids::<B>(batch, args.tgt_len + 1, 2, 106, vocab, device);
        let make = || PalmBatch {
            src: src.clone(),
            tgt_in: tgt.clone().slice([0..batch, 0..args.tgt_len]),
            gold: tgt.clone().slice([0..batch, 1..args.tgt_len + 1]),
            mlm_labels: None,
        };
        let mut step = |model: PalmTraining<B>| {
            let loss = model.loss(make()).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let model = optim.step(1e-4, model, grads);
            (model, loss)
        };
        let cold = Instant::now();
        for i in 0..args.warmup_steps {
            let t = Instant::now();
            let (m, loss) = step(model);
            model = m;
            let _: f32 = loss.into_scalar().elem();
            // On stderr as it happens: a run cut short by a time limit still shows how far it got.
            eprintln!(
                "train batch {batch}: warm-up step {} took {:.2} s",
                i + 1,
                t.elapsed().as_secs_f64()
            );
        }
        let cold = cold.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut last = 0.0f32;
        // The losses are read every --read-every steps (1: each step's, as the training loop's
        // NaN check and running mean do), all at once; between reads the host does not wait.
        let mut pending = Vec::with_capacity(args.read_every);
        // Time in the step's own code (forward, backward and optimizer issued, before the
        // host waits on a loss): near the whole step when the host is the bound, as on the
        // GPU at small batches, where the device idles between launches.
        let mut issuing = 0.0;
        let sampler = host_sampler(args, "train", batch)?;
        for i in 0..args.steps {
            let t = Instant::now();
            let (m, loss) = step(model);
            issuing += t.elapsed().as_secs_f64();
            model = m;
            pending.push(loss);
            if pending.len() == args.read_every || i + 1 == args.steps {
                let losses: Vec<f32> = Tensor::cat(std::mem::take(&mut pending), 0)
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .map_err(|e| anyhow::anyhow!("reading the losses: {e:?}"))?;
                if let Some(bad) = losses.iter().find(|l| !l.is_finite()) {
                    bail!("the training loss became {bad} (batch {batch})");
                }
                last = *losses.last().expect("at least one step");
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let host_samples = sampler.map(|s| s.finish()).transpose()?;
        let samples = (batch * args.steps) as f64 / secs;
        emit(serde_json::json!({
            "bench": "train",
            "impl": "palm",
            "device": args.device.device,
            "precision": args.device.precision,
            "preset": args.preset,
            "batch": batch,
            "src_len": args.src_len,
            "tgt_len": args.tgt_len,
            "steps": args.steps,
            "samples_per_s": samples,
            "step_ms": secs * 1e3 / args.steps as f64,
            "host_issue_ms_per_step": issuing * 1e3 / args.steps as f64,
            "tokens_per_s": samples * (args.src_len + args.tgt_len) as f64,
            "model_tflops_per_s": samples * flops / 1e12,
            "mfu_bf16_h200": samples * flops / 790e12,
            "warmup_s": cold,
            "last_loss": last,
            "dropout": args.dropout.map_or(serde_json::json!("reference"), |p| p.into()),
            "gemm": gemm_route::<B>(),
            "read_every": args.read_every,
            "host_profile_samples": host_samples,
        }))?;
        if args.trace.is_some() {
            let mut current = Some(model);
            let summary = traced::<B>(device, args, batch, || {
                let (m, loss) = step(current.take().expect("a model between steps"));
                let _: f32 = loss.into_scalar().elem();
                current = Some(m);
            })?;
            traces.push(summary);
        }
    }
    if let Some(path) = &args.trace {
        write_traces(path, &traces)?;
    }
    Ok(())
}

fn decode<B: Backend>(device: &B::Device, args: &Args) -> Result<()> {
    let mc = config(args);
    let vocab = mc.encoder.vocab_size as u64;
    B::seed(device, 1);
    let model = Palm::<B>::new(&mc, device);
    let mut traces = vec![];
    for &batch in &args.batch_size {
        let beam = BeamConfig {
            beam_size: args.beam_size,
            alpha: 0.6,
            min_length: args.decode_steps,
            max_length: args.decode_steps,
            bos: 101,
            eos: 102,
        };
        let src = ids::<B>(batch, args.src_len, 3, 106, vocab, device);
        let reads = if args.reads == "every-step" {
            Reads::EveryStep
        } else {
            Reads::Deferred
        };
        let beam_search = |model: &Palm<B>, src: Tensor<B, 2, Int>, beam: &BeamConfig| {
            beam_search_with(model, src, beam, reads)
        };
        let cold = Instant::now();
        for i in 0..args.warmup_steps {
            let t = Instant::now();
            beam_search(&model, src.clone(), &beam);
            eprintln!(
                "decode batch {batch}: warm-up run {} took {:.2} s",
                i + 1,
                t.elapsed().as_secs_f64()
            );
        }
        let cold = cold.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut tokens = 0usize;
        let sampler = host_sampler(args, "decode", batch)?;
        for _ in 0..args.steps {
            tokens += beam_search(&model, src.clone(), &beam)
                .iter()
                .map(|h| h.tokens.len())
                .sum::<usize>();
        }
        let secs = start.elapsed().as_secs_f64();
        let host_samples = sampler.map(|s| s.finish()).transpose()?;
        emit(serde_json::json!({
            "bench": "decode",
            "impl": "palm",
            "device": args.device.device,
            "precision": args.device.precision,
            "preset": args.preset,
            "batch": batch,
            "beam": args.beam_size,
            "src_len": args.src_len,
            "decode_steps": args.decode_steps,
            "reads": args.reads,
            "tokens_per_s": tokens as f64 / secs,
            "generated_tokens": tokens,
            "warmup_s": cold,
            "gemm": gemm_route::<B>(),
            "fusion": args.device.device.starts_with("cuda") && crate::device::inference_fusion(),
            "row_kernels": palm_model::grad::has_row_kernels::<B>(),
            "step_kernels": palm_model::decoder::step_kernels::<B>()
                .is_some_and(|k| (k.accepts)(&model.decoder)),
            "cross_attention": if palm_model::attention::fused_cross_attention() {
                "fused"
            } else {
                "decomposed"
            },
            "host_profile_samples": host_samples,
        }))?;
        if args.trace.is_some() {
            traces.push(traced::<B>(device, args, batch, || {
                beam_search(&model, src.clone(), &beam);
            })?);
        }
    }
    if let Some(path) = &args.trace {
        write_traces(path, &traces)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_of_base_match_the_gpu_notes() {
        // docs/gpu.md: about 6 × (85M × 128 + 113M × 64 + 16M × 64) ≈ 115 GFLOP per sample.
        let f = train_flops(&ModelConfig::base_zh(), 128, 64);
        assert!((f / 115e9 - 1.0).abs() < 0.05, "{f:e}");
    }
}
