//! hosting: the orchestrator, and the policy of a hosting's life.
//!
//! - **Create** is a list of steps (seed, disk, tap, forward, proxy, spawn,
//!   ready, publish; see [`Step`]), each written to the journal before
//!   (pending) and after (done) it runs. When a step fails, or the task
//!   panics, or the store fails after the VM started, the steps are undone
//!   in reverse; an undo that fails does not stop the others.
//! - **Convergence** ([`converge`]) brings every hosting to what its user
//!   asked for (`desired`), ensuring each resource (tap, SSH forward, QEMU,
//!   nginx site): created if missing, adopted if present. It runs at start,
//!   every few seconds, and for start, stop and restart, so a host reboot, a
//!   `teardown`, or one vanished tap is repaired rather than refused.
//! - **Recovery** at start undoes the creates the journal shows unfinished
//!   and finishes the deletes; the **reaper** ([`reaper`]) removes what
//!   belongs to no hosting.
//!
//! Every state change goes through [`HostingState::transition`] and is
//! stored with a compare-and-set, so two tasks cannot both move a hosting.
//! It talks to the engine, network, proxy, seed writer and probes only
//! through [`ports`]; it never builds a command line, touches netlink or
//! writes SQL.

pub mod admission;
pub mod alloc;
pub mod backups;
pub mod converge;
pub mod looks;
pub mod pool;
pub mod ports;
pub mod probe;
pub mod reaper;
pub mod seeder;
pub mod state;
pub mod stats;
pub mod steps;

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::OwnedMutexGuard;
use tokio::task::AbortHandle;
use tracing::{Instrument, info, warn};

use crate::auth::{KeyError, SshPublicKey};
use crate::store::{Conflict, Hosting, NewHosting, StepState, Store, StoreError, User};

pub use ports::{PortError, Ports};
pub use state::{Desired, HostingState, InvalidTransition};
pub use stats::{CreateMetrics, Histogram};
pub use steps::{CreatePath, Job, NotReady, Readiness, Step};

