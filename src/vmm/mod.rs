//! vmm: the VM engine. Owns qemu-system processes (spawned detached, in their
//! own session), their QMP sockets and guest-agent channels, the per-VM
//! directories under `<state>/vms/`, the lifecycle state of each VM and its
//! supervision (crash restarts with backoff). Never touches netlink, nginx or SQL: a tap
//! arrives as an open fd from a [`TapOpener`], and state changes leave as
//! [`VmEvent`]s for the orchestrator to persist.
//!
//! Snapshot templates (`template.rs`: build, save, load; the RAM in a sealed
//! memfd) and their clones (`clone.rs`: restored paused, resumed and
//! personalised) run through the same launcher, registry and supervisor.

pub mod accel;
mod backup;
pub mod cgroup;
pub mod cli;
mod clone;
pub mod cmdline;
pub mod dir;
mod disk;
mod engine;
mod guest;
mod logs;
mod meter;
pub mod plan;
mod process;
pub mod qga;
pub mod qga_keep;
pub mod qmp;
mod registry;
pub mod sandbox;
pub mod scan;
pub mod state;
mod supervisor;
mod template;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::logfile::LogCap;

pub use accel::AccelChoice;
pub use backup::{BackupOutcome, BackupProgress, BackupRequest};
pub use cgroup::{CgroupLimits, CgroupMode, CgroupOptions, Cgroups};
pub use clone::{CLONE_AGENT, CloneReport};
pub use cmdline::Snapshot;
pub use dir::VmDir;
pub use engine::{DEFAULT_STOP_TIMEOUT, Engine};
pub use guest::GuestSystemState;
pub use meter::{VmCounters, clock_ticks_per_second, process_usage};
pub use plan::{Plan, PlanError};
pub use process::snapshot_argv_for;
pub use process::{START_TIMEOUT, argv_for};
pub use qga::{QgaClient, QgaError};
pub use qmp::QmpError;
pub use sandbox::QemuIds;
pub use state::{InvalidTransition, VmState};
pub use template::{Template, TemplateMeta, TemplateRequest, TemplateTimings, template_key};

/// Everything needed to run one VM. Persisted as `<vms_dir>/<vm_id>/vm.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vm_id: String,
    pub plan: Plan,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The base image the disk overlays (qcow2 or raw).
    pub base_disk: PathBuf,
    /// Kernel command line.
    pub append: String,
    pub seed_iso: PathBuf,
    pub net: VmNet,
    /// Shown by `webhoster vm list`: `owner`, `ip`, `ssh_port`, ...
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Set while the VM is a clone restored from a template and not yet
    /// resumed ([`Engine::start_clone`]); cleared (and persisted) before the
    /// resume, so every later start is a plain cold boot of its own disk.
    /// A clone that dies while this is set is not restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<Restore>,
}

/// Which template a paused clone was restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restore {
    pub template_key: String,
    pub template_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VmNet {
    None,
    /// QEMU user networking, `restrict=on` (no egress); each entry forwards
    /// a host address to a guest TCP port.
    User {
        hostfwd: Vec<(SocketAddr, u16)>,
    },
    /// The NIC with no backend: what a template boots with (see
    /// `cmdline::Nic::Detached`).
    Detached,
    /// A persistent tap opened through the engine's [`TapOpener`].
    Tap {
        tap_name: String,
        mac: String,
    },
}

impl VmSpec {
    /// vm_ids become directory names, QEMU option values and parts of host
    /// interface names: keep them to a safe alphabet.
    pub fn validate(&self) -> Result<(), VmmError> {
        validate_vm_id(&self.vm_id)?;
        self.plan.validate()?;
        if let VmNet::Tap { mac, .. } = &self.net {
            let ok = mac.len() == 17
                && mac.split(':').count() == 6
                && mac
                    .split(':')
                    .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok());
            if !ok {
                return Err(VmmError::BadSpec(format!("MAC {mac:?} is not aa:bb:cc:dd:ee:ff")));
            }
        }
        Ok(())
    }
}

/// An error and its sources, `a: b: c`, for log lines.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub fn validate_vm_id(vm_id: &str) -> Result<(), VmmError> {
    let ok = !vm_id.is_empty()
        && vm_id.len() <= 64
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !vm_id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(VmmError::BadSpec(format!(
            "vm_id {vm_id:?} must be 1-64 characters of a-z, 0-9, '-', '_', not starting with '-'"
        )))
    }
}

/// Opens a persistent tap by name and returns its fd (the net module
/// implements it inside its namespace). Called on every (re)spawn.
pub trait TapOpener: Send + Sync {
    fn open(&self, tap_name: &str) -> std::io::Result<OwnedFd>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmState,
    pub pid: Option<i32>,
    /// When the VM entered `state`.
    pub since: SystemTime,
    /// Guest resets (reboots) this webhoster has seen.
    pub resets: u64,
}

/// One state change, for the orchestrator to persist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    pub vm_id: String,
    pub from: VmState,
    pub to: VmState,
    pub reason: String,
}

/// What [`Engine::reattach`] found for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReattachOutcome {
    /// Its QEMU runs: now supervised again, same pid, guest untouched.
    Reattached { pid: i32 },
    /// No QEMU and no sign of a crash: it was stopped.
    Stopped,
    /// No QEMU, but a pidfile was left behind (QEMU did not exit cleanly),
    /// or the pidfile named a process that is not this VM.
    Crashed { reason: String },
}

