//! `datasets/manifest.toml`: where each public dataset and checkpoint is published, how to
//! verify it, and how `reproduce` splits, trains on and scores it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The whole manifest, by entry name.
pub type Manifest = BTreeMap<String, Entry>;

/// One dataset or checkpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub title: String,
    pub homepage: String,
    pub license: String,
    pub size: String,
    /// How to place the files by hand.
    pub manual: String,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// `modelscope-model`: the file list comes from the hub's listing of `repo`.
    pub listing: Option<String>,
    pub repo: Option<String>,
    pub revision: Option<String>,
    pub splits: Option<Splits>,
    pub recipe: Option<Recipe>,
    #[serde(default)]
    pub published: BTreeMap<String, f64>,
    pub smoke: Option<Smoke>,
}

/// One file: its name under `DIR/NAME/`, where it is published, its hash where known.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub name: String,
    pub url: Option<String>,
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

/// Which file holds which split, and how `palm prepare` reads them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Splits {
    pub format: String,
    pub train: String,
    pub valid: String,
    pub test: String,
    #[serde(default)]
    pub lcsts_min_label: BTreeMap<String, u8>,
}

/// The card's fine-tuning recipe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub max_src_len: usize,
    pub max_tgt_len: usize,
}

/// The committed miniature in the real layout.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smoke {
    pub dir: String,
}

/// Reads and checks a manifest file.
pub fn load(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    parse(&text).with_context(|| format!("{}", path.display()))
}

/// Parses and checks manifest text.
pub fn parse(text: &str) -> Result<Manifest> {
    let manifest: Manifest = toml::from_str(text)?;
    for (name, e) in &manifest {
        if e.files.is_empty() && e.listing.is_none() {
            bail!("[{name}]: no files and no listing");
        }
        if let Some(l) = &e.listing {
            if l != "modelscope-model" {
                bail!("[{name}]: unknown listing {l:?} (known: modelscope-model)");
            }
            if e.repo.is_none() {
                bail!("[{name}]: listing = {l:?} needs repo");
            }
        }
        for f in &e.files {
            if f.name.is_empty() || f.name.starts_with('/') || f.name.split('/').any(|p| p == "..")
            {
                bail!("[{name}]: file name {:?} must be a relative path", f.name);
            }
            if let Some(h) = &f.sha256
                && !is_sha256(h)
            {
                bail!("[{name}] {}: sha256 {h:?} is not 64 hex digits", f.name);
            }
        }
        if let Some(s) = &e.splits {
            for (split, file) in [("train", &s.train), ("valid", &s.valid), ("test", &s.test)] {
                if !e.files.iter().any(|f| &f.name == file) {
                    bail!("[{name}.splits] {split} = {file:?} is not one of its files");
                }
            }
            if let Some(k) = s
                .lcsts_min_label
                .keys()
                .find(|k| !["train", "valid", "test"].contains(&k.as_str()))
            {
                bail!("[{name}.splits] lcsts_min_label: {k:?} is not train, valid or test");
            }
        }
    }
    Ok(manifest)
}

pub fn is_sha256(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_manifest_is_complete() {
        let root = crate::root();
        let m = load(&root.join("datasets/manifest.toml")).unwrap();
        for name in ["lcsts", "adgen", "dureader-qg"] {
            let e = &m[name];
            assert!(e.splits.is_some() && e.recipe.is_some(), "{name}");
            let smoke = root.join(&e.smoke.as_ref().unwrap().dir);
            let s = e.splits.as_ref().unwrap();
            for file in [&s.train, &s.valid, &s.test] {
                assert!(
                    smoke.join(file).is_file(),
                    "{name}: smoke file {file} missing"
                );
            }
        }
        assert_eq!(m["lcsts"].published["rouge-l"], 39.78);
        assert_eq!(m["adgen"].published["bleu-4"], 10.9);
        assert!(m["palm2.0-base"].listing.is_some());
    }

    #[test]
    fn mistakes_are_named() {
        let base =
            "[x]\ntitle = \"\"\nhomepage = \"\"\nlicense = \"\"\nsize = \"\"\nmanual = \"\"\n";
        let err = |extra: &str| format!("{:#}", parse(&format!("{base}{extra}")).unwrap_err());
        assert!(err("").contains("no files"));
        assert!(err("files = [{ name = \"../a\" }]").contains("relative path"));
        assert!(err("files = [{ name = \"a\", sha256 = \"12\" }]").contains("64 hex"));
        assert!(err("files = [{ name = \"a\", md5 = \"12\" }]").contains("unknown field"));
        assert!(
            err("files = [{ name = \"a\" }]\n[x.splits]\nformat = \"jsonl\"\ntrain = \"a\"\nvalid = \"a\"\ntest = \"b\"")
                .contains("test = \"b\" is not one of its files")
        );
    }
}
