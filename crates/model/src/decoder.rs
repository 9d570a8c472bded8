//! PALM's decoder (OpenNMT/PreSumm style, `palm-reference.md` §2.2–2.5): pre-norm layers with
//! eps 1e-6, tanh GELU, sinusoidal positions added to embeddings scaled by sqrt(d), and a final
//! LayerNorm. Field names mirror the reference state dict (`transformer_layers.N.self_attn.
//! linear_keys`, `feed_forward.w_1`, `layer_norm_1`, …).

use burn::nn::{Dropout, DropoutConfig, Embedding, LayerNorm, Linear};
use burn::prelude::*;

use crate::attention::{
    attention, fused_attention, fused_cross_attention, merge_heads, multi_head_attention,
    split_heads,
};
use crate::dense::Narrow::{Heads, Inner};
use crate::dense::{dense, dense_narrow};
use crate::grad;
use crate::init::{embedding, layer_norm, linear};
use crate::registry::PerBackend;

/// LayerNorm epsilon of every decoder norm.
pub const DECODER_LN_EPS: f64 = 1e-6;
/// Rows of the reference's positional table.
pub const MAX_POSITIONS: usize = 5000;

/// OpenNMT's multi-headed attention: four d×d projections.
#[derive(Module, Debug)]
pub struct MultiHeadedAttention<B: Backend> {
    /// Key projection.
    pub linear_keys: Linear<B>,
    /// Value projection.
    pub linear_values: Linear<B>,
    /// Query projection.
    pub linear_query: Linear<B>,
    /// Output projection.
    pub final_linear: Linear<B>,
    heads: usize,
    dropout: Dropout,
}

/// `x + W2(drop(gelu_tanh(W1(LN(x)))))`, with dropout on the output too.
#[derive(Module, Debug)]
pub struct PositionwiseFeedForward<B: Backend> {
    /// Pre-norm of the block.
    pub layer_norm: LayerNorm<B>,
    /// `d → ff`.
    pub w_1: Linear<B>,
    /// `ff → d`.
    pub w_2: Linear<B>,
    dropout_1: Dropout,
    dropout_2: Dropout,
}

/// One decoder layer.
#[derive(Module, Debug)]
pub struct TransformerDecoderLayer<B: Backend> {
    /// Masked self-attention.
    pub self_attn: MultiHeadedAttention<B>,
    /// Attention over the encoder output.
    pub context_attn: MultiHeadedAttention<B>,
    /// FFN block with its own norm.
    pub feed_forward: PositionwiseFeedForward<B>,
    /// Norm before self-attention.
    pub layer_norm_1: LayerNorm<B>,
    /// Norm before context attention.
    pub layer_norm_2: LayerNorm<B>,
    drop: Dropout,
}

/// The decoder: embeddings (tied with the generator), layers, final norm.
#[derive(Module, Debug)]
pub struct TransformerDecoder<B: Backend> {
    /// `[vocab, d]`; the generator's weight too.
    pub embeddings: Embedding<B>,
    /// The layers.
    pub transformer_layers: Vec<TransformerDecoderLayer<B>>,
    /// Final LayerNorm, applied before the generator.
    pub layer_norm: LayerNorm<B>,
    /// Sinusoidal table `[MAX_POSITIONS, d]`; deterministic, never saved.
    pe: Tensor<B, 2>,
    pos_dropout: Dropout,
    d_model: usize,
}

/// The sinusoidal table: even columns sin(pos·wᵢ), odd columns cos(pos·wᵢ),
/// wᵢ = exp(−ln(10000)·2i/d).
pub fn positional_table(rows: usize, d: usize) -> Vec<f32> {
    let mut pe = vec![0f32; rows * d];
    for pos in 0..rows {
        for i in 0..d / 2 {
            let w = (-(10000f64.ln()) * (2 * i) as f64 / d as f64).exp();
            // The reference computes in f32: position × div_term, then sin/cos.
            let angle = (pos as f32) * (w as f32);
            pe[pos * d + 2 * i] = angle.sin();
            pe[pos * d + 2 * i + 1] = angle.cos();
        }
    }
    pe
}

