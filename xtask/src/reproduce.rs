//! `cargo xtask reproduce lcsts|adgen|dureader-qg`: download → prepare → fine-tune with the
//! card's recipe → generate → eval, printed next to the model card's numbers.
//!
//! Every step is skipped when its output is already there (a training run without
//! `summary.json` is resumed), so an interrupted reproduction continues where it stopped.
//! `--smoke` runs the same chain on the committed miniature of the dataset
//! (`datasets/smoke/NAME`, the real file layout) with a fresh `tiny` model, in a temporary
//! directory; CI runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::manifest::{self, Entry, Recipe};
use crate::{cargo, flag};

pub const USAGE: &str =
    "usage: cargo xtask reproduce lcsts|adgen|dureader-qg [--smoke] [--model DIR]
         [--dir DATA_DIR] [--out WORK_DIR] [--device cpu|cuda[:N]] [--precision f32|bf16|bf16-mixed]
         [--epochs N] [--batch-size N] [--palm BIN]";

/// The smoke run's settings: a tiny model for a few epochs, so the chain runs in a minute on a
/// CI machine. Its scores only show that every step works (and that the loss goes down).
const SMOKE: Recipe = Recipe {
    epochs: 3,
    batch_size: 16,
    lr: 1e-2,
    warmup: 10,
    max_src_len: 96,
    max_tgt_len: 64,
};

pub fn run(args: &[String]) -> Result<()> {
    let Some(name) = args.first().filter(|a| !a.starts_with("--")) else {
        bail!("{USAGE}");
    };
    let smoke = args.iter().any(|a| a == "--smoke");
    let root = crate::root();
    let manifest = manifest::load(&root.join("datasets/manifest.toml"))?;
    let entry = match manifest.get(name.as_str()) {
        Some(e) if e.splits.is_some() && e.recipe.is_some() => e,
        _ => bail!("{name:?} cannot be reproduced (choose lcsts, adgen or dureader-qg)\n{USAGE}"),
    };
    let device = flag(args, "--device").unwrap_or(if smoke { "cpu" } else { "cuda" });
    let precision = flag(args, "--precision").unwrap_or("f32");
    let data_dir = PathBuf::from(flag(args, "--dir").unwrap_or("data"));

    let mut recipe = match smoke {
        true => SMOKE,
        false => entry.recipe.clone().expect("checked above"),
    };
    if let Some(n) = flag(args, "--epochs") {
        recipe.epochs = n.parse().context("--epochs")?;
    }
    if let Some(n) = flag(args, "--batch-size") {
        recipe.batch_size = n.parse().context("--batch-size")?;
    }

    let palm = match flag(args, "--palm") {
        Some(p) => PathBuf::from(p),
        None => build_palm(!smoke, device.starts_with("cuda"))?,
    };
    let files = match smoke {
        true => root.join(&entry.smoke.as_ref().context("no smoke files")?.dir),
        false => crate::download::fetch(&manifest, name, &data_dir)?,
    };
    let model = match (flag(args, "--model"), smoke) {
        (Some(m), _) => Some(PathBuf::from(m)),
        (None, true) => None,
        (None, false) => Some(crate::download::fetch(
            &manifest,
            "palm2.0-base",
            &data_dir,
        )?),
    };
    let (work, temporary) = match flag(args, "--out") {
        Some(o) => (PathBuf::from(o), false),
        None if smoke => (
            std::env::temp_dir().join(format!("palm-reproduce-{name}-{}", std::process::id())),
            true,
        ),
        None => (root.join("runs").join(format!("reproduce-{name}")), false),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("{}", work.display()))?;
    let chain = Chain {
        palm: &palm,
        work: &work,
        device,
        precision,
        smoke,
    };
    let result = chain.run(name, entry, &files, model.as_deref(), &recipe);
    if temporary && result.is_ok() {
        std::fs::remove_dir_all(&work).ok();
    }
    result
}

struct Chain<'a> {
    palm: &'a Path,
    work: &'a Path,
    device: &'a str,
    precision: &'a str,
    smoke: bool,
}

