//! The training loop, as a burn-train custom learning strategy: burn-train's `Learner` does
//! the steps, its event processor the live metrics (TUI or plain lines) and metric logs, its
//! `Checkpointer`s the records. On top of burn-train's epoch loop this adds what an exact
//! `--resume` needs: checkpoints every N optimizer steps as well as every epoch, committed
//! atomically ([`crate::checkpoint`]); a data order that is a function of (seed, epoch); dropout
//! reseeded from (seed, forward pass), so a run resumed mid-epoch draws the same masks. It also
//! steps the schedule once per optimizer step with gradient accumulation, clips the global
//! gradient norm, decodes validation rows for ROUGE/BLEU, keeps the best checkpoint and stops
//! early.

use std::sync::{Arc, Mutex, mpsc};

use burn::data::dataloader::Progress;
use burn::data::dataloader::batcher::Batcher;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_train::checkpoint::{AsyncCheckpointer, CheckpointingAction, CheckpointingStrategy};
use burn_train::metric::store::EventStoreClient;
use burn_train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningCheckpointer,
    SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader, TrainingComponents,
    TrainingItem, ValidLoader,
};
use palm_decode::{BeamConfig, beam_search};
use palm_eval::TextGenerationMetric;
use palm_tokenizer::PalmTokenizer;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::batch::{Pair, PalmBatcher, pad_ids};
use crate::checkpoint::{
    Best, CheckpointDir, EpochRecord, GenerationScores, RecordWritten, TrainState, write_atomic,
};
use crate::config::RunConfig;
use crate::model::PalmTraining;
use crate::output::PalmOutput;
use crate::{Error, Result};

/// The order of the training rows in `epoch`: a permutation drawn from (seed, epoch) alone.
pub fn epoch_order(rows: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    let mut rng = StdRng::seed_from_u64(mix(seed, epoch as u64));
    order.shuffle(&mut rng);
    order
}

/// SplitMix64 of `a` and `b`: decorrelated seeds for neighbouring epochs and steps.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where training pairs come from.
#[derive(Clone)]
pub enum TrainData {
    /// Pairs in memory; an epoch's order is [`epoch_order`].
    Memory(Arc<Vec<Pair>>),
    /// Prepared Parquet shards (`palm prepare`), streamed through a shuffle buffer of `buffer`
    /// rows in an order fixed by (seed, epoch): never held in memory.
    Shards {
        /// The shard directory.
        dir: std::path::PathBuf,
        /// Rows in it (from its `meta.json`).
        rows: usize,
        /// Shuffle-buffer rows.
        buffer: usize,
        /// Source ids at most (longer rows are cut, keeping the final `[SEP]`).
        max_src: usize,
        /// Target ids at most.
        max_tgt: usize,
    },
}

impl TrainData {
    /// Rows per epoch.
    pub fn rows(&self) -> usize {
        match self {
            TrainData::Memory(p) => p.len(),
            TrainData::Shards { rows, .. } => *rows,
        }
    }

    /// The batches of `epoch`, in order.
    fn batches(
        &self,
        seed: u64,
        epoch: usize,
        batch_size: usize,
    ) -> Result<Box<dyn Iterator<Item = Result<Vec<Pair>>> + '_>> {
        match self {
            TrainData::Memory(pairs) => {
                let order = epoch_order(pairs.len(), seed, epoch);
                let batches: Vec<Vec<Pair>> = order
                    .chunks(batch_size)
                    .map(|c| c.iter().map(|&i| pairs[i].clone()).collect())
                    .collect();
                Ok(Box::new(batches.into_iter().map(Ok)))
            }
            TrainData::Shards {
                dir,
                buffer,
                max_src,
                max_tgt,
                ..
            } => {
                let cut = |mut ids: Vec<u32>, max: usize| {
                    if ids.len() > max && max >= 2 {
                        let last = ids[ids.len() - 1];
                        ids.truncate(max);
                        ids[max - 1] = last;
                    }
                    ids
                };
                let (max_src, max_tgt) = (*max_src, *max_tgt);
                let mut rows =
                    palm_data::shards::ShuffledRows::new(dir, *buffer, seed, epoch as u64)?.map(
                        move |r| {
                            r.map(|row| Pair {
                                src: cut(row.src_ids, max_src),
                                tgt: cut(row.tgt_ids, max_tgt),
                            })
                        },
                    );
                Ok(Box::new(std::iter::from_fn(move || {
                    let mut batch = Vec::with_capacity(batch_size);
                    for row in rows.by_ref() {
                        match row {
                            Ok(p) => batch.push(p),
                            Err(e) => return Some(Err(Error::from(e))),
                        }
                        if batch.len() == batch_size {
                            break;
                        }
                    }
                    (!batch.is_empty()).then_some(Ok(batch))
                })))
            }
        }
    }
}

