//! The optimizer of a run: AdamW with PyTorch's defaults ([`PalmAdamW`]: burn's arithmetic and
//! state, each parameter's update as one operation where the backend has one, [`AdamWStep`]),
//! handing every parameter it writes to the backend's [`shadow`](palm_model::dense::shadow)
//! hook, where one is set: on CUDA under `bf16-mixed`, opt-in (`PALM_SHADOW=on`), the
//! parameter's bf16 copy, made in the same fused kernel as the update (measured slower than
//! casting at each use: `docs/benchmarks.md`, item 35).

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer,
};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{TensorMetadata, TensorPrimitive};
use palm_model::registry::PerBackend;

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

/// One AdamW update's constants: the learning rate, burn's hyperparameters and the step count
/// `time` (1 on a parameter's first update, whose moments start at zero).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWUpdate {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// Added to the second moment's root.
    pub epsilon: f32,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f32,
    /// This update's step count, from 1.
    pub time: usize,
}

/// The operands of an [`AdamWStep`]: the parameter, its gradient, the moments (`None` before the
/// first update) and the constants.
pub type AdamWOperands<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    Option<(FloatTensor<B>, FloatTensor<B>)>,
    AdamWUpdate,
);

/// A backend's AdamW update of one parameter as one operation (where burn's is about a dozen,
/// each an operation the host issues): the new parameter and moments, computed as burn's
/// `AdamW` computes them ([`reference_adamw_step`]); it hands the operands back (`Err`) for
/// those it does not take.
pub type AdamWStep<B> = fn(AdamWOperands<B>) -> Result<[FloatTensor<B>; 3], Box<AdamWOperands<B>>>;

static ADAMW_STEPS: PerBackend = PerBackend::new();

/// Updates parameters on backend `B` through `step` (`None`: burn's operations again).
pub fn set_adamw_step<B: Backend>(step: Option<AdamWStep<B>>) {
    ADAMW_STEPS.set::<B, _>(step);
}

/// burn's AdamW update in burn's operations, in the order burn computes it: what an
/// [`AdamWStep`] computes.
pub fn reference_adamw_step<B: Backend>(
    (param, grad, moments, u): AdamWOperands<B>,
) -> [FloatTensor<B>; 3] {
    let shape = param.shape();
    // Flat: the update is element-wise, whatever the parameter's rank.
    let flat = |t: FloatTensor<B>| {
        let t = B::float_reshape(t, Shape::new([shape.num_elements()]));
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t))
    };
    let (param, grad) = (flat(param), flat(grad));
    let (factor_1, factor_2) = (1.0 - u.beta_1, 1.0 - u.beta_2);
    let (m1, m2) = match moments {
        Some((m1, m2)) => (
            flat(m1)
                .mul_scalar(u.beta_1)
                .add(grad.clone().mul_scalar(factor_1)),
            flat(m2)
                .mul_scalar(u.beta_2)
                .add(grad.square().mul_scalar(factor_2)),
        ),
        None => (
            grad.clone().mul_scalar(factor_1),
            grad.square().mul_scalar(factor_2),
        ),
    };
    let time = u.time as i32;
    let delta = m1.clone().div_scalar(1f32 - u.beta_1.powi(time)).div(
        m2.clone()
            .div_scalar(1f32 - u.beta_2.powi(time))
            .sqrt()
            .add_scalar(u.epsilon),
    );
    let decay = u.lr * u.weight_decay as f64;
    let decayed = if decay == 0.0 {
        param
    } else {
        param.mul_scalar(1.0 - decay)
    };
    let param = decayed - delta.mul_scalar(u.lr);
    [param, m1, m2].map(|t| B::float_reshape(t.into_primitive().tensor(), shape.clone()))
}

/// AdamW as burn computes it, with burn's state (so checkpoints are `AdamW`'s), each
/// parameter's update through the backend's [`AdamWStep`] where one is set and takes it, else
/// through burn's `AdamW`.
#[derive(Clone)]
pub struct PalmAdamW {
    burn: AdamW,
    update: AdamWUpdate,
}

impl PalmAdamW {
    /// PyTorch's AdamW defaults (burn's epsilon default is 1e-5; PyTorch's 1e-8) with the given
    /// decoupled weight decay.
    pub fn new(weight_decay: f32) -> Self {
        let update = AdamWUpdate {
            lr: 0.0,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay,
            time: 0,
        };
        let burn = AdamWConfig::new()
            .with_beta_1(update.beta_1)
            .with_beta_2(update.beta_2)
            .with_epsilon(update.epsilon)
            .with_weight_decay(weight_decay)
            .build();
        Self { burn, update }
    }
}

