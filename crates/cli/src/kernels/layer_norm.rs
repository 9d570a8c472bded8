//! The training layer norm as CubeCL kernels (`--features cuda`): forward one launch that also
//! keeps each row's mean and `1/σ`; backward one launch for the input's gradient, one for the
//! per-chunk sums of γ's and β's gradients, then one column sum.
//!
//! Written out with burn's operations (`palm_model::grad`), a layer norm is about four
//! launches forward (two row means, the normalisation, γ and β, as burn's fusion groups them)
//! and eight backward (two row means, the input's gradient, two two-stage column sums), and it
//! keeps the normalised input, `[rows, d]` in f32, for the backward pass. PALM-base has 62
//! layer norms, and its training step is bound by the host's cost per launch (some 4,600
//! launches at batch 256, `palm bench --trace`). Here: one launch forward and three backward,
//! and the saved state is two `[rows]` vectors besides the input the residual keeps anyway.
//! The backward pass first summed γ's and β's gradients in the gradient kernel itself (a plane
//! over eight rows, 32 columns per lane in registers): its register pressure and one plane
//! per cube left it at 300 µs a launch at batch 256 (encoder rows), four times the bytes'
//! time; a plane per row for the gradient and a unit per column for the sums read the rows
//! twice but keep the device busy.
//!
//! f32 and contiguous rows on a device with 32-lane planes; anything else takes the
//! written-out operations.

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, TensorPrimitive};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::{CubeCount, CubeDim};
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::FusionTensor;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{FusionR, Handle, LANES, contiguous, empty, row_cubes};
use crate::device::{Gpu, GpuUnfused as Cube};

/// Rows per chunk of γ's and β's partial sums: `[rows / 64, 2d]` of them, which one column
/// sum finishes.
const CHUNK_ROWS: usize = 64;

/// Rows (planes) per cube of the input gradient's kernel.
const ROWS_PER_CUBE: u32 = 8;

/// Units per cube of the partial sums' kernel, one column each.
const COLUMNS_PER_CUBE: u32 = 256;

/// The widest rows the kernels take (PALM-large's 1,024; nothing in them needs a limit since
/// the backward pass stopped keeping 32 columns per lane in registers, but wider rows have not
/// run on a GPU, so they take the written-out operations).
const MAX_WIDTH: usize = 1024;

mod device_code {
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// One plane of 32 lanes per row, each lane taking every 32nd element: `out = (x − μ) / σ ·
    /// γ + β`, and `μ` and `1/σ` per row.
    #[cube(launch)]
    pub fn forward<F: Float>(
        x: &Tensor<F>,
        gamma: &Tensor<F>,
        beta: &Tensor<F>,
        out: &mut Tensor<F>,
        mean_out: &mut Tensor<F>,
        rstd_out: &mut Tensor<F>,
        eps: f32,
        rows: usize,
        d: usize,
    ) {
        if CUBE_POS >= rows {
            terminate!();
        }
        let row = CUBE_POS;
        let base = row * d;
        let lane = UNIT_POS as usize;
        let mut sum = F::new(0.0);
        for i in range_stepped(lane, d, 32usize) {
            sum += x[base + i];
        }
        let mean = plane_sum(sum) / F::cast_from(d);
        let mut squares = F::new(0.0);
        for i in range_stepped(lane, d, 32usize) {
            let c = x[base + i] - mean;
            squares += c * c;
        }
        let std = F::sqrt(plane_sum(squares) / F::cast_from(d) + F::cast_from(eps));
        for i in range_stepped(lane, d, 32usize) {
            out[base + i] = (x[base + i] - mean) / std * gamma[i] + beta[i];
        }
        if lane == 0 {
            mean_out[row] = mean;
            rstd_out[row] = F::new(1.0) / std;
        }
    }