/// How a training loop ended, for [`crate::run::run`].
#[derive(Debug)]
pub struct FitOutcome {
    /// The state after the last epoch (or the last checkpoint's when stopped).
    pub state: TrainState,
}

/// The strategy: data, settings and where to report.
pub struct PalmStrategy<B: AutodiffBackend> {
    /// The run's settings.
    pub config: RunConfig,
    /// Training pairs.
    pub train: TrainData,
    /// Validation pairs.
    pub valid: Arc<Vec<Pair>>,
    /// For decoding validation predictions and references.
    pub tokenizer: Arc<PalmTokenizer>,
    /// Beam settings of validation decoding.
    pub beam: BeamConfig,
    /// PAD id.
    pub pad: u32,
    /// Pre-training: the ids the masking needs.
    pub mask: Option<crate::pretrain::MaskIds>,
    /// The checkpoint to continue from, with its state; a fresh state otherwise.
    pub start: (Option<usize>, TrainState),
    /// The device.
    pub device: B::Device,
    /// Where the loop leaves its outcome.
    pub outcome: Arc<Mutex<Option<Result<FitOutcome>>>>,
}

/// A checkpointing strategy that always saves: which checkpoints to keep is decided by the
/// loop (last K and the best), which knows the metric history across resumes.
struct SaveAlways;

impl CheckpointingStrategy for SaveAlways {
    fn checkpointing(
        &mut self,
        _epoch: usize,
        _store: &EventStoreClient,
    ) -> Vec<CheckpointingAction> {
        vec![CheckpointingAction::Save]
    }
}

type Components<B> = crate::run::Components<B>;

impl<B: AutodiffBackend> SupervisedLearningStrategy<Components<B>> for PalmStrategy<B> {
    fn fit(
        &self,
        components: TrainingComponents<Components<B>>,
        mut learner: Learner<Components<B>>,
        _train: TrainLoader<Components<B>>,
        _valid: ValidLoader<Components<B>>,
        _starting_epoch: usize,
    ) -> (
        PalmTraining<B>,
        SupervisedTrainingEventProcessor<Components<B>>,
    ) {
        let mut processor = components.event_processor;
        let result = self.train_loop(
            &mut learner,
            &mut processor,
            &components.event_store,
            &components.interrupter,
        );
        *self.outcome.lock().expect("outcome lock") = Some(result);
        (learner.model(), processor)
    }
}

struct Saver<B: AutodiffBackend> {
    checkpointer: LearningCheckpointer<Components<B>>,
    written: mpsc::Receiver<RecordWritten>,
    dir: CheckpointDir,
    keep_last: usize,
}

impl<B: AutodiffBackend> Saver<B> {
    fn save(
        &mut self,
        learner: &Learner<Components<B>>,
        state: &TrainState,
        store: &EventStoreClient,
    ) -> Result<()> {
        self.checkpointer.checkpoint(learner, state.step, store);
        for _ in 0..3 {
            let written = self.written.recv().map_err(|e| Error::Checkpoint {
                path: self.dir.root().to_path_buf(),
                message: e.to_string(),
            })?;
            written.map_err(|message| Error::Checkpoint {
                path: self.dir.root().to_path_buf(),
                message,
            })?;
        }
        self.dir.commit(state.step, state)?;
        self.dir
            .prune(self.keep_last.max(1), state.best.map(|b| b.step))
    }
}

/// Teacher-forced validation sums.
#[derive(Default)]
struct ValidSums {
    loss: f64,
    nll: f64,
    correct: f64,
    tokens: f64,
    mlm_nll: f64,
    mlm_correct: f64,
    mlm_count: f64,
}

