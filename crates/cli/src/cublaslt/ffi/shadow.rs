//! Parameters' copies in the product type, made where the optimizer writes them.
//!
//! Under `bf16-mixed` every linear layer casts its f32 weight to bf16 at each forward pass, and
//! the layers whose results stay in bf16 their bias too: about 300 launches a training step, on
//! a step the host's cost per launch bounds. The optimizer's [`Shadowing`] step hands each
//! parameter it writes to [`store`], which queues its cast right behind the update, where
//! fusion writes both from one kernel; the training forward pass takes the copy
//! ([`take_or_cast`]) instead of casting (once: a copy serves one use, and a second use casts as before).
//!
//! Opt-in (`PALM_SHADOW=on`): on the H200 it removed 304 of 3,099 launches a step at batch
//! 256 and the casts' device time, but the host took longer to issue the step (207 → 250 ms),
//! so the step was slower (docs/benchmarks.md, item 35).
//!
//! [`Shadowing`]: palm_train::optim::Shadowing

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::DType;
use burn::tensor::ops::FloatTensorOps;
use burn_fusion::FusionTensor;
use burn_ir::TensorId;
use palm_model::dense::product_dtype;

use super::{FusionR, Gpu};

#[derive(Default)]
struct Shadows {
    copies: HashMap<TensorId, FusionTensor<FusionR>>,
    /// Whether a copy was taken since the last [`store`]: the next one starts a new round and
    /// drops the copies the previous forward pass did not use (norms, embeddings).
    taken: bool,
}

static SHADOWS: Mutex<Option<Shadows>> = Mutex::new(None);
/// Whether [`store`] has kept a copy: until then (always, with the switch off) a use casts
/// without taking the lock.
static STORED: AtomicBool = AtomicBool::new(false);

fn with<T>(f: impl FnOnce(&mut Shadows) -> T) -> T {
    let mut guard = SHADOWS.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Default::default))
}

/// Keeps `param`'s copy in the product type when one is set and differs from its own.
pub(super) fn store(param: FusionTensor<FusionR>) {
    let Some(dtype) = product_dtype().map(DType::from) else {
        return;
    };
    if param.dtype != DType::F32 || dtype == DType::F32 {
        return;
    }
    let id = param.id;
    let copy = Gpu::float_cast(param, dtype.into());
    STORED.store(true, Ordering::Relaxed);
    with(|s| {
        if std::mem::take(&mut s.taken) {
            s.copies.clear();
        }
        s.copies.insert(id, copy);
    });
}

/// `t` in `dtype`: its stored copy when there is one of that type (taken: a copy serves one
/// use), else a cast.
pub(super) fn take_or_cast(t: FusionTensor<FusionR>, dtype: DType) -> FusionTensor<FusionR> {
    if t.dtype == dtype {
        return t;
    }
    if !STORED.load(Ordering::Relaxed) {
        return Gpu::float_cast(t, dtype.into());
    }
    let copy = with(|s| {
        s.taken = true;
        s.copies.remove(&t.id)
    });
    match copy {
        Some(copy) if copy.dtype == dtype && copy.shape == t.shape => copy,
        _ => Gpu::float_cast(t, dtype.into()),
    }
}

/// How many copies are kept (tests).
#[cfg(test)]
pub(super) fn kept() -> usize {
    with(|s| s.copies.len())
}