    /// The input's gradient, one plane of 32 lanes per row and eight rows per cube: `dx = (ĝ −
    /// mean(ĝ) − x̂ · mean(ĝ x̂)) / σ` with `ĝ = g γ` and `x̂ = (x − μ) / σ`.
    #[cube(launch)]
    pub fn backward<F: Float>(
        g: &Tensor<F>,
        x: &Tensor<F>,
        mean: &Tensor<F>,
        rstd: &Tensor<F>,
        gamma: &Tensor<F>,
        dx: &mut Tensor<F>,
        rows: usize,
        d: usize,
    ) {
        let row = CUBE_POS * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
        if row >= rows {
            terminate!();
        }
        let base = row * d;
        let lane = UNIT_POS_X as usize;
        let m = mean[row];
        let s = rstd[row];
        let mut sum_g = F::new(0.0);
        let mut sum_gx = F::new(0.0);
        for i in range_stepped(lane, d, 32usize) {
            let gh = g[base + i] * gamma[i];
            sum_g += gh;
            sum_gx += gh * (x[base + i] - m) * s;
        }
        let mean_g = plane_sum(sum_g) / F::cast_from(d);
        let mean_gx = plane_sum(sum_gx) / F::cast_from(d);
        for i in range_stepped(lane, d, 32usize) {
            let xh = (x[base + i] - m) * s;
            dx[base + i] = (g[base + i] * gamma[i] - mean_g - xh * mean_gx) * s;
        }
    }

    /// γ's and β's gradients summed over one chunk of `per_chunk` rows per cube row: unit `c`
    /// of cube `(cx, chunk)` takes column `cx · 256 + c` and writes `Σ g x̂` and `Σ g` into
    /// `partial[chunk, c]` and `partial[chunk, d + c]`. Consecutive units read consecutive
    /// columns, so each row is read whole by a cube row.
    #[cube(launch)]
    pub fn column_partials<F: Float>(
        g: &Tensor<F>,
        x: &Tensor<F>,
        mean: &Tensor<F>,
        rstd: &Tensor<F>,
        partial: &mut Tensor<F>,
        rows: usize,
        d: usize,
        per_chunk: usize,
    ) {
        let c = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
        let chunk = CUBE_POS_Y as usize;
        if c >= d {
            terminate!();
        }
        let first = chunk * per_chunk;
        let mut end = first + per_chunk;
        if end > rows {
            end = rows;
        }
        let mut sum_gx = F::new(0.0);
        let mut sum_g = F::new(0.0);
        for row in first..end {
            let gi = g[row * d + c];
            sum_gx += gi * (x[row * d + c] - mean[row]) * rstd[row];
            sum_g += gi;
        }
        partial[chunk * 2 * d + c] = sum_gx;
        partial[chunk * 2 * d + d + c] = sum_g;
    }
}

/// Registers a custom operation on the fusion backend: `inputs` in, outputs of `shapes` (f32)
/// out, `run` on the CubeCL tensors.
fn register(
    name: &'static str,
    inputs: Vec<FusionTensor<FusionR>>,
    shapes: Vec<Shape>,
    run: fn(Vec<CubeTensor<CudaRuntime>>, f64) -> Vec<CubeTensor<CudaRuntime>>,
    eps: f64,
) -> Vec<FusionTensor<FusionR>> {
    #[derive(Debug)]
    struct Op {
        desc: CustomOpIr,
        run: fn(Vec<CubeTensor<CudaRuntime>>, f64) -> Vec<CubeTensor<CudaRuntime>>,
        eps: f64,
    }

    impl Operation<FusionR> for Op {
        fn execute(&self, handles: &mut HandleContainer<Handle>) {
            let inputs = self
                .desc
                .inputs
                .iter()
                .map(|ir| contiguous(handles.get_float_tensor::<Cube>(ir)))
                .collect();
            for (ir, t) in self.desc.outputs.iter().zip((self.run)(inputs, self.eps)) {
                handles.register_float_tensor::<Cube>(&ir.id, t);
            }
        }
    }

    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(&inputs);
    let outputs: Vec<TensorIr> = shapes
        .into_iter()
        .map(|s| TensorIr::uninit(client.create_empty_handle(), s, DType::F32))
        .collect();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    client.register(
        streams,
        OperationIr::Custom(desc.clone()),
        Op { desc, run, eps },
    )
}

