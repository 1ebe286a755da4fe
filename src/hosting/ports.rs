//! The ports through which the orchestrator drives the outside world. They are
//! shaped after the module contracts (`vmm::Engine`, `net::Network`,
//! `proxy::Proxy`, `seed`), so the real adapters (`crate::app::adapters`) are
//! thin, and so the orchestrator runs on fakes in fast tests.
//!
//! Two kinds of methods: the create steps and their undos, and the `ensure`
//! side that convergence uses to bring back what vanished (a host reboot, a
//! `teardown`, a deleted tap, a flushed nft table). Every undo-style method
//! (`remove_*`, `delete_*`, `kill`, `destroy`) and every `ensure`/`create`
//! method is idempotent: it is called again after a crash and on every
//! convergence pass, so "already there" and "already gone" are success.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use crate::vmm::{BackupOutcome, BackupProgress, BackupRequest};
use ipnet::Ipv4Net;

/// A failure reported by a port: the error of the part behind it. The
/// orchestrator logs the chain and tells the user which step failed, never
/// the text of the cause.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(transparent)]
    Vmm(#[from] crate::vmm::VmmError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error(transparent)]
    Seed(#[from] crate::seed::SeedError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A readiness probe's answer (connection refused, wrong status...).
    #[error("{0}")]
    Probe(String),
    #[error(transparent)]
    NotReady(#[from] super::steps::NotReady),
    /// These parts cannot do it (fakes, a host without templates).
    #[error("not supported here: {0}")]
    Unsupported(&'static str),
}

/// Everything the engine needs to know about one hosting's VM; the adapter
/// adds what is the same for all VMs (plan, kernel, base disk, cmdline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLaunch {
    pub vm_id: String,
    pub tap_name: String,
    pub mac: String,
    pub guest_ip: Ipv4Addr,
    pub ssh_port: u16,
    pub seed_iso: PathBuf,
    /// Shown by `webhoster vm list` (owner, ip, ssh_port).
    pub labels: Vec<(String, String)>,
}

/// What `spawn` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spawned {
    /// A new QEMU: the guest boots from its disk.
    Started,
    /// Its QEMU was already running (a restart of webhoster): supervised
    /// again, guest untouched.
    Adopted,
}

/// What the user's VM is doing, as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRunState {
    /// QEMU runs and the guest executes.
    Running,
    /// QEMU is being spawned.
    Starting,
    /// QEMU runs, the guest is paused (QMP `STOP`: an I/O error, a full disk).
    Paused,
    /// A stop is under way.
    Stopping,
    /// No QEMU.
    Stopped,
    /// QEMU exited unasked; the supervisor restarts it after a backoff.
    Crashed,
    /// Crashed too often: the supervisor gave up.
    Failed,
}

/// What the guest itself says about its boot, through the guest agent: the
/// image's `webhoster-ready.target` (its flag file), or for an image
/// without it `systemctl is-system-running`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestBoot {
    /// Ready: its doors are open and nothing left in the boot closes one.
    Done,
    /// Still booting.
    InProgress,
    /// Boot finished with failed units (`degraded`), or another answer.
    Other(String),
    /// No agent answered: early in the boot, or a guest whose agent is gone.
    NoAgent,
}

/// A VM changed state on its own (guest powered off, supervisor restarted
/// it): from `vmm::Engine::subscribe()`'s `VmEvent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStateEvent {
    pub vm_id: String,
    pub state: VmRunState,
}

