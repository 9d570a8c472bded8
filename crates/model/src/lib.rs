//! The PALM encoder-decoder in burn: configuration, network, KV cache and checkpoint import.
//!
//! `palm-model` owns the network of PALM 2.0 as ModelScope runs it (`palm-reference.md` §2):
//! a post-LN BERT encoder and a pre-norm decoder with a tied generator. [`ModelConfig`] reads
//! the reference `config.json` files and has the `tiny` and `base_zh` presets. It works on
//! token ids and tensors only: no tokenizers, no arrow, no burn-train.
//!
//! ```
//! use palm_model::ModelConfig;
//!
//! // PALM 2.0 Chinese base has 231,937,928 parameters (pooler included, tied matrix once).
//! assert_eq!(ModelConfig::base_zh().num_params(), 231_937_928);
//! ```

pub mod attention;
pub mod config;
pub mod decoder;
pub mod dense;
pub mod encoder;
pub mod export;
pub mod grad;
pub mod import;
mod init;
pub mod mlm;
pub mod palm;
pub mod registry;

pub use config::{BertConfig, ModelConfig, PalmConfig};
pub use decoder::DecoderCache;
pub use palm::{Memory, Palm};

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A checkpoint could not be loaded: unreadable, or a parameter missing, unexpected or
    /// misshaped (named in the message).
    #[error("{path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong, naming the parameter.
        message: String,
    },
    /// A configuration value is invalid or unsupported.
    #[error("{path}: {}{message}", if key.is_empty() { String::new() } else { format!("key {key:?}: ") })]
    Config {
        /// The config file.
        path: String,
        /// The key at fault (empty for a parse error).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
