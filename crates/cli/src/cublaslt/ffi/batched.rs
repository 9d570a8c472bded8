//! Attention's batched products (`[b, h, m, k] · [b, h, k, n]`) through cuBLASLt's strided
//! batches, operands in the product type and results written in the tensors' own type.
//!
//! burn runs them on its own matmul kernels (216 launches and 16 ms of a `bf16-mixed` training
//! step at batch 256, `palm bench --trace`), each wrapped in casts to bf16 and back; here
//! 1,131 → 1,189 samples/s at batch 256 (2026-12-01, `docs/benchmarks.md` item 30).
//! `PALM_ATTENTION_GEMM=burn` switches back.

use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, Shape, TensorPrimitive};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::FusionTensor;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use palm_model::dense::{BatchedOperands, product_dtype};

use super::{Cube, Epilogue, FusionR, Gpu, Handle, Problem, cast, enqueue, min_macs};
use crate::cublaslt::{Operand, operand, routed};

/// Batched products smaller than this many multiply-accumulates in all keep burn's kernels
/// (attention at batch 256: the encoder's 3.2·10⁹, the decoder's 0.8 and 1.6·10⁹).
const MIN_MACS: usize = 1 << 29;

/// How cuBLASLt reads one `[b, h, r, c]` operand: its matrix layout and the offset between
/// consecutive matrices, when `(b, h)` steps through memory uniformly.
fn batched_layout(t: &CubeTensor<CudaRuntime>) -> Option<(Operand, i64)> {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    let [b, h, r, c] = [shape[0], shape[1], shape[2], shape[3]];
    let [sb, sh, s0, s1] = [strides[0], strides[1], strides[2], strides[3]];
    let step = match (b, h) {
        (_, 1) => sb,
        (1, _) => sh,
        _ if sb == h * sh => sh,
        _ => return None,
    };
    operand([r, c], [s0, s1]).map(|l| (l, step as i64))
}

/// `a · b` for `[b, h, m, k]` and `[b, h, k, n]` CubeCL tensors of one type, written in
/// `out_dtype` as a contiguous `[b, h, m, n]`; with the operands as cuBLASLt read them (each
/// itself, or its contiguous copy where its heads do not step uniformly).
fn cube_batched(
    a: CubeTensor<CudaRuntime>,
    b: CubeTensor<CudaRuntime>,
    out_dtype: DType,
) -> [CubeTensor<CudaRuntime>; 3] {
    let readable = |t: CubeTensor<CudaRuntime>| match batched_layout(&t) {
        Some(l) => (t, l),
        None => {
            let t = burn_cubecl::kernel::into_contiguous(t);
            let l = batched_layout(&t).expect("a contiguous tensor steps uniformly");
            (t, l)
        }
    };
    let shape = a.meta.shape().clone();
    let [bs, hs, m] = [shape[0], shape[1], shape[2]];
    let n = b.meta.shape()[3];
    let (a, (a_layout, a_step)) = readable(a);
    let (b, (b_layout, b_step)) = readable(b);
    let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        a.client.clone(),
        a.device.clone(),
        Shape::new([bs, hs, m, n]),
        out_dtype,
    );
    // As for one product: cuBLASLt computes the column-major transposes, B's first.
    let problem = Problem {
        dtype: a.dtype,
        out: out_dtype,
        vector: out_dtype,
        epilogue: Epilogue::None,
        first: b_layout,
        second: a_layout,
        batch: (bs * hs) as u64,
        batch_strides: [b_step, a_step, (m * n) as i64],
        m: n as u64,
        n: m as u64,
        align: [0; 3],
    };
    enqueue(problem, [&b, &a, &out], None).unwrap_or_else(|e| {
        panic!(
            "cuBLASLt batch of {} [{m}, ?] x [?, {n}] in {:?}: {e:#}",
            bs * hs,
            a.dtype
        )
    });
    [out, a, b]
}

/// [`cube_batched`] as a custom operation of the fusion backend: the product, and the
/// operands as read for those of `keep` that are set (so that a later product reads them
/// without copying them again).
fn fusion_batched(
    a: FusionTensor<FusionR>,
    b: FusionTensor<FusionR>,
    out_dtype: DType,
    keep: [bool; 2],
) -> (FusionTensor<FusionR>, [Option<FusionTensor<FusionR>>; 2]) {
    #[derive(Debug)]
    struct BatchedOp {
        desc: CustomOpIr,
        out: DType,
        keep: [bool; 2],
    }

    impl Operation<FusionR> for BatchedOp {
        fn execute(&self, handles: &mut HandleContainer<Handle>) {
            let [a, b] = &self.desc.inputs[..] else {
                unreachable!("two operands")
            };
            let a = handles.get_float_tensor::<Cube>(a);
            let b = handles.get_float_tensor::<Cube>(b);
            let [y, a, b] = cube_batched(a, b, self.out);
            let mut outputs = self.desc.outputs.iter();
            let mut put = |t| {
                let ir = outputs.next().expect("an output per result kept");
                handles.register_float_tensor::<Cube>(&ir.id, t);
            };
            put(y);
            for (kept, t) in self.keep.into_iter().zip([a, b]) {
                if kept {
                    put(t);
                }
            }
        }
    }

    let shape = Shape::new([a.shape[0], a.shape[1], a.shape[2], b.shape[3]]);
    let client = a.client.clone();
    let streams = OperationStreams::with_inputs([&a, &b]);
    let mut outputs = vec![TensorIr::uninit(
        client.create_empty_handle(),
        shape,
        out_dtype,
    )];
    for (kept, t) in keep.into_iter().zip([&a, &b]) {
        if kept {
            outputs.push(TensorIr::uninit(
                client.create_empty_handle(),
                t.shape.clone(),
                t.dtype,
            ));
        }
    }
    let desc = CustomOpIr::new(
        "palm_cublaslt_batched",
        &[a.into_ir(), b.into_ir()],
        &outputs,
    );
    let mut results = client
        .register(
            streams,
            OperationIr::Custom(desc.clone()),
            BatchedOp {
                desc,
                out: out_dtype,
                keep,
            },
        )
        .into_iter();
    let y = results.next().expect("the product");
    let kept = keep.map(|k| k.then(|| results.next().expect("an operand kept")));
    (y, kept)
}

