//! Plain progress lines for burn-train: one line every few seconds during an epoch and one at
//! its end, carrying the metric values (for logs and terminals alike).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use burn_train::metric::{MetricDefinition, MetricId};
use burn_train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};

/// Prints `[train] epoch 1/4 · 3200/12000 · Loss 2.314 · Accuracy 45.2 · …` lines.
pub struct PlainRenderer {
    names: HashMap<MetricId, String>,
    train: BTreeMap<String, String>,
    valid: BTreeMap<String, String>,
    last: Option<Instant>,
    every: Duration,
}

impl PlainRenderer {
    /// A renderer printing at most every `every` during an epoch.
    pub fn new(every: Duration) -> Self {
        PlainRenderer {
            names: HashMap::new(),
            train: BTreeMap::new(),
            valid: BTreeMap::new(),
            last: None,
            every,
        }
    }

    fn store(&self, map: &mut BTreeMap<String, String>, state: MetricState) {
        let (entry, value) = match state {
            MetricState::Generic(e) => (e, None),
            MetricState::Numeric(e, n) => (e, Some(n.current())),
        };
        let name = self
            .names
            .get(&entry.metric_id)
            .cloned()
            .unwrap_or_else(|| "metric".into());
        let text = match value {
            Some(v) if v.abs() < 1e-2 && v != 0.0 => format!("{v:.2e}"),
            Some(v) => format!("{v:.4}"),
            None => entry.serialized_entry.formatted,
        };
        map.insert(name, text);
    }

    fn line(split: &str, item: &TrainingProgress, metrics: &BTreeMap<String, String>) -> String {
        let mut s = format!(
            "[{split}] epoch {}/{}",
            item.global_progress.items_processed, item.global_progress.items_total
        );
        if let Some(p) = &item.progress {
            s.push_str(&format!(" · {}/{}", p.items_processed, p.items_total));
        }
        for (k, v) in metrics {
            s.push_str(&format!(" · {k} {v}"));
        }
        s
    }
}

impl MetricsRendererTraining for PlainRenderer {
    fn update_train(&mut self, state: MetricState) {
        let mut m = std::mem::take(&mut self.train);
        self.store(&mut m, state);
        self.train = m;
    }

    fn update_valid(&mut self, state: MetricState) {
        let mut m = std::mem::take(&mut self.valid);
        self.store(&mut m, state);
        self.valid = m;
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let done = item
            .progress
            .as_ref()
            .is_some_and(|p| p.items_processed >= p.items_total);
        let due = self.last.is_none_or(|t| t.elapsed() >= self.every);
        if done || due {
            println!("{}", Self::line("train", &item, &self.train));
            self.last = Some(Instant::now());
        }
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let done = item
            .progress
            .as_ref()
            .is_some_and(|p| p.items_processed >= p.items_total);
        if done {
            println!("{}", Self::line("valid", &item, &self.valid));
        }
    }
}

impl MetricsRendererEvaluation for PlainRenderer {
    fn update_test(&mut self, _: EvaluationName, _: MetricState) {}

    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for PlainRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name);
    }
}
