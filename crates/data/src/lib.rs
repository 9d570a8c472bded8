//! Readers for text-generation corpora and zstd Parquet shards of token ids.
//!
//! `palm-data` owns the path from raw files to training-ready shards: readers for jsonl, csv,
//! tsv and Parquet with field mapping, and for LCSTS, ADGEN (AdvertiseGen) and DuReader_robust-QG
//! in their published formats ([`reader`]); [`prepare`], which streams any input size in bounded
//! memory into Parquet shards with `src_ids`, `tgt_ids`, `src_text` and `tgt_text`; and
//! [`shards`], which reads them back. Tokenization comes from `palm-tokenizer`; this crate must
//! not depend on burn.
//!
//! ```
//! use palm_data::reader::{Format, ReaderOptions, open};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("train.jsonl");
//! std::fs::write(&path, "{\"src\": \"类型#上衣*颜色#白色\", \"tgt\": \"白色上衣\"}\n").unwrap();
//! let rows: Vec<_> = open(&path, &ReaderOptions::new(Format::Auto)).unwrap()
//!     .collect::<Result<_, _>>().unwrap();
//! assert_eq!(rows[0].src, "类型#上衣*颜色#白色");
//! assert_eq!(rows[0].tgt, "白色上衣");
//! ```

pub mod documents;
pub mod prepare;
pub mod reader;
pub mod shards;

use std::path::PathBuf;

/// Errors of this crate. Each names the file and, where there is one, the line or row.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A row is malformed.
    #[error("{path}:{line}: {message}")]
    Row {
        /// The file.
        path: PathBuf,
        /// 1-based line (or row, for Parquet input).
        line: u64,
        /// What is wrong with it.
        message: String,
    },
    /// A file as a whole is unusable (bad Parquet, unknown format, missing column).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The output exists already.
    #[error("{0}: already exists; remove it or choose another --output")]
    OutputExists(PathBuf),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn row(path: impl Into<PathBuf>, line: u64, message: impl ToString) -> Self {
        Error::Row {
            path: path.into(),
            line,
            message: message.to_string(),
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        Error::File {
            path: path.into(),
            message: message.to_string(),
        }
    }

    /// Whether this error is about one row (and `--skip-invalid` may skip it).
    pub fn is_row_error(&self) -> bool {
        matches!(self, Error::Row { .. })
    }
}

/// One source/target pair and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Source (context) text.
    pub src: String,
    /// Target text.
    pub tgt: String,
    /// 1-based line (or row) of the example in its file.
    pub line: u64,
}
