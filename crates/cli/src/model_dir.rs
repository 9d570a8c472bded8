//! Loading a model directory (ModelScope or native) with its tokenizer, on the chosen device.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use palm_model::{ModelConfig, Palm};
use palm_tokenizer::PalmTokenizer;

/// A loaded model with everything needed to encode and decode text.
pub struct Loaded<B: Backend> {
    pub config: ModelConfig,
    pub model: Palm<B>,
    pub tokenizer: PalmTokenizer,
}

pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<Loaded<B>> {
    let (config, model) = palm_model::import::load_dir::<B>(dir, device)?;
    let vocab = dir.join("vocab.txt");
    let tokenizer = PalmTokenizer::from_vocab_file(&vocab)
        .with_context(|| format!("{}: the model directory needs its vocab.txt", dir.display()))?;
    if tokenizer.vocab_size() != config.encoder.vocab_size {
        bail!(
            "{}: {} tokens, but the model has a vocabulary of {}",
            vocab.display(),
            tokenizer.vocab_size(),
            config.encoder.vocab_size
        );
    }
    Ok(Loaded {
        config,
        model,
        tokenizer,
    })
}

pub use palm_train::batch::pad_ids as pad_batch;
