//! proxy: webhoster's own nginx, publishing each site at
//! `http://<host>/<user_id>/` (and, when a site domain is set, at
//! `http://<username>.<domain>/`), the same over HTTPS when it has a
//! certificate (`tls`), and the service's API at `/api/` and `/docs`.
//!
//! It owns the nginx master process (prefix, config, pid, logs and temp dirs
//! all under `<state>/nginx`), the sink that caps nginx's logs (`logsink`), the config rendered from `templates/nginx/`,
//! and every change to it: render, `nginx -t`, atomic swap, HUP, confirm.
//! The site files of the generation in force are the record of the sites,
//! so they survive a webhoster restart, as does the detached master.
//!
//! When `add_site` or `remove_site` returns, every connection opened from then
//! on is served by the new config: the workers answered with the new
//! generation on the control socket and the old workers stopped accepting.
//! Connections already open to an old worker finish on the old config (that
//! is nginx's graceful reload; requests in flight are never cut).
//!
//! In path mode all sites share one origin, so every site response carries
//! a CSP sandbox that gives each page an opaque origin of its own
//! (`templates/nginx/isolation.conf.hbs`; README "Security model"). A
//! guest's response headers never make nginx act (`X-Accel-*` are ignored)
//! and never reach past the guest's own responses.
//!
//! It never edits `/etc/nginx`, never uses the distribution's nginx service,
//! never renders a value it has not validated itself, and never knows where
//! a site's VM comes from (it gets an address).

mod apply;
mod control;
mod error;
mod layout;
mod lock;
mod logsink;
mod master;
mod render;
mod site;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

pub use error::ProxyError;
pub use master::stop;
pub use site::Site;
pub use tls::Https;

use layout::Layout;
use logsink::LogSink;

use crate::logfile::LogCap;

/// How webhoster's nginx runs.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// `<state>/nginx`: prefix, configs, pidfile, logs, temp dirs.
    pub dir: PathBuf,
    /// Where the sites are served over HTTP.
    pub listen: SocketAddr,
    /// HTTPS beside HTTP, for the front and the host-name sites.
    pub https: Option<Https>,
    /// The service's API, also served by the front at `/api/` and `/docs`.
    pub api: Option<ApiUpstream>,
    /// Also serve each site at `http://<username>.<domain>/` by Host header.
    pub site_domain: Option<String>,
    /// The nginx binary.
    pub nginx: PathBuf,
    /// Where the landing page's "API documentation" link points.
    pub docs_url: String,
    pub limits: SiteLimits,
    /// nginx worker processes; `None` is one per core.
    pub workers: Option<u32>,
    /// Cap of each nginx log file (error, front access, each site's access).
    pub log_cap: LogCap,
}

impl ProxyOptions {
    pub fn new(dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        ProxyOptions {
            dir: dir.into(),
            listen,
            https: None,
            api: None,
            site_domain: None,
            nginx: PathBuf::from("nginx"),
            docs_url: "http://127.0.0.1:8000/docs".to_string(),
            limits: SiteLimits::default(),
            workers: None,
            log_cap: LogCap::default(),
        }
    }
}

/// The service's API behind the front: sites and API then share the
/// front's ports, HTTPS included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiUpstream {
    /// Where the API listens, as reached from this host.
    pub addr: SocketAddr,
    /// How long the front waits for an answer (a create may wait for a
    /// guest's first boot).
    pub read_timeout: Duration,
}

impl ApiUpstream {
    pub fn validate(&self) -> Result<(), ProxyError> {
        if self.addr.ip().is_unspecified() || self.addr.port() == 0 {
            return Err(ProxyError::Invalid {
                field: "api",
                reason: format!("{} is not an address to connect to", self.addr),
            });
        }
        Ok(())
    }
}

/// What every site gets, the same for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteLimits {
    /// Requests per second per visitor address per site; 0 turns the limit off.
    pub rate_per_sec: u32,
    /// Requests above the rate that are still served at once.
    pub burst: u32,
    /// Largest request body, in MiB.
    pub body_max_mib: u32,
}

impl Default for SiteLimits {
    fn default() -> Self {
        SiteLimits {
            rate_per_sec: 20,
            burst: 50,
            body_max_mib: 64,
        }
    }
}

