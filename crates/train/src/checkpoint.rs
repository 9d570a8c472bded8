//! Training checkpoints: `RUN_DIR/checkpoint/step-NNNNNNNN/` holds the model, optimizer and
//! schedule records (burn-train's `Checkpointer`s write them) and `state.json`: where in the
//! data the run stands, the metric history, the best checkpoint so far and the early-stopping
//! count.
//!
//! A checkpoint is written into `.partial-step-NNNNNNNN/` and renamed into place after its last
//! file, so a directory named `step-…` is always complete: a run killed at any moment leaves
//! the previous checkpoints intact, and `--resume` takes the newest complete one.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Record, Recorder};
use burn_train::checkpoint::{Checkpointer, CheckpointerError};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The state file inside each checkpoint; written last.
pub const STATE_FILE: &str = "state.json";
const PREFIX: &str = "step-";
const PARTIAL: &str = ".partial-";

/// Metrics of one finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch (from 1).
    pub epoch: usize,
    /// Optimizer steps done at its end.
    pub step: usize,
    /// Learning rate of its last step.
    pub lr: f64,
    /// Mean training loss per target token over the epoch.
    pub train_loss: f64,
    /// Validation loss per target token.
    pub valid_loss: f64,
    /// Validation token accuracy (teacher forcing), percent.
    pub valid_accuracy: f64,
    /// `exp` of the validation NLL per target token.
    pub valid_perplexity: f64,
    /// Pre-training: masked-LM NLL per masked token on the validation split.
    pub valid_mlm_loss: Option<f64>,
    /// Pre-training: masked-LM accuracy, percent.
    pub valid_mlm_accuracy: Option<f64>,
    /// Decoded validation rows, ROUGE/BLEU in percent (absent when decoding is off).
    pub generation: Option<GenerationScores>,
}

/// ROUGE/BLEU of decoded validation rows, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenerationScores {
    /// ROUGE-1 F.
    pub rouge_1: f64,
    /// ROUGE-2 F.
    pub rouge_2: f64,
    /// ROUGE-L F.
    pub rouge_l: f64,
    /// Corpus BLEU-4.
    pub bleu_4: f64,
    /// Rows decoded.
    pub rows: usize,
}

/// The best checkpoint so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// Its optimizer step (the checkpoint's name).
    pub step: usize,
    /// Its epoch.
    pub epoch: usize,
    /// Its value of the chosen metric.
    pub value: f64,
}

/// Running sums of the epoch in progress (so a resumed epoch reports the same mean).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Running {
    /// Sum of per-token loss × tokens.
    pub loss_sum: f64,
    /// Target tokens.
    pub tokens: f64,
}

/// Where a run stands; the last file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Forward/backward passes done (seeds dropout, so a resumed run draws the same masks).
    pub micro_steps: usize,
    /// The epoch to continue (from 1).
    pub epoch: usize,
    /// The first batch of `epoch`'s order not trained yet.
    pub next_batch: usize,
    /// Sums of `epoch` so far.
    pub running: Running,
    /// Metrics of finished epochs.
    pub history: Vec<EpochRecord>,
    /// The best checkpoint by the configured metric.
    pub best: Option<Best>,
    /// Epochs since the best one (early stopping).
    pub epochs_without_improvement: usize,
    /// Early stopping ended training.
    pub stopped_early: bool,
    /// Validation loss of the starting model.
    pub valid_loss_before: f64,
    /// `[optimizer step, training loss per target token]` of every step, for the loss plot.
    pub curve: Vec<[f64; 2]>,
}

impl TrainState {
    /// The state of a run that has not trained yet.
    pub fn start(valid_loss_before: f64) -> Self {
        TrainState {
            step: 0,
            micro_steps: 0,
            epoch: 1,
            next_batch: 0,
            running: Running::default(),
            history: Vec::new(),
            best: None,
            epochs_without_improvement: 0,
            stopped_early: false,
            valid_loss_before,
            curve: Vec::new(),
        }
    }
}

/// The recorder of checkpoint files: full precision, so a resumed run is bit-identical.
pub type CheckpointRecorder = NamedMpkFileRecorder<FullPrecisionSettings>;

/// `RUN_DIR/checkpoint`.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
}

