//! The reloadable part of tether's state: the validated config with what
//! is derived from it per request (the cookie codec, pin lifetimes),
//! swapped whole on SIGHUP. Workers live apart, in
//! [`crate::backends::WorkerSet`], because discovery changes them too.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::affinity::{Codec, Lifetimes};
use crate::config::Config;

/// One config generation.
#[derive(Debug)]
pub(crate) struct Live {
    /// The validated config.
    pub config: Arc<Config>,
    /// Cookie codec over the configured keys.
    pub codec: Codec,
    /// Pin lifetimes.
    pub lifetimes: Lifetimes,
}

/// The shared, swappable config generation.
pub(crate) type SharedLive = Arc<ArcSwap<Live>>;

impl Live {
    /// The generation for `config`.
    pub(crate) fn new(config: Arc<Config>) -> Live {
        let a = &config.affinity;
        Live {
            codec: Codec::new(&a.keys, &a.cookie),
            lifetimes: Lifetimes {
                ttl: a.ttl,
                idle_timeout: a.idle_timeout,
                refresh: a.refresh,
            },
            config,
        }
    }

    /// A shared handle on the generation for `config`.
    pub(crate) fn shared(config: Arc<Config>) -> SharedLive {
        Arc::new(ArcSwap::from_pointee(Live::new(config)))
    }
}
