//! Web sessions and the walls around the pages' forms.
//!
//! - The session is an opaque random token in the `webhoster_session`
//!   cookie (`HttpOnly; SameSite=Lax; Path=/`, `Secure` over TLS). The
//!   server keeps only its SHA-256 (store, table `sessions`), the account's
//!   token version at log-in and an expiry: a session ends when it expires,
//!   when it is logged out, or when the account's version moves on (log out
//!   everywhere, password change).
//! - Every form carries a CSRF token: the session's own, or for the forms
//!   before log-in (sign-up, log-in) a random token also set in the
//!   `webhoster_form` cookie (double submit). Every POST compares it in
//!   constant time and is refused when the browser says it came from
//!   another site (`Origin`, `Sec-Fetch-Site`).
//!
//! It never hashes passwords or decides who may log in (`account` does).

use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use warp::http::{HeaderMap, header};

use crate::store::{NewSession, Store, StoreError, User};

/// The session cookie.
pub const COOKIE: &str = "webhoster_session";
/// The cookie of the forms shown before log-in (its value is their CSRF token).
pub const FORM_COOKIE: &str = "webhoster_form";
/// How long a session lasts unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Hex SHA-256 of the cookie's token (the row's key).
    pub id: String,
    pub user: User,
    pub csrf: String,
}

/// 32 random bytes, hex: a session token or a CSRF token.
pub fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The row key of a token: its SHA-256, so the table opens nothing.
pub fn token_id(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Equal, in a time that does not depend on where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_owned())
}

/// A `Set-Cookie` value: `HttpOnly; SameSite=Lax; Path=/`, `Secure` over
/// TLS; `max_age` 0 deletes it.
pub fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

pub fn clear_cookie(name: &str, secure: bool) -> String {
    set_cookie(name, "", Duration::ZERO, secure)
}

/// Whether the visitor reached us over TLS: the nginx front says so in
/// `X-Forwarded-Proto`, believed only from a peer on loopback (the same
/// trust rule as the front's `X-Real-IP`, see `api::client_addr`).
pub fn over_tls(peer: Option<SocketAddr>, headers: &HeaderMap) -> bool {
    peer.is_some_and(|p| p.ip().is_loopback())
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// Whether the browser tells us this request came from another site (or
/// from an opaque origin, like a sandboxed tenant page): such a POST is
/// refused whatever it carries. Without `Origin` and `Sec-Fetch-Site` (old
/// clients, curl) the CSRF token alone decides.
pub fn from_another_site(headers: &HeaderMap) -> bool {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(site) = get("sec-fetch-site")
        && !site.eq_ignore_ascii_case("same-origin")
        && !site.eq_ignore_ascii_case("none")
    {
        return true;
    }
    if let Some(origin) = get("origin") {
        let host = get("host").unwrap_or("");
        let ours = !host.is_empty()
            && (origin.eq_ignore_ascii_case(&format!("http://{host}"))
                || origin.eq_ignore_ascii_case(&format!("https://{host}")));
        return !ours;
    }
    false
}

/// Opens a session for `user` (who just proved a password); returns the
/// cookie's token, never stored.
pub async fn open(store: &Store, user: &User, ttl: Duration) -> Result<(String, Session), StoreError> {
    let token = random_token();
    let id = token_id(&token);
    let csrf = random_token();
    let now = unix_now();
    // Expired and revoked rows go when someone logs in: no timer needed.
    store.prune_sessions(now).await?;
    store
        .create_session(&NewSession {
            id: &id,
            user_id: user.id,
            csrf: &csrf,
            token_version: user.token_version,
            expires_at: now + ttl.as_secs() as i64,
        })
        .await?;
    Ok((
        token,
        Session {
            id,
            user: user.clone(),
            csrf,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warp::http::HeaderValue;

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let a = random_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_token());
        assert_eq!(token_id(&a).len(), 64);
        assert_ne!(token_id(&a), a);
        assert!(constant_time_eq(&a, &a.clone()));
        assert!(!constant_time_eq(&a, &random_token()));
        assert!(!constant_time_eq("abc", "abcd"));
        assert!(!constant_time_eq("", "x"));
    }

    #[test]
    fn cookies_have_the_flags() {
        let c = set_cookie(COOKIE, "t", DEFAULT_TTL, false);
        assert_eq!(
            c,
            "webhoster_session=t; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax"
        );
        assert!(set_cookie(COOKIE, "t", DEFAULT_TTL, true).ends_with("; Secure"));
        assert!(clear_cookie(COOKIE, false).contains("Max-Age=0"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; webhoster_session=abc ; lang=ko"),
        );
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "lang").as_deref(), Some("ko"));
        assert_eq!(cookie(&h, "b"), None);
    }

    #[test]
    fn tls_is_believed_only_from_the_front() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(over_tls(Some("127.0.0.1:1".parse().unwrap()), &h));
        assert!(!over_tls(Some("192.0.2.1:1".parse().unwrap()), &h));
        assert!(!over_tls(None, &h));
        assert!(!over_tls(Some("127.0.0.1:1".parse().unwrap()), &HeaderMap::new()));
    }

    #[test]
    fn posts_from_other_sites_are_recognized() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("example.test:8080"));
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(!from_another_site(&h(&[])));
        assert!(!from_another_site(&h(&[("origin", "http://example.test:8080")])));
        assert!(!from_another_site(&h(&[("origin", "https://example.test:8080")])));
        assert!(!from_another_site(&h(&[("sec-fetch-site", "same-origin")])));
        assert!(!from_another_site(&h(&[("sec-fetch-site", "none")])));
        assert!(from_another_site(&h(&[("origin", "null")])));
        assert!(from_another_site(&h(&[("origin", "http://evil.test")])));
        assert!(from_another_site(&h(&[("origin", "http://example.test")])));
        assert!(from_another_site(&h(&[("sec-fetch-site", "cross-site")])));
        assert!(from_another_site(&h(&[("sec-fetch-site", "same-site")])));
    }
}
