//! The real parts behind the orchestrator's ports: thin adapters from
//! `vmm::Engine`, `net::Network` and `proxy::Proxy` to `hosting::ports`, and
//! the start-up order that brings them up. Nothing here decides anything the
//! modules own; it only translates.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use ipnet::Ipv4Net;

use crate::config::{Paths, ServeArgs};
use crate::hosting::ports::{
    HealthCheck, PortError, SiteProxy, SystemInfo, VmEngine, VmLaunch, VmNetwork, VmRunState, VmStateEvent,
};
use crate::image::Image;
use crate::net::{self, NetOptions, Network};
use crate::proxy::{self, Proxy, ProxyOptions};
use crate::store::{Hosting, Store};
use crate::vmm::{self, Engine, EngineOptions, Plan, VmNet, VmSpec, VmState};

/// How long a user's stop waits for the guest to power down before forcing.
const USER_STOP_TIMEOUT: Duration = Duration::from_secs(20);

impl vmm::TapOpener for Network {
    fn open(&self, tap_name: &str) -> std::io::Result<OwnedFd> {
        self.open_tap(tap_name)
    }
}

/// The engine, with what is the same for every VM: plan and image.
pub struct EngineAdapter {
    pub engine: Arc<Engine>,
    pub plan: Plan,
    pub image: Image,
}

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
        }
    }
}

impl EngineAdapter {
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

    async fn spawn(&self, vm: &VmLaunch) -> Result<(), PortError> {
        self.engine.start(&self.spec(vm)).await?;
        Ok(())
    }

