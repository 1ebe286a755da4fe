//! The ports through which the orchestrator drives the outside world. They are
//! shaped after the module contracts (`vmm::Engine`, `net::Network`,
//! `proxy::Proxy`, `seed`), so the adapters from the real parts are thin, and
//! so the orchestrator runs on fakes in fast tests.
//!
//! How the real adapters map (for `serve::build_backends`):
//!
//! | port method | real part |
//! |---|---|
//! | `VmEngine::vm_dir` | `Paths::vm_dir(vm_id)` |
//! | `create_disk` | build a `vmm::VmSpec` from the launch + plan + `image::Image` + `image::KERNEL_CMDLINE`, `VmNet::Tap { tap_name, mac }`, labels; `engine.create_disk(&spec)` |
//! | `remove_disk` | remove `<vm_dir>/disk.qcow2` (missing is fine) |
//! | `spawn` | `engine.start(&spec)` |
//! | `kill` | `engine.stop(vm_id, Duration::ZERO)`; an unknown VM is fine |
//! | `stop` / `restart` | `engine.stop(vm_id, 30 s)` / `engine.restart(vm_id)` |
//! | `destroy` | `engine.destroy(vm_id)`; an unknown VM is fine |
//! | `run_state`, `subscribe` | `engine.status`, `engine.subscribe()` mapped to [`VmRunState`] |
//! | `serial_log` | `<vm_dir>/serial.log` |
//! | `VmNetwork::*` | `net::Network` (same names); `port_is_free` is `net::alloc::port_is_free(ssh_bind, port)` |
//! | `SiteProxy::*` | `proxy::Proxy::add_site` / `remove_site` |
//! | `SeedWriter` | [`super::seeder::IsoSeeder`] (done) |
//! | `GuestProbe` | [`super::probe::TcpProbe`] `{ http_addr, ssh_bind }` (done) |
//! | `SystemInfo` | `qemu --version`, `vmm::accel::decide`, `image::cached`, the namespace, the nginx master pid |
//!
//! Every undo-style method (`remove_*`, `delete_*`, `kill`, `destroy`) must be
//! idempotent: it is called again after a crash, and for a step that failed
//! half-way, so "already gone" is success.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::Ipv4Net;

/// A failure reported by a port. The orchestrator logs the chain and tells
/// the user which step failed, never the text of the cause.
pub type PortError = Box<dyn std::error::Error + Send + Sync + 'static>;

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

/// What the user's VM is doing, as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRunState {
    Running,
    Stopped,
    /// Crashed too often: the supervisor gave up.
    Failed,
    Other,
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
    /// Spawns QEMU (detached, supervised) and returns once QMP says running.
    async fn spawn(&self, vm: &VmLaunch) -> Result<(), PortError>;
    /// Stops the VM at once (undo of `spawn`); no VM is success.
    async fn kill(&self, vm_id: &str) -> Result<(), PortError>;
    /// Graceful power-down, then force.
    async fn stop(&self, vm_id: &str) -> Result<(), PortError>;
    async fn restart(&self, vm: &VmLaunch) -> Result<(), PortError>;
    /// Removes whatever is left of the VM: process, directory.
    async fn destroy(&self, vm_id: &str) -> Result<(), PortError>;
    fn run_state(&self, vm_id: &str) -> Option<VmRunState>;
    /// The serial console log file.
    fn serial_log(&self, vm_id: &str) -> PathBuf;
    /// State changes the engine saw (the adapter maps `VmEvent.to`: running
    /// -> Running; stopped and failed -> Stopped; the rest -> Other).
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<VmStateEvent>> {
        None
    }
}

/// The VM network (`net::Network`).
#[async_trait]
pub trait VmNetwork: Send + Sync {
    fn subnet(&self) -> Ipv4Net;
    fn gateway(&self) -> Ipv4Addr;
    /// Whether nothing on the host listens on this SSH forward port.
    fn port_is_free(&self, port: u16) -> bool;
    /// The VM's tap name (deterministic, at most 15 bytes).
    fn tap_name(&self, vm_id: &str) -> String;
    /// Creates the VM's tap and returns its name.
    async fn create_tap(&self, vm_id: &str) -> Result<String, PortError>;
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
    /// The guest answers HTTP on ip:80 and shows an SSH banner on ip:22.
    /// Called repeatedly by the orchestrator until its deadline.
    async fn guest_ready(&self, guest_ip: Ipv4Addr) -> Result<(), PortError>;
    /// The site answers through nginx at `/<user_id>/` and SSH answers on the
    /// host's forward port.
    async fn published_ready(&self, user_id: i64, ssh_port: u16) -> Result<(), PortError>;
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
