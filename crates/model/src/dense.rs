//! The model's matrix products: linear maps over the last axis of `[.., d]` activations as one
//! `[rows, d]` product, and the float type products are computed in (mixed precision).
//!
//! burn's `Linear::forward` (and `matmul` against an unsqueezed weight) treats a `[b, t, d]`
//! input as a batch of `b` products with the weight broadcast over it. Two costs follow:
//! autodiff forms the weight gradient per batch entry, `[b, d_in, d_out]` (for the tied
//! generator at batch 256 that is 256 × 768 × 21128 floats, 16.6 GB), before summing it; and a
//! decoding step (`t = 1`) becomes `b` vector products that each read the whole weight. Folding
//! the leading axes into rows gives one GEMM forward and one per gradient, with the same
//! arithmetic per output element.

use std::sync::atomic::{AtomicU8, Ordering};

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::ops::FloatTensor;

use crate::registry::PerBackend;

/// The float type of matrix products; 0 when they use their operands' own type.
static PRODUCT_DTYPE: AtomicU8 = AtomicU8::new(0);
const PRODUCT_DTYPES: [FloatDType; 5] = [
    FloatDType::F64,
    FloatDType::F32,
    FloatDType::Flex32,
    FloatDType::F16,
    FloatDType::BF16,
];

/// Mixed precision as PyTorch's autocast does it: with `Some(dtype)` every matrix product of
/// the model (linear layers, the generator, attention scores and their weighted sums) casts
/// its operands to `dtype` and its result back, so tensor cores run in `dtype` while weights,
/// gradients, optimizer state, norms, softmax and the loss keep the tensors' own type (f32
/// master weights). `None` (the default) computes in the operands' type. Process-wide, like
/// autocast's state: set it before the model runs.
pub fn set_product_dtype(dtype: Option<FloatDType>) {
    let code = dtype.map_or(0, |d| {
        1 + PRODUCT_DTYPES
            .iter()
            .position(|&p| p == d)
            .expect("every float dtype is listed") as u8
    });
    PRODUCT_DTYPE.store(code, Ordering::Relaxed);
}

/// The float type of matrix products set by [`set_product_dtype`].
pub fn product_dtype() -> Option<FloatDType> {
    match PRODUCT_DTYPE.load(Ordering::Relaxed) {
        0 => None,
        code => Some(PRODUCT_DTYPES[code as usize - 1]),
    }
}

/// `x` in the [`product_dtype`] (unchanged when none is set); `cast` back to the tensors' own
/// type is a no-op when nothing was cast.
pub(crate) fn for_product<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match product_dtype() {
        Some(dtype) => cast_to(x, dtype),
        None => x,
    }
}

/// `x` in `dtype`, without a cast (a graph node and, on some backends, a copy) where it is in
/// it already.
pub(crate) fn cast_to<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    dtype: FloatDType,
) -> Tensor<B, D> {
    if x.dtype() == dtype.into() {
        x
    } else {
        x.cast(dtype)
    }
}

/// `a · b` (batched over leading axes) in the [`product_dtype`], returned in `a`'s type.
pub fn product<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    let own: FloatDType = a.dtype().into();
    cast_to(for_product(a).matmul(for_product(b)), own)
}

/// What a backend does with a parameter the optimizer has just written: keep its copy in the
/// [`product_dtype`], made while the parameter's update is still queued so that a fusing
/// backend writes both in one kernel, for the next forward pass's products to read in place
/// of a cast of their own (under `bf16-mixed` about 300 casts a training step otherwise: every
/// weight, and the bias of every layer whose result stays in bf16). None is set by default: the
/// CUDA binary's (`PALM_SHADOW=on`) removed those launches but took the host longer to issue
/// the step (`docs/benchmarks.md`, item 35).
pub type Shadow<B> = fn(FloatTensor<B>);

static SHADOWS: PerBackend = PerBackend::new();

/// Hands the parameters an optimizer writes on backend `B` to `shadow` (`None`: nothing).
pub fn set_shadow<B: Backend>(shadow: Option<Shadow<B>>) {
    SHADOWS.set::<B, _>(shadow);
}

