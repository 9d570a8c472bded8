//! Attention's probabilities for training as two CubeCL kernels (`--features cuda`): forward
//! the masked softmax of the scores with dropout in one launch, backward the scores' gradient
//! in one launch.
//!
//! Composed from burn's operations (`palm_model::attention::attention`), the probabilities are
//! a mask fill, a softmax (two row reductions and a pass), and dropout (a random tensor, a
//! comparison, a fill and a scaling), each a pass over `[b, h, tq, tk]` scores (at batch 256
//! the encoder's are 50 M floats), and backward three more. Here the dropout mask is not
//! stored: each element's keep decision is a hash of its index and a per-call seed, drawn again
//! by the backward kernel.
//!
//! One plane of 32 lanes per row of scores, eight rows per cube. f32 scores, contiguous,
//! normalised in f32; the probabilities (and their gradient) in f32 or bf16 (`bf16-mixed`'s
//! `Narrow::Heads`); the mask is read through its own strides with its broadcast axes at
//! stride 0.
//!
//! Under `bf16-mixed`, the whole of attention is two kernels of the CUDA build's own
//! (`cublaslt::ffi::attention`); these serve the attention those hand back (f32 training,
//! more than 128 queries or keys) and `PALM_ATTENTION=composed`. Both take their dropout
//! seeds from `palm_model::grad::next_dropout_seed`, which the training loop reseeds before
//! every pass.

use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, TensorPrimitive, bf16};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_cubecl::cubecl::CubeDim;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::FusionTensor;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use palm_model::attention::ProbsOperands;

use super::{FusionR, Handle, LANES, contiguous, empty, empty_typed, row_cubes};
use crate::device::{Gpu, GpuUnfused as Cube};

/// Rows (planes) per cube.
const ROWS_PER_CUBE: u32 = 8;

mod device_code {
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// Whether element `index` is kept by dropout under `seed`: a 32-bit integer hash of both
    /// (a multiply-xorshift finaliser), its top 24 bits against `keep`.
    #[cube]
    pub fn kept(index: u32, seed: u32, keep: f32) -> bool {
        let mut h = (index * 0x9E37_79B9u32) ^ seed;
        h ^= h >> 16u32;
        h *= 0x85EB_CA6Bu32;
        h ^= h >> 13u32;
        h *= 0xC2B2_AE35u32;
        h ^= h >> 16u32;
        f32::cast_from(h >> 8u32) * (1.0f32 / 16_777_216.0f32) < keep
    }

    /// `probs = softmax(scores, masked → −1e18)` per row, and `out = probs · kept / keep`,
    /// computed in f32 from scores of type `S` and written in type `P`.
    #[cube(launch)]
    pub fn forward<S: Float, P: Float>(
        scores: &Tensor<S>,
        mask: &Tensor<u8>,
        probs: &mut Tensor<P>,
        out: &mut Tensor<P>,
        rows: usize,
        tk: usize,
        heads: usize,
        tq: usize,
        s0: usize,
        s1: usize,
        s2: usize,
        s3: usize,
        seed: u32,
        keep: f32,
    ) {
        let row = CUBE_POS * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
        if row >= rows {
            terminate!();
        }
        let lane = UNIT_POS_X as usize;
        let base = row * tk;
        let q = row % tq;
        let bh = row / tq;
        let mbase = (bh / heads) * s0 + (bh % heads) * s1 + q * s2;
        let mut max = f32::new(-3.0e38);
        for i in range_stepped(lane, tk, 32usize) {
            let s = if mask[mbase + i * s3] != 0u8 {
                f32::new(-1.0e18)
            } else {
                f32::cast_from(scores[base + i])
            };
            max = f32::max(max, s);
        }
        let max = plane_max(max);
        let mut sum = f32::new(0.0);
        for i in range_stepped(lane, tk, 32usize) {
            let s = if mask[mbase + i * s3] != 0u8 {
                f32::new(-1.0e18)
            } else {
                f32::cast_from(scores[base + i])
            };
            sum += f32::exp(s - max);
        }
        let sum = plane_sum(sum);
        for i in range_stepped(lane, tk, 32usize) {
            let s = if mask[mbase + i * s3] != 0u8 {
                f32::new(-1.0e18)
            } else {
                f32::cast_from(scores[base + i])
            };
            let p = f32::exp(s - max) / sum;
            probs[base + i] = P::cast_from(p);
            let index = base + i;
            out[base + i] = P::cast_from(if keep >= 1.0f32 {
                p
            } else if kept(index as u32, seed, keep) {
                p / keep
            } else {
                f32::new(0.0)
            });
        }
    }

