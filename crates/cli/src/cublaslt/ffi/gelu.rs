//! The encoder's GELU (erf) and the decoder's tanh approximation of a `bf16-mixed` training
//! step as two kernels of our own each (`gelu.cu`, compiled by NVRTC), installed through
//! [`palm_model::grad::set_gelu`] and [`palm_model::grad::set_gelu_tanh`].
//!
//! burn differentiates `gelu` through its decomposition, which fusion compiles into element-wise
//! kernels that took about 400 µs a launch over the encoder's `[32,768 × 3,072]` bf16
//! activation at batch 256 (9.6 ms of a step forward and backward; `docs/benchmarks.md`, item
//! 46), where reading and writing it takes about 130. Here forward and backward are one pass
//! each, in f32 arithmetic with one rounding. bf16 only (`Narrow::Inner` under `bf16-mixed`);
//! anything else keeps burn's `gelu` (or the written-out tanh approximation). `PALM_GELU=burn`
//! does not install them.

use anyhow::Result;
use burn::prelude::*;
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

use super::step::{Arg, compile, launch_grid, packed, run};
use super::{Device, FusionR, Gpu, float_op};

/// The device code.
const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("gelu.cu"));
/// Threads per block.
const THREADS: u32 = 256;
/// The most blocks of a launch (the kernels stride over the rest).
const MAX_BLOCKS: usize = 8192;

/// The compiled kernels: forward and backward, erf and tanh.
pub(super) struct Kernels {
    forward: [CudaFunction; 2],
    backward: [CudaFunction; 2],
}

/// Which GELU.
#[derive(Clone, Copy, Debug)]
enum Curve {
    /// `x/2 · (1 + erf(x/√2))`.
    Erf = 0,
    /// The tanh approximation.
    Tanh = 1,
}

/// Which kernel an operation runs.
#[derive(Clone, Copy, Debug)]
enum Pass {
    Forward(Curve),
    Backward(Curve),
}

/// Runs `f` with the compiled kernels (compiled on first use).
fn with_kernels(device: &mut Device, f: impl FnOnce(&Kernels) -> Result<()>) -> Result<()> {
    if device.gelu.is_none() {
        let names = [
            "gelu_forward",
            "gelu_tanh_forward",
            "gelu_backward",
            "gelu_tanh_backward",
        ];
        let [erf, tanh, erf_back, tanh_back] =
            compile(device, SOURCE, vec![], "the GELU kernels", names)?;
        device.gelu = Some(Kernels {
            forward: [erf, tanh],
            backward: [erf_back, tanh_back],
        });
    }
    f(device.gelu.as_ref().expect("compiled above"))
}

