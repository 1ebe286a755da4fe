//! In-memory fakes of every port, for fast tests and the API bench (which
//! includes this file by path). They
//! record each call (`"engine.spawn vm-..."`), keep the resources they "hold"
//! so a test can assert that nothing leaked, and fail or hang on request at
//! any named method. A fake is never the proof that a real part works.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ipnet::Ipv4Net;

use webhoster::hosting::Step;
use webhoster::hosting::ports::*;
use webhoster::seed::SeedSpec;

/// What the fakes hold right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub seeds: BTreeSet<PathBuf>,
    pub disks: BTreeSet<String>,
    /// (vm_id, backup id): they live beside the disk and go with it.
    pub backups: BTreeSet<(String, i64)>,
    pub taps: BTreeSet<String>,
    /// tap -> (MAC, address) its guard lets it send from.
    pub guards: BTreeMap<String, (String, Ipv4Addr)>,
    /// vm_id -> running
    pub vms: BTreeMap<String, bool>,
    /// Warm clones restored and paused (not yet resumed).
    pub clones: BTreeSet<String>,
    pub forwards: BTreeMap<String, (u16, Ipv4Addr)>,
    pub sites: BTreeMap<i64, Site>,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        *self == Held::default()
    }
}

#[derive(Default)]
struct World {
    calls: Vec<String>,
    fail: HashSet<String>,
    hang: HashSet<String>,
    delay: std::collections::HashMap<String, std::time::Duration>,
    held: Held,
    unhealthy: BTreeSet<String>,
    proxy_down: bool,
    free_disk: Option<u64>,
    panic: HashSet<String>,
    /// None: the boot is done.
    guest_boot: Option<GuestBoot>,
    /// Calls of the SystemInfo methods (the real ones run programs).
    system_probes: usize,
    /// The engine makes templates and warm clones.
    templates: bool,
    /// vm_id -> guest resets.
    resets: std::collections::HashMap<String, u64>,
}

pub struct FakeWorld {
    events: tokio::sync::broadcast::Sender<VmStateEvent>,
    dir: PathBuf,
    subnet: Ipv4Net,
    world: Mutex<World>,
}

/// The port method that does `step` (for failure injection by step).
pub fn step_method(step: Step) -> &'static str {
    match step {
        Step::Seed => "seed.write",
        Step::Disk => "engine.create_disk",
        Step::Tap => "net.create_tap",
        Step::Spawn => "engine.spawn",
        // Only looks at the clone's state: fails when the clone is gone.
        Step::Claim => "engine.run_state",
        Step::Resume => "engine.resume_clone",
        Step::Forward => "net.add_forward",
        Step::Ready => "probe.guest_site",
        Step::Proxy => "proxy.add_site",
        Step::Publish => "probe.published_ready",
    }
}

impl FakeWorld {
    /// `dir` is where VM directories would be (serial logs are read from there).
    pub fn new(dir: &Path, subnet: Ipv4Net) -> Arc<FakeWorld> {
        Arc::new(FakeWorld {
            events: tokio::sync::broadcast::channel(64).0,
            dir: dir.to_owned(),
            subnet,
            world: Mutex::new(World::default()),
        })
    }

    pub fn ports(self: &Arc<Self>) -> Ports {
        Ports {
            engine: self.clone(),
            network: self.clone(),
            proxy: self.clone(),
            seeder: self.clone(),
            probe: self.clone(),
            system: self.clone(),
        }
    }