    /// The scores' gradient from the output's `g`: `dp = g · kept / keep`, then
    /// `ds = p (dp − Σ dp p)` per row, 0 where masked (the mask fill's gradient); `g` and the
    /// probabilities of type `P`, computed in f32, `ds` written in the scores' type `S`.
    #[cube(launch)]
    pub fn backward<S: Float, P: Float>(
        g: &Tensor<P>,
        probs: &Tensor<P>,
        mask: &Tensor<u8>,
        ds: &mut Tensor<S>,
        rows: usize,
        tk: usize,
        heads: usize,
        tq: usize,
        s0: usize,
        s1: usize,
        s2: usize,
        s3: usize,
        seed: u32,
        keep: f32,
    ) {
        let row = CUBE_POS * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
        if row >= rows {
            terminate!();
        }
        let lane = UNIT_POS_X as usize;
        let base = row * tk;
        let q = row % tq;
        let bh = row / tq;
        let mbase = (bh / heads) * s0 + (bh % heads) * s1 + q * s2;
        let mut dot = f32::new(0.0);
        for i in range_stepped(lane, tk, 32usize) {
            let index = base + i;
            let gi = f32::cast_from(g[index]);
            let dp = if keep >= 1.0f32 {
                gi
            } else if kept(index as u32, seed, keep) {
                gi / keep
            } else {
                f32::new(0.0)
            };
            dot += dp * f32::cast_from(probs[index]);
        }
        let dot = plane_sum(dot);
        for i in range_stepped(lane, tk, 32usize) {
            let index = base + i;
            let gi = f32::cast_from(g[index]);
            let dp = if keep >= 1.0f32 {
                gi
            } else if kept(index as u32, seed, keep) {
                gi / keep
            } else {
                f32::new(0.0)
            };
            ds[index] = S::cast_from(if mask[mbase + i * s3] != 0u8 {
                f32::new(0.0)
            } else {
                f32::cast_from(probs[index]) * (dp - dot)
            });
        }
    }
}

/// What both kernels are told: the scores' layout, the mask's strides, the dropout and the
/// probabilities' float type (the scores are f32).
#[derive(Clone, Copy, Debug)]
struct Params {
    rows: usize,
    tk: usize,
    heads: usize,
    tq: usize,
    seed: u32,
    keep: f32,
    probs: DType,
}

/// The mask's strides over `[b, h, tq, tk]`, 0 where it broadcasts.
pub(crate) fn mask_strides(mask: &CubeTensor<CudaRuntime>) -> [usize; 4] {
    let (dims, strides) = (mask.meta.shape(), mask.meta.strides());
    std::array::from_fn(|i| if dims[i] == 1 { 0 } else { strides[i] })
}

/// Launches `$kernel::<f32, P>` with `P` the probabilities' type (`$p`, f32 or bf16).
macro_rules! launch_typed {
    ($kernel:ident, $p:expr, $($arg:expr),+ $(,)?) => {
        match $p {
            DType::BF16 => device_code::$kernel::launch::<f32, bf16, CudaRuntime>($($arg),+),
            _ => device_code::$kernel::launch::<f32, f32, CudaRuntime>($($arg),+),
        }
    };
}

