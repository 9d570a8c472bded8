//! Readers and `prepare` on small files in every supported format, and their error reports.

use std::path::{Path, PathBuf};

use palm_data::prepare::{PrepareOptions, prepare, read_meta};
use palm_data::reader::{Format, ReaderOptions, open};
use palm_data::{Error, Example, shards};
use palm_tokenizer::PalmTokenizer;

fn tokenizer() -> PalmTokenizer {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(
        "今天气很好白色上衣类型颜风格休闲答案问题是什么#*"
            .chars()
            .map(String::from),
    );
    PalmTokenizer::from_tokens(v).unwrap()
}

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

fn read(path: &Path, format: Format) -> Vec<Example> {
    open(path, &ReaderOptions::new(format))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn first_error(path: &Path, options: &ReaderOptions) -> String {
    match open(path, options) {
        Err(e) => e.to_string(),
        Ok(mut it) => it.find_map(|r| r.err()).expect("an error").to_string(),
    }
}

#[test]
fn jsonl_with_field_mapping_and_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a.jsonl",
        "{\"q\": \"今天\", \"a\": \"很好\"}\n\n{\"q\": \"天气\", \"a\": 3}\n".as_bytes(),
    );
    let mut o = ReaderOptions::new(Format::Auto);
    o.src_field = Some("q".into());
    o.tgt_field = Some("a".into());
    let rows: Vec<Example> = open(&p, &o).unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[1].src.as_str(), rows[1].tgt.as_str(), rows[1].line),
        ("天气", "3", 3)
    );
}

#[test]
fn csv_and_tsv_with_quotes() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a.csv",
        "id,src,tgt\n1,\"今天, 天气\",很好\n".as_bytes(),
    );
    let rows = read(&p, Format::Auto);
    assert_eq!(rows[0].src, "今天, 天气");
    assert_eq!(rows[0].line, 2);
    let p = write(
        dir.path(),
        "a.tsv",
        "src\ttgt\n他说\"好\"\t白色\n".as_bytes(),
    );
    let rows = read(&p, Format::Auto);
    assert_eq!(rows[0].src, "他说\"好\"");
}

#[test]
fn lcsts_blocks_multiline_inline_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let text = "<doc id=0>\n    <summary>\n        白色上衣\n    </summary>\n    <short_text>\n        今天天气很好\n    </short_text>\n</doc>\n<doc id=1>\n<human_label>2</human_label>\n<summary>问题</summary>\n<short_text>答案</short_text>\n</doc>\n<doc id=2>\n<human_label>4</human_label>\n<summary>\n类型\n</summary>\n<short_text>\n颜色\n</short_text>\n</doc>\n";
    let p = write(dir.path(), "PART_III.txt", text.as_bytes());
    let rows = read(&p, Format::Auto);
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (rows[0].src.as_str(), rows[0].tgt.as_str()),
        ("今天天气很好", "白色上衣")
    );
    assert_eq!(
        (rows[1].src.as_str(), rows[1].tgt.as_str()),
        ("答案", "问题")
    );
    let mut o = ReaderOptions::new(Format::Lcsts);
    o.lcsts_min_label = Some(3);
    let kept: Vec<Example> = open(&p, &o).unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].src, "颜色");
    assert_eq!(kept[0].line, 14);
}

#[test]
fn lcsts_unclosed_doc_is_reported_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "x.txt",
        b"<doc id=0>\n<summary>\na\n</summary>\n",
    );
    let e = first_error(&p, &ReaderOptions::new(Format::Lcsts));
    assert!(
        e.ends_with("x.txt:1: <doc> block is not closed before the end of the file"),
        "{e}"
    );
}

