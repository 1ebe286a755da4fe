//! Clones of a template (`vmm::template`): restored paused, then resumed and
//! personalised by the guest's seed agent.
//!
//! A clone is a VM like any other (registry, supervisor, cgroup, own uid),
//! with `spec.restore` set while it waits paused. Its QEMU gets the
//! template's command line with `share=off` on the sealed RAM memfd,
//! `-incoming defer -S`, and its state through a descriptor (`getfd` +
//! `migrate-incoming fd:`: the sandbox denies `exec:`). A clone that dies
//! before its resume is not restarted (the supervisor sees `restore`).
//!
//! [`Engine::resume_clone`] clears `restore` and persists `vm.json` before
//! `cont`: from then on any start of the VM (a crash restart, stop/start, a
//! host reboot, a reattach) is a plain cold boot of its own disk.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tracing::Instrument;

use super::cmdline::Snapshot;
use super::disk;
use super::engine::Engine;
use super::process::{self, Launch, QemuPid};
use super::qga::QgaClient;
use super::qmp::{Monitor, QmpClient};
use super::registry;
use super::template::{self, Template};
use super::{Restore, VmNet, VmSpec, VmState, VmStatus, VmmError};

/// What personalises a clone: the seed agent in `--clone` mode, with host
/// entropy on its stdin.
pub const CLONE_AGENT: &str = template::SEED_AGENT;
/// How long `--clone` may take (clock, keys, users, network).
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `--warm-up` may take (it runs at low priority).
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest agent may take to answer after `cont`.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of host entropy each clone's kernel gets.
const ENTROPY_BYTES: usize = 64;

/// Step timings of one clone, spawn to personalised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloneReport {
    /// QEMU spawn to migration `completed` (paused, restored).
    pub restore: Duration,
    /// QMP `cont`.
    pub cont: Duration,
    /// The guest agent connected and synchronised (its first answer after
    /// the resume: TCG translates every code path anew in a new QEMU).
    pub connect: Duration,
    /// The guest's clock read, for its offset to the host's.
    pub clock: Duration,
    /// `webhoster-seed-agent --clone` run to its exit.
    pub agent: Duration,
    /// The agent's first stdout line (its per-step milliseconds), cut.
    pub agent_says: String,
}

/// Restore times of clones not yet resumed, for their [`CloneReport`].
#[derive(Default)]
pub(super) struct Restores(Mutex<HashMap<String, Duration>>);

impl Restores {
    fn put(&self, vm_id: &str, took: Duration) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm_id.to_owned(), took);
    }
    fn take(&self, vm_id: &str) -> Duration {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm_id)
            .unwrap_or_default()
    }
}

impl Engine {
    /// A QEMU restored from `template`, paused and supervised. `spec` must
    /// name the template's plan and disk (`base_disk`), and a network (the
    /// template's NIC must exist in the clone); its disk overlay is made
    /// here when missing. Returns once the state is loaded.
    pub async fn start_clone(&self, spec: &VmSpec, template: &Template) -> Result<VmStatus, VmmError> {
        self.start_clone_in_span(spec, template)
            .instrument(registry::span(&spec.vm_id))
            .await
    }

