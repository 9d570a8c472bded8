//! Training dropout of a `bf16-mixed` step, and dropout plus the residual addition after it,
//! as one kernel each way (`dropout.cu`, compiled by NVRTC), installed through
//! [`palm_model::grad::set_dropout`].
//!
//! burn's dropout draws a random tensor of the activation's shape, compares it into a mask,
//! keeps the mask for the backward pass and multiplies by it: at batch 256 the random numbers
//! and comparisons alone took about 4 ms of a step's device time (`docs/benchmarks.md`,
//! "Where the remaining gap is"). Here each element's decision is a hash of its index and a
//! seed drawn per call (the attention kernels' hash): the forward pass reads `x` (and the
//! residual) and writes the sum, the backward pass draws the same decisions from the same seed
//! and nothing is kept between them. f32 or bf16, the residual of the same type and shape,
//! fewer than 2³² elements; anything else is handed back to burn's operations. `PALM_DROPOUT=burn`
//! does not install them.

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorPrimitive};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::FusionTensor;
use cudarc::driver::CudaFunction;
use palm_model::grad::DroppedBack;

use super::step::{Arg, compile, launch_grid, packed, run};
use super::{Device, FusionR, Gpu, float_op};

/// The device code.
const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("dropout.cu"));
/// Threads per block.
const THREADS: u32 = 256;
/// The most blocks of a launch (the kernels stride over the rest).
const MAX_BLOCKS: usize = 8192;

/// The compiled kernels, f32 and bf16.
pub(super) struct Kernels {
    f32: CudaFunction,
    bf16: CudaFunction,
}

/// One call's decisions: the seed of its hash and the probability of keeping an element.
#[derive(Clone, Copy, Debug)]
struct Draw {
    seed: u32,
    keep: f32,
}

/// Runs `f` with the compiled kernels (compiled on first use).
fn with_kernels(device: &mut Device, f: impl FnOnce(&Kernels) -> Result<()>) -> Result<()> {
    if device.dropout.is_none() {
        let names = ["dropout_f32", "dropout_bf16"];
        let [f32, bf16] = compile(device, SOURCE, vec![], "the dropout kernels", names)?;
        device.dropout = Some(Kernels { f32, bf16 });
    }
    f(device.dropout.as_ref().expect("compiled above"))
}

/// `[x]` or `[x, residual]` on CubeCL tensors: a new tensor of `x`'s shape and type, the
/// dropped `x` plus the residual.
fn cube_pass(inputs: Vec<CubeTensor<CudaRuntime>>, draw: Draw) -> CubeTensor<CudaRuntime> {
    let inputs: Vec<_> = inputs.into_iter().map(crate::kernels::contiguous).collect();
    let like = &inputs[0];
    let (n, dtype) = (like.meta.shape().num_elements(), like.dtype);
    let out = packed(&like.device, like.meta.shape().as_slice(), dtype);
    let residual = inputs.len() == 2;
    let mut held = inputs;
    held.push(out.clone());
    run(held, move |device, ptr, stream| {
        with_kernels(device, |kernels| {
            let f = match dtype {
                DType::BF16 => &kernels.bf16,
                _ => &kernels.f32,
            };
            let (x, out) = (ptr[0], ptr[ptr.len() - 1]);
            let residual = if residual { ptr[1] } else { 0 };
            let args = vec![
                Arg::Ptr(x),
                Arg::Ptr(residual),
                Arg::Ptr(out),
                Arg::I64(n as i64),
                Arg::I32(draw.seed as i32),
                Arg::F32(draw.keep),
            ];
            let blocks = n.div_ceil(8 * THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
            launch_grid(f, (blocks, 1, 1), THREADS, 0, stream, args)
        })
    });
    out
}

/// The pass as a custom operation of the fusion backend.
fn fusion_pass(inputs: Vec<FusionTensor<FusionR>>, draw: Draw) -> FusionTensor<FusionR> {
    let name = match inputs.len() {
        1 => "palm_dropout",
        _ => "palm_dropout_add",
    };
    let outputs = vec![(inputs[0].shape.clone(), inputs[0].dtype)];
    float_op(name, inputs, outputs, move |inputs| {
        vec![cube_pass(inputs, draw)]
    })
    .pop()
    .expect("the result")
}

/// The backward pass of dropout with `N − 1` residuals (none or one): the dropped gradient
/// to `x`, the gradient itself to the residual.
#[derive(Debug)]
struct DropoutBackward<const N: usize>;

impl<const N: usize> Backward<Gpu, N> for DropoutBackward<N> {
    /// The decisions and `x`'s type.
    type State = (Draw, DType);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (draw, dtype) = ops.state;
        let g = super::cast(grads.consume::<Gpu>(&ops.node), dtype);
        let mut parents = ops.parents.into_iter();
        let x = parents.next().flatten();
        if let Some(node) = parents.next().flatten() {
            grads.register::<Gpu>(node.id, g.clone());
        }
        if let Some(node) = x {
            grads.register::<Gpu>(node.id, fusion_pass(vec![g], draw));
        }
    }
}

