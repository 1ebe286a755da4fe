//! The in-memory table of VMs: one [`Vm`] per vm_id, with its runtime view
//! (state, pid, QMP client, supervisor task, crash history), and
//! [`Registry::set_state`], the one place a state changes and an event is
//! sent. The fields are private: the engine and the supervisor change a VM
//! only through the methods here.
//!
//! Never spawns, signals or talks QMP: the process lives in `process.rs`,
//! and this module only records what the others found.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::broadcast;

use super::dir::VmDir;
use super::process::QemuPid;
use super::qmp::QmpClient;
use super::{VmEvent, VmSpec, VmState, VmStatus, VmmError};

/// The span every per-VM operation and supervisor runs in, so their events
/// carry `vm_id` without each one naming it.
pub(super) fn span(vm_id: &str) -> tracing::Span {
    tracing::info_span!("vm", vm_id = %vm_id)
}

pub(super) struct Registry {
    vms_dir: PathBuf,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    events: broadcast::Sender<VmEvent>,
}

pub(super) struct Vm {
    vm_id: String,
    dir: VmDir,
    /// One lifecycle operation at a time (start, stop, destroy, restart
    /// after a crash): two starts of one VM give one QEMU.
    op: tokio::sync::Mutex<()>,
    rt: Mutex<Runtime>,
}

struct Runtime {
    spec: VmSpec,
    state: VmState,
    since: SystemTime,
    pid: Option<QemuPid>,
    qmp: Option<Arc<QmpClient>>,
    /// A stop we asked for is under way: the coming exit is ours.
    stopping: bool,
    supervisor: Option<tokio::task::AbortHandle>,
    crashes: VecDeque<Instant>,
    resets: u64,
}

impl Registry {
    pub fn new(vms_dir: PathBuf) -> Registry {
        // Generous: a subscriber that lags this far behind gets `Lagged`.
        let (events, _) = broadcast::channel(1024);
        Registry {
            vms_dir,
            vms: Mutex::new(HashMap::new()),
            events,
        }
    }

    pub fn vms_dir(&self) -> &Path {
        &self.vms_dir
    }

    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    /// The VM's entry, created with `initial` state (from vm.json's view:
    /// nothing runs yet) when unknown.
    pub fn entry(&self, spec: &VmSpec, initial: VmState) -> Arc<Vm> {
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
                        resets: 0,
                    }),
                })
            })
            .clone()
    }

    pub fn get(&self, vm_id: &str) -> Option<Arc<Vm>> {
        self.vms.lock().unwrap().get(vm_id).cloned()
    }

    /// A VM in memory, or one whose directory holds a vm.json.
    pub fn known(&self, vm_id: &str) -> Result<Arc<Vm>, VmmError> {
        super::validate_vm_id(vm_id)?;
        if let Some(vm) = self.get(vm_id) {
            return Ok(vm);
        }
        let dir = VmDir::new(&self.vms_dir, vm_id);
        let spec = dir
            .read_spec()
            .map_err(|_| VmmError::UnknownVm(vm_id.to_owned()))?;
        let vm = self.entry(&spec, VmState::Stopped);
        if let Some(pid) = QemuPid::live(&dir, vm_id) {
            // Unsupervised but alive (no reattach was done): count it as
            // running so stop/destroy deal with it.
            let mut rt = vm.rt.lock().unwrap();
            rt.state = VmState::Running;
            rt.pid = Some(pid);
        }
        Ok(vm)
    }

    pub fn all(&self) -> Vec<Arc<Vm>> {
        self.vms.lock().unwrap().values().cloned().collect()
    }

    pub fn remove(&self, vm_id: &str) {
        self.vms.lock().unwrap().remove(vm_id);
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
        tracing::info!(%from, %to, reason, "VM state");
        let _ = self.events.send(VmEvent {
            vm_id: vm.vm_id.clone(),
            from,
            to,
            reason: reason.to_owned(),
        });
        Ok(())
    }
}

impl Vm {
    pub fn id(&self) -> &str {
        &self.vm_id
    }

    pub fn dir(&self) -> &VmDir {
        &self.dir
    }

    /// Held for a whole lifecycle operation.
    pub async fn lock_op(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.op.lock().await
    }

    pub fn status(&self) -> VmStatus {
        let rt = self.rt.lock().unwrap();
        VmStatus {
            state: rt.state,
            pid: rt.pid.map(QemuPid::get),
            since: rt.since,
            resets: rt.resets,
        }
    }

    /// The guest reset itself (a reboot): the same QEMU goes on.
    pub fn note_reset(&self) {
        self.rt.lock().unwrap().resets += 1;
    }

    pub fn state(&self) -> VmState {
        self.rt.lock().unwrap().state
    }

