//! Loading a model directory (ModelScope or native) with its tokenizer, on the chosen device.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use palm_model::{ModelConfig, Palm};
use palm_tokenizer::PalmTokenizer;

/// The CPU backend of the default build.
pub type Cpu = burn_ndarray::NdArray<f32>;

/// A loaded model with everything needed to encode and decode text.
pub struct Loaded<B: Backend> {
    pub config: ModelConfig,
    pub model: Palm<B>,
    pub tokenizer: PalmTokenizer,
}

/// Parses `--device`; only `cpu` exists in this build.
pub fn cpu_device(device: &str) -> Result<burn_ndarray::NdArrayDevice> {
    match device {
        "cpu" => Ok(burn_ndarray::NdArrayDevice::Cpu),
        other if other.starts_with("cuda") => {
            bail!(
                "--device {other}: this palm was built without CUDA support (build with --features cuda)"
            )
        }
        other => bail!("--device {other}: unknown device; expected cpu"),
    }
}

pub fn load(dir: &Path, device: &burn_ndarray::NdArrayDevice) -> Result<Loaded<Cpu>> {
    let (config, model) = palm_model::import::load_dir::<Cpu>(dir, device)?;
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
