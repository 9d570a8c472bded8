//! Linear layers as single cuBLASLt calls: `x · W + b` with the bias in the product's
//! epilogue, and backward the bias gradient in the weight gradient's epilogue.
//!
//! Composed from burn operations, a `bf16-mixed` linear layer is five autodiff operations (two
//! casts to bf16, the product, the cast of its result to f32, the bias addition) and, backward,
//! two more casts to f32 and a two-stage column sum for the bias: about nine launches besides
//! the three products, on a training step bound by the host's cost per launch (some 4,600
//! launches at batch 256). Here it is one autodiff operation: forward the two casts and one
//! product writing f32 with the bias added; backward one cast of the gradient and two products
//! writing f32, the second also summing the gradient's columns.

use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, FloatDType};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::FusionTensor;
use palm_model::dense::{AffineOperands, product_dtype};

use super::shadow::take_or_cast;
use super::{
    Cube, Extra, FusionR, Gpu, cast, cube_product, fusion_product, min_macs, unwrap, wrap,
};
use crate::cublaslt::routed;

/// The operands' type for a product of `own`-typed tensors: the product type if one is set.
fn operand_dtype(own: DType) -> DType {
    product_dtype().map_or(own, Into::into)
}

/// Whether the affine map takes `x [m, k] · w [k, n] + bias` into `out`: a bias of `w`'s type
/// (f32 or bf16), `x` and `out` in that type or the product type, and a product cuBLASLt
/// takes.
fn takes<B: Backend>((x, w, bias): &AffineOperands<B>, out: DType) -> bool {
    let ([m, k], [_, n]) = (x.dims(), w.dims());
    let own = w.dtype();
    let operands = operand_dtype(own);
    bias.as_ref().is_some_and(|b| b.dtype() == own)
        && matches!(own, DType::F32 | DType::BF16)
        && [x.dtype(), out].iter().all(|&d| d == own || d == operands)
        && routed(operands, m, k, n, min_macs())
}

/// The affine map of the autodiff backend (training).
pub(super) fn autodiff(
    operands: AffineOperands<Autodiff<Gpu>>,
    out: FloatDType,
) -> Result<Tensor<Autodiff<Gpu>, 2>, Box<AffineOperands<Autodiff<Gpu>>>> {
    let out: DType = out.into();
    if !takes(&operands, out) {
        return Err(Box::new(operands));
    }
    let (x, w, bias) = operands;
    let bias = bias.expect("taken with a bias");

    #[derive(Debug)]
    struct AffineBackward;

    impl Backward<Gpu, 3> for AffineBackward {
        /// `x` and `W` in the operands' type, and their own types (the gradients').
        type State = (FusionTensor<FusionR>, FusionTensor<FusionR>, DType, DType);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g = grads.consume::<Gpu>(&ops.node);
            let (x, w, x_dtype, w_dtype) = ops.state;
            let g = cast(g, x.dtype);
            let [x_node, w_node, bias_node] = ops.parents;
            if let Some(node) = x_node {
                let (dx, _) =
                    fusion_product(g.clone(), Gpu::float_transpose(w), x_dtype, Extra::None);
                grads.register::<Gpu>(node.id, dx);
            }
            if w_node.is_some() || bias_node.is_some() {
                let (dw, db) = fusion_product(Gpu::float_transpose(x), g, w_dtype, Extra::BiasGrad);
                if let Some(node) = w_node {
                    grads.register::<Gpu>(node.id, dw);
                }
                if let Some(node) = bias_node {
                    grads.register::<Gpu>(node.id, db.expect("the bias gradient"));
                }
            }
        }
    }

    let (xp, wp, bp) = (unwrap(x), unwrap(w), bias.into_primitive().tensor());
    let (x_dtype, w_dtype) = (xp.primitive.dtype, wp.primitive.dtype);
    let operands = operand_dtype(w_dtype);
    // The weight's and the bias's copies in the operands' type, when the optimizer left them.
    let (xc, wc) = (
        cast(xp.primitive, operands),
        take_or_cast(wp.primitive, operands),
    );
    // cuBLASLt adds a bias of the result's type (a bf16 result with an f32 bias is an invalid
    // value to its heuristic); autocast casts the bias too.
    let bias = take_or_cast(bp.primitive, out);
    let (y, _) = fusion_product(xc.clone(), wc.clone(), out, Extra::Bias(bias));
    let y = match AffineBackward
        .prepare::<NoCheckpointing>([xp.node, wp.node, bp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xc, wc, x_dtype, w_dtype), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Ok(wrap(y))
}

/// The affine map of the fusion backend (a training run's validation).
pub(super) fn fusion(
    operands: AffineOperands<Gpu>,
    out: FloatDType,
) -> Result<Tensor<Gpu, 2>, Box<AffineOperands<Gpu>>> {
    let out: DType = out.into();
    if !takes(&operands, out) {
        return Err(Box::new(operands));
    }
    let (x, w, bias) = operands;
    let bias: FloatTensor<Gpu> = bias.expect("taken with a bias").into_primitive().tensor();
    let (x, w): (FusionTensor<FusionR>, FusionTensor<FusionR>) = (unwrap(x), unwrap(w));
    let operands = operand_dtype(w.dtype);
    let (x, w, bias) = (cast(x, operands), cast(w, operands), cast(bias, out));
    Ok(wrap(fusion_product(x, w, out, Extra::Bias(bias)).0))
}

/// The affine map of the backend without fusion (inference).
pub(super) fn cube(
    operands: AffineOperands<Cube>,
    out: FloatDType,
) -> Result<Tensor<Cube, 2>, Box<AffineOperands<Cube>>> {
    let out: DType = out.into();
    if !takes(&operands, out) {
        return Err(Box::new(operands));
    }
    let (x, w, bias) = operands;
    let bias: CubeTensor<CudaRuntime> = bias.expect("taken with a bias").into_primitive().tensor();
    let (x, w): (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) = (unwrap(x), unwrap(w));
    let operands = operand_dtype(w.dtype);
    let cast = |t: CubeTensor<CudaRuntime>, dtype: DType| {
        if t.dtype == dtype {
            t
        } else {
            Cube::float_cast(t, dtype.into())
        }
    };
    let (x, w, bias) = (cast(x, operands), cast(w, operands), cast(bias, out));
    Ok(wrap(cube_product(x, w, out, Extra::Bias(bias)).0))
}
