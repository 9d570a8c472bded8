//! Loading ModelScope PALM checkpoints (`pytorch_model.bin`, `palm-reference.md` §2.8–2.9).
//!
//! The reference loads with `strict=False` and silently ignores what does not fit; here every
//! parameter must be found with the right shape, and every key of the file must be either
//! used or one of the known deterministic buffers and duplicates below.

use std::path::Path;

use burn::prelude::*;
use burn_store::pytorch::PytorchReader;
use burn_store::{ModuleSnapshot, PytorchStore};

use crate::{Error, Result};

/// ModelScope names → ours, applied in order to every key of the file.
const KEY_REMAPS: &[(&str, &str)] = &[
    // Containers and wrappers: DDP's `module.`, PreSumm's `model.`, a
    // `PalmForTextGeneration` state dict's `palm.` (also combined: `model.palm.`).
    (r"^(?:(?:module|model|palm)\.)+", ""),
    // AliceMind-style names.
    (r"^bert\.model\.", "bert."),
    (r"^generator\.0\.", "generator.dense."),
    // `self` is a Rust keyword.
    (r"\.attention\.self\.", ".attention.self_attn."),
    // HF spells its norms `LayerNorm`; weight/bias become gamma/beta in the adapter.
    (r"\.LayerNorm\.", ".layer_norm."),
];

/// Keys (after remapping) that carry no parameter of ours: deterministic buffers rebuilt at
/// init, the loss module's copies of the generator, and the tied generator weight.
const IGNORED: &[&str] = &[
    r"^decoder\.transformer_layers\.\d+\.mask$",
    r"^decoder\.pos_emb\.pe$",
    r"^bert\.embeddings\.position_ids$",
    r"^bert\.embeddings\.token_type_ids$",
    r"^loss\.",
    r"^__tied__\.",
];

/// Applies the remap table `(regex, replacement)` in order; the patterns are compiled once.
pub(crate) struct Remaps(Vec<(regex::Regex, &'static str)>);

impl Remaps {
    pub(crate) fn new(table: &[(&str, &'static str)]) -> Self {
        Remaps(
            table
                .iter()
                .map(|(from, to)| (regex::Regex::new(from).expect("valid remap pattern"), *to))
                .collect(),
        )
    }

    pub(crate) fn apply(&self, key: &str) -> String {
        let mut k = key.to_owned();
        for (re, to) in &self.0 {
            k = re.replace_all(&k, *to).into_owned();
        }
        k
    }
}

/// What an import found, for logs.
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    /// Parameters loaded.
    pub loaded: usize,
    /// File keys skipped as deterministic buffers or duplicates.
    pub ignored: Vec<String>,
}

/// Loads a ModelScope `pytorch_model.bin` into `model`, strictly.
pub fn load_pytorch<B: Backend, M: ModuleSnapshot<B>>(
    model: &mut M,
    path: &Path,
) -> Result<ImportReport> {
    let checkpoint_error = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    // PreSumm checkpoints wrap the state dict with optimizer state: {"model": …, "optim": …}.
    // The optimizer state may not even parse (integer dict keys); then only "model" is read.
    let (keys, wrapped) = match PytorchReader::new(path) {
        Ok(reader) => {
            let keys = reader.keys();
            let wrapped = keys.iter().any(|k| k.starts_with("model."))
                && keys.iter().any(|k| !k.starts_with("model."));
            let keys = if wrapped {
                keys.into_iter()
                    .filter_map(|k| k.strip_prefix("model.").map(str::to_owned))
                    .collect()
            } else {
                keys
            };
            (keys, wrapped)
        }
        Err(first) => match PytorchReader::with_top_level_key(path, "model") {
            Ok(reader) => (reader.keys(), true),
            Err(_) => return Err(checkpoint_error(format!("cannot read: {first}"))),
        },
    };
    let remaps = Remaps::new(KEY_REMAPS);
    let names: Vec<String> = keys.iter().map(|k| remaps.apply(k)).collect();
    let mut store = PytorchStore::from_file(path)
        .validate(false)
        .allow_partial(true);
    if wrapped {
        store = store.with_top_level_key("model");
    }
    for (from, to) in KEY_REMAPS {
        store = store.with_key_remapping(*from, *to);
    }
    // Tie: PyTorch copies parameters in module order, so the generator's copy wins.
    if names.iter().any(|n| n == "generator.dense.weight") {
        store = store
            .with_key_remapping(
                r"^decoder\.embeddings\.weight$",
                "__tied__.decoder.embeddings.weight",
            )
            .with_key_remapping(r"^generator\.dense\.weight$", "decoder.embeddings.weight");
    }
    let result = model
        .load_from(&mut store)
        .map_err(|e| checkpoint_error(e.to_string()))?;
    if let Some(e) = result.errors.first() {
        return Err(checkpoint_error(format!("{e}")));
    }
    if let Some((name, _)) = result.missing.first() {
        return Err(checkpoint_error(format!("missing parameter {name}")));
    }
    let ignored_res: Vec<regex::Regex> = IGNORED
        .iter()
        .map(|p| regex::Regex::new(p).expect("valid pattern"))
        .collect();
    // burn-store lists a norm's file key `weight`/`bias` as unused even when the adapter loaded
    // it into `gamma`/`beta`; those keys were used.
    let consumed_by_norm = |key: &str| {
        let alt = if let Some(p) = key.strip_suffix(".weight") {
            format!("{p}.gamma")
        } else if let Some(p) = key.strip_suffix(".bias") {
            format!("{p}.beta")
        } else {
            return false;
        };
        result.applied.contains(&alt)
    };
    let mut ignored = Vec::new();
    for key in &result.unused {
        if consumed_by_norm(key) {
            continue;
        }
        if ignored_res.iter().any(|re| re.is_match(key)) {
            ignored.push(key.clone());
        } else {
            return Err(checkpoint_error(format!("unexpected parameter {key}")));
        }
    }
    Ok(ImportReport {
        loaded: result.applied.len(),
        ignored,
    })
}

/// The kind of a model directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// ModelScope: `config.json`, `pytorch_model.bin`, the encoder subfolder.
    ModelScope,
    /// Written by palm: `palm.json` and `model.mpk`.
    Native,
}

/// File name of a native model's configuration.
pub const NATIVE_CONFIG: &str = "palm.json";
/// File name (without extension) of a native model's weights.
pub const NATIVE_WEIGHTS: &str = "model";

/// Tells a native directory from a ModelScope one by the files present.
pub fn dir_kind(dir: &Path) -> Result<DirKind> {
    if dir.join(NATIVE_CONFIG).is_file() {
        Ok(DirKind::Native)
    } else if dir.join("pytorch_model.bin").is_file() {
        Ok(DirKind::ModelScope)
    } else if !dir.is_dir() {
        Err(Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory"),
        })
    } else {
        Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "not a model directory: neither {NATIVE_CONFIG} (palm) nor pytorch_model.bin (ModelScope)"
            ),
        })
    }
}

