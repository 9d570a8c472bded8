//! Layer norm, softmax, tanh-GELU and the smoothed cross-entropy from logits with their
//! backward passes written out for burn's autodiff backend, and dropout with a one-byte mask.
//!
//! burn 0.21 differentiates the first three through their decompositions: a layer norm becomes
//! nine tracked operations, each keeping its inputs (the centred input, the variance, the
//! normalised input …) and each adding passes over the activation to the backward step; a
//! softmax becomes four, and the tanh approximation of GELU seven. Written out, a layer norm
//! keeps the normalised input and the row's standard deviation and needs two row reductions,
//! two column reductions and one element-wise pass backward; a softmax keeps its output and
//! needs one reduction and one pass; GELU keeps its input and needs one pass.
//!
//! The model calls [`layer_norm`], [`softmax`], [`gelu_tanh`] and [`dropout`], the training
//! loss [`smoothed_cross_entropy`]; on a backend where [`install`] put the written-out
//! versions (the autodiff backends a binary trains on) they run, elsewhere burn's own
//! (inference backends, tests of the decompositions). The forward values are the same
//! operations in the same order as burn's. An inference backend may instead get single-kernel
//! forward passes of the first three from the binary ([`set_row_kernels`]).

use burn::nn::{Dropout, LayerNorm};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::gelu_approximate;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{IndexingUpdateOp, TensorPrimitive};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};

use crate::registry::PerBackend;

/// `√(2/π)`, the tanh approximation's scale.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation.
const GELU_CUBIC: f64 = 0.044715;

/// A layer norm of `[rows, d]` with γ, β and ε.
pub type LayerNormFn<B> = fn(Tensor<B, 2>, Tensor<B, 1>, Tensor<B, 1>, f64) -> Tensor<B, 2>;

/// A smoothed cross-entropy of logits `[rows, V]` against ids `[rows]` with the PAD id and ε.
type CrossEntropyFn<B> = fn(Tensor<B, 2>, Tensor<B, 1, Int>, usize, f64) -> Tensor<B, 1>;

/// Layer norm, softmax and tanh-GELU of one backend on `[rows, d]` matrices (the last axis):
/// the written-out autodiff operations of a training backend ([`install`]), or single-kernel
/// forward passes a binary provides for an inference backend ([`set_row_kernels`]).
pub struct RowOps<B: Backend> {
    /// `(x, γ, β, ε)` → the normalised rows, scaled and shifted.
    pub layer_norm: LayerNormFn<B>,
    /// Softmax of each row.
    pub softmax: fn(Tensor<B, 2>) -> Tensor<B, 2>,
    /// [`gelu_tanh`] of every element.
    pub gelu_tanh: fn(Tensor<B, 2>) -> Tensor<B, 2>,
}

/// The written-out operations of one backend.
struct Written<B: Backend> {
    rows: RowOps<B>,
    cross_entropy: CrossEntropyFn<B>,
    add_bias: fn(Tensor<B, 2>, Tensor<B, 1>) -> Tensor<B, 2>,
    lookup: fn(Tensor<B, 2>, Tensor<B, 1, Int>) -> Tensor<B, 2>,
}

// Function pointers are copies whatever `B` is (a derive would ask `B: Copy`).
impl<B: Backend> Clone for RowOps<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for RowOps<B> {}
impl<B: Backend> Clone for Written<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Written<B> {}

static WRITTEN: PerBackend = PerBackend::new();
static ROW_KERNELS: PerBackend = PerBackend::new();
static LAYER_NORMS: PerBackend = PerBackend::new();
static GELUS: PerBackend = PerBackend::new();
static GELU_TANHS: PerBackend = PerBackend::new();
static DROPOUTS: PerBackend = PerBackend::new();

/// Runs [`layer_norm`] on backend `B` through `f` (`None`: the other paths again), before the
/// [`install`]ed or [`set_row_kernels`] ones: a training backend's layer norm as device
/// kernels with their own backward pass, which falls back to [`written_layer_norm`] for
/// inputs it does not take.
pub fn set_layer_norm<B: Backend>(f: Option<LayerNormFn<B>>) {
    LAYER_NORMS.set::<B, _>(f);
}

/// Runs [`layer_norm`], [`softmax`] and [`gelu_tanh`] on backend `B` through `kernels` (`None`:
/// burn's operations again). For inference backends, where burn runs each as a chain of
/// launches (a layer norm about ten, a softmax five, the tanh-GELU seven without fusion) and a
/// beam-search step is bound by the number of launches; a backend with [`install`]ed
/// operations uses those.
pub fn set_row_kernels<B: Backend>(kernels: Option<RowOps<B>>) {
    ROW_KERNELS.set::<B, _>(kernels);
}

/// Whether [`set_row_kernels`] put kernels on `B` (benchmarks report which path they measured).
pub fn has_row_kernels<B: Backend>() -> bool {
    ROW_KERNELS.get::<B, RowOps<B>>().is_some()
}

/// The row operations for `B`: the written-out ones, else the kernels, else none (burn's).
fn row_ops<B: Backend>() -> Option<RowOps<B>> {
    WRITTEN
        .get::<B, Written<B>>()
        .map(|w| w.rows)
        .or_else(|| ROW_KERNELS.get::<B, RowOps<B>>())
}

/// Puts the written-out backward passes on `Autodiff<I>` (`false`: burn's decompositions
/// again).
pub fn install<I: Backend>(on: bool) {
    let written = Written::<Autodiff<I>> {
        rows: RowOps {
            layer_norm: autodiff_layer_norm::<I>,
            softmax: autodiff_softmax::<I>,
            gelu_tanh: autodiff_gelu_tanh::<I>,
        },
        cross_entropy: autodiff_smoothed_cross_entropy::<I>,
        add_bias: autodiff_add_bias::<I>,
        lookup: autodiff_lookup::<I>,
    };
    WRITTEN.set::<Autodiff<I>, _>(on.then_some(written));
}

/// Whether [`install`] put the written-out operations on `B`.
pub fn installed<B: Backend>() -> bool {
    WRITTEN.get::<B, Written<B>>().is_some()
}

/// `[.., d]` as `[rows, d]`, with the original dims to restore.
fn rows<B: Backend, const D: usize>(x: Tensor<B, D>) -> (Tensor<B, 2>, [usize; D]) {
    let dims = x.dims();
    let d = dims[D - 1];
    (
        x.reshape([dims.iter().product::<usize>() / d.max(1), d]),
        dims,
    )
}

