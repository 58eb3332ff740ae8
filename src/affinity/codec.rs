//! The sealed affinity cookie: AES-256-GCM over a small binary pin record,
//! with the cookie name as associated data (a value cannot be replayed under
//! another cookie name). The first key seals, every key opens (rotation).

use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;

use super::{Lifetimes, Pin, SessionId};
use crate::config::KeyMaterial;
use crate::last::Last;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Fixed part of the plaintext: version, session id, epoch, issued, refreshed.
const FIXED_LEN: usize = 1 + 16 + 8 + 8 + 8;
/// Longest cookie value we try to open; anything longer is garbage.
const MAX_VALUE_LEN: usize = 1024;
/// What the longest value decodes to: a request's cookie is opened on the
/// stack, in buffers of this size.
const MAX_SEALED_LEN: usize = MAX_VALUE_LEN / 4 * 3;
const HKDF_INFO: &[u8] = b"tether affinity cookie v1";

/// Why a cookie value did not open. Each reason is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Not base64, too short or too long.
    #[error("malformed")]
    Malformed,
    /// No key authenticates it (tampered, truncated or foreign key).
    #[error("undecryptable")]
    Undecryptable,
    /// Authenticated but the record inside is not understood.
    #[error("bad record")]
    BadRecord,
    /// Past `affinity.ttl` or `affinity.idle_timeout`.
    #[error("expired")]
    Expired,
}

impl RejectReason {
    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::Undecryptable => "undecryptable",
            RejectReason::BadRecord => "bad_record",
            RejectReason::Expired => "expired",
        }
    }
}

/// Seals and opens pins for one cookie name with a list of keys.
pub struct Codec {
    ciphers: Vec<Aes256Gcm>,
    name: String,
    /// Unique per codec made (a reload makes a new one): what an
    /// [`OpenCache`] entry was opened with.
    id: u64,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("keys", &self.ciphers.len())
            .field("name", &self.name)
            .finish()
    }
}

