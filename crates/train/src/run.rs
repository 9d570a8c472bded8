//! A whole training run: data, vocabulary, model, burn-train's `Learner` driven by
//! [`crate::fit::PalmStrategy`], then decoding and scoring the test split next to two baselines.
//! `palm train` calls [`run`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_train::metric::{AccuracyMetric, LearningRateMetric, LossMetric, PerplexityMetric};
use burn_train::{
    Interrupter, Learner, LearningComponentsMarker, SupervisedTraining, TrainingStrategy,
};
use palm_data::reader::{Format, ReaderOptions, open};
use palm_decode::{BeamConfig, beam_search};
use palm_eval::{Scores, TextGenerationMetric};
use palm_model::{ModelConfig, Palm};
use palm_tokenizer::{PalmTokenizer, TrainOptions, train_vocab};
use serde::{Deserialize, Serialize};

use crate::batch::{Pair, PalmBatcher};
use crate::checkpoint::{Best, CheckpointDir, EpochRecord, TrainState, write_atomic};
use crate::config::RunConfig;
use crate::fit::{PalmStrategy, TrainData};
use crate::model::PalmTraining;
use crate::output::{GenerationMetric, GenerationScore};
use crate::schedule::Schedule;
use crate::{Error, Result};

/// burn-train's component types of a PALM run on backend `B`.
pub type Components<B> =
    LearningComponentsMarker<B, Schedule, PalmTraining<B>, crate::optim::Optim<PalmTraining<B>, B>>;

/// The model configuration a run trains (written to `RUN_DIR/palm.json`).
const MODEL_CONFIG: &str = "palm.json";

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
    /// Optimizer steps taken.
    pub steps: usize,
    /// The checkpoint written as the model directory (best by the configured metric).
    pub best: Option<Best>,
    /// Early stopping ended training before the last epoch.
    pub stopped_early: bool,
    /// Metrics of every epoch (also in `RUN_DIR/metrics.jsonl`).
    pub epochs: Vec<EpochRecord>,
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

/// The metadata of a prepared shard directory, if `path` is one.
fn shards_meta(path: &Path) -> Option<palm_data::prepare::PrepareReport> {
    path.join("meta.json")
        .is_file()
        .then(|| palm_data::prepare::read_meta(path).ok())
        .flatten()
}

