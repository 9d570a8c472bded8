//! Beam and greedy outputs against ModelScope's `Translator` on the tiny fixture model
//! (`crates/model/tests/fixtures/make_model_fixtures.py`).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_decode::{BeamConfig, Reads, beam_search, beam_search_with};
use palm_model::{ModelConfig, Palm, import};
use serde_json::Value;

type B = NdArray<f32>;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny")
}

fn setup() -> (Palm<B>, Value) {
    let d = dir();
    let config = ModelConfig::from_model_dir(&d).unwrap();
    let mut model = Palm::<B>::new(&config, &NdArrayDevice::Cpu);
    import::load_pytorch(&mut model, &d.join("pytorch_model.bin")).unwrap();
    let g = serde_json::from_str(&std::fs::read_to_string(d.join("golden.json")).unwrap()).unwrap();
    (model, g)
}

fn row(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The source ids of example `i` without padding.
fn source(g: &Value, i: usize) -> Vec<i64> {
    row(&g["src_ids"][i])
        .into_iter()
        .filter(|&x| x != 0)
        .collect()
}

fn batch(rows: &[Vec<i64>]) -> Tensor<B, 2, Int> {
    let s = rows.iter().map(Vec::len).max().unwrap();
    let mut flat = Vec::new();
    for r in rows {
        flat.extend(r);
        flat.extend(std::iter::repeat_n(0, s - r.len()));
    }
    Tensor::from_data(TensorData::new(flat, [rows.len(), s]), &NdArrayDevice::Cpu)
}

fn config(g: &Value, beam: usize) -> BeamConfig {
    BeamConfig {
        beam_size: beam,
        alpha: g["alpha"].as_f64().unwrap(),
        min_length: g["min_length"].as_u64().unwrap() as usize,
        max_length: g["max_length"].as_u64().unwrap() as usize,
        bos: 101,
        eos: 102,
    }
}

fn expected(g: &Value, key: &str, i: usize) -> Vec<u32> {
    row(&g[key][i]).into_iter().map(|x| x as u32).collect()
}

#[test]
fn beam_and_greedy_match_the_reference_one_source_at_a_time() {
    let (model, g) = setup();
    let n = g["src_ids"].as_array().unwrap().len();
    for i in 0..n {
        let src = batch(&[source(&g, i)]);
        let beam = beam_search(
            &model,
            src.clone(),
            &config(&g, g["beam"].as_u64().unwrap() as usize),
        );
        assert_eq!(
            beam[0].tokens,
            expected(&g, "beam_ids", i),
            "beam, example {i}"
        );
        let greedy = beam_search(&model, src, &config(&g, 1));
        assert_eq!(
            greedy[0].tokens,
            expected(&g, "greedy_ids", i),
            "greedy, example {i}"
        );
    }
}

#[test]
fn batched_padded_sources_give_the_same_outputs() {
    let (model, g) = setup();
    let n = g["src_ids"].as_array().unwrap().len();
    let rows: Vec<Vec<i64>> = (0..n).map(|i| source(&g, i)).collect();
    let out = beam_search(
        &model,
        batch(&rows),
        &config(&g, g["beam"].as_u64().unwrap() as usize),
    );
    for (i, h) in out.iter().enumerate() {
        assert_eq!(h.tokens, expected(&g, "beam_ids", i), "example {i}");
    }
}

#[test]
fn min_and_max_length_bound_the_output() {
    let (model, g) = setup();
    let src = batch(&[source(&g, 0)]);
    let mut c = config(&g, 3);
    c.min_length = 12;
    c.max_length = 15;
    let h = &beam_search(&model, src.clone(), &c)[0];
    assert!(
        h.tokens.len() >= 12 && h.tokens.len() <= 15,
        "{:?}",
        h.tokens
    );
    assert!(
        !h.tokens[..11].contains(&102),
        "EOS before min_length: {:?}",
        h.tokens
    );
    c.min_length = 0;
    c.max_length = 2;
    assert!(beam_search(&model, src, &c)[0].tokens.len() <= 2);
}

#[test]
fn deferred_reads_give_the_hypotheses_of_a_read_every_step() {
    // Deferred steps choose the cache rows, tokens and scores on the device; the host reads
    // them at min_length. Same tokens and bit-identical scores, with sources finishing at
    // different steps after min_length, forced lengths (min = max) and greedy search.
    let (model, g) = setup();
    let n = g["src_ids"].as_array().unwrap().len();
    let rows: Vec<Vec<i64>> = (0..n).map(|i| source(&g, i)).collect();
    for (beam, min, max) in [(3, 4, 12), (4, 9, 9), (1, 3, 8), (2, 0, 6)] {
        let mut c = config(&g, beam);
        c.min_length = min;
        c.max_length = max;
        let every = beam_search_with(&model, batch(&rows), &c, Reads::EveryStep);
        let deferred = beam_search_with(&model, batch(&rows), &c, Reads::Deferred);
        assert_eq!(every.len(), n);
        for (i, (a, b)) in every.iter().zip(&deferred).enumerate() {
            assert_eq!(a.tokens, b.tokens, "beam {beam}, {min}..{max}, example {i}");
            assert_eq!(
                a.score.to_bits(),
                b.score.to_bits(),
                "beam {beam}, {min}..{max}, example {i}"
            );
            assert!(a.tokens.len() >= min.min(max) && a.tokens.len() <= max);
        }
    }
}

#[test]
fn top_k_agrees_with_a_full_sort_ties_included() {
    let device = burn_ndarray::NdArrayDevice::Cpu;
    let (rows, cols, k) = (4, 50, 5);
    let mut data: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 23) as f32 / 4.0).floor())
        .collect();
    data[3] = f32::NEG_INFINITY;
    data[cols + 7] = f32::NEG_INFINITY;
    let x = Tensor::<burn_ndarray::NdArray<f32>, 2>::from_data(
        TensorData::new(data.clone(), [rows, cols]),
        &device,
    );
    let (values, indices) = palm_decode::top_k(x, k);
    for r in 0..rows {
        let row = &data[r * cols..(r + 1) * cols];
        let mut order: Vec<usize> = (0..cols).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for j in 0..k {
            assert_eq!(indices[r * k + j] as usize, order[j], "row {r}, rank {j}");
            assert_eq!(values[r * k + j], row[order[j]]);
        }
    }
}