impl Codec {
    /// Derives one AES-256 key per configured key (HKDF-SHA256), so key
    /// material of any length ≥ 32 bytes gives a uniform key.
    pub fn new(keys: &[KeyMaterial], cookie_name: &str) -> Codec {
        let ciphers = keys
            .iter()
            .map(|k| {
                let hk = Hkdf::<Sha256>::new(None, k.bytes());
                let mut okm = [0u8; 32];
                // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
                if hk.expand(HKDF_INFO, &mut okm).is_err() {
                    unreachable!("HKDF output length is fixed and valid");
                }
                Aes256Gcm::new(&okm.into())
            })
            .collect();
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Codec {
            ciphers,
            name: cookie_name.to_owned(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The cookie name this codec is bound to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Seals `pin` with the first key into a cookie-safe value.
    pub fn seal(&self, pin: &Pin) -> String {
        let mut plain = Vec::with_capacity(FIXED_LEN + 4 + pin.backend.len() + pin.instance.len());
        plain.push(VERSION);
        plain.extend_from_slice(&pin.session.0);
        plain.extend_from_slice(&pin.epoch.to_le_bytes());
        plain.extend_from_slice(&pin.issued_at.to_le_bytes());
        plain.extend_from_slice(&pin.refreshed_at.to_le_bytes());
        push_str(&mut plain, &pin.backend);
        push_str(&mut plain, &pin.instance);

        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let Some(cipher) = self.ciphers.first() else {
            unreachable!("config validation requires at least one key");
        };
        let sealed = match cipher.encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: self.name.as_bytes(),
            },
        ) {
            Ok(c) => c,
            // AES-GCM encryption only fails for plaintexts over 64 GiB.
            Err(_) => unreachable!("pin records are a few hundred bytes"),
        };
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Opens a cookie value and checks its pin's life at `now` (Unix
    /// seconds, from the injected clock): what a request's cookie is worth.
    pub fn open_alive(
        &self,
        value: &str,
        lifetimes: &Lifetimes,
        now: u64,
    ) -> Result<Pin, RejectReason> {
        let pin = self.open(value)?;
        if lifetimes.is_alive(&pin, now) {
            Ok(pin)
        } else {
            Err(RejectReason::Expired)
        }
    }

    /// [`Codec::open_alive`] through a connection's [`OpenCache`]: a value
    /// equal to the one this codec last opened for the connection is not
    /// decoded and decrypted again (a kept-alive client sends the same
    /// cookie with every request). Its life is checked every time.
    pub fn open_alive_cached(
        &self,
        value: &str,
        lifetimes: &Lifetimes,
        now: u64,
        cache: &OpenCache,
    ) -> Result<Pin, RejectReason> {
        let pin = match cache.get(self.id, value) {
            Some(pin) => pin,
            None => {
                let pin = self.open(value)?;
                cache.put(self.id, value, &pin);
                pin
            }
        };
        if lifetimes.is_alive(&pin, now) {
            Ok(pin)
        } else {
            Err(RejectReason::Expired)
        }
    }

    /// Opens a cookie value without looking at its expiry (see
    /// [`Codec::open_alive`]).
    pub fn open(&self, value: &str) -> Result<Pin, RejectReason> {
        if value.len() > MAX_VALUE_LEN {
            return Err(RejectReason::Malformed);
        }
        let mut raw = [0; MAX_SEALED_LEN];
        let len = URL_SAFE_NO_PAD
            .decode_slice(value.as_bytes(), &mut raw)
            .map_err(|_| RejectReason::Malformed)?;
        let raw = &raw[..len];
        if raw.len() < NONCE_LEN + TAG_LEN + FIXED_LEN {
            return Err(RejectReason::Malformed);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let (sealed, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut plain = [0; MAX_SEALED_LEN];
        let plain = &mut plain[..sealed.len()];
        // Each key decrypts a fresh copy: a failed try leaves nothing behind.
        let opened = self.ciphers.iter().any(|c| {
            plain.copy_from_slice(sealed);
            c.decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                self.name.as_bytes(),
                plain,
                Tag::from_slice(tag),
            )
            .is_ok()
        });
        if !opened {
            return Err(RejectReason::Undecryptable);
        }
        decode_record(plain).ok_or(RejectReason::BadRecord)
    }
}

/// The last cookie value a connection presented that opened, with its pin
/// and the codec that opened it. Only a byte-identical value under the
/// same codec is answered from here: the same ciphertext under the same
/// keys opens to the same pin.
#[derive(Debug, Default)]
pub struct OpenCache(Last<(u64, Box<str>), Pin>);

impl OpenCache {
    fn get(&self, codec: u64, value: &str) -> Option<Pin> {
        self.0.get(|(c, v)| *c == codec && **v == *value)
    }

    fn put(&self, codec: u64, value: &str, pin: &Pin) {
        self.0.put((codec, value.into()), pin.clone());
    }
}

fn push_str(buf: &mut Vec<u8>, s: &str) {
    // Backend ids and instance tags are short; longer ones are cut at a
    // char boundary so the record stays decodable.
    let mut end = s.len().min(u8::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    buf.push(end as u8);
    buf.extend_from_slice(&s.as_bytes()[..end]);
}

/// Parses an opened record (also driven directly by the fuzz target, which
/// cannot forge AES-GCM tags to reach it through [`Codec::open`]).
pub(crate) fn decode_record(p: &[u8]) -> Option<Pin> {
    let mut r = Reader(p);
    if r.take(1)?[0] != VERSION {
        return None;
    }
    let session = SessionId(r.take(16)?.try_into().ok()?);
    let epoch = r.u64()?;
    let issued_at = r.u64()?;
    let refreshed_at = r.u64()?;
    let backend = r.string()?;
    let instance = r.string()?;
    if !r.0.is_empty() {
        return None;
    }
    Some(Pin {
        session,
        backend,
        instance,
        epoch,
        issued_at,
        refreshed_at,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = self.take(1)?[0] as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}
