//! `cargo xtask`: project automation that is not part of the product: the CI sequence, the
//! layering check of ARCHITECTURE.md, synthetic corpora and benchmarks. It shells out to cargo
//! and never depends on the `palm-*` crates.

mod bench;
mod corpus;
mod demo;
mod download;
mod layering;
mod manifest;
mod reproduce;
mod smoke;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  ci                       fmt --check, clippy -D warnings, the tests, the layering check
  layering                 check the forbidden dependency edges of ARCHITECTURE.md
  corpus --rows N --out F  write a synthetic Chinese jsonl corpus (src/tgt) of N rows
         [--format jsonl|lcsts] [--vocab V]   (and a character vocab.txt for it)
  demo-data                regenerate datasets/demo (the embedded data-to-text demo set)
  smoke-data               regenerate datasets/smoke (miniatures of LCSTS/ADGEN/DuReader-QG)
  download NAME [--dir D]  fetch and verify a datasets/manifest.toml entry into D/NAME (D: data)
  reproduce NAME [--smoke] download, prepare, fine-tune, generate and eval lcsts, adgen or
                           dureader-qg; the scores next to the model card's (--help: options)
  bench prepare [--rows N] palm prepare on a generated corpus: rows/s and peak RSS, next to
                           the tokenizers crate's batch-encode rate on the same rows";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "ci" => ci(),
        "layering" => layering::check(),
        "corpus" => corpus::run(rest),
        "demo-data" => demo::run(rest),
        "smoke-data" => smoke::run(rest),
        "download" => download::run(rest),
        "reproduce" if rest.iter().any(|a| a == "--help") => {
            println!("{}", reproduce::USAGE);
            Ok(())
        }
        "reproduce" => reproduce::run(rest),
        "bench" => bench::run(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

/// Runs a command, failing with its name when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR for the process too: prefer it to the one compiled
    // in, which names the clone that built this binary when clones share a target directory.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let here = manifest.join("..");
    here.canonicalize().unwrap_or(here)
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn ci() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["test", "--workspace"]))?;
    layering::check()?;
    for dataset in ["adgen", "lcsts", "dureader-qg"] {
        reproduce::run(&[dataset.into(), "--smoke".into()])?;
    }
    Ok(())
}

/// Value of `--name` in `args`, if given.
pub(crate) fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}
