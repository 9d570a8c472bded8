//! `set_product_dtype`: matrix products in another float type, results and gradients in the
//! tensors' own. Its own test binary, since the setting is process-wide. The CPU backend has
//! no bf16, so f64 stands in for it: the cast path is the same.

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use burn_autodiff::Autodiff;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_model::dense::{
    Narrow, dense_narrow, narrow, product, product_dtype, set_narrow, set_product_dtype,
};
use palm_model::{ModelConfig, Palm};

type B = Autodiff<NdArray<f32>>;

fn ids(v: Vec<i64>, shape: [usize; 2]) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v, shape), &NdArrayDevice::Cpu)
}

#[test]
fn products_run_in_the_set_type_and_everything_else_stays_f32() {
    let device = NdArrayDevice::Cpu;
    // 1e8 + 1 − 1e8 is 0 in f32 arithmetic and 1 in f64.
    let a = Tensor::<B, 2>::from_floats([[1e8, 1.0, -1e8]], &device);
    let b = Tensor::<B, 2>::ones([3, 1], &device);
    assert_eq!(product_dtype(), None);
    let f32_result: f32 = product(a.clone(), b.clone()).into_scalar();
    assert_eq!(f32_result, 0.0);

    let mut config = ModelConfig::tiny(50);
    config.palm.dec_dropout = 0.0;
    config.encoder.hidden_dropout_prob = 0.0;
    config.encoder.attention_probs_dropout_prob = 0.0;
    let model = Palm::<B>::new(&config, &device);
    let src = ids(vec![2, 7, 9, 11, 3, 0], [2, 3]);
    let tgt = ids(vec![2, 5, 6, 2, 8, 0], [2, 3]);
    let plain = model.forward(src.clone(), tgt.clone());

    set_product_dtype(Some(FloatDType::F64));
    assert_eq!(product_dtype(), Some(FloatDType::F64));
    let wide = product(a, b);
    assert_eq!(wide.dtype(), DType::F32);
    assert_eq!(wide.into_scalar(), 1.0);

    // The whole model: same log-probabilities within f32 rounding, in f32, and gradients that
    // reach the f32 weights as f32.
    let mixed = model.forward(src.clone(), tgt.clone());
    assert_eq!(mixed.dtype(), DType::F32);
    mixed
        .to_data()
        .assert_approx_eq::<f32>(&plain.to_data(), Default::default());
    let grads = mixed.sum().backward();
    let w = model.decoder.embeddings.weight.val();
    let g = w.grad(&grads).expect("the tied table gets a gradient");
    assert_eq!((w.dtype(), g.dtype()), (DType::F32, DType::F32));
    assert!(g.abs().sum().into_scalar() > 0.0);

    // Narrow sites: a linear layer's result stays in the product type where its site is on and
    // gradients are tracked (training), and in the weights' type for inference.
    let layer = &model.decoder.transformer_layers[0].feed_forward.w_1;
    let x = Tensor::<B, 3>::ones([2, 3, config.palm.dec_hidden_size], &device);
    assert_eq!(
        dense_narrow(layer, x.clone(), Narrow::Inner).dtype(),
        DType::F32
    );
    set_narrow(Narrow::Inner, true);
    set_narrow(Narrow::Heads, true);
    assert!(narrow(Narrow::Inner) && narrow(Narrow::Heads));
    assert_eq!(
        dense_narrow(layer, x.clone(), Narrow::Inner).dtype(),
        DType::F64
    );
    let inner = layer.valid();
    assert_eq!(
        dense_narrow(&inner, x.inner(), Narrow::Inner).dtype(),
        DType::F32,
        "inference keeps the weights' type"
    );
    // The whole model with its feed-forward activations and attention heads in the product
    // type: the same log-probabilities, in f32, and f32 gradients.
    let narrowed = model.forward(src.clone(), tgt.clone());
    assert_eq!(narrowed.dtype(), DType::F32);
    narrowed
        .to_data()
        .assert_approx_eq::<f32>(&plain.to_data(), Default::default());
    let grads = narrowed.sum().backward();
    for w in [
        model.decoder.embeddings.weight.val(),
        model.decoder.transformer_layers[0]
            .self_attn
            .linear_query
            .weight
            .val(),
    ] {
        let g = w.grad(&grads).expect("a gradient through the narrow sites");
        assert_eq!(g.dtype(), DType::F32);
        assert!(g.abs().sum().into_scalar() > 0.0);
    }
    set_narrow(Narrow::Inner, false);
    set_narrow(Narrow::Heads, false);
    assert!(!narrow(Narrow::Inner) && !narrow(Narrow::Heads));

    set_product_dtype(None);
    assert_eq!(product_dtype(), None);
}
