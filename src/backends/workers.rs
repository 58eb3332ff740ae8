//! The handle on the current workers. Two sources feed it: the declared
//! `[[backends]]` (replaced on reload) and the workers DNS discovery found
//! (replaced on every changed answer). Each change rebuilds one snapshot
//! from both, under one lock, so a reload and a discovery change never
//! overwrite each other's part.

use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};

use super::BackendSet;
use crate::config::BackendConfig;

/// The current worker set; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct WorkerSet(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    current: ArcSwap<BackendSet>,
    /// Both sources, behind the lock that serialises rebuilds.
    sources: Mutex<Sources>,
}

#[derive(Debug, Default)]
struct Sources {
    declared: Vec<BackendConfig>,
    discovered: Vec<BackendConfig>,
}

impl WorkerSet {
    /// A set of the declared workers.
    pub fn new(declared: &[BackendConfig]) -> WorkerSet {
        WorkerSet(Arc::new(Inner {
            current: ArcSwap::from_pointee(BackendSet::build(declared, None)),
            sources: Mutex::new(Sources {
                declared: declared.to_vec(),
                discovered: Vec::new(),
            }),
        }))
    }

    /// The current snapshot (cheap; hold it for one request).
    pub fn load(&self) -> Guard<Arc<BackendSet>> {
        self.0.current.load()
    }

    /// The current snapshot, owned.
    pub fn snapshot(&self) -> Arc<BackendSet> {
        self.0.current.load_full()
    }

    /// Replaces the declared workers (a reload); discovered ones stay.
    pub fn set_declared(&self, declared: &[BackendConfig]) {
        self.rebuild(|s| s.declared = declared.to_vec());
    }

    /// Replaces the discovered workers; declared ones stay.
    pub fn set_discovered(&self, found: Vec<BackendConfig>) {
        self.rebuild(|s| s.discovered = found);
    }

    fn rebuild(&self, change: impl FnOnce(&mut Sources)) {
        let mut sources = self.0.sources.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut sources);
        let mut all = sources.declared.clone();
        for b in &sources.discovered {
            // A declared worker wins over a discovered one with its id.
            if !all.iter().any(|d| d.id == b.id) {
                all.push(b.clone());
            }
        }
        let old = self.0.current.load_full();
        self.0
            .current
            .store(Arc::new(BackendSet::build(&all, Some(&old))));
    }
}