fn ln<B: Backend>(d: usize, device: &B::Device) -> LayerNorm<B> {
    layer_norm(d, DECODER_LN_EPS, device)
}

/// A decoder norm of `x`.
fn norm<B: Backend, const D: usize>(ln: &LayerNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    grad::layer_norm(ln, DECODER_LN_EPS, x)
}

impl<B: Backend> MultiHeadedAttention<B> {
    fn new(d: usize, heads: usize, dropout: f64, device: &B::Device) -> Self {
        MultiHeadedAttention {
            linear_keys: linear(d, d, device),
            linear_values: linear(d, d, device),
            linear_query: linear(d, d, device),
            final_linear: linear(d, d, device),
            heads,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// Query projection, divided by sqrt(dh) as the reference does: `[b, t, h·dh]`.
    fn query_rows(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let dh = x.dims()[2] / self.heads;
        dense_narrow(&self.linear_query, x, Heads).div_scalar((dh as f64).sqrt())
    }

    /// [`Self::query_rows`] split into heads: `[b, h, t, dh]`.
    fn query(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        split_heads(self.query_rows(x), self.heads)
    }

    /// Key and value projections of `x`: `[b, t, h·dh]` each.
    fn keys_values_rows(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        (
            dense_narrow(&self.linear_keys, x.clone(), Heads),
            dense_narrow(&self.linear_values, x, Heads),
        )
    }

    /// Keys and values of `x`, split into heads: `[b, h, t, dh]` each.
    pub fn keys_values(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = self.keys_values_rows(x);
        (split_heads(k, self.heads), split_heads(v, self.heads))
    }

    /// Attention over heads already split (the cached step's), then the output projection.
    fn forward(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        dense(
            &self.final_linear,
            merge_heads(attention(q, k, v, Some(mask), &self.dropout)),
        )
    }

    /// Attention over the projections' rows (`x` the queries' input, `memory` the keys' and
    /// values'), then the output projection.
    fn forward_rows(
        &self,
        x: Tensor<B, 3>,
        memory: Tensor<B, 3>,
        mask: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        let (k, v) = self.keys_values_rows(memory);
        let q = self.query_rows(x);
        dense(
            &self.final_linear,
            multi_head_attention(q, k, v, self.heads, mask, &self.dropout),
        )
    }
}

impl<B: Backend> TransformerDecoderLayer<B> {
    fn new(d: usize, heads: usize, ff: usize, dropout: f64, device: &B::Device) -> Self {
        TransformerDecoderLayer {
            self_attn: MultiHeadedAttention::new(d, heads, dropout, device),
            context_attn: MultiHeadedAttention::new(d, heads, dropout, device),
            feed_forward: PositionwiseFeedForward {
                layer_norm: ln(d, device),
                w_1: linear(d, ff, device),
                w_2: linear(ff, d, device),
                dropout_1: DropoutConfig::new(dropout).init(),
                dropout_2: DropoutConfig::new(dropout).init(),
            },
            layer_norm_1: ln(d, device),
            layer_norm_2: ln(d, device),
            drop: DropoutConfig::new(dropout).init(),
        }
    }

    fn feed_forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let f = &self.feed_forward;
        let inner = grad::dropout(
            &f.dropout_1,
            grad::gelu_tanh(dense_narrow(&f.w_1, norm(&f.layer_norm, x.clone()), Inner)),
        );
        grad::dropout_add(&f.dropout_2, dense(&f.w_2, inner), x)
    }

    /// Teacher-forced layer: `x [b, t, d]`, `memory [b, s, d]`, `self_mask [b, 1, t, t]`,
    /// `src_mask [b, 1, 1, s]`.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        memory: Tensor<B, 3>,
        self_mask: Tensor<B, 4, Bool>,
        src_mask: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        let xn = norm(&self.layer_norm_1, x.clone());
        let a = self.self_attn.forward_rows(xn.clone(), xn, self_mask);
        let q = grad::dropout_add(&self.drop, a, x);
        let qn = norm(&self.layer_norm_2, q.clone());
        let c = self.context_attn.forward_rows(qn, memory, src_mask);
        self.feed_forward(grad::dropout_add(&self.drop, c, q))
    }

