//! The create steps, in order, each with its undo. The order is the one of
//! ARCHITECTURE.md ("the path of one request"); undo runs in reverse.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use crate::seed::{SeedSpec, StaticNetwork};

use super::ports::{Doors, GuestBoot, PortError, Ports, Site, VmLaunch, VmRunState};
pub use super::state::{CreatePath, Step};

/// What the steps of one hosting work on (all derived from its row).
#[derive(Debug, Clone)]
pub struct Job {
    pub hosting_id: i64,
    pub user_id: i64,
    pub username: String,
    pub login_user: String,
    pub keys: Vec<crate::auth::SshPublicKey>,
    pub launch: VmLaunch,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// Warm when a pool clone was taken for this create (its vm_id and MAC
    /// are the row's).
    pub path: CreatePath,
}

impl Job {
    pub fn seed_spec(&self) -> SeedSpec {
        SeedSpec {
            instance_id: self.launch.vm_id.clone(),
            hostname: self.launch.vm_id.clone(),
            user: self.login_user.clone(),
            ssh_keys: self.keys.clone(),
            owner: self.username.clone(),
            network: Some(StaticNetwork {
                mac: self.launch.mac.clone(),
                address: ipnet::Ipv4Net::new(self.launch.guest_ip, self.prefix_len)
                    .unwrap_or_else(|_| ipnet::Ipv4Net::from(self.launch.guest_ip)),
                gateway: self.gateway,
            }),
        }
    }

    fn seed_path(&self) -> PathBuf {
        self.launch.seed_iso.clone()
    }
}

/// How long readiness may take, and how often it is probed.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    pub timeout: Duration,
    pub interval: Duration,
}

/// How long a door that took a readiness probe's connection may take to
/// answer (within the wait's own deadline): a slow answer is waited for
/// rather than dialled again, which would only add work to a busy guest.
const ANSWER_PATIENCE: Duration = Duration::from_secs(30);

/// A readiness wait that ran out of time; carries the last probe error.
#[derive(Debug, thiserror::Error)]
#[error("not ready within {0:?}")]
pub struct NotReady(pub Duration, #[source] pub Box<PortError>);

async fn wait_until<F, Fut>(ready: Readiness, mut probe: F) -> Result<(), PortError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), PortError>>,
{
    let deadline = tokio::time::Instant::now() + ready.timeout;
    loop {
        let attempt = tokio::time::timeout_at(deadline, probe()).await;
        match attempt {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if tokio::time::Instant::now() + ready.interval >= deadline => {
                return Err(NotReady(ready.timeout, Box::new(e)).into());
            }
            Ok(Err(_)) => tokio::time::sleep(ready.interval).await,
            Err(_) => {
                let last = PortError::Probe("the probe itself timed out".into());
                return Err(NotReady(ready.timeout, Box::new(last)).into());
            }
        }
    }
}

/// Ok once the guest says it is ready: the seed applied, sshd and nginx up,
/// and nothing left in its boot to restart them (cloud-init's later stages
/// done, when cloud-init applied the seed). A guest
/// whose agent does not answer is taken at its word that HTTP and SSH
/// answer only once `agentless_ok` (its user may have removed the agent;
/// early in a boot the agent is simply not up yet).
pub async fn boot_done(ports: &Ports, vm_id: &str, agentless_ok: bool) -> Result<(), PortError> {
    match ports.engine.guest_boot(vm_id).await {
        GuestBoot::Done => Ok(()),
        GuestBoot::NoAgent if agentless_ok => Ok(()),
        GuestBoot::NoAgent => Err(PortError::Probe("the guest agent does not answer yet".into())),
        GuestBoot::InProgress => Err(PortError::Probe("the guest is still booting".into())),
        GuestBoot::Other(state) => Err(PortError::Probe(format!("the guest's boot ended {state}"))),
    }
}

