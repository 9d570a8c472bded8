//! `palm prepare`: stream examples into zstd Parquet shards of token ids.
//!
//! Memory stays bounded whatever the input size: examples are read, tokenized and written in
//! chunks, and a shard is closed every `shard_rows` rows. Nothing appears at the output path
//! until the whole input has been read without error: shards are written into a temporary
//! directory beside it, which is renamed at the end (and removed on failure).
//!
//! With a shuffle seed the rows come out in a uniformly random order fixed by the seed, still in
//! bounded memory (an external shuffle): each tokenized row goes to one of [`SHUFFLE_BUCKETS`]
//! temporary bucket files drawn at random, then each bucket is read back, shuffled in memory
//! and appended to the shards. Memory holds one bucket (about rows / 64) at the end.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, UInt32Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use palm_tokenizer::PalmTokenizer;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{Error, Example, Result};

/// Options of [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Source ids per row at most, `[CLS]` and `[SEP]` included.
    pub max_src_len: usize,
    /// Target ids per row at most, `[CLS]` and `[SEP]` included.
    pub max_tgt_len: usize,
    /// Rows per shard file.
    pub shard_rows: usize,
    /// Examples tokenized and written together.
    pub chunk_rows: usize,
    /// Skip malformed rows (counting them) instead of stopping at the first.
    pub skip_invalid: bool,
    /// Allow an empty target (inference-only data).
    pub allow_empty_target: bool,
    /// Write the rows in a random order fixed by this seed instead of the input order.
    pub shuffle_seed: Option<u64>,
}

/// Temporary buckets of the external shuffle.
pub const SHUFFLE_BUCKETS: usize = 64;

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            max_src_len: 512,
            max_tgt_len: 512,
            shard_rows: 500_000,
            chunk_rows: 8192,
            skip_invalid: false,
            allow_empty_target: false,
            shuffle_seed: None,
        }
    }
}

/// What [`prepare`] did; also written as `meta.json` beside the shards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrepareReport {
    /// Rows written.
    pub rows: u64,
    /// Malformed rows skipped (with `skip_invalid`).
    pub skipped: u64,
    /// Shard file names, in order.
    pub shards: Vec<String>,
    /// Sources cut to `max_src_len`.
    pub truncated_src: u64,
    /// Targets cut to `max_tgt_len`.
    pub truncated_tgt: u64,
    /// Mean source length in ids.
    pub mean_src_len: f64,
    /// Mean target length in ids.
    pub mean_tgt_len: f64,
    /// Longest source in ids (after truncation).
    pub max_src_len: usize,
    /// Longest target in ids (after truncation).
    pub max_tgt_len: usize,
    /// Vocabulary size of the tokenizer that made the ids.
    pub vocab_size: usize,
}

/// The shards' Arrow schema.
pub fn schema() -> SchemaRef {
    let ids = |name: &str| {
        Field::new(
            name,
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))),
            false,
        )
    };
    Arc::new(Schema::new(vec![
        ids("src_ids"),
        ids("tgt_ids"),
        Field::new("src_text", DataType::Utf8, false),
        Field::new("tgt_text", DataType::Utf8, false),
    ]))
}

/// Progress of a [`prepare`] run, handed to its callback after each chunk.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Rows written so far.
    pub rows: u64,
    /// Rows skipped so far.
    pub skipped: u64,
}

struct ShardWriter {
    dir: PathBuf,
    writer: Option<ArrowWriter<File>>,
    rows_in_shard: usize,
    shard_rows: usize,
    names: Vec<String>,
    row_group: usize,
}

impl ShardWriter {
    fn new(dir: PathBuf, shard_rows: usize, row_group: usize) -> Self {
        ShardWriter {
            dir,
            writer: None,
            rows_in_shard: 0,
            shard_rows: shard_rows.max(1),
            names: Vec::new(),
            row_group,
        }
    }

