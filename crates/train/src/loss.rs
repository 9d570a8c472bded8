//! The label-smoothed loss of the reference (`NMTLossCompute` + `LabelSmoothingLoss`,
//! `palm-reference.md` §4).
//!
//! The smoothed target puts `1 − ε` on the gold token, `ε / (V − 2)` on every other token but
//! PAD, and 0 on PAD; rows whose gold token is PAD are all zero. The loss is
//! `Σ KL(q ‖ p) = Σ q·(log q − log p)`. The reference returns this sum over the batch (its
//! division by the token count is discarded); we train on the sum divided by the number of
//! non-PAD target tokens, which only rescales the gradient by a batch-dependent factor (Adam
//! is nearly invariant to it) and makes the value comparable across batch sizes.
//! [`LabelSmoothedLoss::sum`] gives the reference's value.

use burn::prelude::*;

/// Label-smoothed KL over a vocabulary with a padding id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelSmoothedLoss {
    /// ε; 0 gives the summed NLL ignoring PAD.
    pub smoothing: f64,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// The PAD id.
    pub pad: i64,
}

/// The loss of one batch.
#[derive(Debug, Clone)]
pub struct LossOutput<B: Backend> {
    /// The reference's summed loss, `[1]`.
    pub sum: Tensor<B, 1>,
    /// Number of non-PAD target tokens, `[1]`.
    pub tokens: Tensor<B, 1>,
}

impl<B: Backend> LossOutput<B> {
    /// Sum divided by the non-PAD token count: what training minimises.
    pub fn mean(&self) -> Tensor<B, 1> {
        self.sum.clone() / self.tokens.clone().clamp_min(1.0)
    }
}

impl LabelSmoothedLoss {
    /// `Σ q log q` of one non-PAD row, a constant.
    fn entropy_term(&self) -> f64 {
        let conf = 1.0 - self.smoothing;
        let s = self.smoothing / (self.vocab_size as f64 - 2.0);
        let xlogx = |x: f64| if x > 0.0 { x * x.ln() } else { 0.0 };
        xlogx(conf) + (self.vocab_size as f64 - 2.0) * xlogx(s)
    }

    /// The loss of log-probabilities `[b, t, V]` against gold ids `[b, t]`.
    ///
    /// Computed without materialising the smoothed distribution:
    /// `KL = Σ q log q − (1 − ε)·lp[gold] − s·(Σ_v lp[v] − lp[gold] − lp[PAD])`.
    pub fn forward<B: Backend>(
        &self,
        log_probs: Tensor<B, 3>,
        gold: Tensor<B, 2, Int>,
    ) -> LossOutput<B> {
        let [b, t, v] = log_probs.dims();
        self.rows(log_probs.reshape([b * t, v]), None, gold.reshape([b * t]))
    }

    /// The same loss from the logits `[b, t, V]` (before log-softmax), without materialising
    /// the log-probabilities: with `lse` the row's log-sum-exp, `lp[v] = z[v] − lse`, so the
    /// loss needs only `z[gold]`, `z[PAD]`, `Σ_v z[v]` and `lse`, reductions of the logits.
    /// Training uses it; its gradient equals [`LabelSmoothedLoss::forward`]'s through a
    /// log-softmax. On a backend with `palm_model::grad`'s written-out operations installed,
    /// the cross-entropy and its one-pass backward come from there.
    pub fn forward_logits<B: Backend>(
        &self,
        logits: Tensor<B, 3>,
        gold: Tensor<B, 2, Int>,
    ) -> LossOutput<B> {
        let [b, t, v] = logits.dims();
        let z = logits.reshape([b * t, v]);
        let gold = gold.reshape([b * t]);
        let pad = usize::try_from(self.pad).ok().filter(|&p| p < v);
        if let Some(pad) = pad
            && let Some(ce) = palm_model::grad::smoothed_cross_entropy(
                z.clone(),
                gold.clone(),
                pad,
                self.smoothing,
            )
        {
            let per_row = if self.smoothing > 0.0 {
                ce.add_scalar(self.entropy_term())
            } else {
                ce
            };
            return self.masked_sum(per_row, gold);
        }
        let max = z.clone().detach().max_dim(1);
        let lse = ((z.clone() - max.clone()).exp().sum_dim(1).log() + max).reshape([b * t]);
        self.rows(z, Some(lse), gold)
    }

    /// The sum of `per_row` over the rows whose gold id is not PAD, and their count.
    fn masked_sum<B: Backend>(
        &self,
        per_row: Tensor<B, 1>,
        gold: Tensor<B, 1, Int>,
    ) -> LossOutput<B> {
        let keep = gold.not_equal_elem(self.pad).float();
        LossOutput {
            sum: (per_row * keep.clone()).sum(),
            tokens: keep.sum(),
        }
    }

