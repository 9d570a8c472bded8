//! Streaming readers: every format yields [`Example`]s one at a time, so any input size is
//! read in bounded memory. Errors name the file and line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::{Array, LargeStringArray, RecordBatch, StringArray, StringViewArray};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use crate::{Error, Example, Result};

/// Input formats of `palm prepare --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Detect from the file name (and, for `.txt`/`.xml`, the first line).
    Auto,
    /// One JSON object a line.
    Jsonl,
    /// Comma-separated with a header row.
    Csv,
    /// Tab-separated with a header row.
    Tsv,
    /// Apache Parquet with string columns.
    Parquet,
    /// LCSTS: `<doc>` blocks with `<summary>` (target) and `<short_text>` (source).
    Lcsts,
    /// ADGEN / AdvertiseGen: jsonl with `content` (the `key#value*…` list, kept as it is) and
    /// `summary`.
    Adgen,
    /// DuReader_robust-QG: `text1` (`answer[SEP]passage`) and `text2` (the question), in jsonl,
    /// csv or tsv.
    DureaderQg,
    /// Raw documents (one per line of a text file, or the `text` field of jsonl rows), turned
    /// into pre-training context/continuation pairs ([`crate::documents`]).
    Documents,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" => Format::Auto,
            "jsonl" | "json" => Format::Jsonl,
            "csv" => Format::Csv,
            "tsv" => Format::Tsv,
            "parquet" => Format::Parquet,
            "lcsts" => Format::Lcsts,
            "adgen" => Format::Adgen,
            "dureader-qg" => Format::DureaderQg,
            "documents" => Format::Documents,
            other => {
                return Err(format!(
                    "unknown format {other:?}; expected auto, jsonl, csv, tsv, parquet, lcsts, adgen, dureader-qg or documents"
                ));
            }
        })
    }
}

impl Format {
    /// The source and target field names this format reads by default.
    pub fn default_fields(self) -> (&'static str, &'static str) {
        match self {
            Format::Adgen => ("content", "summary"),
            Format::DureaderQg => ("text1", "text2"),
            Format::Lcsts => ("short_text", "summary"),
            _ => ("src", "tgt"),
        }
    }
}

/// How to read an input file.
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    /// The format.
    pub format: Format,
    /// Source field (column) name; the format's default when `None`.
    pub src_field: Option<String>,
    /// Target field (column) name; the format's default when `None`.
    pub tgt_field: Option<String>,
    /// LCSTS only: keep documents whose `<human_label>` is at least this (documents without a
    /// label are dropped when set). Part III with 3 gives the usual test split.
    pub lcsts_min_label: Option<u8>,
    /// Whether a missing target is allowed (inference input has none); it reads as "".
    pub allow_missing_target: bool,
    /// Documents only: how they become pairs.
    pub documents: crate::documents::DocumentOptions,
}

impl ReaderOptions {
    /// Options for a format with its default fields.
    pub fn new(format: Format) -> Self {
        ReaderOptions {
            format,
            src_field: None,
            tgt_field: None,
            lcsts_min_label: None,
            allow_missing_target: false,
            documents: crate::documents::DocumentOptions::default(),
        }
    }
}

/// Bytes read so far from an input, for progress reporting.
#[derive(Debug, Clone, Default)]
pub struct BytesRead(Arc<AtomicU64>);