/// `ln(x)` over the last axis; `epsilon` must be the one `ln` was made with (burn keeps it
/// private).
pub fn layer_norm<B: Backend, const D: usize>(
    ln: &LayerNorm<B>,
    epsilon: f64,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let f = LAYER_NORMS
        .get::<B, LayerNormFn<B>>()
        .or_else(|| row_ops::<B>().map(|ops| ops.layer_norm));
    match (f, &ln.beta) {
        (Some(f), Some(beta)) => {
            let (x, dims) = rows(x);
            f(x, ln.gamma.val(), beta.val(), epsilon).reshape(dims)
        }
        _ => ln.forward(x),
    }
}

/// `y + bias` for `y [rows, n]` and `bias [n]`. Written out, the bias's gradient is a
/// [`column_sum`] of the output's; burn's broadcast rule sums the `[rows, n]` gradient over
/// its rows in one launch, one thread per four columns, which on the GPU made the 320 bias and
/// layer-norm gradients of a training step 75 of its 360 ms (batch 256, `palm bench --trace`).
pub fn add_bias<B: Backend>(y: Tensor<B, 2>, bias: Tensor<B, 1>) -> Tensor<B, 2> {
    match WRITTEN.get::<B, Written<B>>() {
        Some(w) => (w.add_bias)(y, bias),
        None => y + bias.unsqueeze::<2>(),
    }
}

/// The rows of `table [n, d]` at `ids [b, t]`, `[b, t, d]`: an embedding lookup. Written out
/// on a backend whose products go to a vendor GEMM ([`crate::dense::set_gemm`]), the table's
/// gradient is the product `onehot(ids)ᵀ · g` (`[n, rows] · [rows, d]`) instead of burn's
/// scatter-add, which runs one thread per column over every id: 9 ms per lookup at batch 256
/// on the H200 (`palm bench --trace`), where the product is a few milliseconds of tensor-core
/// work. Elsewhere (the CPU, where that product would cost far more than the scatter) burn's.
pub fn embedding<B: Backend>(
    table: &burn::nn::Embedding<B>,
    ids: Tensor<B, 2, Int>,
) -> Tensor<B, 3> {
    let [b, t] = ids.dims();
    match WRITTEN.get::<B, Written<B>>() {
        Some(w) => {
            let d = table.weight.dims()[1];
            (w.lookup)(table.weight.val(), ids.reshape([b * t])).reshape([b, t, d])
        }
        None => table.forward(ids),
    }
}

/// The sum of `x [rows, n]` over its rows, `[n]`. A reduction over the rows of a row-major
/// matrix runs one thread per column (four with vector loads), each reading every row: a few
/// hundred threads for thousands of rows. With many rows the sum is taken in two stages, over
/// blocks of about √rows rows and then over the blocks' sums, so that the first stage has
/// √rows times the threads and each thread √rows times less to read.
pub fn column_sum<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    let [rows, n] = x.dims();
    let block = column_block(rows);
    if block == 1 {
        return x.sum_dim(0).reshape([n]);
    }
    x.reshape([rows / block, block, n])
        .sum_dim(1)
        .reshape([rows / block, n])
        .sum_dim(0)
        .reshape([n])
}

/// The rows per block of [`column_sum`]'s first stage: the divisor of `rows` nearest to
/// √rows, at least 8, or 1 (one stage) for fewer than 1,024 rows or no such divisor.
fn column_block(rows: usize) -> usize {
    if rows < 1024 {
        return 1;
    }
    // The divisors nearest √rows from below and above are a pair `d`, `rows / d`; called for
    // every bias gradient of a step, so only the divisors up to √rows are tried.
    let root = (rows as f64).sqrt();
    match (8..=rows.isqrt()).rev().find(|d| rows.is_multiple_of(*d)) {
        Some(below) => {
            let above = rows / below;
            if above as f64 - root < root - below as f64 {
                above
            } else {
                below
            }
        }
        None => 1,
    }
}

/// `dropout` in training, with the mask kept for the backward pass as one byte per element
/// (a boolean) where burn's `Dropout` keeps the four-byte float mask it multiplies by: the
/// same random numbers and the same values bit for bit (a kept element is `x · 1/(1 − p)` in
/// both). Through the backend's [`DropoutFn`] where one is set and takes `x`; burn's own where
/// the written-out operations are not installed, or outside training.
pub fn dropout<B: Backend, const D: usize>(dropout: &Dropout, x: Tensor<B, D>) -> Tensor<B, D> {
    if !training::<B, D>(dropout, &x) {
        return dropout.forward(x);
    }
    if let Some(f) = DROPOUTS.get::<B, DropoutFn<B>>() {
        let (rows, dims) = rows(x);
        return match f(rows, None, dropout.prob) {
            Ok(y) => y.reshape(dims),
            Err(operands) => masked_dropout(dropout.prob, operands.0.reshape(dims)),
        };
    }
    masked_dropout(dropout.prob, x)
}

/// `dropout(x) + residual`: through the backend's [`DropoutFn`] as one operation where one is
/// set and takes them (no random tensor and no mask between the passes), else [`dropout`] and
/// an addition.
pub fn dropout_add<B: Backend, const D: usize>(
    dropout: &Dropout,
    x: Tensor<B, D>,
    residual: Tensor<B, D>,
) -> Tensor<B, D> {
    let f = DROPOUTS.get::<B, DropoutFn<B>>();
    match f.filter(|_| training::<B, D>(dropout, &x) && x.dims() == residual.dims()) {
        Some(f) => {
            let (x, dims) = rows(x);
            let (residual, _) = rows(residual);
            match f(x, Some(residual), dropout.prob) {
                Ok(y) => y.reshape(dims),
                Err(operands) => {
                    let (x, residual) = *operands;
                    let residual = residual.expect("handed back as given");
                    masked_dropout(dropout.prob, x.reshape(dims)) + residual.reshape(dims)
                }
            }
        }
        None => self::dropout(dropout, x) + residual,
    }
}

/// Whether [`dropout`] drops anything of `x`: a probability above 0, a backend that tracks
/// gradients on `x`'s device and the written-out operations [`install`]ed.
fn training<B: Backend, const D: usize>(dropout: &Dropout, x: &Tensor<B, D>) -> bool {
    dropout.prob > 0.0 && B::ad_enabled(&x.device()) && installed::<B>()
}

/// Dropout as burn's operations with a one-byte mask (see [`dropout`]).
fn masked_dropout<B: Backend, const D: usize>(prob: f64, x: Tensor<B, D>) -> Tensor<B, D> {
    let keep = 1.0 - prob;
    let dropped = x.random_like(Distribution::Bernoulli(keep)).equal_elem(0.0);
    x.mask_fill(dropped, 0.0) * (1.0 / keep)
}