/// Loads a model directory of either kind.
pub fn load_dir<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(crate::ModelConfig, crate::Palm<B>)> {
    load_dir_adjusted(dir, device, |_| {})
}

/// Loads a model directory, changing its configuration first with `adjust` (training
/// settings such as dropout; the weights must still fit).
pub fn load_dir_adjusted<B: Backend>(
    dir: &Path,
    device: &B::Device,
    adjust: impl FnOnce(&mut crate::ModelConfig),
) -> Result<(crate::ModelConfig, crate::Palm<B>)> {
    use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
    match dir_kind(dir)? {
        DirKind::ModelScope => {
            let mut config = crate::ModelConfig::from_model_dir(dir)?;
            adjust(&mut config);
            let mut model = crate::Palm::new(&config, device);
            load_pytorch(&mut model, &dir.join("pytorch_model.bin"))?;
            Ok((config, model))
        }
        DirKind::Native => {
            let path = dir.join(NATIVE_CONFIG);
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let mut config: crate::ModelConfig =
                serde_json::from_str(&text).map_err(|e| Error::Config {
                    path: path.display().to_string(),
                    key: String::new(),
                    message: e.to_string(),
                })?;
            config.validate(&path.display().to_string())?;
            adjust(&mut config);
            let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
            let model = crate::Palm::new(&config, device)
                .load_file(dir.join(NATIVE_WEIGHTS), &recorder, device)
                .map_err(|e| Error::Checkpoint {
                    path: dir.join(format!("{NATIVE_WEIGHTS}.mpk")),
                    message: e.to_string(),
                })?;
            Ok((config, model))
        }
    }
}

/// Writes `model` as a native directory: `palm.json` and `model.mpk` (the vocabulary is the
/// caller's to copy).
pub fn save_native<B: Backend>(
    model: &crate::Palm<B>,
    config: &crate::ModelConfig,
    dir: &Path,
) -> Result<()> {
    use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    model
        .clone()
        .save_file(dir.join(NATIVE_WEIGHTS), &recorder)
        .map_err(|e| Error::Checkpoint {
            path: dir.join(format!("{NATIVE_WEIGHTS}.mpk")),
            message: e.to_string(),
        })?;
    let path = dir.join(NATIVE_CONFIG);
    let json = serde_json::to_string_pretty(config).expect("config serializes");
    std::fs::write(&path, json + "\n").map_err(|source| Error::Io { path, source })
}
