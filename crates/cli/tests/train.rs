//! `palm train` end to end through the binary: a run killed with SIGKILL at random moments and
//! continued with `--resume` ends exactly like an uninterrupted one; run-directory errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn palm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_palm"));
    c.env("PALM_PLAIN", "1");
    c
}

/// The first `n` rows of a demo split, copied into `dir`.
fn demo_head(dir: &Path, name: &str, n: usize) -> PathBuf {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/demo");
    let text = std::fs::read_to_string(demo.join(name)).unwrap();
    let rows: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    let path = dir.join(name);
    std::fs::write(&path, rows).unwrap();
    path
}

/// A small run with every moving part: accumulation, clipping, step checkpoints, validation
/// decoding, dropout.
fn tiny_run(dir: &Path, out: &Path) -> Command {
    let mut c = palm();
    c.arg("train")
        .arg("--train")
        .arg(dir.join("train.jsonl"))
        .arg("--valid")
        .arg(dir.join("valid.jsonl"))
        .arg("--test")
        .arg(dir.join("test.jsonl"))
        .arg("--out")
        .arg(out);
    for (flag, value) in [
        ("--epochs", "2"),
        ("--batch-size", "8"),
        ("--grad-accumulation", "2"),
        ("--max-grad-norm", "1.0"),
        ("--lr", "0.01"),
        ("--warmup", "4"),
        ("--vocab-size", "300"),
        ("--max-src-len", "32"),
        ("--max-tgt-len", "24"),
        ("--checkpoint-every", "3"),
        ("--keep-last", "2"),
        ("--valid-decode", "8"),
        ("--beam-size", "2"),
        ("--seed", "7"),
    ] {
        c.args([flag, value]);
    }
    c
}