    /// One cached step for `rows = sources × beams` rows: `x [rows, 1, d]`.
    fn step(
        &self,
        x: Tensor<B, 3>,
        cache: &mut LayerCache<B>,
        input_pad: Tensor<B, 4, Bool>,
        src_mask: &Tensor<B, 4, Bool>,
        beams: usize,
    ) -> Tensor<B, 3> {
        let xn = norm(&self.layer_norm_1, x.clone());
        let (k, v) = self.self_attn.keys_values(xn.clone());
        let (k, v) = match (cache.self_keys.take(), cache.self_values.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            _ => (k, v),
        };
        cache.self_keys = Some(k.clone());
        cache.self_values = Some(v.clone());
        // The reference masks every cached key when the current input is PAD.
        let a = self
            .self_attn
            .forward(self.self_attn.query(xn), k, v, input_pad);
        let q = grad::dropout_add(&self.drop, a, x);
        let qn = norm(&self.layer_norm_2, q.clone());
        // Beams of one source share its memory keys/values: the beams become query positions.
        // Every source has a visible key ([CLS]), so the fused op applies (it scales q itself).
        let [rows, _, d] = qn.dims();
        let sources = rows / beams;
        let heads = self.context_attn.heads;
        let dh = d / heads;
        let query = dense(&self.context_attn.linear_query, qn)
            .reshape([sources, beams, heads, dh])
            .swap_dims(1, 2);
        let (keys, values) = (cache.memory_keys.clone(), cache.memory_values.clone());
        let ctx = if fused_cross_attention() {
            fused_attention(query, keys, values, src_mask.clone())
        } else {
            let query = query.div_scalar((dh as f64).sqrt());
            attention(
                query,
                keys,
                values,
                Some(src_mask.clone()),
                &self.context_attn.dropout,
            )
        };
        let ctx = ctx.swap_dims(1, 2).reshape([rows, 1, d]);
        let c = dense(&self.context_attn.final_linear, ctx);
        self.feed_forward(grad::dropout_add(&self.drop, c, q))
    }
}

/// Per-layer cache: memory keys/values once per source, self-attention keys/values per row.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// `[sources, h, s, dh]`.
    pub memory_keys: Tensor<B, 4>,
    /// `[sources, h, s, dh]`.
    pub memory_values: Tensor<B, 4>,
    /// `[rows, h, t, dh]` after the first step.
    pub self_keys: Option<Tensor<B, 4>>,
    /// `[rows, h, t, dh]` after the first step.
    pub self_values: Option<Tensor<B, 4>>,
}

/// The decoder's incremental state for `sources × beams` rows (consecutive beams per source).
#[derive(Debug, Clone)]
pub struct DecoderCache<B: Backend> {
    /// One cache per layer.
    pub layers: Vec<LayerCache<B>>,
    /// `[sources, 1, 1, s]`, `true` at source padding.
    pub src_mask: Tensor<B, 4, Bool>,
    /// Beams per source.
    pub beams: usize,
    /// Position of the next input token.
    pub step: usize,
    /// The state of the backend's own step kernels ([`StepKernels`]), when they decode this
    /// cache; the layers' `self_keys`/`self_values` stay empty then.
    pub fast: Option<FastCache<B>>,
}

