//! Reading the affinity cookie out of a request and writing `Set-Cookie`.

use cookie::{Cookie, SameSite as CookieSameSite};
use http::header::{HeaderMap, HeaderValue, COOKIE};

use crate::config::{Affinity, SameSite, SecureMode};

/// The values of every cookie named `name` in the request's `Cookie`
/// headers (HTTP/2 may split cookies over several headers), in order.
pub fn find<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|text| text.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
}

/// Removes every cookie named `name` from the `Cookie` headers, keeping the
/// others as they were; drops a `Cookie` header left empty. Headers that are
/// not valid text are dropped too: a worker must never see an affinity
/// cookie, and we cannot tell whether such a header holds one.
pub fn strip(headers: &mut HeaderMap, name: &str) {
    // The common request: one `Cookie` header holding one pair.
    let mut values = headers.get_all(COOKIE).iter();
    let Some(first) = values.next() else {
        return;
    };
    let single = match (values.next(), first.to_str()) {
        (None, Ok(text)) if !text.contains(';') => Some(
            text.trim()
                .split_once('=')
                .is_some_and(|(k, _)| k.trim() == name),
        ),
        _ => None,
    };
    match single {
        Some(true) => {
            headers.remove(COOKIE);
            return;
        }
        Some(false) => return,
        None => {}
    }
    let mut kept: Vec<String> = Vec::new();
    let mut changed = false;
    for value in headers.get_all(COOKIE) {
        let Ok(text) = value.to_str() else {
            changed = true;
            continue;
        };
        let mut rest: Vec<&str> = Vec::new();
        for pair in text.split(';') {
            let pair = pair.trim();
            let is_ours = pair
                .split_once('=')
                .map(|(k, _)| k.trim() == name)
                .unwrap_or(false);
            if is_ours {
                changed = true;
            } else if !pair.is_empty() {
                rest.push(pair);
            }
        }
        if !rest.is_empty() {
            kept.push(rest.join("; "));
        }
    }
    if !changed {
        return;
    }
    headers.remove(COOKIE);
    if !kept.is_empty() {
        // Cookies are sent to workers as one header, like HTTP/1.1 requires.
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(COOKIE, v);
        }
    }
}

/// The `Set-Cookie` value for a sealed pin.
pub fn set_cookie(
    cfg: &Affinity,
    value: String,
    max_age: u64,
    over_tls: bool,
) -> Option<HeaderValue> {
    let secure = match cfg.secure {
        SecureMode::Auto => over_tls,
        SecureMode::Always => true,
        SecureMode::Never => false,
    };
    let mut c = Cookie::build((cfg.cookie.clone(), value))
        .path(cfg.path.clone())
        .http_only(cfg.http_only)
        .secure(secure)
        .same_site(match cfg.same_site {
            SameSite::Strict => CookieSameSite::Strict,
            SameSite::Lax => CookieSameSite::Lax,
            SameSite::None => CookieSameSite::None,
        })
        .max_age(cookie::time::Duration::seconds(
            i64::try_from(max_age).unwrap_or(i64::MAX),
        ));
    if let Some(d) = &cfg.domain {
        c = c.domain(d.clone());
    }
    HeaderValue::from_str(&c.build().to_string()).ok()
}

/// Whether a worker's `Set-Cookie` value sets the affinity cookie (it is
/// dropped: only tether writes that cookie).
pub fn sets_cookie_named(value: &HeaderValue, name: &str) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .and_then(|first| first.split_once('='))
        .map(|(k, _)| k.trim() == name)
        .unwrap_or(false)
}