/// The seeds of dropout drawn from a hash (a backend's [`DropoutFn`], attention kernels): a
/// base seed and the number of seeds taken since it was set.
static DROPOUT_SEEDS: std::sync::Mutex<(u64, u64)> = std::sync::Mutex::new((0, 0));

/// Restarts the stream of [`next_dropout_seed`] from `seed`. A training loop calls it beside
/// burn's `B::seed` before every forward pass, so that kernels drawing their own dropout
/// decisions follow the run's seed, and a resumed run draws what the uninterrupted one drew.
pub fn seed_dropout(seed: u64) {
    *DROPOUT_SEEDS.lock().unwrap_or_else(|e| e.into_inner()) = (seed, 0);
}

/// The next seed for a kernel that draws dropout from a hash of each element's index: one per
/// call, from the base [`seed_dropout`] set and the number of calls since (SplitMix64's
/// finaliser over both).
pub fn next_dropout_seed() -> u32 {
    let mut seeds = DROPOUT_SEEDS.lock().unwrap_or_else(|e| e.into_inner());
    let (base, calls) = *seeds;
    seeds.1 = calls.wrapping_add(1);
    let mut z = base ^ calls.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// Training dropout of `x [rows, d]` with probability `p`, plus `residual` (same shape) where
/// given, as one operation of a backend, forward and backward (a binary's kernels that draw
/// each element's decision from a hash and keep no mask). It hands back (`Err`) what it does
/// not take. Kept elements are `x · 1/(1 − p)`, as in [`dropout`]; which are kept follows the
/// backend's own random stream.
pub type DropoutFn<B> =
    fn(Tensor<B, 2>, Option<Tensor<B, 2>>, f64) -> Result<Tensor<B, 2>, DroppedBack<B>>;

/// The operands a [`DropoutFn`] hands back.
pub type DroppedBack<B> = Box<(Tensor<B, 2>, Option<Tensor<B, 2>>)>;

/// Runs training [`dropout`] and [`dropout_add`] on backend `B` through `f` (`None`: burn's
/// operations again).
pub fn set_dropout<B: Backend>(f: Option<DropoutFn<B>>) {
    DROPOUTS.set::<B, _>(f);
}

/// Softmax over the last axis.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match row_ops::<B>() {
        Some(ops) => {
            let (x, dims) = rows(x);
            (ops.softmax)(x).reshape(dims)
        }
        None => burn::tensor::activation::softmax(x, D - 1),
    }
}

/// GELU of `[rows, d]` as one operation of a backend, forward and backward (a binary's
/// kernels); it hands back (`Err`) what it does not take.
pub type GeluFn<B> = fn(Tensor<B, 2>) -> Result<Tensor<B, 2>, Box<Tensor<B, 2>>>;

/// Computes [`gelu`] on backend `B` through `f` (`None`: burn's `gelu` again).
pub fn set_gelu<B: Backend>(f: Option<GeluFn<B>>) {
    GELUS.set::<B, _>(f);
}

/// GELU, `x/2 · (1 + erf(x/√2))` (BERT's): through the backend's [`GeluFn`] where one is set
/// and takes `x`, else burn's `gelu`.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let Some(f) = GELUS.get::<B, GeluFn<B>>() else {
        return burn::tensor::activation::gelu(x);
    };
    let (x, dims) = rows(x);
    match f(x) {
        Ok(y) => y.reshape(dims),
        Err(x) => burn::tensor::activation::gelu(x.reshape(dims)),
    }
}

/// Computes [`gelu_tanh`] on backend `B` through `f` before its other paths (`None`: those
/// again): a training backend's kernels, forward and backward.
pub fn set_gelu_tanh<B: Backend>(f: Option<GeluFn<B>>) {
    GELU_TANHS.set::<B, _>(f);
}

/// GELU's tanh approximation, `x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))`: through the
/// backend's [`set_gelu_tanh`] function where one is set and takes `x`, else the row
/// operations or burn's.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x = match GELU_TANHS.get::<B, GeluFn<B>>() {
        Some(f) => {
            let (rows, dims) = rows(x);
            match f(rows) {
                Ok(y) => return y.reshape(dims),
                Err(x) => x.reshape(dims),
            }
        }
        None => x,
    };
    match row_ops::<B>() {
        Some(ops) => {
            let (x, dims) = rows(x);
            (ops.gelu_tanh)(x).reshape(dims)
        }
        None => gelu_approximate(x),
    }
}

/// Per row of logits `z [rows, V]`, the cross-entropy `−Σ_v q_v log softmax(z)_v` against the
/// smoothed target of `gold [rows]`: `1 − ε` on the gold id, `ε / (V − 2)` on every other id
/// but `pad`, 0 on `pad` (ε = 0: the gold id's negative log-probability). Rows whose gold id
/// is `pad` get a value the caller must mask. `None` where [`install`] did not put the
/// written-out version on `B` (the caller then uses its own decomposition).
///
/// Written out, its backward pass is one element-wise pass over the logits,
/// `g · (softmax(z) − q)`, where the decomposition scatters and slices into `[rows, V]` zeros
/// and sums four such tensors.
pub fn smoothed_cross_entropy<B: Backend>(
    z: Tensor<B, 2>,
    gold: Tensor<B, 1, Int>,
    pad: usize,
    smoothing: f64,
) -> Option<Tensor<B, 1>> {
    WRITTEN
        .get::<B, Written<B>>()
        .map(|w| (w.cross_entropy)(z, gold, pad, smoothing))
}

/// The smoothed target's weights: (on the gold id, on every other id but PAD).
fn target_weights(smoothing: f64, vocab: usize) -> (f64, f64) {
    let other = if smoothing > 0.0 {
        smoothing / (vocab as f64 - 2.0)
    } else {
        0.0
    };
    (1.0 - smoothing, other)
}

fn wrap<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// burn's layer norm forward on the inner backend, with what the backward pass needs: the
/// normalised input and the row's `√(var + ε)`.
/// A layer norm of `[rows, d]` through burn's operations (as burn's `LayerNorm` computes it):
/// what a [`RowOps`] kernel falls back to for inputs it does not take.
pub fn burn_layer_norm<B: Backend>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, 2> {
    layer_norm_parts(x, gamma, beta, epsilon).0
}

