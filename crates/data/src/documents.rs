//! Raw documents for PALM's pre-training objective (`palm-reference.md` §7.1): sentence
//! splitting, spans of whole sentences split near 80% into context and continuation, and a
//! streaming reader that turns a text or jsonl file of documents into such pairs, so
//! `palm prepare --format documents` writes pre-training shards in bounded memory.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;

use crate::{Error, Example, Result};

/// How documents become pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentOptions {
    /// Context share of a span's characters (0.8).
    pub split: f64,
    /// Characters per span at most.
    pub max_chars: usize,
    /// Field of the text in jsonl rows.
    pub text_field: String,
}

impl Default for DocumentOptions {
    fn default() -> Self {
        DocumentOptions {
            split: 0.8,
            max_chars: 256,
            text_field: "text".into(),
        }
    }
}

/// Sentence ends: Chinese and ASCII terminal punctuation.
fn is_sentence_end(c: char) -> bool {
    matches!(
        c,
        '。' | '！' | '？' | '；' | '…' | '.' | '!' | '?' | ';' | '\n'
    )
}

/// Splits text after each sentence end (closing quotes stay with their sentence).
pub fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if is_sentence_end(c) {
            let mut end = i + c.len_utf8();
            while let Some(&(j, q)) = chars.peek() {
                if matches!(q, '”' | '’' | '"' | '\'' | '）' | ')' | '」' | '』')
                    || is_sentence_end(q)
                {
                    end = j + q.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let s = text[start..end].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = end;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Context/continuation pairs of a document: spans of whole sentences of at most `max_chars`
/// characters, each split at the last sentence end at or before `split` of its length (at
/// least one sentence on each side). Spans of a single sentence are skipped.
pub fn document_pairs(text: &str, split: f64, max_chars: usize) -> Vec<(String, String)> {
    let sents = sentences(text);
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < sents.len() {
        let mut j = i;
        let mut chars = 0;
        while j < sents.len() && (j == i || chars + sents[j].chars().count() <= max_chars) {
            chars += sents[j].chars().count();
            j += 1;
        }
        let span = &sents[i..j];
        if span.len() >= 2 {
            let target = (chars as f64 * split) as usize;
            let mut cut = 1;
            let mut seen = span[0].chars().count();
            for (k, s) in span.iter().enumerate().skip(1) {
                if k == span.len() - 1 || seen + s.chars().count() > target {
                    break;
                }
                seen += s.chars().count();
                cut = k + 1;
            }
            pairs.push((span[..cut].concat(), span[cut..].concat()));
        }
        i = j;
    }
    pairs
}

/// Context/continuation [`Example`]s of the documents of a text file (one per non-empty
/// line) or a jsonl file (a string field of each row), read line by line.
pub(crate) struct DocumentReader<R: Read> {
    path: PathBuf,
    lines: std::io::Lines<BufReader<R>>,
    line: u64,
    jsonl: bool,
    options: DocumentOptions,
    pending: std::vec::IntoIter<(String, String)>,
}

impl<R: Read> DocumentReader<R> {
    pub(crate) fn new(path: PathBuf, input: R, jsonl: bool, options: DocumentOptions) -> Self {
        DocumentReader {
            path,
            lines: BufReader::new(input).lines(),
            line: 0,
            jsonl,
            options,
            pending: Vec::new().into_iter(),
        }
    }

    fn text(&self, line: &str) -> Result<String> {
        if !self.jsonl {
            return Ok(line.to_owned());
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::row(&self.path, self.line, format!("not JSON: {e}")))?;
        v.get(&self.options.text_field)
            .and_then(|t| t.as_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::row(
                    &self.path,
                    self.line,
                    format!("no string field {:?}", self.options.text_field),
                )
            })
    }
}

impl<R: Read> Iterator for DocumentReader<R> {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Result<Example>> {
        loop {
            if let Some((src, tgt)) = self.pending.next() {
                return Some(Ok(Example {
                    src,
                    tgt,
                    line: self.line,
                }));
            }
            let line = match self.lines.next()? {
                Ok(l) => l,
                Err(e) => return Some(Err(Error::row(&self.path, self.line + 1, e))),
            };
            self.line += 1;
            if line.trim().is_empty() {
                continue;
            }
            match self.text(&line) {
                Ok(text) => {
                    self.pending =
                        document_pairs(&text, self.options.split, self.options.max_chars)
                            .into_iter();
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_keep_their_punctuation_and_quotes() {
        let s = sentences("他说：“走吧。”我们走了！然后呢？没有了");
        assert_eq!(
            s,
            vec!["他说：“走吧。”", "我们走了！", "然后呢？", "没有了"]
        );
    }

    #[test]
    fn spans_split_near_80_percent_at_a_sentence_end() {
        let doc = "一二三四五。一二三四五。一二三四五。一二三四五。一二三四五。";
        let pairs = document_pairs(doc, 0.8, 100);
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].0.chars().count(), 24);
        assert_eq!(pairs[0].1, "一二三四五。");
        // Longer documents make several spans; a lone sentence makes none.
        assert_eq!(document_pairs(doc, 0.8, 12).len(), 2);
        assert!(document_pairs("只有一句。", 0.8, 100).is_empty());
    }

    #[test]
    fn the_reader_streams_pairs_with_their_document_line() {
        let text = "一二三。四五六。七八九。\n\n只有一句。\n甲乙。丙丁。\n";
        let r = DocumentReader::new(
            "d.txt".into(),
            text.as_bytes(),
            false,
            DocumentOptions::default(),
        );
        let got: Vec<(String, String, u64)> = r
            .map(|e| e.unwrap())
            .map(|e| (e.src, e.tgt, e.line))
            .collect();
        assert_eq!(
            got,
            vec![
                ("一二三。四五六。".into(), "七八九。".into(), 1),
                ("甲乙。".into(), "丙丁。".into(), 4)
            ]
        );
        let bad = DocumentReader::new(
            "d.jsonl".into(),
            "{\"body\": 1}\n".as_bytes(),
            true,
            DocumentOptions::default(),
        );
        let e = bad.into_iter().next().unwrap().unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl") && e.contains('1') && e.contains("text"),
            "{e}"
        );
    }
}