    fn w(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every later call of `method` fails.
    pub fn fail_on(&self, method: &str) {
        self.w().fail.insert(method.to_owned());
    }

    /// Every later call of `method` never returns (a crash or hang mid-step).
    pub fn hang_on(&self, method: &str) {
        self.w().hang.insert(method.to_owned());
    }

    /// Every later call of `method` takes `d` first (a slow part).
    pub fn delay_on(&self, method: &str, d: std::time::Duration) {
        self.w().delay.insert(method.to_owned(), d);
    }

    pub fn clear_faults(&self) {
        let mut w = self.w();
        w.fail.clear();
        w.hang.clear();
        w.panic.clear();
        w.delay.clear();
    }

    /// Marks a health check failed.
    pub fn set_unhealthy(&self, check: &str, bad: bool) {
        let mut w = self.w();
        if bad {
            w.unhealthy.insert(check.to_owned());
        } else {
            w.unhealthy.remove(check);
        }
    }

    /// Reports a state change as the engine's supervisor would.
    pub fn emit(&self, vm_id: &str, state: VmRunState) {
        let _ = self.events.send(VmStateEvent {
            vm_id: vm_id.to_owned(),
            state,
        });
    }

    /// The guest reboots itself, as the supervisor would count it.
    pub fn reboot_guest(&self, vm_id: &str) {
        *self.w().resets.entry(vm_id.to_owned()).or_default() += 1;
    }

    pub fn calls(&self) -> Vec<String> {
        self.w().calls.clone()
    }

    pub fn held(&self) -> Held {
        self.w().held.clone()
    }

    /// Records the call, then fails or hangs if asked to.
    async fn enter(&self, method: &str, arg: &str) -> Result<(), PortError> {
        let (fail, hang, delay, panic) = {
            let mut w = self.w();
            w.calls.push(format!("{method} {arg}"));
            (
                w.fail.contains(method),
                w.hang.contains(method),
                w.delay.get(method).copied(),
                w.panic.contains(method),
            )
        };
        assert!(!panic, "injected panic in {method}");
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if hang {
            std::future::pending::<()>().await;
        }
        if fail {
            return Err(injected(method));
        }
        Ok(())
    }

    fn with<T>(&self, f: impl FnOnce(&mut Held) -> T) -> T {
        f(&mut self.w().held)
    }

    /// What a host reboot does to the parts: no QEMU, no tap, no forward,
    /// no nginx (its sites stay on disk, as the real front's do).
    pub fn reboot(&self) {
        self.with(|h| {
            h.vms.clear();
            h.taps.clear();
            h.guards.clear();
            h.forwards.clear();
        });
        self.w().proxy_down = true;
    }

    /// A tap vanishes (an operator's `ip link del`); its guard stays.
    pub fn remove_tap(&self, vm_id: &str) {
        let name = self.tap_name(vm_id);
        self.with(|h| h.taps.remove(&name));
    }

    /// A tap's guard vanishes (an operator flushed or deleted the guard
    /// table); the tap stays.
    pub fn lose_guard(&self, vm_id: &str) {
        let name = self.tap_name(vm_id);
        self.with(|h| h.guards.remove(&name));
    }

    /// Resources of a VM and a site that no hosting owns (a crash's leftovers).
    pub fn plant_orphan(&self, vm_id: &str, user_id: i64) {
        let tap = self.tap_name(vm_id);
        self.with(|h| {
            h.disks.insert(vm_id.to_owned());
            h.vms.insert(vm_id.to_owned(), true);
            h.taps.insert(tap.clone());
            h.guards
                .insert(tap, ("02:00:00:00:00:fa".into(), Ipv4Addr::new(10, 98, 0, 250)));
            h.forwards
                .insert(vm_id.to_owned(), (19999, Ipv4Addr::new(10, 98, 0, 250)));
            h.sites.insert(
                user_id,
                Site {
                    user_id,
                    username: "ghost".into(),
                    upstream: std::net::SocketAddrV4::new(Ipv4Addr::new(10, 98, 0, 250), 80),
                },
            );
        });
    }

    /// Every later call of `method` panics (a bug in the task running it).
    pub fn panic_on(&self, method: &str) {
        self.w().panic.insert(method.to_owned());
    }

    /// Sets the free disk the system reports.
    pub fn set_free_disk(&self, bytes: Option<u64>) {
        self.w().free_disk = bytes;
    }

    /// How many times the system was probed (`checks`, `qemu_version`).
    pub fn system_probes(&self) -> usize {
        self.w().system_probes
    }

    /// The engine makes templates and warm clones from now on.
    pub fn enable_templates(&self) {
        self.w().templates = true;
    }

    /// A warm clone's QEMU dies while it waits in the pool.
    pub fn crash_clone(&self, vm_id: &str) {
        self.with(|h| h.clones.remove(vm_id));
    }

    /// Sets what the guest says about its boot.
    pub fn set_guest_boot(&self, boot: GuestBoot) {
        self.w().guest_boot = Some(boot);
    }
}

/// The error an injected failure reports.
pub fn injected(method: &str) -> PortError {
    PortError::Io(std::io::Error::other(format!("injected failure in {method}")))
}

fn refused(what: &str) -> PortError {
    PortError::Probe(format!("fake: {what}"))
}

#[async_trait]
impl VmEngine for FakeWorld {
    fn disk_usage(&self, _vm_id: &str) -> u64 {
        0
    }
    async fn backup(
        &self,
        vm_id: &str,
        req: webhoster::vmm::BackupRequest,
        _progress: &tokio::sync::watch::Sender<webhoster::vmm::BackupProgress>,
    ) -> Result<webhoster::vmm::BackupOutcome, PortError> {
        self.enter("engine.backup", vm_id).await?;
        self.with(|h| h.backups.insert((vm_id.to_owned(), req.id)));
        Ok(webhoster::vmm::BackupOutcome {
            parent: req.parent,
            frozen: false,
            size_bytes: 0,
        })
    }
    async fn abandon_backup(&self, vm_id: &str, id: i64) -> Result<(), PortError> {
        self.enter("engine.abandon_backup", vm_id).await?;
        self.with(|h| h.backups.remove(&(vm_id.to_owned(), id)));
        Ok(())
    }
    async fn delete_backup(
        &self,
        vm_id: &str,
        id: i64,
        child: Option<i64>,
    ) -> Result<Option<u64>, PortError> {
        self.enter("engine.delete_backup", vm_id).await?;
        self.with(|h| h.backups.remove(&(vm_id.to_owned(), id)));
        Ok(child.map(|_| 0))
    }
    async fn restore_disk(&self, vm_id: &str, id: i64) -> Result<(), PortError> {
        self.enter("engine.restore_disk", vm_id).await?;
        if self.with(|h| h.backups.contains(&(vm_id.to_owned(), id))) {
            Ok(())
        } else {
            Err(refused(&format!("no backup {id} of {vm_id}")))
        }
    }
    fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.dir.join("vms").join(vm_id)
    }
    async fn create_disk(&self, vm: &VmLaunch) -> Result<(), PortError> {
        self.enter("engine.create_disk", &vm.vm_id).await?;
        self.with(|h| h.disks.insert(vm.vm_id.clone()));
        Ok(())
    }
    async fn remove_disk(&self, vm_id: &str) -> Result<(), PortError> {
        self.enter("engine.remove_disk", vm_id).await?;
        self.with(|h| {
            h.disks.remove(vm_id);
            h.backups.retain(|(vm, _)| vm != vm_id);
        });
        Ok(())
    }
    async fn spawn(&self, vm: &VmLaunch) -> Result<Spawned, PortError> {
        self.enter("engine.spawn", &vm.vm_id).await?;
        if self.with(|h| h.vms.get(&vm.vm_id) == Some(&true)) {
            return Ok(Spawned::Adopted);
        }
        let ok = self.with(|h| {
            let ready = h.disks.contains(&vm.vm_id)
                && h.taps.contains(&vm.tap_name)
                // A real seed writer may stand in for the fake one.
                && (h.seeds.contains(&vm.seed_iso) || vm.seed_iso.exists());
            if ready {
                h.vms.insert(vm.vm_id.clone(), true);
            }
            ready
        });
        if ok {
            Ok(Spawned::Started)
        } else {
            Err(refused("engine: spawn without disk, tap or seed"))
        }
    }
    async fn kill(&self, vm_id: &str) -> Result<(), PortError> {
        self.enter("engine.kill", vm_id).await?;
        self.with(|h| {
            h.vms.remove(vm_id);
            h.clones.remove(vm_id);
        });
        Ok(())
    }
    async fn stop(&self, vm_id: &str) -> Result<(), PortError> {
        self.enter("engine.stop", vm_id).await?;
        self.with(|h| h.vms.insert(vm_id.to_owned(), false));
        Ok(())
    }
    async fn restart(&self, vm: &VmLaunch) -> Result<(), PortError> {
        self.enter("engine.restart", &vm.vm_id).await?;
        self.with(|h| h.vms.insert(vm.vm_id.clone(), true));
        Ok(())
    }
    async fn destroy(&self, vm_id: &str) -> Result<(), PortError> {
        self.enter("engine.destroy", vm_id).await?;
        let seed = self.vm_dir(vm_id).join("seed.iso");
        self.with(|h| {
            h.vms.remove(vm_id);
            h.clones.remove(vm_id);
            h.disks.remove(vm_id);
            h.seeds.remove(&seed);
        });
        Ok(())
    }
    fn run_state(&self, vm_id: &str) -> Option<VmRunState> {
        if self.with(|h| h.clones.contains(vm_id)) {
            return Some(VmRunState::Paused);
        }
        self.with(|h| h.vms.get(vm_id).copied()).map(|running| {
            if running {
                VmRunState::Running
            } else {
                VmRunState::Stopped
            }
        })
    }
    fn guest_resets(&self, vm_id: &str) -> u64 {
        self.w().resets.get(vm_id).copied().unwrap_or(0)
    }
    async fn guest_boot(&self, vm_id: &str) -> GuestBoot {
        let _ = self.enter("engine.guest_boot", vm_id).await;
        self.w().guest_boot.clone().unwrap_or(GuestBoot::Done)
    }
    async fn vm_ids(&self) -> Result<Vec<String>, PortError> {
        self.enter("engine.vm_ids", "").await?;
        Ok(self.with(|h| {
            h.disks
                .iter()
                .chain(h.vms.keys())
                .chain(h.clones.iter())
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        }))
    }
    fn serial_log(&self, vm_id: &str) -> PathBuf {
        self.vm_dir(vm_id).join("serial.log")
    }
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<VmStateEvent>> {
        Some(self.events.subscribe())
    }
    async fn prepare_template(&self) -> Result<String, PortError> {
        self.enter("engine.prepare_template", "").await?;
        if self.w().templates {
            Ok("fake-template".into())
        } else {
            Err(PortError::Unsupported("templates (fake)"))
        }
    }
    async fn spawn_clone(&self, vm: &VmLaunch) -> Result<(), PortError> {
        self.enter("engine.spawn_clone", &vm.vm_id).await?;
        self.with(|h| {
            if !h.taps.contains(&vm.tap_name) {
                return Err(refused("engine: a clone without its tap"));
            }
            h.disks.insert(vm.vm_id.clone());
            h.seeds.insert(vm.seed_iso.clone());
            h.clones.insert(vm.vm_id.clone());
            Ok(())
        })
    }
    async fn resume_clone(&self, vm_id: &str) -> Result<(), PortError> {
        self.enter("engine.resume_clone", vm_id).await?;
        self.with(|h| {
            if !h.clones.remove(vm_id) {
                return Err(refused("engine: resume of no paused clone"));
            }
            h.vms.insert(vm_id.to_owned(), true);
            Ok(())
        })
    }
}