/// [`fusion_batched`] keeping neither operand.
const NONE: [bool; 2] = [false, false];

/// Attention's batched product on the autodiff backend (training): operands cast to the
/// product type, the result and both gradients written in the tensors' own type.
pub(super) fn autodiff(
    operands: BatchedOperands<Autodiff<Gpu>>,
    out: FloatDType,
) -> Result<Tensor<Autodiff<Gpu>, 4>, Box<BatchedOperands<Autodiff<Gpu>>>> {
    autodiff_keeping(operands, out, false)
}

/// [`autodiff`] with the operands kept as the forward product read them, for the backward
/// pass (the default; `PALM_ATTENTION_GEMM=recopy` for [`autodiff`]): with bf16 heads
/// (`Narrow::Heads`) no cast makes a `[b, t, h, dh]`-viewed operand contiguous, so each
/// product copies it, and without the kept copies the backward pass's two products copy the
/// saved view again, as they copy the output's gradient once each. Measured on the H200
/// (eighth run, call 1, batch 256): 144 fewer launches a step, 1,370.8 → 1,449.4 samples/s.
pub(super) fn autodiff_kept(
    operands: BatchedOperands<Autodiff<Gpu>>,
    out: FloatDType,
) -> Result<Tensor<Autodiff<Gpu>, 4>, Box<BatchedOperands<Autodiff<Gpu>>>> {
    autodiff_keeping(operands, out, true)
}

/// The batched product of the autodiff backend, the operands as read kept or not.
pub(super) fn autodiff_keeping(
    (a, b): BatchedOperands<Autodiff<Gpu>>,
    out: FloatDType,
    keep: bool,
) -> Result<Tensor<Autodiff<Gpu>, 4>, Box<BatchedOperands<Autodiff<Gpu>>>> {
    let ([bs, hs, m, k], [b2, h2, k2, n]) = (a.dims(), b.dims());
    let own = a.dtype();
    let operands: DType = product_dtype().map_or(own, Into::into);
    let macs = bs * hs * m * k * n;
    if [bs, hs, k] != [b2, h2, k2]
        || b.dtype() != own
        || !matches!(own, DType::F32 | DType::BF16)
        || !routed(operands, 1, 1, macs, min_macs().min(MIN_MACS))
    {
        return Err(Box::new((a, b)));
    }
    let out: DType = out.into();

    #[derive(Debug)]
    struct BatchedBackward;

    impl Backward<Gpu, 2> for BatchedBackward {
        /// Both operands in the product type, their own types, and whether the products keep
        /// what they read ([`autodiff_kept`]).
        type State = (
            FusionTensor<FusionR>,
            FusionTensor<FusionR>,
            DType,
            DType,
            bool,
        );

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (a, b, a_dtype, b_dtype, keep) = ops.state;
            if !keep {
                binary::<Gpu, _, _>(
                    ops.parents,
                    ops.node,
                    grads,
                    |g| {
                        let g = cast(g, b.dtype);
                        fusion_batched(g, Gpu::float_swap_dims(b.clone(), 2, 3), a_dtype, NONE).0
                    },
                    |g| {
                        let g = cast(g, a.dtype);
                        fusion_batched(Gpu::float_swap_dims(a.clone(), 2, 3), g, b_dtype, NONE).0
                    },
                );
                return;
            }
            // Both operands are in one type: the output's gradient is cast to it once, and the
            // first product hands its copy of it (if it made one) to the second.
            let g = cast(grads.consume::<Gpu>(&ops.node), a.dtype);
            let [a_node, b_node] = ops.parents;
            let mut g_read = g.clone();
            if let Some(node) = a_node {
                let (da, [kept, _]) = fusion_batched(
                    g,
                    Gpu::float_swap_dims(b, 2, 3),
                    a_dtype,
                    [b_node.is_some(), false],
                );
                if let Some(kept) = kept {
                    g_read = kept;
                }
                grads.register::<Gpu>(node.id, da);
            }
            if let Some(node) = b_node {
                let (db, _) = fusion_batched(Gpu::float_swap_dims(a, 2, 3), g_read, b_dtype, NONE);
                grads.register::<Gpu>(node.id, db);
            }
        }
    }

    let (ap, bp) = (a.into_primitive().tensor(), b.into_primitive().tensor());
    let (a_dtype, b_dtype) = (ap.primitive.dtype, bp.primitive.dtype);
    let (ac, bc) = (cast(ap.primitive, operands), cast(bp.primitive, operands));
    let (y, [a_read, b_read]) = fusion_batched(ac.clone(), bc.clone(), out, [keep, keep]);
    let (ac, bc) = (a_read.unwrap_or(ac), b_read.unwrap_or(bc));
    let y = match BatchedBackward
        .prepare::<NoCheckpointing>([ap.node, bp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((ac, bc, a_dtype, b_dtype, keep), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(y)))
}