    async fn start_clone_in_span(&self, spec: &VmSpec, template: &Template) -> Result<VmStatus, VmmError> {
        spec.validate()?;
        if spec.plan != *template.plan() {
            return Err(VmmError::BadSpec(format!(
                "clone {}: plan {:?} is not the template's {:?}",
                spec.vm_id,
                spec.plan.name,
                template.plan().name
            )));
        }
        if spec.base_disk != template.disk() {
            return Err(VmmError::BadSpec(format!(
                "clone {}: base disk {} is not the template's {}",
                spec.vm_id,
                spec.base_disk.display(),
                template.disk().display()
            )));
        }
        if spec.net == VmNet::None {
            return Err(VmmError::BadSpec(format!(
                "clone {}: needs a network (the template has a NIC)",
                spec.vm_id
            )));
        }
        let mut spec = spec.clone();
        spec.restore = Some(Restore {
            template_key: template.key().to_owned(),
            template_dir: template.dir().to_owned(),
        });
        let vm = self.registry.entry(&spec, VmState::Stopped);
        let _op = vm.lock_op().await;
        if vm.live_status().is_some() || QemuPid::live(vm.dir(), vm.id()).is_some() {
            return Err(VmmError::StillRunning(vm.id().to_owned()));
        }
        vm.stop_supervisor();
        vm.set_spec(&spec);
        vm.dir().create().map_err(|source| VmmError::Io {
            vm_id: vm.id().to_owned(),
            what: "cannot create the VM directory".into(),
            source,
        })?;
        vm.dir().write_spec(&spec).map_err(|source| VmmError::Io {
            vm_id: vm.id().to_owned(),
            what: "cannot write vm.json".into(),
            source,
        })?;
        disk::create_overlay(vm.dir(), &spec).await?;
        let _flock = process::lock_start(vm.id(), vm.dir()).await?;
        if !matches!(vm.state(), VmState::Stopped | VmState::Crashed | VmState::Failed) {
            self.registry
                .set_state(&vm, VmState::Stopped, "a clone restore replaces it")?;
        }
        self.registry.set_state(
            &vm,
            VmState::Starting,
            &format!("restore from template {}", template.key()),
        )?;
        vm.clear_crashes();
        let started = Instant::now();
        let launch = Launch {
            snapshot: Some((Snapshot::Clone, template.ram())),
            ..Launch::default()
        };
        let attached = match self.launcher.spawn_with(vm.id(), vm.dir(), &spec, launch).await {
            Ok(attached) => attached,
            Err(err) => {
                self.registry.set_state(&vm, VmState::Failed, &err.to_string())?;
                return Err(err);
            }
        };
        if let Err(err) = restore(vm.id(), vm.dir(), template).await {
            let _ = process::stop(vm.id(), attached.pid, Some(&attached.qmp), None).await;
            drop(attached);
            vm.dir().clean_runtime_files();
            self.launcher
                .release_cgroup_patiently(vm.id(), Duration::from_secs(2))
                .await;
            self.registry.set_state(&vm, VmState::Failed, &err.to_string())?;
            return Err(err);
        }
        let took = started.elapsed();
        self.restores.put(vm.id(), took);
        tracing::info!(
            pid = attached.pid.get(),
            restore_ms = took.as_millis() as u64,
            template = template.key(),
            "clone restored, paused"
        );
        self.registry.set_state(
            &vm,
            VmState::Paused,
            &format!("restored from template {} (pid {})", template.key(), attached.pid),
        )?;
        self.supervise(&vm, attached);
        Ok(vm.status())
    }

    /// Rehearse a claim in a restored clone, then pause it again: `cont`,
    /// the seed agent `--warm-up` with host entropy, `stop`. Under TCG a
    /// new QEMU translates every guest path on its first run; after this,
    /// the claim's agent, sshd's and nginx's paths run translated. The
    /// clone keeps `restore`: it is still the pool's, and dies rather than
    /// restarts. Returns the time it took and what the agent said.
    pub async fn warm_up_clone(&self, vm_id: &str) -> Result<(Duration, String), VmmError> {
        async {
            let vm = self.registry.known(vm_id)?;
            let _op = vm.lock_op().await;
            let client = waiting_clone(&vm)?;
            let agent_err = |source| VmmError::GuestAgent {
                vm_id: vm_id.to_owned(),
                source,
            };
            let started = Instant::now();
            let opened = open_agent(vm.dir()).await.map_err(agent_err)?;
            self.cont_clone(&vm, &client, "clone warming up").await?;
            let mut agent = synced_agent(vm.dir(), opened).await.map_err(agent_err)?;
            let says = run_agent(&mut agent, vm_id, &["--warm-up"], WARM_UP_TIMEOUT).await?;
            drop(agent);
            // Paused first: the supervisor takes the STOP that follows as
            // this pause, not as one of QEMU's own.
            self.registry
                .set_state(&vm, VmState::Paused, "warmed up, paused")?;
            client.stop().await.map_err(|source| VmmError::Qmp {
                vm_id: vm_id.to_owned(),
                source,
            })?;
            let took = started.elapsed();
            tracing::info!(ms = took.as_millis() as u64, agent = %says, "clone warmed up, paused");
            Ok((took, says))
        }
        .instrument(registry::span(vm_id))
        .await
    }