#[test]
fn adgen_and_dureader_default_fields() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "train.json",
        "{\"content\": \"类型#上衣*颜色#白色\", \"summary\": \"白色上衣\"}\n".as_bytes(),
    );
    let rows = read(&p, Format::Adgen);
    assert_eq!(rows[0].src, "类型#上衣*颜色#白色");
    let p = write(
        dir.path(),
        "dev.csv",
        "text1,text2\n白色[SEP]今天天气很好,什么颜色\n".as_bytes(),
    );
    let rows = read(&p, Format::DureaderQg);
    assert_eq!(rows[0].src, "白色[SEP]今天天气很好");
    assert_eq!(rows[0].tgt, "什么颜色");
}

#[test]
fn row_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "bad.jsonl",
        b"{\"src\": \"a\", \"tgt\": \"b\"}\n{\"src\": \"\xff\"}\n",
    );
    let e = first_error(&p, &ReaderOptions::new(Format::Jsonl));
    assert!(e.contains("bad.jsonl:2: invalid UTF-8"), "{e}");
    let p = write(
        dir.path(),
        "miss.jsonl",
        b"{\"src\": \"a\", \"tgt\": \"b\"}\n{\"src\": \"a\"}\n",
    );
    let e = first_error(&p, &ReaderOptions::new(Format::Jsonl));
    assert!(e.contains("miss.jsonl:2: missing field \"tgt\""), "{e}");
    let p = write(dir.path(), "short.csv", b"src,tgt\na,b\nc\n");
    let e = first_error(&p, &ReaderOptions::new(Format::Csv));
    assert!(e.contains("short.csv:3:"), "{e}");
    let p = write(dir.path(), "cols.csv", b"source,target\na,b\n");
    let e = first_error(&p, &ReaderOptions::new(Format::Csv));
    assert!(e.contains("no column \"src\""), "{e}");
}

fn jsonl_corpus(dir: &Path, n: usize) -> PathBuf {
    let mut s = String::new();
    let texts = [
        "今天天气很好",
        "白色上衣",
        "类型#上衣*颜色#白色",
        "答案是什么",
    ];
    for i in 0..n {
        s.push_str(&format!(
            "{{\"src\": \"{}{}\", \"tgt\": \"{}\"}}\n",
            texts[i % 4],
            texts[(i / 4) % 4],
            texts[(i + 1) % 4]
        ));
    }
    write(dir, "corpus.jsonl", s.as_bytes())
}

#[test]
fn prepare_writes_readable_shards_with_the_tokenizer_ids() {
    let dir = tempfile::tempdir().unwrap();
    let input = jsonl_corpus(dir.path(), 50);
    let out = dir.path().join("shards");
    let tok = tokenizer();
    let options = PrepareOptions {
        shard_rows: 16,
        chunk_rows: 7,
        max_src_len: 8,
        ..PrepareOptions::default()
    };
    let examples = open(&input, &ReaderOptions::new(Format::Auto)).unwrap();
    let mut calls = 0;
    let report = prepare(examples, &input, &tok, &out, &options, |_| calls += 1).unwrap();
    assert_eq!(report.rows, 50);
    assert!(calls >= 8);
    assert_eq!(report.shards.len(), 4, "{:?}", report.shards);
    assert_eq!(read_meta(&out).unwrap(), report);
    let rows = shards::read_all(&out).unwrap();
    let originals = read(&input, Format::Auto);
    assert_eq!(rows.len(), 50);
    for (row, ex) in rows.iter().zip(&originals) {
        assert_eq!(row.src_text, ex.src);
        assert_eq!(row.src_ids, tok.encode(&ex.src, 8));
        assert_eq!(row.tgt_ids, tok.encode(&ex.tgt, 512));
    }
    assert!(report.truncated_src > 0);
    assert_eq!(report.max_src_len, 8);
    // The prepared directory opens again as its original texts, in order, across shards.
    for format in [Format::Auto, Format::Jsonl] {
        let again = read(&out, format);
        assert_eq!(again.len(), 50);
        for (i, (a, b)) in again.iter().zip(&originals).enumerate() {
            assert_eq!((&a.src, &a.tgt, a.line), (&b.src, &b.tgt, i as u64 + 1));
        }
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n == "out")
        .collect()
}

