//! The encoder's GELU (erf) of a `bf16-mixed` training step as two kernels of our own
//! (`gelu.cu`, compiled by NVRTC), installed through [`palm_model::grad::set_gelu`].
//!
//! burn differentiates `gelu` through its decomposition, which fusion compiles into element-wise
//! kernels that took about 400 µs a launch over the encoder's `[32,768 × 3,072]` bf16
//! activation at batch 256 (9.6 ms of a step forward and backward; `docs/benchmarks.md`, item
//! 46), where reading and writing it takes about 130. Here forward and backward are one pass
//! each, in f32 arithmetic with one rounding. bf16 only (`Narrow::Inner` under `bf16-mixed`);
//! anything else keeps burn's `gelu`. `PALM_GELU=burn` does not install them.

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
const SOURCE: &str = include_str!("gelu.cu");
/// Threads per block.
const THREADS: u32 = 256;
/// The most blocks of a launch (the kernels stride over the rest).
const MAX_BLOCKS: usize = 8192;

/// The compiled kernels.
pub(super) struct Kernels {
    forward: CudaFunction,
    backward: CudaFunction,
}

/// Which kernel an operation runs.
#[derive(Clone, Copy, Debug)]
enum Pass {
    Forward,
    Backward,
}

/// Runs `f` with the compiled kernels (compiled on first use).
fn with_kernels(device: &mut Device, f: impl FnOnce(&Kernels) -> Result<()>) -> Result<()> {
    if device.gelu.is_none() {
        let names = ["gelu_forward", "gelu_backward"];
        let [forward, backward] = compile(device, SOURCE, vec![], "the GELU kernels", names)?;
        device.gelu = Some(Kernels { forward, backward });
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
                Pass::Forward => &kernels.forward,
                Pass::Backward => &kernels.backward,
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
        Pass::Forward => "palm_gelu",
        Pass::Backward => "palm_gelu_backward",
    };
    let outputs = vec![(inputs[0].shape.clone(), DType::BF16)];
    float_op(name, inputs, outputs, move |inputs| {
        vec![cube_pass(inputs, pass)]
    })
    .pop()
    .expect("the result")
}

/// GELU on the CUDA training backend ([`palm_model::grad::set_gelu`]): bf16 `x`, else handed
/// back.
pub(super) fn autodiff(
    x: Tensor<Autodiff<Gpu>, 2>,
) -> Result<Tensor<Autodiff<Gpu>, 2>, Box<Tensor<Autodiff<Gpu>, 2>>> {
    if x.dtype() != DType::BF16 || x.shape().num_elements() == 0 {
        return Err(Box::new(x));
    }

    #[derive(Debug)]
    struct GeluBackward;

    impl Backward<Gpu, 1> for GeluBackward {
        /// The input.
        type State = FusionTensor<FusionR>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g = super::cast(grads.consume::<Gpu>(&ops.node), DType::BF16);
            let [parent] = ops.parents;
            if let Some(node) = parent {
                grads.register::<Gpu>(node.id, fusion_pass(vec![ops.state, g], Pass::Backward));
            }
        }
    }

    let xp = x.into_primitive().tensor();
    let y = fusion_pass(vec![xp.primitive.clone()], Pass::Forward);
    let out = match GeluBackward
        .prepare::<NoCheckpointing>([xp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(xp.primitive, y),
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
    fn the_kernels_match_burns_gelu_and_its_gradient() {
        let device = CudaDevice::new(0);
        // Eight at a time with a tail, and one at a time (an odd count).
        for shape in [[515, 72], [3, 7]] {
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
                let y = if ours {
                    autodiff(leaf.clone()).unwrap_or_else(|_| panic!("taken"))
                } else {
                    burn::tensor::activation::gelu(leaf.clone())
                };
                let y = y.cast(FloatDType::F32);
                let grads = (y.clone() * weights.clone()).sum().backward();
                let dx = Tensor::<B, 2>::from_inner(leaf.grad(&grads).expect("a gradient"));
                [y.into_data(), dx.cast(FloatDType::F32).into_data()]
            };
            let (ours, expected) = (run(true), run(false));
            for (name, (a, e)) in ["y", "dx"].iter().zip(ours.iter().zip(&expected)) {
                eprintln!("{shape:?} {name}");
                // One bf16 rounding apart.
                a.assert_approx_eq::<f32>(e, Tolerance::rel_abs(1e-2, 1e-2));
            }
        }
    }
}
