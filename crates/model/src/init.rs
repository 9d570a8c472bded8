//! Parameter initialisation shared by the encoder and the decoder: N(0, 0.02) for linear and
//! embedding weights (HF's `initializer_range`, the reference decoder's init).

use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::prelude::*;

const NORMAL: Initializer = Initializer::Normal {
    mean: 0.0,
    std: 0.02,
};

/// A `d_in → d_out` linear layer.
pub(crate) fn linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_initializer(NORMAL)
        .init(device)
}

/// An `n × d` embedding table.
pub(crate) fn embedding<B: Backend>(n: usize, d: usize, device: &B::Device) -> Embedding<B> {
    EmbeddingConfig::new(n, d)
        .with_initializer(NORMAL)
        .init(device)
}

/// A LayerNorm over `d` with epsilon `eps`.
pub(crate) fn layer_norm<B: Backend>(d: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d).with_epsilon(eps).init(device)
}
