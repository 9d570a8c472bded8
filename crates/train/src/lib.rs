//! Training PALM with burn-train: batcher, label-smoothed loss, schedule, checkpoints.
//!
//! `palm-train` owns what turns prepared shards into a trained model: the reference's
//! label-smoothed loss ([`loss`]) and learning-rate schedule ([`schedule`]), and (with the
//! training issue) the batcher, burn-train's `Learner`, metrics and checkpoints.
//!
//! ```
//! use palm_train::schedule::InverseSqrtWarmup;
//!
//! // ModelScope's card recipe: lr 1e-3, 500 warm-up steps; the peak is at step 500.
//! let s = InverseSqrtWarmup::new(1e-3, 500);
//! assert!(s.at(500) > s.at(499) && s.at(500) > s.at(501));
//! ```

pub mod loss;
pub mod schedule;

pub use loss::{LabelSmoothedLoss, LossOutput};
pub use schedule::InverseSqrtWarmup;
