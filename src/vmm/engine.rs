//! The engine: the public facade of `vmm`. Each per-VM lifecycle operation
//! (create disk, start, stop, restart, destroy, reattach) runs serialized per
//! VM under the VM's op lock and inside the VM's tracing span, and decides
//! the state changes; the work itself is elsewhere:
//!
//! - `registry.rs`: the table of VMs and the one place state changes;
//! - `process.rs`: spawning, attaching to and stopping QEMU;
//! - `disk.rs`: the qcow2 overlay;
//! - `supervisor.rs`: watching a QEMU after start, crash restarts;
//! - `cgroup.rs`, `sandbox.rs`: the host's walls around each QEMU (its
//!   cgroup with memory and pids limits, the unprivileged id it runs as).
//!
//! Never trusts memory about a process: a pid counts only when
//! `/proc/<pid>/cmdline` shows our `-name <vm_id>`. Never signals a process
//! itself (only `process.rs` does, through `QemuPid`).

use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::accel::{self, AccelChoice};
use super::cgroup::{CgroupError, Cgroups};
use super::dir::{self, VmDir};
use super::disk;
use super::meter::{self, VmCounters};
use super::process::{self, Attached, Launcher, QemuPid};
use super::qmp;
use super::registry::{self, Registry, Vm};
use super::sandbox::QemuIds;
use super::supervisor::{self, Supervision};
use super::{EngineOptions, ReattachOutcome, RestartPolicy, VmEvent, VmSpec, VmState, VmStatus, VmmError};

/// Default graceful-stop timeout used by `restart`: a Debian guest under TCG
/// powers off in a few seconds; past this we `quit`.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Operator passthrough commands get this long (they may wait for another
/// operator connection to end first).
pub const OPERATOR_QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop or destroy retries removing a VM's cgroup that is still
/// busy: the kernel lets go of it as soon as the exited QEMU is gone.
const CGROUP_RELEASE_PATIENCE: Duration = Duration::from_secs(2);

static TCG_WARNING: Once = Once::new();

/// The VM engine. Dropping it stops supervision but leaves every QEMU
/// running (a new engine reattaches).
pub struct Engine {
    pub(super) registry: Arc<Registry>,
    pub(super) launcher: Arc<Launcher>,
    /// Restore times of clones not yet resumed (`vmm::clone`).
    pub(super) restores: super::clone::Restores,
    accel_reason: String,
    restart: RestartPolicy,
    cancel: CancellationToken,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Engine {
    /// Finds QEMU, creates `vms_dir` (0711) and finds the cgroup
    /// hierarchies (see [`EngineOptions`]).
    pub fn new(opts: EngineOptions) -> Result<Engine, VmmError> {
        let qemu = process::find_qemu(&opts.qemu)?;
        create_vms_dir(&opts.vms_dir).map_err(|source| VmmError::Io {
            vm_id: "-".into(),
            what: format!("cannot create {}", opts.vms_dir.display()),
            source,
        })?;
        let cgroups = setup_cgroups(&opts.cgroups)?;
        let (accel, accel_reason) = accel::decide(opts.accel);
        if accel == AccelChoice::Tcg && opts.accel == crate::config::Accel::Auto {
            TCG_WARNING.call_once(|| tracing::warn!(reason = %accel_reason, "guests run under TCG"));
        } else {
            tracing::info!(%accel, reason = %accel_reason, "accelerator chosen");
        }
        Ok(Engine {
            registry: Arc::new(Registry::new(opts.vms_dir)),
            launcher: Arc::new(Launcher {
                qemu,
                accel,
                tap_opener: opts.tap_opener,
                cgroups,
                cgroup_options: opts.cgroups,
                qemu_ids: opts.qemu_ids,
                log_cap: opts.log_cap,
            }),
            restores: Default::default(),
            accel_reason,
            restart: opts.restart,
            cancel: CancellationToken::new(),
        })
    }

    pub fn accel(&self) -> (AccelChoice, &str) {
        (self.launcher.accel, &self.accel_reason)
    }

    /// The VMs' cgroups; `None` when VMs run without (off, or none usable).
    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.launcher.cgroups.as_ref()
    }

