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
use burn::tensor::DType;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::FusionTensor;
use palm_model::dense::{AffineOperands, product_dtype};

use super::{Cube, Extra, FusionR, Gpu, cube_product, fusion_product, min_macs, unwrap, wrap};
use crate::cublaslt::routed;

/// The operands' type for a product of `own`-typed tensors: the product type if one is set.
fn operand_dtype(own: DType) -> DType {
    product_dtype().map_or(own, Into::into)
}

/// Whether the affine map takes `x [m, k] · w [k, n] + bias`: a bias, one float type for the
/// three, and a product cuBLASLt takes.
fn takes(x: [usize; 2], w: [usize; 2], dtypes: [DType; 3], bias: bool) -> bool {
    let ([m, k], [_, n]) = (x, w);
    bias && dtypes.iter().all(|&d| d == dtypes[0])
        && matches!(dtypes[0], DType::F32 | DType::BF16)
        && routed(operand_dtype(dtypes[0]), m, k, n, min_macs())
}

/// The affine map of the autodiff backend (training).
pub(super) fn autodiff(
    (x, w, bias): AffineOperands<Autodiff<Gpu>>,
) -> Result<Tensor<Autodiff<Gpu>, 2>, Box<AffineOperands<Autodiff<Gpu>>>> {
    let dtypes = [
        x.dtype(),
        w.dtype(),
        bias.as_ref().map_or(x.dtype(), |b| b.dtype()),
    ];
    if !takes(x.dims(), w.dims(), dtypes, bias.is_some()) {
        return Err(Box::new((x, w, bias)));
    }
    let bias = bias.expect("taken with a bias");

    #[derive(Debug)]
    struct AffineBackward;

    impl Backward<Gpu, 3> for AffineBackward {
        /// `x` and `W` in the operands' type.
        type State = (FusionTensor<FusionR>, FusionTensor<FusionR>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let g = grads.consume::<Gpu>(&ops.node);
            let (x, w) = ops.state;
            let own = g.dtype;
            let g = cast(g, x.dtype);
            let [x_node, w_node, bias_node] = ops.parents;
            if let Some(node) = x_node {
                let (dx, _) = fusion_product(g.clone(), Gpu::float_transpose(w), own, Extra::None);
                grads.register::<Gpu>(node.id, dx);
            }
            if w_node.is_some() || bias_node.is_some() {
                let (dw, db) = fusion_product(Gpu::float_transpose(x), g, own, Extra::BiasGrad);
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
    let own = xp.primitive.dtype;
    let operands = operand_dtype(own);
    let (xc, wc) = (
        cast_input(xp.primitive, operands),
        cast(wp.primitive, operands),
    );
    let (y, _) = fusion_product(xc.clone(), wc.clone(), own, Extra::Bias(bp.primitive));
    let y = match AffineBackward
        .prepare::<NoCheckpointing>([xp.node, wp.node, bp.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xc, wc), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Ok(wrap(y))
}

/// The affine map of the fusion backend (a training run's validation).
pub(super) fn fusion(
    (x, w, bias): AffineOperands<Gpu>,
) -> Result<Tensor<Gpu, 2>, Box<AffineOperands<Gpu>>> {
    let dtypes = [
        x.dtype(),
        w.dtype(),
        bias.as_ref().map_or(x.dtype(), |b| b.dtype()),
    ];
    if !takes(x.dims(), w.dims(), dtypes, bias.is_some()) {
        return Err(Box::new((x, w, bias)));
    }
    let bias: FloatTensor<Gpu> = bias.expect("taken with a bias").into_primitive().tensor();
    let (x, w) = (unwrap(x), unwrap(w));
    let own = x.dtype;
    let operands = operand_dtype(own);
    let (x, w) = (cast(x, operands), cast(w, operands));
    Ok(wrap(fusion_product(x, w, own, Extra::Bias(bias)).0))
}

/// The affine map of the backend without fusion (inference).
pub(super) fn cube(
    (x, w, bias): AffineOperands<Cube>,
) -> Result<Tensor<Cube, 2>, Box<AffineOperands<Cube>>> {
    let dtypes = [
        x.dtype(),
        w.dtype(),
        bias.as_ref().map_or(x.dtype(), |b| b.dtype()),
    ];
    if !takes(x.dims(), w.dims(), dtypes, bias.is_some()) {
        return Err(Box::new((x, w, bias)));
    }
    let bias: CubeTensor<CudaRuntime> = bias.expect("taken with a bias").into_primitive().tensor();
    let (x, w): (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) = (unwrap(x), unwrap(w));
    let own = x.dtype;
    let operands = operand_dtype(own);
    let cast = |t: CubeTensor<CudaRuntime>| {
        if t.dtype == operands {
            t
        } else {
            Cube::float_cast(t, operands.into())
        }
    };
    let (x, w) = (cast(x), cast(w));
    Ok(wrap(cube_product(x, w, own, Extra::Bias(bias)).0))
}

thread_local! {
    /// The latest inputs cast to the product type, by tensor (fusion's tensor ids are never
    /// reused): the query, key and value projections read one input, and the twelve decoder
    /// layers' cross-attention keys and values all read the encoder's output.
    static CAST_INPUTS: std::cell::RefCell<Vec<(burn_ir::TensorId, FusionTensor<FusionR>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// How many cast inputs [`CAST_INPUTS`] keeps (the least recently used goes first).
const CAST_INPUTS_KEPT: usize = 4;

/// [`cast`] for a linear layer's input, casting a tensor once however many layers read it.
fn cast_input(t: FusionTensor<FusionR>, dtype: DType) -> FusionTensor<FusionR> {
    if t.dtype == dtype {
        return t;
    }
    CAST_INPUTS.with(|kept| {
        let mut kept = kept.borrow_mut();
        let hit = kept
            .iter()
            .position(|(id, c)| *id == t.id && c.dtype == dtype);
        let entry = match hit {
            Some(i) => kept.remove(i),
            None => (t.id, cast(t, dtype)),
        };
        let cast = entry.1.clone();
        kept.push(entry);
        if kept.len() > CAST_INPUTS_KEPT {
            kept.remove(0);
        }
        cast
    })
}

/// `t` in `dtype` (itself when it is already).
fn cast(t: FusionTensor<FusionR>, dtype: DType) -> FusionTensor<FusionR> {
    if t.dtype == dtype {
        t
    } else {
        Gpu::float_cast(t, dtype.into())
    }
}