/// Validation pairs as text, or nothing for a shard directory (read as ids instead).
fn read_text_pairs(path: &Path) -> Result<Vec<(String, String)>> {
    match shards_meta(path) {
        Some(_) => Ok(Vec::new()),
        None => read_pairs(path),
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
    batcher: PalmBatcher,
) -> f64 {
    let device = model.palm.devices().first().cloned().unwrap_or_default();
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

/// How a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run; the run directory must not hold one.
    Fresh,
    /// Continue the run in `config.out` from its newest complete checkpoint (from the start
    /// when it has none).
    Resume,
}

/// Reads the configuration of the run in `dir`, for [`Start::Resume`].
pub fn resume_config(dir: &Path) -> Result<RunConfig> {
    let path = dir.join("config.toml");
    if !path.is_file() {
        return Err(Error::NothingToResume {
            dir: dir.to_path_buf(),
        });
    }
    let mut config = RunConfig::from_toml_file(&path)?;
    config.out = dir.to_path_buf();
    Ok(config)
}

/// The model, its configuration and the tokenizer a run starts from.
struct Initial<B: Backend> {
    config: ModelConfig,
    palm: Palm<B>,
    tokenizer: PalmTokenizer,
}

fn adjust(mc: &mut ModelConfig, config: &RunConfig) {
    if let Some(p) = config.dropout {
        mc.set_dropout(p);
    }
    if let Some(ls) = config.label_smoothing {
        mc.palm.label_smoothing = ls;
    }
}

/// A fresh start: the `model` directory, or a preset with a vocabulary trained on the data.
fn initial<B: Backend>(
    config: &RunConfig,
    train_rows: &[(String, String)],
    device: &B::Device,
) -> Result<Initial<B>> {
    if let Some(dir) = &config.model {
        let (mc, palm) =
            palm_model::import::load_dir_adjusted::<B>(dir, device, |mc| adjust(mc, config))?;
        let tokenizer = PalmTokenizer::from_vocab_file(dir.join("vocab.txt"))?;
        return Ok(Initial {
            config: mc,
            palm,
            tokenizer,
        });
    }
    let texts = train_rows
        .iter()
        .flat_map(|(s, t)| [s.as_str(), t.as_str()]);
    let options = TrainOptions {
        size: config.vocab_size,
        min_frequency: 1,
        ..TrainOptions::default()
    };
    let tokenizer = match &config.vocab {
        Some(path) => PalmTokenizer::from_vocab_file(path)?,
        None => PalmTokenizer::from_tokens(train_vocab(texts, &options)?)?,
    };
    let mut mc = match config.preset.as_str() {
        "base-zh" => {
            let mut mc = ModelConfig::base_zh();
            mc.encoder.vocab_size = tokenizer.vocab_size();
            mc
        }
        _ => ModelConfig::tiny(tokenizer.vocab_size()),
    };
    adjust(&mut mc, config);
    let palm = Palm::<B>::new(&mc, device);
    Ok(Initial {
        config: mc,
        palm,
        tokenizer,
    })
}

fn vocab_text(tokenizer: &PalmTokenizer) -> String {
    (0..tokenizer.vocab_size() as u32)
        .map(|i| format!("{}\n", tokenizer.id_to_token(i).unwrap_or_default()))
        .collect()
}

/// Runs training on backend `B` (with autodiff) and returns the summary.
pub fn run<B: AutodiffBackend>(
    config: &RunConfig,
    start: Start,
    device: &B::Device,
) -> Result<Summary> {
    let out = &config.out;
    let checkpoints = CheckpointDir::new(out);
    let resume_from = match start {
        Start::Fresh => {
            if out.join("config.toml").exists() {
                return Err(Error::RunExists { dir: out.clone() });
            }
            None
        }
        Start::Resume => {
            checkpoints.clean_partials()?;
            checkpoints.latest()?
        }
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Absolute data paths, so `--resume` works from any working directory.
    let mut recorded = config.clone();
    for p in [&mut recorded.train, &mut recorded.valid]
        .into_iter()
        .chain(recorded.test.as_mut())
        .chain(recorded.model.as_mut())
    {
        *p = std::path::absolute(&*p).map_err(|e| Error::io(p, e))?;
    }
    write_atomic(&out.join("config.toml"), recorded.to_toml().as_bytes())?;
    let (train_rows, valid_rows) = match &config.pretrain {
        Some(p) => {
            let max_chars = config.max_src_len + config.max_tgt_len;
            let pairs = |path: &Path| -> Result<Vec<(String, String)>> {
                if shards_meta(path).is_some() {
                    // `palm prepare --format documents` shards: streamed (train) or read as
                    // ids (valid).
                    return Ok(Vec::new());
                }
                let mut options = ReaderOptions::new(Format::Documents);
                options.documents = palm_data::documents::DocumentOptions {
                    split: p.split,
                    max_chars,
                    text_field: p.text_field.clone(),
                };
                let pairs: Vec<_> = open(path, &options)?
                    .map(|e| e.map(|e| (e.src, e.tgt)))
                    .collect::<std::result::Result<_, _>>()?;
                if pairs.is_empty() {
                    return Err(Error::Config {
                        path: path.to_path_buf(),
                        message:
                            "no document has two sentences to split into context and continuation"
                                .into(),
                    });
                }
                Ok(pairs)
            };
            (pairs(&config.train)?, pairs(&config.valid)?)
        }
        // Prepared shards are streamed, not read here (their ids are used as they are).
        None if shards_meta(&config.train).is_some() => {
            (Vec::new(), read_text_pairs(&config.valid)?)
        }
        None => (read_pairs(&config.train)?, read_text_pairs(&config.valid)?),
    };
    let shards = shards_meta(&config.train);
    if shards.is_some() && config.model.is_none() && config.vocab.is_none() && resume_from.is_none()
    {
        return Err(Error::Config {
            path: config.train.clone(),
            message: "prepared shards carry token ids: name the vocabulary they were made with \
                      (--vocab) or a model directory (--model)"
                .into(),
        });
    }

    B::seed(device, config.seed);
    let init = match &resume_from {
        // The checkpoint's weights replace these; the architecture and vocabulary are the
        // run's own.
        Some(_) => {
            let path = out.join(MODEL_CONFIG);
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let mc: ModelConfig = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                message: e.to_string(),
            })?;
            Initial {
                palm: Palm::<B>::new(&mc, device),
                config: mc,
                tokenizer: PalmTokenizer::from_vocab_file(out.join("vocab.txt"))?,
            }
        }
        None => initial::<B>(config, &train_rows, device)?,
    };
    let Initial {
        config: model_config,
        palm,
        tokenizer,
    } = init;
    let vocab = vocab_text(&tokenizer);
    write_atomic(&out.join("vocab.txt"), vocab.as_bytes())?;
    write_atomic(
        &out.join(MODEL_CONFIG),
        (serde_json::to_string_pretty(&model_config).expect("serializes") + "\n").as_bytes(),
    )?;

    let max_src = config.max_src_len.min(model_config.palm.max_pos);
    let train = match &shards {
        Some(meta) => {
            if meta.vocab_size != tokenizer.vocab_size() {
                return Err(Error::Config {
                    path: config.train.clone(),
                    message: format!(
                        "the shards were prepared with a vocabulary of {} tokens, the model has {}",
                        meta.vocab_size,
                        tokenizer.vocab_size()
                    ),
                });
            }
            TrainData::Shards {
                dir: config.train.clone(),
                rows: meta.rows as usize,
                buffer: config.shuffle_buffer,
                max_src,
                max_tgt: config.max_tgt_len,
            }
        }
        None => TrainData::Memory(Arc::new(encode(
            &tokenizer,
            &train_rows,
            max_src,
            config.max_tgt_len,
        ))),
    };
    let valid = match shards_meta(&config.valid) {
        Some(_) => palm_data::shards::read_all(&config.valid)?
            .into_iter()
            .map(|r| Pair {
                src: r.src_ids,
                tgt: r.tgt_ids,
            })
            .collect(),
        _ => encode(&tokenizer, &valid_rows, max_src, config.max_tgt_len),
    };
    let special = tokenizer.special_ids();
    let pad = special.pad;
    let batcher = PalmBatcher {
        pad,
        multiple: config.pad_multiple,
    };
    let accumulation = config.grad_accumulation.max(1);
    let mut model = PalmTraining::new(palm, model_config.palm.label_smoothing)
        .with_grad_scale(1.0 / accumulation as f64);
    let mut mask = None;
    if let Some(p) = &config.pretrain {
        let head = palm_model::mlm::MlmHead::new(&model_config, device);
        model = model.with_mlm(head, p.mlm_weight, p.lm_weight);
        mask = Some(crate::pretrain::MaskIds {
            mask: special.mask,
            pad,
            first_regular: [
                special.pad,
                special.unk,
                special.cls,
                special.sep,
                special.mask,
            ]
            .into_iter()
            .max()
            .unwrap_or(0)
                + 1,
            vocab: tokenizer.vocab_size() as u32,
        });
    }
    let state = match resume_from {
        Some((step, state)) => (Some(step), state),
        None => (
            None,
            TrainState::start(valid_loss(
                &model.valid(),
                &valid,
                config.batch_size,
                batcher,
            )),
        ),
    };
    let batches_per_epoch = train.rows().div_ceil(config.batch_size);
    let total_steps = batches_per_epoch.div_ceil(accumulation) * config.epochs;
    let optim = crate::optim::adamw(config.weight_decay as f32);
    let schedule = Schedule::new(config.schedule, config.lr, config.warmup, total_steps);
    let tokenizer = Arc::new(tokenizer);
    let outcome = Arc::new(Mutex::new(None));
    // Validation and test rows are decoded alike.
    let beam = BeamConfig {
        beam_size: config.beam_size,
        alpha: model_config.palm.alpha,
        min_length: 1,
        max_length: config.max_tgt_len,
        bos: special.cls,
        eos: special.sep,
    };
    let strategy = PalmStrategy::<B> {
        config: config.clone(),
        train,
        valid: Arc::new(valid.clone()),
        tokenizer: tokenizer.clone(),
        beam,
        pad,
        mask,
        start: state,
        device: device.clone(),
        outcome: outcome.clone(),
    };
    // burn-train wants loaders; the strategy batches the data itself (its order must be a
    // function of the epoch for an exact resume).
    let no_train = DataLoaderBuilder::new(batcher).build(InMemDataset::new(Vec::<Pair>::new()));
    let no_valid = DataLoaderBuilder::new(batcher).build(InMemDataset::new(Vec::<Pair>::new()));
    let interrupter = Interrupter::new();
    let interrupter_for_tui = interrupter.clone();
    let mut builder = SupervisedTraining::new(out, no_train, no_valid)
        .metrics((
            LossMetric::new(),
            AccuracyMetric::new().with_pad_token(pad as usize),
            PerplexityMetric::new().with_pad_token(pad as usize),
        ))
        .metric_train_numeric(LearningRateMetric::new())
        .with_training_strategy(TrainingStrategy::Custom(Arc::new(strategy)))
        .num_epochs(config.epochs)
        // The binary owns the tracing subscriber; burn-train must not install its own.
        .with_application_logger(None)
        .with_interrupter(interrupter);
    // burn-train's TUI on a terminal, plain progress lines otherwise (logs, pipes, CI).
    builder = if use_tui() {
        builder.renderer(burn_train::renderer::tui::TuiMetricsRendererWrapper::new(
            interrupter_for_tui,
            None,
        ))
    } else {
        builder.renderer(crate::render::PlainRenderer::new(
            std::time::Duration::from_secs(10),
        ))
    };
    if config.valid_decode > 0 {
        for score in [
            GenerationScore::Rouge1,
            GenerationScore::Rouge2,
            GenerationScore::RougeL,
            GenerationScore::Bleu4,
        ] {
            builder = builder.metric_valid_numeric(GenerationMetric::new(score));
        }
    }
    let result = builder.launch(Learner::new(model, optim, schedule));
    let fit = outcome
        .lock()
        .expect("outcome lock")
        .take()
        .expect("the strategy reports an outcome")?;
    let trained = result.model;
    let valid_loss_after = valid_loss(&trained, &valid, config.batch_size, batcher);
    let trained: Palm<B::InnerBackend> = trained.palm;

    let model_dir = out.join("model");
    save_model_dir(&trained, &model_config, &vocab, &model_dir)?;

    let mut summary = Summary {
        valid_loss_before: fit.state.valid_loss_before,
        valid_loss_after,
        model: None,
        copy_source: None,
        most_frequent: None,
        model_dir,
        steps: fit.state.step,
        best: fit.state.best,
        stopped_early: fit.state.stopped_early,
        epochs: fit.state.history.clone(),
    };
    if let Some(test) = config.test.as_ref().filter(|_| config.pretrain.is_none()) {
        let rows = read_pairs(test)?;
        let refs: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
        let srcs: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let ids = tokenizer.encode_batch(&srcs, max_src);
        let mut preds = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(32) {
            let rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let src = crate::batch::pad_ids::<B::InnerBackend>(&rows, pad, device);
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
        // Streamed shards are not held in memory: no most-frequent baseline for them.
        if !train_rows.is_empty() {
            summary.most_frequent = Some(score(&vec![frequent; refs.len()], &refs)?.into());
        }
        let lines: String = rows
            .iter()
            .zip(&preds)
            .map(|((s, _), p)| serde_json::json!({"src": s, "pred": p}).to_string() + "\n")
            .collect();
        write_atomic(&out.join("test_predictions.jsonl"), lines.as_bytes())?;
    }
    write_atomic(
        &out.join("summary.json"),
        (serde_json::to_string_pretty(&summary).expect("serializes") + "\n").as_bytes(),
    )?;
    crate::plot::write_loss_curve(&out.join("loss.svg"), &fit.state.curve, &summary.epochs)?;
    Ok(summary)
}

/// Whether stdout is a terminal (and `PALM_PLAIN` is not set).
fn use_tui() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("PALM_PLAIN").is_none()
}

/// Writes the model directory through a temporary directory and a rename.
fn save_model_dir<B: Backend>(
    palm: &Palm<B>,
    config: &ModelConfig,
    vocab: &str,
    dir: &Path,
) -> Result<()> {
    let tmp = dir.with_file_name(".model.partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    palm_model::import::save_native(palm, config, &tmp)?;
    let vocab_path = tmp.join("vocab.txt");
    std::fs::write(&vocab_path, vocab).map_err(|e| Error::io(&vocab_path, e))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}
