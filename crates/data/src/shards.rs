//! Reading prepared shards back: every row's ids and texts, shard by shard, or as a stream
//! through a shuffle buffer ([`ShuffledRows`]) so a dataset larger than memory can be trained on.

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

/// The rows of a shard directory as a stream in a shuffled order fixed by `(seed, epoch)`:
/// shards in a permuted order, rows read lazily record batch by record batch through a shuffle
/// buffer of `buffer` rows (each arriving row replaces a uniformly drawn buffered one, which is
/// yielded; the rest is drained in random order at the end). Every row comes out exactly once
/// per epoch and memory holds at most `buffer` rows plus one record batch.
pub struct ShuffledRows {
    shards: Vec<PathBuf>,
    next_shard: usize,
    reader: Option<(
        PathBuf,
        parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    )>,
    pending: std::vec::IntoIter<Row>,
    buffer: Vec<Row>,
    capacity: usize,
    rng: rand::rngs::StdRng,
    draining: bool,
}

impl ShuffledRows {
    /// A stream over the shards under `path` (see [`shard_files`]).
    pub fn new(path: &Path, buffer: usize, seed: u64, epoch: u64) -> Result<Self> {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut shards = shard_files(path)?;
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        shards.shuffle(&mut rng);
        Ok(ShuffledRows {
            shards,
            next_shard: 0,
            reader: None,
            pending: Vec::new().into_iter(),
            buffer: Vec::with_capacity(buffer.max(1)),
            capacity: buffer.max(1),
            rng,
            draining: false,
        })
    }

    /// The next row read from the shards, in file order.
    fn read_next(&mut self) -> Result<Option<Row>> {
        loop {
            if let Some(row) = self.pending.next() {
                return Ok(Some(row));
            }
            if let Some((path, reader)) = &mut self.reader {
                match reader.next() {
                    Some(batch) => {
                        let batch = batch.map_err(|e| Error::file(&*path, e))?;
                        let rows = batch_rows(&batch).map_err(|m| Error::file(&*path, m))?;
                        self.pending = rows.into_iter();
                        continue;
                    }
                    None => self.reader = None,
                }
            }
            let Some(path) = self.shards.get(self.next_shard).cloned() else {
                return Ok(None);
            };
            self.next_shard += 1;
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| Error::file(&path, format!("not a readable Parquet file: {e}")))?
                .with_batch_size(1024)
                .build()
                .map_err(|e| Error::file(&path, e))?;
            self.reader = Some((path, reader));
        }
    }
}

impl Iterator for ShuffledRows {
    type Item = Result<Row>;

    fn next(&mut self) -> Option<Result<Row>> {
        use rand::RngExt;
        use rand::seq::SliceRandom;
        while !self.draining {
            match self.read_next() {
                Err(e) => return Some(Err(e)),
                Ok(None) => {
                    self.draining = true;
                    self.buffer.shuffle(&mut self.rng);
                }
                Ok(Some(row)) if self.buffer.len() < self.capacity => self.buffer.push(row),
                Ok(Some(row)) => {
                    let j = self.rng.random_range(0..self.buffer.len());
                    return Some(Ok(std::mem::replace(&mut self.buffer[j], row)));
                }
            }
        }
        self.buffer.pop().map(Ok)
    }
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
