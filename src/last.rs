//! [`Last`]: the last value a connection made, by what it was made from. A
//! kept-alive client's requests carry the same cookie, session, epoch and
//! host, and making their values anew costs a decryption or an allocation.

use std::sync::{Mutex, MutexGuard};

/// One key and the value made from it, behind a lock held only for a
/// compare and a clone (never across an `.await`).
#[derive(Debug)]
pub(crate) struct Last<K, V>(Mutex<Option<(K, V)>>);

impl<K, V> Default for Last<K, V> {
    fn default() -> Self {
        Last(Mutex::new(None))
    }
}

impl<K, V: Clone> Last<K, V> {
    fn lock(&self) -> MutexGuard<'_, Option<(K, V)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last value, if its key is the `same`.
    pub(crate) fn get(&self, same: impl FnOnce(&K) -> bool) -> Option<V> {
        match &*self.lock() {
            Some((seen, value)) if same(seen) => Some(value.clone()),
            _ => None,
        }
    }

    /// Keeps `value`, made from `key`, in place of the last one.
    pub(crate) fn put(&self, key: K, value: V) {
        *self.lock() = Some((key, value));
    }

    /// The last value if its key is the `same`, else the key and value
    /// `make()` gives, kept for next time.
    pub(crate) fn get_or(&self, same: impl FnOnce(&K) -> bool, make: impl FnOnce() -> (K, V)) -> V {
        let mut last = self.lock();
        match &*last {
            Some((seen, value)) if same(seen) => value.clone(),
            _ => {
                let (key, value) = make();
                *last = Some((key, value.clone()));
                value
            }
        }
    }
}
