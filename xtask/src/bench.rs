//! `cargo xtask bench prepare`: `palm prepare` on a generated corpus (rows/s, peak RSS) next
//! to the `tokenizers` crate's own batch-encode rate on the same rows.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cargo, corpus, flag};

fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cargo metadata")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata output")?;
    Ok(PathBuf::from(
        v["target_directory"]
            .as_str()
            .context("no target_directory")?,
    ))
}

fn git_rev() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// Finds `key: value` in a program's output and parses the number after it.
fn number_after(text: &str, key: &str) -> Option<f64> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start_matches([':', ' ']);
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("prepare") => prepare(&args[1..]),
        Some("decode") => decode(&args[1..]),
        Some("gpu") => gpu(&args[1..]),
        _ => bail!(
            "usage: cargo xtask bench prepare [--rows N] | decode [--python PY] | gpu [--no-build] [--no-unit]"
        ),
    }
}

/// The features of the GPU machine's binary: the CUDA backend and the host sampler.
const GPU_FEATURES: &str = "cuda,host-profile";

/// Builds the CUDA binary into `.devcarry/palm` (ignored by git, carried to the GPU machine)
/// and prints the one command that runs palm and the PyTorch reference side by side there
/// (`xtask/bench/gpu.sh`); its `results.jsonl` feeds `docs/benchmarks.md`.
fn gpu(args: &[String]) -> Result<()> {
    let root = crate::root();
    if !args.iter().any(|a| a == "--no-build") {
        crate::run(cargo().env("CUDARC_CUDA_VERSION", "13000").args([
            "build",
            "--release",
            "-p",
            "palm",
            "--features",
            GPU_FEATURES,
        ]))?;
        let carry = root.join(".devcarry");
        std::fs::create_dir_all(&carry).context(".devcarry")?;
        std::fs::copy(target_dir()?.join("release/palm"), carry.join("palm"))
            .context("copying the CUDA binary into .devcarry")?;
        // The binary's own tests, built with CUDA: `gpu.sh checks` runs the cuBLASLt ones.
        // `--no-unit` skips them (their 7 MB then leave room in the carry for the kernel cache).
        let mut files = vec!["palm"];
        if !args.iter().any(|a| a == "--no-unit") {
            let unit = cuda_unit_tests()?;
            std::fs::copy(&unit, carry.join("palm-unit"))
                .with_context(|| format!("copying {} into .devcarry", unit.display()))?;
            files.push("palm-unit");
        }
        for file in files {
            // Without the debug information but with the symbols, which name the frames of
            // `palm bench --host-profile` (81 MB; 22 MB gzipped).
            crate::run(
                Command::new("strip")
                    .arg("--strip-debug")
                    .arg(carry.join(file)),
            )?;
            // Gzipped, both binaries (22 and 8 MB) and a kernel cache fit the device tool's
            // 64 MiB carry.
            crate::run(Command::new("gzip").arg("-f").arg(carry.join(file)))?;
        }
    }
    println!(
        "On the GPU machine (device tool, carry [\".devcarry\"]), from the repository root:\n\n  \
         REV={} bash xtask/bench/gpu.sh all\n\nParts: checks (CUDA vs CPU, demo fine-tune), \
         palm, torch, probe (cold start). Results: $OUT/results.jsonl. Copy \
         $OUT/cubecl-cache.txz.* to .devcarry/ so that the next run starts with the compiled \
         and tuned kernels.",
        git_rev()
    );
    Ok(())
}