/// Hands `param`, just written by an optimizer, to the backend's [`Shadow`], if one is set.
pub fn shadow<B: Backend, const D: usize>(param: &Tensor<B, D>) {
    if let Some(f) = SHADOWS.get::<B, Shadow<B>>() {
        f(param.clone().into_primitive().tensor());
    }
}

/// The operands of a [`Batched`] product: `[b, h, m, k]` and `[b, h, k, n]` (either may be a
/// view with swapped axes).
pub type BatchedOperands<B> = (Tensor<B, 4>, Tensor<B, 4>);

/// Attention's batched products for one backend, in the [`product_dtype`] and returned in the
/// type asked for (a vendor library's strided batches where burn's matmul is slower); it
/// hands the operands back (`Err`) for products it does not take.
pub type Batched<B> =
    fn(BatchedOperands<B>, FloatDType) -> Result<Tensor<B, 4>, Box<BatchedOperands<B>>>;

static BATCHED: PerBackend = PerBackend::new();

/// Routes [`batched_product`] on backend `B` through `batched` (`None`: [`product`] again).
pub fn set_batched<B: Backend>(batched: Option<Batched<B>>) {
    BATCHED.set::<B, _>(batched);
}

/// `a · b` for `[b, h, m, k]` and `[b, h, k, n]` (attention's scores and weighted sums), in the
/// [`product_dtype`] and returned in `a`'s type: through the backend's [`Batched`] product if
/// it takes them, else [`product`].
pub fn batched_product<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    let own = a.dtype().into();
    batched_product_in(a, b, own)
}

/// [`batched_product`] with its result in `out` (attention's scores stay in f32 when its
/// queries and keys are in the product type, see [`Narrow::Heads`]).
pub fn batched_product_in<B: Backend>(
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
    out: FloatDType,
) -> Tensor<B, 4> {
    let (a, b) = match BATCHED.get::<B, Batched<B>>() {
        Some(f) => match f((a, b), out) {
            Ok(y) => return y,
            Err(operands) => *operands,
        },
        None => (a, b),
    };
    cast_to(product(a, b), out)
}

/// A `[m, k] · [k, n]` product for one backend, in its operands' float type: what a binary
/// substitutes for burn's own matmul on a device where a vendor library is faster (cuBLASLt
/// on CUDA). Operands may be transposed views.
pub type Gemm<B> = fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>;

/// The [`Gemm`] set for each backend type.
static GEMMS: PerBackend = PerBackend::new();

/// Routes the two-dimensional products of the linear layers and output projections on backend
/// `B` through `gemm` (`None`: burn's matmul again). Attention's batched products keep burn's.
pub fn set_gemm<B: Backend>(gemm: Option<Gemm<B>>) {
    GEMMS.set::<B, _>(gemm);
}

/// Whether a [`Gemm`] is set for `B` (benchmarks report which products they measured).
pub fn has_gemm<B: Backend>() -> bool {
    gemm::<B>().is_some()
}

/// The [`Gemm`] set for `B`, if any.
fn gemm<B: Backend>() -> Option<Gemm<B>> {
    GEMMS.get::<B, Gemm<B>>()
}

/// `a · b` for matrices, in the [`product_dtype`] and through the backend's [`Gemm`] if one
/// is set; returned in `a`'s type.
pub(crate) fn product_2d<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let own: FloatDType = a.dtype().into();
    let (a, b) = (for_product(a), for_product(b));
    let y = match gemm::<B>() {
        Some(gemm) => gemm(a, b),
        None => a.matmul(b),
    };
    cast_to(y, own)
}

/// The operands of an [`Affine`] map: `x [rows, k]`, `w [k, n]` (a transposed view for a tied
/// table) and the bias `[n]`, if any.
pub type AffineOperands<B> = (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 1>>);

