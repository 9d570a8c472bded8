//! Synthetic Chinese corpora for benchmarks: deterministic, LCSTS-like lengths (sources of
//! about 100 characters, targets of about 20), Zipf-distributed characters, some digits and
//! Latin words, and a character-level vocab.txt that covers them.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::flag;

/// SplitMix64: a small deterministic generator, enough for synthetic text.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Number of distinct CJK characters the generator uses.
const CHARS: u32 = 4000;
const WORDS: &[&str] = &["GPU", "PALM", "iPhone", "5G", "App", "CEO", "NBA", "AI"];

fn cjk(rank: u32) -> char {
    char::from_u32(0x4E00 + rank).expect("in the CJK block")
}

/// A Zipf-like rank in `0..CHARS` (inverse-CDF of a 1/x density).
fn zipf(rng: &mut Rng) -> u32 {
    let u = rng.unit();
    ((CHARS as f64).powf(u) - 1.0) as u32 % CHARS
}

fn sentence(rng: &mut Rng, len: usize) -> String {
    let mut s = String::with_capacity(len * 3);
    let mut n = 0;
    while n < len {
        let r = rng.unit();
        if r < 0.06 && n > 0 {
            s.push(if rng.unit() < 0.7 { '，' } else { '。' });
        } else if r < 0.08 {
            s.push_str(&(rng.below(3000)).to_string());
        } else if r < 0.09 {
            s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        } else {
            s.push(cjk(zipf(rng)));
        }
        n += 1;
    }
    s
}

/// One synthetic pair: a source of 60..140 and a target of 10..30 units.
pub fn pair(rng: &mut Rng) -> (String, String) {
    let src_len = 60 + rng.below(80) as usize;
    let tgt_len = 10 + rng.below(20) as usize;
    (sentence(rng, src_len), sentence(rng, tgt_len))
}

fn json_escape(s: &str) -> String {
    // The generator emits no quotes, backslashes or control characters.
    s.to_owned()
}

/// Writes `rows` pairs as jsonl (`src`, `tgt`) or LCSTS `<doc>` blocks.
pub fn write_corpus(path: &Path, rows: u64, lcsts: bool) -> Result<()> {
    let file = File::create(path).with_context(|| path.display().to_string())?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut rng = Rng::new(20201113);
    for i in 0..rows {
        let (src, tgt) = pair(&mut rng);
        if lcsts {
            writeln!(
                w,
                "<doc id={i}>\n    <summary>\n        {tgt}\n    </summary>\n    <short_text>\n        {src}\n    </short_text>\n</doc>"
            )?;
        } else {
            writeln!(
                w,
                "{{\"src\": \"{}\", \"tgt\": \"{}\"}}",
                json_escape(&src),
                json_escape(&tgt)
            )?;
        }
    }
    w.flush()?;
    Ok(())
}

/// A vocab.txt in the bert-base-chinese layout covering the generator's characters.
pub fn write_vocab(path: &Path) -> Result<()> {
    let mut v = vec!["[PAD]".to_owned()];
    v.extend((1..100).map(|i| format!("[unused{i}]")));
    v.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    v.extend(['，', '。'].map(String::from));
    for c in ('!'..='~').filter(|c| !c.is_ascii_uppercase()) {
        v.push(c.to_string());
    }
    for c in ('0'..='9').chain('a'..='z') {
        v.push(format!("##{c}"));
    }
    v.extend((0..CHARS).map(|r| cjk(r).to_string()));
    std::fs::write(path, v.join("\n") + "\n").with_context(|| path.display().to_string())
}

pub fn run(args: &[String]) -> Result<()> {
    let rows: u64 = flag(args, "--rows")
        .unwrap_or("1000")
        .parse()
        .context("--rows")?;
    let Some(out) = flag(args, "--out") else {
        bail!("--out FILE is required");
    };
    let lcsts = match flag(args, "--format").unwrap_or("jsonl") {
        "jsonl" => false,
        "lcsts" => true,
        other => bail!("unknown --format {other:?}"),
    };
    write_corpus(Path::new(out), rows, lcsts)?;
    if let Some(v) = flag(args, "--vocab") {
        write_vocab(Path::new(v))?;
    }
    println!("wrote {rows} rows to {out}");
    Ok(())
}