/// The self-attention cache of a backend's own step kernels ([`StepKernels`]), with what they
/// read besides the model's parameters.
#[derive(Debug, Clone)]
pub struct FastCache<B: Backend> {
    /// Every layer's self-attention keys and values, `[layers, 2, rows, heads, capacity, dh]`
    /// flattened (keys before values; with `slots`, the rows the cache was made with);
    /// positions `0..step` are written. The kernels write it in place: a cloned cache shares
    /// it.
    pub keys_values: Tensor<B, 1>,
    /// Decoder layers.
    pub layers: usize,
    /// Rows (`sources × beams`).
    pub rows: usize,
    /// Heads per layer.
    pub heads: usize,
    /// Width of a head.
    pub dh: usize,
    /// Positions held per row and head.
    pub capacity: usize,
    /// Per layer, the self-attention's query, key and value projections side by side: a
    /// `[d, 3d]` weight and a `[3d]` bias.
    pub qkv: Vec<(Tensor<B, 2>, Tensor<B, 1>)>,
    /// `[sources, s]`: 1 at source padding, 0 elsewhere.
    pub src_pad: Tensor<B, 2>,
    /// For kernels that reorder rows lazily: `[rows, capacity]` flattened, the row of
    /// `keys_values` holding position `p` of row `r` (which then keeps the rows it was made
    /// with, and `select_rows` rewrites this table, not the cache). `None`: every row holds
    /// its own positions.
    pub slots: Option<Tensor<B, 1, Int>>,
}

/// Positions a [`FastCache`] holds at first; it doubles when a step needs more.
pub const FAST_CACHE_CAPACITY: usize = 32;

/// [`StepKernels::step`]: decoder, generator bias, tokens, cache, padding id.
pub type StepFn<B> = fn(
    &TransformerDecoder<B>,
    Tensor<B, 1>,
    Tensor<B, 1, Int>,
    &mut DecoderCache<B>,
    i64,
) -> Tensor<B, 2>;

/// A backend's own cached decoder step (the CUDA build's: a whole step as a few launches of
/// its own, where burn's operations cost hundreds), set per backend with
/// [`set_step_kernels`]. Beam search and greedy decoding use it through [`crate::Palm::step`]
/// when [`TransformerDecoder::init_cache`] finds it and `accepts` the decoder.
pub struct StepKernels<B: Backend> {
    /// Whether the kernels decode with this decoder (its float type, the device's state).
    pub accepts: fn(&TransformerDecoder<B>) -> bool,
    /// The log-probabilities `[rows, vocab]` of the token after `tokens [rows]` at position
    /// `cache.step`, with the generator's bias `[vocab]` and the padding id; advances the
    /// cache by one position.
    pub step: StepFn<B>,
    /// Makes new row `r` continue from row `origins[r]` (`[rows']`, any number of rows), for
    /// the positions `0..len` written so far.
    pub select_rows: fn(&mut FastCache<B>, Tensor<B, 1, Int>, usize),
    /// The `k` largest entries of each row of `[rows, cols]` scores, best first and the
    /// lowest index first among equal values: `[rows, k]` values and column indices. `Err`
    /// gives the scores back for burn's operations (a type or `k` it does not take); `None`:
    /// always burn's.
    pub top_k: Option<TopKFn<B>>,
}

/// `[rows, k]` values and column indices of the best `k` entries of each row.
pub type TopK<B> = (Tensor<B, 2>, Tensor<B, 2, Int>);

/// [`StepKernels::top_k`].
pub type TopKFn<B> = fn(Tensor<B, 2>, usize) -> Result<TopK<B>, Box<Tensor<B, 2>>>;

// Function pointers are copies whatever `B` is (a derive would ask `B: Copy`).
impl<B: Backend> Clone for StepKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for StepKernels<B> {}

static STEP_KERNELS: PerBackend = PerBackend::new();

/// Decodes on backend `B` with `kernels` (`None`: burn's operations again).
pub fn set_step_kernels<B: Backend>(kernels: Option<StepKernels<B>>) {
    STEP_KERNELS.set::<B, _>(kernels);
}

