//! Beam search over a backend's own step kernels (`set_step_kernels`; here the reference ones,
//! burn's operations over the fast cache's layout) finds the same hypotheses with the same
//! scores as over burn's cached step, with either way of reading the choices, past the fast
//! cache's first capacity and with sources finishing at different steps. Its own test binary,
//! since the setting is process-wide.

use burn::prelude::*;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_decode::{BeamConfig, Reads, beam_search_with};
use palm_model::decoder::{FAST_CACHE_CAPACITY, reference_step_kernels, set_step_kernels};
use palm_model::{ModelConfig, Palm};

type B = NdArray<f32>;

#[test]
fn beam_search_over_step_kernels_finds_the_same_hypotheses() {
    let device = NdArrayDevice::Cpu;
    B::seed(&device, 9);
    let model = Palm::<B>::new(&ModelConfig::tiny(50), &device);
    let src = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![2i64, 7, 9, 3, 2, 11, 5, 0, 2, 4, 4, 4], [3, 4]),
        &device,
    );
    let configs = [
        // Short, EOS allowed from the first step: sources may end at different steps.
        BeamConfig {
            beam_size: 3,
            alpha: 0.6,
            min_length: 1,
            max_length: 12,
            bos: 2,
            eos: 3,
        },
        // Past the first capacity of the fast cache.
        BeamConfig {
            beam_size: 2,
            alpha: 0.95,
            min_length: FAST_CACHE_CAPACITY + 2,
            max_length: FAST_CACHE_CAPACITY + 6,
            bos: 2,
            eos: 3,
        },
    ];
    let decode = || {
        configs
            .iter()
            .flat_map(|c| {
                [Reads::EveryStep, Reads::Deferred]
                    .map(|reads| beam_search_with(&model, src.clone(), c, reads))
            })
            .collect::<Vec<_>>()
    };
    let burns = decode();
    set_step_kernels::<B>(Some(reference_step_kernels()));
    let ours = decode();
    set_step_kernels::<B>(None);
    assert_eq!(ours, burns);
    let long = &burns[2];
    assert!(long.iter().all(|h| h.tokens.len() > FAST_CACHE_CAPACITY));
}
