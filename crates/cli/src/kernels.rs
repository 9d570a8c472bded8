//! Single-kernel layer norm, softmax and tanh-GELU for CUDA inference (`--features cuda`).
//!
//! Without burn's fusion (inference commands run without it: [`crate::device::GpuUnfused`]),
//! each burn operation is a kernel launch, and a beam-search step is bound by the host's cost
//! per launch, not by the device: a layer norm is about ten launches (two means, the centring,
//! the square, the root, the division, γ and β), a softmax five and the decoder's tanh-GELU
//! seven, and a step of PALM-base's decoder has 37 layer norms, 12 softmaxes (self-attention)
//! and 12 GELUs. Here each is one CubeCL kernel, installed through
//! [`palm_model::grad::set_row_kernels`]:
//!
//! - layer norm and softmax: one plane (32 lanes) per row, each lane striding over the row,
//!   the sums and the maximum through plane reductions (three passes over a row that stays in
//!   cache);
//! - tanh-GELU: one thread per element.
//!
//! f32 only (what inference runs in, `bf16-mixed` included); other float types and strided
//! inputs take burn's operations.

use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::{self, CubeCount, CubeDim};
use burn_cubecl::tensor::CubeTensor;
use palm_model::grad::{RowOps, set_row_kernels};

use crate::device::GpuUnfused;

mod attention;
mod layer_norm;

pub(crate) use attention::mask_strides;
pub(crate) use layer_norm::autodiff as training_layer_norm;
#[cfg(test)]
pub(crate) use layer_norm::tests::assert_matches_written as assert_layer_norm_matches_written;

/// Lanes per row: one plane (a warp on NVIDIA GPUs).
const LANES: u32 = 32;

/// Threads per cube of the element-wise kernel.
const ELEMENTWISE_CUBE: u32 = 256;

/// The device code (CubeCL), apart from burn's names.
mod device_code {
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    // The row kernels run one plane of 32 lanes (`super::LANES`) per row: each lane takes
    // every 32nd element.

    #[cube(launch)]
    pub fn layer_norm_rows<F: Float>(
        x: &Tensor<F>,
        gamma: &Tensor<F>,
        beta: &Tensor<F>,
        out: &mut Tensor<F>,
        eps: f32,
        rows: usize,
        d: usize,
    ) {
        if CUBE_POS >= rows {
            terminate!();
        }
        let base = CUBE_POS * d;
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
    }

    #[cube(launch)]
    pub fn softmax_rows<F: Float>(x: &Tensor<F>, out: &mut Tensor<F>, rows: usize, d: usize) {
        if CUBE_POS >= rows {
            terminate!();
        }
        let base = CUBE_POS * d;
        let lane = UNIT_POS as usize;
        let mut max = F::min_value();
        for i in range_stepped(lane, d, 32usize) {
            max = F::max(max, x[base + i]);
        }
        let max = plane_max(max);
        let mut sum = F::new(0.0);
        for i in range_stepped(lane, d, 32usize) {
            sum += F::exp(x[base + i] - max);
        }
        let sum = plane_sum(sum);
        for i in range_stepped(lane, d, 32usize) {
            out[base + i] = F::exp(x[base + i] - max) / sum;
        }
    }

    #[cube(launch)]
    pub fn gelu_tanh_elements<F: Float>(x: &Tensor<F>, out: &mut Tensor<F>) {
        if ABSOLUTE_POS < out.len() {
            let v = x[ABSOLUTE_POS];
            let inner = F::new(0.797_884_6) * (v + F::new(0.044715) * v * v * v);
            out[ABSOLUTE_POS] = v * F::new(0.5) * (F::new(1.0) + F::tanh(inner));
        }
    }
}

type Cube = CubeTensor<CudaRuntime>;

/// The fusion runtime of the CUDA training backend ([`crate::device::Gpu`]) and its handles:
/// what the training kernels' custom operations ([`layer_norm`], [`attention`]) run in.
type FusionR = <GpuUnfused as burn_fusion::FusionBackend>::FusionRuntime;
type Handle = <FusionR as burn_fusion::FusionRuntime>::FusionHandle;

