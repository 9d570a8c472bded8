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
pub mod checkpoint;
pub mod config;
pub mod fit;
pub mod loss;
pub mod model;
pub mod optim;
pub mod output;
pub mod plot;
pub mod pretrain;
pub mod render;
pub mod run;
pub mod schedule;

pub use config::RunConfig;
pub use loss::{LabelSmoothedLoss, LossOutput};
pub use schedule::{InverseSqrtWarmup, Schedule};

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
    #[error("{reason}; training stopped. {}", match checkpoint {
        Some(p) => format!("The last good checkpoint is {}", p.display()),
        None => "No checkpoint had been written yet".to_owned(),
    })]
    NonFinite {
        /// What happened.
        reason: String,
        /// The newest complete checkpoint.
        checkpoint: Option<PathBuf>,
    },
    /// A bad `config.toml` or setting.
    #[error("{path}: {message}")]
    Config {
        /// The file (or flag source).
        path: PathBuf,
        /// What is wrong, with the line or key.
        message: String,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A fresh run was asked for in a directory that holds one.
    #[error(
        "{dir} already holds a run (config.toml); continue it with --resume or choose another --out"
    )]
    RunExists {
        /// The run directory.
        dir: PathBuf,
    },
    /// `--resume` on a directory without a run.
    #[error("{dir} holds no run to resume (no config.toml)")]
    NothingToResume {
        /// The run directory.
        dir: PathBuf,
    },
    /// Training was stopped by the user (the TUI's quit key).
    #[error("training was interrupted; continue it with --resume --out {dir}")]
    Interrupted {
        /// The run directory.
        dir: PathBuf,
    },
    /// The loss plot could not be drawn.
    #[error("{path}: cannot draw the loss curve: {message}")]
    Plot {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
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
