//! Convergence: every hosting is brought to what its user asked for.
//!
//! A pass first makes sure the host-wide parts are there (the VM network and
//! the nginx master; rebuilt after a reboot, a `teardown` or `net down`),
//! reads what the network and nginx hold once, then, for every hosting that
//! nobody else is working on, *ensures* each resource: the tap, the SSH
//! forward, the nginx site and QEMU are created if missing and adopted if
//! present. Only then does it look at the hosting from outside: `running`
//! is stored only when the site answers through nginx and SSH accepts (and,
//! after a boot, when the guest says its boot is over).
//!
//! Passes run at start, every [`INTERVAL`], and for start, stop and restart.
//! The engine's events (a crash, a guest that powered itself off) are
//! followed between passes. This module never decides how a part is built:
//! it only calls the ports.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::{Instrument, debug, info, warn};

use super::looks::{DEMOTE_AFTER, Outcome};
use super::ports::{Doors, NetInventory, PortError, Site, Spawned, VmRunState};
use super::state::{Desired, HostingState};
use super::{HostingError, HostingService, chain, locked, steps, vm_span};
use crate::store::Hosting;

/// How often a pass runs: a deleted tap or a flushed nft table is repaired
/// within about this long (plus the guest's boot when QEMU had to restart).
pub const INTERVAL: Duration = Duration::from_secs(3);

/// The reaper runs every this many passes (and at start).
const REAP_EVERY: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Start,
    Stop,
    Restart,
}

/// What a pass read once for every hosting.
#[derive(Debug, Default)]
pub struct Snapshot {
    net: NetInventory,
    /// user_id -> upstream of each site nginx serves.
    sites: HashMap<i64, SocketAddrV4>,
}

/// What one pass did, for logs and tests.
#[derive(Debug, Default, Clone)]
pub struct PassReport {
    pub network_rebuilt: bool,
    pub proxy_restarted: bool,
    /// vm_id -> the resources put back.
    pub repaired: HashMap<String, Vec<&'static str>>,
    /// Hostings skipped because another operation held them.
    pub busy: usize,
}

