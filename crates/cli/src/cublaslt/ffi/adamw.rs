//! A parameter's AdamW update as one kernel of our own (`adamw.cu`, compiled by NVRTC),
//! installed through [`palm_train::optim::set_adamw_step`] on the training backend's inner
//! backend (the optimizer updates `Fusion<CubeBackend>` tensors).
//!
//! burn's `AdamW` is about a dozen tensor operations per parameter (the moments' decays, the
//! square, the bias corrections, the root, the quotient, the decay and the step), which fusion
//! joins into few kernels but which the host still issues one by one: over PALM-base's 200-odd
//! parameters, a host profile of a `bf16-mixed` training step at batch 8 found 40% of the
//! calling thread's time in the optimizer (`docs/benchmarks.md`, item 45). Here it is one
//! custom operation per parameter, the same arithmetic in f32.

use anyhow::Result;
use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::FusionTensor;
use cudarc::driver::CudaFunction;
use palm_train::optim::{AdamWOperands, AdamWUpdate};

use super::step::{Arg, compile, launch_grid, packed, run};
use super::{Device, FusionR, Gpu, float_op};

/// The device code.
const SOURCE: &str = include_str!("adamw.cu");
/// Threads per block.
const THREADS: u32 = 256;
/// The most blocks of a launch (the kernel strides over the rest).
const MAX_BLOCKS: usize = 4096;

/// Runs `f` with the compiled kernel (compiled on first use).
fn with_kernel(device: &mut Device, f: impl FnOnce(&CudaFunction) -> Result<()>) -> Result<()> {
    if device.adamw.is_none() {
        let [adamw] = compile(device, SOURCE, vec![], "the AdamW kernel", ["adamw"])?;
        device.adamw = Some(adamw);
    }
    f(device.adamw.as_ref().expect("compiled above"))
}

/// The update on CubeCL tensors: `[param, grad]` or `[param, grad, m, v]` in, the new
/// parameter and moments out.
fn cube_update(
    inputs: Vec<CubeTensor<CudaRuntime>>,
    u: AdamWUpdate,
) -> [CubeTensor<CudaRuntime>; 3] {
    let inputs: Vec<_> = inputs.into_iter().map(crate::kernels::contiguous).collect();
    let like = &inputs[0];
    let shape = like.meta.shape().clone();
    let n = shape.num_elements();
    let out = || packed(&like.device, shape.as_slice(), DType::F32);
    let outputs = [out(), out(), out()];
    let fresh = inputs.len() == 2;
    let mut held = inputs;
    held.extend(outputs.iter().cloned());
    let time = u.time as i32;
    let args = move |ptr: &[u64]| {
        // [param, grad, m?, v?, param', m', v']: without moments, m and v are never read.
        let (m, v) = if fresh { (0, 0) } else { (ptr[2], ptr[3]) };
        let out = &ptr[ptr.len() - 3..];
        vec![
            Arg::Ptr(ptr[0]),
            Arg::Ptr(ptr[1]),
            Arg::Ptr(m),
            Arg::Ptr(v),
            Arg::Ptr(out[0]),
            Arg::Ptr(out[1]),
            Arg::Ptr(out[2]),
            Arg::I64(n as i64),
            Arg::I32(fresh as i32),
            Arg::F32(u.beta_1),
            Arg::F32(u.beta_2),
            Arg::F32(1.0 - u.beta_1),
            Arg::F32(1.0 - u.beta_2),
            Arg::F32(1.0 - u.beta_1.powi(time)),
            Arg::F32(1.0 - u.beta_2.powi(time)),
            Arg::F32(u.epsilon),
            Arg::F32(u.lr as f32),
            Arg::F32((1.0 - u.lr * u.weight_decay as f64) as f32),
        ]
    };
    run(held, move |device, ptr, stream| {
        with_kernel(device, |f| {
            let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
            launch_grid(f, (blocks, 1, 1), THREADS, 0, stream, args(ptr))
        })
    });
    outputs
}

/// The update as a custom operation of the fusion backend.
fn fusion_update(inputs: Vec<FusionTensor<FusionR>>, u: AdamWUpdate) -> [FusionTensor<FusionR>; 3] {
    let outputs = vec![(inputs[0].shape.clone(), DType::F32); 3];
    let mut out = float_op("palm_adamw", inputs, outputs, move |inputs| {
        cube_update(inputs, u).into()
    })
    .into_iter();
    std::array::from_fn(|_| out.next().expect("an updated tensor"))
}

/// AdamW's update on the training backend's inner backend ([`palm_train::optim::AdamWStep`]):
/// f32 parameters, gradients and moments of one shape; anything else is handed back.
pub(super) fn step(
    (param, grad, moments, u): AdamWOperands<Gpu>,
) -> Result<[FusionTensor<FusionR>; 3], Box<AdamWOperands<Gpu>>> {
    let same = |t: &FusionTensor<FusionR>| t.dtype == DType::F32 && t.shape == param.shape;
    let taken = same(&param)
        && same(&grad)
        && moments.as_ref().is_none_or(|(m, v)| same(m) && same(v))
        && param.shape.num_elements() > 0;
    if !taken {
        return Err(Box::new((param, grad, moments, u)));
    }
    let mut inputs = vec![param, grad];
    if let Some((m, v)) = moments {
        inputs.extend([m, v]);
    }
    Ok(fusion_update(inputs, u))
}

#[cfg(test)]
mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda adamw` on the GPU machine.
    use super::*;
    use burn::prelude::*;
    use burn::tensor::{Distribution, TensorPrimitive, Tolerance};
    use burn_cubecl::cubecl::cuda::CudaDevice;
    use palm_train::optim::reference_adamw_step;

    #[test]
    fn the_kernel_updates_as_burns_adamw() {
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 1.0);
        let tensor = |shape: [usize; 2]| {
            Tensor::<Gpu, 2>::random(shape, normal, &device)
                .into_primitive()
                .tensor()
        };
        // A shape past one launch's blocks, and a small one.
        for shape in [[1031, 1100], [3, 5]] {
            let param = tensor(shape);
            let mut moments = None;
            for time in 1..=3 {
                let grad = tensor(shape);
                let u = AdamWUpdate {
                    lr: 1e-3,
                    beta_1: 0.9,
                    beta_2: 0.999,
                    epsilon: 1e-8,
                    weight_decay: 0.01,
                    time,
                };
                let operands = (param.clone(), grad, moments.clone(), u);
                let ours = step(operands.clone()).unwrap_or_else(|_| panic!("taken"));
                let expected = reference_adamw_step::<Gpu>(operands);
                let data = |t: FusionTensor<FusionR>| {
                    Tensor::<Gpu, 2>::from_primitive(TensorPrimitive::Float(t)).into_data()
                };
                for (name, (a, e)) in ["param", "m", "v"]
                    .iter()
                    .zip(ours.clone().into_iter().zip(expected))
                {
                    eprintln!("{shape:?} step {time}: {name}");
                    data(a).assert_approx_eq::<f32>(&data(e), Tolerance::rel_abs(1e-5, 1e-7));
                }
                let [_, m, v] = ours;
                moments = Some((m, v));
            }
        }
    }
}
