//! The worker contract's names, defined once: the `Tether-*` headers that
//! tether sends to workers and reads from them. The proxy, the contract
//! client, health probes and the reference worker all use these.

use http::HeaderName;

/// `Tether-Session`: the session id (32 hex digits), on every forwarded
/// request and contract call.
pub(crate) const TETHER_SESSION: HeaderName = HeaderName::from_static("tether-session");
/// `Tether-Epoch`: the pin epoch, a fencing token that grows on every move.
pub(crate) const TETHER_EPOCH: HeaderName = HeaderName::from_static("tether-epoch");
/// `Tether-Instance`: a worker process's identity; a new value means the
/// process restarted with empty memory.
pub(crate) const TETHER_INSTANCE: HeaderName = HeaderName::from_static("tether-instance");
/// `Tether-Checkpoint`: a worker's hint that threads changed
/// (`thread;seq=N, …`).
pub(crate) const TETHER_CHECKPOINT: HeaderName = HeaderName::from_static("tether-checkpoint");
/// `Tether-Restore`: on a response whose history is known to be
/// incomplete (`partial`) or absent (`failed`).
pub(crate) const TETHER_RESTORE: HeaderName = HeaderName::from_static("tether-restore");

/// Whether a header is one of tether's own (`Tether-*`): a client's copy is
/// dropped, a worker's copy never reaches the client.
pub(crate) fn is_tether_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("tether-")
}
