//! Secrets: newtypes whose `Debug` never prints them, so a `{:?}` of the
//! whole `Config` (in a log line, a panic, a test failure) cannot leak them,
//! and the `${VAR}` interpolation that keeps them out of the file itself.

use std::env::VarError;
use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;

use super::ConfigError;

/// A text secret: a bearer token, or a store URL that may hold a password.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Decoded cookie key bytes (`affinity.keys`), at least 32 once validated.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial(Vec<u8>);

impl KeyMaterial {
    /// Wraps key bytes.
    pub fn new(bytes: Vec<u8>) -> KeyMaterial {
        KeyMaterial(bytes)
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Decodes base64 (standard or URL-safe, padded or not) of at least 32
    /// bytes. The error message never repeats the text: it is a secret.
    pub(super) fn from_base64(text: &str) -> Result<KeyMaterial, String> {
        let engines = [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD];
        let Some(bytes) = engines.iter().find_map(|e| e.decode(text.trim()).ok()) else {
            return Err("not valid base64".to_owned());
        };
        if bytes.len() < 32 {
            return Err(format!(
                "decodes to {} bytes; at least 32 are needed \
                 (e.g. `head -c 32 /dev/urandom | base64`)",
                bytes.len()
            ));
        }
        Ok(KeyMaterial(bytes))
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial({} bytes)", self.0.len())
    }
}

/// Replaces every `${VAR}` in `value` with the environment variable's value;
/// `key` (the dotted path) names the value in errors. There is no escape:
/// a literal `${` cannot be written.
pub(super) fn interpolate(key: &str, value: &str) -> Result<String, ConfigError> {
    let mut parts = value.split("${");
    let mut out = parts.next().unwrap_or_default().to_owned();
    for part in parts {
        let Some((var, rest)) = part.split_once('}').filter(|(v, _)| !v.is_empty()) else {
            return Err(ConfigError::invalid(
                key,
                "unterminated or empty ${…} in value",
            ));
        };
        let value = std::env::var(var).map_err(|e| match e {
            VarError::NotPresent => ConfigError::MissingEnv {
                key: key.to_owned(),
                var: var.to_owned(),
            },
            VarError::NotUnicode(_) => {
                ConfigError::invalid(key, format!("${{{var}}} is not UTF-8"))
            }
        })?;
        out.push_str(&value);
        out.push_str(rest);
    }
    Ok(out)
}