impl BytesRead {
    /// Bytes consumed so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Counting<R> {
    inner: R,
    count: BytesRead,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// An open input: an iterator of examples and a handle on the bytes read.
pub struct Input {
    /// The examples, in file order.
    pub examples: Box<dyn Iterator<Item = Result<Example>> + Send>,
    /// Bytes read so far (for Parquet: compressed bytes of the row groups decoded so far).
    pub bytes_read: BytesRead,
    /// Size of the file in bytes.
    pub total_bytes: u64,
    /// The format actually used (after detection).
    pub format: Format,
}

/// Opens `path` and returns its examples.
pub fn open(
    path: &Path,
    options: &ReaderOptions,
) -> Result<Box<dyn Iterator<Item = Result<Example>> + Send>> {
    Ok(open_input(path, options)?.examples)
}

/// Opens `path` with progress information. A directory written by `palm prepare` (it holds
/// `meta.json`) reads as its rows' original texts, shard by shard, whatever the format.
pub fn open_input(path: &Path, options: &ReaderOptions) -> Result<Input> {
    if path.is_dir() && path.join("meta.json").is_file() {
        return prepared_texts(path);
    }
    let format = match options.format {
        Format::Auto => detect(path)?,
        f => f,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let total_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bytes_read = BytesRead::default();
    let (def_src, def_tgt) = format.default_fields();
    let fields = Fields {
        src: options.src_field.clone().unwrap_or_else(|| def_src.into()),
        tgt: options.tgt_field.clone().unwrap_or_else(|| def_tgt.into()),
        allow_missing_target: options.allow_missing_target,
    };
    let counting = Counting {
        inner: file,
        count: bytes_read.clone(),
    };
    let path_buf = path.to_path_buf();
    let examples: Box<dyn Iterator<Item = Result<Example>> + Send> = match format {
        Format::Jsonl | Format::Adgen => Box::new(JsonlReader::new(path_buf, counting, fields)),
        Format::Csv => Box::new(DelimitedReader::new(path_buf, counting, b',', fields)?),
        Format::Tsv => Box::new(DelimitedReader::new(path_buf, counting, b'\t', fields)?),
        Format::DureaderQg => match extension(path).as_deref() {
            Some("csv") => Box::new(DelimitedReader::new(path_buf, counting, b',', fields)?),
            Some("tsv") => Box::new(DelimitedReader::new(path_buf, counting, b'\t', fields)?),
            Some("parquet") => Box::new(ParquetReader::new(path_buf, fields, bytes_read.clone())?),
            _ => Box::new(JsonlReader::new(path_buf, counting, fields)),
        },
        Format::Parquet => Box::new(ParquetReader::new(path_buf, fields, bytes_read.clone())?),
        Format::Lcsts => Box::new(LcstsReader::new(
            path_buf,
            counting,
            options.lcsts_min_label,
        )),
        Format::Documents => Box::new(crate::documents::DocumentReader::new(
            path_buf,
            counting,
            extension(path).as_deref() == Some("jsonl"),
            options.documents.clone(),
        )),
        Format::Auto => unreachable!("detected above"),
    };
    Ok(Input {
        examples,
        bytes_read,
        total_bytes,
        format,
    })
}

/// The texts of a prepared shard directory, one shard in memory at a time.
fn prepared_texts(dir: &Path) -> Result<Input> {
    let files: Vec<(PathBuf, u64)> = crate::shards::shard_files(dir)?
        .into_iter()
        .map(|f| {
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            (f, size)
        })
        .collect();
    let total_bytes = files.iter().map(|(_, size)| size).sum();
    let bytes_read = BytesRead::default();
    let counter = bytes_read.clone();
    let examples = files
        .into_iter()
        .flat_map(move |(file, size)| {
            let rows: Vec<Result<(String, String)>> = match crate::shards::read_shard(&file) {
                Ok(rows) => rows
                    .into_iter()
                    .map(|r| Ok((r.src_text, r.tgt_text)))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            counter.0.fetch_add(size, Ordering::Relaxed);
            rows
        })
        .enumerate()
        .map(|(i, row)| {
            row.map(|(src, tgt)| Example {
                src,
                tgt,
                line: i as u64 + 1,
            })
        });
    Ok(Input {
        examples: Box::new(examples),
        bytes_read,
        total_bytes,
        format: Format::Parquet,
    })
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// Picks a format from the file name; `.txt`/`.xml` files are LCSTS when they start with `<doc`.
pub fn detect(path: &Path) -> Result<Format> {
    match extension(path).as_deref() {
        Some("jsonl" | "json" | "ndjson") => Ok(Format::Jsonl),
        Some("csv") => Ok(Format::Csv),
        Some("tsv") => Ok(Format::Tsv),
        Some("parquet") => Ok(Format::Parquet),
        Some("txt" | "xml") => {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            let mut head = Vec::new();
            file.take(4096)
                .read_to_end(&mut head)
                .map_err(|e| Error::io(path, e))?;
            let text = String::from_utf8_lossy(&head);
            if text.trim_start().starts_with("<doc") {
                Ok(Format::Lcsts)
            } else {
                Err(Error::file(
                    path,
                    "cannot tell the format from a .txt file that is not LCSTS; pass --format",
                ))
            }
        }
        _ => Err(Error::file(
            path,
            "cannot tell the format from the file name; pass --format",
        )),
    }
}

#[derive(Clone)]
struct Fields {
    src: String,
    tgt: String,
    allow_missing_target: bool,
}

/// Reads one line as UTF-8, naming the line on failure. `Ok(None)` at end of file.
fn next_line<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    path: &Path,
    line: u64,
) -> Result<Option<String>> {
    buf.clear();
    let n = reader
        .read_until(b'\n', buf)
        .map_err(|e| Error::io(path, e))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    match std::str::from_utf8(buf) {
        Ok(s) => Ok(Some(s.to_owned())),
        Err(e) => Err(Error::Row {
            path: path.to_path_buf(),
            line,
            message: format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        }),
    }
}

struct JsonlReader<R> {
    path: PathBuf,
    reader: BufReader<R>,
    buf: Vec<u8>,
    line: u64,
    fields: Fields,
    done: bool,
}

impl<R: Read> JsonlReader<R> {
    fn new(path: PathBuf, inner: R, fields: Fields) -> Self {
        JsonlReader {
            path,
            reader: BufReader::with_capacity(1 << 16, inner),
            buf: Vec::new(),
            line: 0,
            fields,
            done: false,
        }
    }

    fn row_error(&self, message: String) -> Error {
        Error::Row {
            path: self.path.clone(),
            line: self.line,
            message,
        }
    }

    fn field(
        &self,
        obj: &serde_json::Map<String, serde_json::Value>,
        name: &str,
        missing_ok: bool,
    ) -> Result<String> {
        match obj.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            // Numbers and booleans are written as JSON writes them.
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                Ok(v.to_string())
            }
            Some(serde_json::Value::Null) | None if missing_ok => Ok(String::new()),
            Some(other) => Err(self.row_error(format!(
                "field {name:?} must be a string, found {}",
                json_kind(other)
            ))),
            None => Err(self.row_error(format!("missing field {name:?}"))),
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl<R: Read> Iterator for JsonlReader<R> {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            self.line += 1;
            let text = match next_line(&mut self.reader, &mut self.buf, &self.path, self.line) {
                Ok(Some(t)) => t,
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(e) => return Some(Err(e)),
            };
            if text.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => return Some(Err(self.row_error(format!("invalid JSON: {e}")))),
            };
            let serde_json::Value::Object(obj) = value else {
                return Some(Err(self.row_error(format!(
                    "expected a JSON object, found {}",
                    json_kind(&value)
                ))));
            };
            let src = match self.field(&obj, &self.fields.src, false) {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            let tgt = match self.field(&obj, &self.fields.tgt, self.fields.allow_missing_target) {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            return Some(Ok(Example {
                src,
                tgt,
                line: self.line,
            }));
        }
    }
}

struct DelimitedReader<R: Read> {
    path: PathBuf,
    reader: csv::Reader<R>,
    src_col: usize,
    tgt_col: Option<usize>,
    record: csv::ByteRecord,
}

impl<R: Read> DelimitedReader<R> {
    fn new(path: PathBuf, inner: R, delimiter: u8, fields: Fields) -> Result<Self> {
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(true)
            // TSV corpora carry quotes inside text; only CSV uses quoting.
            .quoting(delimiter == b',')
            .from_reader(inner);
        let headers = reader
            .byte_headers()
            .map_err(|e| Error::file(&path, format!("cannot read the header row: {e}")))?
            .clone();
        let find = |name: &str| headers.iter().position(|h| h == name.as_bytes());
        let names = || {
            headers
                .iter()
                .map(|h| String::from_utf8_lossy(h).into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let src_col = find(&fields.src).ok_or_else(|| {
            Error::file(
                &path,
                format!(
                    "no column {:?} in the header (columns: {})",
                    fields.src,
                    names()
                ),
            )
        })?;
        let tgt_col = match find(&fields.tgt) {
            Some(c) => Some(c),
            None if fields.allow_missing_target => None,
            None => {
                return Err(Error::file(
                    &path,
                    format!(
                        "no column {:?} in the header (columns: {})",
                        fields.tgt,
                        names()
                    ),
                ));
            }
        };
        Ok(DelimitedReader {
            path,
            reader,
            src_col,
            tgt_col,
            record: csv::ByteRecord::new(),
        })
    }
}

impl<R: Read> Iterator for DelimitedReader<R> {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Self::Item> {
        let line_of = |r: &csv::ByteRecord| r.position().map_or(0, |p| p.line());
        match self.reader.read_byte_record(&mut self.record) {
            Ok(false) => None,
            Ok(true) => {
                let line = line_of(&self.record);
                let get = |col: usize, name: &str| -> Result<String> {
                    let raw = self.record.get(col).ok_or_else(|| Error::Row {
                        path: self.path.clone(),
                        line,
                        message: format!("missing field {name:?} (the row is too short)"),
                    })?;
                    String::from_utf8(raw.to_vec()).map_err(|_| Error::Row {
                        path: self.path.clone(),
                        line,
                        message: format!("invalid UTF-8 in field {name:?}"),
                    })
                };
                let src = match get(self.src_col, "source") {
                    Ok(s) => s,
                    Err(e) => return Some(Err(e)),
                };
                let tgt = match self.tgt_col {
                    Some(c) => match get(c, "target") {
                        Ok(s) => s,
                        Err(e) => return Some(Err(e)),
                    },
                    None => String::new(),
                };
                Some(Ok(Example { src, tgt, line }))
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                Some(Err(Error::Row {
                    path: self.path.clone(),
                    line,
                    message: match e.kind() {
                        csv::ErrorKind::UnequalLengths {
                            expected_len, len, ..
                        } => {
                            format!("expected {expected_len} fields, found {len}")
                        }
                        _ => e.to_string(),
                    },
                }))
            }
        }
    }
}

/// Streams string columns of a Parquet file, one record batch at a time.
struct ParquetReader {
    path: PathBuf,
    batches: ParquetRecordBatchReader,
    src: String,
    tgt: Option<String>,
    current: Option<RecordBatch>,
    pos: usize,
    row: u64,
    bytes_read: BytesRead,
    /// (rows, compressed bytes) of each row group.
    row_groups: Vec<(u64, u64)>,
    failed: bool,
}

impl ParquetReader {
    fn new(path: PathBuf, fields: Fields, bytes_read: BytesRead) -> Result<Self> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::file(&path, format!("not a readable Parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let has = |name: &str| schema.field_with_name(name).is_ok();
        let names = || {
            schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !has(&fields.src) {
            return Err(Error::file(
                &path,
                format!("no column {:?} (columns: {})", fields.src, names()),
            ));
        }
        let tgt = if has(&fields.tgt) {
            Some(fields.tgt.clone())
        } else if fields.allow_missing_target {
            None
        } else {
            return Err(Error::file(
                &path,
                format!("no column {:?} (columns: {})", fields.tgt, names()),
            ));
        };
        let row_groups = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|rg| {
                (
                    rg.num_rows().max(0) as u64,
                    rg.compressed_size().max(0) as u64,
                )
            })
            .collect();
        let batches = builder
            .with_batch_size(4096)
            .build()
            .map_err(|e| Error::file(&path, format!("not a readable Parquet file: {e}")))?;
        Ok(ParquetReader {
            path,
            batches,
            src: fields.src,
            tgt,
            current: None,
            pos: 0,
            row: 0,
            bytes_read,
            row_groups,
            failed: false,
        })
    }

    fn column(&self, batch: &RecordBatch, name: &str, i: usize) -> Result<Option<String>> {
        let col = batch
            .column_by_name(name)
            .ok_or_else(|| Error::file(&self.path, format!("no column {name:?}")))?;
        if col.is_null(i) {
            return Ok(None);
        }
        let any = col.as_any();
        if let Some(a) = any.downcast_ref::<StringArray>() {
            Ok(Some(a.value(i).to_owned()))
        } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
            Ok(Some(a.value(i).to_owned()))
        } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
            Ok(Some(a.value(i).to_owned()))
        } else {
            Err(Error::file(
                &self.path,
                format!(
                    "column {name:?} has type {}, expected a string type",
                    col.data_type()
                ),
            ))
        }
    }
}

impl Iterator for ParquetReader {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(batch) = self.current.take()
                && self.pos < batch.num_rows()
            {
                let i = self.pos;
                self.pos += 1;
                self.row += 1;
                let line = self.row;
                let src = match self.column(&batch, &self.src, i) {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        self.current = Some(batch);
                        return Some(Err(Error::Row {
                            path: self.path.clone(),
                            line,
                            message: format!("field {:?} is null", self.src),
                        }));
                    }
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                };
                let tgt = match self.tgt.as_deref() {
                    None => String::new(),
                    Some(name) => match self.column(&batch, name, i) {
                        Ok(Some(s)) => s,
                        Ok(None) => {
                            self.current = Some(batch);
                            return Some(Err(Error::Row {
                                path: self.path.clone(),
                                line,
                                message: format!("field {name:?} is null"),
                            }));
                        }
                        Err(e) => {
                            self.failed = true;
                            return Some(Err(e));
                        }
                    },
                };
                self.current = Some(batch);
                return Some(Ok(Example { src, tgt, line }));
            }
            match self.batches.next() {
                None => return None,
                Some(Ok(batch)) => {
                    // Progress in whole row groups: the bytes of every group started so far.
                    let end = self.row + batch.num_rows() as u64;
                    let (mut rows, mut bytes) = (0u64, 0u64);
                    for &(n, b) in &self.row_groups {
                        if rows >= end {
                            break;
                        }
                        rows += n;
                        bytes += b;
                    }
                    self.bytes_read.0.store(bytes, Ordering::Relaxed);
                    self.current = Some(batch);
                    self.pos = 0;
                }
                Some(Err(e)) => {
                    self.failed = true;
                    return Some(Err(Error::file(
                        &self.path,
                        format!("cannot decode Parquet after row {}: {e}", self.row),
                    )));
                }
            }
        }
    }
}

/// LCSTS's pseudo-XML: `<doc id=N>` blocks, each with `<summary>` and `<short_text>` whose text
/// sits on the lines between the tags (Parts II/III add `<human_label>N</human_label>`).
struct LcstsReader<R> {
    path: PathBuf,
    reader: BufReader<R>,
    buf: Vec<u8>,
    line: u64,
    min_label: Option<u8>,
    done: bool,
}

impl<R: Read> LcstsReader<R> {
    fn new(path: PathBuf, inner: R, min_label: Option<u8>) -> Self {
        LcstsReader {
            path,
            reader: BufReader::with_capacity(1 << 16, inner),
            buf: Vec::new(),
            line: 0,
            min_label,
            done: false,
        }
    }