#[test]
fn a_bad_row_leaves_no_output_and_skip_invalid_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "c.jsonl",
        "{\"src\": \"今天\", \"tgt\": \"很好\"}\n{\"src\": \"白色\", \"tgt\": \" \"}\n{\"src\": \"上衣\", \"tgt\": \"白色\"}\n".as_bytes(),
    );
    let out = dir.path().join("out");
    let tok = tokenizer();
    let examples = open(&input, &ReaderOptions::new(Format::Auto)).unwrap();
    let err = prepare(
        examples,
        &input,
        &tok,
        &out,
        &PrepareOptions::default(),
        |_| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().ends_with("c.jsonl:2: empty target"),
        "{err}"
    );
    assert!(matches!(err, Error::Row { line: 2, .. }));
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );

    let options = PrepareOptions {
        skip_invalid: true,
        ..PrepareOptions::default()
    };
    let examples = open(&input, &ReaderOptions::new(Format::Auto)).unwrap();
    let report = prepare(examples, &input, &tok, &out, &options, |_| {}).unwrap();
    assert_eq!((report.rows, report.skipped), (2, 1));
}

#[test]
fn prepare_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let input = jsonl_corpus(dir.path(), 3);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "keep me").unwrap();
    let examples = open(&input, &ReaderOptions::new(Format::Auto)).unwrap();
    let err = prepare(
        examples,
        &input,
        &tokenizer(),
        &out,
        &PrepareOptions::default(),
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::OutputExists(_)));
    assert_eq!(
        std::fs::read_to_string(out.join("mine.txt")).unwrap(),
        "keep me"
    );
}

#[test]
fn parquet_input_and_truncated_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let input = jsonl_corpus(dir.path(), 20);
    let out = dir.path().join("shards");
    let tok = tokenizer();
    let examples = open(&input, &ReaderOptions::new(Format::Auto)).unwrap();
    prepare(
        examples,
        &input,
        &tok,
        &out,
        &PrepareOptions::default(),
        |_| {},
    )
    .unwrap();
    let shard = out.join("part-00000.parquet");
    let mut o = ReaderOptions::new(Format::Auto);
    o.src_field = Some("src_text".into());
    o.tgt_field = Some("tgt_text".into());
    let rows: Vec<Example> = open(&shard, &o).unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        rows,
        read(&input, Format::Auto)
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                e.line = i as u64 + 1;
                e
            })
            .collect::<Vec<_>>()
    );

    let bytes = std::fs::read(&shard).unwrap();
    let cut = write(dir.path(), "cut.parquet", &bytes[..bytes.len() / 2]);
    let e = first_error(&cut, &o);
    assert!(
        e.contains("cut.parquet: not a readable Parquet file"),
        "{e}"
    );
}

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../datasets/samples")
        .join(name)
}

#[test]
fn committed_samples_in_the_published_formats() {
    let lcsts = read(&sample("lcsts.txt"), Format::Auto);
    assert_eq!(lcsts.len(), 2);
    assert_eq!(lcsts[0].tgt, "城市公交将全面改用电动车");
    assert!(lcsts[0].src.starts_with("记者从市交通局获悉"));

    let mut o = ReaderOptions::new(Format::Lcsts);
    o.lcsts_min_label = Some(3);
    let test: Vec<Example> = open(&sample("lcsts_part3.txt"), &o)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(test.len(), 1);
    assert_eq!(test[0].tgt, "新版地图应用上线离线导航");

    let adgen = read(&sample("adgen.json"), Format::Adgen);
    assert_eq!(
        adgen[1].src,
        "类型#裙*版型#宽松*颜色#黑色*裙长#连衣裙*风格#简约"
    );

    let qg = read(&sample("dureader_qg.json"), Format::DureaderQg);
    assert!(qg[0].src.starts_with("两百座[SEP]"));
    assert_eq!(qg[0].tgt, "全市将新建多少座充电站？");
}

