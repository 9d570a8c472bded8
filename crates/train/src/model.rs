//! The training wrapper: PALM plus its loss, as burn-train's `TrainStep` / `InferenceStep`.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_train::{InferenceStep, SequenceOutput, TrainOutput, TrainStep};
use palm_model::Palm;

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
}

impl<B: Backend> PalmTraining<B> {
    /// Wraps a model; `smoothing` is the label smoothing ε.
    pub fn new(palm: Palm<B>, smoothing: f64) -> Self {
        PalmTraining {
            palm,
            smoothing,
            grad_scale: 1.0,
        }
    }

    /// Scales the loss before `backward` (not the reported loss): with `k`-step gradient
    /// accumulation, `1 / k` makes the summed gradients those of the mean loss.
    pub fn with_grad_scale(mut self, scale: f64) -> Self {
        self.grad_scale = scale;
        self
    }

    fn criterion(&self) -> LabelSmoothedLoss {
        LabelSmoothedLoss {
            smoothing: self.smoothing,
            vocab_size: self.palm.vocab_size(),
            pad: self.palm.pad_id(),
        }
    }

    /// The summed loss and token count of a batch.
    pub fn loss(&self, batch: PalmBatch<B>) -> LossOutput<B> {
        let lp = self.palm.forward(batch.src, batch.tgt_in);
        self.criterion().forward(lp, batch.gold)
    }

    /// Loss (per non-PAD target token) and log-probabilities of a batch.
    pub fn forward_loss(&self, batch: PalmBatch<B>) -> SequenceOutput<B> {
        let lp = self.palm.forward(batch.src, batch.tgt_in);
        let loss = self.criterion().forward(lp.clone(), batch.gold.clone());
        SequenceOutput::new(loss.mean(), lp, None, batch.gold)
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