    pub fn state_and_spec(&self) -> (VmState, VmSpec) {
        let rt = self.rt.lock().unwrap();
        (rt.state, rt.spec.clone())
    }

    pub fn spec(&self) -> VmSpec {
        self.rt.lock().unwrap().spec.clone()
    }

    pub fn set_spec(&self, spec: &VmSpec) {
        self.rt.lock().unwrap().spec = spec.clone();
    }

    /// The status, when the VM is running or starting and its recorded pid
    /// is still its QEMU.
    pub fn live_status(&self) -> Option<VmStatus> {
        let live = {
            let rt = self.rt.lock().unwrap();
            matches!(rt.state, VmState::Running | VmState::Paused | VmState::Starting)
                && rt.pid.is_some_and(|pid| pid.is_ours(&self.vm_id))
        };
        live.then(|| self.status())
    }

    /// The pid, when the VM runs, is supervised, and the pid is still its
    /// QEMU.
    pub fn supervised_pid(&self) -> Option<QemuPid> {
        let rt = self.rt.lock().unwrap();
        match (rt.state, rt.pid) {
            (VmState::Running | VmState::Paused, Some(pid))
                if rt.supervisor.is_some() && pid.is_ours(&self.vm_id) =>
            {
                Some(pid)
            }
            _ => None,
        }
    }

    /// Set the state without the state machine and without an event: only
    /// for what reattach finds of a VM this engine had no state for yet
    /// (there is no "from" to report).
    pub fn assume_state(&self, state: VmState) {
        let mut rt = self.rt.lock().unwrap();
        rt.state = state;
        rt.since = SystemTime::now();
    }

    /// A start on request forgets earlier crashes.
    pub fn clear_crashes(&self) {
        self.rt.lock().unwrap().crashes.clear();
    }

    /// Count a crash now, forget those older than `window`, and return how
    /// many remain.
    pub fn record_crash(&self, window: Duration) -> u32 {
        let mut rt = self.rt.lock().unwrap();
        let now = Instant::now();
        rt.crashes.push_back(now);
        while rt
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            rt.crashes.pop_front();
        }
        rt.crashes.len() as u32
    }

    pub fn is_stopping(&self) -> bool {
        self.rt.lock().unwrap().stopping
    }

    /// Mark a stop as ours (so the supervisor leaves the exit alone) and
    /// return what the stop works with: state, recorded pid, QMP client.
    pub fn begin_stop(&self) -> (VmState, Option<QemuPid>, Option<Arc<QmpClient>>) {
        let mut rt = self.rt.lock().unwrap();
        rt.stopping = true;
        (rt.state, rt.pid, rt.qmp.clone())
    }

    /// Our stop is over: no process, no client, no stop under way.
    pub fn end_stop(&self) {
        let mut rt = self.rt.lock().unwrap();
        rt.pid = None;
        rt.qmp = None;
        rt.stopping = false;
    }

    /// The QEMU exited: forget its pid and client.
    pub fn clear_process(&self) {
        let mut rt = self.rt.lock().unwrap();
        rt.pid = None;
        rt.qmp = None;
    }

    /// A QEMU runs again (restarted by the supervisor).
    pub fn set_process(&self, pid: QemuPid, qmp: Arc<QmpClient>) {
        let mut rt = self.rt.lock().unwrap();
        rt.pid = Some(pid);
        rt.qmp = Some(qmp);
    }

    /// The supervisor's QMP client, while a QEMU runs.
    pub fn qmp(&self) -> Option<Arc<QmpClient>> {
        self.rt.lock().unwrap().qmp.clone()
    }

    pub fn set_qmp(&self, qmp: Option<Arc<QmpClient>>) {
        self.rt.lock().unwrap().qmp = qmp;
    }

    /// Record `pid` and its client as this VM's QEMU and replace the
    /// supervisor with the one `spawn` starts. `spawn` runs under the
    /// runtime lock, so nobody sees the new process without its supervisor.
    pub fn adopt(&self, pid: QemuPid, qmp: Arc<QmpClient>, spawn: impl FnOnce() -> tokio::task::AbortHandle) {
        let mut rt = self.rt.lock().unwrap();
        rt.pid = Some(pid);
        rt.qmp = Some(qmp);
        rt.stopping = false;
        if let Some(old) = rt.supervisor.take() {
            old.abort();
        }
        rt.supervisor = Some(spawn());
    }

    pub fn stop_supervisor(&self) {
        if let Some(sup) = self.rt.lock().unwrap().supervisor.take() {
            sup.abort();
        }
    }

    /// Stop supervising and drop the QMP client; the QEMU runs on.
    pub fn detach(&self) {
        let mut rt = self.rt.lock().unwrap();
        rt.qmp = None;
        if let Some(sup) = rt.supervisor.take() {
            sup.abort();
        }
    }
}
