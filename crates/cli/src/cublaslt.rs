//! The CUDA backend's large matrix products through cuBLASLt (`--features cuda`).
//!
//! burn 0.21's own CUDA GEMMs (CubeCL's `mma.sync` kernels, autotuned per shape) reach 75–96
//! TFLOP/s at PALM-base's shapes where cuBLAS reaches ~300 (tf32) and more in bf16, and every
//! new shape costs a JIT compilation and an autotuning pass. This module sends the
//! two-dimensional products of the linear layers and output projections
//! ([`palm_model::dense::set_gemm`]) to cuBLASLt, loaded at run time by cudarc (nothing links
//! against CUDA at build time), at three levels of the backend:
//!
//! - the CubeCL tensor level ([`cube_gemm`]): reads the operands' device pointers and strides
//!   (a transposed view is passed as a transposed operand, not copied), allocates the output in
//!   CubeCL's pool and calls `cublasLtMatmul` with a cached plan (layouts and the heuristic's
//!   algorithm per shape);
//! - the fusion level ([`fusion_gemm`]): a custom operation in burn-fusion's stream, so the
//!   element-wise work before it is launched first;
//! - the autodiff level ([`autodiff_gemm`]): a node whose backward pass is two more such
//!   products (`dA = dC · Bᵀ`, `dB = Aᵀ · dC`).
//!
//! Ordering: CubeCL launches on a stream of its own (one per host thread) that it does not
//! expose. Each product runs on CubeCL's device thread, after everything queued before it
//! (`ComputeClient::exclusive`), and is queued on CubeCL's stream, which CUPTI's callbacks
//! reveal (see `ffi::stream`): no wait for the device, as for CubeCL's own kernels (training
//! at batch 256 in `bf16-mixed`: 479 samples/s with a drain per product, 711 without). Where
//! the stream cannot be found (no libcupti, a profiler holding CUPTI,
//! `PALM_GEMM_STREAM=own`), a product waits for the backend's queue, runs on this module's
//! stream and waits for itself: a pipeline drain per product.
//!
//! Either way a product costs a round trip to CubeCL's device thread, which stops the host
//! thread building operations and the device thread launching them from overlapping. Beam
//! search, bound by those two threads rather than by the device, lost by it: at batch 64 with
//! every product of a step routed on CubeCL's stream, 3,080 tokens/s against 5,022 on burn's
//! kernels (2026-11-30), and training at batches 8 and 64 with their linear layers routed ran
//! 26% and 19% slower. So only products of at least [`MIN_MACS`] multiply-accumulates were
//! routed: a training step's at batch 256, where a GEMM takes milliseconds; decoding kept
//! burn's kernels. That was the threshold until a product that has run once was queued
//! without the round trip (`ffi::enqueue`); then 2²⁷ (every linear layer of training at
//! batches 8 and 64 and of a beam-search step at batch 64), and now every product.
//!
//! f32 operands run with TF32 tensor-core arithmetic (`CUBLAS_COMPUTE_32F_FAST_TF32`, as
//! PyTorch with `allow_tf32`, and as burn's own f32 kernels do); bf16 and f16 with f32
//! accumulation. `PALM_GEMM=burn` turns the routing off.
//!
//! The linear layers with a bias go one step further (`ffi::affine`, through
//! [`palm_model::dense::set_affine`]): the casts to the product type happen once per operand,
//! the result is written in the tensors' own type (f32 under `bf16-mixed`) and the bias is
//! added in the product's epilogue; backward, the bias gradient is the weight gradient's
//! epilogue. `PALM_AFFINE=composed` keeps them as casts, a product and a bias addition.
//! Attention's batched products of a training step go to cuBLASLt's strided batches too
//! (`ffi::batched`; `PALM_ATTENTION_GEMM=burn` keeps burn's matmul for them), keeping the
//! operands as the forward products read them for the backward pass (`=recopy` copies them
//! again there). Under `bf16-mixed` the optimizer can leave each parameter's bf16 copy for
//! the next forward pass (`ffi::shadow`, opt-in: `PALM_SHADOW=on`). A product that has run
//! once is queued on CubeCL's device thread without waiting for it (`PALM_GEMM_SUBMIT=wait`
//! waits for each). Beam search's decoder step on the inference backend goes one step
//! further still (`ffi::step`, `PALM_STEP=burn` to turn it off): the whole step, products and
//! CUDA C kernels of its own, is one task on CubeCL's device thread.

use burn::tensor::DType;

#[cfg(feature = "cuda")]
mod ffi;
#[cfg(feature = "cuda")]
pub(crate) use ffi::training_layer_norm;
#[cfg(feature = "cuda")]
pub use ffi::{install, on_backend_stream};

/// Where cuBLASLt's products run (see the CUDA build's `ffi::on_backend_stream`): never,
/// without CUDA.
#[cfg(not(feature = "cuda"))]
pub fn on_backend_stream() -> Option<bool> {
    None
}

