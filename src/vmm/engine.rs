//! The engine: per-VM lifecycle operations (create disk, start, stop,
//! restart, destroy, reattach), each serialized per VM, and the in-memory
//! view of every VM it knows. Supervision after start lives in
//! `supervisor.rs`. Never trusts memory about a process: a pid counts only
//! when `/proc/<pid>/cmdline` shows our `-name <vm_id>`.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::accel::{self, AccelChoice};
use super::cmdline::{self, CmdlineConfig, Nic};
use super::dir::{self, VmDir};
use super::qmp::{self, QmpClient, QmpEvent};
use super::{
    EngineOptions, ReattachOutcome, RestartPolicy, TapOpener, VmEvent, VmNet, VmSpec, VmState, VmStatus,
    VmmError,
};

/// How long a spawned QEMU may take to answer QMP. QEMU itself needs well
/// under a second (no guest boot involved); the margin is for a loaded host.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// After `quit` or SIGKILL, how long until the process must be gone.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// Default graceful-stop timeout used by `restart`: a Debian guest under TCG
/// powers off in a few seconds; past this we `quit`.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Operator passthrough commands get this long (they may wait for another
/// operator connection to end first).
pub const OPERATOR_QMP_TIMEOUT: Duration = Duration::from_secs(10);

static TCG_WARNING: Once = Once::new();

/// The VM engine. Dropping it stops supervision but leaves every QEMU
/// running (a new engine reattaches).
pub struct Engine {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub vms_dir: PathBuf,
    pub qemu: PathBuf,
    pub accel: AccelChoice,
    pub accel_reason: String,
    pub tap_opener: Option<Arc<dyn TapOpener>>,
    pub restart: RestartPolicy,
    pub events: broadcast::Sender<VmEvent>,
    pub vms: Mutex<HashMap<String, Arc<Vm>>>,
    pub cancel: CancellationToken,
}

pub(super) struct Vm {
    pub vm_id: String,
    pub dir: VmDir,
    /// One lifecycle operation at a time (start, stop, destroy, restart
    /// after a crash): two starts of one VM give one QEMU.
    pub op: tokio::sync::Mutex<()>,
    pub rt: Mutex<Runtime>,
}

pub(super) struct Runtime {
    pub spec: VmSpec,
    pub state: VmState,
    pub since: SystemTime,
    pub pid: Option<i32>,
    pub qmp: Option<Arc<QmpClient>>,
    /// A stop we asked for is under way: the coming exit is ours.
    pub stopping: bool,
    pub supervisor: Option<tokio::task::AbortHandle>,
    pub crashes: VecDeque<Instant>,
}

/// A QEMU just spawned or found, with what its supervisor needs.
pub(super) struct Attached {
    pub pid: i32,
    pub qmp: Arc<QmpClient>,
    pub events: mpsc::UnboundedReceiver<QmpEvent>,
    /// Exit status, when QEMU is our own child.
    pub exit: Option<watch::Receiver<Option<ExitStatus>>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.inner.cancel.cancel();
    }
}

impl Engine {
    pub fn new(opts: EngineOptions) -> Result<Engine, VmmError> {
        let qemu = which(&opts.qemu).ok_or_else(|| VmmError::QemuMissing {
            program: opts.qemu.display().to_string(),
        })?;
        std::fs::create_dir_all(&opts.vms_dir).map_err(|source| VmmError::Io {
            vm_id: "-".into(),
            what: format!("cannot create {}", opts.vms_dir.display()),
            source,
        })?;
        let (accel, accel_reason) = accel::decide(opts.accel);
        if accel == AccelChoice::Tcg && opts.accel == crate::config::Accel::Auto {
            TCG_WARNING.call_once(|| tracing::warn!(reason = %accel_reason, "guests run under TCG"));
        } else {
            tracing::info!(%accel, reason = %accel_reason, "accelerator chosen");
        }
        let (events, _) = broadcast::channel(1024);
        Ok(Engine {
            inner: Arc::new(Inner {
                vms_dir: opts.vms_dir,
                qemu,
                accel,
                accel_reason,
                tap_opener: opts.tap_opener,
                restart: opts.restart,
                events,
                vms: Mutex::new(HashMap::new()),
                cancel: CancellationToken::new(),
            }),
        })
    }

