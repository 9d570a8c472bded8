//! The attention core, in one place so a fused kernel can replace it later.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::*;

use burn::tensor::FloatDType;
use burn::tensor::ops::AttentionModuleOptions;

use crate::dense::{batched_product, batched_product_in, cast_to, for_product};
use crate::registry::PerBackend;

/// The fill value of masked scores. PALM's decoder uses -1e18 (not -inf), which makes a fully
/// masked row a uniform average instead of NaN (`palm-reference.md` §2.5); BERT's additive
/// mask (`finfo.min`) gives the same result wherever a row has one unmasked key.
pub const MASK_FILL: f32 = -1e18;

/// The operands of attention's probabilities: scores `[b, h, tq, tk]`, the mask (`true` where
/// the key is hidden, broadcastable to the scores), the dropout probability and the float type
/// of the probabilities (the scores' own, or the product type when the queries, keys and
/// values are in it, [`Narrow::Heads`](crate::dense::Narrow::Heads)).
pub type ProbsOperands<B> = (Tensor<B, 4>, Option<Tensor<B, 4, Bool>>, f64, FloatDType);

/// The masked softmax of the scores with dropout in one operation for one backend (device
/// kernels with their own backward pass); it hands the operands back (`Err`) for scores it
/// does not take.
pub type Probs<B> = fn(ProbsOperands<B>) -> Result<Tensor<B, 4>, Box<ProbsOperands<B>>>;

static PROBS: PerBackend = PerBackend::new();

/// Computes [`attention`]'s probabilities on backend `B` through `probs` (`None`: the mask
/// fill, softmax and dropout as separate operations again).
pub fn set_attention_probs<B: Backend>(probs: Option<Probs<B>>) {
    PROBS.set::<B, _>(probs);
}

/// `softmax(q·kᵀ + mask) · v` with `q` already scaled, in `q`'s float type.
///
/// Shapes: `q [b, h, tq, dh]`, `k`/`v` `[b, h, tk, dh]`, `mask` broadcastable to
/// `[b, h, tq, tk]` with `true` where the key is hidden. Dropout on the probabilities only when
/// `dropout > 0` and the backend tracks gradients. Queries in a half-precision type (bf16 or
/// f16, [`Narrow::Heads`](crate::dense::Narrow::Heads)) give f32 scores, normalised in f32,
/// and probabilities in the queries' type for the weighted sum, as autocast computes them.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    dropout: &burn::nn::Dropout,
) -> Tensor<B, 4> {
    let narrow: FloatDType = q.dtype().into();
    let wide = match narrow {
        FloatDType::BF16 | FloatDType::F16 => FloatDType::F32,
        other => other,
    };
    let scores = batched_product_in(q, k.swap_dims(2, 3), wide);
    let (mut scores, mask) = match PROBS.get::<B, Probs<B>>() {
        Some(f) => match f((scores, mask, dropout.prob, narrow)) {
            Ok(probs) => return batched_product(probs, v),
            Err(operands) => {
                let (scores, mask, _, _) = *operands;
                (scores, mask)
            }
        },
        None => (scores, mask),
    };
    if let Some(mask) = mask {
        let shape = scores.dims();
        scores = scores.mask_fill(mask.expand(shape), MASK_FILL);
    }
    let probs = crate::grad::dropout(dropout, crate::grad::softmax(scores));
    batched_product(cast_to(probs, narrow), v)
}

/// The operands of [`multi_head_attention`]: queries `[b, tq, h·dh]` (already scaled), keys and
/// values `[b, tk, h·dh]`, the number of heads `h`, the mask (broadcastable to
/// `[b, h, tq, tk]`, `true` where the key is hidden) and the dropout probability of the
/// attention probabilities.
pub type HeadsOperands<B> = (
    Tensor<B, 3>,
    Tensor<B, 3>,
    Tensor<B, 3>,
    usize,
    Tensor<B, 4, Bool>,
    f64,
);

/// Multi-head attention as one operation for one backend (device kernels that read each head
/// where the projections wrote it, with their own backward pass); it hands the operands back
/// (`Err`) for those it does not take.
pub type HeadsAttention<B> = fn(HeadsOperands<B>) -> Result<Tensor<B, 3>, Box<HeadsOperands<B>>>;

static HEADS: PerBackend = PerBackend::new();