/// `x · w + bias` in one call for one backend, in the [`product_dtype`] and returned in the
/// type asked for (`w`'s, or the product type for [`dense_narrow`]): what a binary substitutes
/// for the product, its casts and the bias addition where a vendor library does all of it in
/// one GEMM (cuBLASLt's bias epilogue forward, its bias gradient epilogue backward, operands
/// cast to bf16 and results written in f32). `x` may already be in the product type. It
/// hands the operands back (`Err`, boxed: three tensors) for products it does not take.
pub type Affine<B> =
    fn(AffineOperands<B>, FloatDType) -> Result<Tensor<B, 2>, Box<AffineOperands<B>>>;

/// The [`Affine`] map set for each backend type.
static AFFINES: PerBackend = PerBackend::new();

/// Routes the linear layers and output projections on backend `B` through `affine` (`None`:
/// the [`product_2d`] and [`crate::grad::add_bias`] again).
pub fn set_affine<B: Backend>(affine: Option<Affine<B>>) {
    AFFINES.set::<B, _>(affine);
}

/// Whether an [`Affine`] map is set for `B`.
pub fn has_affine<B: Backend>() -> bool {
    AFFINES.get::<B, Affine<B>>().is_some()
}

/// `x · w + bias` for matrices, in `out`: through the backend's [`Affine`] map if it takes
/// them, else a [`product_2d`] in `w`'s type, the bias added, and a cast to `out`.
fn affine<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    out: FloatDType,
) -> Tensor<B, 2> {
    let (x, w, bias) = match AFFINES.get::<B, Affine<B>>() {
        Some(f) => match f((x, w, bias), out) {
            Ok(y) => return y,
            Err(operands) => *operands,
        },
        None => (x, w, bias),
    };
    let own: FloatDType = w.dtype().into();
    let y = product_2d(cast_to(x, own), w);
    let y = match bias {
        Some(bias) => crate::grad::add_bias(y, bias),
        None => y,
    };
    cast_to(y, out)
}

/// `x · W + b` for `x [.., d_in]`, as one `[rows, d_in] · [d_in, d_out]` product, in the
/// weight's type (`x` may be in the [`product_dtype`], as [`dense_narrow`] leaves it).
pub fn dense<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let own = layer.weight.val().dtype().into();
    dense_in(layer, x, own)
}

/// Where a linear layer's result may stay in the [`product_dtype`] instead of the weights'
/// type, as autocast leaves it (see [`dense_narrow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Narrow {
    /// A feed-forward block's inner activation: the GELU runs in it and the second layer reads
    /// it without a cast (at batch 256 the encoder's is 100 M elements).
    Inner,
    /// Attention's queries, keys and values: its batched products read them without casts,
    /// the heads' layout copies move bf16, and the probabilities are written in the product
    /// type for the weighted sum (the scores stay in f32).
    Heads,
}

impl Narrow {
    fn bit(self) -> u8 {
        match self {
            Narrow::Inner => 1,
            Narrow::Heads => 2,
        }
    }
}

/// The [`Narrow`] sites turned on, one bit each (none by default).
static NARROW: AtomicU8 = AtomicU8::new(0);

/// Turns a [`Narrow`] site on or off (process-wide, like [`set_product_dtype`]).
pub fn set_narrow(site: Narrow, on: bool) {
    if on {
        NARROW.fetch_or(site.bit(), Ordering::Relaxed);
    } else {
        NARROW.fetch_and(!site.bit(), Ordering::Relaxed);
    }
}

/// Whether [`set_narrow`] turned `site` on.
pub fn narrow(site: Narrow) -> bool {
    NARROW.load(Ordering::Relaxed) & site.bit() != 0
}

/// [`dense`] with its result left in the [`product_dtype`] when one is set, `site` is turned
/// on ([`set_narrow`]) and the backend records gradients (training: inference keeps the
/// weights' type, which its row kernels are written for).
pub fn dense_narrow<B: Backend, const D: usize>(
    layer: &Linear<B>,
    x: Tensor<B, D>,
    site: Narrow,
) -> Tensor<B, D> {
    let own = layer.weight.val().dtype().into();
    let out = match product_dtype() {
        Some(p) if narrow(site) && B::ad_enabled(&x.device()) => p,
        _ => own,
    };
    dense_in(layer, x, out)
}

