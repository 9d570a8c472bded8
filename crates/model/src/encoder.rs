//! The BERT encoder (HF `BertModel`, post-LN, exact GELU), with field names that mirror the HF
//! state-dict paths (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`, …)
//! so that import needs only the remaps in `import.rs`.

use burn::nn::{Dropout, DropoutConfig, Embedding, LayerNorm, Linear};
use burn::prelude::*;

use crate::attention::multi_head_attention;
use crate::config::BertConfig;
use crate::dense::Narrow::{Heads, Inner};
use crate::dense::{dense, dense_narrow};
use crate::grad;
use crate::init::{embedding, layer_norm, linear};

/// Word + position + token-type embeddings, LayerNorm, dropout.
#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    /// `[vocab, d]`.
    pub word_embeddings: Embedding<B>,
    /// `[max_positions, d]`.
    pub position_embeddings: Embedding<B>,
    /// `[type_vocab, d]`; PALM always uses type 0.
    pub token_type_embeddings: Embedding<B>,
    /// HF `LayerNorm`.
    pub layer_norm: LayerNorm<B>,
    layer_norm_eps: f64,
    dropout: Dropout,
}

impl<B: Backend> BertEmbeddings<B> {
    /// Word + position + token-type embeddings of `src [b, s]`, before the LayerNorm.
    ///
    /// Positions are `0..s` in every row and the token type is always 0, so those two tables
    /// are added as broadcast slices rather than gathered per token: the same sums forward,
    /// and a gradient that is a reduction over the batch instead of a scatter-add of every
    /// token's row (burn's CubeCL scatter runs one thread per column over all `b × s` tokens,
    /// about 10 ms per table at batch 256 on an H200).
    pub fn sum(&self, src: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, s] = src.dims();
        let position = self.position_embeddings.weight.val().slice(0..s);
        let token_type = self.token_type_embeddings.weight.val().slice(0..1);
        grad::embedding(&self.word_embeddings, src)
            + position.unsqueeze::<3>()
            + token_type.unsqueeze::<3>()
    }
}

/// Query, key and value projections (HF `attention.self`).
#[derive(Module, Debug)]
pub struct BertSelfAttention<B: Backend> {
    /// Query projection.
    pub query: Linear<B>,
    /// Key projection.
    pub key: Linear<B>,
    /// Value projection.
    pub value: Linear<B>,
    heads: usize,
    dropout: Dropout,
}

/// A dense layer followed by dropout and a residual LayerNorm (HF `*.output`).
#[derive(Module, Debug)]
pub struct BertOutput<B: Backend> {
    /// Projection.
    pub dense: Linear<B>,
    /// HF `LayerNorm`.
    pub layer_norm: LayerNorm<B>,
    layer_norm_eps: f64,
    dropout: Dropout,
}

impl<B: Backend> BertOutput<B> {
    fn forward(&self, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = grad::dropout_add(&self.dropout, dense(&self.dense, x), residual);
        grad::layer_norm(&self.layer_norm, self.layer_norm_eps, x)
    }
}

/// Self-attention with its output block (HF `attention`).
#[derive(Module, Debug)]
pub struct BertAttention<B: Backend> {
    /// HF `attention.self`.
    pub self_attn: BertSelfAttention<B>,
    /// HF `attention.output`.
    pub output: BertOutput<B>,
}

/// The FFN's first half (HF `intermediate`).
#[derive(Module, Debug)]
pub struct BertIntermediate<B: Backend> {
    /// `d → intermediate`.
    pub dense: Linear<B>,
}

/// One encoder layer.
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    /// Attention block.
    pub attention: BertAttention<B>,
    /// FFN inner projection.
    pub intermediate: BertIntermediate<B>,
    /// FFN output block.
    pub output: BertOutput<B>,
}

/// The stack of encoder layers (HF `encoder`).
#[derive(Module, Debug)]
pub struct BertEncoder<B: Backend> {
    /// HF `encoder.layer`.
    pub layer: Vec<BertLayer<B>>,
}

/// HF `pooler`: kept so checkpoints load and export whole; it does not affect generation.
#[derive(Module, Debug)]
pub struct BertPooler<B: Backend> {
    /// `d → d`.
    pub dense: Linear<B>,
}

/// HF `BertModel`.
#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    /// Embeddings.
    pub embeddings: BertEmbeddings<B>,
    /// Layers.
    pub encoder: BertEncoder<B>,
    /// Pooler (unused by PALM's forward).
    pub pooler: BertPooler<B>,
}