impl CheckpointDir {
    /// The checkpoint directory of a run directory.
    pub fn new(run_dir: &Path) -> Self {
        CheckpointDir {
            root: run_dir.join("checkpoint"),
        }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of the complete checkpoint at `step`.
    pub fn path(&self, step: usize) -> PathBuf {
        self.root.join(format!("{PREFIX}{step:08}"))
    }

    fn staging(&self, step: usize) -> PathBuf {
        self.root.join(format!("{PARTIAL}{PREFIX}{step:08}"))
    }

    /// Steps of the complete checkpoints, oldest first.
    pub fn complete(&self) -> Result<Vec<usize>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&self.root, e)),
        };
        let mut steps = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let name = entry.file_name();
            let Some(step) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            if entry.path().join(STATE_FILE).is_file() {
                steps.push(step);
            }
        }
        steps.sort_unstable();
        Ok(steps)
    }

    /// The state of the checkpoint at `step`.
    pub fn state(&self, step: usize) -> Result<TrainState> {
        let path = self.path(step).join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path,
            message: e.to_string(),
        })
    }

    /// The newest complete checkpoint and its state.
    pub fn latest(&self) -> Result<Option<(usize, TrainState)>> {
        match self.complete()?.last() {
            Some(&step) => Ok(Some((step, self.state(step)?))),
            None => Ok(None),
        }
    }

    /// Removes what a killed run left half-written.
    pub fn clean_partials(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PARTIAL) {
                let p = entry.path();
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// Makes the staging directory of `step` a complete checkpoint: writes `state` last, then
    /// renames the directory into place (replacing an older checkpoint of the same step).
    pub fn commit(&self, step: usize, state: &TrainState) -> Result<()> {
        let staging = self.staging(step);
        let state_path = staging.join(STATE_FILE);
        let json = serde_json::to_string_pretty(state).expect("state serializes");
        write_synced(&state_path, json.as_bytes())?;
        let target = self.path(step);
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
        }
        std::fs::rename(&staging, &target).map_err(|e| Error::io(&target, e))?;
        if let Ok(dir) = std::fs::File::open(&self.root) {
            // Best effort: persist the rename itself.
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Deletes complete checkpoints except the newest `keep_last` and `keep`.
    pub fn prune(&self, keep_last: usize, keep: Option<usize>) -> Result<()> {
        let steps = self.complete()?;
        let cut = steps.len().saturating_sub(keep_last);
        for &step in &steps[..cut] {
            if Some(step) != keep {
                let p = self.path(step);
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// A burn-train `Checkpointer` writing the record `name` into the staging directory and
    /// reporting on `done` when it is on disk; it restores from complete checkpoints.
    pub fn record_file(&self, name: &str, done: mpsc::Sender<RecordWritten>) -> RecordFile {
        RecordFile {
            dir: self.clone(),
            name: name.to_owned(),
            done,
        }
    }
}

/// What a [`RecordFile`] reports after a save.
pub type RecordWritten = std::result::Result<(), String>;

/// One record of a checkpoint (model, optimizer or schedule) as a burn-train `Checkpointer`.
pub struct RecordFile {
    dir: CheckpointDir,
    name: String,
    done: mpsc::Sender<RecordWritten>,
}

impl<R: Record<B>, B: Backend> Checkpointer<R, B> for RecordFile {
    fn save(&self, step: usize, record: R) -> std::result::Result<(), CheckpointerError> {
        let staging = self.dir.staging(step);
        let result = std::fs::create_dir_all(&staging)
            .map_err(|e| format!("{}: {e}", staging.display()))
            .and_then(|()| {
                let path = staging.join(&self.name);
                <CheckpointRecorder as Recorder<B>>::record(
                    &CheckpointRecorder::new(),
                    record,
                    path.clone(),
                )
                .map_err(|e| format!("{}: {e}", path.display()))
            })
            .and_then(|()| {
                let path = staging.join(format!("{}.mpk", self.name));
                sync_file(&path).map_err(|e| format!("{}: {e}", path.display()))
            });
        let report = result.clone();
        // The receiver waits for every record; if it is gone the run is over anyway.
        let _ = self.done.send(report);
        result.map_err(CheckpointerError::Unknown)
    }

    fn delete(&self, _step: usize) -> std::result::Result<(), CheckpointerError> {
        // Whole checkpoints are pruned by `CheckpointDir::prune`.
        Ok(())
    }

    fn restore(
        &self,
        step: usize,
        device: &B::Device,
    ) -> std::result::Result<R, CheckpointerError> {
        let path = self.dir.path(step).join(&self.name);
        <CheckpointRecorder as Recorder<B>>::load(&CheckpointRecorder::new(), path, device)
            .map_err(CheckpointerError::RecorderError)
    }
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// The network of the checkpoint at `step` of the run in `run_dir` (its `palm.json` and the
/// checkpoint's model record).
pub fn load_model<B: Backend>(
    run_dir: &Path,
    step: usize,
    device: &B::Device,
) -> Result<palm_model::Palm<B>> {
    let path = run_dir.join("palm.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: palm_model::ModelConfig =
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let file = CheckpointDir::new(run_dir).path(step).join("model");
    let record =
        <CheckpointRecorder as Recorder<B>>::load(&CheckpointRecorder::new(), file.clone(), device)
            .map_err(|e| Error::Checkpoint {
                path: file,
                message: e.to_string(),
            })?;
    let model = crate::model::PalmTraining::new(palm_model::Palm::new(&config, device), 0.0)
        .load_record(record);
    Ok(model.palm)
}

/// Writes a file and flushes it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(dir: &CheckpointDir, step: usize) {
        std::fs::create_dir_all(dir.staging(step)).unwrap();
        dir.commit(step, &TrainState::start(1.0)).unwrap();
    }

    #[test]
    fn only_committed_checkpoints_count_and_pruning_keeps_the_best() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::new(tmp.path());
        assert!(dir.latest().unwrap().is_none());
        for s in [3, 6, 9, 12] {
            fake(&dir, s);
        }
        // A half-written checkpoint (killed before its state file) is ignored and cleaned.
        std::fs::create_dir_all(dir.staging(15)).unwrap();
        std::fs::create_dir_all(dir.path(18)).unwrap();
        assert_eq!(dir.complete().unwrap(), vec![3, 6, 9, 12]);
        assert_eq!(dir.latest().unwrap().unwrap().0, 12);
        dir.clean_partials().unwrap();
        assert!(!dir.staging(15).exists());
        dir.prune(2, Some(3)).unwrap();
        assert_eq!(dir.complete().unwrap(), vec![3, 9, 12]);
        // Committing a step again replaces it.
        fake(&dir, 12);
        assert_eq!(dir.complete().unwrap(), vec![3, 9, 12]);
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.json");
        write_atomic(&p, b"1").unwrap();
        write_atomic(&p, b"2").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "2");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