fn dense_in<B: Backend, const D: usize>(
    layer: &Linear<B>,
    x: Tensor<B, D>,
    out_dtype: FloatDType,
) -> Tensor<B, D> {
    let (rows, dims) = fold(&x);
    let y = affine(
        x.reshape([rows, dims[D - 1]]),
        layer.weight.val(),
        layer.bias.as_ref().map(|b| b.val()),
        out_dtype,
    );
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// `x · Wᵀ + bias` for `x [.., d]` and a `[n, d]` table `w` (a tied embedding), as one
/// `[rows, d] · [d, n]` product: the logits of an output layer.
pub fn project_onto<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    bias: Tensor<B, 1>,
) -> Tensor<B, D> {
    let (rows, dims) = fold(&x);
    let [n, _] = w.dims();
    let own = w.dtype().into();
    let y = affine(
        x.reshape([rows, dims[D - 1]]),
        w.transpose(),
        Some(bias),
        own,
    );
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// Number of rows once the leading axes are folded, and the shape.
fn fold<B: Backend, const D: usize>(x: &Tensor<B, D>) -> (usize, [usize; D]) {
    let dims = x.dims();
    (dims[..D - 1].iter().product(), dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;
    use burn_autodiff::Autodiff;
    use burn_ndarray::{NdArray, NdArrayDevice};

    type B = Autodiff<NdArray<f32>>;

    #[test]
    fn folded_products_match_the_broadcast_ones_with_their_gradients() {
        let device = NdArrayDevice::Cpu;
        let normal = Distribution::Normal(0.0, 1.0);
        let layer = LinearConfig::new(6, 5).init::<B>(&device);
        let x = Tensor::<B, 3>::random([3, 4, 6], normal, &device).require_grad();
        // A tied [n, d] table and its bias, as the generator has.
        let table = Tensor::<B, 2>::random([7, 6], normal, &device).require_grad();
        let bias = Tensor::<B, 1>::random([7], normal, &device).require_grad();

        let folded = |x: Tensor<B, 3>| {
            (
                dense(&layer, x.clone()),
                project_onto(x, table.clone(), bias.clone()),
            )
        };
        let broadcast = |x: Tensor<B, 3>| {
            (
                layer.forward(x.clone()),
                x.matmul(table.clone().transpose().unsqueeze::<3>())
                    + bias.clone().unsqueeze::<3>(),
            )
        };
        let (y, logits) = folded(x.clone());
        let (y_ref, logits_ref) = broadcast(x.clone());
        assert_eq!((y.dims(), logits.dims()), ([3, 4, 5], [3, 4, 7]));
        let close =
            |a: TensorData, b: TensorData| a.assert_approx_eq::<f32>(&b, Default::default());
        close(y.to_data(), y_ref.to_data());
        close(logits.to_data(), logits_ref.to_data());

        // The same gradients reach the input, the weight, the table and the bias.
        let loss = |(y, logits): (Tensor<B, 3>, Tensor<B, 3>)| {
            y.powi_scalar(2).sum() + (logits * 0.5).exp().sum()
        };
        let g = loss((y, logits)).backward();
        let g_ref = loss((y_ref, logits_ref)).backward();
        let grads = |g| {
            [
                x.grad(g).unwrap().to_data(),
                layer.weight.val().grad(g).unwrap().to_data(),
                table.grad(g).unwrap().to_data(),
                bias.grad(g).unwrap().to_data(),
            ]
        };
        for (a, b) in grads(&g).into_iter().zip(grads(&g_ref)) {
            close(a, b);
        }
    }

    #[test]
    fn a_batched_product_set_for_a_backend_takes_what_it_accepts_until_unset() {
        // Its own backend type (i8 indices): no other test sets batched products for it.
        type G = NdArray<f32, i8>;
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn five_columns(
            (a, b): BatchedOperands<G>,
            out: FloatDType,
        ) -> Result<Tensor<G, 4>, Box<BatchedOperands<G>>> {
            if b.dims()[3] != 5 {
                return Err(Box::new((a, b)));
            }
            CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(a.matmul(b).cast(out))
        }
        let device = NdArrayDevice::Cpu;
        let normal = Distribution::Normal(0.0, 1.0);
        let a = Tensor::<G, 4>::random([2, 3, 4, 6], normal, &device);
        let run = |n: usize| {
            let b = Tensor::<G, 4>::random([2, 3, n, 6], normal, &device).swap_dims(2, 3);
            let plain = product(a.clone(), b.clone()).into_data();
            set_batched::<G>(Some(five_columns));
            let set = batched_product(a.clone(), b.clone()).into_data();
            set_batched::<G>(None);
            set.assert_approx_eq::<f32>(&plain, Default::default());
            batched_product(a.clone(), b)
                .into_data()
                .assert_approx_eq::<f32>(&plain, Default::default());
        };
        run(5);
        assert_eq!(
            CALLS.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "taken once, then unset"
        );
        run(7);
        assert_eq!(
            CALLS.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "7 columns handed back"
        );
    }

    #[test]
    fn a_backend_gemm_takes_the_linear_layers_and_projections_until_unset() {
        // Its own backend type (i32 indices): no other test sets a GEMM for it.
        type G = NdArray<f32, i32>;
        static SEEN: std::sync::Mutex<Vec<([usize; 2], [usize; 2])>> =
            std::sync::Mutex::new(Vec::new());
        fn recording(a: Tensor<G, 2>, b: Tensor<G, 2>) -> Tensor<G, 2> {
            SEEN.lock().unwrap().push((a.dims(), b.dims()));
            a.matmul(b)
        }
        let device = NdArrayDevice::Cpu;
        let normal = Distribution::Normal(0.0, 1.0);
        let layer = LinearConfig::new(6, 5).init::<G>(&device);
        let x = Tensor::<G, 3>::random([3, 4, 6], normal, &device);
        let table = Tensor::<G, 2>::random([7, 6], normal, &device);
        let bias = Tensor::<G, 1>::zeros([7], &device);
        let run = || {
            (
                dense(&layer, x.clone()).into_data(),
                project_onto(x.clone(), table.clone(), bias.clone()).into_data(),
            )
        };

        let plain = run();
        assert!(SEEN.lock().unwrap().is_empty());
        assert!(!has_gemm::<G>());
        set_gemm::<G>(Some(recording));
        assert!(has_gemm::<G>() && !has_gemm::<B>());
        let routed = run();
        assert_eq!(
            *SEEN.lock().unwrap(),
            [([12, 6], [6, 5]), ([12, 6], [6, 7])],
            "one folded product per layer, the table transposed"
        );
        assert_eq!(routed, plain);
        set_gemm::<G>(None);
        assert!(!has_gemm::<G>());
        run();
        assert_eq!(SEEN.lock().unwrap().len(), 2);

        // An affine map (in this test too: the backend type is its own) takes what it accepts,
        // here the products with a bias of 7 columns (the projection), and hands back the rest.
        static AFFINE_SEEN: std::sync::Mutex<Vec<[usize; 2]>> = std::sync::Mutex::new(Vec::new());
        fn seven_columns(
            (x, w, bias): AffineOperands<G>,
            _: FloatDType,
        ) -> Result<Tensor<G, 2>, Box<AffineOperands<G>>> {
            if w.dims()[1] != 7 {
                return Err(Box::new((x, w, bias)));
            }
            AFFINE_SEEN.lock().unwrap().push(w.dims());
            let bias = bias.expect("the projection has a bias");
            Ok(x.matmul(w) + bias.unsqueeze::<2>())
        }
        set_affine::<G>(Some(seven_columns));
        assert!(has_affine::<G>());
        assert_eq!(run(), plain);
        assert_eq!(
            *AFFINE_SEEN.lock().unwrap(),
            [[6, 7]],
            "the table, transposed"
        );
        set_affine::<G>(None);
        assert!(!has_affine::<G>());
        run();
        assert_eq!(AFFINE_SEEN.lock().unwrap().len(), 1);
    }
}
