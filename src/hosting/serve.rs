//! `webhoster serve`: opens the store, recovers unfinished work, wires the
//! real engine, network, proxy and probes ([`build_backends`]), and serves
//! the API until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::ports::Ports;
use super::{HostingConfig, HostingService, Readiness};
use crate::api::{self, ApiConfig, ApiState};
use crate::auth::{self, Auth};
use crate::config::{Paths, ServeArgs};
use crate::store::{self, Store};

/// The real parts behind the ports, and what must live as long as the service.
pub struct Backends {
    pub ports: Ports,
    /// The real parts, reconciled at start; `None` on fakes.
    pub live: Option<crate::backends::Live>,
}

/// Wires `vmm::Engine`, `net::Network`, `proxy::Proxy`, the seed writer and
/// the TCP probe into [`Ports`] (see `crate::backends`).
pub async fn build_backends(paths: &Paths, args: &ServeArgs) -> anyhow::Result<Backends> {
    let live = crate::backends::start(paths, args).await?;
    let system = crate::backends::System {
        paths: paths.clone(),
        args: args.clone(),
        engine: live.engine.clone(),
        network: live.network.clone(),
        proxy: live.proxy.clone(),
    };
    let ports = Ports {
        engine: live.engine_adapter.clone(),
        network: Arc::new(crate::backends::NetworkAdapter(live.network.clone())),
        proxy: Arc::new(crate::backends::ProxyAdapter(live.proxy.clone())),
        seeder: Arc::new(super::seeder::IsoSeeder),
        probe: Arc::new(super::probe::TcpProbe {
            http_addr: args.http_addr,
            ssh_bind: args.net.ssh_bind,
        }),
        system: Arc::new(system),
    };
    Ok(Backends {
        ports,
        live: Some(live),
    })
}

/// The host part of a URL that reaches a listener on `addr` from this host.
fn reachable_host(addr: std::net::SocketAddr) -> String {
    super::probe::reachable(addr).ip().to_string()
}

/// How long requests in flight may finish after SIGTERM.
const GRACE: Duration = Duration::from_secs(30);

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
    let backends = build_backends(&paths, &args).await?;
    run_with(paths, args, backends).await
}

/// `serve` over any backends (the real ones from [`build_backends`], or
/// fakes in a test that runs the whole service).
pub async fn run_with(paths: Paths, args: ServeArgs, backends: Backends) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&paths.state_dir)
        .with_context(|| format!("creating the state dir {}", paths.state_dir.display()))?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| store::default_url(&paths.state_dir));
    let store = Store::connect(&url).await.context("opening the database")?;
    let secret = match &args.jwt_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => auth::load_or_create_secret(&paths.state_dir)?,
    };
    // Hashing gets all cores but one: a login flood then leaves a core for
    // every other route (each hash is ~20 MiB and tens of ms of one core).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let auth = Auth::new(
        &secret,
        Duration::from_secs(args.token_ttl),
        cores.saturating_sub(1).max(1),
    )?;
    let cfg = HostingConfig {
        login_user: "ubuntu".into(),
        ssh_ports: args.net.ssh_ports.clone(),
        ready: Readiness {
            timeout: Duration::from_secs(args.ready_timeout),
            interval: Duration::from_millis(500),
        },
    };
    let Backends { ports, live } = backends;
    let hosting = HostingService::new(store.clone(), ports, cfg);
    // Before the API accepts work: undo unfinished creates, finish deletes.
    let report = hosting.recover().await.context("recovering unfinished work")?;
    tracing::info!(undone = ?report.undone, deleted = ?report.deleted, failed = ?report.failed, "recovery done");
    if let Some(live) = &live {
        live.reconcile(&store)
            .await
            .context("reattaching to the running VMs")?;
    }
    let _follower = hosting.follow_engine();
    let state = ApiState::new(
        store.clone(),
        auth,
        Arc::clone(&hosting),
        ApiConfig {
            public_host: args.public_host.clone(),
            http_port: args.http_addr.port(),
            state_dir: Some(paths.state_dir.clone()),
            ..ApiConfig::default()
        },
    );
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
    println!(
        "webhoster is up\n  API:   http://{addr}/api/v1\n  docs:  http://{addr}/docs\n  sites: http://{site_host}{site_port}/<user_id>/"
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
    hosting.abort_creates();
    store.close().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