#[async_trait]
impl VmNetwork for FakeWorld {
    fn subnet(&self) -> Ipv4Net {
        self.subnet
    }
    fn gateway(&self) -> Ipv4Addr {
        self.subnet.hosts().next().unwrap_or(self.subnet.addr())
    }
    fn port_is_free(&self, _port: u16) -> bool {
        true
    }
    fn tap_name(&self, vm_id: &str) -> String {
        format!("tap{}", vm_id.trim_start_matches("vm-"))
    }
    async fn ensure(&self) -> Result<bool, PortError> {
        self.enter("net.ensure", "").await?;
        Ok(false)
    }
    async fn inventory(&self) -> Result<NetInventory, PortError> {
        self.enter("net.inventory", "").await?;
        Ok(self.with(|h| NetInventory {
            taps: h.taps.iter().cloned().collect(),
            guards: h.guards.keys().map(|t| (t.clone(), true)).collect(),
            forwards: h.forwards.clone().into_iter().collect(),
        }))
    }
    async fn remove_orphans(&self, taps: &[String], forwards_of: &[String]) -> Result<(), PortError> {
        self.enter("net.remove_orphans", &format!("{taps:?} {forwards_of:?}"))
            .await?;
        self.with(|h| {
            for t in taps {
                h.taps.remove(t);
                h.guards.remove(t);
            }
            for v in forwards_of {
                h.forwards.remove(v);
            }
        });
        Ok(())
    }
    async fn create_tap(&self, vm_id: &str, mac: &str, guest_ip: Ipv4Addr) -> Result<String, PortError> {
        self.enter("net.create_tap", vm_id).await?;
        let name = self.tap_name(vm_id);
        self.with(|h| {
            h.taps.insert(name.clone());
            h.guards.insert(name.clone(), (mac.to_owned(), guest_ip));
        });
        Ok(name)
    }
    async fn create_mute_tap(&self, vm_id: &str) -> Result<String, PortError> {
        self.enter("net.create_mute_tap", vm_id).await?;
        let name = self.tap_name(vm_id);
        self.with(|h| h.taps.insert(name.clone()));
        Ok(name)
    }
    async fn delete_tap(&self, vm_id: &str) -> Result<(), PortError> {
        self.enter("net.delete_tap", vm_id).await?;
        let name = self.tap_name(vm_id);
        self.with(|h| {
            h.taps.remove(&name);
            h.guards.remove(&name);
        });
        Ok(())
    }
    async fn add_forward(&self, vm_id: &str, host_port: u16, guest_ip: Ipv4Addr) -> Result<(), PortError> {
        self.enter("net.add_forward", vm_id).await?;
        self.with(|h| h.forwards.insert(vm_id.to_owned(), (host_port, guest_ip)));
        Ok(())
    }
    async fn remove_forward(&self, vm_id: &str) -> Result<(), PortError> {
        self.enter("net.remove_forward", vm_id).await?;
        self.with(|h| h.forwards.remove(vm_id));
        Ok(())
    }
}