    /// The loss of rows `x [n, V]` whose log-probabilities are `x − offset` (no offset: `x`
    /// are log-probabilities) against gold ids `[n]`.
    fn rows<B: Backend>(
        &self,
        x: Tensor<B, 2>,
        offset: Option<Tensor<B, 1>>,
        gold: Tensor<B, 1, Int>,
    ) -> LossOutput<B> {
        let [n, v] = x.dims();
        let shifted = |t: Tensor<B, 1>, times: f64| match &offset {
            Some(o) => t - o.clone().mul_scalar(times),
            None => t,
        };
        let lp_gold = shifted(
            x.clone()
                .gather(1, gold.clone().unsqueeze_dim::<2>(1))
                .reshape([n]),
            1.0,
        );
        let conf = 1.0 - self.smoothing;
        let per_row = if self.smoothing > 0.0 {
            let s = self.smoothing / (v as f64 - 2.0);
            let pad = x.clone().slice(s![.., self.pad..self.pad + 1]).reshape([n]);
            let lp_pad = shifted(pad, 1.0);
            let lp_sum = shifted(x.sum_dim(1).reshape([n]), v as f64);
            let rest = lp_sum - lp_gold.clone() - lp_pad;
            lp_gold.mul_scalar(-conf) - rest.mul_scalar(s) + self.entropy_term()
        } else {
            lp_gold.neg()
        };
        self.masked_sum(per_row, gold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_ndarray::{NdArray, NdArrayDevice};

    type B = NdArray<f32>;

    #[test]
    fn pad_rows_are_zero_and_perfect_predictions_cost_the_entropy() {
        let d = NdArrayDevice::Cpu;
        let loss = LabelSmoothedLoss {
            smoothing: 0.1,
            vocab_size: 4,
            pad: 0,
        };
        // The model predicts exactly the smoothed target for gold 2: p = [0, .05, .9, .05].
        let p = [1e-30f32, 0.05, 0.9, 0.05].map(|x| x.ln());
        let lp = Tensor::<B, 3>::from_data(TensorData::new([p, p].concat(), [1, 2, 4]), &d);
        let gold = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![2i64, 0], [1, 2]), &d);
        let out = loss.forward(lp, gold);
        let sum: f32 = out.sum.into_scalar();
        let tokens: f32 = out.tokens.into_scalar();
        assert_eq!(tokens, 1.0);
        // KL of a distribution with itself is 0 (PAD's probability is never weighted).
        assert!(sum.abs() < 1e-5, "{sum}");
    }

    #[test]
    fn the_loss_from_logits_equals_the_loss_from_log_probs_with_its_gradient() {
        the_loss_from_logits_matches::<B>(false);
    }

    /// The same with `palm_model::grad`'s written-out cross-entropy installed (on a backend
    /// type no other test here uses: installing is process-wide).
    #[test]
    fn the_written_out_loss_from_logits_equals_the_loss_from_log_probs_with_its_gradient() {
        the_loss_from_logits_matches::<NdArray<f64>>(true);
    }

    fn the_loss_from_logits_matches<B: Backend<Device = NdArrayDevice>>(written: bool) {
        use burn::tensor::Distribution;
        use burn::tensor::activation::log_softmax;
        type A<B> = burn_autodiff::Autodiff<B>;
        palm_model::grad::install::<B>(written);
        assert_eq!(palm_model::grad::installed::<A<B>>(), written);
        let d = NdArrayDevice::Cpu;
        let gold = Tensor::<A<B>, 2, Int>::from_data(
            TensorData::new(vec![3i64, 0, 5, 1, 2, 0], [2, 3]),
            &d,
        );
        for smoothing in [0.0, 0.1] {
            let loss = LabelSmoothedLoss {
                smoothing,
                vocab_size: 7,
                pad: 0,
            };
            let z = Tensor::<A<B>, 3>::random([2, 3, 7], Distribution::Normal(0.0, 3.0), &d)
                .require_grad();
            let a = loss.forward_logits(z.clone(), gold.clone());
            let b = loss.forward(log_softmax(z.clone(), 2), gold.clone());
            let close =
                |x: TensorData, y: TensorData| x.assert_approx_eq::<f32>(&y, Default::default());
            close(a.sum.to_data(), b.sum.to_data());
            close(a.tokens.to_data(), b.tokens.to_data());
            let ga = z.grad(&a.mean().backward()).unwrap();
            let gb = z.grad(&b.mean().backward()).unwrap();
            close(ga.to_data(), gb.to_data());
        }
    }
}