/// Salts of the masking seeds, so training and validation masks are independent streams.
const TRAIN_MASKS: u64 = 0x6d61_736b_7472_6e31;
const VALID_MASKS: u64 = 0x6d61_736b_7661_6c31;

impl<B: AutodiffBackend> PalmStrategy<B> {
    fn saver(&self) -> Saver<B> {
        let dir = CheckpointDir::new(&self.config.out);
        let (tx, rx) = mpsc::channel();
        let checkpointer = LearningCheckpointer::new(
            AsyncCheckpointer::new(dir.record_file("model", tx.clone())),
            AsyncCheckpointer::new(dir.record_file("optim", tx.clone())),
            AsyncCheckpointer::new(dir.record_file("scheduler", tx)),
            Box::new(SaveAlways),
        );
        Saver {
            checkpointer,
            written: rx,
            dir,
            keep_last: self.config.keep_last,
        }
    }

    fn train_loop(
        &self,
        learner: &mut Learner<Components<B>>,
        processor: &mut SupervisedTrainingEventProcessor<Components<B>>,
        store: &EventStoreClient,
        interrupter: &burn_train::Interrupter,
    ) -> Result<FitOutcome> {
        let c = &self.config;
        let mut saver = self.saver();
        let (resume_step, mut state) = self.start.clone();
        if let Some(step) = resume_step {
            *learner = saver
                .checkpointer
                .load_checkpoint(learner.clone(), &self.device, step);
        }
        let rows = self.train.rows();
        let accumulation = c.grad_accumulation.max(1);
        let mut lr = 0.0;
        while state.epoch <= c.epochs && !state.stopped_early {
            let epoch = state.epoch;
            let batch_count = rows.div_ceil(c.batch_size);
            // A resumed epoch skips the batches its checkpoint had trained (for shards, by
            // reading past them).
            let batches = self
                .train
                .batches(c.seed, epoch, c.batch_size)?
                .enumerate()
                .skip(state.next_batch);
            let global = Progress::new(epoch, c.epochs);
            let mut accumulator = GradientsAccumulator::<PalmTraining<B>>::new();
            let mut in_group = 0usize;
            let mut group = crate::checkpoint::Running::default();
            for (b, items) in batches {
                let items = items?;
                if in_group == 0 {
                    learner.lr_step();
                    lr = learner.lr_current();
                }
                let pass_seed = mix(c.seed, state.micro_steps as u64);
                B::seed(&self.device, pass_seed);
                palm_model::grad::seed_dropout(pass_seed);
                let tokens: usize = items.iter().map(|p| p.tgt.len().saturating_sub(1)).sum();
                let seed = mix(c.seed ^ TRAIN_MASKS, state.micro_steps as u64);
                let batch = self.make_batch(items, seed, &self.device);
                let out = learner.train_step(batch);
                let loss: f64 = out.item.loss.clone().into_scalar().elem();
                if !loss.is_finite() {
                    return Err(Error::NonFinite {
                        reason: format!(
                            "the training loss became {loss} at epoch {epoch}, optimizer step {}",
                            state.step + 1
                        ),
                        checkpoint: CheckpointDir::new(&c.out)
                            .complete()?
                            .last()
                            .map(|&s| CheckpointDir::new(&c.out).path(s)),
                    });
                }
                state.micro_steps += 1;
                state.running.loss_sum += loss * tokens as f64;
                state.running.tokens += tokens as f64;
                group.loss_sum += loss * tokens as f64;
                group.tokens += tokens as f64;
                in_group += 1;
                let last_of_epoch = b + 1 == batch_count;
                let grads = if accumulation == 1 {
                    Some(out.grads)
                } else {
                    accumulator.accumulate(&learner.model(), out.grads);
                    (in_group == accumulation || last_of_epoch).then(|| accumulator.grads())
                };
                if let Some(mut grads) = grads {
                    if let Some(max_norm) = c.max_grad_norm {
                        clip_global_norm(&learner.model(), &mut grads, max_norm);
                    }
                    learner.optimizer_step(grads);
                    state.step += 1;
                    state.next_batch = b + 1;
                    state
                        .curve
                        .push([state.step as f64, group.loss_sum / group.tokens.max(1.0)]);
                    group = Default::default();
                    in_group = 0;
                    if let Some(every) = c.checkpoint_every
                        && state.step.is_multiple_of(every)
                        && !last_of_epoch
                    {
                        saver.save(learner, &state, store)?;
                    }
                }
                let progress = Progress::new(((b + 1) * c.batch_size).min(rows), rows);
                processor.process_train(LearnerEvent::ProcessedItem(TrainingItem::new(
                    out.item,
                    progress,
                    global.clone(),
                    Some(b + 1),
                    Some(lr),
                )));
                if interrupter.should_stop() {
                    return Err(Error::Interrupted { dir: c.out.clone() });
                }
            }
            processor.process_train(LearnerEvent::EndEpoch(epoch));

            let record = self.validate(learner, processor, &state, epoch, lr);
            state.history.push(record.clone());
            self.update_best(&mut state, &record);
            state.epoch = epoch + 1;
            state.next_batch = 0;
            state.running = Default::default();
            if let Some(patience) = c.early_stopping
                && state.epochs_without_improvement >= patience
                && epoch < c.epochs
            {
                state.stopped_early = true;
            }
            saver.save(learner, &state, store)?;
            write_history(&c.out, &state.history)?;
        }
        if let Some(best) = state.best {
            // The run's model is the best checkpoint's.
            *learner = saver
                .checkpointer
                .load_checkpoint(learner.clone(), &self.device, best.step);
        }
        Ok(FitOutcome { state })
    }