/// The [`StepKernels`] set for `B`, if any.
pub fn step_kernels<B: Backend>() -> Option<StepKernels<B>> {
    STEP_KERNELS.get::<B, StepKernels<B>>()
}

/// [`StepKernels`] in burn's operations over the [`FastCache`] layout: the contract's
/// reference. A step moves each layer's cached keys and values out of the flat buffer, runs
/// burn's cached step and writes the new position back; CPU tests decode with it and without
/// it and compare.
pub fn reference_step_kernels<B: Backend>() -> StepKernels<B> {
    StepKernels {
        accepts: |_| true,
        step: reference_step,
        select_rows: reference_select_rows,
        top_k: None,
    }
}

/// The buffer as `[layers, 2, rows, heads, capacity, dh]`.
fn fast_view<B: Backend>(fast: &FastCache<B>) -> Tensor<B, 6> {
    fast.keys_values.clone().reshape([
        fast.layers,
        2,
        fast.rows,
        fast.heads,
        fast.capacity,
        fast.dh,
    ])
}

fn reference_step<B: Backend>(
    decoder: &TransformerDecoder<B>,
    bias: Tensor<B, 1>,
    tokens: Tensor<B, 1, Int>,
    cache: &mut DecoderCache<B>,
    pad_id: i64,
) -> Tensor<B, 2> {
    let t = cache.step;
    let mut fast = cache.fast.take().expect("a fast cache");
    if t >= fast.capacity {
        // Grows as the kernels do: twice the positions, the written ones copied.
        let view = fast_view(&fast);
        let grown = Tensor::cat(vec![view.clone(), view.zeros_like()], 4);
        fast.capacity *= 2;
        let n = grown.shape().num_elements();
        fast.keys_values = grown.reshape([n]);
    }
    let kv = fast_view(&fast);
    let written = |plane: usize, l: usize| {
        let [_, _, rows, heads, _, dh] = kv.dims();
        kv.clone()
            .slice([l..l + 1, plane..plane + 1, 0..rows, 0..heads, 0..t, 0..dh])
            .reshape([rows, heads, t, dh])
    };
    for (l, layer) in cache.layers.iter_mut().enumerate() {
        layer.self_keys = (t > 0).then(|| written(0, l));
        layer.self_values = (t > 0).then(|| written(1, l));
    }
    let hidden = decoder.step(tokens, cache, pad_id);
    let mut kv = kv;
    for (l, layer) in cache.layers.iter_mut().enumerate() {
        for (plane, part) in [layer.self_keys.take(), layer.self_values.take()]
            .into_iter()
            .enumerate()
        {
            let part = part.expect("the step caches its keys and values");
            let [rows, heads, _, dh] = part.dims();
            let new = part.slice([0..rows, 0..heads, t..t + 1, 0..dh]);
            kv = kv.slice_assign(
                [
                    l..l + 1,
                    plane..plane + 1,
                    0..rows,
                    0..heads,
                    t..t + 1,
                    0..dh,
                ],
                new.unsqueeze::<6>(),
            );
        }
    }
    let n = fast.keys_values.dims()[0];
    fast.keys_values = kv.reshape([n]);
    cache.fast = Some(fast);
    burn::tensor::activation::log_softmax(
        crate::dense::project_onto(hidden, decoder.embeddings.weight.val(), bias),
        1,
    )
}

fn reference_select_rows<B: Backend>(
    fast: &mut FastCache<B>,
    origins: Tensor<B, 1, Int>,
    _len: usize,
) {
    let [rows] = origins.dims();
    let kv = fast_view(fast).select(2, origins);
    fast.rows = rows;
    let n = kv.shape().num_elements();
    fast.keys_values = kv.reshape([n]);
}

impl<B: Backend> DecoderCache<B> {
    /// Number of sources still decoded.
    pub fn sources(&self) -> usize {
        self.src_mask.dims()[0]
    }

