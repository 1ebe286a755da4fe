//! Operational endpoints: liveness, detailed health, version, metrics.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use serde::Serialize;
use utoipa::ToSchema;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::Request;
use super::error::{ApiError, envelope, ok};
use crate::hosting::ports::HealthCheck;

type Reply = Result<Response, ApiError>;

/// Free space below this on the state dir's filesystem makes health fail.
const MIN_FREE_DISK: u64 = 512 * 1024 * 1024;

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthData {
    /// Always `ok`: the process answers.
    #[schema(schema_with = ok_schema)]
    pub status: &'static str,
    pub uptime_seconds: u64,
}

fn ok_schema() -> utoipa::openapi::Object {
    super::openapi::string_enum(["ok"], "Always `ok`")
}

fn health_status_schema() -> utoipa::openapi::Object {
    super::openapi::string_enum(["ok", "unavailable"], "`ok` when every required part is up")
}

/// One part of the service and whether it is up.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check<'a> {
    pub name: &'a str,
    pub ok: bool,
    /// When false, a failure does not make the service unhealthy.
    pub required: bool,
    pub detail: &'a str,
}

/// The parts of the service, from the last snapshot.
#[derive(Debug, Serialize, ToSchema)]
pub struct DetailedHealthData<'a> {
    #[schema(schema_with = health_status_schema)]
    pub status: &'static str,
    pub checks: Vec<Check<'a>>,
    /// Hostings by status; statuses without hostings are left out.
    pub vms_by_status: &'a BTreeMap<String, i64>,
    pub creates_in_flight: usize,
    /// The warm pool (clones ready for a create).
    pub pool: crate::hosting::pool::PoolStatus,
    pub checked_seconds_ago: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VersionData<'a> {
    pub version: &'a str,
    /// `unknown` when the build did not know it.
    pub git_commit: &'a str,
    /// The QEMU that runs the guests, when it answered.
    pub qemu_version: Option<String>,
}

pub async fn health(req: &Request<'_>) -> Reply {
    Ok(ok(
        StatusCode::OK,
        "alive",
        &HealthData {
            status: "ok",
            uptime_seconds: req.state.started.elapsed().as_secs(),
        },
    ))
}

fn free_disk_check(path: &std::path::Path) -> HealthCheck {
    match nix::sys::statvfs::statvfs(path) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            HealthCheck {
                name: "disk".into(),
                ok: free >= MIN_FREE_DISK,
                required: true,
                detail: format!("{} MiB free in {}", free / (1024 * 1024), path.display()),
            }
        }
        Err(e) => HealthCheck {
            name: "disk".into(),
            ok: false,
            required: true,
            detail: format!("statvfs {}: {e}", path.display()),
        },
    }
}

/// How often the health snapshot is taken. `/health/detailed` and
/// `/version` serve the last one, so a flood of them costs no process, no
/// query and no blocking call.
pub const HEALTH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What the parts looked like at `taken`.
pub struct Snapshot {
    checks: Vec<HealthCheck>,
    vms_by_status: BTreeMap<String, i64>,
    qemu_version: Option<String>,
    taken: std::time::SystemTime,
}

/// The last snapshot, shared by the handlers and the refresher.
#[derive(Default)]
pub struct HealthCache {
    current: std::sync::RwLock<Option<Arc<Snapshot>>>,
}

impl HealthCache {
    fn get(&self) -> Option<Arc<Snapshot>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes a snapshot now (the checks that block run on the blocking pool).
    pub async fn refresh(&self, state: &super::ApiState) {
        let mut checks = Vec::new();
        let db = state.store.ping().await;
        checks.push(HealthCheck {
            name: "database".into(),
            ok: db.is_ok(),
            required: true,
            detail: match &db {
                Ok(()) => format!("{} answers", state.store.backend().name()),
                Err(_) => format!("{} does not answer", state.store.backend().name()),
            },
        });
        if let Err(e) = &db {
            tracing::warn!(error = %crate::hosting::chain(e), "health: database");
        }
        let system = &state.hosting.ports().system;
        checks.extend(system.checks().await);
        if let Some(dir) = state.config.state_dir.clone()
            && let Ok(check) = tokio::task::spawn_blocking(move || free_disk_check(&dir)).await
        {
            checks.push(check);
        }
        let vms_by_status = state
            .store
            .count_by_status()
            .await
            .map(|v| v.into_iter().collect())
            .unwrap_or_default();
        let snapshot = Snapshot {
            checks,
            vms_by_status,
            qemu_version: system.qemu_version().await,
            taken: std::time::SystemTime::now(),
        };
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(snapshot));
    }
}