#[async_trait]
impl SiteProxy for FakeWorld {
    async fn ensure(&self) -> Result<bool, PortError> {
        self.enter("proxy.ensure", "").await?;
        Ok(std::mem::take(&mut self.w().proxy_down))
    }
    async fn sites(&self) -> Result<Vec<Site>, PortError> {
        Ok(self.with(|h| h.sites.values().cloned().collect()))
    }
    async fn add_site(&self, site: &Site) -> Result<(), PortError> {
        self.enter("proxy.add_site", &site.user_id.to_string()).await?;
        self.with(|h| h.sites.insert(site.user_id, site.clone()));
        Ok(())
    }
    async fn remove_site(&self, user_id: i64) -> Result<(), PortError> {
        self.enter("proxy.remove_site", &user_id.to_string()).await?;
        self.with(|h| h.sites.remove(&user_id));
        Ok(())
    }
}

#[async_trait]
impl SeedWriter for FakeWorld {
    async fn write(&self, spec: &SeedSpec, path: &Path) -> Result<(), PortError> {
        self.enter("seed.write", &spec.instance_id).await?;
        self.with(|h| h.seeds.insert(path.to_owned()));
        Ok(())
    }
    async fn remove(&self, path: &Path) -> Result<(), PortError> {
        let vm = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.enter("seed.remove", &vm).await?;
        self.with(|h| h.seeds.remove(path));
        Ok(())
    }
}