    /// Beam-search bookkeeping in one step: keeps the sources `kept` (indices into the current
    /// sources, in order) and makes new row `r` continue from current row `origins[r]`
    /// (`kept.len() × beams` entries). Memory keys/values are selected per source, never per row.
    pub fn select(&mut self, kept: &[usize], origins: &[usize]) {
        let device = self.src_mask.device();
        let to_tensor = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), &device)
        };
        let rows = to_tensor(origins.iter().map(|&r| r as i64).collect());
        let all_sources =
            kept.len() == self.sources() && kept.iter().enumerate().all(|(i, &s)| i == s);
        let sources = (!all_sources).then(|| to_tensor(kept.iter().map(|&s| s as i64).collect()));
        if let Some(src) = &sources {
            self.src_mask = self.src_mask.clone().select(0, src.clone());
            if let Some(fast) = &mut self.fast {
                fast.src_pad = fast.src_pad.clone().select(0, src.clone());
            }
        }
        for l in &mut self.layers {
            if let Some(src) = &sources {
                l.memory_keys = l.memory_keys.clone().select(0, src.clone());
                l.memory_values = l.memory_values.clone().select(0, src.clone());
            }
        }
        self.select_rows(rows);
    }

    /// [`DecoderCache::select`] with every source kept and the row origins `[rows]` on the
    /// device: new row `r` continues from current row `origins[r]`.
    pub fn select_rows(&mut self, origins: Tensor<B, 1, Int>) {
        if let Some(fast) = &mut self.fast {
            let kernels = step_kernels::<B>().expect("a fast cache is made with step kernels");
            (kernels.select_rows)(fast, origins, self.step);
            return;
        }
        for l in &mut self.layers {
            l.self_keys = l.self_keys.take().map(|k| k.select(0, origins.clone()));
            l.self_values = l.self_values.take().map(|v| v.select(0, origins.clone()));
        }
    }
}

impl<B: Backend> TransformerDecoder<B> {
    /// A randomly initialised decoder.
    pub fn new(
        vocab: usize,
        d: usize,
        layers: usize,
        heads: usize,
        ff: usize,
        dropout: f64,
        device: &B::Device,
    ) -> Self {
        let pe = Tensor::from_data(
            TensorData::new(positional_table(MAX_POSITIONS, d), [MAX_POSITIONS, d]),
            device,
        );
        TransformerDecoder {
            embeddings: embedding(vocab, d, device),
            transformer_layers: (0..layers)
                .map(|_| TransformerDecoderLayer::new(d, heads, ff, dropout, device))
                .collect(),
            layer_norm: ln(d, device),
            pe,
            pos_dropout: DropoutConfig::new(dropout).init(),
            d_model: d,
        }
    }

    /// Embeddings × sqrt(d) + positions `start..start+t`, then dropout.
    fn embed(&self, tokens: Tensor<B, 2, Int>, start: usize) -> Tensor<B, 3> {
        let [_, t] = tokens.dims();
        let emb =
            grad::embedding(&self.embeddings, tokens).mul_scalar((self.d_model as f64).sqrt());
        let pos = self.pe.clone().slice(start..start + t).unsqueeze::<3>();
        grad::dropout(&self.pos_dropout, emb + pos)
    }

