//! DNS discovery: re-resolve `discovery.dns` every `interval`; each address
//! becomes a backend whose id is `host:port` (stable while the address
//! lives). Static `[[backends]]` stay as configured.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::backends::WorkerSet;
use crate::config::BackendConfig;
use crate::health::Health;
use crate::live::SharedLive;

/// The backends for `addrs`, sorted so an unchanged answer is unchanged.
pub(crate) fn backends_for(addrs: &BTreeSet<SocketAddr>) -> Vec<BackendConfig> {
    addrs
        .iter()
        .filter_map(|a| {
            let url = format!("http://{a}").parse().ok()?;
            Some(BackendConfig {
                id: a.to_string(),
                url,
                weight: 1,
                max_inflight: None,
            })
        })
        .collect()
}

/// Runs until `cancel`, swapping the worker set when the answer changes.
pub(crate) async fn run(
    workers: WorkerSet,
    live: SharedLive,
    health: Health,
    cancel: CancellationToken,
) {
    let mut last: Option<BTreeSet<SocketAddr>> = None;
    loop {
        let Some(d) = live.load().config.discovery.clone() else {
            return;
        };
        let name = format!("{}:{}", d.dns, d.port);
        match tokio::time::timeout(d.interval, tokio::net::lookup_host(name.as_str())).await {
            Ok(Ok(found)) => {
                let addrs: BTreeSet<SocketAddr> = found.collect();
                if last.as_ref() != Some(&addrs) {
                    tracing::info!(dns = %d.dns, workers = addrs.len(), "discovery: worker set changed");
                    workers.set_discovered(backends_for(&addrs));
                    health.sync();
                    last = Some(addrs);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(dns = %d.dns, error = %e, "discovery lookup failed: keeping the current workers")
            }
            Err(_) => {
                tracing::warn!(dns = %d.dns, "discovery lookup timed out: keeping the current workers")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(d.interval) => {}
        }
    }
}