    /// Writes a batch, splitting it so that every shard but the last has exactly
    /// `shard_rows` rows.
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let take = (self.shard_rows - self.rows_in_shard).min(batch.num_rows() - offset);
            self.write_part(&batch.slice(offset, take))?;
            offset += take;
        }
        Ok(())
    }

    fn write_part(&mut self, batch: &RecordBatch) -> Result<()> {
        if self.writer.is_none() {
            let name = format!("part-{:05}.parquet", self.names.len());
            let path = self.dir.join(&name);
            std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
                .set_max_row_group_size(self.row_group)
                .build();
            let w = ArrowWriter::try_new(file, schema(), Some(props))
                .map_err(|e| Error::file(&path, e))?;
            self.writer = Some(w);
            self.names.push(name);
        }
        let w = self.writer.as_mut().expect("opened above");
        w.write(batch)
            .map_err(|e| Error::file(self.dir.join(self.names.last().expect("named")), e))?;
        self.rows_in_shard += batch.num_rows();
        if self.rows_in_shard >= self.shard_rows {
            self.close()?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            let path = self.dir.join(self.names.last().expect("named"));
            w.close().map_err(|e| Error::file(&path, e))?;
        }
        self.rows_in_shard = 0;
        Ok(())
    }
}

/// Removes the temporary directory unless the run succeeded.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Tokenizes `examples` and writes shards to the directory `output`, which must not exist.
///
/// A malformed row (a reader error, an empty source or target) stops the run with an error
/// naming its file and line, and nothing is left at `output`; with `skip_invalid` such rows are
/// counted and skipped. Errors that are not about one row (I/O, a corrupt Parquet input) always
/// stop the run.
pub fn prepare(
    examples: impl Iterator<Item = Result<Example>>,
    input: &Path,
    tokenizer: &PalmTokenizer,
    output: &Path,
    options: &PrepareOptions,
    mut progress: impl FnMut(Progress),
) -> Result<PrepareReport> {
    if output.exists() {
        return Err(Error::OutputExists(output.to_path_buf()));
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "shards".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut guard = TempDir(Some(tmp.clone()));

    let mut writer = ShardWriter::new(tmp.clone(), options.shard_rows, 65_536);
    // The shuffle's buckets: small row groups, so 64 open writers buffer little.
    let mut shuffle = options.shuffle_seed.map(|seed| {
        let buckets = (0..SHUFFLE_BUCKETS)
            .map(|k| ShardWriter::new(tmp.join(format!(".bucket-{k:02}")), usize::MAX, 2048))
            .collect::<Vec<_>>();
        (buckets, StdRng::seed_from_u64(seed))
    });
    let mut report = PrepareReport {
        vocab_size: tokenizer.vocab_size(),
        ..PrepareReport::default()
    };
    let (mut src_total, mut tgt_total) = (0u64, 0u64);
    let mut chunk: Vec<Example> = Vec::with_capacity(options.chunk_rows);
    let mut examples = examples.peekable();
    loop {
        chunk.clear();
        while chunk.len() < options.chunk_rows.max(1) {
            let Some(item) = examples.next() else { break };
            let ex = match item.and_then(|ex| validate(ex, input, options)) {
                Ok(ex) => ex,
                Err(e) if options.skip_invalid && e.is_row_error() => {
                    tracing::debug!("skipping: {e}");
                    report.skipped += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            chunk.push(ex);
        }
        if chunk.is_empty() {
            break;
        }
        let srcs: Vec<&str> = chunk.iter().map(|e| e.src.as_str()).collect();
        let tgts: Vec<&str> = chunk.iter().map(|e| e.tgt.as_str()).collect();
        let src_ids = tokenizer.encode_batch_untruncated(&srcs);
        let tgt_ids = tokenizer.encode_batch_untruncated(&tgts);
        let mut rows = Vec::with_capacity(chunk.len());
        for ((ex, s), t) in chunk.iter().zip(src_ids).zip(tgt_ids) {
            let s = frame(tokenizer, s, options.max_src_len, &mut report.truncated_src);
            let t = frame(tokenizer, t, options.max_tgt_len, &mut report.truncated_tgt);
            src_total += s.len() as u64;
            tgt_total += t.len() as u64;
            report.max_src_len = report.max_src_len.max(s.len());
            report.max_tgt_len = report.max_tgt_len.max(t.len());
            rows.push((s, t, ex.src.as_str(), ex.tgt.as_str()));
        }
        match &mut shuffle {
            None => writer.write(&record_batch(&rows, &tmp)?)?,
            Some((buckets, rng)) => {
                let mut parts: Vec<Vec<_>> = vec![Vec::new(); buckets.len()];
                for row in rows {
                    parts[rng.random_range(0..buckets.len())].push(row);
                }
                for (bucket, part) in buckets.iter_mut().zip(&parts) {
                    if !part.is_empty() {
                        bucket.write(&record_batch(part, &tmp)?)?;
                    }
                }
            }
        }
        report.rows += chunk.len() as u64;
        progress(Progress {
            rows: report.rows,
            skipped: report.skipped,
        });
    }
    if let Some((mut buckets, mut rng)) = shuffle {
        for bucket in &mut buckets {
            bucket.close()?;
            let Some(name) = bucket.names.first() else {
                continue;
            };
            let mut rows = crate::shards::read_shard(&bucket.dir.join(name))?;
            rows.shuffle(&mut rng);
            while !rows.is_empty() {
                let n = options.chunk_rows.max(1).min(rows.len());
                let part: Vec<_> = rows
                    .drain(..n)
                    .map(|r| (r.src_ids, r.tgt_ids, r.src_text, r.tgt_text))
                    .collect();
                writer.write(&record_batch(&part, &tmp)?)?;
            }
            std::fs::remove_dir_all(&bucket.dir).map_err(|e| Error::io(&bucket.dir, e))?;
        }
    }
    writer.close()?;
    report.shards = writer.names.clone();
    if report.rows > 0 {
        report.mean_src_len = src_total as f64 / report.rows as f64;
        report.mean_tgt_len = tgt_total as f64 / report.rows as f64;
    }
    let meta = tmp.join("meta.json");
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    std::fs::write(&meta, json + "\n").map_err(|e| Error::io(&meta, e))?;
    std::fs::rename(&tmp, output).map_err(|e| Error::io(output, e))?;
    guard.0 = None;
    Ok(report)
}

/// One record batch of framed rows: (source ids, target ids, source text, target text).
fn record_batch<S: AsRef<str>>(
    rows: &[(Vec<u32>, Vec<u32>, S, S)],
    dir: &Path,
) -> Result<RecordBatch> {
    let ids = || {
        ListBuilder::new(UInt32Builder::new()).with_field(Arc::new(Field::new(
            "item",
            DataType::UInt32,
            false,
        )))
    };
    let (mut src_b, mut tgt_b) = (ids(), ids());
    let (mut src_t, mut tgt_t) = (StringBuilder::new(), StringBuilder::new());
    for (s, t, src, tgt) in rows {
        src_b.values().append_slice(s);
        src_b.append(true);
        tgt_b.values().append_slice(t);
        tgt_b.append(true);
        src_t.append_value(src.as_ref());
        tgt_t.append_value(tgt.as_ref());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(src_b.finish()),
        Arc::new(tgt_b.finish()),
        Arc::new(src_t.finish()),
        Arc::new(tgt_t.finish()),
    ];
    RecordBatch::try_new(schema(), columns).map_err(|e| Error::file(dir, format!("internal: {e}")))
}

fn validate(ex: Example, input: &Path, options: &PrepareOptions) -> Result<Example> {
    let row = |message: &str| Error::Row {
        path: input.to_path_buf(),
        line: ex.line,
        message: message.to_owned(),
    };
    if ex.src.trim().is_empty() {
        return Err(row("empty source"));
    }
    if !options.allow_empty_target && ex.tgt.trim().is_empty() {
        return Err(row("empty target"));
    }
    Ok(ex)
}

fn frame(tok: &PalmTokenizer, pieces: Vec<u32>, max_len: usize, truncated: &mut u64) -> Vec<u32> {
    if pieces.len() + 2 > max_len {
        *truncated += 1;
    }
    tok.frame(pieces, max_len)
}

/// Reads `meta.json` of a prepared directory.
pub fn read_meta(dir: &Path) -> Result<PrepareReport> {
    let path = dir.join("meta.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, e))
}
