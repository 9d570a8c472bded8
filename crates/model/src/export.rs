//! Export to safetensors with the reference's key names, so that a model trained by palm loads
//! into ModelScope's PyTorch `AbsSummarizer` (`load_state_dict`, strict) unchanged.

use std::path::Path;

use burn::prelude::*;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
use safetensors::tensor::{Dtype, TensorView};

use crate::import::Remaps;
use crate::{Error, Palm, Result};

/// Our names → the reference's, applied in order (the inverse of `import::KEY_REMAPS`).
const EXPORT_REMAPS: &[(&str, &str)] = &[
    (r"\.attention\.self_attn\.", ".attention.self."),
    // Only the BERT side spells its norms `LayerNorm`; the decoder's are `layer_norm*`.
    (r"^(bert\..*)\.layer_norm\.", "${1}.LayerNorm."),
];

/// The reference name of one of our parameter paths (after the PyTorch adapter).
pub fn reference_name(path: &str) -> String {
    Remaps::new(EXPORT_REMAPS).apply(path)
}

/// Writes every parameter as f32 under its reference name, plus `generator.dense.weight` (the
/// tied copy of `decoder.embeddings.weight` that PyTorch's state dict carries), into one
/// safetensors file. `prefix` is put before every key (`"palm."` gives the key names of a
/// `PalmForTextGeneration` state dict; `""` those of `AbsSummarizer`).
pub fn export_safetensors<B: Backend>(model: &Palm<B>, path: &Path, prefix: &str) -> Result<()> {
    let error = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let remaps = Remaps::new(EXPORT_REMAPS);
    let snapshots = model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(snapshots.len() + 1);
    for s in snapshots {
        let data = s
            .to_data()
            .map_err(|e| error(format!("{}: {e:?}", s.full_path())))?
            .convert::<f32>();
        let values: Vec<f32> = data
            .to_vec()
            .map_err(|e| error(format!("{}: {e:?}", s.full_path())))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let name = remaps.apply(&s.full_path());
        if name == "decoder.embeddings.weight" {
            tensors.push((
                "generator.dense.weight".into(),
                data.shape.as_slice().to_vec(),
                bytes.clone(),
            ));
        }
        tensors.push((name, data.shape.as_slice().to_vec(), bytes));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (format!("{prefix}{name}"), v))
                .map_err(|e| error(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    safetensors::tensor::serialize_to_file(views, None, &tmp).map_err(|e| error(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
