//! One published site and the checks every value passes before it is
//! rendered into an nginx config, however it got here (API, disk, caller).

use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use super::ProxyError;

/// A site: `/<user_id>/` (and optionally `<username>.<domain>`) proxied to
/// `upstream`, the guest's port 80.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub user_id: i64,
    pub username: String,
    pub upstream: SocketAddrV4,
}

impl Site {
    /// Only values webhoster itself allocates pass: a positive id, a
    /// `[a-z0-9_-]{3,32}` username and a unicast IPv4 address with a port.
    pub fn validate(&self) -> Result<(), ProxyError> {
        if self.user_id <= 0 {
            return Err(invalid("user_id", format!("{} is not > 0", self.user_id)));
        }
        validate_username(&self.username)?;
        let ip = self.upstream.ip();
        if self.upstream.port() == 0 {
            return Err(invalid("upstream", format!("{} has port 0", self.upstream)));
        }
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Err(invalid("upstream", format!("{ip} is not a unicast address")));
        }
        Ok(())
    }
}

pub(crate) fn validate_username(name: &str) -> Result<(), ProxyError> {
    let ok_len = (3..=32).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(invalid(
            "username",
            format!("{name:?} does not match [a-z0-9_-]{{3,32}}"),
        ))
    }
}

/// A DNS name of lowercase labels, used as `<username>.<domain>`.
pub(crate) fn validate_domain(domain: &str) -> Result<(), ProxyError> {
    let labels_ok = domain.split('.').all(|label| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    // 253 minus the longest username and its dot.
    if labels_ok && domain.len() <= 220 {
        Ok(())
    } else {
        Err(invalid(
            "site_domain",
            format!("{domain:?} is not a lowercase DNS name"),
        ))
    }
}

/// A path written into an nginx config unquoted: absolute and made only of
/// characters that cannot end a directive or start a variable.
pub(crate) fn validate_config_path(field: &'static str, path: &std::path::Path) -> Result<(), ProxyError> {
    let text = path.to_str().unwrap_or_default();
    let ok = path.is_absolute()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{} must be an absolute path of [A-Za-z0-9/._+@-] (it is written into nginx configs)",
                path.display()
            ),
        ))
    }
}

/// The landing page's link: absolute http(s) URL or absolute path, and none
/// of the characters that could leave an nginx string or an HTML attribute.
pub(crate) fn validate_docs_url(url: &str) -> Result<(), ProxyError> {
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://") || url.starts_with('/');
    let chars_ok = !url.is_empty()
        && url.len() <= 2048
        && url
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:/?#[]@!&()*+,;=%".contains(&b));
    if scheme_ok && chars_ok {
        Ok(())
    } else {
        Err(invalid(
            "docs_url",
            format!("{url:?} is not an http(s) URL or absolute path of URL-safe characters"),
        ))
    }
}

fn invalid(field: &'static str, reason: String) -> ProxyError {
    ProxyError::Invalid { field, reason }
}

/// The first line of a site file: `# webhoster-site {json}`.
pub(crate) const META_PREFIX: &str = "# webhoster-site ";

pub(crate) fn encode_meta(site: &Site) -> String {
    // Serializing a struct of an i64, a validated string and an address
    // cannot fail.
    serde_json::to_string(site).expect("a Site serializes")
}

/// Read a site back from its file's first line and validate it again.
pub(crate) fn decode_meta(text: &str) -> Result<Site, String> {
    let first = text.lines().next().unwrap_or_default();
    let json = first
        .strip_prefix(META_PREFIX)
        .ok_or_else(|| format!("the first line does not start with {META_PREFIX:?}"))?;
    let site: Site = serde_json::from_str(json).map_err(|e| e.to_string())?;
    site.validate().map_err(|e| e.to_string())?;
    Ok(site)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(user_id: i64, username: &str, upstream: &str) -> Site {
        Site {
            user_id,
            username: username.into(),
            upstream: upstream.parse().unwrap(),
        }
    }

    #[test]
    fn accepts_allocated_values() {
        site(1, "alice", "10.83.0.2:80").validate().unwrap();
        site(i64::MAX, "a_b-9", "127.0.0.1:8080").validate().unwrap();
    }

    #[test]
    fn rejects_what_webhoster_never_allocates() {
        assert!(site(0, "alice", "10.83.0.2:80").validate().is_err());
        assert!(site(-5, "alice", "10.83.0.2:80").validate().is_err());
        for bad in ["al", "Alice", "a lice", "al;ce", "ab}", &"a".repeat(33), "al\nce"] {
            assert!(site(1, bad, "10.83.0.2:80").validate().is_err(), "{bad:?}");
        }
        assert!(site(1, "alice", "10.83.0.2:0").validate().is_err());
        assert!(site(1, "alice", "0.0.0.0:80").validate().is_err());
        assert!(site(1, "alice", "255.255.255.255:80").validate().is_err());
        assert!(site(1, "alice", "224.0.0.1:80").validate().is_err());
    }

    #[test]
    fn domains() {
        validate_domain("example.test").unwrap();
        validate_domain("sites.example-1.org").unwrap();
        for bad in [
            "",
            "Example.test",
            "a..b",
            "-a.b",
            "a b.c",
            "a;b",
            "a.b.",
            "x.$host",
        ] {
            assert!(validate_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn docs_urls() {
        validate_docs_url("http://127.0.0.1:8000/docs").unwrap();
        validate_docs_url("/docs").unwrap();
        validate_docs_url("https://api.example.test/docs?x=1&y=2#top").unwrap();
        for bad in [
            "",
            "docs",
            "javascript:alert(1)",
            "http://a/'",
            "http://a/\"",
            "http://a/$host",
            "http://a/\\",
            "http://a/ b",
            "http://a/<",
            "http://a/{",
            "http://a/\n",
        ] {
            assert!(validate_docs_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn meta_round_trips_and_is_checked_again() {
        let s = site(10, "bob", "10.83.0.3:80");
        let text = format!("{META_PREFIX}{}\nupstream x {{}}\n", encode_meta(&s));
        assert_eq!(decode_meta(&text).unwrap(), s);
        assert!(decode_meta("upstream x {}").is_err());
        let forged =
            format!("{META_PREFIX}{{\"user_id\":1,\"username\":\"x;y\",\"upstream\":\"1.2.3.4:80\"}}");
        assert!(decode_meta(&forged).is_err());
        let extra = format!(
            "{META_PREFIX}{{\"user_id\":1,\"username\":\"abc\",\"upstream\":\"1.2.3.4:80\",\"x\":1}}"
        );
        assert!(decode_meta(&extra).is_err());
    }
}
