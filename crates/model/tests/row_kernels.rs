//! `set_row_kernels`: an inference backend's layer norm, softmax and tanh-GELU go through the
//! functions a binary sets, with the rows, γ, β and ε burn's would get. Its own test binary,
//! since the setting is process-wide.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::prelude::*;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_model::grad::{RowOps, set_row_kernels};
use palm_model::{ModelConfig, Palm};

type B = NdArray<f32>;

static CALLS: [AtomicUsize; 3] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];

/// The three operations by other formulas than burn's, counting their calls.
fn layer_norm(x: Tensor<B, 2>, gamma: Tensor<B, 1>, beta: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    CALLS[0].fetch_add(1, Ordering::Relaxed);
    let centred = x.clone() - x.mean_dim(1);
    let var = centred.clone().powi_scalar(2).mean_dim(1);
    centred * (var + eps).sqrt().recip() * gamma.unsqueeze() + beta.unsqueeze()
}

fn softmax(x: Tensor<B, 2>) -> Tensor<B, 2> {
    CALLS[1].fetch_add(1, Ordering::Relaxed);
    let e = (x.clone() - x.max_dim(1)).exp();
    e.clone() / e.sum_dim(1)
}

fn gelu_tanh(x: Tensor<B, 2>) -> Tensor<B, 2> {
    CALLS[2].fetch_add(1, Ordering::Relaxed);
    let inner =
        (x.clone() + x.clone().powi_scalar(3) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
    x * 0.5 * (inner.tanh() + 1.0)
}

fn ids(v: Vec<i64>, shape: [usize; 2]) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v, shape), &NdArrayDevice::Cpu)
}

#[test]
fn row_kernels_replace_burns_operations_with_the_same_arguments() {
    let model = Palm::<B>::new(&ModelConfig::tiny(50), &NdArrayDevice::Cpu);
    let src = ids(vec![2, 7, 9, 11, 3, 2, 13, 3, 0, 0], [2, 5]);
    let tgt = ids(vec![2, 5, 6, 8, 2, 8, 0, 0], [2, 4]);
    let burns = model.forward(src.clone(), tgt.clone());
    assert!(CALLS.iter().all(|c| c.load(Ordering::Relaxed) == 0));

    set_row_kernels::<B>(Some(RowOps {
        layer_norm,
        softmax,
        gelu_tanh,
    }));
    let kernels = model.forward(src, tgt);
    set_row_kernels::<B>(None);

    let config = ModelConfig::tiny(50);
    let layers = config.encoder.num_hidden_layers + config.palm.dec_layers;
    // Every norm and attention softmax of both stacks, and the decoder's tanh-GELUs (BERT's
    // encoder uses the erf GELU, one operation of burn's), went through them.
    assert!(CALLS[0].load(Ordering::Relaxed) > 2 * layers, "layer norms");
    assert!(CALLS[1].load(Ordering::Relaxed) >= layers, "softmaxes");
    assert_eq!(
        CALLS[2].load(Ordering::Relaxed),
        config.palm.dec_layers,
        "GELUs"
    );
    let diff: f32 = (burns.clone() - kernels).abs().max().into_scalar();
    let scale: f32 = burns.abs().max().into_scalar();
    assert!(diff <= 1e-5 * scale.max(1.0), "{diff} (scale {scale})");
}