fn layer_norm_parts<I: Backend>(
    x: Tensor<I, 2>,
    gamma: Tensor<I, 1>,
    beta: Tensor<I, 1>,
    epsilon: f64,
) -> (Tensor<I, 2>, Tensor<I, 2>, Tensor<I, 2>) {
    let mean = x.clone().mean_dim(1);
    let centered = x - mean;
    let var = (centered.clone() * centered.clone()).mean_dim(1);
    let denom = var.add_scalar(epsilon).sqrt();
    let normalized = centered / denom.clone();
    let y = normalized.clone() * gamma.unsqueeze::<2>() + beta.unsqueeze::<2>();
    (y, normalized, denom)
}

/// The layer norm with its backward pass written out in burn's operations (what [`install`]
/// puts on `Autodiff<I>`), for a [`set_layer_norm`] function to fall back to.
pub fn written_layer_norm<I: Backend>(
    x: Tensor<Autodiff<I>, 2>,
    gamma: Tensor<Autodiff<I>, 1>,
    beta: Tensor<Autodiff<I>, 1>,
    epsilon: f64,
) -> Tensor<Autodiff<I>, 2> {
    autodiff_layer_norm::<I>(x, gamma, beta, epsilon)
}

fn autodiff_layer_norm<I: Backend>(
    x: Tensor<Autodiff<I>, 2>,
    gamma: Tensor<Autodiff<I>, 1>,
    beta: Tensor<Autodiff<I>, 1>,
    epsilon: f64,
) -> Tensor<Autodiff<I>, 2> {
    #[derive(Debug)]
    struct LayerNormBackward;

    impl<I: Backend> Backward<I, 3> for LayerNormBackward {
        /// The normalised input, `√(var + ε)` per row and γ.
        type State = (FloatTensor<I>, FloatTensor<I>, FloatTensor<I>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g: Tensor<I, 2> = wrap(grads.consume::<I>(&ops.node));
            let (normalized, denom, gamma) = ops.state;
            let (normalized, denom) = (wrap::<I, 2>(normalized), wrap::<I, 2>(denom));
            let [x, gamma_node, beta_node] = ops.parents;
            if let Some(node) = beta_node {
                grads.register::<I>(node.id, prim(column_sum(g.clone())));
            }
            if let Some(node) = gamma_node {
                let dgamma = column_sum(g.clone() * normalized.clone());
                grads.register::<I>(node.id, prim(dgamma));
            }
            if let Some(node) = x {
                // dx = (ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)) / σ with ĝ = g γ, per row.
                let gn = g * wrap::<I, 1>(gamma).unsqueeze::<2>();
                let mean_g = gn.clone().mean_dim(1);
                let mean_gx = (gn.clone() * normalized.clone()).mean_dim(1);
                let dx = (gn - mean_g - normalized * mean_gx) / denom;
                grads.register::<I>(node.id, prim(dx));
            }
        }
    }

    let (xp, gp, bp) = (
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.into_primitive().tensor(),
    );
    let (y, normalized, denom) = layer_norm_parts::<I>(
        wrap(xp.primitive.clone()),
        wrap(gp.primitive.clone()),
        wrap(bp.primitive.clone()),
        epsilon,
    );
    let out = match LayerNormBackward
        .prepare::<NoCheckpointing>([xp.node.clone(), gp.node.clone(), bp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (prim(normalized), prim(denom), gp.primitive.clone()),
            prim(y),
        ),
        OpsKind::UnTracked(prep) => prep.finish(prim(y)),
    };
    wrap(out)
}

fn autodiff_softmax<I: Backend>(x: Tensor<Autodiff<I>, 2>) -> Tensor<Autodiff<I>, 2> {
    #[derive(Debug)]
    struct SoftmaxBackward;

    impl<I: Backend> Backward<I, 1> for SoftmaxBackward {
        /// The output.
        type State = FloatTensor<I>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g: Tensor<I, 2> = wrap(grads.consume::<I>(&ops.node));
            let [x] = ops.parents;
            if let Some(node) = x {
                // dx = y (g − Σ g y), per row.
                let y: Tensor<I, 2> = wrap(ops.state);
                let dot = (g.clone() * y.clone()).sum_dim(1);
                grads.register::<I>(node.id, prim(y * (g - dot)));
            }
        }
    }

    let xp = x.into_primitive().tensor();
    let y = burn::tensor::activation::softmax(wrap::<I, 2>(xp.primitive.clone()), 1);
    let out = match SoftmaxBackward
        .prepare::<NoCheckpointing>([xp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = prim(y);
            prep.finish(y.clone(), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(y)),
    };
    wrap(out)
}

