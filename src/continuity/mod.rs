//! State continuity: the background capture of thread snapshots into the
//! store, and the restore that runs before a moved session's first request
//! reaches its new worker.
//!
//! ```text
//! response with Tether-Checkpoint ─┐
//! worker change feed (long poll) ──┴─▶ capture queue (coalesced, bounded)
//!        ──▶ GET {state.path}/threads/T?after=stored ──▶ store.append
//!
//! moved session ──▶ single-flight per session ──▶ CAS on tether_sessions.epoch
//!        won  ──▶ PUT {state.path}/threads/T for every stored thread ──▶ NOTIFY
//!        lost ──▶ follow the winner's worker, wait for its restore outcome
//! ```

pub mod capture;
pub mod contract;
pub mod feed;
pub mod overrides;
pub mod restore;
pub mod writer;

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::store::Store;

/// The store once connected; `None` while it is unreachable at start.
#[derive(Debug, Default)]
pub struct StoreSlot(ArcSwapOption<StoreBox>);

/// A sized wrapper so the trait object can live in an `ArcSwap`.
#[derive(Debug)]
pub struct StoreBox(pub Arc<dyn Store>);

impl StoreSlot {
    /// The store, if connected.
    pub fn get(&self) -> Option<Arc<dyn Store>> {
        self.0.load().as_ref().map(|b| b.0.clone())
    }

    /// Installs the connected store.
    pub fn set(&self, store: Arc<dyn Store>) {
        self.0.store(Some(Arc::new(StoreBox(store))));
    }
}
