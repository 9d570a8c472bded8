//! A whole run on a handful of demo rows: vocabulary, Learner, native model directory, test
//! scores and baselines. Checks the plumbing, not the quality (that is the demo's job).

use std::path::Path;

use burn_autodiff::Autodiff;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_train::RunConfig;
use palm_train::run::{Start, run};

/// burn's CPU backend seeds one process-wide RNG (initial weights, dropout): runs in parallel
/// test threads would draw from each other's streams, so the runs of this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

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
    let _serial = serial();
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
    let summary =
        run::<Autodiff<NdArray<f32>>>(&config, Start::Fresh, &NdArrayDevice::Cpu).unwrap();
    assert!(summary.model.is_some() && summary.copy_source.is_some());
    // The epoch's validation loss is the one `valid_loss` gives the (only, so best) model
    // written, and its perplexity is exp(NLL) >= 1: both from log-probabilities, not logits.
    let epoch = &summary.epochs[0];
    assert!(
        (epoch.valid_loss - summary.valid_loss_after).abs() < 1e-4 * summary.valid_loss_after,
        "{} against {}",
        epoch.valid_loss,
        summary.valid_loss_after
    );
    assert!(epoch.valid_perplexity >= 1.0, "{}", epoch.valid_perplexity);
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
    let _serial = serial();
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
    let summary =
        run::<Autodiff<NdArray<f32>>>(&config, Start::Fresh, &NdArrayDevice::Cpu).unwrap();
    assert!(
        summary.valid_loss_after < summary.valid_loss_before,
        "{} -> {}",
        summary.valid_loss_before,
        summary.valid_loss_after
    );
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_its_last_checkpoint_loads() {
    let _serial = serial();
    type B = Autodiff<NdArray<f32>>;
    let dir = tempfile::tempdir().unwrap();
    let data = demo_head(dir.path(), "train.jsonl", 48);
    let mut config = RunConfig::demo(Path::new("."));
    config.train = data.clone();
    config.valid = data;
    config.test = None;
    config.out = dir.path().join("run");
    config.epochs = 1;
    config.batch_size = 8;
    config.vocab_size = 300;
    config.valid_decode = 0;
    config.best_metric = palm_train::config::BestMetric::Loss;
    run::<B>(&config, Start::Fresh, &NdArrayDevice::Cpu).unwrap();

    // Continue for another epoch at an absurd learning rate: Adam's steps are about lr in
    // size, so weights of 1e33 overflow within a step or two.
    let toml_path = config.out.join("config.toml");
    let mut more = palm_train::RunConfig::from_toml_file(&toml_path).unwrap();
    more.epochs = 2;
    more.lr = 1e33;
    more.warmup = 1;
    std::fs::write(&toml_path, more.to_toml()).unwrap();
    std::fs::remove_dir_all(config.out.join("model")).unwrap();
    let resumed = palm_train::run::resume_config(&config.out).unwrap();
    let err = run::<B>(&resumed, Start::Resume, &NdArrayDevice::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("the training loss became"), "{msg}");
    assert!(msg.contains("epoch 2"), "{msg}");
    assert!(!config.out.join("model").exists());

    // The error names the last good checkpoint, and it still loads and scores finitely.
    let ckpt = palm_train::checkpoint::CheckpointDir::new(&config.out);
    let (step, state) = ckpt.latest().unwrap().unwrap();
    assert_eq!(state.epoch, 2, "the epoch-1 checkpoint is the newest");
    assert!(
        msg.contains(&ckpt.path(step).display().to_string()),
        "{msg}"
    );
    let palm =
        palm_train::checkpoint::load_model::<NdArray<f32>>(&config.out, step, &NdArrayDevice::Cpu)
            .unwrap();
    let tok = palm_tokenizer::PalmTokenizer::from_vocab_file(config.out.join("vocab.txt")).unwrap();
    let pairs: Vec<palm_train::batch::Pair> = vec![palm_train::batch::Pair {
        src: tok.encode("类型#上衣", 32),
        tgt: tok.encode("白色的上衣", 32),
    }];
    let model = palm_train::model::PalmTraining::new(palm, 0.1);
    let loss = palm_train::run::valid_loss(
        &model,
        &pairs,
        1,
        palm_train::batch::PalmBatcher::new(tok.special_ids().pad),
    );
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
}

