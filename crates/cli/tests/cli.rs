//! The `palm` binary end to end: eval against reference values, prepare and vocab, and the
//! contract for bad input (one line naming the file and line, exit code 1, no output).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn palm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palm"))
        .args(args)
        .output()
        .expect("palm runs")
}

fn eval_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../eval/tests/fixtures/holdout")
        .join(name)
}

fn vocab_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tokenizer/tests/fixtures/vocab.txt")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Checks the bad-input contract: exit 1, exactly one line on stderr containing `needle`.
fn assert_bad_input(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

#[test]
fn help_lists_the_subcommands() {
    let o = palm(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for cmd in ["vocab", "prepare", "eval"] {
        assert!(out.contains(cmd), "{cmd} missing from:\n{out}");
    }
    assert!(out.contains("Examples:"));
}

#[test]
fn eval_json_matches_the_reference_on_unseen_pairs() {
    let o = palm(&[
        "eval",
        "--hyp",
        eval_fixture("hyp.txt").to_str().unwrap(),
        "--ref",
        eval_fixture("ref.txt").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_fixture("expected.json")).unwrap())
            .unwrap();
    for key in ["rouge-1", "rouge-2", "rouge-l", "bleu-1", "bleu-4"] {
        let (g, e) = (got[key].as_f64().unwrap(), expected[key].as_f64().unwrap());
        assert!((g - e).abs() < 1e-4, "{key}: palm {g} vs reference {e}");
    }
    assert_eq!(got["count"], expected["count"]);
}

#[test]
fn eval_reads_generate_jsonl_and_rejects_unequal_files() {
    let dir = tempfile::tempdir().unwrap();
    let hyp = dir.path().join("pred.jsonl");
    std::fs::write(&hyp, "{\"src\": \"x\", \"pred\": \"今天天气很好\"}\n").unwrap();
    let reference = dir.path().join("gold.txt");
    std::fs::write(&reference, "今天天气很好\n").unwrap();
    let o = palm(&[
        "eval",
        "--hyp",
        hyp.to_str().unwrap(),
        "--ref",
        reference.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((got["rouge-l"].as_f64().unwrap() - 100.0).abs() < 1e-4);

    std::fs::write(&reference, "a\nb\n").unwrap();
    let o = palm(&[
        "eval",
        "--hyp",
        hyp.to_str().unwrap(),
        "--ref",
        reference.to_str().unwrap(),
    ]);
    assert_bad_input(&o, "pred.jsonl has 1 lines but");
}

fn prepare(input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "prepare",
        "--input",
        input.to_str().unwrap(),
        "--vocab",
        vocab_fixture().to_str().unwrap().to_owned().leak(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    palm(&args)
}

#[test]
fn prepare_reports_counts_and_writes_shards() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("train.jsonl");
    std::fs::write(
        &input,
        "{\"src\": \"今天天气很好\", \"tgt\": \"很好\"}\n{\"src\": \"白色上衣\", \"tgt\": \"上衣\"}\n",
    )
    .unwrap();
    let out = dir.path().join("data");
    let o = prepare(&input, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("prepared 2 rows"), "{stdout}");
    assert!(out.join("part-00000.parquet").is_file());
    assert!(out.join("meta.json").is_file());
}

#[test]
fn malformed_inputs_fail_cleanly_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = "{\"src\": \"今天\", \"tgt\": \"很好\"}\n";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "utf8.jsonl",
            [
                good.as_bytes(),
                b"{\"src\": \"\xff\xfe\", \"tgt\": \"x\"}\n",
            ]
            .concat(),
            "utf8.jsonl:2: invalid UTF-8",
        ),
        (
            "missing.jsonl",
            format!("{good}{good}{{\"src\": \"今天\"}}\n").into_bytes(),
            "missing.jsonl:3: missing field \"tgt\"",
        ),
        (
            "empty.jsonl",
            format!("{good}{{\"src\": \"今天\", \"tgt\": \"\"}}\n").into_bytes(),
            "empty.jsonl:2: empty target",
        ),
        (
            "broken.jsonl",
            format!("{good}{{\"src\": \"今天\", \"tgt\": \n").into_bytes(),
            "broken.jsonl:2: invalid JSON",
        ),
    ];
    for (name, contents, needle) in cases {
        let input = d.join(name);
        std::fs::write(&input, contents).unwrap();
        let out = d.join(format!("out-{name}"));
        let o = prepare(&input, &out, &[]);
        assert_bad_input(&o, needle);
        assert!(!out.exists(), "{name}: output left behind");
    }
    // Only the shard directories we asked for, and no temporary leftovers.
    let names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

    // --skip-invalid goes on and says how many it skipped.
    let input = d.join("empty.jsonl");
    let o = prepare(&input, &d.join("skipped"), &["--skip-invalid"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("skipped 1 invalid row"));
}

#[test]
fn truncated_parquet_input_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("t.jsonl");
    let mut rows = String::new();
    for i in 0..200 {
        rows.push_str(&format!(
            "{{\"src\": \"今天天气{i}\", \"tgt\": \"很好{i}\"}}\n"
        ));
    }
    std::fs::write(&input, rows).unwrap();
    let shards = d.join("shards");
    assert!(prepare(&input, &shards, &[]).status.success());
    let bytes = std::fs::read(shards.join("part-00000.parquet")).unwrap();
    let cut = d.join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = d.join("out");
    let o = prepare(
        &cut,
        &out,
        &["--src-field", "src_text", "--tgt-field", "tgt_text"],
    );
    assert_bad_input(&o, "cut.parquet: not a readable Parquet file");
    assert!(!out.exists());
}

#[test]
fn vocab_trains_a_loadable_bert_layout_vocab() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(
        &corpus,
        "今天天气很好\n今天是个好日子\nhello palm world\n".repeat(20),
    )
    .unwrap();
    let out = dir.path().join("vocab.txt");
    let o = palm(&[
        "vocab",
        "--input",
        corpus.to_str().unwrap(),
        "--size",
        "160",
        "--output",
        out.to_str().unwrap(),
        "--min-frequency",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let vocab = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = vocab.lines().collect();
    assert_eq!(&lines[..2], ["[PAD]", "[unused1]"]);
    assert_eq!(&lines[100..104], ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]);
    assert!(lines.contains(&"今") && lines.len() <= 160);
    // Written through a temporary file, yet with the permissions of any new file.
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, "x").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions();
    assert_eq!(mode(&out), mode(&plain));

    // An existing file is not replaced without --force.
    let o = palm(&[
        "vocab",
        "--input",
        corpus.to_str().unwrap(),
        "--size",
        "160",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_bad_input(&o, "already exists");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), vocab);
}