fn prim<const D: usize>(t: Tensor<GpuUnfused, D>) -> Cube {
    t.into_primitive().tensor()
}

fn wrap(t: Cube) -> Tensor<GpuUnfused, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Whether the kernels take `t`: f32 and contiguous.
fn takes(t: &Cube) -> bool {
    t.dtype == DType::F32 && t.is_contiguous()
}

/// An uninitialised f32 tensor of `like`'s shape on its device.
fn empty_like(like: &Cube) -> Cube {
    empty(like, like.meta.shape().clone())
}

/// An uninitialised f32 tensor of `shape` on `like`'s device.
fn empty(like: &Cube, shape: burn::tensor::Shape) -> Cube {
    empty_typed(like, shape, DType::F32)
}

/// An uninitialised tensor of `shape` and `dtype` on `like`'s device.
fn empty_typed(like: &Cube, shape: burn::tensor::Shape, dtype: DType) -> Cube {
    burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape,
        dtype,
    )
}

/// `t`, copied first unless its elements are contiguous.
pub(crate) fn contiguous(t: Cube) -> Cube {
    if t.is_contiguous() {
        t
    } else {
        burn_cubecl::kernel::into_contiguous(t)
    }
}

/// Plane size of the device, where the row kernels need 32.
fn plane_fits(t: &Cube) -> bool {
    let p = t.client.properties().hardware.plane_size_max;
    p == LANES && t.client.properties().hardware.plane_size_min == LANES
}

/// One cube per row: a grid of at most 65,535 cubes a side (the rows past the last run none).
fn row_cubes(rows: usize) -> CubeCount {
    const SIDE: usize = 65_535;
    if rows <= SIDE {
        CubeCount::Static(rows as u32, 1, 1)
    } else {
        CubeCount::Static(SIDE as u32, rows.div_ceil(SIDE) as u32, 1)
    }
}

fn layer_norm(
    x: Tensor<GpuUnfused, 2>,
    gamma: Tensor<GpuUnfused, 1>,
    beta: Tensor<GpuUnfused, 1>,
    eps: f64,
) -> Tensor<GpuUnfused, 2> {
    let [rows, d] = x.dims();
    let (xc, g, b) = (prim(x.clone()), prim(gamma.clone()), prim(beta.clone()));
    if !(takes(&xc) && takes(&g) && takes(&b) && plane_fits(&xc)) || rows == 0 {
        return palm_model::grad::burn_layer_norm(x, gamma, beta, eps);
    }
    let out = empty_like(&xc);
    device_code::layer_norm_rows::launch::<f32, CudaRuntime>(
        &xc.client,
        row_cubes(rows),
        CubeDim::new_1d(LANES),
        xc.clone().into_tensor_arg(),
        g.into_tensor_arg(),
        b.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        eps as f32,
        rows,
        d,
    );
    wrap(out)
}

fn softmax(x: Tensor<GpuUnfused, 2>) -> Tensor<GpuUnfused, 2> {
    let [rows, d] = x.dims();
    let xc = prim(x.clone());
    if !(takes(&xc) && plane_fits(&xc)) || rows == 0 {
        return burn::tensor::activation::softmax(x, 1);
    }
    let out = empty_like(&xc);
    device_code::softmax_rows::launch::<f32, CudaRuntime>(
        &xc.client,
        row_cubes(rows),
        CubeDim::new_1d(LANES),
        xc.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows,
        d,
    );
    wrap(out)
}

fn gelu_tanh(x: Tensor<GpuUnfused, 2>) -> Tensor<GpuUnfused, 2> {
    let xc = prim(x.clone());
    let n = x.shape().num_elements();
    if !takes(&xc) || n == 0 {
        return burn::tensor::activation::gelu_approximate(x);
    }
    let out = empty_like(&xc);
    let cube_dim = CubeDim::new_1d(ELEMENTWISE_CUBE);
    let count = cubecl::calculate_cube_count_elemwise(&xc.client, n, cube_dim);
    device_code::gelu_tanh_elements::launch::<f32, CudaRuntime>(
        &xc.client,
        count,
        cube_dim,
        xc.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
    );
    wrap(out)
}

