//! Learning-rate schedules. The reference's is ModelScope's card recipe: `LambdaLR` stepped per
//! optimizer step with factor `min(s^−0.5, s·W^−1.5)`, `s` counted from 1 (`palm-reference.md` §4).
//! [`Schedule`] adds the usual alternatives (linear, cosine, constant after warm-up).

use burn::lr_scheduler::LrScheduler;
use burn::optim::LearningRate;
use burn::prelude::*;

use crate::config::ScheduleKind;

/// `lr · min(s^−0.5, s·W^−1.5)` at step `s` (from 1): linear warm-up to `lr·W^−0.5` at `s = W`,
/// then inverse square root decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InverseSqrtWarmup {
    /// Base learning rate (the card: 1e-3).
    pub lr: f64,
    /// Warm-up steps W (the card: 500).
    pub warmup: usize,
    /// Steps taken so far.
    pub step: usize,
}

impl InverseSqrtWarmup {
    /// A schedule at step 0.
    pub fn new(lr: f64, warmup: usize) -> Self {
        InverseSqrtWarmup {
            lr,
            warmup: warmup.max(1),
            step: 0,
        }
    }

    /// The learning rate of step `s` (counted from 1).
    pub fn at(&self, s: usize) -> f64 {
        let s = s.max(1) as f64;
        let w = self.warmup as f64;
        self.lr * s.powf(-0.5).min(s * w.powf(-1.5))
    }
}

impl LrScheduler for InverseSqrtWarmup {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> LearningRate {
        self.step += 1;
        self.at(self.step)
    }

    fn to_record<B: Backend>(&self) -> Self::Record<B> {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: Self::Record<B>) -> Self {
        self.step = record;
        self
    }
}

/// A schedule of any [`ScheduleKind`], stepped once per optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// The shape.
    pub kind: ScheduleKind,
    /// Base (peak, except for inverse-sqrt) learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Optimizer steps of the whole run (where linear and cosine reach 0).
    pub total: usize,
    /// Steps taken so far.
    pub step: usize,
}

impl Schedule {
    /// A schedule at step 0.
    pub fn new(kind: ScheduleKind, lr: f64, warmup: usize, total: usize) -> Self {
        Schedule {
            kind,
            lr,
            warmup,
            total: total.max(1),
            step: 0,
        }
    }

    /// The learning rate of step `s` (counted from 1).
    pub fn at(&self, s: usize) -> f64 {
        let s = s.max(1);
        let warm = |s: usize| self.lr * s as f64 / self.warmup.max(1) as f64;
        let after = |s: usize| {
            // Fraction of the post-warm-up steps done, in [0, 1].
            let span = self.total.saturating_sub(self.warmup).max(1) as f64;
            ((s - self.warmup) as f64 / span).min(1.0)
        };
        match self.kind {
            ScheduleKind::InverseSqrt => InverseSqrtWarmup::new(self.lr, self.warmup).at(s),
            _ if s <= self.warmup => warm(s),
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Linear => self.lr * (1.0 - after(s)),
            ScheduleKind::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * after(s)).cos()),
        }
    }
}

impl LrScheduler for Schedule {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> LearningRate {
        self.step += 1;
        self.at(self.step)
    }

    fn to_record<B: Backend>(&self) -> Self::Record<B> {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: Self::Record<B>) -> Self {
        self.step = record;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternatives_warm_up_then_decay_to_zero() {
        for kind in [
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
            ScheduleKind::Constant,
        ] {
            let s = Schedule::new(kind, 1e-3, 10, 110);
            assert!((s.at(5) - 5e-4).abs() < 1e-15, "{kind:?}");
            assert!((s.at(10) - 1e-3).abs() < 1e-15, "{kind:?}");
            let end = s.at(110);
            match kind {
                ScheduleKind::Constant => assert_eq!(end, 1e-3),
                _ => assert!(end.abs() < 1e-15, "{kind:?}: {end}"),
            }
        }
        let linear = Schedule::new(ScheduleKind::Linear, 1e-3, 10, 110);
        assert!((linear.at(60) - 5e-4).abs() < 1e-15);
        let cosine = Schedule::new(ScheduleKind::Cosine, 1e-3, 10, 110);
        assert!((cosine.at(60) - 5e-4).abs() < 1e-15);
        assert!(cosine.at(35) > linear.at(35));
        let inv = Schedule::new(ScheduleKind::InverseSqrt, 1e-3, 500, 1);
        assert_eq!(inv.at(777), InverseSqrtWarmup::new(1e-3, 500).at(777));
    }

    /// Values of PyTorch's `LambdaLR` with the reference lambda, base lr 1e-3, W = 500, after
    /// 0, 1, 498, 499, 500 and 10,000 `scheduler.step()` calls.
    #[test]
    fn matches_lambda_lr() {
        let s = InverseSqrtWarmup::new(1e-3, 500);
        let w15 = 500f64.powf(-1.5);
        for (calls, want) in [
            (0usize, 1e-3 * w15),
            (1, 1e-3 * 2.0 * w15),
            (498, 1e-3 * 499.0 * w15),
            (499, 1e-3 * 500f64.powf(-0.5)),
            (500, 1e-3 * 501f64.powf(-0.5)),
            (10_000, 1e-3 * 10_001f64.powf(-0.5)),
        ] {
            assert!(
                (s.at(calls + 1) - want).abs() < 1e-15,
                "{calls}: {} vs {want}",
                s.at(calls + 1)
            );
        }
        // The peak is at step 500 (LambdaLR's s = 499): ≈ 4.47e-5.
        assert!((s.at(500) - 4.472_135_955e-5).abs() < 1e-12);
    }

    #[test]
    fn scheduler_steps_and_restores() {
        let mut s = InverseSqrtWarmup::new(1e-3, 10);
        let first = s.step();
        assert_eq!(first, s.at(1));
        for _ in 0..4 {
            s.step();
        }
        let saved: usize = LrScheduler::to_record::<burn_ndarray::NdArray<f32>>(&s);
        let restored =
            InverseSqrtWarmup::new(1e-3, 10).load_record::<burn_ndarray::NdArray<f32>>(saved);
        assert_eq!(restored, s);
    }
}