#[test]
fn early_stopping_ends_the_run_and_keeps_the_best_and_last_checkpoints() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = demo_head(dir.path(), "train.jsonl", 32);
    let mut config = RunConfig::demo(Path::new("."));
    config.train = data.clone();
    config.valid = data;
    config.test = None;
    config.out = dir.path().join("run");
    config.epochs = 6;
    config.batch_size = 8;
    config.vocab_size = 300;
    config.valid_decode = 0;
    config.best_metric = palm_train::config::BestMetric::Loss;
    config.checkpoint_every = Some(1);
    config.keep_last = 2;
    // Nothing short of a drop by 1e9 counts as progress: epoch 1 stays the best.
    config.early_stopping = Some(2);
    config.min_delta = 1e9;
    let summary =
        run::<Autodiff<NdArray<f32>>>(&config, Start::Fresh, &NdArrayDevice::Cpu).unwrap();
    assert!(summary.stopped_early);
    assert_eq!(
        summary.epochs.len(),
        3,
        "epoch 1, then two without improvement"
    );
    let best = summary.best.unwrap();
    assert_eq!((best.epoch, best.step), (1, 4));
    let ckpt = palm_train::checkpoint::CheckpointDir::new(&config.out);
    assert_eq!(ckpt.complete().unwrap(), vec![4, 11, 12]);
    // The model directory holds the best checkpoint's weights, not the last ones.
    let best_palm =
        palm_train::checkpoint::load_model::<NdArray<f32>>(&config.out, 4, &NdArrayDevice::Cpu)
            .unwrap();
    let (_, written) =
        palm_model::import::load_dir::<NdArray<f32>>(&summary.model_dir, &NdArrayDevice::Cpu)
            .unwrap();
    let flat = |p: palm_model::Palm<NdArray<f32>>| {
        p.generator
            .dense
            .bias
            .val()
            .into_data()
            .iter::<f32>()
            .collect::<Vec<_>>()
    };
    assert_eq!(flat(best_palm), flat(written));
    let lines = std::fs::read_to_string(config.out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    let svg = std::fs::read_to_string(config.out.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
}

#[test]
fn pretraining_lowers_both_losses_and_writes_a_fine_tunable_model() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // Documents of three demo sentences each: context = the first two, continuation = the last.
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/demo/train.jsonl");
    let targets: Vec<String> = std::fs::read_to_string(demo)
        .unwrap()
        .lines()
        .take(240)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["tgt"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let docs: String = targets.chunks(3).map(|c| c.concat() + "\n").collect();
    let (train, valid) = (dir.path().join("train.txt"), dir.path().join("valid.txt"));
    let lines: Vec<&str> = docs.lines().collect();
    std::fs::write(&train, lines[..64].join("\n")).unwrap();
    std::fs::write(&valid, lines[64..].join("\n")).unwrap();
    let config = RunConfig {
        train,
        valid,
        test: None,
        out: dir.path().join("run"),
        epochs: 4,
        batch_size: 8,
        lr: 1e-2,
        warmup: 8,
        vocab_size: 400,
        max_src_len: 96,
        max_tgt_len: 48,
        valid_decode: 0,
        best_metric: palm_train::config::BestMetric::Loss,
        pretrain: Some(palm_train::pretrain::PretrainConfig::default()),
        ..RunConfig::default()
    };
    let summary =
        run::<Autodiff<NdArray<f32>>>(&config, Start::Fresh, &NdArrayDevice::Cpu).unwrap();
    let (first, last) = (&summary.epochs[0], summary.epochs.last().unwrap());
    let (m0, m1) = (first.valid_mlm_loss.unwrap(), last.valid_mlm_loss.unwrap());
    assert!(m1 < m0, "masked-LM loss {m0} -> {m1}");
    assert!(
        last.valid_loss < first.valid_loss,
        "{} -> {}",
        first.valid_loss,
        last.valid_loss
    );
    let (a0, a1) = (
        first.valid_mlm_accuracy.unwrap(),
        last.valid_mlm_accuracy.unwrap(),
    );
    assert!(
        (0.0..=100.0).contains(&a1) && a1 >= a0,
        "masked-LM accuracy {a0} -> {a1}"
    );
    // The model directory has no MLM head and loads for fine-tuning.
    let (_, palm) =
        palm_model::import::load_dir::<NdArray<f32>>(&summary.model_dir, &NdArrayDevice::Cpu)
            .unwrap();
    assert!(palm.vocab_size() <= 400);
}

#[test]
fn streamed_shards_train_and_resume_from_a_mid_epoch_checkpoint_exactly() {
    let _serial = serial();
    type B = Autodiff<NdArray<f32>>;
    let dir = tempfile::tempdir().unwrap();
    let train_jsonl = demo_head(dir.path(), "train.jsonl", 200);
    let valid = demo_head(dir.path(), "valid.jsonl", 16);
    // A vocabulary and shards of 64 rows, streamed through a 32-row shuffle buffer.
    let text = std::fs::read_to_string(&train_jsonl).unwrap();
    let texts: Vec<String> = text
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            [
                v["src"].as_str().unwrap().to_owned(),
                v["tgt"].as_str().unwrap().to_owned(),
            ]
        })
        .collect();
    let options = palm_tokenizer::TrainOptions {
        size: 400,
        min_frequency: 1,
        ..Default::default()
    };
    let tokens = palm_tokenizer::train_vocab(texts.iter().map(String::as_str), &options).unwrap();
    let vocab = dir.path().join("vocab.txt");
    std::fs::write(&vocab, tokens.join("\n") + "\n").unwrap();
    let tok = palm_tokenizer::PalmTokenizer::from_vocab_file(&vocab).unwrap();
    let shards = dir.path().join("shards");
    let examples = palm_data::reader::open(
        &train_jsonl,
        &palm_data::reader::ReaderOptions::new(palm_data::reader::Format::Jsonl),
    )
    .unwrap();
    let prep = palm_data::prepare::PrepareOptions {
        shard_rows: 64,
        ..Default::default()
    };
    palm_data::prepare::prepare(examples, &train_jsonl, &tok, &shards, &prep, |_| {}).unwrap();

    let config = |out: &str| RunConfig {
        train: shards.clone(),
        valid: valid.clone(),
        test: None,
        out: dir.path().join(out),
        vocab: Some(vocab.clone()),
        epochs: 2,
        batch_size: 8,
        lr: 1e-2,
        warmup: 5,
        max_src_len: 48,
        max_tgt_len: 32,
        shuffle_buffer: 32,
        checkpoint_every: Some(5),
        keep_last: 100,
        valid_decode: 4,
        beam_size: 2,
        ..RunConfig::default()
    };
    let a = config("a");
    let sa = run::<B>(&a, Start::Fresh, &NdArrayDevice::Cpu).unwrap();
    assert_eq!(sa.steps, 50, "25 batches of 200 streamed rows per epoch");

    // The same run, then rewound to its mid-epoch-2 checkpoint (5 batches into the epoch) and
    // resumed: the stream is replayed past those batches.
    let b = config("b");
    run::<B>(&b, Start::Fresh, &NdArrayDevice::Cpu).unwrap();
    let ckpt = palm_train::checkpoint::CheckpointDir::new(&b.out);
    let state = ckpt.state(30).unwrap();
    assert_eq!(state.next_batch, 5);
    // Pruning never removes the best checkpoint; neither does this rewind.
    let best = state.best.unwrap().step;
    for step in ckpt.complete().unwrap() {
        if step != 30 && step != best {
            std::fs::remove_dir_all(ckpt.path(step)).unwrap();
        }
    }
    std::fs::remove_file(b.out.join("summary.json")).unwrap();
    let resumed = palm_train::run::resume_config(&b.out).unwrap();
    run::<B>(&resumed, Start::Resume, &NdArrayDevice::Cpu).unwrap();
    let text = |c: &RunConfig| {
        std::fs::read_to_string(c.out.join("summary.json"))
            .unwrap()
            .lines()
            .filter(|l| !l.contains("\"model_dir\""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(text(&a), text(&b));
}
