//! What a validation step hands to burn-train's metrics: the teacher-forced output plus, for
//! the rows the loop decoded, prediction/reference text pairs, which [`GenerationMetric`]
//! scores as ROUGE-1/2/L and BLEU-4 (palm-eval, the reference's way) so they show in the TUI,
//! the plain progress lines and burn's metric log files like any other metric.

use std::sync::Arc;

use burn::prelude::*;
use burn_train::metric::{
    AccuracyInput, Adaptor, LossInput, Metric, MetricAttributes, MetricMetadata, MetricName,
    Numeric, NumericAttributes, NumericEntry, PerplexityInput, SerializedEntry,
};
use burn_train::{ItemLazy, SequenceOutput};
use palm_eval::TextGenerationMetric;

/// A validation step's output.
pub struct PalmOutput<B: Backend> {
    /// Loss, log-probabilities and gold ids.
    pub seq: SequenceOutput<B>,
    /// `(prediction, reference)` texts of the rows of this batch that were decoded.
    pub generated: Arc<Vec<(String, String)>>,
}

impl<B: Backend> ItemLazy for PalmOutput<B> {
    type ItemSync = PalmOutput<Synced<B>>;

    fn sync(self) -> Self::ItemSync {
        PalmOutput {
            seq: self.seq.sync(),
            generated: self.generated,
        }
    }
}

/// The backend burn-train moves metric inputs to.
type Synced<B> = <<SequenceOutput<B> as ItemLazy>::ItemSync as SyncedBackend>::B;

/// Names the backend of a synced [`SequenceOutput`].
pub trait SyncedBackend {
    /// The backend.
    type B: Backend;
}

impl<B: Backend> SyncedBackend for SequenceOutput<B> {
    type B = B;
}

impl<B: Backend> Adaptor<LossInput<B>> for PalmOutput<B> {
    fn adapt(&self) -> LossInput<B> {
        self.seq.adapt()
    }
}

impl<B: Backend> Adaptor<AccuracyInput<B>> for PalmOutput<B> {
    fn adapt(&self) -> AccuracyInput<B> {
        self.seq.adapt()
    }
}

impl<B: Backend> Adaptor<PerplexityInput<B>> for PalmOutput<B> {
    fn adapt(&self) -> PerplexityInput<B> {
        self.seq.adapt()
    }
}

/// The decoded pairs of a batch, as a metric input.
pub struct GeneratedPairs(pub Arc<Vec<(String, String)>>);

impl<B: Backend> Adaptor<GeneratedPairs> for PalmOutput<B> {
    fn adapt(&self) -> GeneratedPairs {
        GeneratedPairs(self.generated.clone())
    }
}

/// Which score a [`GenerationMetric`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationScore {
    /// ROUGE-1 F.
    Rouge1,
    /// ROUGE-2 F.
    Rouge2,
    /// ROUGE-L F.
    RougeL,
    /// Corpus BLEU-4.
    Bleu4,
}

impl GenerationScore {
    fn name(self) -> &'static str {
        match self {
            GenerationScore::Rouge1 => "ROUGE-1",
            GenerationScore::Rouge2 => "ROUGE-2",
            GenerationScore::RougeL => "ROUGE-L",
            GenerationScore::Bleu4 => "BLEU-4",
        }
    }
}

/// ROUGE or BLEU (percent) of the validation rows decoded so far in this epoch.
#[derive(Clone)]
pub struct GenerationMetric {
    score: GenerationScore,
    name: MetricName,
    acc: TextGenerationMetric,
}

impl GenerationMetric {
    /// A metric reporting `score`.
    pub fn new(score: GenerationScore) -> Self {
        GenerationMetric {
            score,
            name: Arc::new(score.name().to_owned()),
            acc: TextGenerationMetric::default(),
        }
    }

    fn current(&self) -> f64 {
        let Ok(s) = self.acc.evaluate() else {
            return 0.0;
        };
        let s = s.percent();
        match self.score {
            GenerationScore::Rouge1 => s.rouge_1,
            GenerationScore::Rouge2 => s.rouge_2,
            GenerationScore::RougeL => s.rouge_l,
            GenerationScore::Bleu4 => s.bleu_4,
        }
    }
}

impl Metric for GenerationMetric {
    type Input = GeneratedPairs;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: Some("%".into()),
            higher_is_better: true,
        }
        .into()
    }

    fn update(&mut self, item: &GeneratedPairs, _metadata: &MetricMetadata) -> SerializedEntry {
        for (pred, reference) in item.0.iter() {
            self.acc.add(pred, reference);
        }
        let v = self.current();
        SerializedEntry::new(
            format!("{} {v:.2} % ({} rows)", self.name, self.acc.len()),
            v.to_string(),
        )
    }

    fn clear(&mut self) {
        self.acc = TextGenerationMetric::default();
    }
}

impl Numeric for GenerationMetric {
    fn value(&self) -> NumericEntry {
        NumericEntry::Value(self.current())
    }

    fn running_value(&self) -> NumericEntry {
        NumericEntry::Value(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_train::metric::MetricMetadata;

    fn metadata() -> MetricMetadata {
        let p = burn::data::dataloader::Progress::new(1, 1);
        MetricMetadata {
            progress: p.clone(),
            global_progress: p,
            iteration: Some(1),
            lr: None,
        }
    }

    #[test]
    fn accumulates_over_batches_like_the_corpus_metric() {
        let pairs = [
            ("白 色 上 衣", "白 色 的 上 衣"),
            ("休 闲 风", "休 闲 风 格"),
            ("", "裙 子"),
        ];
        let mut m = GenerationMetric::new(GenerationScore::Bleu4);
        let mut r = GenerationMetric::new(GenerationScore::RougeL);
        for chunk in pairs.chunks(2) {
            let item = GeneratedPairs(Arc::new(
                chunk
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            ));
            m.update(&item, &metadata());
            r.update(&item, &metadata());
        }
        let mut whole = TextGenerationMetric::default();
        for (p, q) in pairs {
            whole.add(p, q);
        }
        let s = whole.evaluate().unwrap().percent();
        assert_eq!(m.value().current(), s.bleu_4);
        assert_eq!(r.value().current(), s.rouge_l);
        assert!(s.rouge_l > 0.0);
        r.clear();
        assert_eq!(r.value().current(), 0.0);
    }
}