impl SiteLimits {
    pub fn validate(&self) -> Result<(), ProxyError> {
        let bad = |reason: String| ProxyError::Invalid {
            field: "limits",
            reason,
        };
        if !(1..=65536).contains(&self.body_max_mib) {
            return Err(bad(format!(
                "body limit {} MiB is not in 1..=65536",
                self.body_max_mib
            )));
        }
        if self.rate_per_sec > 1_000_000 || self.burst > 1_000_000 {
            return Err(bad("rate and burst must be at most 1000000".into()));
        }
        Ok(())
    }
}

/// The handle on webhoster's nginx. Cheap to clone; all clones share one
/// queue of changes.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    opts: ProxyOptions,
    layout: Layout,
    /// Changes waiting for the next apply: the ones that queue up while an
    /// apply runs all land in one new generation (one `nginx -t`, one HUP).
    queue: Mutex<Vec<Pending>>,
    /// Held by the task applying changes (and by start and shutdown).
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Writes nginx's logs while this handle lives; `None` when another
    /// webhoster on the same dir does.
    _log_sink: Option<LogSink>,
}

enum Change {
    Add(Site),
    Remove(i64),
}

struct Pending {
    change: Change,
    done: oneshot::Sender<Result<(), ProxyError>>,
}

/// Graceful stop: requests in flight get this long.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

impl Proxy {
    /// Find the running master for `opts.dir` or start a detached one, and
    /// bring its config in line with `opts` and the sites on disk. Cheap
    /// when the master runs and nothing changed (no reload).
    pub async fn start(opts: ProxyOptions) -> Result<Proxy, ProxyError> {
        if let Some(https) = &opts.https {
            https.check_files()?;
        }
        std::fs::create_dir_all(&opts.dir).map_err(ProxyError::io("creating", &opts.dir))?;
        let root = std::fs::canonicalize(&opts.dir).map_err(ProxyError::io("resolving", &opts.dir))?;
        let layout = Layout::new(root)?;
        layout.create_dirs()?;
        // Before the master starts, so its first lines are kept.
        let log_sink = LogSink::start(&layout, opts.log_cap)?;
        let proxy = Proxy {
            inner: Arc::new(Inner {
                opts,
                layout,
                _log_sink: log_sink,
                queue: Mutex::new(Vec::new()),
                turn: Arc::new(tokio::sync::Mutex::new(())),
            }),
        };
        proxy.converge().await?;
        Ok(proxy)
    }

    /// Makes sure the master runs (after a `teardown`, a reboot or a kill),
    /// serving the sites on disk. True when one had to be started.
    pub async fn ensure_running(&self) -> Result<bool, ProxyError> {
        if self.master_pid().is_some() {
            return Ok(false);
        }
        self.converge().await
    }

    /// Master and config in line with the options and the sites on disk.
    async fn converge(&self) -> Result<bool, ProxyError> {
        let _turn = self.inner.turn.clone().lock_owned().await;
        let task = self.inner.clone();
        let converged = run_detached(async move {
            let _lock = task.file_lock().await?;
            let sites = apply::read_sites(&task.layout)?;
            let sites: Vec<Site> = sites.into_values().collect();
            apply::converge(&task.layout, &task.opts, &sites).await
        })
        .await?;
        tracing::info!(
            pid = converged.pid,
            generation = converged.generation,
            started = converged.started,
            reloaded = converged.changed,
            dir = %self.inner.layout.root().display(),
            "nginx front is up"
        );
        Ok(converged.started)
    }

    /// Publish `site` (or replace the one of the same user). Returns once
    /// nginx serves it; on error the previous config stays in force.
    pub async fn add_site(&self, site: &Site) -> Result<(), ProxyError> {
        site.validate()?;
        self.submit(Change::Add(site.clone())).await
    }

    /// Unpublish the site of `user_id`; nothing to do if there is none.
    pub async fn remove_site(&self, user_id: i64) -> Result<(), ProxyError> {
        if user_id <= 0 {
            return Err(ProxyError::Invalid {
                field: "user_id",
                reason: format!("{user_id} is not > 0"),
            });
        }
        self.submit(Change::Remove(user_id)).await
    }

    /// The sites in the config in force, by user id.
    pub async fn sites(&self) -> Result<Vec<Site>, ProxyError> {
        let _turn = self.inner.turn.lock().await;
        Ok(apply::read_sites(&self.inner.layout)?.into_values().collect())
    }

    /// The master's pid, checked now (pidfile and `/proc/<pid>/cmdline`).
    pub fn master_pid(&self) -> Option<i32> {
        master::find(&self.inner.layout)
    }

    /// The config generation `current` points at.
    pub fn generation(&self) -> Result<Option<u64>, ProxyError> {
        self.inner.layout.current_generation()
    }

