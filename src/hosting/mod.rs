//! hosting: the orchestrator. A create is a list of steps (seed, disk, tap,
//! spawn, forward, ready, proxy, publish; see [`Step`]), each written to the
//! journal before (pending) and after (done) it runs. When a step fails, the
//! steps done so far and the failed one are undone in reverse, then the VM's
//! leftovers are destroyed and the row (with its allocations) is deleted.
//! At start, [`HostingService::recover`] undoes every create the journal shows
//! unfinished ("undo" rather than "finish": it needs nothing but the journal
//! and idempotent undos, and the user simply creates again) and finishes
//! every unfinished delete, before the API accepts work.
//!
//! It talks to the engine, network, proxy, seed writer and probes only through
//! [`ports`]; it never builds a command line, touches netlink or writes SQL.

pub mod alloc;
pub mod fakes;
pub mod keys;
pub mod ports;
pub mod probe;
pub mod seeder;
pub mod serve;
pub mod stats;
mod steps;

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::store::{Conflict, Hosting, NewHosting, StepState, Store, StoreError, User};

pub use keys::KeyError;
pub use ports::{PortError, Ports};
pub use stats::Histogram;
pub use steps::{Job, NotReady, Readiness, Step};

/// A hosting's status, as stored and shown to its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Creating,
    Running,
    Stopped,
    Deleting,
    /// Create or delete could not undo everything; DELETE tries again.
    Failed,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Creating,
        Status::Running,
        Status::Stopped,
        Status::Deleting,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Deleting => "deleting",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostingError {
    #[error("this account already has a hosting")]
    Exists,
    #[error("this account has no hosting")]
    NotFound,
    #[error("the hosting is {0} right now; try again when that is finished")]
    Busy(&'static str),
    #[error("the hosting is already {0}")]
    AlreadyInState(&'static str),
    #[error("no free guest address is left in the VM subnet")]
    SubnetFull,
    #[error("no free SSH port is left")]
    PortsFull,
    #[error("could not allocate an address and port after {0} attempts")]
    AllocContention(usize),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("creating the hosting failed at step {step}; everything it had done was undone")]
    StepFailed {
        step: &'static str,
        #[source]
        source: PortError,
    },
    #[error("{what} failed at step {step}, and undoing it did not finish; the hosting is marked failed")]
    RollbackFailed {
        what: &'static str,
        step: &'static str,
        #[source]
        source: PortError,
    },
    #[error("{action} the VM")]
    Vm {
        action: &'static str,
        #[source]
        source: PortError,
    },
    #[error("the create task ended before it finished")]
    TaskLost,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl HostingError {
    /// A readiness wait ran out of time (the guest did not come up).
    pub fn is_timeout(&self) -> bool {
        matches!(self, HostingError::StepFailed { source, .. } if source.is::<NotReady>())
    }
}

#[derive(Debug, Clone)]
pub struct HostingConfig {
    /// The login user in every guest.
    pub login_user: String,
    pub ssh_ports: RangeInclusive<u16>,
    pub ready: Readiness,
}

impl Default for HostingConfig {
    fn default() -> Self {
        HostingConfig {
            login_user: "ubuntu".into(),
            ssh_ports: 10000..=20000,
            ready: Readiness {
                timeout: Duration::from_secs(240),
                interval: Duration::from_millis(500),
            },
        }
    }
}

/// The result of a create: the row, and the private key when one was generated
/// (shown once, never stored).
#[derive(Debug, Clone)]
pub struct Created {
    pub hosting: Hosting,
    pub private_key: Option<String>,
}

/// What recovery did at start.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// vm_ids of unfinished creates that were undone.
    pub undone: Vec<String>,
    /// vm_ids of unfinished deletes that were finished.
    pub deleted: Vec<String>,
    /// vm_ids whose cleanup failed (left `failed`).
    pub failed: Vec<String>,
}

const ALLOC_ATTEMPTS: usize = 64;

pub struct HostingService {
    store: Store,
    ports: Ports,
    cfg: HostingConfig,
    busy: Mutex<HashSet<i64>>,
    tasks: Mutex<Vec<AbortHandle>>,
    create_durations: Histogram,
    /// Why the last create of a user failed (the row is gone, so a
    /// `?wait=false` caller learns it from here).
    last_failure: Mutex<std::collections::HashMap<i64, String>>,
}

/// Holds a hosting id in the busy set; only one start/stop/delete at a time.
struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<i64>>,
    id: i64,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.id);
        }
    }
}