    async fn kill(&self, vm_id: &str) -> Result<(), PortError> {
        self.adopt(vm_id).await;
        match self.engine.stop(vm_id, Duration::ZERO).await {
            Ok(()) | Err(vmm::VmmError::UnknownVm(_)) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    async fn stop(&self, vm_id: &str) -> Result<(), PortError> {
        Ok(self.engine.stop(vm_id, USER_STOP_TIMEOUT).await?)
    }

    async fn restart(&self, vm: &VmLaunch) -> Result<(), PortError> {
        match self.engine.restart(&vm.vm_id).await {
            Ok(_) => Ok(()),
            // Not known since this start (stopped before a restart of the
            // service): start it from its launch description.
            Err(vmm::VmmError::UnknownVm(_)) => self.spawn(vm).await,
            Err(err) => Err(err.into()),
        }
    }

    async fn destroy(&self, vm_id: &str) -> Result<(), PortError> {
        self.adopt(vm_id).await;
        self.engine.destroy(vm_id).await?;
        match tokio::fs::remove_dir_all(self.engine.vm_dir(vm_id).root()).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
            _ => Ok(()),
        }
    }

    fn run_state(&self, vm_id: &str) -> Option<VmRunState> {
        self.engine.status(vm_id).map(|status| match status.state {
            VmState::Running => VmRunState::Running,
            VmState::Stopped => VmRunState::Stopped,
            VmState::Failed => VmRunState::Failed,
            _ => VmRunState::Other,
        })
    }

    fn serial_log(&self, vm_id: &str) -> PathBuf {
        self.engine.vm_dir(vm_id).serial_log()
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<VmStateEvent>> {
        let mut events = self.engine.subscribe();
        let (tx, rx) = tokio::sync::broadcast::channel(1024);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let state = match event.to {
                            VmState::Running => VmRunState::Running,
                            VmState::Stopped => VmRunState::Stopped,
                            VmState::Failed => VmRunState::Failed,
                            _ => continue,
                        };
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

pub struct NetworkAdapter(pub Arc<Network>);

#[async_trait]
impl VmNetwork for NetworkAdapter {
    fn subnet(&self) -> Ipv4Net {
        self.0.subnet()
    }

    fn gateway(&self) -> Ipv4Addr {
        self.0.gateway()
    }

    fn port_is_free(&self, port: u16) -> bool {
        net::alloc::port_is_free(self.0.options().ssh_bind, port)
    }

    fn tap_name(&self, vm_id: &str) -> String {
        net::tap_name(vm_id)
    }

    async fn create_tap(&self, vm_id: &str) -> Result<String, PortError> {
        Ok(self.0.create_tap(vm_id).await?)
    }

    async fn delete_tap(&self, vm_id: &str) -> Result<(), PortError> {
        Ok(self.0.delete_tap(vm_id).await?)
    }

    async fn add_forward(&self, vm_id: &str, host_port: u16, guest_ip: Ipv4Addr) -> Result<(), PortError> {
        Ok(self.0.add_forward(vm_id, host_port, guest_ip).await?)
    }

    async fn remove_forward(&self, vm_id: &str) -> Result<(), PortError> {
        Ok(self.0.remove_forward(vm_id).await?)
    }
}

pub struct ProxyAdapter(pub Arc<Proxy>);

#[async_trait]
impl SiteProxy for ProxyAdapter {
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

/// Health of the parts outside the database, for `/health/detailed`.
pub struct System {
    pub paths: Paths,
    pub args: ServeArgs,
    pub engine: Arc<Engine>,
    pub network: Arc<Network>,
    pub proxy: Arc<Proxy>,
}

#[async_trait]
impl SystemInfo for System {
    async fn checks(&self) -> Vec<HealthCheck> {
        let mut checks: Vec<HealthCheck> = crate::doctor::checks(&self.paths, &self.args.vmm)
            .into_iter()
            .map(|c| HealthCheck {
                name: c.name.into(),
                ok: c.ok,
                required: c.required,
                detail: c.detail,
            })
            .collect();
        let netns = self.network.options().netns_path();
        checks.push(HealthCheck {
            name: "namespace".into(),
            ok: netns.exists(),
            required: true,
            detail: netns.display().to_string(),
        });
        let master = self.proxy.master_pid();
        checks.push(HealthCheck {
            name: "nginx master".into(),
            ok: master.is_some(),
            required: true,
            detail: master.map_or_else(|| "not running".into(), |pid| format!("pid {pid}")),
        });
        let mut by_state = std::collections::BTreeMap::<String, usize>::new();
        for (_, status) in self.engine.list() {
            *by_state.entry(status.state.to_string()).or_default() += 1;
        }
        checks.push(HealthCheck {
            name: "vms".into(),
            ok: true,
            required: false,
            detail: serde_json::to_string(&by_state).unwrap_or_default(),
        });
        checks
    }

    async fn qemu_version(&self) -> Option<String> {
        crate::doctor::tool_version(
            &self.args.vmm.qemu.display().to_string(),
            &["--version"],
            "qemu-system-x86",
        )
        .ok()
    }
}

/// The running parts, held for the life of `serve`.
pub struct Live {
    pub engine: Arc<Engine>,
    pub network: Arc<Network>,
    pub proxy: Arc<Proxy>,
    pub engine_adapter: Arc<EngineAdapter>,
}

/// Brings up image, network, engine and nginx, in that order: each later part
/// needs the earlier ones (the engine opens taps in the namespace).
pub async fn start(paths: &Paths, args: &ServeArgs) -> anyhow::Result<Live> {
    let cache = paths.image_cache.clone();
    let image = tokio::task::spawn_blocking(move || crate::image::ensure(&cache))
        .await
        .context("the image build task")?
        .context("the guest image")?;
    let plan = Plan::load(&args.plan).with_context(|| format!("the VM plan {:?}", args.plan))?;
    let network = Arc::new(
        Network::up(NetOptions::from(&args.net))
            .await
            .with_context(|| format!("setting up the VM network (namespace {})", args.net.netns))?,
    );
    let mut opts = EngineOptions::new(paths.vms_dir());
    opts.qemu = args.vmm.qemu.clone();
    opts.accel = args.vmm.accel;
    opts.tap_opener = Some(network.clone() as Arc<dyn vmm::TapOpener>);
    let engine = Arc::new(Engine::new(opts).context("starting the VM engine")?);
    let mut proxy_opts = ProxyOptions::new(paths.nginx_dir(), args.http_addr);
    proxy_opts.site_domain = args.site_domain.clone();
    proxy_opts.docs_url = format!("http://{}/docs", crate::hosting::probe::reachable(args.api_addr));
    let proxy = Arc::new(
        Proxy::start(proxy_opts)
            .await
            .context("starting the nginx front")?,
    );
    let engine_adapter = Arc::new(EngineAdapter {
        engine: engine.clone(),
        plan,
        image,
    });
    Ok(Live {
        engine,
        network,
        proxy,
        engine_adapter,
    })
}

/// `webhoster teardown`: stops every VM of the state dir and the nginx master,
/// and removes the VM network. Disks, seeds and the database stay.
pub async fn teardown(paths: &Paths, args: &crate::config::NetArgs) -> anyhow::Result<()> {
    let engine = Engine::new(EngineOptions::new(paths.vms_dir())).context("opening the VM engine")?;
    let mut specs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(paths.vms_dir()) {
        for entry in entries.flatten() {
            let vm_id = entry.file_name().to_string_lossy().into_owned();
            if let Ok(spec) = engine.vm_dir(&vm_id).read_spec() {
                specs.push(spec);
            }
        }
    }
    for (vm_id, outcome) in engine.reattach(&specs).await {
        if let Ok(vmm::ReattachOutcome::Reattached { .. }) = outcome {
            engine
                .stop(&vm_id, Duration::ZERO)
                .await
                .with_context(|| format!("stopping VM {vm_id}"))?;
        }
    }
    engine.detach_all().await;
    proxy::stop(&paths.nginx_dir(), Duration::from_secs(10)).context("stopping nginx")?;
    Network::down(&NetOptions::from(args))
        .await
        .context("removing the VM network")?;
    Ok(())
}

impl Live {
    /// At start, before the API accepts work: reattach to the QEMU of every
    /// hosting that should run (same pid, guest untouched), start the ones
    /// whose QEMU is gone, and remove taps, forwards and sites that belong to
    /// no hosting (what a crash left behind).
    pub async fn reconcile(&self, store: &Store) -> anyhow::Result<()> {
        let hostings = store.all_hostings().await.context("listing hostings")?;
        let should_run: Vec<&Hosting> = hostings.iter().filter(|h| h.status == "running").collect();
        let specs: Vec<VmSpec> = should_run
            .iter()
            .filter_map(|h| match self.engine.vm_dir(&h.vm_id).read_spec() {
                Ok(spec) => Some(spec),
                Err(err) => {
                    tracing::warn!(vm_id = %h.vm_id, error = %err, "no vm.json: cannot reattach");
                    None
                }
            })
            .collect();
        for (vm_id, outcome) in self.engine.reattach(&specs).await {
            match outcome {
                Ok(vmm::ReattachOutcome::Reattached { pid }) => tracing::info!(%vm_id, pid, "reattached"),
                Ok(other) => {
                    tracing::warn!(%vm_id, found = ?other, "QEMU is gone while the hosting should run: starting it");
                    let spec = specs
                        .iter()
                        .find(|s| s.vm_id == vm_id)
                        .expect("reattach answers for our specs");
                    if let Err(err) = self.engine.start(spec).await {
                        tracing::error!(%vm_id, error = %crate::hosting::chain(&err), "start after reattach failed");
                    }
                }
                Err(err) => tracing::error!(%vm_id, error = %crate::hosting::chain(&err), "reattach failed"),
            }
        }
        let known: HashSet<String> = hostings.iter().map(|h| h.vm_id.clone()).collect();
        let reclaimed = self
            .network
            .reclaim(&known)
            .await
            .context("reclaiming the network")?;
        tracing::info!(?reclaimed, "network reconciled");
        let users: HashSet<i64> = hostings.iter().map(|h| h.user_id).collect();
        for site in self.proxy.sites().await.context("listing sites")? {
            if !users.contains(&site.user_id) {
                tracing::info!(user_id = site.user_id, "removing a site with no hosting");
                self.proxy
                    .remove_site(site.user_id)
                    .await
                    .context("removing a stale site")?;
            }
        }
        Ok(())
    }
}