#[test]
fn usage_errors_exit_2() {
    let o = palm(&["eval", "--hyp"]);
    assert_eq!(o.status.code(), Some(2));
    let o = palm(&[
        "prepare", "--input", "x", "--vocab", "v", "--output", "o", "--format", "xml",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

fn model_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures")
        .join(name)
}

/// The unseen fixture model's 64 examples as generate/score input, with the reference values.
fn unseen_inputs(dir: &Path) -> (PathBuf, serde_json::Value) {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model_fixture("unseen").join("golden.json")).unwrap(),
    )
    .unwrap();
    let mut rows = String::new();
    for (s, t) in g["src"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["tgt"].as_array().unwrap())
    {
        rows.push_str(&serde_json::json!({"src": s, "tgt": t}).to_string());
        rows.push('\n');
    }
    let input = dir.join("unseen.jsonl");
    std::fs::write(&input, rows).unwrap();
    (input, g)
}

#[test]
fn score_matches_the_reference_nll_on_an_unseen_modelscope_model() {
    let dir = tempfile::tempdir().unwrap();
    let (input, g) = unseen_inputs(dir.path());
    let out = dir.path().join("nll.jsonl");
    let model = model_fixture("unseen");
    let o = palm(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--batch-size",
        "7",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 64);
    for (i, (got, want)) in lines.iter().zip(g["nll"].as_array().unwrap()).enumerate() {
        let (got, want) = (got["nll"].as_f64().unwrap(), want.as_f64().unwrap());
        assert!(
            ((got - want) / want).abs() <= 1e-4,
            "row {i}: {got} vs {want}"
        );
        assert_eq!(lines[i]["tokens"], g["tokens"][i]);
    }
}

