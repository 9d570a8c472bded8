//! The training wrapper: PALM plus its loss, as burn-train's `TrainStep` / `InferenceStep`.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_train::{InferenceStep, SequenceOutput, TrainOutput, TrainStep};
use palm_model::mlm::MlmHead;
use palm_model::{Memory, Palm};

use crate::batch::PalmBatch;
use crate::loss::{LabelSmoothedLoss, LossOutput};
use crate::output::PalmOutput;

/// PALM with the label-smoothed loss it is trained with.
#[derive(Module, Debug)]
pub struct PalmTraining<B: Backend> {
    /// The network.
    pub palm: Palm<B>,
    smoothing: f64,
    /// Gradients are taken of `loss × grad_scale` (1 / accumulation steps).
    grad_scale: f64,
    /// Pre-training: the masked-LM head on the encoder output.
    pub mlm: Option<MlmHead<B>>,
    /// Pre-training: weights of the masked-LM and the decoder loss.
    weights: [f64; 2],
}

/// Masked-LM sums of a batch.
#[derive(Debug, Clone)]
pub struct MlmOutput<B: Backend> {
    /// Summed negative log-likelihood over masked positions, `[1]`.
    pub sum: Tensor<B, 1>,
    /// Masked positions predicted right, `[1]`.
    pub correct: Tensor<B, 1>,
    /// Masked positions, `[1]`.
    pub count: Tensor<B, 1>,
}

impl<B: Backend> PalmTraining<B> {
    /// Wraps a model; `smoothing` is the label smoothing ε.
    pub fn new(palm: Palm<B>, smoothing: f64) -> Self {
        PalmTraining {
            palm,
            smoothing,
            grad_scale: 1.0,
            mlm: None,
            weights: [1.0, 1.0],
        }
    }

    /// Adds the masked-LM head for pre-training; the objective becomes
    /// `mlm_weight · MLM + lm_weight · decoder loss` (each per token) on batches with labels.
    pub fn with_mlm(mut self, head: MlmHead<B>, mlm_weight: f64, lm_weight: f64) -> Self {
        self.mlm = Some(head);
        self.weights = [mlm_weight, lm_weight];
        self
    }

    /// Masked-LM sums of the encoder states of `src` against `labels` (PAD = not a target).
    pub fn mlm_loss(&self, memory: &Memory<B>, labels: Tensor<B, 2, Int>) -> Option<MlmOutput<B>> {
        let head = self.mlm.as_ref()?;
        let lp = head.forward(&self.palm, memory.hidden.clone());
        let mask = labels.clone().not_equal_elem(self.palm.pad_id());
        let mask_f = mask.clone().float();
        let picked = lp
            .clone()
            .gather(2, labels.clone().unsqueeze_dim(2))
            .squeeze_dim::<2>(2);
        let sum = (picked * mask_f.clone()).sum().neg();
        let predicted = lp.argmax(2).squeeze_dim::<2>(2);
        let correct = (predicted.equal(labels).float() * mask_f.clone()).sum();
        Some(MlmOutput {
            sum,
            correct,
            count: mask_f.sum(),
        })
    }

    /// Scales the loss before `backward` (not the reported loss): with `k`-step gradient
    /// accumulation, `1 / k` makes the summed gradients those of the mean loss.
    pub fn with_grad_scale(mut self, scale: f64) -> Self {
        self.grad_scale = scale;
        self
    }

    pub(crate) fn criterion(&self) -> LabelSmoothedLoss {
        LabelSmoothedLoss {
            smoothing: self.smoothing,
            vocab_size: self.palm.vocab_size(),
            pad: self.palm.pad_id(),
        }
    }

    /// The summed loss and token count of a batch.
    pub fn loss(&self, batch: PalmBatch<B>) -> LossOutput<B> {
        let memory = self.palm.encode(batch.src);
        let logits = self
            .palm
            .generate_logits(self.palm.decode_hidden(&memory, batch.tgt_in));
        self.criterion().forward_logits(logits, batch.gold)
    }

    /// Loss (per non-PAD target token; in pre-training the weighted sum with the masked-LM
    /// loss per masked token) and the decoder's logits of a batch (the metrics normalise
    /// them). The loss is taken from the logits: no `[tokens × vocab]` log-probabilities.
    pub fn forward_loss(&self, batch: PalmBatch<B>) -> SequenceOutput<B> {
        let memory = self.palm.encode(batch.src);
        let logits = self
            .palm
            .generate_logits(self.palm.decode_hidden(&memory, batch.tgt_in));
        let mut loss = self
            .criterion()
            .forward_logits(logits.clone(), batch.gold.clone())
            .mean();
        if let Some(labels) = batch.mlm_labels
            && let Some(mlm) = self.mlm_loss(&memory, labels)
        {
            let [w_mlm, w_lm] = self.weights;
            loss = loss.mul_scalar(w_lm) + (mlm.sum / mlm.count.clamp_min(1.0)).mul_scalar(w_mlm);
        }
        SequenceOutput::new(loss, logits, None, batch.gold)
    }
}

impl<B: AutodiffBackend> TrainStep for PalmTraining<B> {
    type Input = PalmBatch<B>;
    type Output = SequenceOutput<B>;

    fn step(&self, batch: PalmBatch<B>) -> TrainOutput<SequenceOutput<B>> {
        let out = self.forward_loss(batch);
        let grads = if self.grad_scale == 1.0 {
            out.loss.backward()
        } else {
            out.loss.clone().mul_scalar(self.grad_scale).backward()
        };
        TrainOutput::new(self, grads, out)
    }
}

impl<B: Backend> InferenceStep for PalmTraining<B> {
    type Input = PalmBatch<B>;
    type Output = PalmOutput<B>;

    /// The teacher-forced output; the training loop adds decoded text where it decodes.
    fn step(&self, batch: PalmBatch<B>) -> PalmOutput<B> {
        PalmOutput {
            seq: self.forward_loss(batch),
            generated: Default::default(),
        }
    }
}
