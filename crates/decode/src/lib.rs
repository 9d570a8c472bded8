//! Beam search and greedy decoding for PALM over the model's KV cache.
//!
//! `palm-decode` owns the reference search of `palm-reference.md` §5 (PreSumm's
//! `_fast_translate_batch`): GNMT length penalty ((5 + step + 1) / 6)^alpha, EOS forbidden
//! before `min_length` generated tokens, at most `max_length` steps, an item finishes when its
//! *top* beam emits EOS (every beam then records a hypothesis), EOS beams of lower rank are
//! recorded but stay alive, and the best recorded hypothesis wins. Greedy decoding is beam
//! size 1. Sources are decoded in batches; the encoder output and the cross-attention
//! keys/values are computed once per source and shared by its beams. It works on token ids
//! only: no tokenizers, no arrow.
//!
//! ```
//! use burn::prelude::*;
//! use burn_ndarray::{NdArray, NdArrayDevice};
//! use palm_decode::{BeamConfig, beam_search};
//! use palm_model::{ModelConfig, Palm};
//!
//! let device = NdArrayDevice::Cpu;
//! let model = Palm::<NdArray<f32>>::new(&ModelConfig::tiny(50), &device);
//! let src = Tensor::<NdArray<f32>, 2, Int>::from_data(TensorData::new(vec![2i64, 7, 9, 3], [1, 4]), &device);
//! let config = BeamConfig { beam_size: 3, alpha: 0.95, min_length: 2, max_length: 5, bos: 2, eos: 3 };
//! let hyps = beam_search(&model, src, &config);
//! assert!(hyps[0].tokens.len() >= 2 && hyps[0].tokens.len() <= 5);
//! ```

use burn::prelude::*;
use palm_model::Palm;

/// The `k` largest entries of each row of `x`, best first (the lowest index first among
/// equal values), as row-major `[rows, k]` values and column indices. `k` rounds of a row-wise
/// arg-max, each masking its pick: a reduction per beam stays on the device, where a sort
/// would not (burn-cubecl has no device sort; `topk` reads the whole `[items, k × vocab]`
/// tensor back, sorts it on the host and uploads it again, at every step). One read at the end.
pub fn top_k<B: Backend>(x: Tensor<B, 2>, k: usize) -> (Vec<f32>, Vec<i64>) {
    let (values, indices) = top_k_tensors(x, k);
    read_pairs(vec![(values, indices)])
}

/// [`top_k`] left on the device: `[rows, k]` values and column indices. Through the
/// backend's own kernel where its step kernels have one ([`StepKernels::top_k`]).
///
/// [`StepKernels::top_k`]: palm_model::decoder::StepKernels::top_k
pub fn top_k_tensors<B: Backend>(x: Tensor<B, 2>, k: usize) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let x = match palm_model::decoder::step_kernels::<B>().and_then(|s| s.top_k) {
        Some(kernel) => match kernel(x, k) {
            Ok(chosen) => return chosen,
            Err(x) => *x,
        },
        None => x,
    };
    let [rows, cols] = x.dims();
    let device = x.device();
    let positions = Tensor::<B, 1, Int>::arange(0..cols as i64, &device)
        .unsqueeze::<2>()
        .expand([rows, cols]);
    let mut x = x;
    let (mut values, mut indices) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for j in 0..k {
        let (v, i) = x.clone().max_dim_with_indices(1);
        if j + 1 < k {
            let picked = positions.clone().equal(i.clone().expand([rows, cols]));
            x = x.mask_fill(picked, f32::NEG_INFINITY);
        }
        values.push(v);
        indices.push(i);
    }
    (Tensor::cat(values, 1), Tensor::cat(indices, 1))
}

/// Reads `[rows, k]` value and index pairs of equal shapes back in one transfer each, the
/// pairs one after another.
fn read_pairs<B: Backend>(pairs: Vec<(Tensor<B, 2>, Tensor<B, 2, Int>)>) -> (Vec<f32>, Vec<i64>) {
    #[cfg(test)]
    tests::READS.with(|r| r.set(r.get() + 1));
    let (values, indices): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    let values = joined(values).into_data().iter::<f32>().collect();
    let indices = joined(indices).into_data().iter::<i64>().collect();
    (values, indices)
}

/// `parts` one after another along the first axis; a single part as it is, without a copy
/// (every step read on its own).
fn joined<B: Backend, K: burn::tensor::BasicOps<B>>(
    mut parts: Vec<Tensor<B, 2, K>>,
) -> Tensor<B, 2, K> {
    match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => Tensor::cat(parts, 0),
    }
}