#[derive(Debug, thiserror::Error)]
pub enum HostingError {
    #[error("this account already has a hosting")]
    Exists,
    #[error("this account has no hosting")]
    NotFound,
    #[error("the hosting is {0} right now; try again when that is finished")]
    Busy(&'static str),
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
    #[error(
        "{what} failed at step {step}, and some parts could not be removed yet ({left}); \
         webhoster keeps trying"
    )]
    RollbackFailed {
        what: &'static str,
        step: &'static str,
        left: String,
        #[source]
        source: PortError,
    },
    #[error("{action} the VM")]
    Vm {
        action: &'static str,
        #[source]
        source: PortError,
    },
    #[error("the hosting was deleted while it was being created")]
    Cancelled,
    #[error("this host has no room for another hosting right now: {0}")]
    Capacity(String),
    #[error("the VM is {0}; it must be running")]
    NotRunning(&'static str),
    #[error("this hosting has no such backup")]
    NoBackup,
    #[error("the host's disk has no room for this backup: {0}")]
    NoRoom(String),
    #[error("the create task ended before it finished; everything it had done was undone")]
    TaskLost,
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl HostingError {
    /// A readiness wait ran out of time (the guest did not come up).
    pub fn is_timeout(&self) -> bool {
        match self {
            HostingError::StepFailed { source, .. } | HostingError::Vm { source, .. } => {
                matches!(source, PortError::NotReady(_))
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HostingConfig {
    /// The login user in every guest.
    pub login_user: String,
    pub ssh_ports: RangeInclusive<u16>,
    pub ready: Readiness,
    /// How often convergence looks at every hosting.
    pub converge_every: Duration,
    /// What the host may give to hostings, and the create queue's bounds.
    pub budget: admission::Budget,
    /// Complete backups kept per hosting; older ones are deleted.
    pub backups_keep: usize,
    /// Warm clones kept ready (`--warm-pool`); 0: every create boots cold.
    pub warm_pool: usize,
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
            converge_every: converge::INTERVAL,
            budget: admission::Budget::UNLIMITED,
            backups_keep: backups::DEFAULT_KEEP,
            warm_pool: 0,
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
    /// vm_ids whose cleanup did not finish (left `deleting`, retried).
    pub failed: Vec<String>,
    /// Backups a crash left unfinished, removed.
    pub backups_dropped: Vec<i64>,
}

const ALLOC_ATTEMPTS: usize = 64;

/// How long a warm clone may take to answer once personalised before the
/// create gives up on it and boots cold: seconds when all is well, so a
/// minute means something is wrong with the clone, not the host.
const WARM_READY: Duration = Duration::from_secs(60);
const WARM_PROBE_EVERY: Duration = Duration::from_millis(100);

pub struct HostingService {
    store: Store,
    ports: Ports,
    cfg: HostingConfig,
    /// One operation per hosting at a time (create, delete, start, stop,
    /// restart, a convergence pass); the others wait or skip.
    locks: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// Creates in flight, by hosting id: a DELETE aborts them.
    creates: Mutex<HashMap<i64, AbortHandle>>,
    create_metrics: CreateMetrics,
    queue: admission::Queue,
    pool: pool::Pool,
    /// Why the last create of a user failed (the row is gone, so a
    /// `?wait=false` caller learns it from here).
    last_failure: Mutex<HashMap<i64, String>>,
    /// Backups being taken, by hosting id: their job's progress.
    backups_running: Mutex<HashMap<i64, tokio::sync::watch::Receiver<ports::BackupProgress>>>,
    /// What convergence's looks at each VM's doors found lately.
    looks: Mutex<looks::Looks>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The span every log line about one VM is written in.
pub fn vm_span(vm_id: &str) -> tracing::Span {
    tracing::info_span!("vm", vm_id = %vm_id)
}

impl HostingService {
    pub fn new(store: Store, ports: Ports, cfg: HostingConfig) -> Arc<HostingService> {
        Arc::new(HostingService {
            queue: admission::Queue::new(&cfg.budget),
            pool: pool::Pool::new(cfg.warm_pool),
            store,
            ports,
            cfg,
            locks: Mutex::new(HashMap::new()),
            creates: Mutex::new(HashMap::new()),
            create_metrics: CreateMetrics::default(),
            last_failure: Mutex::new(HashMap::new()),
            backups_running: Mutex::new(HashMap::new()),
            looks: Mutex::new(looks::Looks::default()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    pub fn create_metrics(&self) -> &CreateMetrics {
        &self.create_metrics
    }

    fn lock_of(&self, id: i64) -> Arc<tokio::sync::Mutex<()>> {
        locked(&self.locks).entry(id).or_default().clone()
    }

    /// Waits for the hosting's turn.
    async fn lock(&self, id: i64) -> OwnedMutexGuard<()> {
        self.lock_of(id).lock_owned().await
    }

    /// The user's hosting, re-read once its turn is held, for an action on
    /// a VM that exists (power, restore): refused while it is created or
    /// deleted.
    async fn turn_to_operate(&self, user_id: i64) -> Result<(OwnedMutexGuard<()>, Hosting), HostingError> {
        let h = self.get(user_id).await?;
        match h.state {
            HostingState::Creating => return Err(HostingError::Busy("being created")),
            HostingState::Deleting => return Err(HostingError::Busy("being deleted")),
            _ => {}
        }
        let turn = self.lock(h.id).await;
        let h = self
            .store
            .hosting_by_id(h.id)
            .await?
            .ok_or(HostingError::NotFound)?;
        Ok((turn, h))
    }

    /// The hosting's turn if nobody has it (convergence skips busy hostings).
    fn try_lock(&self, id: i64) -> Option<OwnedMutexGuard<()>> {
        self.lock_of(id).try_lock_owned().ok()
    }

    fn forget_lock(&self, id: i64) {
        locked(&self.locks).remove(&id);
    }

    /// Moves `h` to `to` (checked by the state machine, stored only if no
    /// other task moved it first), with the step and last error to show.
    pub(crate) async fn set_state(
        &self,
        h: &mut Hosting,
        to: HostingState,
        step: Option<Step>,
        error: Option<&str>,
    ) -> Result<(), HostingError> {
        if h.state != to {
            h.state.transition(to)?;
        }
        let Some(at) = self.store.swap_state(h.id, h.state, to, step, error).await? else {
            return Err(HostingError::Busy("changing"));
        };
        if h.state != to {
            info!(vm_id = %h.vm_id, from = %h.state, to = %to, error, "hosting state");
            h.state_since.clone_from(&at);
        }
        h.updated_at = at;
        h.state = to;
        h.step = step;
        h.last_error = error.map(str::to_owned);
        Ok(())
    }

    /// The steps' view of a hosting row.
    fn job(&self, h: &Hosting, username: &str, keys: Vec<SshPublicKey>, path: CreatePath) -> Job {
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
            path,
        }
    }

    /// A job for convergence and teardown: the owner's name (for the site and
    /// the labels) comes from the account.
    async fn job_for(&self, h: &Hosting) -> Result<Job, HostingError> {
        let username = self
            .store
            .user_by_id(h.user_id)
            .await?
            .map(|u| u.username)
            .unwrap_or_default();
        Ok(self.job(h, &username, Vec::new(), CreatePath::Cold))
    }

    /// Inserts the row with fresh allocations (the vm_id of a warm clone
    /// when one was taken); a candidate another create took first is
    /// replaced by the next one.
    async fn allocate(&self, user_id: i64, clone: Option<&pool::WarmClone>) -> Result<Hosting, HostingError> {
        let net = &self.ports.network;
        for _ in 0..ALLOC_ATTEMPTS {
            let used = self.store.used_allocations().await?;
            let ip = alloc::pick_ip(net.subnet(), &used.ips).ok_or(HostingError::SubnetFull)?;
            let port = alloc::pick_port(&self.cfg.ssh_ports, &used.ports, |p| net.port_is_free(p))
                .ok_or(HostingError::PortsFull)?;
            let vm_id = clone.map_or_else(alloc::new_vm_id, |c| c.vm_id.clone());
            let mac = alloc::mac_for(&vm_id);
            let new = NewHosting {
                user_id,
                vm_id: &vm_id,
                vm_ip: &ip.to_string(),
                mac: &mac,
                ssh_port: port,
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
    /// call returns when the guest's first boot is over and the site and SSH
    /// answer, else right after the row exists (status `creating`).
    pub async fn create(
        self: &Arc<Self>,
        user: &User,
        ssh_key: Option<SshPublicKey>,
        wait: bool,
    ) -> Result<Created, HostingError> {
        if self.store.hosting_by_user(user.id).await?.is_some() {
            return Err(HostingError::Exists);
        }
        let hostings: i64 = self.store.count_by_status().await?.iter().map(|(_, n)| n).sum();
        let hostings = u64::try_from(hostings).unwrap_or(0);
        let free_disk = self.ports.system.free_disk().await;
        if let Some(why) = self.cfg.budget.refuse(hostings, free_disk) {
            warn!(user_id = user.id, %why, "create refused: no capacity");
            return Err(HostingError::Capacity(why));
        }
        // Keys are remembered on the account only once the create succeeded:
        // a generated key whose private half the user never got must not be
        // used again.
        let (keys, private_key) = match ssh_key {
            Some(k) => (vec![k], None),
            None => {
                // Stored keys were checked when stored; one that no longer
                // passes (a stricter policy) is left out, not trusted.
                let stored: Vec<SshPublicKey> = self
                    .store
                    .ssh_keys(user.id)
                    .await?
                    .iter()
                    .filter_map(|line| SshPublicKey::parse(line).ok())
                    .collect();
                if stored.is_empty() {
                    let (public, private) = SshPublicKey::generate(&format!("{}@webhoster", user.username))?;
                    (vec![public], Some(private))
                } else {
                    (stored, None)
                }
            }
        };
        let claim = self.pool.take();
        let hosting = self
            .allocate(user.id, claim.as_ref().map(|c| c.warm_clone()))
            .await?;
        // The row holds the clone's vm_id: from here it is the hosting's
        // (no await in between, so a caller that goes away cannot put it
        // back into the pool under a row).
        let path = match claim {
            Some(claim) => {
                claim.handed_over();
                CreatePath::Warm
            }
            None => CreatePath::Cold,
        };
        let span = vm_span(&hosting.vm_id);
        info!(parent: &span, user_id = user.id, ip = %hosting.vm_ip, ssh_port = hosting.ssh_port, %path, "create: allocated");
        let job = self.job(&hosting, &user.username, keys, path);
        locked(&self.last_failure).remove(&user.id);
        // Taken before the task exists, so a DELETE that comes right after
        // the 202 waits for (and cancels) this create rather than racing it.
        let turn = self.lock(hosting.id).await;
        let this = Arc::clone(self);
        let handle = tokio::spawn(
            async move {
                let _turn = turn;
                let (id, user_id) = (job.hosting_id, job.user_id);
                let result = this.create_guarded(job).await;
                if let Err(e) = &result {
                    locked(&this.last_failure).insert(user_id, e.to_string());
                }
                locked(&this.creates).remove(&id);
                result
            }
            .instrument(span),
        );
        locked(&self.creates).insert(hosting.id, handle.abort_handle());
        if !wait {
            return Ok(Created { hosting, private_key });
        }
        match handle.await {
            Ok(Ok(hosting)) => Ok(Created { hosting, private_key }),
            Ok(Err(e)) => Err(e),
            Err(e) if e.is_cancelled() => Err(HostingError::Cancelled),
            Err(_) => Err(HostingError::TaskLost),
        }
    }

    /// Runs the create; whatever ends it early (a step's error, a store
    /// error after the VM started, a panic) ends in a rollback, never in
    /// `creating` forever.
    async fn create_guarded(&self, job: Job) -> Result<Hosting, HostingError> {
        let mut touched: Vec<Step> = Vec::new();
        let run = std::panic::AssertUnwindSafe(self.run_create(&job, &mut touched)).catch_unwind();
        let (failure, step) = match run.await {
            Ok(Ok(hosting)) => return Ok(hosting),
            Ok(Err(CreateFailure::Step(step, source))) => (Ok(source), step),
            Ok(Err(CreateFailure::After(e))) => {
                warn!(error = %chain(&e), "create: finishing failed after every step ran; undoing");
                (Err(e), Step::Publish)
            }
            Err(_) => {
                warn!("create: the task panicked; undoing");
                (
                    Err(HostingError::TaskLost),
                    *touched.last().unwrap_or(&Step::Seed),
                )
            }
        };
        let undo: &[Step] = if failure.is_ok() { &touched } else { &Step::ALL };
        // The reason is known before the rollback deletes the row: a GET in
        // between finds it instead of a bare 404. The final error replaces it.
        let reason = match &failure {
            Ok(source) => format!(
                "creating the hosting failed at step {}: {}",
                step.name(),
                chain(source)
            ),
            Err(e) => e.to_string(),
        };
        locked(&self.last_failure).insert(job.user_id, reason);
        let rolled = self.rollback(&job, undo).await;
        match (failure, rolled) {
            (Ok(source), Ok(())) => Err(HostingError::StepFailed {
                step: step.name(),
                source,
            }),
            (Err(e), Ok(())) => Err(e),
            (Ok(source), Err(left)) => Err(HostingError::RollbackFailed {
                what: "create",
                step: step.name(),
                left,
                source,
            }),
            (Err(e), Err(left)) => Err(HostingError::RollbackFailed {
                what: "create",
                step: step.name(),
                left,
                source: PortError::Probe(e.to_string()),
            }),
        }
    }

    async fn run_create(&self, job: &Job, touched: &mut Vec<Step>) -> Result<Hosting, CreateFailure> {
        let started = Instant::now();
        let id = job.hosting_id;
        // The queue bounds boots. A warm create boots nothing, and the pool
        // bounds how many run: it queues only if it falls back to cold.
        let mut slot = match job.path {
            CreatePath::Cold => Some(self.admit(id).await?),
            CreatePath::Warm => None,
        };
        let mut h = self
            .store
            .hosting_by_id(id)
            .await
            .map_err(|e| CreateFailure::After(e.into()))?
            .ok_or(CreateFailure::After(HostingError::NotFound))?;
        let mut path = job.path;
        let mut timings: Vec<(Step, f64)> = Vec::with_capacity(Step::PER_CREATE);
        loop {
            match self.run_path(&mut h, path, job, touched, &mut timings).await {
                Ok(()) => break,
                Err((step, source)) if path == CreatePath::Warm => {
                    // A pool problem never fails a create: the clone goes, and
                    // the same row boots cold.
                    warn!(step = step.name(), error = %chain(&source), "create: the warm clone failed; discarding it and booting cold");
                    self.create_metrics.fell_back();
                    self.pool.count_discard();
                    self.discard_warm(job, touched).await;
                    timings.clear();
                    path = CreatePath::Cold;
                    if slot.is_none() {
                        slot = Some(self.admit(id).await?);
                    }
                }
                Err((step, source)) => {
                    warn!(step = step.name(), error = %chain(&source), "create failed; undoing");
                    return Err(CreateFailure::Step(step, source));
                }
            }
        }
        let finish = async {
            for key in &job.keys {
                self.store.add_ssh_key(job.user_id, key.as_str()).await?;
            }
            self.set_state(&mut h, HostingState::Running, None, None).await
        };
        finish.await.map_err(CreateFailure::After)?;
        // `publish` just read its SSH banner.
        self.ssh_answered(&h.vm_id);
        drop(slot);
        let took = started.elapsed();
        self.create_metrics.observe_create(path, took.as_secs_f64());
        for (step, seconds) in &timings {
            self.create_metrics.observe_step(path, *step, *seconds);
        }
        let steps: Vec<String> = timings
            .iter()
            .map(|(step, s)| format!("{} {:.2}", step.name(), s))
            .collect();
        info!(%path, seconds = took.as_secs_f64(), steps = %steps.join(", "), "create: running");
        Ok(h)
    }

    /// A turn in the create queue for hosting `id`, held until dropped.
    async fn admit(&self, id: i64) -> Result<tokio::sync::OwnedSemaphorePermit, CreateFailure> {
        let started = Instant::now();
        let slot = self
            .queue
            .admit(id)
            .await
            .map_err(|admission::QueueTimeout(waited)| {
                CreateFailure::After(HostingError::Capacity(format!(
                    "the create waited {} s for its turn",
                    waited.as_secs()
                )))
            })?;
        let queued = started.elapsed();
        if queued > Duration::from_secs(1) {
            info!(
                seconds = queued.as_secs_f64(),
                "create: admitted after waiting in the queue"
            );
        }
        Ok(slot)
    }

    /// Runs the steps of `path`, recording each one's time. The error names
    /// the step that failed.
    async fn run_path(
        &self,
        h: &mut Hosting,
        path: CreatePath,
        job: &Job,
        touched: &mut Vec<Step>,
        timings: &mut Vec<(Step, f64)>,
    ) -> Result<(), (Step, PortError)> {
        let ready = match path {
            CreatePath::Cold => self.cfg.ready,
            // A clone answers within a second of its agent: probe often.
            CreatePath::Warm => Readiness {
                timeout: self.cfg.ready.timeout.min(WARM_READY),
                interval: self.cfg.ready.interval.min(WARM_PROBE_EVERY),
            },
        };
        let steps = path.steps();
        let mut i = 0;
        while let Some(&step) = steps.get(i) {
            if path.overlaps_next(step)
                && let Some(&next) = steps.get(i + 1)
            {
                let pair = [step, next];
                touched.extend(pair);
                timings.extend(self.run_together(pair, h, path, job, ready).await?);
                i += 2;
                continue;
            }
            touched.push(step);
            let at = Instant::now();
            self.begin_step(h, step, job).await.map_err(|e| (step, e))?;
            steps::run(step, path, job, &self.ports, ready)
                .await
                .map_err(|e| (step, e))?;
            self.end_step(step, job).await.map_err(|e| (step, e))?;
            timings.push((step, at.elapsed().as_secs_f64()));
            i += 1;
        }
        Ok(())
    }

    /// Runs two steps at once (both journalled; the row shows the second)
    /// and returns their times. The error is the first of the two to fail,
    /// in step order.
    async fn run_together(
        &self,
        pair: [Step; 2],
        h: &mut Hosting,
        path: CreatePath,
        job: &Job,
        ready: Readiness,
    ) -> Result<Vec<(Step, f64)>, (Step, PortError)> {
        for step in pair {
            self.begin_step(h, step, job).await.map_err(|e| (step, e))?;
        }
        let timed = |step| async move {
            let at = Instant::now();
            let result = steps::run(step, path, job, &self.ports, ready).await;
            (step, result, at.elapsed().as_secs_f64())
        };
        let (first, second) = tokio::join!(timed(pair[0]), timed(pair[1]));
        let mut timings = Vec::with_capacity(2);
        for (step, result, seconds) in [first, second] {
            result.map_err(|e| (step, e))?;
            self.end_step(step, job).await.map_err(|e| (step, e))?;
            timings.push((step, seconds));
        }
        Ok(timings)
    }

    /// Undoes what the warm steps did and removes the clone's VM, leaving
    /// the row for the cold path. What could not be undone stays in
    /// `touched`, for the final rollback if the cold path fails too.
    async fn discard_warm(&self, job: &Job, touched: &mut Vec<Step>) {
        let mut left = Vec::new();
        for step in touched.iter().rev() {
            match steps::undo(*step, job, &self.ports).await {
                Ok(()) => {
                    let _ = self
                        .store
                        .record_step(job.hosting_id, step.seq(), step.name(), StepState::Undone)
                        .await;
                }
                Err(e) => {
                    warn!(step = step.name(), error = %chain(&e), "discarding the warm clone: undo failed");
                    left.push(*step);
                }
            }
        }
        if let Err(e) = self.ports.engine.destroy(&job.launch.vm_id).await {
            warn!(error = %chain(&e), "discarding the warm clone: removing its VM");
        }
        left.reverse();
        *touched = left;
    }

    /// The row shows `step` and the journal has it pending. A store write
    /// that fails fails the step.
    async fn begin_step(&self, h: &mut Hosting, step: Step, job: &Job) -> Result<(), PortError> {
        self.set_state(h, HostingState::Creating, Some(step), None)
            .await
            .map_err(|e| match e {
                HostingError::Store(e) => PortError::Store(e),
                other => PortError::Probe(other.to_string()),
            })?;
        self.store
            .record_step(job.hosting_id, step.seq(), step.name(), StepState::Pending)
            .await?;
        Ok(())
    }

    async fn end_step(&self, step: Step, job: &Job) -> Result<(), PortError> {
        self.store
            .record_step(job.hosting_id, step.seq(), step.name(), StepState::Done)
            .await?;
        Ok(())
    }

    /// Undoes `touched` in reverse, going on past an undo that fails,
    /// destroys what is left of the VM and deletes the row. When something
    /// could not be removed the row stays `deleting` with what is left as its
    /// last error, and convergence tries again; the error names what is left.
    async fn rollback(&self, job: &Job, touched: &[Step]) -> Result<(), String> {
        let id = job.hosting_id;
        let mut h = match self.store.hosting_by_id(id).await {
            Ok(Some(h)) => Some(h),
            Ok(None) => None,
            Err(e) => {
                warn!(error = %chain(&e), "rollback: reading the row");
                None
            }
        };
        if let Some(h) = h.as_mut()
            && h.state != HostingState::Deleting
            && let Err(e) = self.set_state(h, HostingState::Deleting, None, None).await
        {
            warn!(error = %chain(&e), "rollback: marking the hosting deleting");
        }
        let mut left: Vec<String> = Vec::new();
        for step in touched.iter().rev() {
            match steps::undo(*step, job, &self.ports).await {
                Ok(()) => {
                    let _ = self
                        .store
                        .record_step(id, step.seq(), step.name(), StepState::Undone)
                        .await;
                }
                Err(e) => {
                    warn!(step = step.name(), error = %chain(&e), "undo failed; going on with the others");
                    left.push(format!("{}: {}", step.name(), chain(&e)));
                }
            }
        }
        if let Err(e) = self.ports.engine.destroy(&job.launch.vm_id).await {
            warn!(error = %chain(&e), "removing the VM directory failed");
            left.push(format!("vm directory: {}", chain(&e)));
        }
        if left.is_empty() {
            match self.store.delete_hosting(id).await {
                Ok(()) => {
                    self.forget_lock(id);
                    locked(&self.looks).forget(&job.launch.vm_id);
                    return Ok(());
                }
                Err(e) => left.push(format!("row: {}", chain(&e))),
            }
        }
        let left = left.join("; ");
        if let Some(h) = h.as_mut() {
            let _ = self
                .set_state(
                    h,
                    HostingState::Deleting,
                    None,
                    Some(&format!("left to remove: {left}")),
                )
                .await;
        }
        Err(left)
    }

    /// The place of hosting `id` in the create queue, while it waits.
    pub fn queue_position(&self, id: i64) -> Option<usize> {
        self.queue.position(id)
    }

    /// Why the user's last create failed, if it did (until the next create).
    pub fn last_failure(&self, user_id: i64) -> Option<String> {
        locked(&self.last_failure).get(&user_id).cloned()
    }

    pub async fn get(&self, user_id: i64) -> Result<Hosting, HostingError> {
        self.store
            .hosting_by_user(user_id)
            .await?
            .ok_or(HostingError::NotFound)
    }

    /// Removes the hosting and everything it held. Always possible: a create
    /// in flight is cancelled first, and a hosting whose cleanup failed
    /// before is cleaned again.
    pub async fn delete(&self, user_id: i64) -> Result<(), HostingError> {
        let h = self.get(user_id).await?;
        if let Some(create) = locked(&self.creates).remove(&h.id) {
            info!(vm_id = %h.vm_id, "delete: cancelling the create in flight");
            create.abort();
        }
        let _turn = self.lock(h.id).await;
        // Re-read: the create may have finished or rolled back meanwhile.
        let Some(mut h) = self.store.hosting_by_id(h.id).await? else {
            return Ok(());
        };
        if h.state != HostingState::Deleting {
            self.set_state(&mut h, HostingState::Deleting, None, None).await?;
        }
        info!(vm_id = %h.vm_id, "delete");
        self.teardown(&h)
            .instrument(vm_span(&h.vm_id))
            .await
            .map_err(|(left, source)| HostingError::RollbackFailed {
                what: "delete",
                step: "teardown",
                left,
                source,
            })
    }

    /// Undoes every step (all undos are idempotent) and deletes the row.
    async fn teardown(&self, h: &Hosting) -> Result<(), (String, PortError)> {
        let job = self.job(h, "", Vec::new(), CreatePath::Cold);
        self.rollback(&job, &Step::ALL).await.map_err(|left| {
            warn!(%left, "teardown: not everything could be removed yet");
            (left.clone(), PortError::Probe(left))
        })
    }

    /// Finishes or undoes what the journal shows unfinished. Call before the
    /// API accepts work.
    pub async fn recover(&self) -> Result<Recovery, HostingError> {
        let mut report = Recovery::default();
        for h in self.store.all_hostings().await? {
            let span = vm_span(&h.vm_id);
            let job = self.job(&h, "", Vec::new(), CreatePath::Cold);
            let (list, result) = match h.state {
                HostingState::Creating => {
                    let journal = self.store.steps(h.id).await?;
                    let touched: Vec<Step> = journal
                        .iter()
                        .filter(|r| r.state != StepState::Undone)
                        .filter_map(|r| Step::parse(&r.step))
                        .collect();
                    info!(parent: &span, steps = ?touched, "recovery: undoing an unfinished create");
                    let r = self.rollback(&job, &touched).instrument(span).await;
                    (&mut report.undone, r)
                }
                HostingState::Deleting => {
                    info!(parent: &span, "recovery: finishing an unfinished delete");
                    let r = self.rollback(&job, &Step::ALL).instrument(span).await;
                    (&mut report.deleted, r)
                }
                _ => continue,
            };
            match result {
                Ok(()) => list.push(h.vm_id.clone()),
                Err(left) => {
                    warn!(vm_id = %h.vm_id, %left, "recovery: cleanup did not finish");
                    report.failed.push(h.vm_id.clone());
                }
            }
        }
        report.backups_dropped = self.recover_backups().await?;
        Ok(report)
    }

    /// Aborts in-flight create tasks where they stand, journal as written:
    /// what a crash does. Used by tests and at the end of shutdown.
    pub fn abort_creates(&self) {
        for (_, t) in std::mem::take(&mut *locked(&self.creates)) {
            t.abort();
        }
    }

    /// Creates still running.
    pub fn creates_in_flight(&self) -> usize {
        locked(&self.creates)
            .values()
            .filter(|t| !t.is_finished())
            .count()
    }

    /// Start: the hosting should run. Whatever is missing is put back (tap,
    /// forward, site, QEMU); returns once the site and SSH answer.
    pub async fn start(&self, user_id: i64) -> Result<Hosting, HostingError> {
        self.power(user_id, converge::Power::Start).await
    }

    /// Stop: ACPI power-down, a bounded wait, then quit. Idempotent.
    pub async fn stop(&self, user_id: i64) -> Result<Hosting, HostingError> {
        self.power(user_id, converge::Power::Stop).await
    }

    /// Restart: a clean stop, then start as above.
    pub async fn restart(&self, user_id: i64) -> Result<Hosting, HostingError> {
        self.power(user_id, converge::Power::Restart).await
    }

    async fn power(&self, user_id: i64, action: converge::Power) -> Result<Hosting, HostingError> {
        let (_turn, h) = self.turn_to_operate(user_id).await?;
        let vm_id = h.vm_id.clone();
        self.power_locked(h, action).instrument(vm_span(&vm_id)).await
    }

    /// The last `lines` lines of the VM's serial console (at most the last
    /// 256 KiB of the log and of its newest rotated generation are read).
    pub async fn console(&self, user_id: i64, lines: usize) -> Result<String, HostingError> {
        const MAX_BYTES: u64 = 256 * 1024;
        let h = self.get(user_id).await?;
        let path = self.ports.engine.serial_log(&h.vm_id);
        let newest = tail(&path, lines, MAX_BYTES).await;
        let have = newest.lines().count();
        if have >= lines {
            return Ok(newest);
        }
        // Just rotated: the lines before are in `.1`.
        let older = tail(&crate::logfile::generation(&path, 1), lines - have, MAX_BYTES).await;
        Ok([older, newest]
            .into_iter()
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

/// How a create ended early.
enum CreateFailure {
    /// A step failed: undo the steps touched so far.
    Step(Step, PortError),
    /// Every step ran, then recording the result failed: undo them all.
    After(HostingError),
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