    /// Remove the VM's cgroup, waiting a moment for a process that is
    /// exiting (one killed outside the engine, such as an orphaned QEMU).
    /// A cgroup still busy after that is logged and left for later.
    pub async fn remove_cgroup(&self, vm_id: &str) -> Result<(), VmmError> {
        super::validate_vm_id(vm_id)?;
        self.launcher
            .release_cgroup_patiently(vm_id, CGROUP_RELEASE_PATIENCE)
            .instrument(registry::span(vm_id))
            .await;
        Ok(())
    }

    /// The ids QEMUs run as, one per VM.
    pub fn qemu_ids(&self) -> QemuIds {
        self.launcher.qemu_ids
    }

    pub fn vm_dir(&self, vm_id: &str) -> VmDir {
        VmDir::new(self.registry.vms_dir(), vm_id)
    }

    /// State changes of every VM, in order per VM.
    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.registry.subscribe()
    }

    /// The disk: a qcow2 overlay on `spec.base_disk`, sized by plan. Also
    /// writes vm.json. An existing disk is kept (it holds the user's data).
    pub async fn create_disk(&self, spec: &VmSpec) -> Result<PathBuf, VmmError> {
        async {
            spec.validate()?;
            let dir = self.vm_dir(&spec.vm_id);
            dir.write_spec(spec).map_err(|source| VmmError::Io {
                vm_id: spec.vm_id.clone(),
                what: format!("cannot write {}", dir.spec_file().display()),
                source,
            })?;
            disk::create_overlay(&dir, spec).await
        }
        .instrument(registry::span(&spec.vm_id))
        .await
    }

    /// Start the VM (or find it already running): returns once QEMU reports
    /// `running` over QMP; the guest boots on from there, supervised.
    pub async fn start(&self, spec: &VmSpec) -> Result<VmStatus, VmmError> {
        self.start_in_span(spec)
            .instrument(registry::span(&spec.vm_id))
            .await
    }

    async fn start_in_span(&self, spec: &VmSpec) -> Result<VmStatus, VmmError> {
        spec.validate()?;
        let vm = self.registry.entry(spec, VmState::Stopped);
        let _op = vm.lock_op().await;
        if let Some(status) = vm.live_status() {
            return Ok(status);
        }
        vm.set_spec(spec);
        vm.dir().write_spec(spec).map_err(|source| VmmError::Io {
            vm_id: vm.id().to_owned(),
            what: "cannot write vm.json".into(),
            source,
        })?;
        // A supervisor may be waiting to restart a crash: this start wins.
        vm.stop_supervisor();
        if matches!(
            vm.state(),
            VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping
        ) {
            self.registry
                .set_state(&vm, VmState::Crashed, "QEMU vanished while unsupervised")?;
        }
        // Held from the "is it running?" check until QEMU runs (see
        // `process::lock_start`).
        let _flock = process::lock_start(vm.id(), vm.dir()).await?;
        if let Some(pid) = QemuPid::live(vm.dir(), vm.id()) {
            self.registry
                .set_state(&vm, VmState::Starting, &format!("found QEMU pid {pid} running"))?;
            let attached = match process::attach(vm.id(), vm.dir(), pid).await {
                Ok(attached) => attached,
                Err(err) => {
                    self.registry.set_state(&vm, VmState::Failed, &err.to_string())?;
                    return Err(err);
                }
            };
            return self.run_attached(&vm, attached, "reattached to a running QEMU");
        }
        self.registry
            .set_state(&vm, VmState::Starting, "start requested")?;
        vm.clear_crashes();
        match self.launcher.spawn(vm.id(), vm.dir(), spec).await {
            Ok(attached) => self.run_attached(&vm, attached, "QEMU running"),
            Err(err) => {
                self.registry.set_state(&vm, VmState::Failed, &err.to_string())?;
                Err(err)
            }
        }
    }

    /// Graceful stop: `system_powerdown`, then `quit` after `timeout`, then
    /// SIGKILL. Stopping a VM that does not run is not an error.
    pub async fn stop(&self, vm_id: &str, timeout: Duration) -> Result<(), VmmError> {
        async {
            let vm = self.registry.known(vm_id)?;
            let _op = vm.lock_op().await;
            self.stop_locked(&vm, Some(timeout)).await
        }
        .instrument(registry::span(vm_id))
        .await
    }

    /// Stop (gracefully, [`DEFAULT_STOP_TIMEOUT`]) and start again with the
    /// last spec: a fresh QEMU, which also picks up a changed spec.
    pub async fn restart(&self, vm_id: &str) -> Result<VmStatus, VmmError> {
        async {
            let vm = self.registry.known(vm_id)?;
            let spec = {
                let _op = vm.lock_op().await;
                self.stop_locked(&vm, Some(DEFAULT_STOP_TIMEOUT)).await?;
                vm.spec()
            };
            self.start_in_span(&spec).await
        }
        .instrument(registry::span(vm_id))
        .await
    }

    /// Kill the VM if it runs and remove its directory. Idempotent: a VM
    /// that is already gone is fine.
    pub async fn destroy(&self, vm_id: &str) -> Result<(), VmmError> {
        super::validate_vm_id(vm_id)?;
        async {
            let vm = match self.registry.known(vm_id) {
                Ok(vm) => vm,
                Err(_) => return Ok(()),
            };
            let _op = vm.lock_op().await;
            self.stop_locked(&vm, None).await?;
            self.registry
                .set_state(&vm, VmState::Deleting, "destroy requested")?;
            // The stop removed the cgroup; one it found busy (or one an
            // earlier stop left) gets another try.
            self.launcher
                .release_cgroup_patiently(vm_id, CGROUP_RELEASE_PATIENCE)
                .await;
            match std::fs::remove_dir_all(vm.dir().root()) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VmmError::Io {
                        vm_id: vm_id.to_owned(),
                        what: format!("cannot remove {}", vm.dir().root().display()),
                        source,
                    });
                }
            }
            self.registry.set_state(&vm, VmState::Deleted, "destroyed")?;
            self.registry.remove(vm_id);
            Ok(())
        }
        .instrument(registry::span(vm_id))
        .await
    }

    /// At service start: for each VM that should exist, find its QEMU
    /// (pidfile, then /proc cmdline, then QMP) and supervise it again without
    /// touching the guest, or report it stopped or crashed. Stale pidfiles
    /// and sockets are removed. Nothing is started here, and no events are
    /// sent: the outcomes are the report (this engine had no state before).
    pub async fn reattach(&self, specs: &[VmSpec]) -> Vec<(String, Result<ReattachOutcome, VmmError>)> {
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            let result = async {
                let result = self.reattach_one(spec).await;
                match &result {
                    Ok(outcome) => tracing::info!(?outcome, "reattach"),
                    Err(err) => tracing::warn!(%err, "reattach failed"),
                }
                result
            }
            .instrument(registry::span(&spec.vm_id))
            .await;
            out.push((spec.vm_id.clone(), result));
        }
        out
    }

    async fn reattach_one(&self, spec: &VmSpec) -> Result<ReattachOutcome, VmmError> {
        spec.validate()?;
        let vm = self.registry.entry(spec, VmState::Stopped);
        let _op = vm.lock_op().await;
        if let Some(pid) = vm.supervised_pid() {
            return Ok(ReattachOutcome::Reattached { pid: pid.get() });
        }
        if !vm.dir().spec_file().exists() {
            let _ = vm.dir().write_spec(spec);
        }
        match vm.dir().read_pid() {
            Some(raw) => match QemuPid::new(raw).filter(|pid| pid.is_ours(vm.id())) {
                Some(pid) => {
                    let attached = process::attach(vm.id(), vm.dir(), pid).await?;
                    self.check_cgroup(vm.id(), pid);
                    // A clone restored but never resumed stays one (its
                    // vm.json says so, whatever spec the caller kept): paused,
                    // and not restarted should it die.
                    match vm.dir().read_spec().ok().and_then(|s| s.restore) {
                        Some(restore) => {
                            let mut spec = vm.spec();
                            spec.restore = Some(restore);
                            vm.set_spec(&spec);
                            vm.assume_state(VmState::Paused);
                        }
                        None => vm.assume_state(VmState::Running),
                    }
                    self.supervise(&vm, attached);
                    Ok(ReattachOutcome::Reattached { pid: pid.get() })
                }
                None => {
                    vm.dir().clean_runtime_files();
                    let reason = if dir::is_alive(raw) {
                        format!("pidfile named pid {raw}, a process that is not this VM's QEMU")
                    } else {
                        format!("QEMU pid {raw} is gone without a clean exit")
                    };
                    vm.assume_state(VmState::Crashed);
                    Ok(ReattachOutcome::Crashed { reason })
                }
            },
            None => {
                vm.dir().clean_runtime_files();
                Ok(ReattachOutcome::Stopped)
            }
        }
    }

    /// A reattached QEMU keeps the cgroup it was started in; one started
    /// without (before cgroups were enabled) is left alone, and said so.
    fn check_cgroup(&self, vm_id: &str, pid: QemuPid) {
        let Some(cgroups) = self.cgroups() else {
            return;
        };
        let procs = cgroups.procs(vm_id);
        if procs.iter().any(|p| !p.contains(&pid.get())) {
            tracing::warn!(
                pid = pid.get(),
                "QEMU runs outside its cgroup (started without one): restart the VM to apply its limits"
            );
        }
    }

    pub fn status(&self, vm_id: &str) -> Option<VmStatus> {
        Some(self.registry.get(vm_id)?.status())
    }

    /// Every VM this engine knows, sorted by vm_id.
    pub fn list(&self) -> Vec<(String, VmStatus)> {
        let mut out: Vec<_> = self
            .registry
            .all()
            .iter()
            .map(|vm| (vm.id().to_owned(), vm.status()))
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
            .instrument(registry::span(vm_id))
            .await
            .map_err(|source| VmmError::Qmp {
                vm_id: vm_id.to_owned(),
                source,
            })
    }

    /// What the VM's QEMU has used since it started: CPU and memory from
    /// /proc, disk bytes over the supervisor's QMP connection (see
    /// `meter.rs`). Only for a running, supervised VM.
    pub async fn counters(&self, vm_id: &str) -> Result<VmCounters, VmmError> {
        let vm = self
            .registry
            .get(vm_id)
            .ok_or_else(|| VmmError::UnknownVm(vm_id.to_owned()))?;
        let (Some(pid), Some(client)) = (vm.supervised_pid(), vm.qmp()) else {
            return Err(VmmError::NotRunning(vm_id.to_owned()));
        };
        let proc_dir = PathBuf::from(format!("/proc/{}", pid.get()));
        let (cpu_seconds, rss_bytes) = meter::process_usage(&proc_dir).map_err(|source| VmmError::Io {
            vm_id: vm_id.to_owned(),
            what: format!("cannot read {}", proc_dir.display()),
            source,
        })?;
        let blocks = client.query_blockstats().await.map_err(|source| VmmError::Qmp {
            vm_id: vm_id.to_owned(),
            source,
        })?;
        let (disk_read_bytes, disk_write_bytes) = meter::sum_blockstats(&blocks);
        Ok(VmCounters {
            cpu_seconds,
            rss_bytes,
            disk_read_bytes,
            disk_write_bytes,
        })
    }

    /// Stop supervising everything and close every QMP connection, leaving
    /// QEMUs running. Dropping the engine does the same without waiting.
    pub async fn detach_all(self) {
        self.cancel.cancel();
        for vm in self.registry.all() {
            vm.detach();
        }
        // Let aborted tasks drop their connections.
        tokio::task::yield_now().await;
    }

    /// Record a freshly attached QEMU as running and supervise it.
    fn run_attached(&self, vm: &Arc<Vm>, attached: Attached, reason: &str) -> Result<VmStatus, VmmError> {
        let pid = attached.pid;
        self.registry
            .set_state(vm, VmState::Running, &format!("{reason} (pid {pid})"))?;
        self.supervise(vm, attached);
        Ok(vm.status())
    }

    /// Hand `attached` to a new supervisor task (replacing any old one). The
    /// task gets its own root span: it outlives the operation that started it.
    pub(super) fn supervise(&self, vm: &Arc<Vm>, attached: Attached) {
        let sup = Supervision {
            registry: self.registry.clone(),
            launcher: self.launcher.clone(),
            restart: self.restart,
            cancel: self.cancel.clone(),
        };
        let span = tracing::info_span!(parent: None, "vm", vm_id = %vm.id());
        let (pid, qmp) = (attached.pid, attached.qmp.clone());
        let task_vm = vm.clone();
        vm.adopt(pid, qmp, move || {
            tokio::spawn(supervisor::run(sup, task_vm, attached).instrument(span)).abort_handle()
        });
    }

    /// Stop whatever runs for this VM; the caller holds the op lock.
    /// `graceful`: powerdown and wait that long first; `None`: quit at once.
    async fn stop_locked(&self, vm: &Vm, graceful: Option<Duration>) -> Result<(), VmmError> {
        let (state, pid, client) = vm.begin_stop();
        let pid = pid
            .filter(|pid| pid.is_ours(vm.id()))
            .or_else(|| QemuPid::live(vm.dir(), vm.id()));
        vm.stop_supervisor();
        let Some(pid) = pid else {
            // Nothing runs: settle the state (a crash waiting for its restart
            // is now stopped on request).
            vm.end_stop();
            vm.dir().clean_runtime_files();
            self.launcher
                .release_cgroup_patiently(vm.id(), CGROUP_RELEASE_PATIENCE)
                .await;
            if matches!(
                state,
                VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping | VmState::Crashed
            ) {
                self.registry
                    .set_state(vm, VmState::Stopped, "stopped on request (QEMU was not running)")?;
            }
            return Ok(());
        };
        if matches!(state, VmState::Running | VmState::Paused | VmState::Starting) {
            self.registry.set_state(vm, VmState::Stopping, "stop requested")?;
        }
        // A paused guest runs no code, so it cannot answer a power-down: a
        // warm clone waiting in the pool, or a VM stopped by an I/O error.
        let graceful = graceful.filter(|_| state != VmState::Paused);
        let ask_agent = async {
            if graceful.is_some() && state == VmState::Running {
                ask_guest_agent_to_power_off(vm).await;
            }
        };
        let (_, how) = tokio::join!(
            ask_agent,
            process::stop(vm.id(), pid, client.as_deref(), graceful)
        );
        let how = how?;
        vm.end_stop();
        vm.dir().clean_runtime_files();
        self.launcher
            .release_cgroup_patiently(vm.id(), CGROUP_RELEASE_PATIENCE)
            .await;
        if vm.state() != VmState::Stopped {
            self.registry
                .set_state(vm, VmState::Stopped, &format!("stopped on request ({how})"))?;
        }
        Ok(())
    }
}