/// The forward pass over `inputs` (`x`, then the residual) as a node of `op`.
fn tracked<const N: usize>(
    op: DropoutBackward<N>,
    inputs: [FloatTensor<Autodiff<Gpu>>; N],
    state: (Draw, DType),
) -> FloatTensor<Autodiff<Gpu>> {
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    let y = fusion_pass(inputs.map(|t| t.primitive).into(), state.0);
    match op
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// Whether the kernels take `x` with `residual`: f32 or bf16, at least one and fewer than 2³²
/// elements (the hash's index is 32 bits), the residual of `x`'s shape and type.
fn takes(x: &Tensor<Autodiff<Gpu>, 2>, residual: Option<&Tensor<Autodiff<Gpu>, 2>>) -> bool {
    let n = x.shape().num_elements();
    matches!(x.dtype(), DType::F32 | DType::BF16)
        && n > 0
        && u32::try_from(n).is_ok()
        && residual.is_none_or(|r| r.dtype() == x.dtype() && r.dims() == x.dims())
}

/// Training dropout with probability `prob` of `x`, plus `residual` where given, on the CUDA
/// training backend ([`palm_model::grad::set_dropout`]).
pub(super) fn autodiff(
    x: Tensor<Autodiff<Gpu>, 2>,
    residual: Option<Tensor<Autodiff<Gpu>, 2>>,
    prob: f64,
) -> Result<Tensor<Autodiff<Gpu>, 2>, DroppedBack<Autodiff<Gpu>>> {
    if !takes(&x, residual.as_ref()) || !(0.0..1.0).contains(&prob) {
        return Err(Box::new((x, residual)));
    }
    let draw = Draw {
        seed: palm_model::grad::next_dropout_seed(),
        keep: (1.0 - prob) as f32,
    };
    let state = (draw, x.dtype());
    let xp = x.into_primitive().tensor();
    let out = match residual {
        None => tracked(DropoutBackward::<1>, [xp], state),
        Some(residual) => {
            let rp = residual.into_primitive().tensor();
            tracked(DropoutBackward::<2>, [xp, rp], state)
        }
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

#[cfg(test)]
mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda dropout` on the GPU machine.
    use super::*;
    use burn::tensor::{Distribution, FloatDType};
    use burn_cubecl::cubecl::cuda::CudaDevice;

    type B = Autodiff<Gpu>;

    #[test]
    fn kept_elements_are_scaled_dropped_ones_zero_and_the_gradient_follows_them() {
        let device = CudaDevice::new(0);
        let p = 0.1;
        let scale = 1.0 / (1.0 - p as f32);
        // Vectors with a tail, and one element at a time (an odd count); f32 and bf16.
        for (shape, dtype) in [
            ([515, 72], FloatDType::F32),
            ([3, 7], FloatDType::F32),
            ([515, 72], FloatDType::BF16),
            ([3, 7], FloatDType::BF16),
        ] {
            // Values a bf16 holds exactly, so that `x · scale + r` is checked in f32.
            let leaf = |d: Distribution| {
                Tensor::<B, 2>::random(shape, d, &device)
                    .cast(FloatDType::BF16)
                    .cast(dtype)
                    .detach()
                    .require_grad()
            };
            let x = leaf(Distribution::Uniform(1.0, 2.0));
            let r = leaf(Distribution::Normal(0.0, 1.0));
            let w = Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let y = autodiff(x.clone(), Some(r.clone()), p).unwrap_or_else(|_| panic!("taken"));
            let alone = autodiff(x.clone(), None, p).unwrap_or_else(|_| panic!("taken"));
            let grads = (y.clone().cast(FloatDType::F32) * w.clone())
                .sum()
                .backward();
            let vec = |t: Tensor<Gpu, 2>| -> Vec<f32> {
                t.cast(FloatDType::F32).into_data().to_vec().expect("f32")
            };
            let [xs, rs, ys, alone, gx, gr, ws] = [
                x.clone().inner(),
                r.clone().inner(),
                y.inner(),
                alone.inner(),
                x.grad(&grads).expect("dx"),
                r.grad(&grads).expect("dr"),
                w.inner(),
            ]
            .map(vec);
            let tolerance = if dtype == FloatDType::BF16 {
                1e-2
            } else {
                1e-6
            };
            let close = |a: f32, e: f32| (a - e).abs() <= tolerance * (1.0 + e.abs());
            let mut dropped = 0;
            for i in 0..xs.len() {
                assert!(close(gr[i], ws[i]), "{dtype:?} residual gradient {i}");
                // `x ≥ 1`: a dropped element leaves the residual alone.
                if close(ys[i], rs[i]) {
                    dropped += 1;
                    assert_eq!(
                        gx[i], 0.0,
                        "{dtype:?} element {i} dropped, its gradient not"
                    );
                } else {
                    assert!(close(ys[i], xs[i] * scale + rs[i]), "{dtype:?} y {i}");
                    assert!(close(gx[i], ws[i] * scale), "{dtype:?} dx {i}");
                }
                assert!(
                    alone[i] == 0.0 || close(alone[i], xs[i] * scale),
                    "{dtype:?} {i}"
                );
            }
            let n = xs.len();
            if n > 1000 {
                // p·n expected; five standard deviations either side.
                let (mean, sd) = (p * n as f64, (p * (1.0 - p) * n as f64).sqrt());
                let range = (mean - 5.0 * sd) as usize..=(mean + 5.0 * sd) as usize;
                assert!(
                    range.contains(&dropped),
                    "{dtype:?}: {dropped} of {n} dropped"
                );
            }
        }
    }
}
