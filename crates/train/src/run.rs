//! A whole training run: data, vocabulary, model, burn-train's `Learner`, then decoding and
//! scoring the test split next to two baselines. `palm train` calls [`run`].

use std::path::{Path, PathBuf};

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::module::AutodiffModule;
use burn::optim::AdamWConfig;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::AutodiffBackend;
use burn_train::metric::{AccuracyMetric, LearningRateMetric, LossMetric, PerplexityMetric};
use burn_train::{Learner, SupervisedTraining};
use palm_data::reader::{Format, ReaderOptions, open};
use palm_decode::{BeamConfig, beam_search};
use palm_eval::{Scores, TextGenerationMetric};
use palm_model::{ModelConfig, Palm};
use palm_tokenizer::{PalmTokenizer, TrainOptions, train_vocab};
use serde::{Deserialize, Serialize};

use crate::batch::{Pair, PalmBatcher};
use crate::model::PalmTraining;
use crate::schedule::InverseSqrtWarmup;
use crate::{Error, Result};

/// Everything a run needs; written to `RUN_DIR/config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Training data (jsonl with `src`/`tgt`).
    pub train: PathBuf,
    /// Validation data.
    pub valid: PathBuf,
    /// Test data, decoded and scored at the end (optional).
    pub test: Option<PathBuf>,
    /// Start from this model directory (ModelScope or native); a fresh `tiny` model otherwise.
    pub model: Option<PathBuf>,
    /// Run directory.
    pub out: PathBuf,
    /// Epochs.
    pub epochs: usize,
    /// Pairs per batch.
    pub batch_size: usize,
    /// Base learning rate of the schedule.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Source ids at most.
    pub max_src_len: usize,
    /// Target ids at most.
    pub max_tgt_len: usize,
    /// Vocabulary size when training one (no `model`).
    pub vocab_size: usize,
    /// Shuffling and initialisation seed.
    pub seed: u64,
    /// Beams when decoding the test split.
    pub beam_size: usize,
}

impl RunConfig {
    /// The embedded demo: the `tiny` preset on `datasets/demo`.
    pub fn demo(root: &Path) -> Self {
        let d = root.join("datasets/demo");
        RunConfig {
            train: d.join("train.jsonl"),
            valid: d.join("valid.jsonl"),
            test: Some(d.join("test.jsonl")),
            model: None,
            out: root.join("runs/demo"),
            epochs: 4,
            batch_size: 32,
            lr: 2e-2,
            warmup: 200,
            max_src_len: 64,
            max_tgt_len: 64,
            vocab_size: 2000,
            seed: 42,
            beam_size: 3,
        }
    }
}

/// What a run reports; written to `RUN_DIR/summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Validation loss (label-smoothed, per target token) before training.
    pub valid_loss_before: f64,
    /// Validation loss after training.
    pub valid_loss_after: f64,
    /// Test scores of the model (percent).
    pub model: Option<ScoreRow>,
    /// Test scores of copying the source.
    pub copy_source: Option<ScoreRow>,
    /// Test scores of always predicting the most frequent training target.
    pub most_frequent: Option<ScoreRow>,
    /// Where the trained model directory is.
    pub model_dir: PathBuf,
}

/// ROUGE/BLEU in percent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ScoreRow {
    /// ROUGE-1.
    pub rouge_1: f64,
    /// ROUGE-2.
    pub rouge_2: f64,
    /// ROUGE-L.
    pub rouge_l: f64,
    /// BLEU-4.
    pub bleu_4: f64,
}

impl From<Scores> for ScoreRow {
    fn from(s: Scores) -> Self {
        let p = s.percent();
        ScoreRow {
            rouge_1: p.rouge_1,
            rouge_2: p.rouge_2,
            rouge_l: p.rouge_l,
            bleu_4: p.bleu_4,
        }
    }
}

fn read_pairs(path: &Path) -> Result<Vec<(String, String)>> {
    let rows = open(path, &ReaderOptions::new(Format::Jsonl))?;
    rows.map(|r| r.map(|e| (e.src, e.tgt)).map_err(Error::from))
        .collect()
}