/// summary.json's text without the run-specific model path (text, not parsed numbers: the
/// comparison is bit for bit).
fn summary(out: &Path) -> String {
    let text = std::fs::read_to_string(out.join("summary.json")).unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("\"model_dir\""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn run_ok(mut c: Command) -> std::process::Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn a_run_killed_at_random_moments_and_resumed_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    demo_head(dir.path(), "train.jsonl", 160);
    demo_head(dir.path(), "valid.jsonl", 16);
    demo_head(dir.path(), "test.jsonl", 8);

    let straight = dir.path().join("straight");
    let t0 = Instant::now();
    run_ok(tiny_run(dir.path(), &straight));
    let full = t0.elapsed();
    let want = summary(&straight);
    assert!(want.contains("\"steps\": 20,"), "{want}");
    assert!(straight.join("loss.svg").is_file());

    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut rng = seed;
    let mut next = move || {
        // xorshift: a random moment, printed with its seed for a rerun.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % 1000) as f64 / 1000.0
    };
    let killed = dir.path().join("killed");
    let mut kills = 0;
    // Moments within `scale` of the straight run's time: halved whenever a run ends before
    // its kill without having been killed yet (a loaded machine times the straight run slow),
    // which starts the killed run over.
    let mut scale = 1.0;
    for _ in 0..8 {
        if kills == 2 {
            break;
        }
        let mut c = if killed.join("config.toml").exists() {
            let mut c = palm();
            c.args(["train", "--resume", "--out"]).arg(&killed);
            c
        } else {
            tiny_run(dir.path(), &killed)
        };
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = full.mul_f64(scale * (0.1 + 0.8 * next()));
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
            eprintln!("seed {seed}: killed after {delay:?} of ~{full:?}");
            child.wait().unwrap();
        } else if kills == 0 {
            eprintln!("seed {seed}: finished within {delay:?}; starting over");
            std::fs::remove_dir_all(&killed).unwrap();
            scale /= 2.0;
        } else {
            break;
        }
    }
    let resume = killed.join("config.toml").exists();
    assert!(kills > 0, "seed {seed}: the runs finished before any kill");
    let mut c = if resume {
        let mut c = palm();
        c.args(["train", "--resume", "--out"]).arg(&killed);
        c
    } else {
        tiny_run(dir.path(), &killed)
    };
    if killed.join("summary.json").exists() {
        std::fs::remove_file(killed.join("summary.json")).unwrap();
    }
    c.stdout(Stdio::null());
    run_ok(c);
    assert_eq!(summary(&killed), want, "seed {seed}");
    for file in ["metrics.jsonl", "test_predictions.jsonl"] {
        assert_eq!(
            std::fs::read(killed.join(file)).unwrap(),
            std::fs::read(straight.join(file)).unwrap(),
            "seed {seed}: {file}"
        );
    }
    // Only complete checkpoints remain: the last two and the best.
    let names: Vec<String> = std::fs::read_dir(killed.join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
    assert!(names.len() <= 3, "{names:?}");
}

#[test]
fn a_fresh_run_refuses_a_directory_holding_one_and_resume_needs_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("config.toml"), "epochs = 1\n").unwrap();
    let o = palm()
        .args(["train", "--epochs", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already holds a run") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("config.toml")).unwrap(),
        "epochs = 1\n",
        "the existing run is untouched"
    );

    let empty = dir.path().join("empty");
    let o = palm()
        .args(["train", "--resume", "--out"])
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no run to resume"));

    let o = palm()
        .args(["train", "--resume", "--lr", "0.1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("drop the other flags"));
}

#[test]
fn a_bad_config_file_is_one_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ft.toml");
    std::fs::write(&config, "epochs = 2\nbatch_size = \"eight\"\n").unwrap();
    let out = dir.path().join("run");
    let o = palm()
        .args(["train", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ft.toml") && err.contains("line 2"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out.exists(), "no run directory is left behind");
}

#[test]
fn pretraining_streams_document_shards_prepared_from_raw_text() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/demo/train.jsonl");
    let targets: Vec<String> = std::fs::read_to_string(demo)
        .unwrap()
        .lines()
        .take(150)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["tgt"].as_str().unwrap().to_owned()
        })
        .collect();
    // Documents of three sentences, as raw text: one per line.
    let docs: String = targets.chunks(3).map(|c| c.concat() + "\n").collect();
    let text = dir.path().join("docs.txt");
    std::fs::write(&text, docs).unwrap();
    let vocab = dir.path().join("vocab.txt");
    run_ok({
        let mut c = palm();
        c.args(["vocab", "--size", "400", "--input"])
            .arg(&text)
            .arg("--output")
            .arg(&vocab);
        c
    });
    let shards = dir.path().join("shards");
    run_ok({
        let mut c = palm();
        c.args([
            "prepare",
            "--format",
            "documents",
            "--max-chars",
            "120",
            "--input",
        ])
        .arg(&text)
        .arg("--vocab")
        .arg(&vocab)
        .arg("--output")
        .arg(&shards);
        c
    });
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shards.join("meta.json")).unwrap()).unwrap();
    // About one context/continuation pair per 3-sentence document.
    let rows = meta["rows"].as_u64().unwrap();
    assert!((40..=60).contains(&rows), "{meta}");
    let out = dir.path().join("pt");
    run_ok({
        let mut c = palm();
        c.args(["pretrain", "--train"])
            .arg(&shards)
            .arg("--valid")
            .arg(&shards)
            .arg("--vocab")
            .arg(&vocab)
            .arg("--out")
            .arg(&out);
        for (flag, value) in [
            ("--epochs", "1"),
            ("--batch-size", "10"),
            ("--shuffle-buffer", "16"),
            ("--max-src-len", "96"),
            ("--max-tgt-len", "48"),
        ] {
            c.args([flag, value]);
        }
        c
    });
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"].as_u64().unwrap(), rows.div_ceil(10));
    let mlm = summary["epochs"][0]["valid_mlm_loss"].as_f64().unwrap();
    assert!(mlm.is_finite() && mlm > 0.0, "{summary}");
    assert!(out.join("model/model.mpk").is_file());
}