/// Forward on CubeCL tensors: `(probabilities, output)`, `[rows, tk]` each, in `p.probs`.
fn forward_kernel(
    scores: CubeTensor<CudaRuntime>,
    mask: CubeTensor<CudaRuntime>,
    p: Params,
) -> (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) {
    let (scores, mask) = (contiguous(scores), contiguous(mask));
    let [s0, s1, s2, s3] = mask_strides(&mask);
    let shape = Shape::new([p.rows, p.tk]);
    let probs = empty_typed(&scores, shape.clone(), p.probs);
    let out = empty_typed(&scores, shape, p.probs);
    let client = scores.client.clone();
    launch_typed!(
        forward,
        p.probs,
        &client,
        row_cubes(p.rows.div_ceil(ROWS_PER_CUBE as usize)),
        CubeDim::new_2d(LANES, ROWS_PER_CUBE),
        scores.into_tensor_arg(),
        mask.into_tensor_arg(),
        probs.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        p.rows,
        p.tk,
        p.heads,
        p.tq,
        s0,
        s1,
        s2,
        s3,
        p.seed,
        p.keep,
    );
    (probs, out)
}

/// Backward on CubeCL tensors: the scores' gradient `[rows, tk]` in f32.
fn backward_kernel(
    g: CubeTensor<CudaRuntime>,
    probs: CubeTensor<CudaRuntime>,
    mask: CubeTensor<CudaRuntime>,
    p: Params,
) -> CubeTensor<CudaRuntime> {
    let (g, mask) = (contiguous(g), contiguous(mask));
    let [s0, s1, s2, s3] = mask_strides(&mask);
    let ds = empty(&g, Shape::new([p.rows, p.tk]));
    let client = g.client.clone();
    launch_typed!(
        backward,
        p.probs,
        &client,
        row_cubes(p.rows.div_ceil(ROWS_PER_CUBE as usize)),
        CubeDim::new_2d(LANES, ROWS_PER_CUBE),
        g.into_tensor_arg(),
        probs.into_tensor_arg(),
        mask.into_tensor_arg(),
        ds.clone().into_tensor_arg(),
        p.rows,
        p.tk,
        p.heads,
        p.tq,
        s0,
        s1,
        s2,
        s3,
        p.seed,
        p.keep,
    );
    ds
}

/// The forward pass as a custom operation of the fusion backend: inputs `[scores, mask]`,
/// outputs `[probabilities, output]`.
fn fusion_forward(
    scores: FusionTensor<FusionR>,
    mask: FusionTensor<FusionR>,
    p: Params,
) -> (FusionTensor<FusionR>, FusionTensor<FusionR>) {
    #[derive(Debug)]
    struct Forward {
        desc: CustomOpIr,
        p: Params,
    }

    impl Operation<FusionR> for Forward {
        fn execute(&self, handles: &mut HandleContainer<Handle>) {
            let ([scores, mask], [probs, out]) = self.desc.as_fixed();
            let (p, o) = forward_kernel(
                handles.get_float_tensor::<Cube>(scores),
                handles.get_bool_tensor::<Cube>(mask),
                self.p,
            );
            handles.register_float_tensor::<Cube>(&probs.id, p);
            handles.register_float_tensor::<Cube>(&out.id, o);
        }
    }

    let client = scores.client.clone();
    let streams = OperationStreams::with_inputs([&scores, &mask]);
    let uninit = || {
        TensorIr::uninit(
            client.create_empty_handle(),
            Shape::new([p.rows, p.tk]),
            p.probs,
        )
    };
    let outputs = [uninit(), uninit()];
    let desc = CustomOpIr::new(
        "palm_attention_probs",
        &[scores.into_ir(), mask.into_ir()],
        &outputs,
    );
    let mut out = client
        .register(
            streams,
            OperationIr::Custom(desc.clone()),
            Forward { desc, p },
        )
        .into_iter();
    (
        out.next().expect("probabilities"),
        out.next().expect("output"),
    )
}

