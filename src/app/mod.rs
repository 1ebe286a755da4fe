//! app: the one place that wires the service. `webhoster serve` brings the
//! parts up in order (image, network, engine, nginx), puts the real adapters
//! behind the orchestrator's ports, recovers unfinished work, runs a first
//! convergence pass and the reaper, and only then serves the API; then it
//! keeps converging until SIGTERM or SIGINT. Nothing here decides policy:
//! that is `hosting`'s.

pub mod adapters;
pub mod operator;
pub mod system;
pub mod teardown;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{self, ApiConfig, ApiState};
use crate::auth::{self, Auth};
use crate::config::{Paths, ServeArgs, TlsSource};
use crate::hosting::admission::Budget;
use crate::hosting::ports::Ports;
use crate::hosting::{HostingConfig, HostingService, Readiness, chain};
use crate::net::{NetOptions, Network};
use crate::proxy::{ApiUpstream, Https, Proxy, ProxyOptions};
use crate::store::{self, Store};
use crate::vmm::{self, Engine, EngineOptions, Plan};

pub use teardown::teardown;

/// The ports, and the engine when the parts are real (to stop the guests
/// at shutdown with `--stop-guests`).
pub struct Backends {
    pub ports: Ports,
    pub engine: Option<Arc<Engine>>,
    /// What the host may give to hostings.
    pub budget: Budget,
    /// Reads each VM's usage counters for the sampler; `None` runs no
    /// sampler (fake parts have no counters).
    pub meter: Option<Arc<dyn crate::usage::Meter>>,
}

/// The host's memory budget for hostings: RAM minus the larger of 2 GiB and
/// 10 % for the host itself.
fn default_memory_budget_mib() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let total = total_kib / 1024;
    total.saturating_sub((total / 10).max(2048))
}

fn budget(args: &ServeArgs, plan: &Plan) -> Budget {
    Budget {
        memory_mib: args.memory_budget_mib.unwrap_or_else(default_memory_budget_mib),
        // The same overhead the VM's cgroup allows beyond the plan's RAM.
        per_hosting_mib: u64::from(plan.memory_mib) + args.vmm.vm_memory_overhead_mib,
        disk_reserve: args.disk_reserve_gib << 30,
        // Disks are thin overlays: a new one is counted at 1 GiB of growth.
        per_hosting_disk: 1 << 30,
        concurrent_creates: args.concurrent_creates.max(1),
        queue_wait: Duration::from_secs(args.ready_timeout),
    }
}

/// Brings up image, network, engine and nginx, in that order (each later
/// part needs the earlier ones: the engine opens taps in the namespace),
/// and wires them into [`Ports`].
pub async fn build_backends(paths: &Paths, args: &ServeArgs) -> anyhow::Result<Backends> {
    let cache = paths.image_cache.clone();
    let image = tokio::task::spawn_blocking(move || crate::image::ensure(&cache))
        .await
        .context("the image build task")?
        .context("the guest image")?;
    let plan = Plan::load(&args.plan).with_context(|| format!("the VM plan {:?}", args.plan))?;
    let budget = budget(args, &plan);
    tracing::info!(?budget, "admission budget");
    let net_opts = NetOptions::from(&args.net);
    let network = Arc::new(
        Network::up(net_opts.clone())
            .await
            .with_context(|| format!("setting up the VM network (namespace {})", args.net.netns))?,
    );
    let vms_dir = absolute(paths.vms_dir());
    let mut opts = EngineOptions::new(vms_dir.clone());
    opts.qemu = args.vmm.qemu.clone();
    opts.accel = args.vmm.accel;
    opts.cgroups = args.vmm.cgroup_options();
    opts.qemu_ids = args.vmm.qemu_ids;
    opts.log_cap = args.log_cap();
    opts.tap_opener = Some(Arc::new(adapters::NsTaps(net_opts)) as Arc<dyn vmm::TapOpener>);
    let engine = Arc::new(Engine::new(opts).context("starting the VM engine")?);
    let mut proxy_opts = ProxyOptions::new(paths.nginx_dir(), args.http_addr);
    proxy_opts.site_domain = args.site_domain.clone();
    proxy_opts.https = https(paths, args).await?;
    proxy_opts.api = Some(ApiUpstream {
        addr: crate::hosting::probe::reachable(args.api_addr),
        // A create waits its turn, then the guest's first boot: each up to
        // the ready timeout.
        read_timeout: Duration::from_secs(2 * args.ready_timeout + 60),
    });
    // The front serves the docs page too, on the visitor's scheme and host.
    proxy_opts.docs_url = "/docs".into();
    proxy_opts.log_cap = args.log_cap();
    let proxy = Arc::new(
        Proxy::start(proxy_opts)
            .await
            .context("starting the nginx front")?,
    );
    let network = Arc::new(adapters::NetworkAdapter::new(network));
    let meter = Arc::new(adapters::UsageMeter {
        engine: engine.clone(),
        network: network.clone(),
    });
    let ports = Ports {
        engine: Arc::new(adapters::EngineAdapter {
            engine: engine.clone(),
            plan,
            image,
            vms_dir,
            templates_dir: absolute(paths.image_cache.join("templates")),
            login_user: LOGIN_USER.into(),
            template: tokio::sync::Mutex::new(None),
        }),
        network,
        proxy: Arc::new(adapters::ProxyAdapter(proxy.clone())),
        seeder: Arc::new(crate::hosting::seeder::IsoSeeder),
        probe: Arc::new(crate::hosting::probe::TcpProbe {
            http_addr: args.http_addr,
            ssh_bind: args.net.ssh_bind,
        }),
        system: Arc::new(system::System {
            paths: paths.clone(),
            args: args.clone(),
            engine: engine.clone(),
            proxy,
        }),
    };
    Ok(Backends {
        ports,
        engine: Some(engine),
        budget,
        meter: Some(meter),
    })
}