/// The VM engine (`vmm::Engine`): disks, QEMU processes, serial logs.
#[async_trait]
pub trait VmEngine: Send + Sync {
    /// The VM's directory (`<state>/vms/<vm_id>`), where its seed ISO goes.
    fn vm_dir(&self, vm_id: &str) -> PathBuf;
    /// qcow2 overlay on the base image, sized by plan.
    async fn create_disk(&self, vm: &VmLaunch) -> Result<(), PortError>;
    async fn remove_disk(&self, vm_id: &str) -> Result<(), PortError>;
    /// Spawns QEMU (detached, supervised) and returns once QMP says running;
    /// a QEMU of this VM that already runs is adopted instead.
    async fn spawn(&self, vm: &VmLaunch) -> Result<Spawned, PortError>;
    /// Stops the VM at once (undo of `spawn`); no VM is success.
    async fn kill(&self, vm_id: &str) -> Result<(), PortError>;
    /// Graceful power-down, then force.
    async fn stop(&self, vm_id: &str) -> Result<(), PortError>;
    /// Graceful stop, then spawn again.
    async fn restart(&self, vm: &VmLaunch) -> Result<(), PortError>;
    /// Removes whatever is left of the VM: process, directory.
    async fn destroy(&self, vm_id: &str) -> Result<(), PortError>;
    /// None: the engine does not know the VM (not started since this start).
    fn run_state(&self, vm_id: &str) -> Option<VmRunState>;
    /// How many times the guest reset itself (rebooted) while this engine
    /// watched its QEMU: a change is an outage that needs no look to see.
    fn guest_resets(&self, vm_id: &str) -> u64;
    /// Whether the guest's boot is over, asked of the guest.
    async fn guest_boot(&self, vm_id: &str) -> GuestBoot;
    /// vm_ids with a directory or a QEMU process on this host (for the reaper).
    async fn vm_ids(&self) -> Result<Vec<String>, PortError>;
    /// The serial console log file.
    fn serial_log(&self, vm_id: &str) -> PathBuf;
    /// Bytes the VM's disk takes on the host: at most what a backup copies.
    fn disk_usage(&self, vm_id: &str) -> u64;
    /// A live backup of the running VM's disk (`vmm::backup`); `progress`
    /// follows the copy.
    async fn backup(
        &self,
        vm_id: &str,
        req: BackupRequest,
        progress: &tokio::sync::watch::Sender<BackupProgress>,
    ) -> Result<BackupOutcome, PortError>;
    /// Removes what an unfinished backup left (job, files). Idempotent.
    async fn abandon_backup(&self, vm_id: &str, id: i64) -> Result<(), PortError>;
    /// Deletes a backup's file; `child`, backed by it, keeps its content.
    /// Returns the child's new size.
    async fn delete_backup(&self, vm_id: &str, id: i64, child: Option<i64>)
    -> Result<Option<u64>, PortError>;
    /// Puts the stopped VM's disk back to a backup (old disk kept until the
    /// new one is whole).
    async fn restore_disk(&self, vm_id: &str, id: i64) -> Result<(), PortError>;
    /// Loads the template warm clones come from (the current image, plan
    /// and QEMU), or boots and saves it when there is none: slow, once per
    /// key. Returns its key.
    async fn prepare_template(&self) -> Result<String, PortError> {
        Err(PortError::Unsupported("templates"))
    }
    /// A warm clone of the template: its disk (on the template's), a
    /// rehearsal seed and a QEMU restored, warmed up and paused on its tap.
    async fn spawn_clone(&self, _vm: &VmLaunch) -> Result<(), PortError> {
        Err(PortError::Unsupported("templates"))
    }
    /// Runs a paused clone again and has its agent apply the seed now in its
    /// seed file (identity, users, address); from then on the VM is a plain
    /// one that boots from its own disk.
    async fn resume_clone(&self, _vm_id: &str) -> Result<(), PortError> {
        Err(PortError::Unsupported("templates"))
    }
    /// State changes the engine saw.
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<VmStateEvent>> {
        None
    }
}

/// What the VM network holds right now, read once per convergence pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetInventory {
    /// Tap names in the namespace.
    pub taps: std::collections::HashSet<String>,
    /// Ports (tap names) holding a guard, and whether it is whole (filter
    /// entry and permanent neighbour entry). A guard may outlive its tap.
    pub guards: std::collections::HashMap<String, bool>,
    /// vm_id -> (host port, guest address) of each SSH forward.
    pub forwards: std::collections::HashMap<String, (u16, Ipv4Addr)>,
}

