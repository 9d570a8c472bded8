//! The training layer norm as CUDA kernels of our own (`layer_norm.cu`, compiled by NVRTC for
//! each row width), installed through [`palm_model::grad::set_layer_norm`] in place of the
//! CubeCL kernels of `crate::kernels` (`PALM_LAYER_NORM=cube` keeps those).
//!
//! The CubeCL kernels read a row with one four-byte load per lane and pass, and their
//! backward pass reads the gradient and the input twice (once for the input's gradient, once
//! for γ's and β's column sums) before a third launch sums the chunks: at batch 256 the 62
//! layer norms of a step took 4.1 ms forward and 10.5 backward (`docs/benchmarks.md`, "Where
//! the remaining gap is"). Here a warp holds its row in registers (16-byte loads), the forward
//! pass reads it once, and the backward pass reads `g` and `x` once for the input's gradient
//! and the block's column sums together; a small kernel adds the blocks' sums.
//!
//! f32 rows of a width that is a multiple of 4 and at most 1,024; anything else takes the
//! CubeCL kernels (which hand what they do not take to the written-out operations).

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::{DType, Shape, TensorPrimitive};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::FusionTensor;
use cudarc::driver::CudaFunction;

use super::step::{Arg, architecture, compile, launch_grid, packed, run};
use super::{Device, FusionR, Gpu, float_op};

/// The device code.
const SOURCE: &str = include_str!("layer_norm.cu");
/// Warps per block (`WARPS` in the source); one row per warp forward.
const WARPS: usize = 8;
/// Rows per block of the backward pass (`WARPS × ROWS_PER_WARP` in the source).
const BACKWARD_ROWS: usize = 64;
/// The widest rows taken (the backward pass's shared memory holds `WARPS × width` floats).
const MAX_WIDTH: usize = 1024;

/// The kernels compiled for one row width.
pub(super) struct Kernels {
    forward: CudaFunction,
    backward: CudaFunction,
    column_sums: CudaFunction,
}

/// Runs `f` with the kernels for rows of `width` (compiled on first use).
fn with_kernels(
    device: &mut Device,
    width: usize,
    f: impl FnOnce(&Kernels) -> Result<()>,
) -> Result<()> {
    if !device.layer_norm.contains_key(&width) {
        let options = vec![architecture(device)?, format!("-DD={width}")];
        let what = format!("the layer norm kernels for rows of {width}");
        let names = ["layer_norm_forward", "layer_norm_backward", "column_sums"];
        let [forward, backward, column_sums] = compile(device, SOURCE, options, &what, names)?;
        let kernels = Kernels {
            forward,
            backward,
            column_sums,
        };
        device.layer_norm.insert(width, kernels);
    }
    f(&device.layer_norm[&width])
}

/// Forward on CubeCL tensors `[x, γ, β]`: `[y, μ, 1/σ]`.
fn cube_forward(inputs: Vec<CubeTensor<CudaRuntime>>, eps: f32) -> Vec<CubeTensor<CudaRuntime>> {
    let inputs: Vec<_> = inputs.into_iter().map(crate::kernels::contiguous).collect();
    let x = &inputs[0];
    let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
    let device = x.device.clone();
    let outputs = vec![
        packed(&device, &[rows, d], DType::F32),
        packed(&device, &[rows], DType::F32),
        packed(&device, &[rows], DType::F32),
    ];
    let mut held = inputs;
    held.extend(outputs.iter().cloned());
    run(held, move |device, ptr, stream| {
        with_kernels(device, d, |kernels| {
            let mut args: Vec<Arg> = ptr.iter().map(|&p| Arg::Ptr(p)).collect();
            args.extend([Arg::I32(rows as i32), Arg::F32(eps)]);
            let blocks = rows.div_ceil(WARPS) as u32;
            launch_grid(
                &kernels.forward,
                (blocks, 1, 1),
                32 * WARPS as u32,
                0,
                stream,
                args,
            )
        })
    });
    outputs
}