/// `vms_dir` 0711 (also when it existed with another mode), so each QEMU
/// can pass through to its own VM directory. Missing ancestors (a fresh
/// state dir) are created 0711 too: traversable, not listable, as the
/// service's state dir is (see `app`).
fn create_vms_dir(vms_dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = vms_dir.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)?;
    }
    dir::create_dir_with_mode(vms_dir, dir::VMS_DIR_MODE)
}

/// The cgroups the policy asks for. `auto` takes what the host offers and
/// warns when it offers nothing usable; `required` fails instead.
fn setup_cgroups(opts: &super::CgroupOptions) -> Result<Option<Cgroups>, VmmError> {
    use crate::config::CgroupPolicy;
    if opts.policy == CgroupPolicy::Off {
        tracing::warn!("per-VM cgroups are off: VMs run without memory and pids limits");
        return Ok(None);
    }
    let found = Cgroups::detect(&opts.parent).and_then(|cg| cg.ensure_parent().map(|()| cg));
    match found {
        Ok(cg) => {
            tracing::info!(
                mode = %cg.mode(),
                parent = %opts.parent,
                memory_overhead_mib = opts.memory_overhead_mib,
                pids_max = opts.pids_max,
                "each VM runs in its own cgroup"
            );
            Ok(Some(cg))
        }
        Err(err @ CgroupError::BadParent(_)) => Err(VmmError::CgroupSetup(err)),
        Err(err) if opts.policy == CgroupPolicy::Auto => {
            tracing::warn!(
                err = %super::error_chain(&err),
                "VMs run without memory and pids limits (--vm-cgroups required refuses this)"
            );
            Ok(None)
        }
        Err(err) => Err(VmmError::CgroupsRequired(err)),
    }
}

/// The power-down asked of the guest agent too, while `process::stop`
/// presses the ACPI button. The button reaches systemd only through logind,
/// which under TCG starts seconds after a guest is ready, and a press before
/// it is lost; the agent runs from the start of the boot. Bounded, and it
/// does not hold the stop up: a guest without an agent just does not answer.
async fn ask_guest_agent_to_power_off(vm: &Vm) {
    const LIMIT: Duration = Duration::from_secs(2);
    let dir = vm.dir();
    let asked = tokio::time::timeout(LIMIT, async {
        let mut agent = super::qga::QgaClient::connect(&dir.qga_socket(), &dir.qga_lock()).await?;
        agent.power_off().await
    })
    .await;
    match asked {
        Ok(Ok(())) => tracing::debug!(vm_id = vm.id(), "asked the guest agent to power off"),
        Ok(Err(err)) => tracing::debug!(vm_id = vm.id(), %err, "the guest agent did not take the power-off"),
        Err(_) => tracing::debug!(vm_id = vm.id(), "the guest agent did not answer within {LIMIT:?}"),
    }
}