fn autodiff_gelu_tanh<I: Backend>(x: Tensor<Autodiff<I>, 2>) -> Tensor<Autodiff<I>, 2> {
    #[derive(Debug)]
    struct GeluTanhBackward;

    impl<I: Backend> Backward<I, 1> for GeluTanhBackward {
        /// The input.
        type State = FloatTensor<I>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g: Tensor<I, 2> = wrap(grads.consume::<I>(&ops.node));
            let [parent] = ops.parents;
            if let Some(node) = parent {
                // With t = tanh(u), u = c (x + a x³):
                // d/dx = (1 + t)/2 + x/2 · (1 − t²) · c (1 + 3a x²).
                let x: Tensor<I, 2> = wrap(ops.state);
                let x2 = x.clone() * x.clone();
                let u = (x.clone() + x.clone() * x2.clone() * GELU_CUBIC) * SQRT_2_OVER_PI;
                let t = u.tanh();
                let du = (x2 * (3.0 * GELU_CUBIC) + 1.0) * SQRT_2_OVER_PI;
                let d = (t.clone() + 1.0) * 0.5 + x * 0.5 * (-(t.clone() * t) + 1.0) * du;
                grads.register::<I>(node.id, prim(g * d));
            }
        }
    }

    let xp = x.into_primitive().tensor();
    let y = prim(gelu_approximate(wrap::<I, 2>(xp.primitive.clone())));
    let out = match GeluTanhBackward
        .prepare::<NoCheckpointing>([xp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(xp.primitive.clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    wrap(out)
}

fn autodiff_add_bias<I: Backend>(
    y: Tensor<Autodiff<I>, 2>,
    bias: Tensor<Autodiff<I>, 1>,
) -> Tensor<Autodiff<I>, 2> {
    #[derive(Debug)]
    struct AddBiasBackward;

    impl<I: Backend> Backward<I, 2> for AddBiasBackward {
        type State = ();

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g: Tensor<I, 2> = wrap(grads.consume::<I>(&ops.node));
            let [y, bias] = ops.parents;
            if let Some(node) = bias {
                grads.register::<I>(node.id, prim(column_sum(g.clone())));
            }
            if let Some(node) = y {
                grads.register::<I>(node.id, prim(g));
            }
        }
    }

    let (yp, bp) = (y.into_primitive().tensor(), bias.into_primitive().tensor());
    let out = prim(
        wrap::<I, 2>(yp.primitive.clone()) + wrap::<I, 1>(bp.primitive.clone()).unsqueeze::<2>(),
    );
    wrap(
        AddBiasBackward
            .prepare::<NoCheckpointing>([yp.node.clone(), bp.node.clone()])
            .compute_bound()
            .stateless(out),
    )
}

fn autodiff_lookup<I: Backend>(
    table: Tensor<Autodiff<I>, 2>,
    ids: Tensor<Autodiff<I>, 1, Int>,
) -> Tensor<Autodiff<I>, 2> {
    #[derive(Debug)]
    struct LookupBackward;

    impl<I: Backend> Backward<I, 1> for LookupBackward {
        /// The ids and the table's rows.
        type State = (burn::tensor::ops::IntTensor<I>, usize);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g: Tensor<I, 2> = wrap(grads.consume::<I>(&ops.node));
            let [parent] = ops.parents;
            if let Some(node) = parent {
                let (ids, n) = ops.state;
                let ids = Tensor::<I, 1, Int>::from_primitive(ids);
                grads.register::<I>(node.id, prim(lookup_gradient(ids, g, n)));
            }
        }
    }

    let [rows] = ids.dims();
    if !crate::dense::has_gemm::<I>() {
        // burn's own backward (the scatter-add), through burn's autodiff operation.
        let [_, d] = table.dims();
        return burn::tensor::module::embedding(table, ids.reshape([1, rows])).reshape([rows, d]);
    }
    let ids = ids.inner();
    let tp = table.into_primitive().tensor();
    let [n, d] = wrap::<I, 2>(tp.primitive.clone()).dims();
    let y = prim(
        burn::tensor::module::embedding(
            wrap::<I, 2>(tp.primitive.clone()),
            ids.clone().reshape([1, rows]),
        )
        .reshape([rows, d]),
    );
    match LookupBackward
        .prepare::<NoCheckpointing>([tp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => wrap(prep.finish((ids.into_primitive(), n), y)),
        OpsKind::UnTracked(prep) => wrap(prep.finish(y)),
    }
}

/// The gradient of an `n`-row table from the gradient `g [rows, d]` of its rows at `ids
/// [rows]`: `onehot(ids)ᵀ · g`, one product (`[n, rows] · [rows, d]`). The one-hot matrix is
/// made in the product type as zeros with a one scattered per row (a fill and a launch over
/// the rows): comparing every id with every column and casting, as a first version did, made
/// three passes over the `[rows, n]` matrix, 2.6 ms each at batch 256.
fn lookup_gradient<I: Backend>(ids: Tensor<I, 1, Int>, g: Tensor<I, 2>, n: usize) -> Tensor<I, 2> {
    let [rows] = ids.dims();
    let device = g.device();
    let dtype = crate::dense::product_dtype().map_or(g.dtype(), Into::into);
    let onehot = Tensor::<I, 2>::zeros([rows, n], (&device, dtype)).scatter(
        1,
        ids.reshape([rows, 1]),
        Tensor::ones([rows, 1], (&device, dtype)),
        IndexingUpdateOp::Add,
    );
    // In the gradient's type: the product returns in the one-hot matrix's.
    let own = g.dtype();
    crate::dense::product_2d(onehot.transpose(), g).cast(own)
}

fn autodiff_smoothed_cross_entropy<I: Backend>(
    z: Tensor<Autodiff<I>, 2>,
    gold: Tensor<Autodiff<I>, 1, Int>,
    pad: usize,
    smoothing: f64,
) -> Tensor<Autodiff<I>, 1> {
    #[derive(Debug)]
    struct CrossEntropyBackward;

    impl<I: Backend> Backward<I, 1> for CrossEntropyBackward {
        /// The logits, their row log-sum-exp `[rows, 1]`, the gold ids, PAD and ε.
        type State = (
            FloatTensor<I>,
            FloatTensor<I>,
            burn::tensor::ops::IntTensor<I>,
            usize,
            f64,
        );

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g: Tensor<I, 1> = wrap(grads.consume::<I>(&ops.node));
            let [parent] = ops.parents;
            let Some(node) = parent else { return };
            let (z, lse, gold, pad, smoothing) = ops.state;
            let (z, lse) = (wrap::<I, 2>(z), wrap::<I, 2>(lse));
            let gold = Tensor::<I, 1, Int>::from_primitive(gold);
            let [rows, vocab] = z.dims();
            let (on_gold, other) = target_weights(smoothing, vocab);
            let device = z.device();
            // dz = softmax(z) − q, with q = s everywhere, then 0 on PAD (a [1, V] row) and
            // 1 − ε on the gold id (a scatter of one value per row): no [rows, V] target is
            // formed. A gold PAD row is masked by the caller, so its target does not matter.
            let pad_row = Tensor::<I, 1, Int>::arange(0..vocab as i64, &device)
                .equal_elem(pad as i64)
                .float()
                .unsqueeze::<2>()
                * other;
            let dz = (z - lse).exp() - other + pad_row;
            let dz = dz.scatter(
                1,
                gold.unsqueeze_dim::<2>(1),
                Tensor::full([rows, 1], other - on_gold, &device),
                IndexingUpdateOp::Add,
            ) * g.unsqueeze_dim::<2>(1);
            grads.register::<I>(node.id, prim(dz));
        }
    }

    let zp = z.into_primitive().tensor();
    let gold = Tensor::<I, 1, Int>::from_primitive(gold.into_primitive());
    let z_inner: Tensor<I, 2> = wrap(zp.primitive.clone());
    let [rows, vocab] = z_inner.dims();
    let (on_gold, other) = target_weights(smoothing, vocab);
    let max = z_inner.clone().max_dim(1);
    let lse = (z_inner.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let z_gold = z_inner
        .clone()
        .gather(1, gold.clone().unsqueeze_dim::<2>(1));
    // −Σ q (z − lse) = lse · Σq − Σ q z, and Σq = 1 on the rows that count.
    let mut ce = lse.clone() - z_gold.clone() * on_gold;
    if other > 0.0 {
        let z_pad = z_inner.clone().slice(s![.., pad..pad + 1]);
        let rest = z_inner.clone().sum_dim(1) - z_gold - z_pad;
        ce = ce - rest * other;
    }
    let ce = prim(ce.reshape([rows]));
    let out = match CrossEntropyBackward
        .prepare::<NoCheckpointing>([zp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (
                zp.primitive.clone(),
                prim(lse),
                gold.into_primitive(),
                pad,
                smoothing,
            ),
            ce,
        ),
        OpsKind::UnTracked(prep) => prep.finish(ce),
    };
    wrap(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LayerNormConfig;
    use burn::tensor::Distribution;
    use burn::tensor::Tolerance;
    use burn_ndarray::{NdArray, NdArrayDevice};

    use std::sync::Mutex;

    /// A backend type no other test of the crate uses (installing is process-wide), and a
    /// lock so that these tests do not install at once. Tensors are f32 all the same (burn's
    /// default float type), so the written-out and decomposed gradients agree to rounding.
    type I = NdArray<f64>;
    type A = Autodiff<I>;
    static LOCK: Mutex<()> = Mutex::new(());

    /// `f` with burn's decompositions and with the written-out backward passes: the values and
    /// the gradients of the input and of `params` (all tracked) must agree.
    fn same_values_and_gradients<const D: usize>(
        input: Tensor<A, D>,
        params: Vec<Tensor<A, 1>>,
        f: impl Fn(Tensor<A, D>, &[Tensor<A, 1>]) -> Tensor<A, D>,
    ) {
        same_within(2e-6, input, params, f);
    }

    /// [`same_values_and_gradients`] within an absolute `tolerance`: sums over many rows
    /// taken in another order (a [`column_sum`] in two stages) differ by f32 rounding.
    fn same_within<const D: usize>(
        tolerance: f64,
        input: Tensor<A, D>,
        params: Vec<Tensor<A, 1>>,
        f: impl Fn(Tensor<A, D>, &[Tensor<A, 1>]) -> Tensor<A, D>,
    ) {
        let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let run = |written: bool| {
            install::<I>(written);
            assert_eq!(installed::<A>(), written);
            let x = input.clone().detach().require_grad();
            let ps: Vec<_> = params
                .iter()
                .map(|p| p.clone().detach().require_grad())
                .collect();
            let y = f(x.clone(), &ps);
            // A loss that weighs every output differently, so no gradient cancels out (fixed
            // numbers: the backend's random generator is shared with concurrent tests).
            let n = y.shape().num_elements();
            let w: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let weights = Tensor::<A, 1>::from_data(TensorData::new(w, [n]), &y.device());
            let grads = (y.clone() * weights.reshape(y.dims())).sum().backward();
            let mut all = vec![x.grad(&grads).expect("input gradient").into_data()];
            all.extend(
                ps.iter()
                    .map(|p| p.grad(&grads).expect("gradient").into_data()),
            );
            (y.into_data(), all)
        };
        let (y_burn, g_burn) = run(false);
        let (y_written, g_written) = run(true);
        install::<I>(false);
        let tolerance = Tolerance::absolute(tolerance);
        y_written.assert_approx_eq::<f32>(&y_burn, tolerance);
        assert_eq!(g_written.len(), g_burn.len());
        for (w, b) in g_written.iter().zip(&g_burn) {
            w.assert_approx_eq::<f32>(b, tolerance);
        }
    }

    fn normal<const D: usize>(shape: [usize; D], scale: f64) -> Tensor<A, D> {
        Tensor::random(shape, Distribution::Normal(0.0, scale), &NdArrayDevice::Cpu)
    }

    #[test]
    fn gelus_set_for_a_backend_take_what_they_accept_and_hand_back_the_rest() {
        // Its own backend type: no other test sets a GELU for it.
        type H = NdArray<f64, i16>;
        // Takes rows of 3 (answering with zeros), hands back the rest.
        fn rows_of_three(x: Tensor<H, 2>) -> Result<Tensor<H, 2>, Box<Tensor<H, 2>>> {
            if x.dims()[1] != 3 {
                return Err(Box::new(x));
            }
            Ok(x.zeros_like())
        }
        let device = Default::default();
        let x =
            |d: usize| Tensor::<H, 3>::random([2, 4, d], Distribution::Normal(0.0, 1.0), &device);
        set_gelu::<H>(Some(rows_of_three));
        let (three, five) = (x(3), x(5));
        assert_eq!(
            gelu(three).abs().max().into_scalar(),
            0.0,
            "the backend's answer"
        );
        gelu(five.clone())
            .into_data()
            .assert_eq(&burn::tensor::activation::gelu(five).into_data(), true);
        set_gelu::<H>(None);
        // The tanh approximation's hook alike.
        set_gelu_tanh::<H>(Some(rows_of_three));
        let (three, five) = (x(3), x(5));
        assert_eq!(gelu_tanh(three).abs().max().into_scalar(), 0.0);
        gelu_tanh(five.clone())
            .into_data()
            .assert_eq(&gelu_approximate(five).into_data(), true);
        set_gelu_tanh::<H>(None);
    }

    #[test]
    fn a_layer_norm_set_for_a_backend_runs_until_unset() {
        // Its own backend type (i16 indices): no other test sets a layer norm for it.
        type G = NdArray<f32, i16>;
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn counted(
            x: Tensor<G, 2>,
            gamma: Tensor<G, 1>,
            beta: Tensor<G, 1>,
            epsilon: f64,
        ) -> Tensor<G, 2> {
            CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            burn_layer_norm(x, gamma, beta, epsilon)
        }
        let device = NdArrayDevice::Cpu;
        let ln = LayerNormConfig::new(6)
            .with_epsilon(1e-6)
            .init::<G>(&device);
        let x = Tensor::<G, 3>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), &device);
        let plain = layer_norm(&ln, 1e-6, x.clone()).into_data();
        set_layer_norm::<G>(Some(counted));
        let set = layer_norm(&ln, 1e-6, x.clone());
        assert_eq!(set.dims(), [2, 3, 6]);
        set.into_data()
            .assert_approx_eq::<f32>(&plain, Tolerance::absolute(1e-6));
        assert_eq!(CALLS.load(std::sync::atomic::Ordering::Relaxed), 1);
        set_layer_norm::<G>(None);
        layer_norm(&ln, 1e-6, x);
        assert_eq!(CALLS.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn layer_norm_has_burns_values_and_gradients() {
        let ln = LayerNormConfig::new(24)
            .with_epsilon(1e-6)
            .init::<A>(&NdArrayDevice::Cpu);
        // 15 rows, and 1,200 (γ's and β's gradients then summed in two stages).
        for (rows, tolerance) in [(5, 2e-6), (400, 2e-4)] {
            let (gamma, beta) = (normal([24], 1.0).add_scalar(1.0), normal([24], 0.5));
            same_within(
                tolerance,
                normal([3, rows, 24], 2.0).add_scalar(0.3),
                vec![gamma, beta],
                |x, p| {
                    let mut ln = ln.clone();
                    ln.gamma = burn::module::Param::from_tensor(p[0].clone());
                    ln.beta = Some(burn::module::Param::from_tensor(p[1].clone()));
                    layer_norm(&ln, 1e-6, x)
                },
            );
        }
    }

    #[test]
    fn add_bias_has_burns_values_and_gradients() {
        // Bias gradients of sums over up to 2,048 weights of magnitude ≤ 1.
        for rows in [3, 2048, 1031] {
            same_within(
                1e-4,
                normal([rows, 6], 1.0),
                vec![normal([6], 1.0)],
                |x, p| add_bias(x, p[0].clone()),
            );
        }
    }

    #[test]
    fn lookup_gradient_by_product_equals_burns_scatter() {
        let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let device = NdArrayDevice::Cpu;
        // Row 3 picked three times, row 2 and 5 never.
        let ids = Tensor::<A, 2, Int>::from_data(
            TensorData::new(vec![3i64, 1, 3, 0, 4, 3], [2, 3]),
            &device,
        );
        let table = normal([6, 5], 1.0);
        let run = |written: bool| {
            install::<I>(written);
            let gemm: crate::dense::Gemm<I> = |a, b| a.matmul(b);
            crate::dense::set_gemm::<I>(written.then_some(gemm));
            let mut emb = burn::nn::EmbeddingConfig::new(6, 5).init::<A>(&device);
            emb.weight = burn::module::Param::from_tensor(table.clone().detach().require_grad());
            let y = embedding(&emb, ids.clone());
            let w: Vec<f32> = (0..30)
                .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let weights = Tensor::<A, 1>::from_data(TensorData::new(w, [30]), &device);
            let grads = (y.clone() * weights.reshape([2, 3, 5])).sum().backward();
            let g = emb.weight.val().grad(&grads).expect("table gradient");
            assert_eq!(g.dtype(), table.dtype(), "the gradient in the table's type");
            (y.into_data(), g.into_data())
        };
        let (y_burn, g_burn) = run(false);
        let (y_written, g_written) = run(true);
        install::<I>(false);
        crate::dense::set_gemm::<I>(None);
        y_written.assert_eq(&y_burn, true);
        g_written.assert_approx_eq::<f32>(&g_burn, Tolerance::absolute(1e-6));
        let rows: Vec<f32> = g_written.iter::<f32>().collect();
        assert!(
            rows[10..15].iter().all(|&v| v == 0.0),
            "an unused row has no gradient"
        );
        assert!(rows[15..20].iter().any(|&v| v != 0.0));
    }

    #[test]
    fn column_sums_are_taken_in_blocks_of_about_root_rows() {
        assert_eq!(column_block(16384), 128);
        assert_eq!(column_block(32768), 128);
        assert_eq!(column_block(1200), 30);
        assert_eq!(column_block(1000), 1, "few rows: one stage");
        assert_eq!(column_block(1031), 1, "a prime: one stage");
        let x = normal([2048, 5], 1.0);
        column_sum(x.clone()).into_data().assert_approx_eq::<f64>(
            &x.sum_dim(0).reshape([5]).into_data(),
            Tolerance::absolute(5e-4),
        );
    }

    #[test]
    fn softmax_has_burns_values_and_gradients() {
        // Attention-like scores, masked keys included.
        let x = normal([2, 3, 4, 9], 3.0);
        let mask = normal([2, 1, 1, 9], 1.0).greater_elem(1.0);
        same_values_and_gradients(x, vec![], |x, _| {
            softmax(x.mask_fill(mask.clone().expand([2, 3, 4, 9]), -1e18))
        });
    }

    #[test]
    fn gelu_tanh_has_burns_values_and_gradients() {
        same_values_and_gradients(normal([4, 33], 3.0), vec![], |x, _| gelu_tanh(x));
    }

    #[test]
    fn smoothed_cross_entropy_has_the_decompositions_values_and_gradients() {
        let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let device = NdArrayDevice::Cpu;
        let (rows, vocab, pad) = (6, 9, 0);
        // Row 3's gold id is PAD: masked below, as the loss masks it.
        let ids = vec![4i64, 1, 8, 0, 2, 4];
        let gold = Tensor::<A, 1, Int>::from_data(TensorData::new(ids.clone(), [rows]), &device);
        let keep: Vec<f32> = ids.iter().map(|&i| f32::from(i != 0)).collect();
        let keep = Tensor::<A, 1>::from_data(TensorData::new(keep, [rows]), &device);
        for smoothing in [0.0, 0.1] {
            let (on_gold, other) = target_weights(smoothing, vocab);
            // q as a dense tensor: the decomposition's target.
            let mut q = vec![0.0f32; rows * vocab];
            for (r, &g) in ids.iter().enumerate() {
                for v in 0..vocab {
                    q[r * vocab + v] = if v == g as usize {
                        on_gold as f32
                    } else if v == pad {
                        0.0
                    } else {
                        other as f32
                    };
                }
            }
            let q = Tensor::<A, 2>::from_data(TensorData::new(q, [rows, vocab]), &device);
            let z0 = normal([rows, vocab], 3.0);
            let run = |written: bool| {
                install::<I>(written);
                let z = z0.clone().detach().require_grad();
                let ce = if written {
                    smoothed_cross_entropy(z.clone(), gold.clone(), pad, smoothing)
                        .expect("installed")
                } else {
                    assert!(smoothed_cross_entropy(z.clone(), gold.clone(), pad, 0.1).is_none());
                    let lp = burn::tensor::activation::log_softmax(z.clone(), 1);
                    (lp * q.clone()).sum_dim(1).reshape([rows]).neg()
                };
                let ce = ce * keep.clone();
                // Different upstream gradients per row, as a weighted mean would give.
                let w = Tensor::<A, 1>::from_data(
                    TensorData::new(vec![1.0f32, -2.0, 0.5, 3.0, 1.5, -1.0], [rows]),
                    &device,
                );
                let grads = (ce.clone() * w).sum().backward();
                (
                    ce.into_data(),
                    z.grad(&grads).expect("gradient").into_data(),
                )
            };
            let (ce_burn, g_burn) = run(false);
            let (ce_written, g_written) = run(true);
            install::<I>(false);
            let tolerance = Tolerance::absolute(2e-5);
            ce_written.assert_approx_eq::<f32>(&ce_burn, tolerance);
            g_written.assert_approx_eq::<f32>(&g_burn, tolerance);
        }
    }

    #[test]
    fn dropout_zeroes_or_scales_each_element_and_its_gradient_alike() {
        let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        install::<I>(true);
        let p = 0.3;
        let n = 4000;
        let x0: Vec<f32> = (0..n).map(|i| (i % 17) as f32 / 4.0 + 0.5).collect();
        // f32 whatever the device's default float type: the CPU device's is set by the first
        // backend to use it (f32 or this test's f64), which made this test fail when it ran
        // first.
        let x = Tensor::<A, 1>::from_data(TensorData::new(x0.clone(), [n]), &NdArrayDevice::Cpu)
            .cast(burn::tensor::FloatDType::F32)
            .require_grad();
        let y = dropout(&burn::nn::DropoutConfig::new(p).init(), x.clone());
        let g = x
            .grad(&(y.clone() * 2.0).sum().backward())
            .expect("gradient");
        install::<I>(false);
        let y: Vec<f32> = y.into_data().to_vec().expect("f32");
        let g: Vec<f32> = g.into_data().to_vec().expect("f32");
        let scale = (1.0 / (1.0 - p)) as f32;
        let mut dropped = 0;
        for i in 0..n {
            if y[i] == 0.0 {
                dropped += 1;
                assert_eq!(g[i], 0.0, "a dropped element passes no gradient");
            } else {
                assert_eq!(y[i], x0[i] * scale);
                assert_eq!(g[i], 2.0 * scale);
            }
        }
        // 1,200 expected; four standard deviations are ±116.
        assert!((1084..=1316).contains(&dropped), "{dropped} of {n} dropped");
    }

    #[test]
    fn dropout_add_drops_only_the_first_operand_and_passes_the_residual_its_gradient() {
        let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        install::<I>(true);
        let (p, n) = (0.25, 2000);
        let device = NdArrayDevice::Cpu;
        let x0: Vec<f32> = (0..n).map(|i| (i % 13) as f32 / 2.0 + 1.0).collect();
        let r0: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.5).collect();
        let leaf = |v: &[f32]| {
            Tensor::<A, 2>::from_data(TensorData::new(v.to_vec(), [n / 4, 4]), &device)
                .cast(burn::tensor::FloatDType::F32)
                .require_grad()
        };
        let (x, r) = (leaf(&x0), leaf(&r0));
        let y = dropout_add(
            &burn::nn::DropoutConfig::new(p).init(),
            x.clone(),
            r.clone(),
        );
        let grads = (y.clone() * 3.0).sum().backward();
        let (gx, gr) = (x.grad(&grads).expect("dx"), r.grad(&grads).expect("dr"));
        install::<I>(false);
        let vec = |t: Tensor<I, 2>| -> Vec<f32> { t.into_data().to_vec().expect("f32") };
        let (y, gx, gr) = (vec(y.inner()), vec(gx), vec(gr));
        let scale = (1.0 / (1.0 - p)) as f32;
        let mut dropped = 0;
        for i in 0..n {
            assert_eq!(gr[i], 3.0, "the residual's gradient passes through");
            if y[i] == r0[i] {
                dropped += 1;
                assert_eq!(gx[i], 0.0);
            } else {
                assert_eq!(y[i], x0[i] * scale + r0[i]);
                assert_eq!(gx[i], 3.0 * scale);
            }
        }
        // 500 expected; four standard deviations are ±78.
        assert!((422..=578).contains(&dropped), "{dropped} of {n} dropped");
    }

    #[test]
    fn a_dropout_set_for_a_backend_runs_in_training_and_hands_back_what_it_does_not_take() {
        // Its own backend type (i32 indices): no other test sets a dropout for it.
        type J = NdArray<f32, i32>;
        type T = Autodiff<J>;
        // Takes a dropout with a residual (answering twice the residual), hands back the rest.
        fn with_residual(
            x: Tensor<T, 2>,
            residual: Option<Tensor<T, 2>>,
            _: f64,
        ) -> Result<Tensor<T, 2>, DroppedBack<T>> {
            match residual {
                Some(r) => Ok(r * 2.0),
                None => Err(Box::new((x, None))),
            }
        }
        let device = Default::default();
        let ones = Tensor::<T, 3>::ones([2, 3, 4], &device);
        let drop = burn::nn::DropoutConfig::new(0.5).init();
        set_dropout::<T>(Some(with_residual));
        // The written-out operations not installed: burn's `Dropout`, not the hook.
        let plain = dropout_add(&drop, ones.clone(), ones.clone());
        install::<J>(true);
        let ours = dropout_add(&drop, ones.clone() * 5.0, ones.clone());
        let alone = dropout(&drop, ones.clone());
        install::<J>(false);
        set_dropout::<T>(None);
        assert_eq!(
            ours.sum().into_scalar().elem::<f32>(),
            48.0,
            "the backend's answer"
        );
        // Handed back: burn's operations with the mask, each element 0 or 2.
        // Read as f32 whatever the CPU device's default float type (set by the first backend
        // to use the device: this test's f32 or another's f64).
        let alone: Vec<f32> = alone.into_data().convert::<f32>().to_vec().expect("f32");
        assert!(alone.iter().all(|&v| v == 0.0 || v == 2.0), "{alone:?}");
        let plain: Vec<f32> = plain.into_data().convert::<f32>().to_vec().expect("f32");
        assert!(plain.iter().all(|&v| v == 1.0 || v == 3.0), "{plain:?}");
    }

    #[test]
    fn dropout_seeds_follow_the_seed_they_restart_from() {
        let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let draw = |seed: u64| {
            seed_dropout(seed);
            (0..4).map(|_| next_dropout_seed()).collect::<Vec<_>>()
        };
        let (a, again, other) = (draw(7), draw(7), draw(8));
        assert_eq!(a, again, "the same stream from the same seed");
        assert_ne!(a, other, "another seed, another stream");
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), a.len(), "a new seed per call: {a:?}");
    }

    #[test]
    fn inference_backends_keep_burns_operations() {
        let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        install::<I>(true);
        assert!(installed::<A>());
        assert!(!installed::<I>(), "installed on the inner backend");
        install::<I>(false);
        assert!(!installed::<A>());
    }
}
