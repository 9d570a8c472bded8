//! `set_embedding_grad`: a training backend's embedding tables get their gradients from the
//! function a binary sets (the CUDA build's atomic-add kernel), with the same forward values
//! and the gradients burn's scatter-add gives. Its own test binary, since the setting is
//! process-wide.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::prelude::*;
use burn::tensor::{Distribution, Tolerance};
use burn_autodiff::Autodiff;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_model::grad::{has_embedding_grad, set_embedding_grad};
use palm_model::{ModelConfig, Palm};

type I = NdArray<f32>;
type B = Autodiff<I>;

static CALLS: AtomicUsize = AtomicUsize::new(0);

/// The table's gradient by another formula than burn's: the one-hot matrix's transpose times
/// the output gradient.
fn one_hot_grad(grad: Tensor<I, 2>, ids: Tensor<I, 1, Int>, vocab: usize) -> Tensor<I, 2> {
    CALLS.fetch_add(1, Ordering::Relaxed);
    ids.one_hot(vocab).float().transpose().matmul(grad)
}

/// Logits of the tiny model and the gradients of both word tables for one loss.
fn run(model: &Palm<B>, src: &Tensor<B, 2, Int>, tgt: &Tensor<B, 2, Int>) -> [TensorData; 3] {
    let logits = model.forward(src.clone(), tgt.clone());
    let [b, t, v] = logits.dims();
    let weights = Tensor::<B, 1, Int>::arange(0..(b * t * v) as i64, &logits.device())
        .float()
        .reshape([b, t, v])
        .cos();
    let grads = (logits.clone() * weights).sum().backward();
    let table = |t: Tensor<B, 2>| t.grad(&grads).expect("a gradient").into_data();
    [
        logits.into_data(),
        table(model.bert.embeddings.word_embeddings.weight.val()),
        table(model.decoder.embeddings.weight.val()),
    ]
}

#[test]
fn a_backends_embedding_gradient_replaces_burns_scatter() {
    let device = NdArrayDevice::Cpu;
    B::seed(&device, 7);
    // Without dropout, so that the two runs compute the same function.
    let mut config = ModelConfig::tiny(40);
    config.palm.dec_dropout = 0.0;
    config.encoder.hidden_dropout_prob = 0.0;
    config.encoder.attention_probs_dropout_prob = 0.0;
    let model = Palm::<B>::new(&config, &device);
    let ids = |shape: [usize; 2]| {
        Tensor::<B, 2, Int>::random(shape, Distribution::Uniform(1.0, 40.0), &device)
    };
    // Repeated ids within and across rows: their rows' gradients add up.
    let (src, tgt) = (ids([3, 9]), ids([3, 6]));

    assert!(!has_embedding_grad::<B>());
    let burn = run(&model, &src, &tgt);
    assert_eq!(CALLS.load(Ordering::Relaxed), 0);

    set_embedding_grad::<I>(Some(one_hot_grad));
    assert!(has_embedding_grad::<B>());
    let own = run(&model, &src, &tgt);
    assert_eq!(
        CALLS.load(Ordering::Relaxed),
        2,
        "the encoder's and the decoder's table"
    );
    assert_eq!(own[0], burn[0], "the same lookups forward, bit for bit");
    for (what, (a, b)) in ["encoder", "decoder"]
        .iter()
        .zip(own[1..].iter().zip(&burn[1..]))
    {
        eprintln!("{what} word table");
        a.assert_approx_eq::<f32>(b, Tolerance::rel_abs(1e-5, 1e-6));
    }

    set_embedding_grad::<I>(None);
    assert!(!has_embedding_grad::<B>());
}
