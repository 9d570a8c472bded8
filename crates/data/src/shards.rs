//! Reading prepared shards back: every row's ids and texts, shard by shard.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::{Error, Result};

/// One prepared row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `[CLS] … [SEP]` source ids.
    pub src_ids: Vec<u32>,
    /// `[CLS] … [SEP]` target ids.
    pub tgt_ids: Vec<u32>,
    /// The original source text.
    pub src_text: String,
    /// The original target text.
    pub tgt_text: String,
}

/// The shard files of a prepared directory (or a single `.parquet` file), in name order.
pub fn shard_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(path, "no .parquet shards"));
    }
    Ok(files)
}

/// Reads every row of one shard.
pub fn read_shard(path: &Path) -> Result<Vec<Row>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::file(path, format!("not a readable Parquet file: {e}")))?
        .build()
        .map_err(|e| Error::file(path, e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| Error::file(path, e))?;
        rows.extend(batch_rows(&batch).map_err(|m| Error::file(path, m))?);
    }
    Ok(rows)
}

/// Reads every row of every shard under `path`.
pub fn read_all(path: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for f in shard_files(path)? {
        rows.extend(read_shard(&f)?);
    }
    Ok(rows)
}

fn batch_rows(batch: &RecordBatch) -> std::result::Result<Vec<Row>, String> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| format!("no column {name:?}"))
    };
    let ids = |name: &str| -> std::result::Result<Vec<Vec<u32>>, String> {
        let list = col(name)?
            .as_list_opt::<i32>()
            .ok_or_else(|| format!("column {name:?} is not a list of u32"))?;
        (0..list.len())
            .map(|i| {
                let v = list.value(i);
                v.as_primitive_opt::<UInt32Type>()
                    .map(|a| a.values().to_vec())
                    .ok_or_else(|| format!("column {name:?} is not a list of u32"))
            })
            .collect()
    };
    let texts = |name: &str| -> std::result::Result<Vec<String>, String> {
        let a = col(name)?
            .as_string_opt::<i32>()
            .ok_or_else(|| format!("column {name:?} is not a string column"))?;
        Ok((0..a.len()).map(|i| a.value(i).to_owned()).collect())
    };
    let (s, t, st, tt) = (
        ids("src_ids")?,
        ids("tgt_ids")?,
        texts("src_text")?,
        texts("tgt_text")?,
    );
    Ok(s.into_iter()
        .zip(t)
        .zip(st.into_iter().zip(tt))
        .map(|((src_ids, tgt_ids), (src_text, tgt_text))| Row {
            src_ids,
            tgt_ids,
            src_text,
            tgt_text,
        })
        .collect())
}