#[test]
fn a_stream_through_a_small_shuffle_buffer_sees_every_row_once_in_a_seeded_order() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..300)
        .map(|i| format!("{{\"src\": \"第{i}行白色上衣\", \"tgt\": \"答案{i}\"}}\n"))
        .collect();
    let input = write(dir.path(), "unique.jsonl", rows.as_bytes());
    let out = dir.path().join("shards");
    let options = PrepareOptions {
        shard_rows: 64,
        chunk_rows: 50,
        ..PrepareOptions::default()
    };
    let examples = open(&input, &ReaderOptions::new(Format::Auto)).unwrap();
    let report = prepare(examples, &input, &tokenizer(), &out, &options, |_| {}).unwrap();
    assert_eq!(report.shards.len(), 5);
    let order = |seed: u64, epoch: u64| -> Vec<String> {
        shards::ShuffledRows::new(&out, 40, seed, epoch)
            .unwrap()
            .map(|r| r.unwrap().src_text)
            .collect()
    };
    let a = order(7, 1);
    // Every row exactly once, though the buffer holds 40 of 300.
    let mut seen = a.clone();
    seen.sort();
    let mut all: Vec<String> = read(&input, Format::Auto)
        .into_iter()
        .map(|e| e.src)
        .collect();
    all.sort();
    assert_eq!(seen, all);
    // Fixed by the seed and the epoch, different across epochs and seeds, and shuffled.
    assert_eq!(a, order(7, 1));
    assert_ne!(a, order(7, 2));
    assert_ne!(a, order(8, 1));
    let in_file_order: Vec<String> = shards::read_all(&out)
        .unwrap()
        .into_iter()
        .map(|r| r.src_text)
        .collect();
    assert_ne!(a, in_file_order);
    // Rows travel across shard boundaries: the first 64 out are not one shard's rows.
    let first_shard: std::collections::HashSet<&String> = in_file_order[..64].iter().collect();
    assert!(a[..64].iter().filter(|r| first_shard.contains(r)).count() < 64);
}

#[test]
fn prepare_can_shuffle_in_an_order_fixed_by_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let input = jsonl_corpus(dir.path(), 300);
    let tok = tokenizer();
    let run = |name: &str, seed: Option<u64>| {
        let out = dir.path().join(name);
        let options = PrepareOptions {
            shard_rows: 64,
            chunk_rows: 50,
            shuffle_seed: seed,
            ..PrepareOptions::default()
        };
        let examples = open(&input, &ReaderOptions::new(Format::Auto)).unwrap();
        let report = prepare(examples, &input, &tok, &out, &options, |_| {}).unwrap();
        let files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), report.shards.len() + 1, "{files:?}");
        (report, shards::read_all(&out).unwrap())
    };
    let (plain_report, plain) = run("plain", None);
    let (report, a) = run("a", Some(7));
    let (_, b) = run("b", Some(7));
    let (_, c) = run("c", Some(8));
    assert_eq!(report.shards.len(), 5);
    assert_eq!(
        (report.rows, report.mean_src_len, report.max_tgt_len),
        (
            plain_report.rows,
            plain_report.mean_src_len,
            plain_report.max_tgt_len
        )
    );
    assert_eq!(a, b, "the same seed gives the same order");
    assert_ne!(a, c, "another seed gives another order");
    assert_ne!(a, plain, "shuffled");
    let key = |rows: &[shards::Row]| {
        let mut k: Vec<_> = rows.iter().map(|r| r.src_text.clone()).collect();
        k.sort();
        k
    };
    assert_eq!(key(&a), key(&plain), "every row exactly once");
    // Not a rotation or a few swaps: most rows move.
    let moved = a.iter().zip(&plain).filter(|(x, y)| x != y).count();
    assert!(moved > 250, "only {moved} of 300 rows moved");
}