/// Forward on CubeCL tensors `[x, γ, β]`: `[y, μ, 1/σ]`.
fn forward_kernel(t: Vec<CubeTensor<CudaRuntime>>, eps: f64) -> Vec<CubeTensor<CudaRuntime>> {
    let [x, gamma, beta]: [CubeTensor<CudaRuntime>; 3] = t.try_into().expect("three inputs");
    let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
    let (out, mean, rstd) = (
        empty(&x, Shape::new([rows, d])),
        empty(&x, Shape::new([rows])),
        empty(&x, Shape::new([rows])),
    );
    device_code::forward::launch::<f32, CudaRuntime>(
        &x.client,
        row_cubes(rows),
        CubeDim::new_1d(LANES),
        x.clone().into_tensor_arg(),
        gamma.into_tensor_arg(),
        beta.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        mean.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        eps as f32,
        rows,
        d,
    );
    vec![out, mean, rstd]
}

/// The chunks of γ's and β's partial sums for `rows` rows (at most 65,535: one cube row each).
fn chunks(rows: usize) -> (usize, usize) {
    let per_chunk = CHUNK_ROWS.max(rows.div_ceil(65_535));
    (rows.div_ceil(per_chunk), per_chunk)
}

/// Backward on CubeCL tensors `[g, x, μ, 1/σ, γ]`: `[dx, partial sums [chunks, 2d]]`, two
/// launches: the input's gradient a plane per row, the partial sums a unit per column and chunk.
fn backward_kernel(t: Vec<CubeTensor<CudaRuntime>>, _: f64) -> Vec<CubeTensor<CudaRuntime>> {
    let [g, x, mean, rstd, gamma]: [CubeTensor<CudaRuntime>; 5] =
        t.try_into().expect("five inputs");
    let [rows, d] = [x.meta.shape()[0], x.meta.shape()[1]];
    let (chunks, per_chunk) = chunks(rows);
    let (dx, partial) = (
        empty(&x, Shape::new([rows, d])),
        empty(&x, Shape::new([chunks, 2 * d])),
    );
    let client = x.client.clone();
    device_code::backward::launch::<f32, CudaRuntime>(
        &client,
        row_cubes(rows.div_ceil(ROWS_PER_CUBE as usize)),
        CubeDim::new_2d(LANES, ROWS_PER_CUBE),
        g.clone().into_tensor_arg(),
        x.clone().into_tensor_arg(),
        mean.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        gamma.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        rows,
        d,
    );
    device_code::column_partials::launch::<f32, CudaRuntime>(
        &client,
        CubeCount::Static(
            d.div_ceil(COLUMNS_PER_CUBE as usize) as u32,
            chunks as u32,
            1,
        ),
        CubeDim::new_1d(COLUMNS_PER_CUBE),
        g.into_tensor_arg(),
        x.into_tensor_arg(),
        mean.into_tensor_arg(),
        rstd.into_tensor_arg(),
        partial.clone().into_tensor_arg(),
        rows,
        d,
        per_chunk,
    );
    vec![dx, partial]
}

