//! Training PALM with burn-train: batcher, label-smoothed loss, schedule, checkpoints.
//!
//! `palm-train` will own fine-tuning and pre-training with burn-train's `Learner`: the batcher
//! that pads and shifts targets, the label-smoothed loss of `palm-reference.md` §4, the
//! reference's warm-up schedule, metrics and checkpoints. It lands with the training issue; this
//! crate holds its dependencies until then.
