//! The label-smoothed loss against the reference's `NMTLossCompute` on the tiny fixture model
//! (`crates/model/tests/fixtures/make_model_fixtures.py` records it).

use std::path::Path;

use burn::prelude::*;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_model::import::load_dir;
use palm_train::LabelSmoothedLoss;

type B = NdArray<f32>;

fn ids(v: &serde_json::Value) -> Tensor<B, 2, Int> {
    let rows = v.as_array().unwrap();
    let cols = rows[0].as_array().unwrap().len();
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect();
    Tensor::from_data(
        TensorData::new(flat, [rows.len(), cols]),
        &NdArrayDevice::Cpu,
    )
}

#[test]
fn summed_loss_matches_the_reference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny");
    let (config, model) = load_dir::<B>(&dir, &NdArrayDevice::Cpu).unwrap();
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let src = ids(&g["src_ids"]);
    let tgt = ids(&g["tgt_ids"]);
    let [b, t] = tgt.dims();
    let lp = model.forward(src, tgt.clone().slice([0..b, 0..t - 1]));
    let loss = LabelSmoothedLoss {
        smoothing: g["label_smoothing"].as_f64().unwrap(),
        vocab_size: config.encoder.vocab_size,
        pad: 0,
    };
    let out = loss.forward(lp, tgt.slice([0..b, 1..t]));
    let sum: f32 = out.sum.clone().into_scalar();
    let want = g["loss_sum"].as_f64().unwrap() as f32;
    assert!(
        ((sum - want) / want).abs() < 1e-4,
        "palm {sum} vs reference {want}"
    );
    let tokens: f32 = out.tokens.clone().into_scalar();
    let expected_tokens: u64 = g["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(tokens as u64, expected_tokens);
    let mean: f32 = out.mean().into_scalar();
    assert!((mean - sum / tokens).abs() < 1e-6);
}