    fn err(&self, line: u64, message: impl Into<String>) -> Error {
        Error::Row {
            path: self.path.clone(),
            line,
            message: message.into(),
        }
    }

    /// Reads one `<doc>` block. `Ok(None)` at end of file.
    fn read_doc(&mut self) -> Result<Option<(Example, Option<u8>)>> {
        #[derive(PartialEq)]
        enum In {
            Nothing,
            Summary,
            ShortText,
        }
        let mut doc_line = None;
        let mut summary: Option<String> = None;
        let mut short_text: Option<String> = None;
        let mut label: Option<u8> = None;
        let mut state = In::Nothing;
        let mut text = String::new();
        loop {
            self.line += 1;
            let line_no = self.line;
            let Some(raw) = next_line(&mut self.reader, &mut self.buf, &self.path, line_no)? else {
                self.done = true;
                return match doc_line {
                    None => Ok(None),
                    Some(l) => {
                        Err(self.err(l, "<doc> block is not closed before the end of the file"))
                    }
                };
            };
            let t = raw.trim();
            if t.is_empty() && state == In::Nothing {
                continue;
            }
            if doc_line.is_none() {
                if t.starts_with("<doc") {
                    doc_line = Some(line_no);
                    continue;
                }
                return Err(self.err(line_no, format!("expected <doc>, found {:?}", truncate(t))));
            }
            match state {
                In::Summary | In::ShortText => {
                    let close = if state == In::Summary {
                        "</summary>"
                    } else {
                        "</short_text>"
                    };
                    if let Some(before) = t.strip_suffix(close) {
                        if !before.is_empty() {
                            if !text.is_empty() {
                                text.push(' ');
                            }
                            text.push_str(before.trim());
                        }
                        let value = std::mem::take(&mut text);
                        if state == In::Summary {
                            summary = Some(value);
                        } else {
                            short_text = Some(value);
                        }
                        state = In::Nothing;
                    } else if t.starts_with('<') && t.ends_with('>') && !t.contains(' ') {
                        return Err(self.err(line_no, format!("expected {close}, found {t}")));
                    } else if !t.is_empty() {
                        if !text.is_empty() {
                            text.push(' ');
                        }
                        text.push_str(t);
                    }
                }
                In::Nothing => {
                    if t == "</doc>" {
                        let doc = doc_line.unwrap_or(line_no);
                        let Some(tgt) = summary else {
                            return Err(self.err(doc, "<doc> without <summary>"));
                        };
                        let Some(src) = short_text else {
                            return Err(self.err(doc, "<doc> without <short_text>"));
                        };
                        return Ok(Some((
                            Example {
                                src,
                                tgt,
                                line: doc,
                            },
                            label,
                        )));
                    } else if let Some(rest) = t.strip_prefix("<summary>") {
                        if let Some(v) = inline(rest, "</summary>", &mut text) {
                            summary = Some(v);
                        } else {
                            state = In::Summary;
                        }
                    } else if let Some(rest) = t.strip_prefix("<short_text>") {
                        if let Some(v) = inline(rest, "</short_text>", &mut text) {
                            short_text = Some(v);
                        } else {
                            state = In::ShortText;
                        }
                    } else if let Some(rest) = t.strip_prefix("<human_label>") {
                        let v = rest.trim_end_matches("</human_label>").trim();
                        label = Some(v.parse().map_err(|_| {
                            self.err(line_no, format!("human_label {v:?} is not a number"))
                        })?);
                    } else if t.starts_with("<doc") {
                        return Err(self.err(line_no, "<doc> inside <doc>: a </doc> is missing"));
                    } else {
                        return Err(self.err(
                            line_no,
                            format!("unexpected line {:?} in <doc>", truncate(t)),
                        ));
                    }
                }
            }
        }
    }
}

/// Text on an opening tag's own line: the whole value when the closing tag is there too
/// (`<summary>text</summary>`), otherwise the start of a multi-line value.
fn inline(rest: &str, close: &str, text: &mut String) -> Option<String> {
    let rest = rest.trim();
    if let Some(before) = rest.strip_suffix(close) {
        Some(before.trim().to_owned())
    } else {
        text.push_str(rest);
        None
    }
}

impl<R: Read> Iterator for LcstsReader<R> {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            match self.read_doc() {
                Ok(None) => return None,
                Ok(Some((ex, label))) => {
                    if let Some(min) = self.min_label
                        && label.is_none_or(|l| l < min)
                    {
                        continue;
                    }
                    return Some(Ok(ex));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}