#[test]
fn generate_matches_the_reference_text_at_batch_1_and_16() {
    let dir = tempfile::tempdir().unwrap();
    let (input, g) = unseen_inputs(dir.path());
    let model = model_fixture("unseen");
    let expected: Vec<&str> = g["beam_text"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for batch in ["1", "16"] {
        let out = dir.path().join(format!("pred-{batch}.jsonl"));
        let o = palm(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--beam-size",
            "4",
            "--alpha",
            "0.95",
            "--min-length",
            "3",
            "--max-length",
            "24",
            "--batch-size",
            batch,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let preds: Vec<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["pred"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(preds.len(), 64);
        // The input's targets ride along, for `palm eval --ref` on the same file.
        let inputs = std::fs::read_to_string(&input).unwrap();
        let outputs = std::fs::read_to_string(&out).unwrap();
        for (i, o) in inputs.lines().zip(outputs.lines()) {
            let i: serde_json::Value = serde_json::from_str(i).unwrap();
            let o: serde_json::Value = serde_json::from_str(o).unwrap();
            assert_eq!((&o["src"], &o["tgt"]), (&i["src"], &i["tgt"]));
        }
        let same = preds.iter().zip(&expected).filter(|(p, e)| p == e).count();
        assert!(
            same >= 63,
            "batch {batch}: only {same} of 64 equal the reference"
        );
    }
}

#[test]
fn generate_text_and_bad_model_dir() {
    let model = model_fixture("tiny");
    let o = palm(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "颜色#黑色",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
    let dir = tempfile::tempdir().unwrap();
    let o = palm(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--text",
        "x",
    ]);
    assert_bad_input(&o, "not a model directory");
}

#[test]
fn eval_can_score_against_references_decoded_from_ids_like_the_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let hyp = dir.path().join("hyp.txt");
    let reference = dir.path().join("ref.txt");
    // Upper case is lowered, a character outside the vocabulary is dropped as [UNK], and the
    // second reference is cut to 8 ids ([CLS], 6 characters, [SEP]).
    std::fs::write(&hyp, "a的一是在\n一是在不了有\n").unwrap();
    std::fs::write(&reference, "A的一龘是在\n一是在不了有和人\n").unwrap();
    let score = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--json",
            "--hyp",
            hyp.to_str().unwrap(),
            "--ref",
            reference.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = palm(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["rouge-l"].as_f64().unwrap()
    };
    let vocab = vocab_fixture();
    let decoded = score(&[
        "--decode-refs-with",
        vocab.to_str().unwrap(),
        "--ref-max-len",
        "8",
    ]);
    assert!((decoded - 100.0).abs() < 1e-6, "{decoded}");
    assert!(score(&[]) < 90.0);
}

#[test]
fn a_missing_input_file_is_named_once_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.jsonl");
    let o = palm(&[
        "eval",
        "--hyp",
        missing.to_str().unwrap(),
        "--ref",
        eval_fixture("ref.txt").to_str().unwrap(),
    ]);
    assert_bad_input(&o, "nowhere.jsonl");
    let err = stderr(&o);
    assert_eq!(err.matches("nowhere.jsonl").count(), 1, "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

#[test]
fn bench_reports_one_json_line_per_batch_size_with_the_kernels_it_ran_on() {
    for (what, extra) in [
        ("train", ["--tgt-len", "8"]),
        ("decode", ["--decode-steps", "4"]),
    ] {
        let mut args = vec![
            "bench",
            what,
            "--preset",
            "tiny",
            "--batch-size",
            "1,2",
            "--src-len",
            "8",
            "--steps",
            "1",
            "--warmup-steps",
            "0",
        ];
        args.extend(extra);
        let o = palm(&args);
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 2, "{what}: one line per batch size");
        for (line, batch) in lines.iter().zip([1, 2]) {
            assert_eq!(line["bench"], what);
            assert_eq!(line["batch"], batch);
            assert_eq!(line["device"], "cpu");
            // The CPU backend has no vendor GEMM installed.
            assert_eq!(line["gemm"], "burn");
            let rate = if what == "train" {
                "samples_per_s"
            } else {
                "tokens_per_s"
            };
            assert!(line[rate].as_f64().is_some_and(|r| r > 0.0), "{line}");
            if what == "train" {
                // The time issuing a step is part of the step's time.
                let step = line["step_ms"].as_f64().expect("step_ms");
                let issue = line["host_issue_ms_per_step"].as_f64().expect("issue time");
                assert!(issue > 0.0 && issue <= step, "{line}");
            }
        }
    }
}

#[test]
fn bench_train_applies_the_dropout_it_reports_and_rejects_one_out_of_range() {
    let run = |dropout: &str| {
        let o = palm(&[
            "bench",
            "train",
            "--preset",
            "tiny",
            "--src-len",
            "8",
            "--tgt-len",
            "8",
            "--steps",
            "2",
            "--warmup-steps",
            "0",
            "--dropout",
            dropout,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let line: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
        assert_eq!(line["dropout"].as_f64(), dropout.parse().ok(), "{line}");
        line["last_loss"].as_f64().expect("a loss")
    };
    // Same seed, same data: only the dropout masks tell the runs apart.
    let (none, half) = (run("0"), run("0.5"));
    assert_ne!(none, half, "dropout 0.5 left the loss unchanged");
    assert_eq!(none, run("0"), "dropout 0 is deterministic");

    let o = palm(&["bench", "train", "--preset", "tiny", "--dropout", "1.5"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--dropout"), "{}", stderr(&o));
}
