//! The attention core, in one place so a fused kernel can replace it later.

use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::dense::product;

/// The fill value of masked scores. PALM's decoder uses -1e18 (not -inf), which makes a fully
/// masked row a uniform average instead of NaN (`palm-reference.md` §2.5); BERT's additive
/// mask (`finfo.min`) gives the same result wherever a row has one unmasked key.
pub const MASK_FILL: f32 = -1e18;

/// `softmax(q·kᵀ + mask) · v` with `q` already scaled.
///
/// Shapes: `q [b, h, tq, dh]`, `k`/`v` `[b, h, tk, dh]`, `mask` broadcastable to
/// `[b, h, tq, tk]` with `true` where the key is hidden. Dropout on the probabilities only when
/// `dropout > 0` and the backend tracks gradients.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    dropout: &burn::nn::Dropout,
) -> Tensor<B, 4> {
    let mut scores = product(q, k.swap_dims(2, 3));
    if let Some(mask) = mask {
        let shape = scores.dims();
        scores = scores.mask_fill(mask.expand(shape), MASK_FILL);
    }
    let probs = dropout.forward(softmax(scores, 3));
    product(probs, v)
}

/// `[b, t, h·dh]` → `[b, h, t, dh]`.
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, t, d] = x.dims();
    x.reshape([b, t, heads, d / heads]).swap_dims(1, 2)
}

/// `[b, h, t, dh]` → `[b, t, h·dh]`.
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, dh] = x.dims();
    x.swap_dims(1, 2).reshape([b, t, h * dh])
}