fn encode(
    tok: &PalmTokenizer,
    rows: &[(String, String)],
    max_src: usize,
    max_tgt: usize,
) -> Vec<Pair> {
    let srcs: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let tgts: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    tok.encode_batch(&srcs, max_src)
        .into_iter()
        .zip(tok.encode_batch(&tgts, max_tgt))
        .map(|(src, tgt)| Pair { src, tgt })
        .collect()
}

/// Mean label-smoothed loss per non-PAD target token over `pairs`, without gradients.
pub fn valid_loss<B: Backend>(
    model: &PalmTraining<B>,
    pairs: &[Pair],
    batch_size: usize,
    pad: u32,
) -> f64 {
    let device = model.palm.devices().first().cloned().unwrap_or_default();
    let batcher = PalmBatcher { pad };
    let (mut sum, mut tokens) = (0.0f64, 0.0f64);
    for chunk in pairs.chunks(batch_size.max(1)) {
        let batch =
            burn::data::dataloader::batcher::Batcher::batch(&batcher, chunk.to_vec(), &device);
        let out = model.loss(batch);
        sum += out.sum.into_scalar().elem::<f64>();
        tokens += out.tokens.into_scalar().elem::<f64>();
    }
    sum / tokens.max(1.0)
}

fn score(preds: &[String], refs: &[String]) -> Result<Scores> {
    let mut m = TextGenerationMetric::default();
    for (p, r) in preds.iter().zip(refs) {
        m.add(p, r);
    }
    Ok(m.evaluate()?)
}