/// HTTPS on the front, if asked for: the operator's files, or a self-signed
/// pair in `<state>/tls/` for the public host and, with a site domain,
/// `*.<domain>`.
async fn https(paths: &Paths, args: &ServeArgs) -> anyhow::Result<Option<Https>> {
    let Some(listen) = args.https_listen() else {
        return Ok(None);
    };
    let (cert, key) = match args.tls() {
        TlsSource::Off => return Ok(None),
        TlsSource::Files { cert, key } => (absolute(cert), absolute(key)),
        TlsSource::SelfSigned => {
            let host = args.public_host.as_deref().unwrap_or("localhost");
            let mut names = vec![host.to_ascii_lowercase()];
            names.extend(args.site_domain.iter().map(|d| format!("*.{d}")));
            let dir = absolute(paths.state_dir.join("tls"));
            tokio::task::spawn_blocking(move || crate::proxy::tls::self_signed(&dir, &names))
                .await
                .context("the self-signed certificate task")?
                .context("making the self-signed TLS certificate")?
        }
    };
    Ok(Some(Https { listen, cert, key }))
}

/// The hosting's side of `vm info`: its state, since when, what its user
/// asked for and the last error, read from the database (`DATABASE_URL` or
/// the state dir's SQLite). None when there is no database or no row.
pub async fn hosting_summary(paths: &Paths, vm_id: &str) -> Option<String> {
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        // Never create a database just to show that it is empty.
        Err(_) if !paths.state_dir.join("webhoster.db").exists() => return None,
        Err(_) => store::default_url(&paths.state_dir),
    };
    let store = Store::connect(&url).await.ok()?;
    let h = store.hosting_by_vm(vm_id).await.ok().flatten();
    store.close().await;
    let h = h?;
    Some(format!(
        "hosting:    {} since {} (desired: {}){}\nlast_error: {}\n",
        h.state,
        h.state_since,
        h.desired,
        h.step.map(|s| format!(", step {}", s.name())).unwrap_or_default(),
        h.last_error.as_deref().unwrap_or("none"),
    ))
}

fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// The host part of a URL that reaches a listener on `addr` from this host.
fn reachable_host(addr: std::net::SocketAddr) -> String {
    crate::hosting::probe::reachable(addr).ip().to_string()
}

/// How long requests in flight may finish after SIGTERM.
const GRACE: Duration = Duration::from_secs(30);

/// The login user in every guest.
const LOGIN_USER: &str = "ubuntu";

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

pub async fn run(paths: Paths, args: ServeArgs) -> anyhow::Result<ExitCode> {
    // Before the backends: the engine and nginx create their dirs in it.
    prepare_state_dir(&paths.state_dir)?;
    let backends = build_backends(&paths, &args).await?;
    run_with(paths, args, backends).await
}

/// The state dir's mode. Root's secrets live in it with their own modes (the
/// database and the JWT secret 0600, `vms/` 0700); nginx's unprivileged
/// workers must pass through it to their temp dirs under `nginx/`, so others
/// may enter it but not list it.
pub const STATE_DIR_MODE: u32 = 0o711;
/// The mode of the SQLite database and its `-wal` / `-shm` files, and of
/// the JWT secret.
pub const SECRET_FILE_MODE: u32 = 0o600;