impl Chain<'_> {
    fn palm(&self) -> Command {
        let mut c = Command::new(self.palm);
        c.env("PALM_PLAIN", "1");
        c
    }

    fn run(
        &self,
        name: &str,
        entry: &Entry,
        files: &Path,
        model: Option<&Path>,
        recipe: &Recipe,
    ) -> Result<()> {
        let splits = entry.splits.as_ref().expect("checked by the caller");
        let work = self.work;
        let vocab = match model {
            Some(m) => m.join("vocab.txt"),
            None => {
                let v = work.join("vocab.txt");
                if !v.is_file() {
                    crate::run(
                        self.palm()
                            .args(["vocab", "--size", "2000", "--input"])
                            .arg(files.join(&splits.train))
                            .arg("--output")
                            .arg(&v),
                    )?;
                }
                v
            }
        };
        for (split, file) in [
            ("train", &splits.train),
            ("valid", &splits.valid),
            ("test", &splits.test),
        ] {
            let out = work.join("data").join(split);
            if out.join("meta.json").is_file() {
                eprintln!("{split}: prepared already in {}", out.display());
                continue;
            }
            let mut cmd = self.palm();
            cmd.args(["prepare", "--format", &splits.format, "--input"])
                .arg(files.join(file))
                .arg("--vocab")
                .arg(&vocab)
                .arg("--output")
                .arg(&out)
                .args(["--max-src-len", &recipe.max_src_len.to_string()])
                .args(["--max-tgt-len", &recipe.max_tgt_len.to_string()]);
            // Published files come in their own order (LCSTS Part I by source); training
            // streams shards through a buffer, so the training rows are shuffled once here.
            if split == "train" {
                cmd.args(["--shuffle-seed", "1"]);
            }
            if let Some(label) = splits.lcsts_min_label.get(split) {
                cmd.args(["--lcsts-min-label", &label.to_string()]);
            }
            crate::run(&mut cmd)?;
        }

        let run_dir = work.join("run");
        if run_dir.join("summary.json").is_file() {
            eprintln!("training: finished already in {}", run_dir.display());
        } else if run_dir.join("config.toml").is_file() {
            crate::run(
                self.with_device(
                    self.palm()
                        .args(["train", "--resume", "--out"])
                        .arg(&run_dir),
                ),
            )?;
        } else {
            let data = work.join("data");
            let mut cmd = self.palm();
            cmd.arg("train")
                .arg("--train")
                .arg(data.join("train"))
                .arg("--valid")
                .arg(data.join("valid"))
                .arg("--out")
                .arg(&run_dir)
                .args(["--epochs", &recipe.epochs.to_string()])
                .args(["--batch-size", &recipe.batch_size.to_string()])
                .args(["--lr", &recipe.lr.to_string()])
                .args(["--warmup", &recipe.warmup.to_string()])
                .args(["--max-src-len", &recipe.max_src_len.to_string()])
                .args(["--max-tgt-len", &recipe.max_tgt_len.to_string()]);
            match model {
                Some(m) => cmd.arg("--model").arg(m),
                None => cmd.args(["--preset", "tiny", "--vocab"]).arg(&vocab),
            };
            if self.smoke {
                cmd.args(["--valid-decode", "8", "--beam-size", "2"]);
            }
            crate::run(self.with_device(&mut cmd))?;
        }

        let summary = std::fs::read_to_string(run_dir.join("summary.json"))
            .context("the training run wrote no summary.json")?;
        let summary: serde_json::Value = serde_json::from_str(&summary)?;
        let (before, after) = (
            summary["valid_loss_before"].as_f64().unwrap_or(f64::NAN),
            summary["valid_loss_after"].as_f64().unwrap_or(f64::NAN),
        );
        // A chain that runs but does not learn is a failure, in smoke mode as much as at scale.
        if after.partial_cmp(&before) != Some(std::cmp::Ordering::Less) {
            bail!("training did not lower the validation loss ({before} before, {after} after)");
        }

        let predictions = work.join("test_predictions.jsonl");
        let mut cmd = self.palm();
        cmd.args(["generate", "--model"])
            .arg(run_dir.join("model"))
            .arg("--input")
            .arg(work.join("data/test"))
            .arg("--output")
            .arg(&predictions)
            .args(["--max-src-len", &recipe.max_src_len.to_string()])
            .args(["--batch-size", "64"]);
        if self.smoke {
            cmd.args(["--beam-size", "2", "--max-length", "32"]);
        }
        crate::run(self.with_device(&mut cmd))?;

        let mut cmd = self.palm();
        // The references as the reference trainer scores them: decoded from their ids.
        cmd.args(["eval", "--json", "--ref-field", "tgt", "--hyp"])
            .arg(&predictions)
            .arg("--ref")
            .arg(&predictions)
            .arg("--decode-refs-with")
            .arg(&vocab)
            .args(["--ref-max-len", &recipe.max_tgt_len.to_string()]);
        eprintln!("$ {cmd:?}");
        let out = cmd.output().context("cannot run palm eval")?;
        if !out.status.success() {
            bail!("palm eval failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let scores: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("palm eval --json printed no JSON")?;
        let expected = prepared_rows(&work.join("data/test"))?;
        if scores["count"].as_u64() != Some(expected) {
            bail!(
                "scored {} predictions, the test split has {expected} rows",
                scores["count"]
            );
        }
        let result = serde_json::json!({
            "dataset": name,
            "smoke": self.smoke,
            "model": model.map(|m| m.display().to_string()),
            "recipe": {
                "epochs": recipe.epochs, "batch_size": recipe.batch_size, "lr": recipe.lr,
                "warmup": recipe.warmup, "max_src_len": recipe.max_src_len,
                "max_tgt_len": recipe.max_tgt_len,
            },
            "device": self.device,
            "precision": self.precision,
            "palm": scores,
            "published": entry.published,
        });
        std::fs::write(
            work.join("result.json"),
            serde_json::to_string_pretty(&result)? + "\n",
        )?;
        println!("{}", table(name, self.smoke, &scores, entry));
        Ok(())
    }

    fn with_device<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.args(["--device", self.device, "--precision", self.precision])
    }
}

