//! Parity with HF `BertTokenizer` (transformers 4.46.3, `do_lower_case=True`) and ModelScope's
//! decoding: golden values made by `fixtures/make_tokenizer_fixtures.py`.

use palm_tokenizer::PalmTokenizer;
use serde_json::Value;

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/tokenizer_cases.json")).unwrap()
}

fn tokenizer() -> PalmTokenizer {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vocab.txt");
    PalmTokenizer::from_vocab_file(path).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn ids_match_bert_tokenizer() {
    let tok = tokenizer();
    let f = fixture();
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 200);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let expected_tokens: Vec<&str> = c["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tok.tokenize(text), expected_tokens, "tokens of {text:?}");
        assert_eq!(tok.encode(text, 100_000), ids(&c["ids"]), "ids of {text:?}");
        assert_eq!(
            tok.encode(text, 16),
            ids(&c["ids_max16"]),
            "max 16 of {text:?}"
        );
    }
}

#[test]
fn batch_encoding_equals_single() {
    let tok = tokenizer();
    let f = fixture();
    let texts: Vec<&str> = f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    let batch = tok.encode_batch(&texts, 16);
    for (t, b) in texts.iter().zip(batch) {
        assert_eq!(tok.encode(t, 16), b);
    }
}

#[test]
fn decoding_matches_modelscope_pipeline() {
    let tok = tokenizer();
    let f = fixture();
    for c in f["cases"].as_array().unwrap() {
        assert_eq!(
            tok.decode(&ids(&c["ids"])),
            c["decoded"].as_str().unwrap(),
            "decode of {:?}",
            c["text"]
        );
    }
    for c in f["decode_cases"].as_array().unwrap() {
        let ids = ids(&c["ids"]);
        assert_eq!(tok.decode(&ids), c["decoded"].as_str().unwrap(), "{ids:?}");
    }
}

#[test]
fn round_trip_of_ordinary_chinese_is_lower_cased_text() {
    let tok = tokenizer();
    for s in [
        "今天天气很好！",
        "模型预训练，文本生成。",
        "上衣颜色：白色、黑色",
    ] {
        assert_eq!(tok.decode(&tok.encode(s, 128)), s);
    }
}
