//! `set_step_kernels`: a backend's own cached decoder step. With the reference kernels (burn's
//! operations over the fast cache's flat layout) set, every step's log-probabilities equal
//! burn's own cached step bit for bit, through the cache's growth, row reorderings, a padding
//! input and a source dropped. Its own test binary, since the setting is process-wide.

use burn::prelude::*;
use burn_ndarray::{NdArray, NdArrayDevice};
use palm_model::decoder::{FAST_CACHE_CAPACITY, reference_step_kernels, set_step_kernels};
use palm_model::{ModelConfig, Palm};

type B = NdArray<f32>;

fn ids<const D: usize>(v: Vec<i64>, shape: [usize; D]) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(v, shape), &NdArrayDevice::Cpu)
}

#[test]
fn fast_cache_steps_equal_burns_cached_steps() {
    let device = NdArrayDevice::Cpu;
    B::seed(&device, 4);
    let model = Palm::<B>::new(&ModelConfig::tiny(50), &device);
    let memory = model.encode(ids(vec![2, 7, 9, 3, 0, 0, 2, 5, 11, 4, 8, 3], [2, 6]));
    let beams = 3;
    let mut burns = model.init_cache(&memory, beams);
    assert!(burns.fast.is_none(), "no kernels set");

    set_step_kernels::<B>(Some(reference_step_kernels()));
    let mut ours = model.init_cache(&memory, beams);
    let fast = ours.fast.as_ref().expect("a fast cache with kernels set");
    assert_eq!(
        (fast.layers, fast.rows, fast.heads, fast.dh, fast.capacity),
        (2, 2 * beams, 2, 32, FAST_CACHE_CAPACITY)
    );
    assert_eq!(fast.src_pad.dims(), [2, 6]);
    assert!(ours.layers.iter().all(|l| l.self_keys.is_none()));

    let mut rows = 2 * beams;
    for step in 0..FAST_CACHE_CAPACITY + 4 {
        let tokens: Vec<i64> = (0..rows)
            .map(|r| match (step, r) {
                (5, 1) => 0, // PAD: every cached key is masked
                _ => ((r * 31 + step * 17) % 49 + 1) as i64,
            })
            .collect();
        let tokens = ids(tokens, [rows]);
        let a = model.step(tokens.clone(), &mut ours);
        let b = model.step(tokens, &mut burns);
        assert_eq!(a.into_data(), b.into_data(), "step {step}");
        if step == 20 {
            // The first source finishes; the second's beams are reordered.
            let origins: Vec<usize> = (0..beams).map(|b| beams + (b + 1) % beams).collect();
            ours.select(&[1], &origins);
            burns.select(&[1], &origins);
            rows = beams;
            let fast = ours.fast.as_ref().expect("still fast");
            assert_eq!((fast.rows, fast.src_pad.dims()), (beams, [1, 6]));
        } else if step % 3 == 0 {
            let origins: Vec<i64> = (0..rows)
                .map(|r| (r / beams * beams + (r + step) % beams) as i64)
                .collect();
            ours.select_rows(ids(origins.clone(), [rows]));
            burns.select_rows(ids(origins, [rows]));
        }
    }
    let fast = ours.fast.as_ref().expect("still fast");
    assert_eq!(fast.capacity, 2 * FAST_CACHE_CAPACITY, "grown once");
    set_step_kernels::<B>(None);
}