    fn update_best(&self, state: &mut TrainState, record: &EpochRecord) {
        let metric = self.config.best_metric;
        let value = metric_value(metric, record);
        let improved = match state.best {
            None => true,
            Some(best) if metric.higher_is_better() => value > best.value + self.config.min_delta,
            Some(best) => value < best.value - self.config.min_delta,
        };
        if improved {
            state.best = Some(Best {
                step: state.step,
                epoch: record.epoch,
                value,
            });
            state.epochs_without_improvement = 0;
        } else {
            state.epochs_without_improvement += 1;
        }
    }

    /// Teacher-forced metrics over the whole validation split and ROUGE/BLEU of the first
    /// `valid_decode` rows, reported to burn-train and returned as the epoch's record.
    fn validate(
        &self,
        learner: &Learner<Components<B>>,
        processor: &mut SupervisedTrainingEventProcessor<Components<B>>,
        state: &TrainState,
        epoch: usize,
        lr: f64,
    ) -> EpochRecord {
        let c = &self.config;
        let model = learner.model().valid();
        let device = self.device.clone();
        let global = Progress::new(epoch, c.epochs);
        let mut sums = ValidSums::default();
        let mut generation = TextGenerationMetric::default();
        let rows = self.valid.len();
        for (i, chunk) in self.valid.chunks(c.batch_size).enumerate() {
            let start = i * c.batch_size;
            // The same masks at every epoch's validation.
            let seed = mix(c.seed ^ VALID_MASKS, i as u64);
            let batch: crate::batch::PalmBatch<B::InnerBackend> =
                self.make_batch(chunk.to_vec(), seed, &device);
            let gold = batch.gold.clone();
            if let Some(labels) = batch.mlm_labels.clone()
                && let Some(m) = model.mlm_loss(&model.palm.encode(batch.src.clone()), labels)
            {
                sums.mlm_nll += m.sum.into_scalar().elem::<f64>();
                sums.mlm_correct += m.correct.into_scalar().elem::<f64>();
                sums.mlm_count += m.count.into_scalar().elem::<f64>();
            }
            let mut out: PalmOutput<B::InnerBackend> = InferenceStep::step(&model, batch);
            self.add_sums(&model, &mut sums, &out, gold);
            let decode = c.valid_decode.saturating_sub(start).min(chunk.len());
            if decode > 0 {
                let pairs = self.decode(&model, &chunk[..decode], &device);
                for (p, r) in &pairs {
                    generation.add(p, r);
                }
                out.generated = Arc::new(pairs);
            }
            processor.process_valid(LearnerEvent::ProcessedItem(TrainingItem::new(
                out,
                Progress::new((start + chunk.len()).min(rows), rows),
                global.clone(),
                Some(i + 1),
                None,
            )));
        }
        processor.process_valid(LearnerEvent::EndEpoch(epoch));
        let tokens = sums.tokens.max(1.0);
        let train_tokens = state.running.tokens.max(1.0);
        EpochRecord {
            epoch,
            step: state.step,
            lr,
            train_loss: state.running.loss_sum / train_tokens,
            valid_loss: sums.loss / tokens,
            valid_accuracy: 100.0 * sums.correct / tokens,
            valid_perplexity: (sums.nll / tokens).exp(),
            valid_mlm_loss: (sums.mlm_count > 0.0).then(|| sums.mlm_nll / sums.mlm_count),
            valid_mlm_accuracy: (sums.mlm_count > 0.0)
                .then(|| 100.0 * sums.mlm_correct / sums.mlm_count),
            generation: generation.evaluate().ok().map(|s| {
                let p = s.percent();
                GenerationScores {
                    rouge_1: p.rouge_1,
                    rouge_2: p.rouge_2,
                    rouge_l: p.rouge_l,
                    bleu_4: p.bleu_4,
                    rows: s.count,
                }
            }),
        }
    }