fn wrap<const D: usize>(p: FusionTensor<FusionR>) -> Tensor<Gpu, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// Whether the kernels take `x [rows, d]` with `γ` and `β`: f32, at least one row and at most
/// [`MAX_WIDTH`] columns (the device's 32-lane planes are checked once, when the kernels are
/// installed).
fn takes(
    x: &FusionTensor<FusionR>,
    gamma: &FusionTensor<FusionR>,
    beta: &FusionTensor<FusionR>,
) -> bool {
    [x.dtype, gamma.dtype, beta.dtype]
        .iter()
        .all(|&d| d == DType::F32)
        && x.shape[0] > 0
        && x.shape[1] <= MAX_WIDTH
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
            let g = grads.consume::<Gpu>(&ops.node);
            let [x, mean, rstd, gamma] = ops.state;
            let d = x.shape[1];
            let (chunks, _) = chunks(x.shape[0]);
            let shapes = vec![x.shape.clone(), Shape::new([chunks, 2 * d])];
            let mut out = register(
                "palm_layer_norm_backward",
                vec![g, x, mean, rstd, gamma],
                shapes,
                backward_kernel,
                0.0,
            )
            .into_iter();
            let (dx, partial) = (out.next().expect("dx"), out.next().expect("partial sums"));
            let [x_node, gamma_node, beta_node] = ops.parents;
            if gamma_node.is_some() || beta_node.is_some() {
                let sums = palm_model::grad::column_sum(wrap::<2>(partial));
                if let Some(node) = gamma_node {
                    grads.register::<Gpu>(
                        node.id,
                        sums.clone().slice(0..d).into_primitive().tensor(),
                    );
                }
                if let Some(node) = beta_node {
                    grads.register::<Gpu>(node.id, sums.slice(d..2 * d).into_primitive().tensor());
                }
            }
            if let Some(node) = x_node {
                grads.register::<Gpu>(node.id, dx);
            }
        }
    }

    let (xp, gp, bp) = (
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.into_primitive().tensor(),
    );
    if !takes(&xp.primitive, &gp.primitive, &bp.primitive) {
        return palm_model::grad::written_layer_norm(
            Tensor::from_primitive(TensorPrimitive::Float(xp)),
            Tensor::from_primitive(TensorPrimitive::Float(gp)),
            Tensor::from_primitive(TensorPrimitive::Float(bp)),
            epsilon,
        );
    }
    let [rows, _] = [xp.primitive.shape[0], xp.primitive.shape[1]];
    let mut out = register(
        "palm_layer_norm",
        vec![
            xp.primitive.clone(),
            gp.primitive.clone(),
            bp.primitive.clone(),
        ],
        vec![
            xp.primitive.shape.clone(),
            Shape::new([rows]),
            Shape::new([rows]),
        ],
        forward_kernel,
        epsilon,
    )
    .into_iter();
    let (y, mean, rstd) = (
        out.next().expect("y"),
        out.next().expect("mean"),
        out.next().expect("1/σ"),
    );
    let y: FloatTensor<Autodiff<Gpu>> = match LayerNormBackward
        .prepare::<NoCheckpointing>([xp.node.clone(), gp.node.clone(), bp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish([xp.primitive, mean, rstd, gp.primitive], y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

#[cfg(test)]
pub(super) mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda kernels` on the GPU machine.
    use super::*;
    use burn::tensor::{Distribution, Tolerance};
    use burn_cubecl::cubecl::cuda::CudaDevice;

    type B = Autodiff<Gpu>;

    /// Asserts that the training layer norm `f` gives the written-out one's output and input,
    /// γ and β gradients (within 1e-4) on random `[rows, d]` inputs of each of `shapes`.
    pub(crate) fn assert_matches_written(
        f: palm_model::grad::LayerNormFn<B>,
        shapes: &[(usize, usize)],
    ) {
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 2.0);
        let tolerance = Tolerance::<f32>::rel_abs(1e-4, 1e-4);
        for &(rows, d) in shapes {
            let x = Tensor::<B, 2>::random([rows, d], normal, &device).require_grad();
            let gamma = Tensor::<B, 1>::random([d], normal, &device).require_grad();
            let beta = Tensor::<B, 1>::random([d], normal, &device).require_grad();
            let weights = Tensor::<B, 2>::random([rows, d], normal, &device);
            let run = |ours: bool| {
                let f = if ours {
                    f
                } else {
                    palm_model::grad::written_layer_norm::<Gpu>
                };
                let y = f(x.clone(), gamma.clone(), beta.clone(), 1e-12);
                let grads = (y.clone() * weights.clone()).sum().backward();
                [
                    y.into_data(),
                    x.grad(&grads).expect("dx").into_data(),
                    gamma.grad(&grads).expect("dγ").into_data(),
                    beta.grad(&grads).expect("dβ").into_data(),
                ]
            };
            let (ours, written) = (run(true), run(false));
            for (what, (a, e)) in ["y", "dx", "dγ", "dβ"]
                .iter()
                .zip(ours.iter().zip(&written))
            {
                eprintln!("[{rows}, {d}] {what}");
                a.assert_approx_eq::<f32>(e, tolerance);
            }
        }
    }

    #[test]
    fn training_layer_norm_matches_the_written_out_one_with_gradients() {
        // A row shorter than a plane, rows not a multiple of the backward's cube of 8 rows or
        // of its 64-row chunks, PALM-base's width within one chunk and over five.
        assert_matches_written(autodiff, &[(3, 7), (70, 50), (37, 768), (300, 768)]);
    }
}
