//! The training wrapper: PALM plus its loss, as burn-train's `TrainStep` / `InferenceStep`.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_train::{InferenceStep, Interrupter, SequenceOutput, TrainOutput, TrainStep};
use palm_model::Palm;

use crate::batch::PalmBatch;
use crate::loss::{LabelSmoothedLoss, LossOutput};

/// Stops burn-train's loop when a training loss is NaN or infinite.
#[derive(Clone, Default)]
pub struct NonFiniteGuard(pub Option<Interrupter>);

impl std::fmt::Debug for NonFiniteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonFiniteGuard")
    }
}

/// PALM with the label-smoothed loss it is trained with.
#[derive(Module, Debug)]
pub struct PalmTraining<B: Backend> {
    /// The network.
    pub palm: Palm<B>,
    smoothing: f64,
    #[module(skip)]
    guard: NonFiniteGuard,
}

impl<B: Backend> PalmTraining<B> {
    /// Wraps a model; `smoothing` is the label smoothing ε.
    pub fn new(palm: Palm<B>, smoothing: f64) -> Self {
        PalmTraining {
            palm,
            smoothing,
            guard: NonFiniteGuard::default(),
        }
    }

    /// Stops training through `interrupter` when a loss is not finite. This reads the loss
    /// back to the host at every step.
    pub fn with_guard(mut self, interrupter: Interrupter) -> Self {
        self.guard = NonFiniteGuard(Some(interrupter));
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
        if let Some(interrupter) = &self.guard.0 {
            let value: f64 = out.loss.clone().into_scalar().elem();
            if !value.is_finite() {
                interrupter.stop(Some(&format!("the training loss became {value}")));
            }
        }
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl<B: Backend> InferenceStep for PalmTraining<B> {
    type Input = PalmBatch<B>;
    type Output = SequenceOutput<B>;

    fn step(&self, batch: PalmBatch<B>) -> SequenceOutput<B> {
        self.forward_loss(batch)
    }
}