/// When beam search reads a step's choices back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reads {
    /// Only at steps where a source can finish: from `min_length` on (EOS is allowed) and at
    /// the last step. Before that, the next step's tokens, scores and cache rows are derived
    /// on the device and the host issues the steps without waiting for them; the choices are
    /// read together when one is needed. The same hypotheses as [`Reads::EveryStep`].
    #[default]
    Deferred,
    /// After every step (the host waits for the device once per step).
    EveryStep,
}

/// Search settings; the reference's defaults are those of `PalmConfig`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamConfig {
    /// Beams per source (1 = greedy).
    pub beam_size: usize,
    /// Length-penalty exponent.
    pub alpha: f64,
    /// Generated tokens before EOS is allowed.
    pub min_length: usize,
    /// Decoding steps at most.
    pub max_length: usize,
    /// Start token (`[CLS]`).
    pub bos: u32,
    /// End token (`[SEP]`).
    pub eos: u32,
}

/// The chosen output of one source.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated ids without BOS, with the final EOS when it ended by one.
    pub tokens: Vec<u32>,
    /// Length-normalised log-probability at the step it was recorded.
    pub score: f32,
}

/// The GNMT length penalty at `step` (0-based), computed as the reference does (in double
/// precision, then applied to single-precision scores).
pub fn length_penalty(step: usize, alpha: f64) -> f32 {
    ((5.0 + (step + 1) as f64) / 6.0).powf(alpha) as f32
}

/// Decodes every row of `src [n, s]` (PAD-padded ids) and returns one hypothesis per row.
pub fn beam_search<B: Backend>(
    model: &Palm<B>,
    src: Tensor<B, 2, Int>,
    config: &BeamConfig,
) -> Vec<Hypothesis> {
    beam_search_with(model, src, config, Reads::default())
}

