//! An immutable snapshot of the workers, indexed by id.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Backend;
use crate::config::BackendConfig;

/// An immutable set of backends, indexed by id.
#[derive(Debug, Default)]
pub struct BackendSet {
    list: Vec<Arc<Backend>>,
    by_id: HashMap<String, usize>,
}

impl BackendSet {
    /// Builds a set from config, reusing backends of `previous` whose id and
    /// url are unchanged (their health and counters carry over).
    pub fn build(configs: &[BackendConfig], previous: Option<&BackendSet>) -> BackendSet {
        let mut list = Vec::with_capacity(configs.len());
        let mut by_id = HashMap::with_capacity(configs.len());
        for cfg in configs {
            let reused = previous
                .and_then(|p| p.get(&cfg.id))
                .filter(|b| b.url == cfg.url)
                .cloned();
            if let Some(b) = &reused {
                b.weight.store(cfg.weight.max(1), Ordering::Relaxed);
                b.set_max_inflight(cfg.max_inflight);
            }
            let backend = reused.unwrap_or_else(|| Arc::new(Backend::new(cfg)));
            by_id.insert(cfg.id.clone(), list.len());
            list.push(backend);
        }
        BackendSet { list, by_id }
    }

    /// The backend with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<Backend>> {
        self.by_id.get(id).map(|&i| &self.list[i])
    }

    /// All backends in config order.
    pub fn all(&self) -> &[Arc<Backend>] {
        &self.list
    }

    /// Number of backends that are usable.
    pub fn usable_count(&self) -> usize {
        self.list.iter().filter(|b| b.is_usable()).count()
    }
}
