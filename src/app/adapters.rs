//! The real parts behind the orchestrator's ports: thin adapters from
//! `vmm::Engine`, `net::Network` and `proxy::Proxy` to `hosting::ports`.
//! Nothing here decides anything the modules own; it only translates, and
//! keeps the handles that a rebuild (network, nginx master) replaces.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::Ipv4Net;

use crate::hosting::ports::{
    GuestBoot, NetInventory, PortError, SiteProxy, Spawned, VmEngine, VmLaunch, VmNetwork, VmRunState,
    VmStateEvent,
};
use crate::image::Image;
use crate::net::{self, NetOptions, Network};
use crate::proxy::{self, Proxy};
use crate::vmm::{self, Engine, Plan, VmNet, VmSpec, VmState};

/// How long a stop waits for the guest to power down (ACPI) before QEMU is
/// told to quit. A Debian guest under TCG powers off in a few seconds; the
/// margin is for a loaded host.
pub const GRACEFUL_STOP: Duration = Duration::from_secs(30);

/// Opens taps in the namespace by its path, so it keeps working when the
/// network is rebuilt under the same name.
pub struct NsTaps(pub NetOptions);

impl vmm::TapOpener for NsTaps {
    fn open(&self, tap_name: &str) -> std::io::Result<OwnedFd> {
        net::open_tap(&self.0, tap_name)
    }
}

/// The engine, with what is the same for every VM: plan and image.
pub struct EngineAdapter {
    pub engine: Arc<Engine>,
    pub plan: Plan,
    pub image: Image,
    /// `<state>/vms`, absolute (QEMU command lines are matched against it).
    pub vms_dir: PathBuf,
    /// Where templates live: beside the image they come from, shared by
    /// every state dir of the host (a template holds no user's data).
    pub templates_dir: PathBuf,
    /// The login user every guest has (the template's seed makes it).
    pub login_user: String,
    /// The template warm clones come from, once loaded or built.
    pub template: tokio::sync::Mutex<Option<vmm::Template>>,
}

/// How long the template's guest may take to boot (under TCG, niced).
const TEMPLATE_BOOT: Duration = Duration::from_secs(600);
/// The template's seed: a static address (its NIC has no backend; the
/// address only keeps its boot from waiting for DHCP), matched by the MAC
/// a template's NIC has. Every clone's agent replaces all of it.
const TEMPLATE_ADDRESS: &str = "10.0.2.15/24";
const TEMPLATE_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

impl EngineAdapter {
    pub fn spec(&self, vm: &VmLaunch) -> VmSpec {
        VmSpec {
            vm_id: vm.vm_id.clone(),
            plan: self.plan.clone(),
            kernel: self.image.kernel.clone(),
            initrd: self.image.initrd.clone(),
            base_disk: self.image.disk.clone(),
            append: crate::image::KERNEL_CMDLINE.to_owned(),
            seed_iso: vm.seed_iso.clone(),
            net: VmNet::Tap {
                tap_name: vm.tap_name.clone(),
                mac: vm.mac.clone(),
            },
            labels: vm.labels.iter().cloned().collect(),
            restore: None,
        }
    }
}

impl EngineAdapter {
    /// A warm clone's spec: its disk is an overlay on the template's.
    fn clone_spec(&self, vm: &VmLaunch, template: &vmm::Template) -> VmSpec {
        VmSpec {
            base_disk: template.disk(),
            restore: Some(vmm::Restore {
                template_key: template.key().to_owned(),
                template_dir: template.dir().to_owned(),
            }),
            ..self.spec(vm)
        }
    }

    /// The template's own seed: the login user with a key nobody holds.
    fn template_seed(&self, key: &str) -> Result<crate::seed::SeedSpec, PortError> {
        self.stand_in_seed(
            format!("template-{}", key.get(..12).unwrap_or(key)),
            "webhoster-template",
            vmm::cmdline::USER_NET_MAC,
            "template",
        )
    }

    /// A seed like a create's for a clone's warm-up (`vmm::clone`): its
    /// instance-id is never a hosting's, and its address is never applied.
    fn rehearsal_seed(&self, vm: &VmLaunch) -> Result<crate::seed::SeedSpec, PortError> {
        self.stand_in_seed(format!("warm-up-{}", vm.vm_id), &vm.vm_id, &vm.mac, "warm-up")
    }

