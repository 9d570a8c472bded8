//! A whole run on a handful of demo rows: vocabulary, Learner, native model directory, test
//! scores and baselines. Checks the plumbing, not the quality (that is the demo's job).

use std::path::Path;

use burn_autodiff::Autodiff;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_train::run::{RunConfig, run};

/// The first `n` rows of a demo split, copied into `dir`.
fn demo_head(dir: &Path, name: &str, n: usize) -> std::path::PathBuf {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/demo");
    let text = std::fs::read_to_string(demo.join(name)).unwrap();
    let rows: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    let path = dir.join(name);
    std::fs::write(&path, rows).unwrap();
    path
}

#[test]
fn a_tiny_run_writes_a_usable_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let head = |name: &str, n: usize| demo_head(dir.path(), name, n);
    let mut config = RunConfig::demo(Path::new("."));
    config.train = head("train.jsonl", 24);
    config.valid = head("valid.jsonl", 8);
    config.test = Some(head("test.jsonl", 4));
    config.out = dir.path().join("run");
    config.epochs = 1;
    config.batch_size = 8;
    config.vocab_size = 300;
    config.max_tgt_len = 8;
    let summary = run::<Autodiff<NdArray<f32>>>(&config, &NdArrayDevice::Cpu).unwrap();
    assert!(summary.model.is_some() && summary.copy_source.is_some());
    assert!(config.out.join("summary.json").is_file());
    assert!(config.out.join("test_predictions.jsonl").is_file());
    let (_, model) =
        palm_model::import::load_dir::<NdArray<f32>>(&summary.model_dir, &NdArrayDevice::Cpu)
            .unwrap();
    assert!(model.vocab_size() <= 300);
    assert!(summary.model_dir.join("vocab.txt").is_file());
}

#[test]
fn fine_tuning_a_modelscope_checkpoint_lowers_validation_loss() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let head = |name: &str, n: usize| demo_head(dir.path(), name, n);
    let mut config = RunConfig::demo(Path::new("."));
    config.model = Some(root.join("crates/model/tests/fixtures/tiny"));
    config.train = head("train.jsonl", 64);
    // Validation on training rows: the point is that the optimiser moves the imported
    // weights the right way, not generalisation.
    config.valid = config.train.clone();
    config.test = None;
    config.out = dir.path().join("run");
    config.epochs = 2;
    config.batch_size = 16;
    config.lr = 5e-3;
    config.warmup = 4;
    let summary = run::<Autodiff<NdArray<f32>>>(&config, &NdArrayDevice::Cpu).unwrap();
    assert!(
        summary.valid_loss_after < summary.valid_loss_before,
        "{} -> {}",
        summary.valid_loss_before,
        summary.valid_loss_after
    );
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_no_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = demo_head(dir.path(), "train.jsonl", 48);
    let mut config = RunConfig::demo(Path::new("."));
    config.train = data.clone();
    config.valid = data;
    config.test = None;
    config.out = dir.path().join("run");
    config.epochs = 3;
    config.batch_size = 8;
    config.vocab_size = 300;
    // Adam's steps are about lr in size: weights of 1e30 overflow within a step or two.
    config.lr = 1e33;
    config.warmup = 1;
    let err = run::<Autodiff<NdArray<f32>>>(&config, &NdArrayDevice::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("the training loss became"), "{msg}");
    assert!(!config.out.join("model").exists());
}