impl HostingService {
    pub fn new(store: Store, ports: Ports, cfg: HostingConfig) -> Arc<HostingService> {
        Arc::new(HostingService {
            store,
            ports,
            cfg,
            busy: Mutex::new(HashSet::new()),
            tasks: Mutex::new(Vec::new()),
            create_durations: Histogram::new(stats::CREATE_BUCKETS),
            last_failure: Mutex::new(std::collections::HashMap::new()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    pub fn create_durations(&self) -> &Histogram {
        &self.create_durations
    }

    fn lock(&self, id: i64, what: &'static str) -> Result<BusyGuard<'_>, HostingError> {
        let mut set = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(id) {
            return Err(HostingError::Busy(what));
        }
        Ok(BusyGuard { set: &self.busy, id })
    }

    /// The steps' view of a hosting row.
    fn job(&self, h: &Hosting, username: &str, keys: Vec<String>) -> Job {
        let subnet = self.ports.network.subnet();
        let guest_ip = h.vm_ip.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        Job {
            hosting_id: h.id,
            user_id: h.user_id,
            username: username.to_owned(),
            login_user: self.cfg.login_user.clone(),
            keys,
            launch: ports::VmLaunch {
                vm_id: h.vm_id.clone(),
                tap_name: self.ports.network.tap_name(&h.vm_id),
                mac: h.mac.clone(),
                guest_ip,
                ssh_port: h.ssh_port,
                seed_iso: self.ports.engine.vm_dir(&h.vm_id).join("seed.iso"),
                labels: vec![
                    ("owner".into(), username.to_owned()),
                    ("user_id".into(), h.user_id.to_string()),
                    ("ip".into(), h.vm_ip.clone()),
                    ("ssh_port".into(), h.ssh_port.to_string()),
                ],
            },
            prefix_len: subnet.prefix_len(),
            gateway: self.ports.network.gateway(),
        }
    }

    /// Inserts the row with fresh allocations; a candidate another create
    /// took first is replaced by the next one.
    async fn allocate(&self, user_id: i64) -> Result<Hosting, HostingError> {
        let net = &self.ports.network;
        for _ in 0..ALLOC_ATTEMPTS {
            let used = self.store.used_allocations().await?;
            let ip = alloc::pick_ip(net.subnet(), &used.ips).ok_or(HostingError::SubnetFull)?;
            let port = alloc::pick_port(&self.cfg.ssh_ports, &used.ports, |p| net.port_is_free(p))
                .ok_or(HostingError::PortsFull)?;
            let vm_id = alloc::new_vm_id();
            let mac = alloc::mac_for(&vm_id);
            let new = NewHosting {
                user_id,
                vm_id: &vm_id,
                vm_ip: &ip.to_string(),
                mac: &mac,
                ssh_port: port,
                status: Status::Creating.as_str(),
            };
            match self.store.insert_hosting(&new).await {
                Ok(h) => return Ok(h),
                Err(StoreError::Conflict(Conflict::HostingForUser)) => {
                    return Err(HostingError::Exists);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(HostingError::AllocContention(ALLOC_ATTEMPTS))
    }

    /// Creates the user's hosting. The steps run in their own task, so a
    /// client that goes away cannot cut a create in half; with `wait` the
    /// call returns when the site and SSH answer, else right after the row
    /// exists (status `creating`).
    pub async fn create(
        self: &Arc<Self>,
        user: &User,
        ssh_key: Option<String>,
        wait: bool,
    ) -> Result<Created, HostingError> {
        let ssh_key = ssh_key.map(|k| keys::check(&k)).transpose()?;
        if self.store.hosting_by_user(user.id).await?.is_some() {
            return Err(HostingError::Exists);
        }
        // Keys are remembered on the account only once the create succeeded:
        // a generated key whose private half the user never got must not be
        // used again.
        let (keys, private_key) = match ssh_key {
            Some(k) => (vec![k], None),
            None => {
                let stored = self.store.ssh_keys(user.id).await?;
                if stored.is_empty() {
                    let (public, private) = keys::generate(&format!("{}@webhoster", user.username))?;
                    (vec![public], Some(private))
                } else {
                    (stored, None)
                }
            }
        };
        let hosting = self.allocate(user.id).await?;
        info!(vm_id = %hosting.vm_id, user_id = user.id, ip = %hosting.vm_ip, ssh_port = hosting.ssh_port, "create: allocated");
        let job = self.job(&hosting, &user.username, keys);
        self.failures().remove(&user.id);
        let this = Arc::clone(self);
        let handle = tokio::spawn(async move {
            let user_id = job.user_id;
            let result = this.run_create(job).await;
            if let Err(e) = &result {
                this.failures().insert(user_id, e.to_string());
            }
            result
        });
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            tasks.retain(|t| !t.is_finished());
            tasks.push(handle.abort_handle());
        }
        if !wait {
            return Ok(Created { hosting, private_key });
        }
        match handle.await {
            Ok(Ok(hosting)) => Ok(Created { hosting, private_key }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(HostingError::TaskLost),
        }
    }

    async fn run_create(&self, job: Job) -> Result<Hosting, HostingError> {
        let started = Instant::now();
        let id = job.hosting_id;
        let vm_id = job.launch.vm_id.clone();
        let mut touched: Vec<Step> = Vec::new();
        for step in Step::ALL {
            touched.push(step);
            let result = self.run_step(step, &job).await;
            if let Err(source) = result {
                warn!(vm_id = %vm_id, step = step.name(), error = %chain(&*source), "create failed; undoing");
                return match self.rollback(&job, &touched).await {
                    Ok(()) => Err(HostingError::StepFailed {
                        step: step.name(),
                        source,
                    }),
                    Err((undo_step, undo_err)) => {
                        warn!(vm_id = %vm_id, step = undo_step.name(), error = %chain(&*undo_err), "undo failed");
                        Err(HostingError::RollbackFailed {
                            what: "create",
                            step: step.name(),
                            source,
                        })
                    }
                };
            }
        }
        for key in &job.keys {
            self.store.add_ssh_key(job.user_id, key).await?;
        }
        self.store
            .set_hosting_state(id, Status::Running.as_str(), None, None)
            .await?;
        let took = started.elapsed();
        self.create_durations.observe(took.as_secs_f64());
        info!(vm_id = %vm_id, seconds = took.as_secs_f64(), "create: running");
        self.store.hosting_by_id(id).await?.ok_or(HostingError::NotFound)
    }

    /// Journals and runs one step. A journal write that fails fails the step.
    async fn run_step(&self, step: Step, job: &Job) -> Result<(), PortError> {
        let id = job.hosting_id;
        self.store
            .set_hosting_state(id, Status::Creating.as_str(), Some(step.name()), None)
            .await?;
        self.store
            .record_step(id, step.seq(), step.name(), StepState::Pending)
            .await?;
        steps::run(step, job, &self.ports, self.cfg.ready).await?;
        self.store
            .record_step(id, step.seq(), step.name(), StepState::Done)
            .await?;
        Ok(())
    }

    /// Undoes `touched` in reverse, destroys what is left of the VM and
    /// deletes the row. When an undo fails the row stays, marked failed, so
    /// nothing is forgotten: a later DELETE or restart tries again.
    async fn rollback(&self, job: &Job, touched: &[Step]) -> Result<(), (Step, PortError)> {
        let id = job.hosting_id;
        let _ = self
            .store
            .set_hosting_state(id, Status::Deleting.as_str(), None, None)
            .await;
        for step in touched.iter().rev() {
            if let Err(e) = steps::undo(*step, job, &self.ports).await {
                let msg = format!("undo of step {} failed", step.name());
                let _ = self
                    .store
                    .set_hosting_state(id, Status::Failed.as_str(), Some(step.name()), Some(&msg))
                    .await;
                return Err((*step, e));
            }
            let _ = self
                .store
                .record_step(id, step.seq(), step.name(), StepState::Undone)
                .await;
        }
        if let Err(e) = self.ports.engine.destroy(&job.launch.vm_id).await {
            let _ = self
                .store
                .set_hosting_state(
                    id,
                    Status::Failed.as_str(),
                    None,
                    Some("removing the VM directory failed"),
                )
                .await;
            return Err((Step::Seed, e));
        }
        self.store
            .delete_hosting(id)
            .await
            .map_err(|e| (Step::Seed, Box::new(e) as PortError))
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<i64, String>> {
        self.last_failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the user's last create failed, if it did (until the next create).
    pub fn last_failure(&self, user_id: i64) -> Option<String> {
        self.failures().get(&user_id).cloned()
    }

    pub async fn get(&self, user_id: i64) -> Result<Hosting, HostingError> {
        self.store
            .hosting_by_user(user_id)
            .await?
            .ok_or(HostingError::NotFound)
    }

    /// Removes the hosting and everything it held.
    pub async fn delete(&self, user_id: i64) -> Result<(), HostingError> {
        let h = self.get(user_id).await?;
        let _busy = self.lock(h.id, "busy")?;
        match Status::parse(&h.status) {
            Some(Status::Creating) => return Err(HostingError::Busy("being created")),
            Some(Status::Deleting) => return Err(HostingError::Busy("being deleted")),
            _ => {}
        }
        if !self
            .store
            .swap_hosting_status(h.id, &h.status, Status::Deleting.as_str())
            .await?
        {
            return Err(HostingError::Busy("changing"));
        }
        info!(vm_id = %h.vm_id, "delete");
        self.teardown(&h).await
    }

    /// Undoes every step (all undos are idempotent) and deletes the row.
    async fn teardown(&self, h: &Hosting) -> Result<(), HostingError> {
        let job = self.job(h, "", Vec::new());
        self.rollback(&job, &Step::ALL).await.map_err(|(step, source)| {
            warn!(vm_id = %h.vm_id, step = step.name(), error = %chain(&*source), "delete: undo failed");
            HostingError::RollbackFailed {
                what: "delete",
                step: step.name(),
                source,
            }
        })
    }

    /// Finishes or undoes what the journal shows unfinished. Call before the
    /// API accepts work.
    pub async fn recover(&self) -> Result<Recovery, HostingError> {
        let mut report = Recovery::default();
        for h in self.store.all_hostings().await? {
            let outcome = match Status::parse(&h.status) {
                Some(Status::Creating) => {
                    let journal = self.store.steps(h.id).await?;
                    let touched: Vec<Step> = journal
                        .iter()
                        .filter(|r| r.state != StepState::Undone)
                        .filter_map(|r| Step::parse(&r.step))
                        .collect();
                    info!(vm_id = %h.vm_id, steps = ?touched, "recovery: undoing an unfinished create");
                    let job = self.job(&h, "", Vec::new());
                    let r = self.rollback(&job, &touched).await;
                    (&mut report.undone, r)
                }
                Some(Status::Deleting) => {
                    info!(vm_id = %h.vm_id, "recovery: finishing an unfinished delete");
                    let job = self.job(&h, "", Vec::new());
                    (&mut report.deleted, self.rollback(&job, &Step::ALL).await)
                }
                _ => continue,
            };
            match outcome {
                (list, Ok(())) => list.push(h.vm_id.clone()),
                (_, Err((step, e))) => {
                    warn!(vm_id = %h.vm_id, step = step.name(), error = %chain(&*e), "recovery: undo failed");
                    report.failed.push(h.vm_id.clone());
                }
            }
        }
        Ok(report)
    }

    /// Follows the engine's state changes, so a guest powered off from
    /// inside shows `stopped` and one started again `running`. Only moves
    /// between running and stopped; creates, deletes and power calls in
    /// progress own their hosting's status.
    pub fn follow_engine(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        use tokio::sync::broadcast::error::RecvError;
        let mut events = self.ports.engine.subscribe()?;
        let this = Arc::clone(self);
        Some(tokio::spawn(async move {
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(RecvError::Lagged(n)) => {
                        warn!(missed = n, "engine events lagged");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                let (from, to) = match ev.state {
                    ports::VmRunState::Running => (Status::Stopped, Status::Running),
                    ports::VmRunState::Stopped => (Status::Running, Status::Stopped),
                    ports::VmRunState::Failed => (Status::Running, Status::Failed),
                    ports::VmRunState::Other => continue,
                };
                match this
                    .store
                    .swap_status_by_vm(&ev.vm_id, from.as_str(), to.as_str())
                    .await
                {
                    Ok(true) => info!(vm_id = %ev.vm_id, status = to.as_str(), "status follows the engine"),
                    Ok(false) => {}
                    Err(e) => warn!(vm_id = %ev.vm_id, error = %chain(&e), "recording an engine event"),
                }
            }
        }))
    }

    /// Aborts in-flight create tasks where they stand, journal as written:
    /// what a crash does. Used by tests and at the end of shutdown.
    pub fn abort_creates(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
    }

    /// Creates still running.
    pub fn creates_in_flight(&self) -> usize {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.iter().filter(|t| !t.is_finished()).count()
    }

    async fn power(&self, user_id: i64, action: Power) -> Result<Hosting, HostingError> {
        let h = self.get(user_id).await?;
        let _busy = self.lock(h.id, "busy")?;
        let status = Status::parse(&h.status);
        let (allowed, target) = match action {
            Power::Start => (status == Some(Status::Stopped), Status::Running),
            Power::Stop => (status == Some(Status::Running), Status::Stopped),
            Power::Restart => (
                matches!(status, Some(Status::Running | Status::Stopped)),
                Status::Running,
            ),
        };
        if !allowed {
            return Err(match status {
                Some(s @ (Status::Running | Status::Stopped)) => HostingError::AlreadyInState(s.as_str()),
                Some(Status::Creating) => HostingError::Busy("being created"),
                Some(Status::Deleting) => HostingError::Busy("being deleted"),
                _ => HostingError::Busy("failed; delete it and create it again"),
            });
        }
        let job = self.job(&h, "", Vec::new());
        let engine = &self.ports.engine;
        let (verb, result) = match action {
            Power::Start => ("starting", engine.spawn(&job.launch).await),
            Power::Stop => ("stopping", engine.stop(&h.vm_id).await),
            Power::Restart => ("restarting", engine.restart(&job.launch).await),
        };
        result.map_err(|source| {
            warn!(vm_id = %h.vm_id, error = %chain(&*source), "{verb} failed");
            HostingError::Vm { action: verb, source }
        })?;
        info!(vm_id = %h.vm_id, "{verb}: done");
        self.store
            .set_hosting_state(h.id, target.as_str(), None, None)
            .await?;
        self.get(user_id).await
    }

    pub async fn start(&self, user_id: i64) -> Result<Hosting, HostingError> {
        self.power(user_id, Power::Start).await
    }

    pub async fn stop(&self, user_id: i64) -> Result<Hosting, HostingError> {
        self.power(user_id, Power::Stop).await
    }

    pub async fn restart(&self, user_id: i64) -> Result<Hosting, HostingError> {
        self.power(user_id, Power::Restart).await
    }

    /// The last `lines` lines of the VM's serial console (at most the last
    /// 256 KiB of the log are read).
    pub async fn console(&self, user_id: i64, lines: usize) -> Result<String, HostingError> {
        let h = self.get(user_id).await?;
        let path = self.ports.engine.serial_log(&h.vm_id);
        Ok(tail(&path, lines, 256 * 1024).await)
    }
}

#[derive(Debug, Clone, Copy)]
enum Power {
    Start,
    Stop,
    Restart,
}

/// The error and its sources on one line, for logs.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

async fn tail(path: &std::path::Path, lines: usize, max_bytes: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return String::new();
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max_bytes);
    if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if file.take(max_bytes).read_to_end(&mut buf).await.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    // A cut first line is partial; drop it when we did not start at 0.
    let skip_partial = usize::from(start > 0 && all.len() > lines);
    let from = all.len().saturating_sub(lines).max(skip_partial);
    all[from..].join("\n")
}