/// The VM network (`net::Network`).
#[async_trait]
pub trait VmNetwork: Send + Sync {
    /// Namespace, bridge, veth, routes and nft tables are there, rebuilt if
    /// not. True when something had to be rebuilt.
    async fn ensure(&self) -> Result<bool, PortError>;
    async fn inventory(&self) -> Result<NetInventory, PortError>;
    /// Removes these taps (by name, with their guards) and the forwards of
    /// these vm_ids.
    async fn remove_orphans(&self, taps: &[String], forwards_of: &[String]) -> Result<(), PortError>;
    fn subnet(&self) -> Ipv4Net;
    fn gateway(&self) -> Ipv4Addr;
    /// Whether nothing on the host listens on this SSH forward port.
    fn port_is_free(&self, port: u16) -> bool;
    /// The VM's tap name (deterministic, at most 15 bytes).
    fn tap_name(&self, vm_id: &str) -> String;
    /// Creates the VM's tap behind its guard (it sends only from `mac` and
    /// `guest_ip`; the host side never learns another mapping for them) and
    /// returns its name. On an existing tap it puts back a missing guard.
    async fn create_tap(&self, vm_id: &str, mac: &str, guest_ip: Ipv4Addr) -> Result<String, PortError>;
    /// Creates the VM's tap with no guard and off the bridge: it can carry
    /// nothing until `create_tap` puts its guard in (a warm clone waiting
    /// for its address).
    async fn create_mute_tap(&self, _vm_id: &str) -> Result<String, PortError> {
        Err(PortError::Unsupported("mute taps"))
    }
    /// Deletes the VM's tap and its guard.
    async fn delete_tap(&self, vm_id: &str) -> Result<(), PortError>;
    async fn add_forward(&self, vm_id: &str, host_port: u16, guest_ip: Ipv4Addr) -> Result<(), PortError>;
    async fn remove_forward(&self, vm_id: &str) -> Result<(), PortError>;
}

/// One published site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub user_id: i64,
    pub username: String,
    pub upstream: SocketAddrV4,
}

/// The nginx front (`proxy::Proxy`).
#[async_trait]
pub trait SiteProxy: Send + Sync {
    /// The nginx master runs (started again if not). True when it had to be.
    async fn ensure(&self) -> Result<bool, PortError>;
    async fn sites(&self) -> Result<Vec<Site>, PortError>;
    async fn add_site(&self, site: &Site) -> Result<(), PortError>;
    async fn remove_site(&self, user_id: i64) -> Result<(), PortError>;
}

/// Writes and removes a VM's cloud-init seed ISO (`seed::write`).
#[async_trait]
pub trait SeedWriter: Send + Sync {
    async fn write(&self, spec: &crate::seed::SeedSpec, path: &std::path::Path) -> Result<(), PortError>;
    async fn remove(&self, path: &std::path::Path) -> Result<(), PortError>;
}

/// Readiness checks, from the host.
#[async_trait]
pub trait GuestProbe: Send + Sync {
    /// The guest answers HTTP on ip:80. Called repeatedly by the
    /// orchestrator until its deadline. `patience`: how long the door may
    /// take to answer once it took the connection. SSH is not knocked on
    /// here: each connection re-executes the guest's sshd, and the banner
    /// is read through the forward ([`GuestProbe::forwarded_ssh`]).
    async fn guest_site(&self, guest_ip: Ipv4Addr, patience: Duration) -> Result<(), PortError>;
    /// SSH shows its banner through the host's forward `ssh_port`.
    async fn forwarded_ssh(&self, ssh_port: u16, patience: Duration) -> Result<(), PortError>;
    /// The site answers through nginx at `/<user_id>/` and, when `doors`
    /// says so, SSH answers on the host's forward port.
    async fn published_ready(&self, user_id: i64, doors: Doors, patience: Duration) -> Result<(), PortError>;
}

/// The doors a look at a published hosting knocks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doors {
    /// The site through nginx, and SSH on the host's forward port.
    SiteAndSsh { ssh_port: u16 },
    /// The site only: SSH answered a moment ago (each SSH connection makes
    /// the guest's sshd re-execute itself, which is not free under TCG).
    Site,
}

/// One line of `GET /health/detailed`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthCheck {
    pub name: String,
    pub ok: bool,
    /// When false, a failure does not make the service unhealthy.
    pub required: bool,
    pub detail: String,
}

/// Checks of the parts outside the database (QEMU, accel, image cache,
/// namespace, nginx master...), and facts for `/version`.
#[async_trait]
pub trait SystemInfo: Send + Sync {
    async fn checks(&self) -> Vec<HealthCheck>;
    async fn qemu_version(&self) -> Option<String>;
    /// Bytes free where the VM disks live (None when unknown).
    async fn free_disk(&self) -> Option<u64>;
}

/// All the ports, as the orchestrator holds them.
#[derive(Clone)]
pub struct Ports {
    pub engine: Arc<dyn VmEngine>,
    pub network: Arc<dyn VmNetwork>,
    pub proxy: Arc<dyn SiteProxy>,
    pub seeder: Arc<dyn SeedWriter>,
    pub probe: Arc<dyn GuestProbe>,
    pub system: Arc<dyn SystemInfo>,
}