    /// The resolved `<state>/nginx` directory.
    pub fn dir(&self) -> &Path {
        self.inner.layout.root()
    }

    pub fn options(&self) -> &ProxyOptions {
        &self.inner.opts
    }

    /// Stop the master (gracefully, then by force). The sites stay on disk;
    /// `start` serves them again.
    pub async fn shutdown(&self) -> Result<(), ProxyError> {
        let _turn = self.inner.turn.lock().await;
        let dir = self.inner.layout.root().to_path_buf();
        tokio::task::spawn_blocking(move || stop(&dir, SHUTDOWN_TIMEOUT))
            .await
            .map_err(ProxyError::Join)??;
        Ok(())
    }

    async fn submit(&self, change: Change) -> Result<(), ProxyError> {
        let (done, result) = oneshot::channel();
        self.inner
            .queue
            .lock()
            .expect("the proxy queue lock is never poisoned")
            .push(Pending { change, done });
        let turn = self.inner.turn.clone().lock_owned().await;
        let batch = std::mem::take(
            &mut *self
                .inner
                .queue
                .lock()
                .expect("the proxy queue lock is never poisoned"),
        );
        if !batch.is_empty() {
            // Detached, so a caller that gives up cannot leave a change half
            // applied (swapped but not confirmed) or others' changes unanswered.
            let inner = self.inner.clone();
            let applying = tokio::spawn(async move {
                let _turn = turn;
                inner.apply_batch(batch).await;
            });
            applying.await.map_err(ProxyError::Join)?;
        } else {
            drop(turn);
        }
        // An earlier caller's batch took our change and answered it.
        result.await.unwrap_or_else(|_| {
            Err(ProxyError::NotApplied {
                reason: "the task applying it stopped before answering".into(),
            })
        })
    }
}

impl Inner {
    async fn file_lock(&self) -> Result<lock::FileLock, ProxyError> {
        let path = self.layout.lock_file();
        tokio::task::spawn_blocking(move || lock::acquire(&path))
            .await
            .map_err(ProxyError::Join)?
    }

    /// Apply a batch as one generation; if that fails and it held several
    /// changes, apply them one by one so only the failing one reports it.
    async fn apply_batch(&self, batch: Vec<Pending>) {
        let lock = match self.file_lock().await {
            Ok(lock) => lock,
            Err(e) => {
                let text = e.to_string();
                let mut batch = batch.into_iter();
                if let Some(first) = batch.next() {
                    let _ = first.done.send(Err(e));
                }
                for p in batch {
                    let _ = p.done.send(Err(ProxyError::NotApplied { reason: text.clone() }));
                }
                return;
            }
        };
        let changes: Vec<&Change> = batch.iter().map(|p| &p.change).collect();
        match self.apply_changes(&changes).await {
            Ok(()) => {
                for p in batch {
                    let _ = p.done.send(Ok(()));
                }
            }
            Err(e) if batch.len() == 1 => {
                let _ = batch.into_iter().next().map(|p| p.done.send(Err(e)));
            }
            Err(e) => {
                tracing::warn!(changes = batch.len(), %e, "a batch of proxy changes failed; applying them one by one");
                for p in batch {
                    let result = self.apply_changes(&[&p.change]).await;
                    let _ = p.done.send(result);
                }
            }
        }
        drop(lock);
    }

    async fn apply_changes(&self, changes: &[&Change]) -> Result<(), ProxyError> {
        let mut sites: BTreeMap<i64, Site> = apply::read_sites(&self.layout)?;
        for change in changes {
            match change {
                Change::Add(site) => {
                    if let Some(other) = sites
                        .values()
                        .find(|s| s.username == site.username && s.user_id != site.user_id)
                    {
                        return Err(ProxyError::Invalid {
                            field: "username",
                            reason: format!(
                                "{:?} is already published for user {}",
                                site.username, other.user_id
                            ),
                        });
                    }
                    sites.insert(site.user_id, site.clone());
                }
                Change::Remove(user_id) => {
                    sites.remove(user_id);
                }
            }
        }
        let sites: Vec<Site> = sites.into_values().collect();
        apply::converge(&self.layout, &self.opts, &sites).await?;
        Ok(())
    }
}

/// Run `fut` on its own task so that dropping the caller cannot cut it short.
async fn run_detached<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T, ProxyError>> + Send + 'static,
) -> Result<T, ProxyError> {
    tokio::spawn(fut).await.map_err(ProxyError::Join)?
}
