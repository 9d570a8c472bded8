//! The whole network: BERT encoder, PALM decoder and the tied generator
//! (`AbsSummarizer` + `PalmPointerGenerator` of the reference).

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::config::ModelConfig;
use crate::decoder::{DecoderCache, TransformerDecoder, step_kernels};
use crate::dense::project_onto;
use crate::encoder::BertModel;

/// The generator's own parameter: its bias. Its weight is the decoder embedding
/// (`generator.dense.weight` is the same tensor as `decoder.embeddings.weight`).
#[derive(Module, Debug)]
pub struct TiedDense<B: Backend> {
    /// `[vocab]`.
    pub bias: Param<Tensor<B, 1>>,
}

/// `log_softmax(h · Eᵀ + b)`: despite its reference name, no copy mechanism.
#[derive(Module, Debug)]
pub struct PalmGenerator<B: Backend> {
    /// Bias holder, at the reference path `generator.dense`.
    pub dense: TiedDense<B>,
}

/// The encoder's output for a batch of sources.
#[derive(Debug, Clone)]
pub struct Memory<B: Backend> {
    /// `[b, s, d]`.
    pub hidden: Tensor<B, 3>,
    /// `[b, s]`, `true` where the source id is PAD.
    pub src_pad: Tensor<B, 2, Bool>,
}

/// PALM: `bert`, `decoder`, `generator`, named as in the reference state dict.
#[derive(Module, Debug)]
pub struct Palm<B: Backend> {
    /// HF `BertModel`.
    pub bert: BertModel<B>,
    /// The decoder.
    pub decoder: TransformerDecoder<B>,
    /// The generator (bias only; weight tied).
    pub generator: PalmGenerator<B>,
    pad_id: i64,
}

impl<B: Backend> Palm<B> {
    /// A randomly initialised model (the reference's no-checkpoint initialisation, with the
    /// decoder embedding copied from the encoder's when `use_bert_emb`).
    pub fn new(config: &ModelConfig, device: &B::Device) -> Self {
        let e = &config.encoder;
        let p = &config.palm;
        let bert = BertModel::new(e, device);
        let mut decoder = TransformerDecoder::new(
            e.vocab_size,
            e.hidden_size,
            p.dec_layers,
            p.dec_heads,
            p.dec_ff_size,
            p.dec_dropout,
            device,
        );
        if p.use_bert_emb {
            decoder.embeddings.weight =
                Param::from_tensor(bert.embeddings.word_embeddings.weight.val());
        }
        Palm {
            bert,
            decoder,
            generator: PalmGenerator {
                dense: TiedDense {
                    bias: Param::from_tensor(Tensor::zeros([e.vocab_size], device)),
                },
            },
            pad_id: e.pad_token_id as i64,
        }
    }

    /// The padding id (0 for BERT vocabularies).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.generator.dense.bias.dims()[0]
    }

    /// Runs the encoder on `src [b, s]`.
    pub fn encode(&self, src: Tensor<B, 2, Int>) -> Memory<B> {
        let src_pad = src.clone().equal_elem(self.pad_id);
        let hidden = self.bert.forward(src, src_pad.clone());
        Memory { hidden, src_pad }
    }

    /// Log-probabilities over the vocabulary of decoder states `[.., d]`.
    pub fn generate_log_probs<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        log_softmax(self.generate_logits(hidden), D - 1)
    }

    /// The generator's logits (before log-softmax) of decoder states `[.., d]`.
    pub fn generate_logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        project_onto(
            hidden,
            self.decoder.embeddings.weight.val(),
            self.generator.dense.bias.val(),
        )
    }

    /// Teacher-forced decoder states after the final LayerNorm: `[b, t, d]` for the decoder
    /// input `tgt_in [b, t]` (the target without its last token).
    pub fn decode_hidden(&self, memory: &Memory<B>, tgt_in: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.decoder.forward(
            tgt_in,
            memory.hidden.clone(),
            memory.src_pad.clone(),
            self.pad_id,
        )
    }

    /// Log-probabilities `[b, t, vocab]` of the next token at every position of `tgt_in`.
    pub fn forward(&self, src: Tensor<B, 2, Int>, tgt_in: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let memory = self.encode(src);
        self.generate_log_probs(self.decode_hidden(&memory, tgt_in))
    }

    /// A decoding cache with `beams` rows per source.
    pub fn init_cache(&self, memory: &Memory<B>, beams: usize) -> DecoderCache<B> {
        self.decoder
            .init_cache(memory.hidden.clone(), memory.src_pad.clone(), beams)
    }

    /// One cached decoding step: log-probabilities `[rows, vocab]` of the token after `tokens`.
    pub fn step(&self, tokens: Tensor<B, 1, Int>, cache: &mut DecoderCache<B>) -> Tensor<B, 2> {
        if cache.fast.is_some() {
            let kernels = step_kernels::<B>().expect("a fast cache is made with step kernels");
            let bias = self.generator.dense.bias.val();
            return (kernels.step)(&self.decoder, bias, tokens, cache, self.pad_id);
        }
        let h = self.decoder.step(tokens, cache, self.pad_id);
        self.generate_log_probs(h)
    }
}