/// [`beam_search`], reading the choices back as `reads` says.
pub fn beam_search_with<B: Backend>(
    model: &Palm<B>,
    src: Tensor<B, 2, Int>,
    config: &BeamConfig,
    reads: Reads,
) -> Vec<Hypothesis> {
    let k = config.beam_size.max(1);
    let [n, _] = src.dims();
    let device = src.device();
    let vocab = model.vocab_size();
    let memory = model.encode(src);
    let mut cache = model.init_cache(&memory, k);
    drop(memory);

    // Per current item: its original index, its beams' sequences and running scores.
    let mut offsets: Vec<usize> = (0..n).collect();
    let mut alive: Vec<Vec<u32>> = vec![vec![config.bos]; n * k];
    let mut running: Vec<f32> = (0..n * k)
        .map(|r| if r % k == 0 { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let mut hypotheses: Vec<Vec<(f32, Vec<u32>)>> = vec![Vec::new(); n];
    let mut results: Vec<Option<Hypothesis>> = vec![None; n];
    let eos_mask = Tensor::<B, 1, Int>::arange(0..vocab as i64, &device)
        .equal_elem(config.eos as i64)
        .unsqueeze::<2>();
    // The next step's input tokens and running scores, on the device.
    let upload = |alive: &[Vec<u32>], running: &[f32]| {
        let rows = alive.len();
        let last: Vec<i64> = alive
            .iter()
            .map(|s| *s.last().expect("starts with BOS") as i64)
            .collect();
        (
            Tensor::<B, 1, Int>::from_data(TensorData::new(last, [rows]), &device),
            Tensor::<B, 1>::from_data(TensorData::new(running.to_vec(), [rows]), &device),
        )
    };
    let (mut tokens, mut run) = upload(&alive, &running);
    // The choices of the steps not read yet, with their length penalties.
    let mut pending = Vec::new();
    let mut penalties = Vec::new();
    // `[rows]`: the first row of each row's source (`r / k * k`), for deferred steps.
    let mut first_rows: Option<Tensor<B, 1, Int>> = None;

    for step in 0..config.max_length {
        let items = offsets.len();
        let rows = items * k;
        let mut lp = model.step(tokens, &mut cache);
        if step < config.min_length {
            lp = lp.mask_fill(eos_mask.clone().expand([rows, vocab]), -1e20);
        }
        let penalty = length_penalty(step, config.alpha);
        let curr = (lp + run.unsqueeze_dim::<2>(1)).div_scalar(penalty);
        let (values, ids) = top_k_tensors(curr.reshape([items, k * vocab]), k);
        // No source can finish at this step when EOS is masked out (with k < vocab, k other
        // candidates outscore it) and it is not the last: its choices can wait on the device.
        if reads == Reads::Deferred
            && step < config.min_length
            && step + 1 < config.max_length
            && k < vocab
        {
            let first = first_rows
                .get_or_insert_with(|| {
                    Tensor::<B, 1, Int>::arange(0..rows as i64, &device)
                        .div_scalar(k as i64)
                        .mul_scalar(k as i64)
                })
                .clone();
            let flat = ids.clone().reshape([rows]);
            cache.select_rows(first + flat.clone().div_scalar(vocab as i64));
            tokens = flat.remainder_scalar(vocab as i64);
            run = values.clone().reshape([rows]).mul_scalar(penalty);
            pending.push((values, ids));
            penalties.push(penalty);
            continue;
        }
        pending.push((values, ids));
        penalties.push(penalty);
        let (scores, ids) = read_pairs(std::mem::take(&mut pending));
        let first_step = step + 1 - penalties.len();
        let mut origins = Vec::with_capacity(rows);
        // The steps read now, in order: the deferred ones (their cache rows already chosen on
        // the device) and this one.
        for (j, penalty) in std::mem::take(&mut penalties).into_iter().enumerate() {
            let (scores, ids) = (&scores[j * rows..][..rows], &ids[j * rows..][..rows]);
            origins.clear();
            let mut new_alive = Vec::with_capacity(rows);
            for i in 0..items {
                for b in 0..k {
                    let id = ids[i * k + b] as usize;
                    let origin = i * k + id / vocab;
                    let mut seq = alive[origin].clone();
                    seq.push((id % vocab) as u32);
                    new_alive.push(seq);
                    origins.push(origin);
                }
            }
            alive = new_alive;
            running = scores.iter().map(|s| s * penalty).collect();
            let last_step = first_step + j + 1 == config.max_length;
            for i in 0..items {
                let b = offsets[i];
                // Finished at an earlier deferred step (not expected: see `Reads::Deferred`).
                if results[b].is_some() {
                    continue;
                }
                let top_done = last_step || alive[i * k].last() == Some(&config.eos);
                for r in i * k..(i + 1) * k {
                    if top_done || alive[r].last() == Some(&config.eos) {
                        hypotheses[b].push((scores[r], alive[r][1..].to_vec()));
                    }
                }
                if top_done {
                    // A stable sort keeps the first recorded of equal scores first, as Python's.
                    let mut hyps = std::mem::take(&mut hypotheses[b]);
                    hyps.sort_by(|a, b| b.0.total_cmp(&a.0));
                    let (score, tokens) = hyps.swap_remove(0);
                    results[b] = Some(Hypothesis { tokens, score });
                }
            }
        }
        let kept: Vec<usize> = (0..items)
            .filter(|&i| results[offsets[i]].is_none())
            .collect();
        if kept.is_empty() {
            break;
        }
        let row_origins: Vec<usize> = kept
            .iter()
            .flat_map(|&i| origins[i * k..(i + 1) * k].iter().copied())
            .collect();
        cache.select(&kept, &row_origins);
        alive = kept
            .iter()
            .flat_map(|&i| alive[i * k..(i + 1) * k].iter().cloned())
            .collect();
        running = kept
            .iter()
            .flat_map(|&i| running[i * k..(i + 1) * k].to_vec())
            .collect();
        offsets = kept.iter().map(|&i| offsets[i]).collect();
        (tokens, run) = upload(&alive, &running);
        first_rows = None;
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or(Hypothesis {
                tokens: Vec::new(),
                score: f32::NEG_INFINITY,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use burn_ndarray::{NdArray, NdArrayDevice};
    use palm_model::ModelConfig;

    use super::*;

    thread_local! {
        /// Host reads of top-k choices on this thread.
        pub(super) static READS: Cell<usize> = const { Cell::new(0) };
    }

    #[test]
    fn deferred_search_reads_once_before_min_length_then_each_step() {
        type B = NdArray<f32>;
        let device = NdArrayDevice::Cpu;
        B::seed(&device, 3);
        let model = Palm::<B>::new(&ModelConfig::tiny(50), &device);
        let src = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![2i64, 7, 9, 3, 2, 11, 5, 0], [2, 4]),
            &device,
        );
        let config = BeamConfig {
            beam_size: 3,
            alpha: 0.6,
            min_length: 6,
            max_length: 10,
            bos: 2,
            eos: 3,
        };
        let counted = |reads| {
            READS.with(|r| r.set(0));
            let out = beam_search_with(&model, src.clone(), &config, reads);
            (out, READS.with(Cell::get))
        };
        let (every, every_reads) = counted(Reads::EveryStep);
        let (deferred, deferred_reads) = counted(Reads::Deferred);
        assert_eq!(every, deferred);
        // Nothing can finish before step 6: one read per step until then when reading every
        // step, one read in all for steps 0..=6 when deferred; then one per step either way.
        assert!(every_reads >= 7, "{every_reads}");
        assert_eq!(every_reads - deferred_reads, 6);
    }
}