/// Builds the `palm` binary's unit tests with CUDA (release) and returns the executable, as
/// cargo's JSON messages name it.
fn cuda_unit_tests() -> Result<PathBuf> {
    let out = cargo()
        .env("CUDARC_CUDA_VERSION", "13000")
        .args([
            "test",
            "--release",
            "-p",
            "palm",
            "--features",
            GPU_FEATURES,
            "--bins",
        ])
        .args(["--no-run", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot start cargo test --no-run")?;
    if !out.status.success() {
        bail!("building palm's CUDA unit tests failed with {}", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["target"]["name"] == "palm" && m["profile"]["test"] == true)
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo named no test executable for palm's binary")
}

fn prepare(args: &[String]) -> Result<()> {
    let rows: u64 = flag(args, "--rows")
        .unwrap_or("1000000")
        .parse()
        .context("--rows")?;
    crate::run(cargo().args(["build", "--release", "-p", "palm"]))?;
    crate::run(cargo().args([
        "build",
        "--release",
        "-p",
        "palm-tokenizer",
        "--example",
        "encode_rate",
    ]))?;
    let target = target_dir()?;
    let work = target.join("bench");
    std::fs::create_dir_all(&work)?;
    let corpus_path = work.join(format!("corpus-{rows}.jsonl"));
    let vocab = work.join("vocab.txt");
    if !corpus_path.exists() {
        eprintln!("generating {rows} rows into {}", corpus_path.display());
        let tmp = work.join("corpus.tmp");
        corpus::write_corpus(&tmp, rows, false)?;
        std::fs::rename(&tmp, &corpus_path)?;
    }
    corpus::write_vocab(&vocab)?;
    let out = work.join("prepared");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let palm = target.join("release/palm");
    let start = Instant::now();
    let o = Command::new(&palm)
        .args(["prepare", "--input"])
        .arg(&corpus_path)
        .arg("--vocab")
        .arg(&vocab)
        .arg("--output")
        .arg(&out)
        .output()
        .with_context(|| palm.display().to_string())?;
    let secs = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    if !o.status.success() {
        bail!(
            "palm prepare failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    print!("{stdout}");
    let peak_mib =
        number_after(&stdout, "peak memory").context("palm prepare printed no peak memory")?;
    let palm_rate = rows as f64 / secs;

    let encoder = target.join("release/examples/encode_rate");
    let o = Command::new(&encoder)
        .arg(&corpus_path)
        .arg(&vocab)
        .output()
        .with_context(|| encoder.display().to_string())?;
    if !o.status.success() {
        bail!("encode_rate failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let enc_out = String::from_utf8_lossy(&o.stdout).into_owned();
    print!("{enc_out}");
    let tok_rate = number_after(&enc_out, "encode_batch rows/s").context("no encode_batch rate")?;
    let tok_fast = number_after(&enc_out, "encode_batch_fast rows/s").context("no fast rate")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = std::fs::metadata(&corpus_path)?.len();
    let json = serde_json::json!({
        "benchmark": "prepare",
        "git_rev": git_rev(),
        "rows": rows,
        "input_bytes": size,
        "cores": cores,
        "palm_prepare_seconds": secs,
        "palm_prepare_rows_per_s": palm_rate,
        "palm_prepare_peak_rss_mib": peak_mib,
        "tokenizers_encode_batch_rows_per_s": tok_rate,
        "tokenizers_encode_batch_fast_rows_per_s": tok_fast,
        "command": format!("cargo xtask bench prepare --rows {rows}"),
    });
    let dest = Path::new("docs/benchmarks/prepare.json");
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(dest, serde_json::to_string_pretty(&json)? + "\n")?;
    println!(
        "\n| rows | cores | palm prepare rows/s | peak RSS | tokenizers encode_batch rows/s | encode_batch_fast rows/s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {rows} | {cores} | {palm_rate:.0} | {peak_mib:.0} MiB | {tok_rate:.0} | {tok_fast:.0} |"
    );
    println!("written to {}", dest.display());
    Ok(())
}

/// Runs a command and returns its stdout, failing with its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let o = cmd.output().with_context(|| shown.clone())?;
    if !o.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Beam-5 decoding of the tiny fixture model on the CPU: `palm generate` against the
/// reference's `generate` (ModelScope's PyTorch code, when a Python with it is available).
fn decode(args: &[String]) -> Result<()> {
    crate::run(cargo().args(["build", "--release", "-p", "palm"]))?;
    let target = target_dir()?;
    let work = target.join("bench");
    std::fs::create_dir_all(&work)?;
    let model = Path::new("crates/model/tests/fixtures/tiny");
    // The 64 sources of the fixture set made for the unseen model: same vocabulary and grammar.
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        "crates/model/tests/fixtures/unseen/golden.json",
    )?)?;
    let input = work.join("decode-input.jsonl");
    let mut rows = String::new();
    for s in golden["src"].as_array().context("no src list")? {
        rows.push_str(&serde_json::json!({ "src": s }).to_string());
        rows.push('\n');
    }
    std::fs::write(&input, rows)?;
    let python = flag(args, "--python").map(PathBuf::from).or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join("palm-ref/bin/python");
        p.exists().then_some(p)
    });
    let palm = target.join("release/palm");
    let mut results = Vec::new();
    println!("| batch | palm tokens/s | reference tokens/s | ratio |");
    println!("|---:|---:|---:|---:|");
    for batch in [1usize, 64] {
        let out = work.join(format!("decode-{batch}.jsonl"));
        let _ = std::fs::remove_file(&out);
        let text = output(
            Command::new(&palm)
                .args(["generate", "--model"])
                .arg(model)
                .arg("--input")
                .arg(&input)
                .arg("--output")
                .arg(&out)
                .args([
                    "--beam-size",
                    "5",
                    "--alpha",
                    "0.95",
                    "--min-length",
                    "3",
                    "--max-length",
                    "24",
                ])
                .args(["--batch-size", &batch.to_string()]),
        )?;
        let palm_rate = number_after(&text, "s, ").context("palm generate printed no rate")?;
        let reference = match &python {
            Some(py) => {
                let line = output(
                    Command::new(py)
                        .arg("xtask/bench/decode_reference.py")
                        .arg(model)
                        .arg(&input)
                        .args(["5", &batch.to_string()]),
                )?;
                let v: serde_json::Value = serde_json::from_str(line.trim())?;
                v["tokens_per_s"].as_f64()
            }
            None => None,
        };
        let ratio = reference.map(|r| palm_rate / r);
        println!(
            "| {batch} | {palm_rate:.0} | {} | {} |",
            reference.map_or("n/a".into(), |r| format!("{r:.0}")),
            ratio.map_or("n/a".into(), |r| format!("{r:.2}"))
        );
        results.push(serde_json::json!({
            "batch": batch, "palm_tokens_per_s": palm_rate,
            "reference_tokens_per_s": reference, "ratio": ratio,
        }));
    }
    let json = serde_json::json!({
        "benchmark": "decode_cpu",
        "git_rev": git_rev(),
        "model": "crates/model/tests/fixtures/tiny",
        "inputs": 64,
        "beam": 5,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "results": results,
        "command": "cargo xtask bench decode",
    });
    // The committed result compares both sides; a palm-only run does not replace it.
    let dest = if python.is_some() {
        crate::root().join("docs/benchmarks/decode_cpu.json")
    } else {
        work.join("decode_cpu.json")
    };
    std::fs::write(&dest, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("written to {}", dest.display());
    Ok(())
}
