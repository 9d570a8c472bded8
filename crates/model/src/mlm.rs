//! BERT's masked-LM head (`cls.predictions`), used by PALM's pre-training objective on the
//! encoder output: dense → GELU → LayerNorm, then a projection tied to the encoder's word
//! embeddings plus its own bias. Fine-tuning and generation never use it, and a model
//! directory does not store it.

use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::activation::{gelu, log_softmax};

use crate::Palm;
use crate::config::ModelConfig;
use crate::dense::{dense, project_onto};
use crate::init::{layer_norm, linear};

/// The masked-LM head.
#[derive(Module, Debug)]
pub struct MlmHead<B: Backend> {
    /// `transform.dense`.
    pub dense: Linear<B>,
    /// `transform.LayerNorm`.
    pub layer_norm: LayerNorm<B>,
    /// The output bias (the weight is the encoder's word embedding table).
    pub bias: burn::module::Param<Tensor<B, 1>>,
}

impl<B: Backend> MlmHead<B> {
    /// A fresh head for `config`'s encoder.
    pub fn new(config: &ModelConfig, device: &B::Device) -> Self {
        let e = &config.encoder;
        MlmHead {
            dense: linear(e.hidden_size, e.hidden_size, device),
            layer_norm: layer_norm(e.hidden_size, e.layer_norm_eps, device),
            bias: burn::module::Param::from_tensor(Tensor::zeros([e.vocab_size], device)),
        }
    }

    /// Log-probabilities over the vocabulary for encoder states `[b, s, d]` of `palm`.
    pub fn forward(&self, palm: &Palm<B>, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.layer_norm.forward(gelu(dense(&self.dense, hidden)));
        // The word table is [vocab, d]; logits = h · tableᵀ + bias.
        let table = palm.bert.embeddings.word_embeddings.weight.val();
        let logits = project_onto(h, table, self.bias.val());
        log_softmax(logits, 2)
    }
}