/// Runs training on backend `B` (with autodiff) and returns the summary.
pub fn run<B: AutodiffBackend>(config: &RunConfig, device: &B::Device) -> Result<Summary> {
    std::fs::create_dir_all(&config.out).map_err(|e| Error::io(&config.out, e))?;
    B::seed(device, config.seed);
    let train_rows = read_pairs(&config.train)?;
    let valid_rows = read_pairs(&config.valid)?;

    let (model_config, palm, tokenizer) = match &config.model {
        Some(dir) => {
            let (mc, palm) = palm_model::import::load_dir::<B>(dir, device)?;
            let tok = PalmTokenizer::from_vocab_file(dir.join("vocab.txt"))?;
            (mc, palm, tok)
        }
        None => {
            let texts = train_rows
                .iter()
                .flat_map(|(s, t)| [s.as_str(), t.as_str()]);
            let options = TrainOptions {
                size: config.vocab_size,
                min_frequency: 1,
                ..TrainOptions::default()
            };
            let vocab = train_vocab(texts, &options)?;
            let tok = PalmTokenizer::from_tokens(vocab)?;
            let mc = ModelConfig::tiny(tok.vocab_size());
            let palm = Palm::<B>::new(&mc, device);
            (mc, palm, tok)
        }
    };
    let vocab_text: String = (0..tokenizer.vocab_size() as u32)
        .map(|i| format!("{}\n", tokenizer.id_to_token(i).unwrap_or_default()))
        .collect();
    let vocab_path = config.out.join("vocab.txt");
    std::fs::write(&vocab_path, &vocab_text).map_err(|e| Error::io(&vocab_path, e))?;
    let cfg_path = config.out.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(config).expect("serializes"),
    )
    .map_err(|e| Error::io(&cfg_path, e))?;

    let max_src = config.max_src_len.min(model_config.palm.max_pos);
    let train = encode(&tokenizer, &train_rows, max_src, config.max_tgt_len);
    let valid = encode(&tokenizer, &valid_rows, max_src, config.max_tgt_len);
    let pad = tokenizer.special_ids().pad;
    let batcher = PalmBatcher { pad };
    let dl_train = DataLoaderBuilder::new(batcher)
        .batch_size(config.batch_size)
        .shuffle(config.seed)
        .num_workers(1)
        .build(InMemDataset::new(train));
    let dl_valid = DataLoaderBuilder::new(batcher)
        .batch_size(config.batch_size)
        .num_workers(1)
        .build(InMemDataset::new(valid.clone()));

    let interrupter = burn_train::Interrupter::new();
    let model =
        PalmTraining::new(palm, model_config.palm.label_smoothing).with_guard(interrupter.clone());
    let valid_loss_before = valid_loss(&model.valid(), &valid, config.batch_size, pad);
    // PyTorch's AdamW defaults (burn's epsilon default is 1e-5).
    let optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init();
    let schedule = InverseSqrtWarmup::new(config.lr, config.warmup);
    let result = SupervisedTraining::new(&config.out, dl_train, dl_valid)
        .metrics((
            LossMetric::new(),
            AccuracyMetric::new().with_pad_token(pad as usize),
            PerplexityMetric::new().with_pad_token(pad as usize),
        ))
        .metric_train_numeric(LearningRateMetric::new())
        .with_file_checkpointer(NamedMpkFileRecorder::<FullPrecisionSettings>::new())
        .num_epochs(config.epochs)
        .renderer(crate::render::PlainRenderer::new(
            std::time::Duration::from_secs(10),
        ))
        // The binary owns the tracing subscriber; burn-train must not install its own.
        .with_application_logger(None)
        .with_interrupter(interrupter.clone())
        .summary()
        .launch(Learner::new(model, optim, schedule));
    if interrupter.should_stop() {
        return Err(Error::NonFinite {
            reason: interrupter
                .get_message()
                .unwrap_or_else(|| "training was interrupted".into()),
            checkpoints: config.out.join("checkpoint"),
        });
    }
    let valid_loss_after = valid_loss(&result.model, &valid, config.batch_size, pad);
    let trained: Palm<B::InnerBackend> = result.model.palm;

    let model_dir = config.out.join("model");
    palm_model::import::save_native(&trained, &model_config, &model_dir)?;
    let vocab_copy = model_dir.join("vocab.txt");
    std::fs::write(&vocab_copy, &vocab_text).map_err(|e| Error::io(&vocab_copy, e))?;

    let mut summary = Summary {
        valid_loss_before,
        valid_loss_after,
        model: None,
        copy_source: None,
        most_frequent: None,
        model_dir,
    };
    if let Some(test) = &config.test {
        let rows = read_pairs(test)?;
        let refs: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
        let srcs: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let ids = tokenizer.encode_batch(&srcs, max_src);
        let special = tokenizer.special_ids();
        let beam = BeamConfig {
            beam_size: config.beam_size,
            alpha: model_config.palm.alpha,
            min_length: 1,
            max_length: config.max_tgt_len,
            bos: special.cls,
            eos: special.sep,
        };
        let inner_device = device.clone();
        let mut preds = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(32) {
            let rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let src = crate::batch::pad_ids::<B::InnerBackend>(&rows, pad, &inner_device);
            for h in beam_search(&trained, src, &beam) {
                preds.push(tokenizer.decode(&h.tokens));
            }
        }
        summary.model = Some(score(&preds, &refs)?.into());
        let copies: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        summary.copy_source = Some(score(&copies, &refs)?.into());
        let mut counts = std::collections::HashMap::new();
        for (_, t) in &train_rows {
            *counts.entry(t.as_str()).or_insert(0usize) += 1;
        }
        let frequent = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
            .map(|(t, _)| t.to_owned())
            .unwrap_or_default();
        summary.most_frequent = Some(score(&vec![frequent; refs.len()], &refs)?.into());
        let pred_path = config.out.join("test_predictions.jsonl");
        let lines: String = rows
            .iter()
            .zip(&preds)
            .map(|((s, _), p)| serde_json::json!({"src": s, "pred": p}).to_string() + "\n")
            .collect();
        std::fs::write(&pred_path, lines).map_err(|e| Error::io(&pred_path, e))?;
    }
    let path = config.out.join("summary.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&summary).expect("serializes") + "\n",
    )
    .map_err(|e| Error::io(&path, e))?;
    Ok(summary)
}
