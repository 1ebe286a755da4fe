//! The front's HTTPS: where it listens, the certificate and key it serves,
//! and a self-signed pair made on request.
//!
//! The self-signed pair is made with the `openssl` command, not a Rust
//! crate: nginx loads it with the same OpenSSL, the command is one Debian
//! package, and it runs once per install, so no crypto crate is compiled
//! into the service for it. Whether a pair belongs together is left to
//! `nginx -t`, which runs before any config is loaded (at start too) and
//! names the file it refuses.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::ProxyError;
use super::site::{validate_config_path, validate_domain};

/// HTTPS on the front: the front server and every host-name site listen
/// on `listen` too, with this certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Https {
    pub listen: SocketAddr,
    /// PEM, the leaf first, then its chain.
    pub cert: PathBuf,
    /// PEM, unencrypted (nginx reads it at every start and reload).
    pub key: PathBuf,
}

impl Https {
    /// Both files are absolute paths that can be written into a config and
    /// that this process can read (nginx's master reads them as root too).
    pub fn validate(&self) -> Result<(), ProxyError> {
        for (field, path) in [("tls_cert", &self.cert), ("tls_key", &self.key)] {
            validate_config_path(field, path)?;
        }
        Ok(())
    }

    /// [`Https::validate`], then both files must be readable now: a clear
    /// error at start instead of nginx's.
    pub fn check_files(&self) -> Result<(), ProxyError> {
        self.validate()?;
        for path in [&self.cert, &self.key] {
            std::fs::File::open(path).map_err(ProxyError::io("opening the TLS file", path))?;
        }
        Ok(())
    }
}

/// Lifetime of a self-signed certificate. It is made again when fewer than
/// [`RENEW_BEFORE_SECS`] are left, at a start.
const DAYS: u32 = 825;
const RENEW_BEFORE_SECS: u32 = 30 * 24 * 3600;

const CERT: &str = "self-signed.crt";
const KEY: &str = "self-signed.key";
/// The names the pair was made for: another set (a new `--public-host` or
/// `--site-domain`) makes a new pair. Written last, so a pair whose writing
/// was cut short is never taken for a whole one.
const NAMES: &str = "self-signed.names";

/// The self-signed certificate and key in `dir` (made 0700), made for
/// `names` (host names, IP addresses, `*.<domain>`) on first use and kept
/// for later starts; made again when the names change or it nears its end.
/// The key is 0600.
pub fn self_signed(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), ProxyError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let san = subject_alt_names(names)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(ProxyError::io("creating", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(ProxyError::io("setting the mode of", dir))?;
    let (cert, key, record) = (dir.join(CERT), dir.join(KEY), dir.join(NAMES));
    let recorded = std::fs::read_to_string(&record).ok();
    if recorded.as_deref() == Some(san.as_str()) && key.is_file() && lasts(&cert) {
        return Ok((cert, key));
    }

    let _ = std::fs::remove_file(&record);
    let work = tempfile::Builder::new()
        .prefix(".self-signed-")
        .tempdir_in(dir)
        .map_err(ProxyError::io("creating a temp dir in", dir))?;
    let (new_cert, new_key) = (work.path().join(CERT), work.path().join(KEY));
    let common_name = names[0].trim_start_matches("*.");
    run_openssl(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", &DAYS.to_string(), "-subj"])
            .arg(format!("/CN={common_name}"))
            .arg("-addext")
            .arg(format!("subjectAltName={san}"))
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "keyUsage=critical,digitalSignature"])
            .args(["-addext", "extendedKeyUsage=serverAuth"])
            .arg("-keyout")
            .arg(&new_key)
            .arg("-out")
            .arg(&new_cert),
    )?;
    std::fs::set_permissions(&new_key, std::fs::Permissions::from_mode(0o600))
        .map_err(ProxyError::io("setting the mode of", &new_key))?;
    std::fs::set_permissions(&new_cert, std::fs::Permissions::from_mode(0o644))
        .map_err(ProxyError::io("setting the mode of", &new_cert))?;
    for (from, to) in [(&new_key, &key), (&new_cert, &cert)] {
        std::fs::rename(from, to).map_err(ProxyError::io("renaming into place", to))?;
    }
    std::fs::write(&record, &san).map_err(ProxyError::io("writing", &record))?;
    tracing::info!(cert = %cert.display(), names = %san, days = DAYS, "made a self-signed TLS certificate");
    Ok((cert, key))
}

/// `DNS:a,IP:1.2.3.4,DNS:*.b`, every name checked: nothing else reaches
/// openssl's config syntax.
fn subject_alt_names(names: &[String]) -> Result<String, ProxyError> {
    if names.is_empty() {
        return Err(ProxyError::Invalid {
            field: "tls_names",
            reason: "a certificate needs at least one name".into(),
        });
    }
    let entries = names
        .iter()
        .map(|name| {
            if let Ok(ip) = name.trim_matches(['[', ']']).parse::<IpAddr>() {
                return Ok(format!("IP:{ip}"));
            }
            validate_domain(name.strip_prefix("*.").unwrap_or(name)).map_err(|_| ProxyError::Invalid {
                field: "tls_names",
                reason: format!("{name:?} is neither an IP address nor a lowercase DNS name"),
            })?;
            Ok(format!("DNS:{name}"))
        })
        .collect::<Result<Vec<_>, ProxyError>>()?;
    Ok(entries.join(","))
}

/// Whether `cert` is a certificate openssl reads that is still valid for
/// [`RENEW_BEFORE_SECS`].
fn lasts(cert: &Path) -> bool {
    Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-checkend",
            &RENEW_BEFORE_SECS.to_string(),
            "-in",
        ])
        .arg(cert)
        .output()
        .is_ok_and(|out| out.status.success())
}

fn run_openssl(cmd: &mut Command) -> Result<(), ProxyError> {
    let out = cmd.output().map_err(ProxyError::Openssl)?;
    if out.status.success() {
        return Ok(());
    }
    Err(ProxyError::SelfSigned {
        status: out.status.to_string(),
        output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_become_checked_alt_names() {
        assert_eq!(
            subject_alt_names(&names(&["example.test", "*.sites.test", "192.0.2.1", "[::1]"])).unwrap(),
            "DNS:example.test,DNS:*.sites.test,IP:192.0.2.1,IP:::1"
        );
        for bad in [
            &[][..],
            &["a,DNS:evil.test"],
            &["*.*.x.test"],
            &["Example.test"],
            &["a b"],
        ] {
            assert!(subject_alt_names(&names(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_paths_are_checked() {
        let https = |cert: &str| Https {
            listen: "127.0.0.1:443".parse().unwrap(),
            cert: cert.into(),
            key: "/etc/webhoster/key.pem".into(),
        };
        https("/etc/webhoster/cert.pem").validate().unwrap();
        for bad in ["cert.pem", "/a b.pem", "/a;b.pem", "/a$b.pem", "/a{b.pem"] {
            assert!(https(bad).validate().is_err(), "{bad:?}");
        }
        assert!(https("/nonexistent/cert.pem").check_files().is_err());
    }
}
