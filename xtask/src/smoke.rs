//! `cargo xtask smoke-data`: regenerates `datasets/smoke/`, miniatures of LCSTS, ADGEN and
//! DuReader_robust-QG in their published layouts, for `cargo xtask reproduce NAME --smoke`.
//! The texts come from the demo set (`datasets/demo`); only the layouts are the real ones:
//! ADGEN rows as they are (`content` → `summary`); LCSTS documents whose summary is the first
//! clause of the text (Parts II and III with human scores 1–5 in turn, so the usual `>= 3`
//! filter keeps three in five); DuReader-QG rows asking about the product type, with
//! `answer[SEP]passage` sources. Deterministic.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

const TRAIN: usize = 160;
const HELD_OUT: usize = 24;

pub fn run(_args: &[String]) -> Result<()> {
    let root = crate::root();
    let read = |name: &str, n: usize| -> Result<Vec<(String, String)>> {
        let path = root.join("datasets/demo").join(name);
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        text.lines()
            .take(n)
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)?;
                Ok((
                    v["src"].as_str().unwrap_or_default().to_owned(),
                    v["tgt"].as_str().unwrap_or_default().to_owned(),
                ))
            })
            .collect()
    };
    let train = read("train.jsonl", TRAIN)?;
    let valid = read("valid.jsonl", HELD_OUT)?;
    let test = read("test.jsonl", HELD_OUT)?;
    let out = root.join("datasets/smoke");
    for (name, rows) in [("train", &train), ("dev", &valid)] {
        // AdvertiseGen has train and dev only; reproduce uses dev as the test set too.
        let mut s = String::new();
        for (src, tgt) in rows.iter() {
            writeln!(s, "{}", serde_json::json!({"content": src, "summary": tgt}))?;
        }
        write(&out.join("adgen").join(format!("{name}.json")), &s)?;
    }
    for (name, rows, labelled) in [
        ("PART_I", &train, false),
        ("PART_II", &valid, true),
        ("PART_III", &test, true),
    ] {
        write(
            &out.join("lcsts").join(format!("{name}.txt")),
            &lcsts(rows, labelled),
        )?;
    }
    for (name, rows) in [("train", &train), ("validation", &valid), ("test", &test)] {
        let mut s = String::from("text1,text2\n");
        for (src, tgt) in rows.iter() {
            let kind = product_type(src);
            let text1 = format!("{kind}[SEP]{tgt}");
            writeln!(
                s,
                "{},{}",
                csv_field(&text1),
                csv_field(&format!("文案里的{kind}有什么特点？"))
            )?;
        }
        write(&out.join("dureader-qg").join(format!("{name}.csv")), &s)?;
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// The value of the `类型` attribute.
fn product_type(src: &str) -> &str {
    src.split('*')
        .find_map(|kv| kv.strip_prefix("类型#"))
        .unwrap_or("商品")
}

fn lcsts(rows: &[(String, String)], labelled: bool) -> String {
    let mut s = String::new();
    for (i, (_, text)) in rows.iter().enumerate() {
        let summary = text.split(['，', '。']).next().unwrap_or(text);
        let _ = writeln!(s, "<doc id={i}>");
        if labelled {
            let _ = writeln!(s, "    <human_label>{}</human_label>", i % 5 + 1);
        }
        let _ = write!(
            s,
            "    <summary>\n        {summary}\n    </summary>\n    <short_text>\n        {text}\n    </short_text>\n</doc>\n"
        );
    }
    s
}

fn csv_field(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(path, text).with_context(|| format!("{}", path.display()))
}
