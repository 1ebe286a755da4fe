//! The proxy module's one error type.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A value failed validation; nothing was rendered or changed.
    #[error("invalid {field} for the proxy: {reason}")]
    Invalid { field: &'static str, reason: String },

    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("rendering the nginx template {0}")]
    Render(&'static str, #[source] handlebars::RenderError),

    #[error("site file {} is not one webhoster wrote: {reason}", path.display())]
    CorruptSite { path: PathBuf, reason: String },

    #[error("cannot run {} (is the Debian package nginx-light installed?)", nginx.display())]
    Spawn {
        nginx: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot run openssl (is the Debian package openssl installed?)")]
    Openssl(#[source] std::io::Error),

    #[error("openssl could not make a self-signed certificate ({status}): {output}")]
    SelfSigned { status: String, output: String },

    /// `nginx -t` refused the candidate; the config in force is unchanged.
    #[error("nginx -t rejected generation {generation}; the previous config stays in force: {output}")]
    ConfigTest { generation: u64, output: String },

    #[error("nginx did not start ({status}): {output}")]
    StartFailed { status: String, output: String },

    #[error("nginx {step} did not finish within {waited:?}")]
    Timeout { step: &'static str, waited: Duration },

    /// The master was told to reload but its workers never answered with the
    /// new generation; the previous config was put back.
    #[error(
        "nginx did not confirm generation {generation} within {waited:?} (it answers {answered}); \
         the previous config was put back, see {}",
        error_log.display()
    )]
    NotConfirmed {
        generation: u64,
        answered: String,
        waited: Duration,
        error_log: PathBuf,
    },

    #[error("the nginx master for {} is not running", dir.display())]
    NotRunning { dir: PathBuf },

    #[error("signalling the nginx master (pid {pid})")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },

    #[error("locking {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },

    /// The change shared a batch with one that failed before anything was
    /// written (or its task died); nothing of it is in force.
    #[error("the change was not applied: {reason}")]
    NotApplied { reason: String },

    #[error("a background task of the proxy failed")]
    Join(#[source] tokio::task::JoinError),
}

impl ProxyError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ProxyError::Io { action, path, source }
    }
}