/// Rows of a prepared directory, from its `meta.json`.
fn prepared_rows(dir: &Path) -> Result<u64> {
    let path = dir.join("meta.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let meta: serde_json::Value = serde_json::from_str(&text)?;
    meta["rows"]
        .as_u64()
        .with_context(|| format!("{}: no rows", path.display()))
}

/// The scores next to the card's.
fn table(name: &str, smoke: bool, scores: &serde_json::Value, entry: &Entry) -> String {
    let mut s = format!("\n{name} test, {} rows", scores["count"]);
    if smoke {
        s.push_str(" (smoke: committed miniature and a tiny model; the scores only show that the chain runs)");
    }
    s.push_str("\n\n| metric | palm | published (PALM 2.0 base card) |\n|---|---|---|\n");
    for (key, label) in [
        ("bleu-4", "BLEU-4"),
        ("rouge-1", "ROUGE-1"),
        ("rouge-2", "ROUGE-2"),
        ("rouge-l", "ROUGE-L"),
    ] {
        let ours = scores[key]
            .as_f64()
            .map_or("—".into(), |v| format!("{v:.2}"));
        let theirs = entry
            .published
            .get(key)
            .map_or("—".into(), |v| format!("{v:.2}"));
        s.push_str(&format!("| {label} | {ours} | {theirs} |\n"));
    }
    s
}

/// Builds the `palm` binary and returns its path (release for real runs, with CUDA when the
/// device asks for it; the dev profile for smoke runs, which CI has built already).
fn build_palm(release: bool, cuda: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "-p",
        "palm",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    if cuda {
        cmd.args(["--features", "cuda"]);
    }
    eprintln!("$ {cmd:?}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo build")?;
    if !out.status.success() {
        bail!("building palm failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "palm")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo build reported no palm executable")
}
