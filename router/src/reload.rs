//! Values that a configuration reload (SIGHUP) replaces while requests keep running: each
//! reader takes a snapshot (`load`) and works with it to the end, so a request never sees
//! half of an old and half of a new configuration.

use std::sync::{Arc, RwLock};

/// A value shared by every request and swapped whole on reload.
#[derive(Debug)]
pub struct Live<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Live<T> {
    pub fn new(value: T) -> Self {
        Self {
            current: RwLock::new(Arc::new(value)),
        }
    }

    /// The current value. Cheap: a read lock held for one `Arc` clone.
    pub fn load(&self) -> Arc<T> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            // A writer panicked mid-swap; the stored `Arc` is still a whole value.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the value for every later `load`.
    pub fn store(&self, value: T) {
        let value = Arc::new(value);
        match self.current.write() {
            Ok(mut guard) => *guard = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

/// The teams, keys, prices, budgets and experiments, as reloaded on SIGHUP.
pub type SharedPolicies = Arc<Live<policies::Policies>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_outlives_the_swap_that_replaced_it() {
        let live = Live::new(1);
        let before = live.load();
        live.store(2);
        assert_eq!((*before, *live.load()), (1, 2));
    }
}