/// Backward on CubeCL tensors `[g, x, μ, 1/σ, γ]`: `[dx, dγ, dβ]`.
fn cube_backward(inputs: Vec<CubeTensor<CudaRuntime>>) -> Vec<CubeTensor<CudaRuntime>> {
    let inputs: Vec<_> = inputs.into_iter().map(crate::kernels::contiguous).collect();
    let x = &inputs[1];
    let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
    let device = x.device.clone();
    let blocks = rows.div_ceil(BACKWARD_ROWS);
    let outputs = vec![
        packed(&device, &[rows, d], DType::F32),
        packed(&device, &[d], DType::F32),
        packed(&device, &[d], DType::F32),
    ];
    let partial = packed(&device, &[blocks, 2 * d], DType::F32);
    let mut held = inputs;
    held.extend(outputs.iter().cloned());
    held.push(partial);
    run(held, move |device, ptr, stream| {
        let [g, x, mean, rstd, gamma, dx, dgamma, dbeta, partial] =
            ptr.try_into().expect("nine tensors");
        with_kernels(device, d, |kernels| {
            let threads = 32 * WARPS as u32;
            let args = [g, x, mean, rstd, gamma, dx, partial].map(Arg::Ptr);
            let mut args = Vec::from(args);
            args.push(Arg::I32(rows as i32));
            launch_grid(
                &kernels.backward,
                (blocks as u32, 1, 1),
                threads,
                0,
                stream,
                args,
            )?;
            let args = vec![
                Arg::Ptr(partial),
                Arg::Ptr(dgamma),
                Arg::Ptr(dbeta),
                Arg::I32(blocks as i32),
            ];
            let column_blocks = (2 * d).div_ceil(32) as u32;
            launch_grid(
                &kernels.column_sums,
                (column_blocks, 1, 1),
                threads,
                0,
                stream,
                args,
            )
        })
    });
    outputs
}

/// Whether the kernels take `x [rows, d]` with `γ` and `β`: f32, at least one and fewer than
/// 2³¹ rows, `d` a multiple of 4 and at most [`MAX_WIDTH`].
fn takes(
    x: &Tensor<Autodiff<Gpu>, 2>,
    gamma: &Tensor<Autodiff<Gpu>, 1>,
    beta: &Tensor<Autodiff<Gpu>, 1>,
) -> bool {
    let [rows, d] = x.dims();
    [x.dtype(), gamma.dtype(), beta.dtype()]
        .iter()
        .all(|&t| t == DType::F32)
        && (1..i32::MAX as usize).contains(&rows)
        && d > 0
        && d.is_multiple_of(4)
        && d <= MAX_WIDTH
}

/// The layer norm of the CUDA training backend ([`palm_model::grad::set_layer_norm`]).
pub(crate) fn autodiff(
    x: Tensor<Autodiff<Gpu>, 2>,
    gamma: Tensor<Autodiff<Gpu>, 1>,
    beta: Tensor<Autodiff<Gpu>, 1>,
    epsilon: f64,
) -> Tensor<Autodiff<Gpu>, 2> {
    #[derive(Debug)]
    struct LayerNormBackward;

    impl Backward<Gpu, 3> for LayerNormBackward {
        /// `x`, `μ`, `1/σ` and γ.
        type State = [FusionTensor<FusionR>; 4];

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g = super::cast(grads.consume::<Gpu>(&ops.node), DType::F32);
            let [x, mean, rstd, gamma] = ops.state;
            let d = x.shape[1];
            let outputs = vec![
                (x.shape.clone(), DType::F32),
                (Shape::new([d]), DType::F32),
                (Shape::new([d]), DType::F32),
            ];
            let inputs = vec![g, x, mean, rstd, gamma];
            let [dx, dgamma, dbeta]: [FusionTensor<FusionR>; 3] =
                float_op("palm_layer_norm_backward", inputs, outputs, cube_backward)
                    .try_into()
                    .expect("three gradients");
            for (node, grad) in ops.parents.into_iter().zip([dx, dgamma, dbeta]) {
                if let Some(node) = node {
                    grads.register::<Gpu>(node.id, grad);
                }
            }
        }
    }

    if !takes(&x, &gamma, &beta) {
        return crate::kernels::training_layer_norm(x, gamma, beta, epsilon);
    }
    let (xp, gp, bp) = (
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.into_primitive().tensor(),
    );
    let rows = xp.primitive.shape[0];
    let outputs = vec![
        (xp.primitive.shape.clone(), DType::F32),
        (Shape::new([rows]), DType::F32),
        (Shape::new([rows]), DType::F32),
    ];
    let inputs = vec![
        xp.primitive.clone(),
        gp.primitive.clone(),
        bp.primitive.clone(),
    ];
    let eps = epsilon as f32;
    let [y, mean, rstd]: [FusionTensor<FusionR>; 3] =
        float_op("palm_layer_norm", inputs, outputs, move |inputs| {
            cube_forward(inputs, eps)
        })
        .try_into()
        .expect("three outputs");
    let out = match LayerNormBackward
        .prepare::<NoCheckpointing>([xp.node, gp.node, bp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish([xp.primitive, mean, rstd, gp.primitive], y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda layer_norm` on the GPU machine.

    #[test]
    fn the_kernels_match_the_written_out_layer_norm_and_its_gradients() {
        // PALM-base's width over more rows than a backward block holds and a partial last
        // block; a width that leaves lanes idle; the widest; one row.
        let shapes = [(1000, 768), (70, 36), (130, 1024), (1, 8)];
        crate::kernels::assert_layer_norm_matches_written(super::autodiff, &shapes);
    }
}