/// The pass on CubeCL tensors: `[x]` forward, `[x, g]` backward; a new bf16 tensor of `x`'s
/// shape.
fn cube_pass(inputs: Vec<CubeTensor<CudaRuntime>>, pass: Pass) -> CubeTensor<CudaRuntime> {
    let inputs: Vec<_> = inputs.into_iter().map(crate::kernels::contiguous).collect();
    let like = &inputs[0];
    let n = like.meta.shape().num_elements();
    let out = packed(&like.device, like.meta.shape().as_slice(), DType::BF16);
    let mut held = inputs;
    held.push(out.clone());
    run(held, move |device, ptr, stream| {
        with_kernels(device, |kernels| {
            let f = match pass {
                Pass::Forward(c) => &kernels.forward[c as usize],
                Pass::Backward(c) => &kernels.backward[c as usize],
            };
            let mut args: Vec<Arg> = ptr.iter().map(|&p| Arg::Ptr(p)).collect();
            args.push(Arg::I64(n as i64));
            let blocks = n.div_ceil(8 * THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
            launch_grid(f, (blocks, 1, 1), THREADS, 0, stream, args)
        })
    });
    out
}

/// The pass as a custom operation of the fusion backend.
fn fusion_pass(inputs: Vec<FusionTensor<FusionR>>, pass: Pass) -> FusionTensor<FusionR> {
    let name = match pass {
        Pass::Forward(Curve::Erf) => "palm_gelu",
        Pass::Backward(Curve::Erf) => "palm_gelu_backward",
        Pass::Forward(Curve::Tanh) => "palm_gelu_tanh",
        Pass::Backward(Curve::Tanh) => "palm_gelu_tanh_backward",
    };
    let outputs = vec![(inputs[0].shape.clone(), DType::BF16)];
    float_op(name, inputs, outputs, move |inputs| {
        vec![cube_pass(inputs, pass)]
    })
    .pop()
    .expect("the result")
}

/// GELU (erf) on the CUDA training backend ([`palm_model::grad::set_gelu`]): bf16 `x`, else
/// handed back.
pub(super) fn autodiff(
    x: Tensor<Autodiff<Gpu>, 2>,
) -> Result<Tensor<Autodiff<Gpu>, 2>, Box<Tensor<Autodiff<Gpu>, 2>>> {
    autodiff_curve(x, Curve::Erf)
}

/// GELU's tanh approximation on the CUDA training backend
/// ([`palm_model::grad::set_gelu_tanh`]): bf16 `x`, else handed back.
pub(super) fn autodiff_tanh(
    x: Tensor<Autodiff<Gpu>, 2>,
) -> Result<Tensor<Autodiff<Gpu>, 2>, Box<Tensor<Autodiff<Gpu>, 2>>> {
    autodiff_curve(x, Curve::Tanh)
}

fn autodiff_curve(
    x: Tensor<Autodiff<Gpu>, 2>,
    curve: Curve,
) -> Result<Tensor<Autodiff<Gpu>, 2>, Box<Tensor<Autodiff<Gpu>, 2>>> {
    if x.dtype() != DType::BF16 || x.shape().num_elements() == 0 {
        return Err(Box::new(x));
    }

    #[derive(Debug)]
    struct GeluBackward;

    impl Backward<Gpu, 1> for GeluBackward {
        /// The input and the curve.
        type State = (FusionTensor<FusionR>, Curve);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g = super::cast(grads.consume::<Gpu>(&ops.node), DType::BF16);
            let [parent] = ops.parents;
            let (x, curve) = ops.state;
            if let Some(node) = parent {
                grads.register::<Gpu>(node.id, fusion_pass(vec![x, g], Pass::Backward(curve)));
            }
        }
    }

    let xp = x.into_primitive().tensor();
    let y = fusion_pass(vec![xp.primitive.clone()], Pass::Forward(curve));
    let out = match GeluBackward
        .prepare::<NoCheckpointing>([xp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xp.primitive, curve), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

#[cfg(test)]
mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda gelu` on the GPU machine.
    use super::*;
    use burn::tensor::{Distribution, FloatDType, Tolerance};
    use burn_cubecl::cubecl::cuda::CudaDevice;

    type B = Autodiff<Gpu>;

    #[test]
    fn the_kernels_match_burns_gelus_and_their_gradients() {
        let device = CudaDevice::new(0);
        // Eight at a time with a tail, and one at a time (an odd count); both curves.
        let curves = [Curve::Erf, Curve::Tanh];
        for (shape, curve) in [[515, 72], [3, 7]]
            .into_iter()
            .flat_map(|s| curves.map(|c| (s, c)))
        {
            let x = Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 2.0), &device)
                .cast(FloatDType::BF16)
                .detach();
            let weights = Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
                .cast(FloatDType::BF16)
                .cast(FloatDType::F32);
            let run = |ours: bool| {
                let leaf = if ours {
                    x.clone()
                } else {
                    x.clone().cast(FloatDType::F32)
                }
                .require_grad();
                let y = match (ours, curve) {
                    (true, _) => {
                        autodiff_curve(leaf.clone(), curve).unwrap_or_else(|_| panic!("taken"))
                    }
                    (false, Curve::Erf) => burn::tensor::activation::gelu(leaf.clone()),
                    (false, Curve::Tanh) => {
                        burn::tensor::activation::gelu_approximate(leaf.clone())
                    }
                };
                let y = y.cast(FloatDType::F32);
                let grads = (y.clone() * weights.clone()).sum().backward();
                let dx = Tensor::<B, 2>::from_inner(leaf.grad(&grads).expect("a gradient"));
                [y.into_data(), dx.cast(FloatDType::F32).into_data()]
            };
            let (ours, expected) = (run(true), run(false));
            for (name, (a, e)) in ["y", "dx"].iter().zip(ours.iter().zip(&expected)) {
                eprintln!("{shape:?} {curve:?} {name}");
                // One bf16 rounding apart.
                a.assert_approx_eq::<f32>(e, Tolerance::rel_abs(1e-2, 1e-2));
            }
        }
    }
}
