//! The layering of ARCHITECTURE.md, checked on the resolved dependency graph.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// (crate, packages that must not be in its normal dependency graph, why).
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "palm-tokenizer",
        &["burn", "burn-core", "burn-tensor", "arrow-array", "parquet"],
        "text to ids only",
    ),
    (
        "palm-eval",
        &[
            "burn",
            "burn-tensor",
            "tokenizers",
            "arrow-array",
            "parquet",
        ],
        "metrics on strings, std only",
    ),
    (
        "palm-data",
        &["burn", "burn-core", "burn-tensor"],
        "data without tensors",
    ),
    (
        "palm-model",
        &[
            "tokenizers",
            "arrow-array",
            "parquet",
            "burn-train",
            "clap",
            "palm-data",
            "palm-tokenizer",
        ],
        "the network works on ids and tensors",
    ),
    (
        "palm-decode",
        &[
            "tokenizers",
            "arrow-array",
            "parquet",
            "burn-train",
            "clap",
            "palm-tokenizer",
            "palm-data",
        ],
        "search works on ids",
    ),
    ("palm-train", &["clap"], "a library, not a front end"),
    (
        "xtask",
        &[
            "palm",
            "palm-tokenizer",
            "palm-eval",
            "palm-data",
            "palm-model",
            "palm-decode",
            "palm-train",
        ],
        "xtask shells out to cargo",
    ),
];

/// Package names in the normal (non-dev, non-build) dependency graph of `krate`.
fn deps(krate: &str) -> Result<Vec<String>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "tree", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}",
        ])
        .output()
        .with_context(|| format!("cargo tree -p {krate}"))?;
    if !out.status.success() {
        bail!(
            "cargo tree -p {krate} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Fails if any crate depends, directly or not, on a package its layer forbids.
pub fn check() -> Result<()> {
    let mut broken = Vec::new();
    for (krate, forbidden, why) in RULES {
        let graph = deps(krate)?;
        for f in *forbidden {
            if graph.iter().any(|d| d == f) {
                broken.push(format!("{krate} depends on {f} ({why})"));
            }
        }
    }
    if broken.is_empty() {
        println!("layering: ok ({} crates checked)", RULES.len());
        Ok(())
    } else {
        bail!("layering violated:\n  {}", broken.join("\n  "))
    }
}