    /// Teacher-forced decoding of `tgt [b, t]` against `memory [b, s, d]`: the hidden states
    /// after the final LayerNorm, `[b, t, d]`.
    pub fn forward(
        &self,
        tgt: Tensor<B, 2, Int>,
        memory: Tensor<B, 3>,
        src_pad: Tensor<B, 2, Bool>,
        pad_id: i64,
    ) -> Tensor<B, 3> {
        let [b, t] = tgt.dims();
        let device = tgt.device();
        // Key j is hidden from query i when tgt[j] is PAD or j > i.
        let key_pad = tgt
            .clone()
            .equal_elem(pad_id)
            .unsqueeze_dim::<3>(1)
            .expand([b, t, t]);
        let causal = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &device)
            .unsqueeze::<3>()
            .expand([b, t, t]);
        let self_mask = key_pad.bool_or(causal).unsqueeze_dim::<4>(1);
        let src_mask = src_pad.unsqueeze_dims::<4>(&[1, 2]);
        let mut x = self.embed(tgt, 0);
        for layer in &self.transformer_layers {
            x = layer.forward(x, memory.clone(), self_mask.clone(), src_mask.clone());
        }
        norm(&self.layer_norm, x)
    }

    /// A cache for `beams` rows per source; memory keys/values are projected here, once.
    pub fn init_cache(
        &self,
        memory: Tensor<B, 3>,
        src_pad: Tensor<B, 2, Bool>,
        beams: usize,
    ) -> DecoderCache<B> {
        let layers = self
            .transformer_layers
            .iter()
            .map(|l| {
                let (k, v) = l.context_attn.keys_values(memory.clone());
                LayerCache {
                    memory_keys: k,
                    memory_values: v,
                    self_keys: None,
                    self_values: None,
                }
            })
            .collect();
        let mut cache = DecoderCache {
            layers,
            src_mask: src_pad.clone().unsqueeze_dims::<4>(&[1, 2]),
            beams,
            step: 0,
            fast: None,
        };
        if step_kernels::<B>().is_some_and(|k| (k.accepts)(self)) {
            cache.fast = Some(self.fast_cache(src_pad, beams));
        }
        cache
    }

    /// An empty [`FastCache`] for `beams` rows per source of `src_pad [sources, s]`.
    fn fast_cache(&self, src_pad: Tensor<B, 2, Bool>, beams: usize) -> FastCache<B> {
        let [sources, _] = src_pad.dims();
        let layers = self.transformer_layers.len();
        let heads = self
            .transformer_layers
            .first()
            .map_or(1, |l| l.self_attn.heads);
        let dh = self.d_model / heads;
        let rows = sources * beams;
        let capacity = FAST_CACHE_CAPACITY;
        let device = src_pad.device();
        let qkv = self
            .transformer_layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let parts = [&a.linear_query, &a.linear_keys, &a.linear_values];
                let weight = Tensor::cat(parts.iter().map(|p| p.weight.val()).collect(), 1);
                let bias = parts
                    .iter()
                    .map(|p| match &p.bias {
                        Some(b) => b.val(),
                        None => Tensor::zeros([self.d_model], &device),
                    })
                    .collect();
                (weight, Tensor::cat(bias, 0))
            })
            .collect();
        FastCache {
            keys_values: Tensor::empty([layers * 2 * rows * heads * capacity * dh], &device),
            layers,
            rows,
            heads,
            dh,
            capacity,
            qkv,
            src_pad: src_pad.float(),
            slots: None,
        }
    }

    /// The model width.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// The sinusoidal position table `[MAX_POSITIONS, d]`.
    pub fn positions(&self) -> Tensor<B, 2> {
        self.pe.clone()
    }

    /// Feeds one token per row (`[rows]`) at position `cache.step`; returns the hidden state
    /// after the final LayerNorm, `[rows, d]`.
    pub fn step(
        &self,
        tokens: Tensor<B, 1, Int>,
        cache: &mut DecoderCache<B>,
        pad_id: i64,
    ) -> Tensor<B, 2> {
        let [rows] = tokens.dims();
        let tokens = tokens.unsqueeze_dim::<2>(1);
        let input_pad = tokens.clone().equal_elem(pad_id).reshape([rows, 1, 1, 1]);
        let mut x = self.embed(tokens, cache.step);
        let beams = cache.beams;
        let src_mask = cache.src_mask.clone();
        for (layer, lc) in self.transformer_layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.step(x, lc, input_pad.clone(), &src_mask, beams);
        }
        cache.step += 1;
        norm(&self.layer_norm, x).reshape([rows, self.d_model])
    }
}