    /// Resume a restored clone and personalise it: clear `restore` in
    /// `vm.json` (first: whatever happens next, a later start is a cold
    /// boot), `cont`, read the guest clock's offset, run the seed agent
    /// `--clone --clock-shift-ns <offset>` with 64 bytes of host entropy on
    /// its stdin. Ok once it exited 0.
    pub async fn resume_clone(&self, vm_id: &str) -> Result<CloneReport, VmmError> {
        async {
            let vm = self.registry.known(vm_id)?;
            let _op = vm.lock_op().await;
            let client = waiting_clone(&vm)?;
            let mut spec = vm.spec();
            spec.restore = None;
            vm.dir().write_spec(&spec).map_err(|source| VmmError::Io {
                vm_id: vm_id.to_owned(),
                what: "cannot write vm.json".into(),
                source,
            })?;
            vm.set_spec(&spec);
            let mut report = CloneReport {
                restore: self.restores.take(vm_id),
                ..CloneReport::default()
            };

            let agent_err = |source| VmmError::GuestAgent {
                vm_id: vm_id.to_owned(),
                source,
            };
            let opened = open_agent(vm.dir()).await.map_err(agent_err)?;
            let step = Instant::now();
            self.cont_clone(&vm, &client, "clone resumed").await?;
            report.cont = step.elapsed();

            let step = Instant::now();
            let mut agent = synced_agent(vm.dir(), opened).await.map_err(agent_err)?;
            report.connect = step.elapsed();
            let step = Instant::now();
            let clock_shift = clock_offset(&mut agent).await.map_err(agent_err)?.to_string();
            report.clock = step.elapsed();

            let step = Instant::now();
            let args = ["--clone", "--clock-shift-ns", &clock_shift];
            report.agent_says = run_agent(&mut agent, vm_id, &args, AGENT_TIMEOUT).await?;
            report.agent = step.elapsed();
            tracing::info!(
                restore_ms = report.restore.as_millis() as u64,
                cont_ms = report.cont.as_millis() as u64,
                connect_ms = report.connect.as_millis() as u64,
                clock_ms = report.clock.as_millis() as u64,
                agent_ms = report.agent.as_millis() as u64,
                agent = %report.agent_says,
                "clone resumed and personalised"
            );
            Ok(report)
        }
        .instrument(registry::span(vm_id))
        .await
    }

    /// QMP `cont`, and the VM `Running` (the supervisor may have seen
    /// RESUME first).
    async fn cont_clone(&self, vm: &registry::Vm, client: &QmpClient, why: &str) -> Result<(), VmmError> {
        client.cont().await.map_err(|source| VmmError::Qmp {
            vm_id: vm.id().to_owned(),
            source,
        })?;
        if vm.state() == VmState::Paused {
            let _ = self.registry.set_state(vm, VmState::Running, why);
        }
        Ok(())
    }
}

/// The QMP client of a restored clone that waits paused for its resume.
fn waiting_clone(vm: &registry::Vm) -> Result<std::sync::Arc<QmpClient>, VmmError> {
    if vm.spec().restore.is_none() {
        return Err(VmmError::BadSpec(format!(
            "VM {} is not a restored clone waiting for its resume",
            vm.id()
        )));
    }
    match (vm.state(), vm.qmp()) {
        (VmState::Paused, Some(client)) => Ok(client),
        _ => Err(VmmError::NotRunning(vm.id().to_owned())),
    }
}