#[async_trait]
impl GuestProbe for FakeWorld {
    async fn guest_site(&self, guest_ip: Ipv4Addr, _patience: Duration) -> Result<(), PortError> {
        self.enter("probe.guest_site", &guest_ip.to_string()).await
    }
    async fn forwarded_ssh(&self, ssh_port: u16, _patience: Duration) -> Result<(), PortError> {
        self.enter("probe.forwarded_ssh", &ssh_port.to_string()).await
    }
    /// Logged as `probe.published_ready <user_id> site` or `... site+ssh`.
    async fn published_ready(
        &self,
        user_id: i64,
        doors: Doors,
        _patience: Duration,
    ) -> Result<(), PortError> {
        let knocked = match doors {
            Doors::Site => "site",
            Doors::SiteAndSsh { .. } => "site+ssh",
        };
        self.enter("probe.published_ready", &format!("{user_id} {knocked}"))
            .await?;
        if self.with(|h| h.sites.contains_key(&user_id)) {
            Ok(())
        } else {
            Err(refused("proxy: no site"))
        }
    }
}

#[async_trait]
impl SystemInfo for FakeWorld {
    async fn checks(&self) -> Vec<HealthCheck> {
        let bad = {
            let mut w = self.w();
            w.system_probes += 1;
            w.unhealthy.clone()
        };
        ["qemu", "accel", "image", "namespace", "nginx"]
            .into_iter()
            .map(|name| HealthCheck {
                name: name.into(),
                ok: !bad.contains(name),
                required: name != "accel",
                detail: if bad.contains(name) {
                    "down (fake)"
                } else {
                    "ok (fake)"
                }
                .into(),
            })
            .collect()
    }
    async fn free_disk(&self) -> Option<u64> {
        self.w().free_disk
    }
    async fn qemu_version(&self) -> Option<String> {
        self.w().system_probes += 1;
        Some("fake".into())
    }
}
