//! The hand-off between a signal's collection and its readers (metric
//! callbacks, HTTP handlers, health rules): the collector publishes a whole
//! snapshot per interval, readers take the latest one. Readers never touch
//! kernel maps or procfs, so a scrape costs no syscalls and every reader of
//! one interval sees the same figures.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

pub struct Shared<T>(Arc<RwLock<Arc<T>>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<T: Default> Default for Shared<T> {
    fn default() -> Self {
        Shared(Arc::new(RwLock::new(Arc::new(T::default()))))
    }
}

impl<T> Shared<T> {
    pub fn publish(&self, value: T) {
        // a poisoned lock only means a reader panicked; the data is whole
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
    }

    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the collection loop itself did: the loop publishes it after each
/// collection, /health/live reads it. It lives here, beside the hand-off,
/// so the loop and the HTTP side share it without importing each other.
#[derive(Debug, Clone, Default)]
pub struct LoopStatus {
    pub last_run: Option<Instant>,
    pub runs: u64,
    pub interval: Duration,
}