impl<B: Backend> BertModel<B> {
    /// A randomly initialised encoder (N(0, 0.02), as HF's `initializer_range`).
    pub fn new(c: &BertConfig, device: &B::Device) -> Self {
        let d = c.hidden_size;
        let emb = |n: usize| embedding(n, d, device);
        let drop = DropoutConfig::new(c.hidden_dropout_prob).init();
        let output = |i: usize| BertOutput {
            dense: linear(i, d, device),
            layer_norm: layer_norm(d, c.layer_norm_eps, device),
            layer_norm_eps: c.layer_norm_eps,
            dropout: drop.clone(),
        };
        let layers = (0..c.num_hidden_layers)
            .map(|_| BertLayer {
                attention: BertAttention {
                    self_attn: BertSelfAttention {
                        query: linear(d, d, device),
                        key: linear(d, d, device),
                        value: linear(d, d, device),
                        heads: c.num_attention_heads,
                        dropout: DropoutConfig::new(c.attention_probs_dropout_prob).init(),
                    },
                    output: output(d),
                },
                intermediate: BertIntermediate {
                    dense: linear(d, c.intermediate_size, device),
                },
                output: output(c.intermediate_size),
            })
            .collect();
        BertModel {
            embeddings: BertEmbeddings {
                word_embeddings: emb(c.vocab_size),
                position_embeddings: emb(c.max_position_embeddings),
                token_type_embeddings: emb(c.type_vocab_size),
                layer_norm: layer_norm(d, c.layer_norm_eps, device),
                layer_norm_eps: c.layer_norm_eps,
                dropout: drop.clone(),
            },
            encoder: BertEncoder { layer: layers },
            pooler: BertPooler {
                dense: linear(d, d, device),
            },
        }
    }

    /// Encodes `src [b, s]` with `pad_mask [b, s]` (`true` at padding) into `[b, s, d]`.
    pub fn forward(&self, src: Tensor<B, 2, Int>, pad_mask: Tensor<B, 2, Bool>) -> Tensor<B, 3> {
        let e = &self.embeddings;
        let sum = e.sum(src);
        let mut x = grad::dropout(
            &e.dropout,
            grad::layer_norm(&e.layer_norm, e.layer_norm_eps, sum),
        );
        // [b, 1, 1, s]: every query ignores padded keys.
        let mask = pad_mask.unsqueeze_dims::<4>(&[1, 2]);
        for layer in &self.encoder.layer {
            x = layer.forward(x, mask.clone());
        }
        x
    }
}

impl<B: Backend> BertLayer<B> {
    fn forward(&self, x: Tensor<B, 3>, mask: Tensor<B, 4, Bool>) -> Tensor<B, 3> {
        let a = &self.attention.self_attn;
        let dh = x.dims()[2] / a.heads;
        let scale = 1.0 / (dh as f64).sqrt();
        let rows = |layer: &Linear<B>| dense_narrow(layer, x.clone(), Heads);
        let q = rows(&a.query).mul_scalar(scale);
        let ctx = multi_head_attention(q, rows(&a.key), rows(&a.value), a.heads, mask, &a.dropout);
        let h = self.attention.output.forward(ctx, x);
        let inner = grad::gelu(dense_narrow(&self.intermediate.dense, h.clone(), Inner));
        self.output.forward(inner, h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};
    use burn_autodiff::Autodiff;
    use burn_ndarray::{NdArray, NdArrayDevice};

    type B = Autodiff<NdArray<f32>>;

    #[test]
    fn broadcast_position_and_type_embeddings_equal_the_gathered_ones_with_gradients() {
        let device = NdArrayDevice::Cpu;
        let config = crate::config::BertConfig {
            vocab_size: 30,
            hidden_size: 8,
            max_position_embeddings: 12,
            type_vocab_size: 2,
            ..crate::config::ModelConfig::tiny(30).encoder
        };
        let encoder = BertModel::<B>::new(&config, &device);
        let e = &encoder.embeddings;
        let (b, s) = (3, 5);
        let src = Tensor::<B, 2, Int>::random([b, s], Distribution::Uniform(0.0, 30.0), &device);
        let upstream = Tensor::<B, 3>::random([b, s, 8], Distribution::Normal(0.0, 1.0), &device);

        // The per-token lookups the broadcast replaces.
        let positions = Tensor::<B, 1, Int>::arange(0..s as i64, &device)
            .unsqueeze::<2>()
            .expand([b, s]);
        let gathered = e.word_embeddings.forward(src.clone())
            + e.position_embeddings.forward(positions)
            + e.token_type_embeddings
                .forward(Tensor::zeros([b, s], &device));
        let broadcast = e.sum(src);
        assert_eq!(
            broadcast.to_data(),
            gathered.to_data(),
            "the same sums, bit for bit"
        );

        let grads = |x: Tensor<B, 3>| {
            let g = (x * upstream.clone()).sum().backward();
            [
                &e.word_embeddings,
                &e.position_embeddings,
                &e.token_type_embeddings,
            ]
            .map(|t| t.weight.val().grad(&g).unwrap().into_data())
        };
        for (a, b) in grads(broadcast).iter().zip(&grads(gathered)) {
            a.assert_approx_eq::<f32>(b, Tolerance::default());
        }
    }
}