/// Puts the training layer norm ([`layer_norm`], or `crate::cublaslt`'s) and attention's
/// probabilities ([`attention`]) on the CUDA training backend, unless `PALM_KERNELS=burn` (the
/// written-out operations stay), `PALM_BACKWARD=burn` (burn's decompositions throughout) or
/// the device's planes are not 32 lanes wide.
pub fn install_training(index: usize) {
    use burn_cubecl::cubecl::Runtime;
    let burn = |var| std::env::var(var).is_ok_and(|v| v == "burn");
    let on = !burn("PALM_KERNELS") && !burn("PALM_BACKWARD");
    let client = CudaRuntime::client(&burn_cubecl::cubecl::cuda::CudaDevice::new(index));
    let hardware = &client.properties().hardware;
    let fits = hardware.plane_size_min == LANES && hardware.plane_size_max == LANES;
    type Train = burn_autodiff::Autodiff<crate::device::Gpu>;
    // The NVRTC kernels beside cuBLASLt's (which hand what they do not take to the CubeCL
    // ones) where that module is installed, unless `PALM_LAYER_NORM=cube`.
    let cube = std::env::var("PALM_LAYER_NORM").is_ok_and(|v| v == "cube");
    let layer_norm: palm_model::grad::LayerNormFn<Train> =
        if cube || crate::cublaslt::on_backend_stream().is_none() {
            layer_norm::autodiff
        } else {
            crate::cublaslt::training_layer_norm
        };
    palm_model::grad::set_layer_norm::<Train>((on && fits).then_some(layer_norm));
    palm_model::attention::set_attention_probs::<Train>(
        (on && fits).then_some(attention::autodiff as _),
    );
}

/// Puts the kernels on the inference backend, unless `PALM_KERNELS=burn`.
pub fn install() {
    let on = !std::env::var("PALM_KERNELS").is_ok_and(|v| v == "burn");
    set_row_kernels::<GpuUnfused>(on.then_some(RowOps {
        layer_norm,
        softmax,
        gelu_tanh,
    }));
}

#[cfg(test)]
mod tests {
    //! Needs a CUDA device: `cargo test -p palm --features cuda kernels` on the GPU machine.
    use super::*;
    use burn::tensor::{Distribution, Tolerance};
    use burn_cubecl::cubecl::cuda::CudaDevice;

    #[test]
    fn kernels_match_burns_operations() {
        let device = CudaDevice::new(0);
        let normal = Distribution::Normal(0.0, 2.0);
        let tolerance = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
        // A row shorter than a plane, one that is not a multiple of it, PALM-base's width.
        for (rows, d) in [(3, 7), (70, 50), (5, 768)] {
            let x = Tensor::<GpuUnfused, 2>::random([rows, d], normal, &device);
            let gamma = Tensor::<GpuUnfused, 1>::random([d], normal, &device);
            let beta = Tensor::<GpuUnfused, 1>::random([d], normal, &device);
            eprintln!("[{rows}, {d}] layer norm");
            layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-6)
                .into_data()
                .assert_approx_eq::<f32>(
                    &palm_model::grad::burn_layer_norm(x.clone(), gamma, beta, 1e-6).into_data(),
                    tolerance,
                );
            eprintln!("[{rows}, {d}] softmax");
            // A masked score as the attention fills it.
            let masked = x.clone().slice_fill([0..1, 0..1], -1e18);
            softmax(masked.clone()).into_data().assert_approx_eq::<f32>(
                &burn::tensor::activation::softmax(masked, 1).into_data(),
                tolerance,
            );
            eprintln!("[{rows}, {d}] gelu");
            gelu_tanh(x.clone()).into_data().assert_approx_eq::<f32>(
                &burn::tensor::activation::gelu_approximate(x).into_data(),
                tolerance,
            );
        }
        // Many rows: a two-dimensional grid of cubes.
        let x = Tensor::<GpuUnfused, 2>::random([70_000, 3], normal, &device);
        softmax(x.clone()).into_data().assert_approx_eq::<f32>(
            &burn::tensor::activation::softmax(x, 1).into_data(),
            tolerance,
        );
    }
}