/// Crash handling: restart after `backoff_initial * 2^(n-1)` (capped at
/// `backoff_max`); `max_crashes` crashes within `window` make the VM `failed`.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub max_crashes: u32,
    pub window: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_crashes: 5,
            window: Duration::from_secs(600),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

impl RestartPolicy {
    /// Delay before the restart that follows crash number `n` (1-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff_initial
            .checked_mul(factor)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }
}

pub struct EngineOptions {
    /// `<state>/vms`.
    pub vms_dir: PathBuf,
    /// The qemu-system binary (a name is looked up in PATH).
    pub qemu: PathBuf,
    pub accel: crate::config::Accel,
    pub tap_opener: Option<Arc<dyn TapOpener>>,
    pub restart: RestartPolicy,
    /// Per-VM cgroups (memory and pids limits): see [`cgroup`].
    pub cgroups: CgroupOptions,
    /// The ids QEMUs run as, one per VM (see [`sandbox`]).
    pub qemu_ids: QemuIds,
    /// Cap of each VM's `serial.log` and `qemu.log`.
    pub log_cap: LogCap,
}

impl EngineOptions {
    /// The defaults are the hardened ones: cgroups where the host has them,
    /// each QEMU as its own id from [`sandbox::DEFAULT_QEMU_IDS`].
    pub fn new(vms_dir: PathBuf) -> EngineOptions {
        EngineOptions {
            vms_dir,
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: crate::config::Accel::Auto,
            tap_opener: None,
            restart: RestartPolicy::default(),
            cgroups: CgroupOptions::default(),
            qemu_ids: sandbox::DEFAULT_QEMU_IDS
                .parse()
                .expect("the default QEMU id range parses"),
            log_cap: LogCap::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{program} not found: install the Debian package qemu-system-x86")]
    QemuMissing { program: String },
    #[error("qemu-img not found: install the Debian package qemu-utils")]
    QemuImgMissing,
    #[error("unknown VM {0:?}")]
    UnknownVm(String),
    #[error("VM {0:?} is not running")]
    NotRunning(String),
    #[error("VM {0:?} is still running")]
    StillRunning(String),
    #[error("VM {vm_id}: backup {id}: {why}")]
    Backup { vm_id: String, id: i64, why: String },
    #[error("invalid VM spec: {0}")]
    BadSpec(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("VM {vm_id}: disk {path} does not exist (create_disk first)")]
    NoDisk { vm_id: String, path: PathBuf },
    #[error("VM {vm_id}: the spec has a tap but the engine has no tap opener")]
    NoTapOpener { vm_id: String },
    #[error("VM {vm_id}: cannot open tap {tap_name}")]
    Tap {
        vm_id: String,
        tap_name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm_id}: {what}")]
    Io {
        vm_id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm_id}: qemu-img failed: {stderr}")]
    QemuImg { vm_id: String, stderr: String },
    #[error("VM {vm_id}: QEMU exited during start ({status}); its log ends with:\n{log_tail}")]
    StartExited {
        vm_id: String,
        status: String,
        log_tail: String,
    },
    #[error("VM {vm_id}: QEMU did not answer on QMP within {after:?}")]
    StartTimeout { vm_id: String, after: Duration },
    #[error("VM {vm_id}: QEMU reports status {status:?}, not running")]
    NotRunningAfterStart { vm_id: String, status: String },
    #[error("VM {vm_id}: QMP")]
    Qmp {
        vm_id: String,
        #[source]
        source: QmpError,
    },
    #[error("VM {vm_id}: guest agent")]
    GuestAgent {
        vm_id: String,
        #[source]
        source: QgaError,
    },
    #[error("VM {vm_id}: QEMU pid {pid} is still alive after SIGKILL")]
    Unkillable { vm_id: String, pid: i32 },
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error("VM {vm_id}: its cgroup")]
    Cgroup {
        vm_id: String,
        #[source]
        source: cgroup::CgroupError,
    },
    #[error("per-VM cgroups are required (--vm-cgroups required) but cannot be used")]
    CgroupsRequired(#[source] cgroup::CgroupError),
    #[error("the cgroup setup")]
    CgroupSetup(#[source] cgroup::CgroupError),
    #[error("VM {vm_id}: migration {what}: {why}")]
    Migration {
        vm_id: String,
        what: String,
        why: String,
    },
    #[error("template {dir}: {why}")]
    Template { dir: PathBuf, why: String },
    #[error("VM {vm_id}: the clone's personalisation failed: {why}")]
    Personalise { vm_id: String, why: String },
    #[error("QEMU id range {range:?}: {reason}")]
    QemuIds { range: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RestartPolicy {
            max_crashes: 3,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(350));
        assert_eq!(p.backoff(40), Duration::from_millis(350));
    }

    #[test]
    fn vm_ids_are_checked() {
        assert!(validate_vm_id("vm-1a2b").is_ok());
        for bad in ["", "-x", "a,b", "A", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_vm_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = VmSpec {
            vm_id: "vm-1".into(),
            plan: Plan::load("small").unwrap(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            base_disk: "/b".into(),
            append: "console=ttyS0".into(),
            seed_iso: "/s".into(),
            net: VmNet::User {
                hostfwd: vec![("127.0.0.1:2222".parse().unwrap(), 22)],
            },
            labels: [("owner".to_owned(), "alice".to_owned())].into(),
            restore: None,
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), spec);
    }
}