    pub fn accel(&self) -> (AccelChoice, &str) {
        (self.inner.accel, &self.inner.accel_reason)
    }

    pub fn vm_dir(&self, vm_id: &str) -> VmDir {
        VmDir::new(&self.inner.vms_dir, vm_id)
    }

    /// State changes of every VM, in order per VM.
    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.inner.events.subscribe()
    }

    /// The disk: a qcow2 overlay on `spec.base_disk`, sized by plan. Also
    /// writes vm.json. An existing disk is kept (it holds the user's data).
    pub async fn create_disk(&self, spec: &VmSpec) -> Result<PathBuf, VmmError> {
        spec.validate()?;
        let dir = self.vm_dir(&spec.vm_id);
        let io = |what: String| {
            let vm_id = spec.vm_id.clone();
            move |source| VmmError::Io { vm_id, what, source }
        };
        dir.write_spec(spec)
            .map_err(io(format!("cannot write {}", dir.spec_file().display())))?;
        let disk = dir.disk();
        if disk.exists() {
            return Ok(disk);
        }
        let base = std::path::absolute(&spec.base_disk)
            .map_err(io(format!("bad base disk path {}", spec.base_disk.display())))?;
        let format = disk_format(&base).map_err(io(format!("cannot read base disk {}", base.display())))?;
        let tmp = dir.root().join(".disk.qcow2.tmp");
        let out = tokio::process::Command::new("qemu-img")
            .arg("create")
            .args(["-q", "-f", "qcow2", "-F", format, "-b"])
            .arg(&base)
            .arg(&tmp)
            .arg(format!("{}G", spec.plan.disk_gib))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|err| match err.kind() {
                std::io::ErrorKind::NotFound => VmmError::QemuImgMissing,
                _ => VmmError::Io {
                    vm_id: spec.vm_id.clone(),
                    what: "cannot run qemu-img".into(),
                    source: err,
                },
            })?;
        if !out.status.success() {
            return Err(VmmError::QemuImg {
                vm_id: spec.vm_id.clone(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        std::fs::rename(&tmp, &disk).map_err(io("cannot move the new disk in place".into()))?;
        Ok(disk)
    }

    /// Start the VM (or find it already running): returns once QEMU reports
    /// `running` over QMP; the guest boots on from there, supervised.
    pub async fn start(&self, spec: &VmSpec) -> Result<VmStatus, VmmError> {
        spec.validate()?;
        let vm = self.inner.vm_entry(spec, VmState::Stopped);
        let _op = vm.op.lock().await;
        {
            let mut rt = vm.rt.lock().unwrap();
            if matches!(rt.state, VmState::Running | VmState::Starting)
                && rt.pid.is_some_and(|pid| dir::is_our_qemu(pid, &vm.vm_id))
            {
                return Ok(status_of(&rt));
            }
            rt.spec = spec.clone();
        }
        vm.dir.write_spec(spec).map_err(|source| VmmError::Io {
            vm_id: vm.vm_id.clone(),
            what: "cannot write vm.json".into(),
            source,
        })?;
        // A supervisor may be waiting to restart a crash: this start wins.
        self.inner.stop_supervisor(&vm);
        {
            let state = vm.rt.lock().unwrap().state;
            if matches!(state, VmState::Running | VmState::Starting | VmState::Stopping) {
                self.inner
                    .set_state(&vm, VmState::Crashed, "QEMU vanished while unsupervised")?;
            }
        }
        // Across processes (a second service, the CLI): QEMU takes its
        // pidfile lock only after creating its sockets, so a second QEMU
        // would steal them; this lock makes check-then-spawn atomic.
        let _flock = self.inner.lock_dir(&vm).await?;
        if let Some(pid) = vm.dir.live_pid(&vm.vm_id) {
            self.inner
                .set_state(&vm, VmState::Starting, &format!("found QEMU pid {pid} running"))?;
            let attached = match self.inner.attach(&vm, pid).await {
                Ok(attached) => attached,
                Err(err) => {
                    self.inner.set_state(&vm, VmState::Failed, &err.to_string())?;
                    return Err(err);
                }
            };
            return self
                .inner
                .run_attached(&vm, attached, "reattached to a running QEMU");
        }
        self.inner.set_state(&vm, VmState::Starting, "start requested")?;
        vm.rt.lock().unwrap().crashes.clear();
        match self.inner.spawn_qemu(&vm, spec).await {
            Ok(attached) => self.inner.run_attached(&vm, attached, "QEMU running"),
            Err(err) => {
                self.inner.set_state(&vm, VmState::Failed, &err.to_string())?;
                Err(err)
            }
        }
    }

    /// Graceful stop: `system_powerdown`, then `quit` after `timeout`, then
    /// SIGKILL. Stopping a VM that does not run is not an error.
    pub async fn stop(&self, vm_id: &str, timeout: Duration) -> Result<(), VmmError> {
        let vm = self.inner.known_vm(vm_id)?;
        let _op = vm.op.lock().await;
        self.inner.stop_locked(&vm, Some(timeout)).await
    }

    /// Stop (gracefully, [`DEFAULT_STOP_TIMEOUT`]) and start again with the
    /// last spec: a fresh QEMU, which also picks up a changed spec.
    pub async fn restart(&self, vm_id: &str) -> Result<VmStatus, VmmError> {
        let vm = self.inner.known_vm(vm_id)?;
        let spec = {
            let _op = vm.op.lock().await;
            self.inner.stop_locked(&vm, Some(DEFAULT_STOP_TIMEOUT)).await?;
            vm.rt.lock().unwrap().spec.clone()
        };
        self.start(&spec).await
    }

    /// Kill the VM if it runs and remove its directory. Idempotent: a VM
    /// that is already gone is fine.
    pub async fn destroy(&self, vm_id: &str) -> Result<(), VmmError> {
        super::validate_vm_id(vm_id)?;
        let vm = match self.inner.known_vm(vm_id) {
            Ok(vm) => vm,
            Err(_) => return Ok(()),
        };
        let _op = vm.op.lock().await;
        self.inner.stop_locked(&vm, None).await?;
        self.inner
            .set_state(&vm, VmState::Deleting, "destroy requested")?;
        match std::fs::remove_dir_all(vm.dir.root()) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VmmError::Io {
                    vm_id: vm_id.to_owned(),
                    what: format!("cannot remove {}", vm.dir.root().display()),
                    source,
                });
            }
        }
        self.inner.set_state(&vm, VmState::Deleted, "destroyed")?;
        self.inner.vms.lock().unwrap().remove(vm_id);
        Ok(())
    }

    /// At service start: for each VM that should exist, find its QEMU
    /// (pidfile, then /proc cmdline, then QMP) and supervise it again without
    /// touching the guest, or report it stopped or crashed. Stale pidfiles
    /// and sockets are removed. Nothing is started here, and no events are
    /// sent: the outcomes are the report (this engine had no state before).
    pub async fn reattach(&self, specs: &[VmSpec]) -> Vec<(String, Result<ReattachOutcome, VmmError>)> {
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            let result = self.reattach_one(spec).await;
            match &result {
                Ok(outcome) => tracing::info!(vm_id = %spec.vm_id, ?outcome, "reattach"),
                Err(err) => tracing::warn!(vm_id = %spec.vm_id, %err, "reattach failed"),
            }
            out.push((spec.vm_id.clone(), result));
        }
        out
    }

    async fn reattach_one(&self, spec: &VmSpec) -> Result<ReattachOutcome, VmmError> {
        spec.validate()?;
        let vm = self.inner.vm_entry(spec, VmState::Stopped);
        let _op = vm.op.lock().await;
        {
            let rt = vm.rt.lock().unwrap();
            if let (VmState::Running, Some(pid)) = (rt.state, rt.pid)
                && rt.supervisor.is_some()
                && dir::is_our_qemu(pid, &vm.vm_id)
            {
                return Ok(ReattachOutcome::Reattached { pid });
            }
        }
        if !vm.dir.spec_file().exists() {
            let _ = vm.dir.write_spec(spec);
        }
        match vm.dir.read_pid() {
            Some(pid) if dir::is_our_qemu(pid, &vm.vm_id) => {
                let attached = self.inner.attach(&vm, pid).await?;
                let mut rt = vm.rt.lock().unwrap();
                rt.state = VmState::Running;
                rt.since = SystemTime::now();
                drop(rt);
                self.inner.supervise(&vm, attached);
                Ok(ReattachOutcome::Reattached { pid })
            }
            Some(pid) => {
                vm.dir.clean_runtime_files();
                let reason = if dir::is_alive(pid) {
                    format!("pidfile named pid {pid}, a process that is not this VM's QEMU")
                } else {
                    format!("QEMU pid {pid} is gone without a clean exit")
                };
                let mut rt = vm.rt.lock().unwrap();
                rt.state = VmState::Crashed;
                rt.since = SystemTime::now();
                Ok(ReattachOutcome::Crashed { reason })
            }
            None => {
                vm.dir.clean_runtime_files();
                Ok(ReattachOutcome::Stopped)
            }
        }
    }

    pub fn status(&self, vm_id: &str) -> Option<VmStatus> {
        let vm = self.inner.vms.lock().unwrap().get(vm_id).cloned()?;
        let rt = vm.rt.lock().unwrap();
        Some(status_of(&rt))
    }

    /// Every VM this engine knows, sorted by vm_id.
    pub fn list(&self) -> Vec<(String, VmStatus)> {
        let vms: Vec<Arc<Vm>> = self.inner.vms.lock().unwrap().values().cloned().collect();
        let mut out: Vec<_> = vms
            .iter()
            .map(|vm| (vm.vm_id.clone(), status_of(&vm.rt.lock().unwrap())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Operator passthrough: one raw QMP command on the VM's operator
    /// monitor; returns QEMU's reply (`{"return":..}` or `{"error":..}`).
    pub async fn qmp(&self, vm_id: &str, command: serde_json::Value) -> Result<serde_json::Value, VmmError> {
        super::validate_vm_id(vm_id)?;
        let dir = self.vm_dir(vm_id);
        if !dir.root().exists() {
            return Err(VmmError::UnknownVm(vm_id.to_owned()));
        }
        if dir.live_pid(vm_id).is_none() {
            return Err(VmmError::NotRunning(vm_id.to_owned()));
        }
        qmp::raw_command(&dir.operator_socket(), &command, OPERATOR_QMP_TIMEOUT)
            .await
            .map_err(|source| VmmError::Qmp {
                vm_id: vm_id.to_owned(),
                source,
            })
    }

    /// Stop supervising everything and close every QMP connection, leaving
    /// QEMUs running. Dropping the engine does the same without waiting.
    pub async fn detach_all(self) {
        self.inner.cancel.cancel();
        let vms: Vec<Arc<Vm>> = self.inner.vms.lock().unwrap().values().cloned().collect();
        for vm in vms {
            let mut rt = vm.rt.lock().unwrap();
            rt.qmp = None;
            if let Some(sup) = rt.supervisor.take() {
                sup.abort();
            }
        }
        // Let aborted tasks drop their connections.
        tokio::task::yield_now().await;
    }
}

pub(super) fn status_of(rt: &Runtime) -> VmStatus {
    VmStatus {
        state: rt.state,
        pid: rt.pid,
        since: rt.since,
    }
}

impl Inner {
    /// The VM's entry, created with `initial` state (from vm.json's view:
    /// nothing runs yet) when unknown.
    pub fn vm_entry(&self, spec: &VmSpec, initial: VmState) -> Arc<Vm> {
        let mut vms = self.vms.lock().unwrap();
        vms.entry(spec.vm_id.clone())
            .or_insert_with(|| {
                Arc::new(Vm {
                    vm_id: spec.vm_id.clone(),
                    dir: VmDir::new(&self.vms_dir, &spec.vm_id),
                    op: tokio::sync::Mutex::new(()),
                    rt: Mutex::new(Runtime {
                        spec: spec.clone(),
                        state: initial,
                        since: SystemTime::now(),
                        pid: None,
                        qmp: None,
                        stopping: false,
                        supervisor: None,
                        crashes: VecDeque::new(),
                    }),
                })
            })
            .clone()
    }

    /// A VM in memory, or one whose directory holds a vm.json.
    pub fn known_vm(&self, vm_id: &str) -> Result<Arc<Vm>, VmmError> {
        super::validate_vm_id(vm_id)?;
        if let Some(vm) = self.vms.lock().unwrap().get(vm_id) {
            return Ok(vm.clone());
        }
        let dir = VmDir::new(&self.vms_dir, vm_id);
        let spec = dir
            .read_spec()
            .map_err(|_| VmmError::UnknownVm(vm_id.to_owned()))?;
        let vm = self.vm_entry(&spec, VmState::Stopped);
        if let Some(pid) = dir.live_pid(vm_id) {
            // Unsupervised but alive (no reattach was done): count it as
            // running so stop/destroy deal with it.
            let mut rt = vm.rt.lock().unwrap();
            rt.state = VmState::Running;
            rt.pid = Some(pid);
        }
        Ok(vm)
    }

    /// The one place state changes: checked by the state machine, reported
    /// to subscribers.
    pub fn set_state(&self, vm: &Vm, to: VmState, reason: &str) -> Result<(), VmmError> {
        let from = {
            let mut rt = vm.rt.lock().unwrap();
            let from = rt.state;
            rt.state = from.transition(to)?;
            rt.since = SystemTime::now();
            from
        };
        tracing::info!(vm_id = %vm.vm_id, %from, %to, reason, "VM state");
        let _ = self.events.send(super::VmEvent {
            vm_id: vm.vm_id.clone(),
            from,
            to,
            reason: reason.to_owned(),
        });
        Ok(())
    }

    /// The per-VM start lock (`<vm_dir>/start.lock`, flock), held from the
    /// "is it running?" check until QEMU runs.
    pub async fn lock_dir(&self, vm: &Vm) -> Result<nix::fcntl::Flock<std::fs::File>, VmmError> {
        let path = vm.dir.start_lock();
        let io = |source| VmmError::Io {
            vm_id: vm.vm_id.clone(),
            what: format!("cannot lock {}", path.display()),
            source,
        };
        std::fs::create_dir_all(vm.dir.root()).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| std::io::Error::from(errno))
        })
        .await
        .map_err(|err| io(std::io::Error::other(err)))?
        .map_err(io)
    }

    pub fn stop_supervisor(&self, vm: &Vm) {
        if let Some(sup) = vm.rt.lock().unwrap().supervisor.take() {
            sup.abort();
        }
    }

    /// Record a freshly attached QEMU as running and supervise it.
    fn run_attached(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        attached: Attached,
        reason: &str,
    ) -> Result<VmStatus, VmmError> {
        let pid = attached.pid;
        self.set_state(vm, VmState::Running, &format!("{reason} (pid {pid})"))?;
        self.supervise(vm, attached);
        Ok(status_of(&vm.rt.lock().unwrap()))
    }

    pub fn supervise(self: &Arc<Self>, vm: &Arc<Vm>, attached: Attached) {
        let mut rt = vm.rt.lock().unwrap();
        rt.pid = Some(attached.pid);
        rt.qmp = Some(attached.qmp.clone());
        rt.stopping = false;
        if let Some(old) = rt.supervisor.take() {
            old.abort();
        }
        let task = tokio::spawn(super::supervisor::run(self.clone(), vm.clone(), attached));
        rt.supervisor = Some(task.abort_handle());
    }

    /// Connect QMP to a live QEMU we did not spawn in this engine.
    pub async fn attach(&self, vm: &Vm, pid: i32) -> Result<Attached, VmmError> {
        let qmp_err = |source| VmmError::Qmp {
            vm_id: vm.vm_id.clone(),
            source,
        };
        let (client, events) = QmpClient::connect(&vm.dir.qmp_socket()).await.map_err(qmp_err)?;
        let status = client.query_status().await.map_err(qmp_err)?;
        tracing::info!(vm_id = %vm.vm_id, pid, status = %status.status, "attached to QEMU");
        Ok(Attached {
            pid,
            qmp: Arc::new(client),
            events,
            exit: None,
        })
    }

    /// Spawn QEMU for `spec` and wait for QMP `running`. The caller holds
    /// the VM's op lock and has made sure no QEMU of this VM runs.
    pub async fn spawn_qemu(&self, vm: &Vm, spec: &VmSpec) -> Result<Attached, VmmError> {
        let vm_id = &vm.vm_id;
        let dir = &vm.dir;
        let io = |what: &str| {
            let (vm_id, what) = (vm_id.clone(), what.to_owned());
            move |source| VmmError::Io { vm_id, what, source }
        };
        if !dir.disk().exists() {
            return Err(VmmError::NoDisk {
                vm_id: vm_id.clone(),
                path: dir.disk(),
            });
        }
        // Stale files are not removed here: QEMU replaces a stale pidfile and
        // stale sockets itself, and the caller holds the start lock, so no
        // other QEMU of this VM can be starting right now.
        let tap = match &spec.net {
            VmNet::Tap { tap_name, .. } => {
                let opener = self
                    .tap_opener
                    .as_ref()
                    .ok_or_else(|| VmmError::NoTapOpener { vm_id: vm_id.clone() })?;
                Some(opener.open(tap_name).map_err(|source| VmmError::Tap {
                    vm_id: vm_id.clone(),
                    tap_name: tap_name.clone(),
                    source,
                })?)
            }
            _ => None,
        };
        let argv = cmdline::build(&cmdline_config(self.accel, dir, spec));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.qemu_log())
            .map_err(io("cannot open qemu.log"))?;
        let log2 = log.try_clone().map_err(io("cannot open qemu.log"))?;
        let mut cmd = std::process::Command::new(&self.qemu);
        cmd.args(&argv)
            .current_dir(dir.root())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let fds: Vec<_> = tap.iter().map(|fd| (fd.as_fd(), cmdline::TAP_FD)).collect();
        let started = Instant::now();
        let mut child = crate::sys::spawn_detached(cmd, &fds).map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                VmmError::QemuMissing {
                    program: self.qemu.display().to_string(),
                }
            } else {
                io("cannot spawn QEMU")(err)
            }
        })?;
        drop(fds);
        drop(tap);
        let pid = child.id().map(|p| p as i32).unwrap_or(-1);
        tracing::debug!(vm_id = %vm_id, pid, "QEMU spawned");
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let _ = exit_tx.send(Some(status));
            }
        });
        let fail_exit = |status: ExitStatus| VmmError::StartExited {
            vm_id: vm_id.clone(),
            status: describe_exit(Some(status)),
            log_tail: dir::tail(&dir.qemu_log(), 10),
        };
        let connected = loop {
            if let Some(status) = *exit_rx.borrow() {
                return Err(fail_exit(status));
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(VmmError::StartTimeout {
                    vm_id: vm_id.clone(),
                    after: START_TIMEOUT,
                });
            }
            if dir.qmp_socket().exists() {
                match QmpClient::connect(&dir.qmp_socket()).await {
                    Ok(pair) => break pair,
                    Err(err) => tracing::debug!(vm_id = %vm_id, %err, "QMP not ready"),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let (client, events) = connected;
        let status = match client.query_status().await {
            Ok(status) => status,
            Err(source) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(VmmError::Qmp {
                    vm_id: vm_id.clone(),
                    source,
                });
            }
        };
        if !status.running {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(VmmError::NotRunningAfterStart {
                vm_id: vm_id.clone(),
                status: status.status,
            });
        }
        tracing::info!(vm_id = %vm_id, pid, elapsed_ms = started.elapsed().as_millis() as u64, "QEMU running");
        Ok(Attached {
            pid,
            qmp: Arc::new(client),
            events,
            exit: Some(exit_rx),
        })
    }

    /// Stop whatever runs for this VM; the caller holds the op lock.
    /// `graceful`: powerdown and wait that long first; `None`: quit at once.
    pub async fn stop_locked(&self, vm: &Vm, graceful: Option<Duration>) -> Result<(), VmmError> {
        let (state, pid, client) = {
            let mut rt = vm.rt.lock().unwrap();
            rt.stopping = true;
            (rt.state, rt.pid, rt.qmp.clone())
        };
        let pid = pid
            .filter(|pid| dir::is_our_qemu(*pid, &vm.vm_id))
            .or_else(|| vm.dir.live_pid(&vm.vm_id));
        self.stop_supervisor(vm);
        let Some(pid) = pid else {
            // Nothing runs: settle the state (a crash waiting for its restart
            // is now stopped on request).
            let mut rt = vm.rt.lock().unwrap();
            rt.pid = None;
            rt.qmp = None;
            rt.stopping = false;
            drop(rt);
            vm.dir.clean_runtime_files();
            if matches!(
                state,
                VmState::Running | VmState::Starting | VmState::Stopping | VmState::Crashed
            ) {
                self.set_state(vm, VmState::Stopped, "stopped on request (QEMU was not running)")?;
            }
            return Ok(());
        };
        if matches!(state, VmState::Running | VmState::Starting) {
            self.set_state(vm, VmState::Stopping, "stop requested")?;
        }
        let gone = || !dir::is_our_qemu(pid, &vm.vm_id);
        let mut how = "powered off";
        if let Some(timeout) = graceful {
            if let Some(client) = &client {
                match client.system_powerdown().await {
                    Ok(()) => {}
                    Err(err) => tracing::warn!(vm_id = %vm.vm_id, %err, "system_powerdown failed"),
                }
            }
            wait_until(timeout, gone).await;
        }
        if !gone() {
            how = "quit";
            match &client {
                Some(client) => {
                    let _ = client.quit().await;
                }
                None => {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
            }
            wait_until(EXIT_WAIT, gone).await;
        }
        if !gone() {
            how = "killed";
            tracing::warn!(vm_id = %vm.vm_id, pid, "QEMU did not quit: SIGKILL");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            wait_until(EXIT_WAIT, gone).await;
            if !gone() {
                return Err(VmmError::Unkillable {
                    vm_id: vm.vm_id.clone(),
                    pid,
                });
            }
        }
        {
            let mut rt = vm.rt.lock().unwrap();
            rt.pid = None;
            rt.qmp = None;
            rt.stopping = false;
        }
        vm.dir.clean_runtime_files();
        let state = vm.rt.lock().unwrap().state;
        if state != VmState::Stopped {
            self.set_state(vm, VmState::Stopped, &format!("stopped on request ({how})"))?;
        }
        Ok(())
    }
}

pub(super) fn cmdline_config(accel: AccelChoice, dir: &VmDir, spec: &VmSpec) -> CmdlineConfig {
    CmdlineConfig {
        vm_id: spec.vm_id.clone(),
        plan: spec.plan.clone(),
        accel,
        kernel: spec.kernel.clone(),
        initrd: spec.initrd.clone(),
        append: spec.append.clone(),
        disk: dir.disk(),
        seed_iso: spec.seed_iso.clone(),
        nic: match &spec.net {
            VmNet::None => Nic::None,
            VmNet::User { hostfwd } => Nic::User {
                hostfwd: hostfwd.clone(),
            },
            VmNet::Tap { mac, .. } => Nic::Tap { mac: mac.clone() },
        },
        qmp_socket: dir.qmp_socket(),
        operator_socket: dir.operator_socket(),
        qga_socket: dir.qga_socket(),
        serial_log: dir.serial_log(),
        pidfile: dir.pidfile(),
    }
}

/// The argv (without the program) the engine would run for `spec` in
/// `vms_dir`: for golden tests and `vm info`.
pub fn argv_for(accel: AccelChoice, vms_dir: &Path, spec: &VmSpec) -> Vec<String> {
    cmdline::build(&cmdline_config(accel, &VmDir::new(vms_dir, &spec.vm_id), spec))
}

pub(super) fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "exit status unknown: not our child".to_owned(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {sig}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            (None, None) => "exit status unknown".to_owned(),
        },
    }
}

pub(super) async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A program name looked up in PATH, or a path that exists.
fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.exists().then(|| program.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// `qcow2` when the file starts with qcow2's magic, `raw` otherwise.
fn disk_format(path: &Path) -> std::io::Result<&'static str> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)?;
    let n = file.read(&mut magic)?;
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}
