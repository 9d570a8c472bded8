//! Baseline for `cargo xtask bench prepare`: the `tokenizers` crate's own BERT WordPiece
//! batch-encode rate on the rows of a jsonl corpus (`src` and `tgt` of each row), encoded in
//! chunks of 8192 rows as `palm prepare` does. Only encoding is timed, not reading.
//!
//! Usage: `encode_rate CORPUS.jsonl VOCAB.txt`

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{EncodeInput, Model, Tokenizer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let [_, corpus, vocab] = args.as_slice() else {
        return Err("usage: encode_rate CORPUS.jsonl VOCAB.txt".into());
    };
    let model = WordPiece::from_file(vocab)
        .unk_token("[UNK]".into())
        .build()?;
    let sep = model.token_to_id("[SEP]").ok_or("no [SEP]")?;
    let cls = model.token_to_id("[CLS]").ok_or("no [CLS]")?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));

    let reader = BufReader::new(std::fs::File::open(corpus)?);
    let (mut rows, mut slow, mut fast) = (0u64, Duration::ZERO, Duration::ZERO);
    let mut texts: Vec<String> = Vec::with_capacity(2 * 8192);
    let mut flush = |texts: &mut Vec<String>, rows: &mut u64| -> Result<(), BoxError> {
        let inputs: Vec<EncodeInput> = texts.iter().map(|t| t.as_str().into()).collect();
        let t = Instant::now();
        std::hint::black_box(tok.encode_batch(inputs.clone(), true)?);
        slow += t.elapsed();
        let t = Instant::now();
        std::hint::black_box(tok.encode_batch_fast(inputs, true)?);
        fast += t.elapsed();
        *rows += texts.len() as u64 / 2;
        texts.clear();
        Ok(())
    };
    for line in reader.lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        texts.push(v["src"].as_str().unwrap_or_default().to_owned());
        texts.push(v["tgt"].as_str().unwrap_or_default().to_owned());
        if texts.len() == 2 * 8192 {
            flush(&mut texts, &mut rows)?;
        }
    }
    if !texts.is_empty() {
        flush(&mut texts, &mut rows)?;
    }
    println!("rows: {rows}");
    println!(
        "encode_batch rows/s: {:.0}",
        rows as f64 / slow.as_secs_f64()
    );
    println!(
        "encode_batch_fast rows/s: {:.0}",
        rows as f64 / fast.as_secs_f64()
    );
    Ok(())
}