/// Computes [`multi_head_attention`] on backend `B` through `f` (`None`: [`split_heads`],
/// [`attention`] and [`merge_heads`] again).
pub fn set_heads_attention<B: Backend>(f: Option<HeadsAttention<B>>) {
    HEADS.set::<B, _>(f);
}

/// Multi-head attention over the projections' rows: queries `[b, tq, h·dh]` (already scaled),
/// keys and values `[b, tk, h·dh]`, and the heads' outputs side by side, `[b, tq, h·dh]`.
/// Through the backend's [`HeadsAttention`] if one is set and takes the operands, else as
/// [`split_heads`], [`attention`] (its mask, dropout and float types) and [`merge_heads`].
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    mask: Tensor<B, 4, Bool>,
    dropout: &burn::nn::Dropout,
) -> Tensor<B, 3> {
    let (q, k, v, mask) = match HEADS.get::<B, HeadsAttention<B>>() {
        Some(f) => match f((q, k, v, heads, mask, dropout.prob)) {
            Ok(out) => return out,
            Err(operands) => {
                let (q, k, v, _, mask, _) = *operands;
                (q, k, v, mask)
            }
        },
        None => (q, k, v, mask),
    };
    let split = |x| split_heads(x, heads);
    merge_heads(attention(split(q), split(k), split(v), Some(mask), dropout))
}

/// `softmax(q·kᵀ / √dh, masked keys hidden) · v` through burn's fused attention op, which a
/// backend may run as one kernel (CubeCL autotunes its flash kernels against the decomposed
/// path; the CPU backend decomposes). `q` is *not* pre-scaled: the flash kernels take only
/// the default scale. No dropout, so inference only. Every query row needs a visible key: a
/// fully masked row comes out as zeros here, where [`attention`] gives the reference's uniform
/// average. Products run in the [`product_dtype`](crate::dense::product_dtype) when one is set.
pub fn fused_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    let [b, h, tq, _] = q.dims();
    let tk = k.dims()[2];
    let mask = Some(mask.expand([b, h, tq, tk]));
    let own: burn::tensor::FloatDType = q.dtype().into();
    let (q, k, v) = (for_product(q), for_product(k), for_product(v));
    burn::tensor::module::attention(q, k, v, mask, None, AttentionModuleOptions::default())
        .cast(own)
}

/// Whether the cached decoder step's cross-attention goes through [`fused_attention`] (the
/// default) or [`attention`]'s decomposition (`set_fused_cross_attention(false)`): the fused
/// op runs outside burn's fusion on the CUDA backend, so each of its parts is a launch of its
/// own, and which way costs less per beam-search step is measured, not assumed
/// (`docs/benchmarks.md`).
static FUSED_CROSS_ATTENTION: AtomicBool = AtomicBool::new(true);

/// Chooses the cross-attention of the cached decoder step (see [`fused_cross_attention`]).
pub fn set_fused_cross_attention(fused: bool) {
    FUSED_CROSS_ATTENTION.store(fused, Ordering::Relaxed);
}

