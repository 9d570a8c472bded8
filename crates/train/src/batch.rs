//! Examples as token ids, and the batcher that pads them and shifts targets.

use burn::data::dataloader::batcher::Batcher;
use burn::prelude::*;

/// One training pair: `[CLS] … [SEP]` source and target ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Source ids.
    pub src: Vec<u32>,
    /// Target ids.
    pub tgt: Vec<u32>,
}

/// A padded batch: decoder input is the target without its last token, gold is the target
/// without its first (the reference's `labels[:, :-1]` / `labels[:, 1:]`).
#[derive(Debug, Clone)]
pub struct PalmBatch<B: Backend> {
    /// `[b, s]`.
    pub src: Tensor<B, 2, Int>,
    /// `[b, t - 1]`.
    pub tgt_in: Tensor<B, 2, Int>,
    /// `[b, t - 1]`.
    pub gold: Tensor<B, 2, Int>,
    /// Pre-training: `[b, s]` original ids at masked source positions, PAD elsewhere.
    pub mlm_labels: Option<Tensor<B, 2, Int>>,
}

/// Pads with the PAD id to the longest row of the batch, rounded up to a multiple of
/// `multiple`: batches then come in a few shapes, which backends that compile kernels per shape
/// (CUDA) need; PAD positions change no loss or logit of the real ones.
#[derive(Debug, Clone, Copy)]
pub struct PalmBatcher {
    /// The PAD id.
    pub pad: u32,
    /// Source and decoder lengths are multiples of this.
    pub multiple: usize,
}

impl PalmBatcher {
    /// Pads to multiples of 8.
    pub fn new(pad: u32) -> Self {
        PalmBatcher { pad, multiple: 8 }
    }
}

impl PalmBatcher {
    /// A batch whose sources were masked for pre-training: `items` carry the masked sources and
    /// `labels` the masked-LM labels (same lengths).
    pub fn batch_masked<B: Backend>(
        &self,
        items: Vec<Pair>,
        labels: &[Vec<u32>],
        device: &B::Device,
    ) -> PalmBatch<B> {
        let rows: Vec<&[u32]> = labels.iter().map(Vec::as_slice).collect();
        let width = items.iter().map(|p| p.src.len()).max().unwrap_or(0);
        let mlm = pad_ids_to::<B>(
            &rows,
            self.pad,
            width.next_multiple_of(self.multiple.max(1)),
            device,
        );
        PalmBatch {
            mlm_labels: Some(mlm),
            ..self.batch(items, device)
        }
    }
}

/// A `[rows, longest]` id tensor, padded with `pad`.
pub fn pad_ids<B: Backend>(rows: &[&[u32]], pad: u32, device: &B::Device) -> Tensor<B, 2, Int> {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    pad_ids_to(rows, pad, width, device)
}

/// A `[rows, max(width, longest)]` id tensor, padded with `pad`.
pub fn pad_ids_to<B: Backend>(
    rows: &[&[u32]],
    pad: u32,
    width: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let width = rows
        .iter()
        .map(|r| r.len())
        .max()
        .unwrap_or(0)
        .max(width)
        .max(1);
    let mut flat = Vec::with_capacity(rows.len() * width);
    for r in rows {
        flat.extend(r.iter().map(|&x| x as i64));
        flat.extend(std::iter::repeat_n(pad as i64, width - r.len()));
    }
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

impl<B: Backend> Batcher<B, Pair, PalmBatch<B>> for PalmBatcher {
    fn batch(&self, items: Vec<Pair>, device: &B::Device) -> PalmBatch<B> {
        let src_rows: Vec<&[u32]> = items.iter().map(|p| p.src.as_slice()).collect();
        let tgt_rows: Vec<&[u32]> = items.iter().map(|p| p.tgt.as_slice()).collect();
        let m = self.multiple.max(1);
        let longest = |rows: &[&[u32]]| rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let src = pad_ids_to::<B>(
            &src_rows,
            self.pad,
            longest(&src_rows).next_multiple_of(m),
            device,
        );
        // The decoder sees the target minus one token: make that length the multiple.
        let tgt_width = longest(&tgt_rows)
            .saturating_sub(1)
            .max(1)
            .next_multiple_of(m)
            + 1;
        let tgt = pad_ids_to::<B>(&tgt_rows, self.pad, tgt_width, device);
        let [b, t] = tgt.dims();
        let t = t.max(2);
        PalmBatch {
            src,
            tgt_in: tgt.clone().slice([0..b, 0..t - 1]),
            gold: tgt.slice([0..b, 1..t]),
            mlm_labels: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_ndarray::{NdArray, NdArrayDevice};

    #[test]
    fn pads_and_shifts() {
        let items = vec![
            Pair {
                src: vec![2, 5, 3],
                tgt: vec![2, 7, 8, 3],
            },
            Pair {
                src: vec![2, 3],
                tgt: vec![2, 9, 3],
            },
        ];
        let b: PalmBatch<NdArray<f32>> = PalmBatcher {
            pad: 0,
            multiple: 1,
        }
        .batch(items.clone(), &NdArrayDevice::Cpu);
        let v = |t: Tensor<NdArray<f32>, 2, Int>| t.into_data().iter::<i64>().collect::<Vec<_>>();
        assert_eq!(v(b.src), vec![2, 5, 3, 2, 3, 0]);
        assert_eq!(v(b.tgt_in), vec![2, 7, 8, 2, 9, 3]);
        assert_eq!(v(b.gold), vec![7, 8, 3, 9, 3, 0]);
        // Padded to multiples of 4: sources of 4, decoder input and gold of 4.
        let b: PalmBatch<NdArray<f32>> = PalmBatcher {
            pad: 0,
            multiple: 4,
        }
        .batch(items, &NdArrayDevice::Cpu);
        assert_eq!(b.src.dims(), [2, 4]);
        assert_eq!(v(b.tgt_in), vec![2, 7, 8, 3, 2, 9, 3, 0]);
        assert_eq!(v(b.gold), vec![7, 8, 3, 0, 9, 3, 0, 0]);
    }
}