/// Runs the seed agent with `args` and 64 bytes of host entropy on its
/// stdin; its first stdout line (its per-step milliseconds), cut, once it
/// exited 0.
async fn run_agent(
    agent: &mut QgaClient,
    vm_id: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<String, VmmError> {
    let entropy = host_entropy().map_err(|source| VmmError::Io {
        vm_id: vm_id.to_owned(),
        what: "cannot read host entropy".into(),
        source,
    })?;
    let out = agent
        .exec_with_input(CLONE_AGENT, args, Some(&entropy), timeout)
        .await
        .map_err(|source| VmmError::GuestAgent {
            vm_id: vm_id.to_owned(),
            source,
        })?;
    if !out.success() {
        let tail = |bytes: &[u8]| -> String {
            let text = String::from_utf8_lossy(bytes);
            let chars: Vec<char> = text.chars().collect();
            let cut = chars.len().saturating_sub(400);
            chars[cut..].iter().collect::<String>().escape_debug().to_string()
        };
        return Err(VmmError::Personalise {
            vm_id: vm_id.to_owned(),
            why: format!(
                "{CLONE_AGENT} {} exited {:?} (signal {:?}): {} {}",
                args.first().unwrap_or(&""),
                out.exit_code,
                out.signal,
                tail(&out.stderr),
                tail(&out.stdout)
            ),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    Ok(line
        .chars()
        .take(300)
        .collect::<String>()
        .escape_debug()
        .to_string())
}

/// Load the template's state into the clone's waiting QEMU: on the
/// operator monitor (the supervisor does not run yet), `x-ignore-shared`,
/// the state file passed as a descriptor, `migrate-incoming fd:`.
async fn restore(vm_id: &str, dir: &super::VmDir, template: &Template) -> Result<(), VmmError> {
    let qmp_err = |source| VmmError::Qmp {
        vm_id: vm_id.to_owned(),
        source,
    };
    let state = std::fs::File::open(template.state_file()).map_err(|source| VmmError::Io {
        vm_id: vm_id.to_owned(),
        what: format!("cannot open {}", template.state_file().display()),
        source,
    })?;
    let mut mon = Monitor::connect(&dir.operator_socket()).await.map_err(qmp_err)?;
    template::migrate_through_fd(&mut mon, vm_id, state.as_fd(), template::Migration::Restore).await
}

/// The guest agent's socket, connected while the clone is paused (see
/// [`QgaClient::open`]).
async fn open_agent(dir: &super::VmDir) -> Result<QgaClient, super::QgaError> {
    QgaClient::open(&dir.qga_socket(), &dir.qga_lock()).await
}

/// `opened` synchronised after `cont`; failing that, new connections.
async fn synced_agent(dir: &super::VmDir, mut opened: QgaClient) -> Result<QgaClient, super::QgaError> {
    match opened.sync().await {
        Ok(()) => Ok(opened),
        Err(err) => {
            tracing::debug!(%err, "guest agent did not answer on the connection made before cont");
            // Its lock goes with it, before a new connection takes it.
            drop(opened);
            connect_agent(dir).await
        }
    }
}

/// The guest agent, retried for a moment: right after `cont` the guest may
/// need a few scheduler ticks to read its port again.
async fn connect_agent(dir: &super::VmDir) -> Result<QgaClient, super::QgaError> {
    let deadline = Instant::now() + AGENT_CONNECT_TIMEOUT;
    loop {
        match QgaClient::connect(&dir.qga_socket(), &dir.qga_lock()).await {
            Ok(agent) => return Ok(agent),
            Err(err) if Instant::now() >= deadline => return Err(err),
            Err(err) => tracing::debug!(%err, "guest agent not ready after cont"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How far the guest's clock is behind the host's, in nanoseconds: the
/// guest woke at its template's time, so its clock is off by a constant.
/// `guest-get-time` is answered within the round trip (no process in the
/// guest); its middle is taken as the moment it was read.
///
/// The agent shifts the clock by it (relative: right however late its exec
/// runs). Not `guest-set-time`: qemu-ga follows it with `hwclock -w`, which
/// waits for the emulated RTC's next second (0.5-1 s more under TCG); the
/// RTC needs no write, QEMU's follows the host clock across the restore and
/// only a boot reads it. Not a `date -s` of its own: one process start more
/// under TCG (0.3-0.5 s).
async fn clock_offset(agent: &mut QgaClient) -> Result<i64, super::QgaError> {
    let host_ns = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or_default()
    };
    let before = host_ns();
    let guest = i128::from(agent.get_time_ns().await?);
    let after = host_ns();
    let offset = (before + after) / 2 - guest;
    tracing::debug!(
        offset_ms = offset / 1_000_000,
        round_trip_ms = (after - before) / 1_000_000,
        "guest clock offset"
    );
    Ok(offset.clamp(i64::MIN.into(), i64::MAX.into()) as i64)
}

/// Bytes from the host kernel's CSPRNG.
fn host_entropy() -> std::io::Result<[u8; ENTROPY_BYTES]> {
    let mut bytes = [0u8; ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}
