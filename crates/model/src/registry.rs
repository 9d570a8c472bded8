//! A value per backend type: what a binary installs for the backends it runs on (a vendor
//! GEMM, hand-written backward passes) and the model looks up by its generic backend `B`.

use std::any::{Any, TypeId};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Values of type `T<B>` keyed by the backend type `B` (a handful at most).
pub struct PerBackend {
    entries: RwLock<Vec<(TypeId, Box<dyn Any + Send + Sync>)>>,
    /// Whether any entry is set: the common case (none) costs one atomic load.
    any: AtomicBool,
}

impl Default for PerBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl PerBackend {
    /// No value for any backend.
    pub const fn new() -> Self {
        Self {
            entries: RwLock::new(Vec::new()),
            any: AtomicBool::new(false),
        }
    }

    /// Sets (`Some`) or removes (`None`) the value of backend `B`.
    pub fn set<B: 'static, T: Any + Send + Sync>(&self, value: Option<T>) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(id, _)| *id != TypeId::of::<B>());
        if let Some(value) = value {
            entries.push((TypeId::of::<B>(), Box::new(value)));
        }
        self.any.store(!entries.is_empty(), Ordering::Relaxed);
    }

    /// The value of backend `B`, if one of type `T` is set.
    pub fn get<B: 'static, T: Any + Copy>(&self) -> Option<T> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .find(|(id, _)| *id == TypeId::of::<B>())
            .and_then(|(_, value)| value.downcast_ref::<T>().copied())
    }
}