impl HostingService {
    /// One convergence pass over every hosting.
    pub async fn converge_all(&self) -> Result<PassReport, HostingError> {
        let mut report = PassReport::default();
        (report.network_rebuilt, report.proxy_restarted) = self.ensure_host_parts().await;
        // A pass that cannot see the network or the sites changes nothing:
        // taken for "no taps", a failed read would restart every QEMU.
        let snapshot = match self.read_snapshot().await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                warn!(error = %chain(&e), "convergence pass skipped: cannot read the network or the sites");
                return Ok(report);
            }
        };
        let hostings = self.store.all_hostings().await?;
        let work = hostings.into_iter().map(|h| {
            let snapshot = &snapshot;
            async move {
                let turn = self.try_lock(h.id)?;
                let vm_id = h.vm_id.clone();
                let repaired = self
                    .converge_locked(h, snapshot)
                    .instrument(vm_span(&vm_id))
                    .await;
                drop(turn);
                Some((vm_id, repaired))
            }
        });
        for outcome in join_all(work).await {
            match outcome {
                None => report.busy += 1,
                Some((vm_id, Ok(repaired))) if !repaired.is_empty() => {
                    report.repaired.insert(vm_id, repaired);
                }
                Some((_, Ok(_))) => {}
                Some((vm_id, Err(e))) => {
                    debug!(%vm_id, error = %chain(&e), "convergence pass: not there yet");
                }
            }
        }
        Ok(report)
    }

    /// Runs passes forever (the reaper every [`REAP_EVERY`] passes).
    pub fn spawn_convergence(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(this.cfg.converge_every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 1u64.. {
                ticks.tick().await;
                if let Err(e) = this.converge_all().await {
                    warn!(error = %chain(&e), "convergence pass failed");
                }
                if n % REAP_EVERY == 0
                    && let Err(e) = this.reap().await
                {
                    warn!(error = %chain(&e), "reaper failed");
                }
            }
        })
    }

    /// Brings one hosting (whose turn the caller holds) toward its desired
    /// state, once; returns what had to be put back.
    async fn converge_locked(
        &self,
        h: Hosting,
        snapshot: &Snapshot,
    ) -> Result<Vec<&'static str>, HostingError> {
        // Re-read under the lock: the row may have changed since the list.
        let Some(mut h) = self.store.hosting_by_id(h.id).await? else {
            return Ok(Vec::new());
        };
        match h.state {
            // The create task owns it; after a restart, recovery did.
            HostingState::Creating => Ok(Vec::new()),
            // A cleanup that did not finish: try again.
            HostingState::Deleting => {
                let left = self.teardown(&h).await.map_err(|(_, e)| HostingError::Vm {
                    action: "removing",
                    source: e,
                });
                left.map(|()| vec!["deleted"])
            }
            _ => match h.desired {
                Desired::Running => self.ensure_running(&mut h, snapshot, false).await,
                Desired::Stopped => self.ensure_stopped(&mut h).await.map(|()| Vec::new()),
            },
        }
    }

    /// Tap, forward, site and QEMU are there; then the state says what an
    /// outside look shows. `force` restarts a VM the supervisor gave up on.
    async fn ensure_running(
        &self,
        h: &mut Hosting,
        snapshot: &Snapshot,
        force: bool,
    ) -> Result<Vec<&'static str>, HostingError> {
        let job = self.job_for(h).await?;
        let (vm_id, net, engine) = (h.vm_id.as_str(), &self.ports.network, &self.ports.engine);
        let vm_err = |action| move |source| HostingError::Vm { action, source };
        let mut repaired = Vec::new();

        let tap_gone = !snapshot.net.taps.contains(&job.launch.tap_name);
        // A guard lost with its table (a flush, a delete) is put back on the
        // tap in place: QEMU keeps its fd, the guest notices nothing.
        let unguarded = snapshot.net.guards.get(&job.launch.tap_name) != Some(&true);
        if tap_gone || unguarded {
            net.create_tap(vm_id, &job.launch.mac, job.launch.guest_ip)
                .await
                .map_err(vm_err("creating the tap of"))?;
            repaired.push(if tap_gone { "tap" } else { "tap guard" });
        }
        let forward = (h.ssh_port, job.launch.guest_ip);
        if snapshot.net.forwards.get(vm_id) != Some(&forward) {
            net.add_forward(vm_id, forward.0, forward.1)
                .await
                .map_err(vm_err("forwarding SSH to"))?;
            repaired.push("ssh forward");
        }
        let upstream = SocketAddrV4::new(job.launch.guest_ip, 80);
        if snapshot.sites.get(&h.user_id) != Some(&upstream) {
            let site = Site {
                user_id: h.user_id,
                username: job.username.clone(),
                upstream,
            };
            self.ports
                .proxy
                .add_site(&site)
                .await
                .map_err(vm_err("publishing the site of"))?;
            repaired.push("site");
        }
        match engine.run_state(vm_id) {
            // QEMU's tap fd points at a device that is gone: only a new QEMU
            // gets the new tap. A clean restart loses nothing.
            Some(VmRunState::Running | VmRunState::Paused) if tap_gone => {
                self.leave_running(h, "its tap was gone; restarting QEMU").await?;
                engine.restart(&job.launch).await.map_err(vm_err("restarting"))?;
                repaired.push("qemu");
            }
            Some(VmRunState::Running) => {
                let resets = engine.guest_resets(&h.vm_id);
                if locked(&self.looks).rebooted(&h.vm_id, resets) && h.state == HostingState::Running {
                    self.leave_running(h, "the guest rebooted").await?;
                }
            }
            Some(VmRunState::Paused) => {
                if h.state != HostingState::Paused {
                    let why = "the guest is paused (an I/O error or a full disk)";
                    self.set_state(h, HostingState::Paused, None, Some(why)).await?;
                }
                return Ok(repaired);
            }
            Some(VmRunState::Crashed) if !force => {
                if h.state != HostingState::Restarting {
                    let why = "QEMU exited; the supervisor restarts it";
                    self.set_state(h, HostingState::Restarting, None, Some(why))
                        .await?;
                }
                return Ok(repaired);
            }
            Some(VmRunState::Starting | VmRunState::Stopping) => return Ok(repaired),
            Some(VmRunState::Failed) if !force => {
                if h.state != HostingState::Failed {
                    let why = "QEMU crashed too often; start the hosting again";
                    self.set_state(h, HostingState::Failed, None, Some(why)).await?;
                }
                return Ok(repaired);
            }
            // Stopped, unknown to this engine (a restart of webhoster, a
            // reboot), or a forced start: spawn adopts a QEMU that still runs.
            _ => {
                let spawned = engine.spawn(&job.launch).await.map_err(vm_err("starting"))?;
                if spawned == Spawned::Started {
                    repaired.push("qemu");
                }
            }
        }
        if !repaired.is_empty() {
            info!(?repaired, "put back what was missing");
        }
        self.observe(h, !repaired.is_empty()).await?;
        Ok(repaired)
    }

    /// A hosting that was `running` but is being repaired is `starting`
    /// until an outside look says otherwise.
    async fn leave_running(&self, h: &mut Hosting, why: &str) -> Result<(), HostingError> {
        if h.state != HostingState::Starting {
            self.set_state(h, HostingState::Starting, None, Some(why)).await?;
        }
        Ok(())
    }

    /// Looks from outside and stores what it saw: `running` only when the
    /// site answers through nginx, SSH accepts, and (coming from another
    /// state) the guest says its boot is over; else `starting`, with what
    /// did not answer as the last error (a running hosting after
    /// [`DEMOTE_AFTER`] failed looks in a row). `looks` decides when to
    /// knock on SSH and counts the failed looks.
    async fn observe(&self, h: &mut Hosting, repaired: bool) -> Result<(), HostingError> {
        let steady = h.state == HostingState::Running && !repaired;
        let knock = locked(&self.looks).knock_ssh(&h.vm_id, steady, Instant::now());
        let doors = if knock {
            Doors::SiteAndSsh { ssh_port: h.ssh_port }
        } else {
            Doors::Site
        };
        let looked = Instant::now();
        let published = self
            .ports
            .probe
            .published_ready(h.user_id, doors, super::probe::GLANCE)
            .await;
        let outcome = match &published {
            Ok(()) => Outcome::Answered,
            Err(_) if looked.elapsed() >= super::probe::GLANCE => Outcome::Silent,
            Err(_) => Outcome::Refused,
        };
        let failed_looks = locked(&self.looks).record(&h.vm_id, knock, outcome, Instant::now());
        let verdict = match published {
            Ok(()) if steady => Ok(()),
            // SSH is not knocked on yet (its last knocks found no banner):
            // nothing new to say.
            Ok(()) if !knock => return Ok(()),
            Ok(()) => steps::boot_done(&self.ports, &h.vm_id, agentless_patience_over(h)).await,
            Err(e) if steady && failed_looks < DEMOTE_AFTER => {
                debug!(error = %chain(&e), failed_looks, "a running hosting did not answer a look");
                return Ok(());
            }
            Err(e) => Err(e),
        };
        match verdict {
            Ok(()) if h.state != HostingState::Running => {
                if !matches!(h.state, HostingState::Starting) {
                    self.set_state(h, HostingState::Starting, None, None).await?;
                }
                self.set_state(h, HostingState::Running, None, None).await
            }
            Ok(()) => Ok(()),
            Err(e) => {
                let why = format!("not answering yet: {}", chain(&e));
                if h.state != HostingState::Starting || h.last_error.as_deref() != Some(why.as_str()) {
                    self.set_state(h, HostingState::Starting, None, Some(&why))
                        .await?;
                }
                Ok(())
            }
        }
    }

    /// The VM's SSH door answered just now.
    pub(super) fn ssh_answered(&self, vm_id: &str) {
        locked(&self.looks).ssh_answered(vm_id, Instant::now());
    }

    /// QEMU is gone (cleanly: ACPI power-down, a bounded wait, then quit).
    pub(super) async fn ensure_stopped(&self, h: &mut Hosting) -> Result<(), HostingError> {
        let engine = &self.ports.engine;
        if engine.run_state(&h.vm_id) != Some(VmRunState::Stopped) {
            if !matches!(h.state, HostingState::Stopping | HostingState::Stopped) {
                self.set_state(h, HostingState::Stopping, None, None).await?;
            }
            if let Err(source) = engine.stop(&h.vm_id).await {
                let why = format!("stopping failed: {}", chain(&source));
                self.set_state(h, HostingState::Failed, None, Some(&why)).await?;
                return Err(HostingError::Vm {
                    action: "stopping",
                    source,
                });
            }
        }
        if h.state != HostingState::Stopped {
            self.set_state(h, HostingState::Stopped, None, None).await?;
        }
        Ok(())
    }

    /// Start, stop or restart, with the hosting's turn held: record the wish,
    /// then converge, waiting (bounded) for the site and SSH after a start.
    pub(super) async fn power_locked(&self, mut h: Hosting, action: Power) -> Result<Hosting, HostingError> {
        let desired = match action {
            Power::Stop => Desired::Stopped,
            Power::Start | Power::Restart => Desired::Running,
        };
        if h.desired != desired {
            self.store.set_desired(h.id, desired).await?;
            h.desired = desired;
        }
        info!(?action, "power");
        if action == Power::Stop {
            self.ensure_stopped(&mut h).await?;
            return Ok(h);
        }
        if action == Power::Restart {
            let job = self.job_for(&h).await?;
            if h.state.can_transition(HostingState::Stopping) {
                self.set_state(&mut h, HostingState::Stopping, None, None).await?;
            }
            self.ports
                .engine
                .restart(&job.launch)
                .await
                .map_err(|source| HostingError::Vm {
                    action: "restarting",
                    source,
                })?;
            self.set_state(&mut h, HostingState::Starting, None, None).await?;
        }
        let ready = self.cfg.ready;
        let deadline = tokio::time::Instant::now() + ready.timeout;
        let mut force = true;
        loop {
            let snapshot = self.snapshot().await?;
            let last = match self.ensure_running(&mut h, &snapshot, force).await {
                Ok(_) if h.state == HostingState::Running => return Ok(h),
                Ok(_) => PortError::Probe(
                    h.last_error
                        .clone()
                        .unwrap_or_else(|| format!("the hosting is {}", h.state)),
                ),
                Err(HostingError::Vm { source, .. }) => source,
                Err(e) => return Err(e),
            };
            force = false;
            if tokio::time::Instant::now() + ready.interval >= deadline {
                return Err(HostingError::Vm {
                    action: "starting",
                    source: steps::NotReady(ready.timeout, Box::new(last)).into(),
                });
            }
            tokio::time::sleep(ready.interval).await;
        }
    }

    /// The network's and nginx's view, read now (for one hosting's start).
    async fn snapshot(&self) -> Result<Snapshot, HostingError> {
        self.ensure_host_parts().await;
        self.read_snapshot().await.map_err(|source| HostingError::Vm {
            action: "reading the network for",
            source,
        })
    }

    /// The host-wide parts every hosting needs: the VM network and the nginx
    /// master, rebuilt when gone. Returns (network rebuilt, nginx restarted).
    async fn ensure_host_parts(&self) -> (bool, bool) {
        let (network, proxy) = tokio::join!(self.ports.network.ensure(), self.ports.proxy.ensure());
        let network = network.unwrap_or_else(|e| {
            warn!(error = %chain(&e), "the VM network could not be ensured");
            false
        });
        let proxy = proxy.unwrap_or_else(|e| {
            warn!(error = %chain(&e), "the nginx front could not be ensured");
            false
        });
        if network {
            warn!("the VM network was missing or incomplete: rebuilt");
        }
        if proxy {
            warn!("the nginx front was not running: started again");
        }
        (network, proxy)
    }

    /// Taps, forwards and sites as they are now.
    async fn read_snapshot(&self) -> Result<Snapshot, PortError> {
        let (net, sites) = tokio::join!(self.ports.network.inventory(), self.ports.proxy.sites());
        Ok(Snapshot {
            net: net?,
            sites: sites?.into_iter().map(|s| (s.user_id, s.upstream)).collect(),
        })
    }

    /// Follows the engine's state changes between passes: a crash shows
    /// `restarting` at once, a guest that powered itself off becomes
    /// `stopped` (and stays so: its user turned it off), a supervisor that
    /// gave up makes the hosting `failed`. Hostings another operation holds
    /// are left to it.
    pub fn follow_engine(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        use tokio::sync::broadcast::error::RecvError;
        let mut events = self.ports.engine.subscribe()?;
        let this = Arc::clone(self);
        Some(tokio::spawn(async move {
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(RecvError::Lagged(n)) => {
                        warn!(missed = n, "engine events lagged");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                let span = vm_span(&ev.vm_id);
                if let Err(e) = this.on_engine_event(&ev).instrument(span.clone()).await {
                    warn!(parent: &span, error = %chain(&e), "recording an engine event");
                }
            }
        }))
    }

    async fn on_engine_event(&self, ev: &super::ports::VmStateEvent) -> Result<(), HostingError> {
        let Some(h) = self.store.hosting_by_vm(&ev.vm_id).await? else {
            return Ok(());
        };
        let Some(_turn) = self.try_lock(h.id) else {
            return Ok(());
        };
        let Some(mut h) = self.store.hosting_by_id(h.id).await? else {
            return Ok(());
        };
        if matches!(h.state, HostingState::Creating | HostingState::Deleting) {
            return Ok(());
        }
        match ev.state {
            VmRunState::Crashed => {
                let why = "QEMU exited; the supervisor restarts it";
                self.set_state(&mut h, HostingState::Restarting, None, Some(why))
                    .await
            }
            VmRunState::Running if h.state == HostingState::Restarting => {
                self.set_state(&mut h, HostingState::Starting, None, None).await
            }
            VmRunState::Paused => {
                let why = "the guest is paused (an I/O error or a full disk)";
                self.set_state(&mut h, HostingState::Paused, None, Some(why))
                    .await
            }
            VmRunState::Running if h.state == HostingState::Paused => {
                self.set_state(&mut h, HostingState::Starting, None, None).await
            }
            VmRunState::Stopped if h.desired == Desired::Running && h.state != HostingState::Stopped => {
                info!("the guest powered itself off: the hosting stays stopped until started");
                self.store.set_desired(h.id, Desired::Stopped).await?;
                self.set_state(&mut h, HostingState::Stopped, None, None).await
            }
            VmRunState::Failed if h.state != HostingState::Failed => {
                let why = "QEMU crashed too often; start the hosting again";
                self.set_state(&mut h, HostingState::Failed, None, Some(why))
                    .await
            }
            _ => Ok(()),
        }
    }
}

/// How long a guest that answers HTTP and SSH but not its agent waits before
/// it counts as running all the same: longer than any first boot under TCG.
const AGENTLESS_PATIENCE: Duration = Duration::from_secs(120);

fn agentless_patience_over(h: &Hosting) -> bool {
    time::OffsetDateTime::parse(&h.state_since, &time::format_description::well_known::Rfc3339)
        .map(|since| time::OffsetDateTime::now_utc() - since > AGENTLESS_PATIENCE)
        .unwrap_or(true)
}