/// Products smaller than this many multiply-accumulates keep burn's kernels
/// (`PALM_GEMM_MIN_MACS` overrides it): none, every product goes to cuBLASLt. Measured on the
/// H200 (`docs/benchmarks.md`, items 37 and 39): training at batch 64 ran 386.7 samples/s with
/// 2³³ and 625.9 with 2²⁷; with every product routed, in one command against 2²⁷, training
/// went 73.0 → 81.2, 597.1 → 659.7 and 1,355.3 → 1,397.6 samples/s at batches 8, 64 and 256,
/// and beam search at batch 64 6,621.9 → 6,800.1 tokens/s. The products left to burn at 2²⁷
/// were small (a beam-search step's at batch 1, attention's at batch 8), and burn's autotuned
/// matmul costs fusion's thread more host time per call than a cuBLASLt call does.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub const MIN_MACS: usize = 0;

/// Whether cuBLASLt takes `[m, k] · [k, n]` in `dtype`, for products of at least `min_macs`
/// multiply-accumulates ([`MIN_MACS`] unless `PALM_GEMM_MIN_MACS` says otherwise: 0 sends
/// every product there, which the CUDA checks use on the small fixture model).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn routed(dtype: DType, m: usize, k: usize, n: usize, min_macs: usize) -> bool {
    let macs = m * k * n;
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16) && macs > 0 && macs >= min_macs
}

/// How cuBLASLt reads one operand: column-major `rows × cols` with leading dimension `ld`,
/// transposed or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Operand {
    rows: u64,
    cols: u64,
    ld: i64,
    transposed: bool,
}

/// The layout of a row-major `[r, c]` matrix with strides `[s0, s1]` as cuBLASLt sees its
/// memory (column-major), or `None` when neither the rows nor the columns are contiguous.
/// A row-major matrix is a column-major `c × r` one: its transpose, taken as is. A transposed
/// view (`s0 == 1`) is a column-major `r × c` matrix, taken transposed.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn operand(shape: [usize; 2], strides: [usize; 2]) -> Option<Operand> {
    let [r, c] = shape;
    let [s0, s1] = strides;
    // (stored rows, stored columns, leading dimension, transposed)
    let (rows, cols, ld, transposed) = if s1 == 1 && (r == 1 || s0 >= c) {
        (c, r, if r == 1 { c } else { s0 }, false)
    } else if s0 == 1 && (c == 1 || s1 >= r) {
        (r, c, if c == 1 { r } else { s1 }, true)
    } else {
        return None;
    };
    Some(Operand {
        rows: rows as u64,
        cols: cols as u64,
        ld: ld.max(1) as i64,
        transposed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_matrices_and_transposed_views_are_read_in_place() {
        // A contiguous [4, 6] matrix: column-major 6 × 4, leading dimension 6.
        assert_eq!(
            operand([4, 6], [6, 1]),
            Some(Operand {
                rows: 6,
                cols: 4,
                ld: 6,
                transposed: false
            })
        );
        // Its transposed view [6, 4] (strides [1, 6]): the same memory, taken transposed.
        assert_eq!(
            operand([6, 4], [1, 6]),
            Some(Operand {
                rows: 6,
                cols: 4,
                ld: 6,
                transposed: true
            })
        );
        // A padded row pitch is the leading dimension; single rows and columns are fine.
        assert_eq!(operand([4, 6], [8, 1]).map(|o| o.ld), Some(8));
        assert_eq!(operand([1, 6], [0, 1]).map(|o| o.ld), Some(6));
        assert_eq!(
            operand([6, 1], [1, 0]).map(|o| (o.ld, o.transposed)),
            Some((6, true))
        );
        // Neither axis contiguous (a strided slice): copied first.
        assert_eq!(operand([4, 6], [12, 2]), None);
    }

    #[test]
    fn small_and_unsupported_products_keep_burns_kernels() {
        // Training at batch 256 and at batch 8: every linear layer, forward and backward.
        assert!(routed(DType::F32, 16384, 768, 768, MIN_MACS));
        assert!(routed(DType::BF16, 768, 16384, 768, MIN_MACS));
        assert!(routed(DType::BF16, 1024, 768, 768, MIN_MACS));
        // Beam search at batch 64 (320 rows) and at batch 1 (5 rows).
        assert!(routed(DType::F32, 320, 768, 768, MIN_MACS));
        assert!(routed(DType::F32, 320, 768, 21128, MIN_MACS));
        assert!(routed(DType::F32, 5, 768, 768, MIN_MACS));
        // A threshold (PALM_GEMM_MIN_MACS) keeps the smaller products on burn's kernels.
        assert!(!routed(DType::F32, 5, 768, 768, 1 << 27));
        assert!(routed(DType::F32, 320, 768, 768, 1 << 27));
        assert!(!routed(DType::F64, 16384, 768, 768, 0));
        // An empty product has no valid cuBLASLt layout.
        assert!(!routed(DType::F32, 0, 768, 768, 0));
    }
}
