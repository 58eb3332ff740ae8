//! The link to the store: the connected store (none while it has been
//! unreachable since start), every call under a deadline, and the store's
//! health as the last calls saw it. `/readyz` and `tether_store_up` report
//! that health; a degraded store never makes tether unready (pinned users
//! on healthy workers are still served).

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use crate::store::{Store, StoreError};

/// The store's state as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreState {
    /// The last call worked.
    Connected,
    /// Connected once, but the last call failed or timed out.
    Degraded,
    /// Never reached since tether started.
    Unavailable,
}

impl StoreState {
    /// Stable label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StoreState::Connected => "connected",
            StoreState::Degraded => "degraded",
            StoreState::Unavailable => "unavailable",
        }
    }
}

/// A sized wrapper so the trait object can live in an `ArcSwap`.
#[derive(Debug)]
struct StoreBox(Arc<dyn Store>);

/// The store link.
#[derive(Debug)]
pub(crate) struct StoreLink {
    store: ArcSwapOption<StoreBox>,
    healthy: AtomicU8,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl Default for StoreLink {
    fn default() -> Self {
        StoreLink {
            store: ArcSwapOption::empty(),
            healthy: AtomicU8::new(UNKNOWN),
        }
    }
}

impl StoreLink {
    /// Installs the connected store.
    pub(crate) fn set(&self, store: Arc<dyn Store>) {
        self.store.store(Some(Arc::new(StoreBox(store))));
        self.healthy.store(UP, Ordering::Relaxed);
    }

    /// The store, or `Unavailable` when none is connected.
    pub(crate) fn get(&self) -> Result<Arc<dyn Store>, StoreError> {
        self.store
            .load()
            .as_ref()
            .map(|b| b.0.clone())
            .ok_or(StoreError::Unavailable)
    }

    /// The store's state now.
    pub(crate) fn state(&self) -> StoreState {
        if self.store.load().is_none() {
            return StoreState::Unavailable;
        }
        match self.healthy.load(Ordering::Relaxed) {
            DOWN => StoreState::Degraded,
            _ => StoreState::Connected,
        }
    }

    /// Runs one store call until `deadline`, recording whether the store
    /// answered.
    pub(crate) async fn call<T>(
        &self,
        deadline: Instant,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout_at(deadline, call).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout),
        };
        let seen = match &result {
            Ok(_) => UP,
            // The database refused or could not be reached; a row that does
            // not decode is not an outage.
            Err(StoreError::Db(e)) if !is_outage(e) => UP,
            Err(_) => DOWN,
        };
        self.healthy.store(seen, Ordering::Relaxed);
        result
    }
}

/// Whether a database error means the store is unreachable or failing
/// (as opposed to a bad row or a constraint).
fn is_outage(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Database(_)
    )
}