/// Create the state dir, or set the mode of the existing one (an older
/// install, or a umask that widened it).
pub fn prepare_state_dir(state_dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(STATE_DIR_MODE)
        .create(state_dir)
        .with_context(|| format!("creating the state dir {}", state_dir.display()))?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
        .with_context(|| format!("setting the mode of the state dir {}", state_dir.display()))
}

/// What `serve` opens first: the state dir (0711), the database (a SQLite
/// file 0600) and the JWT secret (0600), with those modes set whatever the
/// umask and whatever an older install left.
pub async fn open_state(paths: &Paths, args: &ServeArgs) -> anyhow::Result<(Store, Vec<u8>)> {
    prepare_state_dir(&paths.state_dir)?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| store::default_url(&paths.state_dir));
    restrict_sqlite_files(&url)?;
    let store = Store::connect(&url).await.context("opening the database")?;
    restrict_sqlite_files(&url)?;
    let secret = match &args.jwt_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => {
            let secret = auth::load_or_create_secret(&paths.state_dir)?;
            // Created 0600; one from an older install is made so too.
            use std::os::unix::fs::PermissionsExt;
            let file = paths.state_dir.join("jwt.secret");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(SECRET_FILE_MODE))
                .with_context(|| format!("setting the mode of {}", file.display()))?;
            secret
        }
    };
    Ok((store, secret))
}

/// The file of a `sqlite://` URL (`None` for another database or an
/// in-memory one).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && !path.starts_with(':')).then(|| PathBuf::from(path))
}

