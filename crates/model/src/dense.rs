//! Linear maps over the last axis of `[.., d]` activations, computed as one `[rows, d]` matrix
//! product.
//!
//! burn's `Linear::forward` (and `matmul` against an unsqueezed weight) treats a `[b, t, d]`
//! input as a batch of `b` products with the weight broadcast over it. Two costs follow:
//! autodiff forms the weight gradient per batch entry, `[b, d_in, d_out]` (for the tied
//! generator at batch 256 that is 256 × 768 × 21128 floats, 16.6 GB), before summing it; and a
//! decoding step (`t = 1`) becomes `b` vector products that each read the whole weight. Folding
//! the leading axes into rows gives one GEMM forward and one per gradient, with the same
//! arithmetic per output element.

use burn::nn::Linear;
use burn::prelude::*;

/// `x · W + b` for `x [.., d_in]`, as one `[rows, d_in] · [d_in, d_out]` product.
pub fn dense<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let (rows, dims) = fold(&x);
    let y = layer.forward(x.reshape([rows, dims[D - 1]]));
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// `x · Wᵀ + bias` for `x [.., d]` and a `[n, d]` table `w` (a tied embedding), as one
/// `[rows, d] · [d, n]` product: the logits of an output layer.
pub fn project_onto<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    bias: Tensor<B, 1>,
) -> Tensor<B, D> {
    let (rows, dims) = fold(&x);
    let [n, _] = w.dims();
    let y = x.reshape([rows, dims[D - 1]]).matmul(w.transpose()) + bias.unsqueeze::<2>();
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// Number of rows once the leading axes are folded, and the shape.
fn fold<B: Backend, const D: usize>(x: &Tensor<B, D>) -> (usize, [usize; D]) {
    let dims = x.dims();
    (dims[..D - 1].iter().product(), dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;
    use burn_autodiff::Autodiff;
    use burn_ndarray::{NdArray, NdArrayDevice};

    type B = Autodiff<NdArray<f32>>;

    #[test]
    fn folded_products_match_the_broadcast_ones_with_their_gradients() {
        let device = NdArrayDevice::Cpu;
        let normal = Distribution::Normal(0.0, 1.0);
        let layer = LinearConfig::new(6, 5).init::<B>(&device);
        let x = Tensor::<B, 3>::random([3, 4, 6], normal, &device).require_grad();
        // A tied [n, d] table and its bias, as the generator has.
        let table = Tensor::<B, 2>::random([7, 6], normal, &device).require_grad();
        let bias = Tensor::<B, 1>::random([7], normal, &device).require_grad();

        let folded = |x: Tensor<B, 3>| {
            (
                dense(&layer, x.clone()),
                project_onto(x, table.clone(), bias.clone()),
            )
        };
        let broadcast = |x: Tensor<B, 3>| {
            (
                layer.forward(x.clone()),
                x.matmul(table.clone().transpose().unsqueeze::<3>())
                    + bias.clone().unsqueeze::<3>(),
            )
        };
        let (y, logits) = folded(x.clone());
        let (y_ref, logits_ref) = broadcast(x.clone());
        assert_eq!((y.dims(), logits.dims()), ([3, 4, 5], [3, 4, 7]));
        let close =
            |a: TensorData, b: TensorData| a.assert_approx_eq::<f32>(&b, Default::default());
        close(y.to_data(), y_ref.to_data());
        close(logits.to_data(), logits_ref.to_data());

        // The same gradients reach the input, the weight, the table and the bias.
        let loss = |(y, logits): (Tensor<B, 3>, Tensor<B, 3>)| {
            y.powi_scalar(2).sum() + (logits * 0.5).exp().sum()
        };
        let g = loss((y, logits)).backward();
        let g_ref = loss((y_ref, logits_ref)).backward();
        let grads = |g| {
            [
                x.grad(g).unwrap().to_data(),
                layer.weight.val().grad(g).unwrap().to_data(),
                table.grad(g).unwrap().to_data(),
                bias.grad(g).unwrap().to_data(),
            ]
        };
        for (a, b) in grads(&g).into_iter().zip(grads(&g_ref)) {
            close(a, b);
        }
    }
}