impl<B: Backend> SimpleOptimizer<B> for PalmAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let Some(step) = ADAMW_STEPS.get::<B, AdamWStep<B>>() else {
            return self.burn.step(lr, tensor, grad, state);
        };
        // AMSGrad's extra moment is not among the operands.
        if state
            .as_ref()
            .is_some_and(|s| s.momentum.max_moment_2.is_some())
        {
            return self.burn.step(lr, tensor, grad, state);
        }
        let previous = state.as_ref().map_or(0, |s| s.momentum.time);
        let update = AdamWUpdate {
            lr,
            time: previous + 1,
            ..self.update
        };
        let moments = state.map(|s| {
            let m = s.momentum;
            (
                m.moment_1.into_primitive().tensor(),
                m.moment_2.into_primitive().tensor(),
            )
        });
        let operands = (
            tensor.into_primitive().tensor(),
            grad.into_primitive().tensor(),
            moments,
            update,
        );
        let wrap = |t: FloatTensor<B>| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(t));
        match step(operands) {
            Ok([param, m1, m2]) => {
                let momentum = AdaptiveMomentumState::new(update.time, wrap(m1), wrap(m2));
                (wrap(param), Some(AdamWState::new(momentum)))
            }
            Err(operands) => {
                let (param, grad, moments, _) = *operands;
                let state = moments.map(|(m1, m2)| {
                    AdamWState::new(AdaptiveMomentumState::new(previous, wrap(m1), wrap(m2)))
                });
                self.burn.step(lr, wrap(param), wrap(grad), state)
            }
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

/// The optimizer type of a run on backend `B` training module `M`.
pub type Optim<M, B> = OptimizerAdaptor<Shadowing<PalmAdamW>, M, B>;

/// AdamW with PyTorch's defaults and the given decoupled weight decay ([`PalmAdamW`]).
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(weight_decay: f32) -> Optim<M, B> {
    OptimizerAdaptor::from(Shadowing(PalmAdamW::new(weight_decay)))
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

    /// A linear layer of random parameters, made now (a lazily initialised one would differ
    /// between clones), and burn's AdamW with the settings of [`adamw`].
    fn layer_and_burns_adamw<A: AutodiffBackend>(
        device: &A::Device,
    ) -> (Linear<A>, OptimizerAdaptor<AdamW, Linear<A>, A>) {
        let normal = Distribution::Normal(0.0, 1.0);
        let layer = Linear {
            weight: Param::from_tensor(Tensor::random([3, 4], normal, device)),
            bias: Some(Param::from_tensor(Tensor::random([4], normal, device))),
        };
        let burns = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.01)
            .init::<A, Linear<A>>();
        (layer, burns)
    }

    fn step<O: Optimizer<Linear<B>, B>>(optim: &mut O, layer: Linear<B>) -> Linear<B> {
        let device = NdArrayDevice::Cpu;
        let x = Tensor::<B, 2>::from_data([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], &device);
        let loss = layer.forward(x).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        optim.step(1e-2, layer, grads)
    }

    #[test]
    fn a_backends_adamw_step_updates_as_burns_adamw_and_hands_back_what_it_does_not_take() {
        // Its own backend type: no other test sets an AdamW step for it.
        type H = NdArray<f64, i32>;
        type A = Autodiff<H>;
        static TIMES: Mutex<Vec<usize>> = Mutex::new(Vec::new());
        // Takes matrices (the weight), hands back vectors (the bias).
        fn matrices(
            operands: AdamWOperands<H>,
        ) -> Result<[FloatTensor<H>; 3], Box<AdamWOperands<H>>> {
            if operands.0.shape().num_dims() != 2 {
                return Err(Box::new(operands));
            }
            TIMES.lock().unwrap().push(operands.3.time);
            Ok(reference_adamw_step::<H>(operands))
        }
        let device = NdArrayDevice::Cpu;
        let (layer, mut burns) = layer_and_burns_adamw::<A>(&device);
        let mut ours = adamw::<A, Linear<A>>(0.01);
        set_adamw_step::<H>(Some(matrices));
        let forward = |layer: &Linear<A>| {
            let x = Tensor::<A, 2>::from_data([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], &device);
            let loss = layer.forward(x).powi_scalar(2).sum();
            GradientsParams::from_grads(loss.backward(), layer)
        };
        let (mut a, mut b) = (layer.clone(), layer);
        for _ in 0..3 {
            let (ga, gb) = (forward(&a), forward(&b));
            a = burns.step(1e-2, a, ga);
            b = ours.step(1e-2, b, gb);
            a.weight
                .val()
                .into_data()
                .assert_eq(&b.weight.val().into_data(), true);
            let bias = |l: &Linear<A>| l.bias.as_ref().expect("a bias").val().into_data();
            bias(&a).assert_eq(&bias(&b), true);
        }
        set_adamw_step::<H>(None);
        assert_eq!(
            *TIMES.lock().unwrap(),
            [1, 2, 3],
            "the weight's three updates"
        );
    }

    #[test]
    fn shadowing_adamw_steps_as_adamw_and_hands_over_each_parameter_it_writes() {
        let device = NdArrayDevice::Cpu;
        let (layer, mut plain) = layer_and_burns_adamw::<B>(&device);
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