/// The database file is created 0600 before SQLite opens it (SQLite gives
/// its `-wal` and `-shm` files the database's mode), and an existing one and
/// its companions are made 0600.
fn restrict_sqlite_files(url: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let Some(db) = sqlite_file(url) else {
        return Ok(());
    };
    if db.parent().is_some_and(|dir| dir.is_dir()) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(SECRET_FILE_MODE)
            .open(&db)
            .with_context(|| format!("creating the database {}", db.display()))?;
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = db.clone().into_os_string();
        file.push(suffix);
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(SECRET_FILE_MODE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e)
                    .with_context(|| format!("setting the mode of {}", PathBuf::from(file).display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// `serve` over any backends (the real ones from [`build_backends`], or
/// fakes in a test that runs the whole service).
pub async fn run_with(paths: Paths, args: ServeArgs, backends: Backends) -> anyhow::Result<ExitCode> {
    let (store, secret) = open_state(&paths, &args).await?;
    // Hashing gets all cores but one: a login flood then leaves a core for
    // every other route (each hash is ~20 MiB and tens of ms of one core).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let auth = Auth::new(
        &secret,
        Duration::from_secs(args.token_ttl),
        cores.saturating_sub(1).max(1),
    )?;
    let cfg = HostingConfig {
        login_user: LOGIN_USER.into(),
        ssh_ports: args.net.ssh_ports.clone(),
        ready: Readiness {
            timeout: Duration::from_secs(args.ready_timeout),
            interval: Duration::from_millis(500),
        },
        converge_every: crate::hosting::converge::INTERVAL,
        budget: backends.budget,
        backups_keep: args.backups_keep,
        warm_pool: args.warm_pool,
    };
    let Backends {
        ports, engine, meter, ..
    } = backends;
    let hosting = HostingService::new(store.clone(), ports, cfg);
    // Before the API accepts work: undo unfinished creates, finish deletes,
    // remove what belongs to no hosting, and make one convergence pass so
    // every state shown is one seen since this start.
    let report = hosting.recover().await.context("recovering unfinished work")?;
    tracing::info!(undone = ?report.undone, deleted = ?report.deleted, failed = ?report.failed, backups_dropped = ?report.backups_dropped, "recovery done");
    let reaped = hosting.reap().await.context("removing leftovers")?;
    tracing::info!(?reaped, "reaper done");
    let started = std::time::Instant::now();
    let pass = hosting
        .converge_all()
        .await
        .context("the first convergence pass")?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), repaired = ?pass.repaired, "first convergence pass done");
    let follower = hosting.follow_engine();
    let convergence = hosting.spawn_convergence();
    // After the reaper: clones of an earlier run were its to remove.
    let pool = hosting.spawn_pool();
    let state = ApiState::new(
        store.clone(),
        auth,
        Arc::clone(&hosting),
        ApiConfig {
            public_host: args.public_host.clone(),
            http_port: args.http_addr.port(),
            https_port: args.https_listen().map(|a| a.port()),
            site_domain: args.site_domain.clone(),
            state_dir: Some(paths.state_dir.clone()),
            // Loaded (and checked) above for the engine; the pages show it.
            plan: Plan::load(&args.plan).ok(),
            session_ttl: Duration::from_secs(args.session_ttl),
            ..ApiConfig::default()
        },
    );
    // Per-VM usage for /metrics and the dashboard: sampled while serving.
    let usage = Arc::new(crate::usage::Usage::new());
    let sampler =
        meter.map(|meter| crate::usage::spawn(usage.clone(), meter, Duration::from_secs(args.usage_every)));
    let state = state.with_usage(usage);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut graceful_rx = stop_rx.clone();
    let graceful = async move {
        let _ = graceful_rx.wait_for(|stop| *stop).await;
    };
    let (addr, server) = api::serve(args.api_addr, state, graceful)
        .await
        .with_context(|| format!("binding the API to {}", args.api_addr))?;
    tracing::info!(%addr, "API listening");
    let site_host = args
        .public_host
        .clone()
        .unwrap_or_else(|| reachable_host(args.http_addr));
    let site_port = if args.http_addr.port() == 80 {
        String::new()
    } else {
        format!(":{}", args.http_addr.port())
    };
    let https = args
        .https_listen()
        .map(|a| {
            let port = if a.port() == 443 {
                String::new()
            } else {
                format!(":{}", a.port())
            };
            format!("\n  https: https://{site_host}{port}/<user_id>/ and /api/v1")
        })
        .unwrap_or_default();
    println!(
        "webhoster is up\n  web:   http://{site_host}{site_port}/\n  API:   http://{addr}/api/v1\n  docs:  http://{addr}/docs\n  sites: http://{site_host}{site_port}/<user_id>/{https}"
    );
    let mut deadline_rx = stop_rx;
    tokio::select! {
        () = server => {}
        () = async move {
            let _ = deadline_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(GRACE).await;
        } => {
            // A synchronous create can take minutes under TCG; the journal
            // makes cutting it safe.
            tracing::warn!(grace = ?GRACE, "requests still in flight after the grace period; stopping anyway");
        }
    }
    // Creates still running are cut where they stand; the journal lets the
    // next start undo them.
    convergence.abort();
    if let Some(pool) = pool {
        pool.abort();
    }
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    // Stops the guests get now are ours, not their users' power-offs.
    if let Some(follower) = follower {
        follower.abort();
    }
    hosting.abort_creates();
    if args.stop_guests
        && let Some(engine) = &engine
    {
        match teardown::stop_guests(engine, &paths.vms_dir()).await {
            Ok(n) => tracing::info!(stopped = n, "guests stopped (--stop-guests)"),
            Err(e) => tracing::error!(error = %chain(e.as_ref()), "stopping the guests"),
        }
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags reach the front: the operator's files as given, or a
    /// self-signed pair (real openssl) for the public host and the domain.
    #[tokio::test]
    async fn tls_flags_become_the_fronts_https() {
        let state = tempfile::tempdir().unwrap();
        let paths = Paths {
            state_dir: state.path().to_owned(),
            image_cache: state.path().join("images"),
        };
        let args = |argv: &[&str]| crate::config::parse_serve(argv).unwrap();
        assert_eq!(https(&paths, &args(&[])).await.unwrap(), None);
        let files = https(&paths, &args(&["--tls-cert", "/c.pem", "--tls-key", "/k.pem"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(files.listen, crate::config::DEFAULT_HTTPS_ADDR);
        assert_eq!(
            (files.cert.to_str(), files.key.to_str()),
            (Some("/c.pem"), Some("/k.pem"))
        );

        let own = https(
            &paths,
            &args(&[
                "--tls-self-signed",
                "--https-addr",
                "127.0.0.1:8443",
                "--public-host",
                "Example.test",
                "--site-domain",
                "sites.test",
            ]),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(own.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(own.cert, state.path().join("tls/self-signed.crt"));
        assert_eq!(
            std::fs::read_to_string(state.path().join("tls/self-signed.names")).unwrap(),
            "DNS:example.test,DNS:*.sites.test"
        );
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(
            sqlite_file("sqlite:///var/lib/webhoster/webhoster.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/webhoster/webhoster.db"))
        );
        assert_eq!(sqlite_file("sqlite:rel.db"), Some(PathBuf::from("rel.db")));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://u@h/db"), None);
    }
}
