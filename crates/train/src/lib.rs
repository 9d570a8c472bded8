//! Training PALM with burn-train: batcher, label-smoothed loss, schedule, the run driver.
//!
//! `palm-train` owns what turns text pairs into a trained model: the reference's
//! label-smoothed loss ([`loss`]) and learning-rate schedule ([`schedule`]), the batcher
//! ([`batch`]), the burn-train wrapper ([`model`]) and a whole run ([`run`]): vocabulary,
//! `Learner`, the native model directory, and test scores next to two baselines.
//!
//! ```
//! use palm_train::schedule::InverseSqrtWarmup;
//!
//! // ModelScope's card recipe: lr 1e-3, 500 warm-up steps; the peak is at step 500.
//! let s = InverseSqrtWarmup::new(1e-3, 500);
//! assert!(s.at(500) > s.at(499) && s.at(500) > s.at(501));
//! ```

pub mod batch;
pub mod loss;
pub mod model;
pub mod render;
pub mod run;
pub mod schedule;

pub use loss::{LabelSmoothedLoss, LossOutput};
pub use schedule::InverseSqrtWarmup;

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the run could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Bad training data.
    #[error(transparent)]
    Data(#[from] palm_data::Error),
    /// A model could not be loaded or saved.
    #[error(transparent)]
    Model(#[from] palm_model::Error),
    /// A vocabulary could not be built.
    #[error(transparent)]
    Tokenizer(#[from] palm_tokenizer::Error),
    /// Training stopped on a NaN or infinite loss; no model directory was written.
    #[error(
        "{reason}; training stopped. Earlier epochs' checkpoints, if any, are in {checkpoints}"
    )]
    NonFinite {
        /// What happened.
        reason: String,
        /// The checkpoint directory.
        checkpoints: PathBuf,
    },
    /// Scoring failed.
    #[error(transparent)]
    Eval(#[from] palm_eval::Error),
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