pub async fn run(
    step: Step,
    path: CreatePath,
    job: &Job,
    ports: &Ports,
    ready: Readiness,
) -> Result<(), PortError> {
    let vm_id = job.launch.vm_id.as_str();
    match step {
        Step::Seed => {
            let spec = job.seed_spec();
            // Validate before touching the disk: a bad key never reaches a file.
            crate::seed::render(&spec)?;
            ports.seeder.write(&spec, &job.seed_path()).await
        }
        Step::Disk => ports.engine.create_disk(&job.launch).await,
        Step::Claim => match ports.engine.run_state(vm_id) {
            Some(VmRunState::Paused) => Ok(()),
            other => Err(PortError::Probe(format!(
                "the warm clone is {other:?}, not paused and waiting"
            ))),
        },
        Step::Tap => {
            let (mac, ip) = (&job.launch.mac, job.launch.guest_ip);
            ports.network.create_tap(vm_id, mac, ip).await.map(|_| ())
        }
        Step::Spawn => ports.engine.spawn(&job.launch).await.map(|_| ()),
        Step::Resume => ports.engine.resume_clone(vm_id).await,
        Step::Forward => {
            ports
                .network
                .add_forward(vm_id, job.launch.ssh_port, job.launch.guest_ip)
                .await
        }
        // A resumed clone's boot was over in its template, and its agent
        // returned only once its network was in place; `publish` probes the
        // same doors through nginx and the forward. Probing them here too
        // would cost the guest a second sshd start, untranslated under TCG
        // in a new QEMU (0.3-0.5 s).
        Step::Ready if path == CreatePath::Warm => Ok(()),
        // A booting guest: its site answers, its ready target says sshd
        // listens and nothing in the boot restarts it, and SSH answers
        // through the forward. Each is awaited on its own, so one that
        // cannot answer yet (no agent: 5 s to find out; no address: ARP's
        // retries) does not hold back another's retries, and the banner is
        // read while the guest still writes its ready flag. It is read
        // once: each connection re-executes the guest's sshd, so `publish`
        // does not knock again.
        Step::Ready => {
            let (ip, ssh_port) = (job.launch.guest_ip, job.launch.ssh_port);
            tokio::try_join!(
                wait_until(ready, || ports.probe.guest_site(ip, ANSWER_PATIENCE)),
                wait_until(ready, || boot_done(ports, vm_id, false)),
                wait_until(ready, || ports.probe.forwarded_ssh(ssh_port, ANSWER_PATIENCE)),
            )
            .map(drop)
        }
        Step::Proxy => {
            ports
                .proxy
                .add_site(&Site {
                    user_id: job.user_id,
                    username: job.username.clone(),
                    upstream: SocketAddrV4::new(job.launch.guest_ip, 80),
                })
                .await
        }
        Step::Publish => {
            // A cold create read the banner through the forward in `ready`.
            let doors = match path {
                CreatePath::Warm => Doors::SiteAndSsh {
                    ssh_port: job.launch.ssh_port,
                },
                CreatePath::Cold => Doors::Site,
            };
            wait_until(ready, || {
                ports.probe.published_ready(job.user_id, doors, ANSWER_PATIENCE)
            })
            .await
        }
    }
}

/// Undoes `step`. Idempotent: also used for a step that failed half-way and
/// for steps found in the journal after a crash.
pub async fn undo(step: Step, job: &Job, ports: &Ports) -> Result<(), PortError> {
    let vm_id = job.launch.vm_id.as_str();
    match step {
        Step::Seed => ports.seeder.remove(&job.seed_path()).await,
        Step::Disk => ports.engine.remove_disk(vm_id).await,
        Step::Tap => ports.network.delete_tap(vm_id).await,
        Step::Spawn | Step::Claim => ports.engine.kill(vm_id).await,
        Step::Forward => ports.network.remove_forward(vm_id).await,
        Step::Ready | Step::Publish | Step::Resume => Ok(()),
        Step::Proxy => ports.proxy.remove_site(job.user_id).await,
    }
}
