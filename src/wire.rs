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

/// The longest `Tether-Instance` kept as sent; a longer one is replaced by
/// a digest (the cookie holds at most 255 bytes of it, and a cut value
/// would look like a new process on every request).
const MAX_INSTANCE: usize = 128;

/// A worker's `Tether-Instance` as tether keeps it: `None` when absent,
/// empty or not text; a digest when longer than 128 bytes.
pub(crate) fn instance_of(headers: &http::HeaderMap) -> Option<String> {
    let v = headers
        .get(TETHER_INSTANCE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())?;
    if v.len() <= MAX_INSTANCE {
        return Some(v.to_owned());
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(v.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("sha256:{hex}"))
}
