//! The optimizer of a run: AdamW with PyTorch's defaults, handing every parameter it writes
//! to the backend's [`shadow`](palm_model::dense::shadow) hook, where one is set: on CUDA under
//! `bf16-mixed`, opt-in (`PALM_SHADOW=on`), the parameter's bf16 copy, made in the same fused
//! kernel as the update (measured slower than casting at each use: `docs/benchmarks.md`, item
//! 35).

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, LearningRate, SimpleOptimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// A [`SimpleOptimizer`] that steps as `O` and then hands the written parameter to
/// [`palm_model::dense::shadow`]. Its state is `O`'s, so checkpoints are `O`'s too.
#[derive(Clone)]
pub struct Shadowing<O>(pub O);

impl<B: Backend, O: SimpleOptimizer<B>> SimpleOptimizer<B> for Shadowing<O> {
    type State<const D: usize> = O::State<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let (tensor, state) = self.0.step(lr, tensor, grad, state);
        palm_model::dense::shadow(&tensor);
        (tensor, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        O::to_device(state, device)
    }
}

/// The optimizer type of a run on backend `B` training module `M`.
pub type Optim<M, B> = OptimizerAdaptor<Shadowing<AdamW>, M, B>;

/// AdamW with PyTorch's defaults (burn's epsilon default is 1e-5; PyTorch's 1e-8) and the
/// given decoupled weight decay.
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(weight_decay: f32) -> Optim<M, B> {
    let adamw = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(weight_decay)
        .build();
    OptimizerAdaptor::from(Shadowing(adamw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::Linear;
    use burn::optim::{GradientsParams, Optimizer};
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{Distribution, TensorMetadata, TensorPrimitive};
    use burn_autodiff::Autodiff;
    use burn_ndarray::{NdArray, NdArrayDevice};
    use std::sync::Mutex;

    // Its own backend type (i16 indices): no other test of this crate sets a shadow for it.
    type Inner = NdArray<f32, i16>;
    type B = Autodiff<Inner>;

    static SEEN: Mutex<Vec<FloatTensor<Inner>>> = Mutex::new(Vec::new());

    fn record(t: FloatTensor<Inner>) {
        SEEN.lock().unwrap().push(t);
    }

    fn step<O: Optimizer<Linear<B>, B>>(optim: &mut O, layer: Linear<B>) -> Linear<B> {
        let device = NdArrayDevice::Cpu;
        let x = Tensor::<B, 2>::from_data([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], &device);
        let loss = layer.forward(x).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        optim.step(1e-2, layer, grads)
    }

    #[test]
    fn shadowing_adamw_steps_as_adamw_and_hands_over_each_parameter_it_writes() {
        let device = NdArrayDevice::Cpu;
        // Parameters made now (a lazily initialised one would differ between the clones).
        let normal = Distribution::Normal(0.0, 1.0);
        let layer = Linear {
            weight: Param::from_tensor(Tensor::random([3, 4], normal, &device)),
            bias: Some(Param::from_tensor(Tensor::random([4], normal, &device))),
        };
        let mut plain = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.01)
            .init::<B, Linear<B>>();
        let mut shadowing = adamw::<B, Linear<B>>(0.01);

        palm_model::dense::set_shadow::<Inner>(Some(record));
        let (mut a, mut b) = (layer.clone(), layer);
        for round in 1..=2 {
            a = step(&mut plain, a);
            b = step(&mut shadowing, b);
            let close = |x: TensorData, y: TensorData| x.assert_eq(&y, true);
            close(a.weight.val().into_data(), b.weight.val().into_data());
            let bias = |l: &Linear<B>| l.bias.as_ref().expect("a bias").val().into_data();
            close(bias(&a), bias(&b));

            // Both parameters of every step, as written; plain AdamW hands over nothing.
            let seen = std::mem::take(&mut *SEEN.lock().unwrap());
            assert_eq!(seen.len(), 2, "round {round}");
            for t in seen {
                let written = match t.shape().num_dims() {
                    2 => Tensor::<Inner, 2>::from_primitive(TensorPrimitive::Float(t)).into_data(),
                    _ => Tensor::<Inner, 1>::from_primitive(TensorPrimitive::Float(t)).into_data(),
                };
                let param = if written.shape.len() == 2 {
                    b.weight.val().inner().into_data()
                } else {
                    b.bias.as_ref().unwrap().val().inner().into_data()
                };
                written.assert_eq(&param, true);
            }
        }
        palm_model::dense::set_shadow::<Inner>(None);
        step(&mut shadowing, b);
        assert!(
            SEEN.lock().unwrap().is_empty(),
            "unset: nothing handed over"
        );
    }
}