/// The backward pass as a custom operation: inputs `[g, probabilities, mask]`, output the
/// scores' gradient.
fn fusion_backward(
    g: FusionTensor<FusionR>,
    probs: FusionTensor<FusionR>,
    mask: FusionTensor<FusionR>,
    p: Params,
) -> FusionTensor<FusionR> {
    #[derive(Debug)]
    struct BackwardOp {
        desc: CustomOpIr,
        p: Params,
    }

    impl Operation<FusionR> for BackwardOp {
        fn execute(&self, handles: &mut HandleContainer<Handle>) {
            let ([g, probs, mask], [ds]) = self.desc.as_fixed();
            let out = backward_kernel(
                handles.get_float_tensor::<Cube>(g),
                handles.get_float_tensor::<Cube>(probs),
                handles.get_bool_tensor::<Cube>(mask),
                self.p,
            );
            handles.register_float_tensor::<Cube>(&ds.id, out);
        }
    }

    let client = g.client.clone();
    let streams = OperationStreams::with_inputs([&g, &probs, &mask]);
    let out = TensorIr::uninit(
        client.create_empty_handle(),
        Shape::new([p.rows, p.tk]),
        DType::F32,
    );
    let desc = CustomOpIr::new(
        "palm_attention_probs_backward",
        &[g.into_ir(), probs.into_ir(), mask.into_ir()],
        &[out],
    );
    client
        .register(
            streams,
            OperationIr::Custom(desc.clone()),
            BackwardOp { desc, p },
        )
        .into_iter()
        .next()
        .expect("the scores' gradient")
}

