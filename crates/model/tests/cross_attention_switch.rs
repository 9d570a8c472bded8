//! `set_fused_cross_attention`: the cached decoder step's cross-attention through burn's fused
//! op or through the decomposed attention gives the same log-probabilities. Its own test
//! binary, since the setting is process-wide.

use burn::prelude::*;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_model::attention::{fused_cross_attention, set_fused_cross_attention};
use palm_model::{ModelConfig, Palm};

type B = NdArray<f32>;

/// Log-probabilities of four cached steps for two sources (one padded) with three beams each.
fn steps(model: &Palm<B>) -> Vec<Tensor<B, 2>> {
    let device = NdArrayDevice::Cpu;
    let src = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![2i64, 7, 9, 11, 3, 2, 13, 3, 0, 0], [2, 5]),
        &device,
    );
    let memory = model.encode(src);
    let mut cache = model.init_cache(&memory, 3);
    [
        [2i64; 6],
        [5, 6, 7, 8, 9, 10],
        [11, 12, 0, 14, 15, 16],
        [17, 18, 19, 20, 21, 22],
    ]
    .into_iter()
    .map(|tokens| {
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens.to_vec(), [6]), &device);
        model.step(tokens, &mut cache)
    })
    .collect()
}

#[test]
fn fused_and_decomposed_cross_attention_agree() {
    let model = Palm::<B>::new(&ModelConfig::tiny(50), &NdArrayDevice::Cpu);
    assert!(fused_cross_attention(), "the fused op is the default");
    let fused = steps(&model);
    set_fused_cross_attention(false);
    assert!(!fused_cross_attention());
    let decomposed = steps(&model);
    set_fused_cross_attention(true);
    for (step, (a, b)) in fused.into_iter().zip(decomposed).enumerate() {
        let diff: f32 = (a.clone() - b).abs().max().into_scalar();
        let scale: f32 = a.abs().max().into_scalar();
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "step {step}: {diff} (scale {scale})"
        );
    }
}