    /// A seed of a create's shape for no user: the login user with a key
    /// nobody holds, the template's address.
    fn stand_in_seed(
        &self,
        instance_id: String,
        hostname: &str,
        mac: &str,
        owner: &str,
    ) -> Result<crate::seed::SeedSpec, PortError> {
        let (key, _) = crate::auth::SshPublicKey::generate(&format!("{owner}@webhoster"))
            .map_err(|e| PortError::Probe(format!("a key for the {owner} seed: {e}")))?;
        Ok(crate::seed::SeedSpec {
            instance_id,
            hostname: hostname.to_owned(),
            user: self.login_user.clone(),
            ssh_keys: vec![key],
            owner: owner.to_owned(),
            network: Some(crate::seed::StaticNetwork {
                mac: mac.to_owned(),
                address: TEMPLATE_ADDRESS.parse().expect("a valid address"),
                gateway: TEMPLATE_GATEWAY,
            }),
        })
    }

    /// Loads the template of `key`, or builds it. Several services on one
    /// host share the directory: one builds, the others wait and load.
    async fn load_or_build(&self, key: &str) -> Result<vmm::Template, PortError> {
        std::fs::create_dir_all(&self.templates_dir)?;
        let lock = self.templates_dir.join(format!("{key}.lock"));
        let _held = tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock)?;
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| std::io::Error::from(errno))
        })
        .await
        .map_err(std::io::Error::other)??;
        let dir = self.templates_dir.join(key);
        if let Some(template) = self.engine.load_template(&dir).await? {
            return Ok(template);
        }
        let seed = self.templates_dir.join(format!("{key}.seed.iso"));
        crate::seed::write(&self.template_seed(key)?, &seed).await?;
        let spec = VmSpec {
            vm_id: "template".into(),
            plan: self.plan.clone(),
            kernel: self.image.kernel.clone(),
            initrd: self.image.initrd.clone(),
            base_disk: self.image.disk.clone(),
            append: crate::image::KERNEL_CMDLINE.to_owned(),
            seed_iso: seed.clone(),
            net: VmNet::Detached,
            labels: Default::default(),
            restore: None,
        };
        let built = self
            .engine
            .build_template(&vmm::TemplateRequest {
                key: key.to_owned(),
                dir,
                spec,
                ready_timeout: TEMPLATE_BOOT,
            })
            .await;
        let _ = std::fs::remove_file(&seed);
        Ok(built?)
    }

    /// Makes sure the engine manages `vm_id` if its QEMU runs: after a restart
    /// of the service, an undo may reach a VM that was never reattached (a
    /// create cut short by a crash), and its QEMU must not be left behind.
    async fn adopt(&self, vm_id: &str) {
        if self.engine.status(vm_id).is_some() {
            return;
        }
        let Ok(spec) = self.engine.vm_dir(vm_id).read_spec() else {
            return;
        };
        for (vm_id, outcome) in self.engine.reattach(std::slice::from_ref(&spec)).await {
            tracing::info!(%vm_id, ?outcome, "adopted a VM this process had not seen");
        }
    }
}