/// Refreshes `state`'s health snapshot every [`HEALTH_EVERY`] until dropped.
pub fn spawn_refresher(state: super::ApiState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(HEALTH_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            state.health.refresh(&state).await;
        }
    })
}

fn age_seconds(s: &Snapshot) -> f64 {
    s.taken.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub async fn health_detailed(req: &Request<'_>) -> Reply {
    let state = req.state;
    let Some(snapshot) = state.health.get() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            "no health snapshot yet; the service is starting",
        ));
    };
    let checks = &snapshot.checks;
    let healthy = checks.iter().all(|c| c.ok || !c.required);
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let data = DetailedHealthData {
        status: if healthy { "ok" } else { "unavailable" },
        checks: checks
            .iter()
            .map(|c| Check {
                name: &c.name,
                ok: c.ok,
                required: c.required,
                detail: &c.detail,
            })
            .collect(),
        vms_by_status: &snapshot.vms_by_status,
        creates_in_flight: state.hosting.creates_in_flight(),
        pool: state.hosting.pool().status(),
        checked_seconds_ago: age_seconds(&snapshot),
    };
    if healthy {
        Ok(ok(status, "all required parts are up", &data))
    } else {
        let down: Vec<&str> = checks
            .iter()
            .filter(|c| c.required && !c.ok)
            .map(|c| c.name.as_str())
            .collect();
        Ok(envelope(
            status,
            false,
            &format!("down: {}", down.join(", ")),
            &data,
            Some("unhealthy"),
        ))
    }
}

/// The warm pool's gauges and counters.
fn render_pool(out: &mut String, pool: &crate::hosting::pool::PoolStatus) {
    use crate::hosting::pool::TemplateState;
    let template_ready = u8::from(matches!(pool.template, TemplateState::Ready { .. }));
    let _ = write!(
        out,
        "# HELP webhoster_pool_ready Warm clones restored and paused, ready for a create.\n\
         # TYPE webhoster_pool_ready gauge\nwebhoster_pool_ready {}\n\
         # HELP webhoster_pool_target Warm clones the pool keeps ready (--warm-pool).\n\
         # TYPE webhoster_pool_target gauge\nwebhoster_pool_target {}\n\
         # HELP webhoster_pool_filling Warm clones being made.\n\
         # TYPE webhoster_pool_filling gauge\nwebhoster_pool_filling {}\n\
         # HELP webhoster_pool_template_ready 1 when the template clones come from is loaded.\n\
         # TYPE webhoster_pool_template_ready gauge\nwebhoster_pool_template_ready {template_ready}\n\
         # HELP webhoster_pool_claimed_total Warm clones taken by creates.\n\
         # TYPE webhoster_pool_claimed_total counter\nwebhoster_pool_claimed_total {}\n\
         # HELP webhoster_pool_discarded_total Warm clones thrown away (crashed, failed to restore or personalise).\n\
         # TYPE webhoster_pool_discarded_total counter\nwebhoster_pool_discarded_total {}\n",
        pool.ready, pool.target, pool.filling, pool.claimed_total, pool.discarded_total
    );
}

pub async fn version(req: &Request<'_>) -> Reply {
    let qemu = req.state.health.get().and_then(|s| s.qemu_version.clone());
    Ok(ok(
        StatusCode::OK,
        "version",
        &VersionData {
            version: req.state.config.version,
            git_commit: option_env!("WEBHOSTER_GIT_COMMIT").unwrap_or("unknown"),
            qemu_version: qemu,
        },
    ))
}

pub async fn metrics(req: &Request<'_>) -> Reply {
    let state = req.state;
    let mut out = String::with_capacity(8192);
    state.metrics.render(&mut out);
    out.push_str("# HELP webhoster_hostings Hostings by status.\n# TYPE webhoster_hostings gauge\n");
    let counts: BTreeMap<String, i64> = state.store.count_by_status().await?.into_iter().collect();
    for s in crate::hosting::HostingState::ALL {
        let n = counts.get(s.as_str()).copied().unwrap_or(0);
        let _ = writeln!(out, "webhoster_hostings{{status=\"{}\"}} {n}", s.as_str());
    }
    state.hosting.create_metrics().render(&mut out);
    render_pool(&mut out, &state.hosting.pool().status());
    let _ = writeln!(
        out,
        "# TYPE webhoster_uptime_seconds gauge\nwebhoster_uptime_seconds {}",
        state.started.elapsed().as_secs()
    );
    super::metrics::render_vm_usage(&mut out, &state.usage.live());
    let mut resp = Response::new(out.into());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(resp)
}