    /// A batch of `items`; in pre-training with the sources masked by an RNG seeded `seed`.
    fn make_batch<BB: Backend>(
        &self,
        items: Vec<Pair>,
        seed: u64,
        device: &BB::Device,
    ) -> crate::batch::PalmBatch<BB> {
        let batcher = PalmBatcher {
            pad: self.pad,
            multiple: self.config.pad_multiple,
        };
        let (Some(mask), Some(p)) = (self.mask, &self.config.pretrain) else {
            return batcher.batch(items, device);
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let mut labels = Vec::with_capacity(items.len());
        let items = items
            .into_iter()
            .map(|pair| {
                let (src, l) =
                    crate::pretrain::mask_tokens(&pair.src, p.mask_probability, mask, &mut rng);
                labels.push(l);
                Pair { src, tgt: pair.tgt }
            })
            .collect();
        batcher.batch_masked(items, &labels, device)
    }

    fn add_sums(
        &self,
        model: &PalmTraining<B::InnerBackend>,
        sums: &mut ValidSums,
        out: &PalmOutput<B::InnerBackend>,
        gold: Tensor<B::InnerBackend, 2, Int>,
    ) {
        // The step's output holds logits (the loss is taken from them); the NLL needs
        // log-probabilities.
        let lp = burn::tensor::activation::log_softmax(out.seq.logits.clone(), 2);
        let gold_for_loss = gold.clone();
        let mask = gold.clone().not_equal_elem(self.pad as i64);
        let tokens: f64 = mask.clone().int().sum().into_scalar().elem();
        let predicted = lp.clone().argmax(2).squeeze_dim::<2>(2);
        let correct: f64 = predicted
            .equal(gold.clone())
            .int()
            .mul(mask.clone().int())
            .sum()
            .into_scalar()
            .elem();
        let nll: f64 = lp
            .gather(2, gold.unsqueeze_dim(2))
            .squeeze_dim::<2>(2)
            .mask_fill(mask.bool_not(), 0.0)
            .sum()
            .neg()
            .into_scalar()
            .elem();
        // The decoder's loss alone (in pre-training the step's loss also holds the MLM term).
        let loss: f64 = model
            .criterion()
            .forward_logits(out.seq.logits.clone(), gold_for_loss)
            .sum
            .into_scalar()
            .elem();
        sums.loss += loss;
        sums.nll += nll;
        sums.correct += correct;
        sums.tokens += tokens;
    }

    /// Beam-search predictions and the tokenised references (decoded from ids, as the
    /// reference trainer's evaluation does), as text.
    fn decode(
        &self,
        model: &PalmTraining<B::InnerBackend>,
        pairs: &[Pair],
        device: &burn::tensor::Device<B::InnerBackend>,
    ) -> Vec<(String, String)> {
        let rows: Vec<&[u32]> = pairs.iter().map(|p| p.src.as_slice()).collect();
        let src = pad_ids::<B::InnerBackend>(&rows, self.pad, device);
        beam_search(&model.palm, src, &self.beam)
            .into_iter()
            .zip(pairs)
            .map(|(h, p)| {
                (
                    self.tokenizer.decode(&h.tokens),
                    self.tokenizer.decode(&p.tgt),
                )
            })
            .collect()
    }
}

/// The value of the best-checkpoint metric in a record (validation loss when the record has
/// no decoded rows).
fn metric_value(metric: crate::config::BestMetric, r: &EpochRecord) -> f64 {
    use crate::config::BestMetric as M;
    match (metric, &r.generation) {
        (M::Rouge1, Some(g)) => g.rouge_1,
        (M::Rouge2, Some(g)) => g.rouge_2,
        (M::RougeL, Some(g)) => g.rouge_l,
        (M::Bleu4, Some(g)) => g.bleu_4,
        _ => r.valid_loss,
    }
}

/// `RUN_DIR/metrics.jsonl`: one line per finished epoch, rewritten whole (atomically) so a
/// resumed run's file equals an uninterrupted run's.
fn write_history(dir: &std::path::Path, history: &[EpochRecord]) -> Result<()> {
    let text: String = history
        .iter()
        .map(|r| serde_json::to_string(r).expect("record serializes") + "\n")
        .collect();
    write_atomic(&dir.join("metrics.jsonl"), text.as_bytes())
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`; burn's own clipping works per parameter tensor). Returns the norm
/// before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    struct Norm<'a, B: Backend> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<B, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Norm<'_, B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let s = g.square().sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut norm = Norm::<B::InnerBackend> { grads, sum: None };
    model.visit(&mut norm);
    // One read-back per optimizer step.
    let total: f64 = norm
        .sum
        .map_or(0.0, |s| s.sqrt().into_scalar().elem::<f64>());
    let factor = max_norm / (total + 1e-6);
    if factor < 1.0 {
        model.visit(&mut Scale { grads, factor });
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use burn::nn::{Linear, LinearConfig};
    use burn_ndarray::NdArray;

    type B = Autodiff<NdArray<f32>>;

    fn grads_of(model: &Linear<B>) -> GradientsParams {
        let x =
            Tensor::<B, 2>::from_floats([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]], &Default::default());
        let loss = model.forward(x).powi_scalar(2).sum().mul_scalar(10.0);
        GradientsParams::from_grads(loss.backward(), model)
    }

    fn norm(model: &Linear<B>, grads: &GradientsParams) -> f64 {
        let w: Tensor<NdArray<f32>, 2> = grads.get(model.weight.id).unwrap();
        let b: Tensor<NdArray<f32>, 1> = grads.get(model.bias.as_ref().unwrap().id).unwrap();
        let s: f64 = w.square().sum().into_scalar().elem::<f64>()
            + b.square().sum().into_scalar().elem::<f64>();
        s.sqrt()
    }

    #[test]
    fn clipping_scales_every_gradient_to_the_global_norm() {
        let device = Default::default();
        let model: Linear<B> = LinearConfig::new(3, 2).init(&device);
        let mut grads = grads_of(&model);
        let before = norm(&model, &grads);
        assert!(before > 1.0, "{before}");
        let w0: Tensor<NdArray<f32>, 2> = grads.get(model.weight.id).unwrap();
        let reported = clip_global_norm(&model, &mut grads, 1.0);
        assert!((reported - before).abs() < 1e-3 * before);
        assert!((norm(&model, &grads) - 1.0).abs() < 1e-4);
        // One factor for all tensors (the direction is kept), not a per-tensor clip.
        let w1: Tensor<NdArray<f32>, 2> = grads.get(model.weight.id).unwrap();
        let ratio = w1.div(w0).into_data().iter::<f32>().collect::<Vec<_>>();
        assert!(
            ratio.iter().all(|r| (r - ratio[0]).abs() < 1e-5),
            "{ratio:?}"
        );
        // Below the threshold nothing changes.
        let mut small = grads_of(&model);
        clip_global_norm(&model, &mut small, 1e9);
        assert!((norm(&model, &small) - before).abs() < 1e-9 * before.max(1.0));
    }

    #[test]
    fn epoch_orders_are_permutations_fixed_by_seed_and_epoch() {
        let a = epoch_order(100, 7, 1);
        assert_eq!(a, epoch_order(100, 7, 1));
        assert_ne!(a, epoch_order(100, 7, 2));
        assert_ne!(a, epoch_order(100, 8, 1));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
}