/// Whether the cached decoder step uses [`fused_attention`] for its cross-attention.
pub fn fused_cross_attention() -> bool {
    FUSED_CROSS_ATTENTION.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn_ndarray::{NdArray, NdArrayDevice};

    type B = NdArray<f32>;

    #[test]
    fn probabilities_set_for_a_backend_replace_the_composed_ones_until_unset() {
        // Its own backend type (i16 indices): no other test sets probabilities for it.
        type G = NdArray<f32, i16>;
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        // Takes the scores of 5 keys (the masked softmax as burn computes it) and hands back
        // the rest.
        fn five_keys(
            (scores, mask, prob, dtype): ProbsOperands<G>,
        ) -> Result<Tensor<G, 4>, Box<ProbsOperands<G>>> {
            let shape = scores.dims();
            if shape[3] != 5 {
                return Err(Box::new((scores, mask, prob, dtype)));
            }
            CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mask = mask.expect("a mask").expand(shape);
            Ok(burn::tensor::activation::softmax(
                scores.mask_fill(mask, MASK_FILL),
                3,
            ))
        }
        let device = NdArrayDevice::Cpu;
        let normal = Distribution::Normal(0.0, 1.0);
        let no_dropout = burn::nn::DropoutConfig::new(0.0).init();
        let run = |tk: usize| {
            let q = Tensor::<G, 4>::random([2, 3, 4, 6], normal, &device);
            let k = Tensor::<G, 4>::random([2, 3, tk, 6], normal, &device);
            let v = Tensor::<G, 4>::random([2, 3, tk, 6], normal, &device);
            let hidden: Vec<bool> = (0..2 * tk).map(|i| i % tk == tk - 1).collect();
            let mask =
                Tensor::<G, 4, Bool>::from_data(TensorData::new(hidden, [2, 1, 1, tk]), &device);
            let out = || {
                attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(mask.clone()),
                    &no_dropout,
                )
                .into_data()
            };
            let plain = out();
            set_attention_probs::<G>(Some(five_keys));
            let set = out();
            set_attention_probs::<G>(None);
            set.assert_approx_eq::<f32>(&plain, Default::default());
            out().assert_approx_eq::<f32>(&plain, Default::default());
        };
        run(5);
        assert_eq!(
            CALLS.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "taken once, then unset"
        );
        run(7);
        assert_eq!(
            CALLS.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "7 keys handed back"
        );
    }

    #[test]
    fn heads_attention_set_for_a_backend_takes_what_it_accepts_and_hands_back_the_rest() {
        // Its own backend type: no other test sets heads attention for it.
        type H = NdArray<f64, i16>;
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        // Takes three query rows (answering with zeros), hands back anything else.
        fn three_rows(operands: HeadsOperands<H>) -> Result<Tensor<H, 3>, Box<HeadsOperands<H>>> {
            let q = &operands.0;
            if q.dims()[1] != 3 {
                return Err(Box::new(operands));
            }
            CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(q.zeros_like())
        }
        let device = NdArrayDevice::Cpu;
        let normal = Distribution::Normal(0.0, 1.0);
        let no_dropout = burn::nn::DropoutConfig::new(0.0).init();
        let (b, heads, tk, dh) = (2, 3, 5, 4);
        let k = Tensor::<H, 3>::random([b, tk, heads * dh], normal, &device);
        let v = Tensor::<H, 3>::random([b, tk, heads * dh], normal, &device);
        let hidden: Vec<bool> = (0..b * tk).map(|i| i == tk - 1).collect();
        let mask = Tensor::<H, 4, Bool>::from_data(TensorData::new(hidden, [b, 1, 1, tk]), &device);
        set_heads_attention::<H>(Some(three_rows));
        for tq in [3, 4] {
            let q = Tensor::<H, 3>::random([b, tq, heads * dh], normal, &device);
            let out = multi_head_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                heads,
                mask.clone(),
                &no_dropout,
            );
            let composed = merge_heads(attention(
                split_heads(q, heads),
                split_heads(k.clone(), heads),
                split_heads(v.clone(), heads),
                Some(mask.clone()),
                &no_dropout,
            ));
            assert_eq!(out.dims(), [b, tq, heads * dh]);
            if tq == 3 {
                assert_eq!(out.abs().max().into_scalar(), 0.0, "the backend's answer");
            } else {
                out.into_data().assert_eq(&composed.into_data(), true);
            }
        }
        set_heads_attention::<H>(None);
        assert_eq!(CALLS.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn the_fused_op_equals_the_reference_attention_where_a_key_is_visible() {
        let device = NdArrayDevice::Cpu;
        let normal = Distribution::Normal(0.0, 1.0);
        let (b, h, tq, tk, dh) = (2, 3, 5, 7, 12);
        let q = Tensor::<B, 4>::random([b, h, tq, dh], normal, &device);
        let k = Tensor::<B, 4>::random([b, h, tk, dh], normal, &device);
        let v = Tensor::<B, 4>::random([b, h, tk, dh], normal, &device);
        // Source padding as the decoder's cross-attention sees it: [b, 1, 1, tk].
        let hidden: Vec<bool> = (0..b * tk).map(|i| i % tk >= tk - 1 - i / tk * 2).collect();
        let mask = Tensor::<B, 4, Bool>::from_data(TensorData::new(hidden, [b, 1, 1, tk]), &device);
        let no_dropout = burn::nn::DropoutConfig::new(0.0).init();

        let fused = fused_attention(q.clone(), k.clone(), v.clone(), mask.clone());
        let reference = attention(
            q.div_scalar((dh as f64).sqrt()),
            k,
            v,
            Some(mask),
            &no_dropout,
        );
        fused
            .to_data()
            .assert_approx_eq::<f32>(&reference.to_data(), Default::default());
    }
}