#[async_trait]
impl VmEngine for EngineAdapter {
    fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.engine.vm_dir(vm_id).root().to_owned()
    }

    async fn create_disk(&self, vm: &VmLaunch) -> Result<(), PortError> {
        self.engine.create_disk(&self.spec(vm)).await?;
        Ok(())
    }

    async fn remove_disk(&self, vm_id: &str) -> Result<(), PortError> {
        match tokio::fs::remove_file(self.engine.vm_dir(vm_id).disk()).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
            _ => Ok(()),
        }
    }

    async fn spawn(&self, vm: &VmLaunch) -> Result<Spawned, PortError> {
        let running = self.engine.vm_dir(&vm.vm_id).live_pid(&vm.vm_id).is_some();
        self.engine.start(&self.spec(vm)).await?;
        Ok(if running {
            Spawned::Adopted
        } else {
            Spawned::Started
        })
    }

    async fn kill(&self, vm_id: &str) -> Result<(), PortError> {
        self.adopt(vm_id).await;
        match self.engine.stop(vm_id, Duration::ZERO).await {
            Ok(()) | Err(vmm::VmmError::UnknownVm(_)) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    async fn stop(&self, vm_id: &str) -> Result<(), PortError> {
        match self.engine.stop(vm_id, GRACEFUL_STOP).await {
            Ok(()) | Err(vmm::VmmError::UnknownVm(_)) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    async fn restart(&self, vm: &VmLaunch) -> Result<(), PortError> {
        match self.engine.restart(&vm.vm_id).await {
            Ok(_) => Ok(()),
            // Not known since this start (stopped before a restart of the
            // service): start it from its launch description.
            Err(vmm::VmmError::UnknownVm(_)) => self.spawn(vm).await.map(|_| ()),
            Err(err) => Err(err.into()),
        }
    }

    async fn destroy(&self, vm_id: &str) -> Result<(), PortError> {
        self.adopt(vm_id).await;
        self.engine.destroy(vm_id).await?;
        // A QEMU whose directory was already gone is known to nobody but
        // /proc: a crash between removing the directory and the process.
        for (pid, _) in vmm::scan::qemu_processes(&self.vms_dir)
            .into_iter()
            .filter(|(_, id)| id == vm_id)
        {
            tracing::warn!(%vm_id, pid, "killing an orphaned QEMU");
            crate::sys::kill_process(pid, nix::sys::signal::Signal::SIGKILL);
        }
        // Its cgroup too, once the orphan (if any) has let go of it.
        self.engine.remove_cgroup(vm_id).await?;
        match tokio::fs::remove_dir_all(self.engine.vm_dir(vm_id).root()).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
            _ => Ok(()),
        }
    }

    fn disk_usage(&self, vm_id: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.engine.vm_dir(vm_id).disk()).map_or(0, |m| m.blocks() * 512)
    }

    async fn backup(
        &self,
        vm_id: &str,
        req: vmm::BackupRequest,
        progress: &tokio::sync::watch::Sender<vmm::BackupProgress>,
    ) -> Result<vmm::BackupOutcome, PortError> {
        Ok(self.engine.backup(vm_id, req, progress).await?)
    }

    async fn abandon_backup(&self, vm_id: &str, id: i64) -> Result<(), PortError> {
        Ok(self.engine.abandon_backup(vm_id, id).await?)
    }

    async fn delete_backup(
        &self,
        vm_id: &str,
        id: i64,
        child: Option<i64>,
    ) -> Result<Option<u64>, PortError> {
        Ok(self.engine.delete_backup(vm_id, id, child).await?)
    }

    async fn restore_disk(&self, vm_id: &str, id: i64) -> Result<(), PortError> {
        Ok(self.engine.restore_disk(vm_id, id).await?)
    }

    fn run_state(&self, vm_id: &str) -> Option<VmRunState> {
        self.engine.status(vm_id).map(|status| run_state(status.state))
    }

    fn guest_resets(&self, vm_id: &str) -> u64 {
        self.engine.status(vm_id).map_or(0, |status| status.resets)
    }

    async fn guest_boot(&self, vm_id: &str) -> GuestBoot {
        match self.engine.guest_system_state(vm_id).await {
            Ok(vmm::GuestSystemState::Running) => GuestBoot::Done,
            Ok(vmm::GuestSystemState::Starting) => GuestBoot::InProgress,
            Ok(vmm::GuestSystemState::Degraded) => GuestBoot::Other("degraded".into()),
            Ok(vmm::GuestSystemState::Other(state)) => GuestBoot::Other(state),
            Ok(vmm::GuestSystemState::NoAgent) => GuestBoot::NoAgent,
            Err(err) => {
                tracing::debug!(%vm_id, error = %crate::hosting::chain(&err), "asking the guest agent");
                GuestBoot::NoAgent
            }
        }
    }

    async fn vm_ids(&self) -> Result<Vec<String>, PortError> {
        let mut ids = std::collections::BTreeSet::new();
        match std::fs::read_dir(&self.vms_dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir())
                        && let Some(name) = entry.file_name().to_str()
                        && vmm::validate_vm_id(name).is_ok()
                    {
                        ids.insert(name.to_owned());
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err.into()),
        }
        ids.extend(
            vmm::scan::qemu_processes(&self.vms_dir)
                .into_iter()
                .map(|(_, id)| id),
        );
        Ok(ids.into_iter().collect())
    }

    fn serial_log(&self, vm_id: &str) -> PathBuf {
        self.engine.vm_dir(vm_id).serial_log()
    }

    async fn prepare_template(&self) -> Result<String, PortError> {
        let mut slot = self.template.lock().await;
        if let Some(template) = slot.as_ref() {
            return Ok(template.key().to_owned());
        }
        let qemu = self.engine.qemu_version().await?;
        let key = vmm::template_key(&self.image.manifest.key, &self.plan, &qemu, self.engine.accel().0);
        let template = self.load_or_build(&key).await?;
        *slot = Some(template);
        Ok(key)
    }

    async fn spawn_clone(&self, vm: &VmLaunch) -> Result<(), PortError> {
        let Some(template) = self.template.lock().await.clone() else {
            return Err(PortError::Probe("no template is loaded yet".into()));
        };
        let spec = self.clone_spec(vm, &template);
        self.engine.create_disk(&spec).await?;
        // The clone's seed drive is its template's device, whose size the
        // guest knows (every seed file has it). Until a create writes the
        // user's seed in place, it holds a seed of the same shape for the
        // warm-up to rehearse with.
        crate::seed::write(&self.rehearsal_seed(vm)?, &vm.seed_iso).await?;
        self.engine.start_clone(&spec, &template).await?;
        self.engine.warm_up_clone(&vm.vm_id).await?;
        Ok(())
    }

    async fn resume_clone(&self, vm_id: &str) -> Result<(), PortError> {
        // The engine logs the resume's step timings with the vm_id.
        self.engine.resume_clone(vm_id).await?;
        Ok(())
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<VmStateEvent>> {
        let mut events = self.engine.subscribe();
        let (tx, rx) = tokio::sync::broadcast::channel(1024);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let state = run_state(event.to);
                        if tx
                            .send(VmStateEvent {
                                vm_id: event.vm_id,
                                state,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => tracing::warn!(missed = n, "VM events lagged"),
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Some(rx)
    }
}

fn run_state(state: VmState) -> VmRunState {
    match state {
        VmState::Running => VmRunState::Running,
        VmState::Paused => VmRunState::Paused,
        VmState::Starting => VmRunState::Starting,
        VmState::Stopping => VmRunState::Stopping,
        VmState::Crashed => VmRunState::Crashed,
        VmState::Failed => VmRunState::Failed,
        VmState::Creating | VmState::Stopped | VmState::Deleting | VmState::Deleted => VmRunState::Stopped,
    }
}

/// The VM network, rebuilt in place when a part of it vanished.
pub struct NetworkAdapter {
    opts: NetOptions,
    current: tokio::sync::RwLock<Arc<Network>>,
}

impl NetworkAdapter {
    pub fn new(network: Arc<Network>) -> NetworkAdapter {
        NetworkAdapter {
            opts: network.options().clone(),
            current: tokio::sync::RwLock::new(network),
        }
    }

    /// The network as built last.
    pub async fn get(&self) -> Arc<Network> {
        self.current.read().await.clone()
    }
}

#[async_trait]
impl VmNetwork for NetworkAdapter {
    fn subnet(&self) -> Ipv4Net {
        self.opts.subnet
    }

    fn gateway(&self) -> Ipv4Addr {
        net::alloc::gateway(self.opts.subnet)
    }

    fn port_is_free(&self, port: u16) -> bool {
        net::alloc::port_is_free(self.opts.ssh_bind, port)
    }

    fn tap_name(&self, vm_id: &str) -> String {
        net::tap_name(vm_id)
    }

    async fn ensure(&self) -> Result<bool, PortError> {
        let missing = self.get().await.missing_parts().await?;
        if missing.is_empty() {
            return Ok(false);
        }
        let mut current = self.current.write().await;
        // Another caller may have rebuilt it while we waited.
        if current.missing_parts().await?.is_empty() {
            return Ok(false);
        }
        tracing::warn!(?missing, netns = %self.opts.netns, "parts of the VM network are gone: rebuilding");
        *current = Arc::new(Network::up(self.opts.clone()).await?);
        Ok(true)
    }

    async fn inventory(&self) -> Result<NetInventory, PortError> {
        let network = self.get().await;
        let (taps, guards, forwards) = tokio::join!(network.taps(), network.guards(), network.forwards());
        Ok(NetInventory {
            taps: taps?.into_iter().collect(),
            guards: guards?,
            forwards: forwards?
                .into_iter()
                .map(|f| (f.vm_id, (f.port, f.guest)))
                .collect(),
        })
    }

    async fn remove_orphans(&self, taps: &[String], forwards_of: &[String]) -> Result<(), PortError> {
        let network = self.get().await;
        for tap in taps {
            network.delete_tap_named(tap).await?;
        }
        for vm_id in forwards_of {
            network.remove_forward(vm_id).await?;
        }
        Ok(())
    }

    async fn create_tap(&self, vm_id: &str, mac: &str, guest_ip: Ipv4Addr) -> Result<String, PortError> {
        Ok(self.get().await.create_tap(vm_id, mac, guest_ip).await?)
    }

    async fn create_mute_tap(&self, vm_id: &str) -> Result<String, PortError> {
        Ok(self.get().await.create_mute_tap(vm_id).await?)
    }

    async fn delete_tap(&self, vm_id: &str) -> Result<(), PortError> {
        Ok(self.get().await.delete_tap(vm_id).await?)
    }

    async fn add_forward(&self, vm_id: &str, host_port: u16, guest_ip: Ipv4Addr) -> Result<(), PortError> {
        Ok(self.get().await.add_forward(vm_id, host_port, guest_ip).await?)
    }

    async fn remove_forward(&self, vm_id: &str) -> Result<(), PortError> {
        Ok(self.get().await.remove_forward(vm_id).await?)
    }
}

pub struct ProxyAdapter(pub Arc<Proxy>);

#[async_trait]
impl SiteProxy for ProxyAdapter {
    async fn ensure(&self) -> Result<bool, PortError> {
        Ok(self.0.ensure_running().await?)
    }

    async fn sites(&self) -> Result<Vec<crate::hosting::ports::Site>, PortError> {
        Ok(self
            .0
            .sites()
            .await?
            .into_iter()
            .map(|s| crate::hosting::ports::Site {
                user_id: s.user_id,
                username: s.username,
                upstream: s.upstream,
            })
            .collect())
    }

    async fn add_site(&self, site: &crate::hosting::ports::Site) -> Result<(), PortError> {
        let site = proxy::Site {
            user_id: site.user_id,
            username: site.username.clone(),
            upstream: site.upstream,
        };
        Ok(self.0.add_site(&site).await?)
    }

    async fn remove_site(&self, user_id: i64) -> Result<(), PortError> {
        Ok(self.0.remove_site(user_id).await?)
    }
}

/// The usage sampler's view of the real parts: the engine's per-VM counters
/// and the taps' counters of the network as built last.
pub struct UsageMeter {
    pub engine: Arc<Engine>,
    pub network: Arc<NetworkAdapter>,
}

#[async_trait]
impl crate::usage::Meter for UsageMeter {
    async fn read(&self) -> crate::usage::Reading {
        use crate::usage::{MeterError, Sample};
        let vms = self.engine.list();
        let running: Vec<&str> = vms
            .iter()
            .filter(|(_, s)| matches!(s.state, VmState::Running | VmState::Paused))
            .map(|(id, _)| id.as_str())
            .collect();
        // One link dump for every tap, and only when a VM runs.
        let taps = if running.is_empty() {
            Ok(Default::default())
        } else {
            self.network.get().await.tap_traffic().await.map_err(Arc::new)
        };
        let mut out = Vec::with_capacity(running.len());
        for vm_id in running {
            let result = async {
                let vm = self.engine.counters(vm_id).await?;
                let tap = net::tap_name(vm_id);
                let traffic = match &taps {
                    Ok(taps) => *taps.get(&tap).ok_or(MeterError::NoTap(tap))?,
                    Err(e) => return Err(MeterError::Network(e.clone())),
                };
                Ok(Sample {
                    at: 0,
                    cpu_seconds: vm.cpu_seconds,
                    rss_bytes: vm.rss_bytes,
                    disk_read_bytes: vm.disk_read_bytes,
                    disk_write_bytes: vm.disk_write_bytes,
                    net_rx_bytes: traffic.guest_received_bytes,
                    net_tx_bytes: traffic.guest_transmitted_bytes,
                })
            }
            .await;
            out.push((vm_id.to_owned(), result));
        }
        crate::usage::Reading {
            known: vms.into_iter().map(|(id, _)| id).collect(),
            vms: out,
        }
    }
}