/// Attention's probabilities on the CUDA training backend
/// ([`palm_model::attention::set_attention_probs`]): f32 scores `[b, h, tq, tk]` and a mask,
/// probabilities in f32 or bf16; anything else is handed back.
pub(crate) fn autodiff(
    (scores, mask, prob, dtype): ProbsOperands<Autodiff<Gpu>>,
) -> Result<Tensor<Autodiff<Gpu>, 4>, Box<ProbsOperands<Autodiff<Gpu>>>> {
    let Some(mask) = mask else {
        return Err(Box::new((scores, None, prob, dtype)));
    };
    let [b, heads, tq, tk] = scores.dims();
    let probs: DType = dtype.into();
    if scores.dtype() != DType::F32
        || !matches!(probs, DType::F32 | DType::BF16)
        || b * heads * tq * tk == 0
    {
        return Err(Box::new((scores, Some(mask), prob, dtype)));
    }

    #[derive(Debug)]
    struct ProbsBackward;

    impl Backward<Gpu, 1> for ProbsBackward {
        /// The probabilities before dropout, the mask and the parameters (the seed).
        type State = (FusionTensor<FusionR>, FusionTensor<FusionR>, Params);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g = grads.consume::<Gpu>(&ops.node);
            let [parent] = ops.parents;
            if let Some(node) = parent {
                let (probs, mask, p) = ops.state;
                let g = if g.dtype == p.probs {
                    g
                } else {
                    <Gpu as burn::tensor::ops::FloatTensorOps<Gpu>>::float_cast(g, p.probs.into())
                };
                let ds = fusion_backward(g, probs, mask, p);
                let shape = Shape::new([p.rows / (p.heads * p.tq), p.heads, p.tq, p.tk]);
                grads.register::<Gpu>(
                    node.id,
                    <Gpu as burn::tensor::ops::FloatTensorOps<Gpu>>::float_reshape(ds, shape),
                );
            }
        }
    }

    let device = scores.device();
    let keep = if prob > 0.0 && <Autodiff<Gpu> as Backend>::ad_enabled(&device) {
        (1.0 - prob) as f32
    } else {
        1.0
    };
    let p = Params {
        rows: b * heads * tq,
        tk,
        heads,
        tq,
        seed: palm_model::grad::next_dropout_seed(),
        keep,
        probs,
    };
    let sp = scores.into_primitive().tensor();
    let mask: FusionTensor<FusionR> = mask.into_primitive();
    let (probs, out) = fusion_forward(sp.primitive, mask.clone(), p);
    let out = <Gpu as burn::tensor::ops::FloatTensorOps<Gpu>>::float_reshape(
        out,
        Shape::new([b, heads, tq, tk]),
    );
    let out: FloatTensor<Autodiff<Gpu>> = match ProbsBackward
        .prepare::<NoCheckpointing>([sp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((probs, mask, p), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

#[cfg(test)]
mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda kernels` on the GPU machine.
    use super::*;
    use burn::tensor::{Distribution, FloatDType, Tolerance};
    use burn_cubecl::cubecl::cuda::CudaDevice;
    use palm_model::attention::MASK_FILL;

    type B = Autodiff<Gpu>;

    /// Padding masks `[b, 1, 1, tk]` (the encoder's, cross-attention's) and causal ones
    /// `[b, 1, tq, tk]` (the decoder's self-attention), one key hidden per row at least.
    fn masks(b: usize, tq: usize, tk: usize, device: &CudaDevice) -> [Tensor<B, 4, Bool>; 2] {
        let pad: Vec<bool> = (0..b * tk).map(|i| i % tk >= tk - 1 - i / tk).collect();
        let causal: Vec<bool> = (0..b * tq * tk)
            .map(|i| (i % tk) > (i / tk) % tq || i % tk == tk - 1)
            .collect();
        [
            Tensor::from_data(TensorData::new(pad, [b, 1, 1, tk]), device),
            Tensor::from_data(TensorData::new(causal, [b, 1, tq, tk]), device),
        ]
    }

    #[test]
    fn probabilities_match_the_composed_ones_with_gradients() {
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 2.0);
        let tolerance = Tolerance::<f32>::rel_abs(1e-4, 1e-5);
        // Rows shorter than a plane, and the encoder's 128 keys over 12 heads.
        for (b, h, tq, tk) in [(2, 3, 5, 7), (2, 12, 64, 128)] {
            for mask in masks(b, tq, tk, &device) {
                let scores = Tensor::<B, 4>::random([b, h, tq, tk], normal, &device).require_grad();
                let weights = Tensor::<B, 4>::random([b, h, tq, tk], normal, &device);
                let run = |kernel: bool| {
                    let y = if kernel {
                        autodiff((scores.clone(), Some(mask.clone()), 0.0, FloatDType::F32))
                            .unwrap_or_else(|_| panic!("taken"))
                    } else {
                        let filled = scores
                            .clone()
                            .mask_fill(mask.clone().expand([b, h, tq, tk]), MASK_FILL);
                        burn::tensor::activation::softmax(filled, 3)
                    };
                    let grads = (y.clone() * weights.clone()).sum().backward();
                    [y.into_data(), scores.grad(&grads).unwrap().into_data()]
                };
                let (ours, composed) = (run(true), run(false));
                for (what, (a, c)) in ["probs", "dscores"].iter().zip(ours.iter().zip(&composed)) {
                    eprintln!("[{b}, {h}, {tq}, {tk}] mask {:?} {what}", mask.dims());
                    a.assert_approx_eq::<f32>(c, tolerance);
                }
            }
        }
    }

    #[test]
    fn bf16_probabilities_round_the_f32_ones_and_carry_their_gradients() {
        // `Narrow::Heads`: f32 scores, probabilities written in bf16 for the weighted sum, their
        // gradient arriving in bf16, the scores' gradient in f32.
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 2.0);
        let (b, h, tq, tk) = (2, 12, 64, 128);
        for mask in masks(b, tq, tk, &device) {
            let scores = Tensor::<B, 4>::random([b, h, tq, tk], normal, &device).require_grad();
            // Weights that bf16 holds exactly: the probabilities' gradient is `w` itself.
            let weights = Tensor::<B, 4>::random([b, h, tq, tk], normal, &device)
                .cast(FloatDType::BF16)
                .cast(FloatDType::F32);
            let run = |dtype: FloatDType| {
                let y = autodiff((scores.clone(), Some(mask.clone()), 0.0, dtype))
                    .unwrap_or_else(|_| panic!("taken"));
                assert_eq!(
                    y.dtype(),
                    dtype.into(),
                    "probabilities in the type asked for"
                );
                let grads = (y.clone() * weights.clone().cast(dtype)).sum().backward();
                let ds = scores.grad(&grads).unwrap();
                assert_eq!(ds.dtype(), DType::F32, "the scores' gradient in their type");
                (y.cast(FloatDType::F32).inner(), ds)
            };
            let ((p, ds), (wide, _)) = (run(FloatDType::BF16), run(FloatDType::F32));
            // The probabilities are the f32 ones rounded to bf16's 8 bits.
            p.clone()
                .into_data()
                .assert_approx_eq::<f32>(&wide.into_data(), Tolerance::rel_abs(8e-3, 1e-4));
            // The gradient is `p (w − Σ w p)` of those rounded probabilities, in f32.
            let w = weights.inner();
            let dot = (w.clone() * p.clone()).sum_dim(3);
            let expected = p * (w - dot);
            ds.into_data().assert_approx_eq::<f32>(
                &expected.into_data(),
                Tolerance::<f32>::rel_abs(1e-3, 1e-5),
            );
        }
    }

    #[test]
    fn dropout_drops_its_share_and_the_backward_pass_draws_the_same_mask() {
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 1.0);
        let (b, h, tq, tk) = (4, 12, 64, 128);
        let [mask, _] = masks(b, tq, tk, &device);
        let scores = Tensor::<B, 4>::random([b, h, tq, tk], normal, &device).require_grad();
        let weights = Tensor::<B, 4>::random([b, h, tq, tk], normal, &device);
        let p = 0.3;
        let out = autodiff((scores.clone(), Some(mask.clone()), p, FloatDType::F32))
            .unwrap_or_else(|_| panic!("taken"));
        let grads = (out.clone() * weights.clone()).sum().backward();
        let ds = scores.grad(&grads).unwrap();
        let probs = autodiff((
            scores.clone().detach(),
            Some(mask.clone()),
            0.0,
            FloatDType::F32,
        ))
        .unwrap_or_else(|_| panic!("taken"))
        .inner();
        let out = out.inner();
        let visible = mask.inner().expand([b, h, tq, tk]).bool_not();
        let kept = out.clone().not_equal_elem(0.0).bool_and(visible.clone());
        // The share dropped among visible keys: 0.3 within 0.01 over 3·10⁵ of them.
        let n_visible = visible.clone().int().sum().into_scalar() as f64;
        let n_kept = kept.clone().int().sum().into_scalar() as f64;
        let dropped = 1.0 - n_kept / n_visible;
        assert!((dropped - p).abs() < 0.01, "dropped {dropped}");
        // Kept probabilities are scaled by 1 / (1 − p).
        let keep = 1.0 - p;
        let tolerance = Tolerance::<f32>::rel_abs(1e-4, 1e-6);
        out.clone().into_data().assert_approx_eq::<f32>(
            &probs
                .clone()
                .mask_fill(kept.clone().bool_not(), 0.0)
                .div_scalar(keep)
                .into_data(),
            tolerance,
        );
        // ds = p (dp − Σ dp p) with dp = w · kept / keep, from the forward pass's own mask.
        let w = weights.inner();
        let dp = w.mask_fill(kept.bool_not(), 0.0).div_scalar(keep);
        let dot = (dp.clone() * probs.clone()).sum_dim(3);
        let expected = (probs * (dp - dot)).mask_fill(visible.bool_not(), 0.0);
        ds.into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), tolerance);
    }
}
