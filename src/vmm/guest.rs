//! What the engine asks of a running guest through its agent (`qga.rs`):
//! whether it is ready (the doors webhoster promises are open, and nothing
//! left in its boot closes one). Owns no state: each call takes the VM's
//! agent lock, asks, and lets go. Never changes the guest, never trusts
//! what it answers beyond the words it maps.

use std::time::Duration;

use super::engine::Engine;
use super::qga::QgaClient;
use super::{VmmError, validate_vm_id};

/// `systemctl show` and `is-system-running` answer at once (they only ask
/// PID 1); under TCG on a loaded host starting the process takes a second
/// or two.
pub const SYSTEM_STATE_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest state name kept from the guest's answer.
const MAX_STATE_LEN: usize = 32;

/// The image's unit for "ready": reached once the seed is applied and sshd
/// and nginx run, after cloud-init's stages when it applies the seed
/// (`images/overlay/etc/systemd/system/webhoster-ready.target`). It does not
/// wait for the rest of the boot (networkd, logind, udev's coldplug), which
/// under TCG goes on for seconds after the doors are open.
const READY_TARGET: &str = "webhoster-ready.target";

/// Exists while [`READY_TARGET`] is active (`webhoster-ready-flag.service`,
/// bound to it). Read through `guest-file-open`: asking `systemctl` starts
/// a process in the guest, 0.4-0.7 s under TCG at every poll of a booting
/// guest.
const READY_FLAG: &str = "/run/webhoster-ready/doors-open";
/// The flag's unit: an image that has it writes the flag, so a missing flag
/// means "not yet" without asking `systemctl`.
const READY_FLAG_UNIT: &str = "/etc/systemd/system/webhoster-ready-flag.service";

/// What `systemctl show --property=LoadState,ActiveState` says of
/// [`READY_TARGET`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadyTarget {
    Reached,
    NotYet,
    /// An image from before the target: its whole boot is the measure.
    Missing,
}

impl ReadyTarget {
    fn parse(stdout: &[u8]) -> ReadyTarget {
        let text = String::from_utf8_lossy(stdout);
        let prop = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or("")
        };
        match (prop("LoadState"), prop("ActiveState")) {
            ("not-found", _) => ReadyTarget::Missing,
            ("loaded", "active") => ReadyTarget::Reached,
            _ => ReadyTarget::NotYet,
        }
    }
}

/// The guest's own view of its readiness: [`READY_TARGET`], or for an image
/// without it, `systemctl is-system-running`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestSystemState {
    /// Ready: the doors are open and nothing left in the boot (cloud-config,
    /// cloud-final) will restart sshd or nginx.
    Running,
    /// Jobs are still queued (`initializing`, `starting`).
    Starting,
    /// Boot is over but a unit failed.
    Degraded,
    /// Anything else the guest said (`maintenance`, `stopping`, ...), cut to
    /// a short, printable word.
    Other(String),
    /// No guest agent answered: early in boot (before the agent starts), a
    /// guest without one, or a QEMU started without the agent port.
    NoAgent,
}

impl GuestSystemState {
    /// Map the first line of `systemctl is-system-running`'s output.
    pub fn parse(stdout: &[u8]) -> GuestSystemState {
        let text = String::from_utf8_lossy(stdout);
        let word = text.lines().next().unwrap_or("").trim();
        match word {
            "running" => GuestSystemState::Running,
            "initializing" | "starting" => GuestSystemState::Starting,
            "degraded" => GuestSystemState::Degraded,
            other => GuestSystemState::Other(
                other
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .take(MAX_STATE_LEN)
                    .collect(),
            ),
        }
    }
}

impl Engine {
    /// A connected guest agent client for a running VM. It holds the VM's
    /// agent lock (one client per VM, across processes) until dropped, so
    /// keep it only for the calls at hand.
    pub async fn guest_agent(&self, vm_id: &str) -> Result<QgaClient, VmmError> {
        validate_vm_id(vm_id)?;
        let dir = self.vm_dir(vm_id);
        if !dir.root().exists() {
            return Err(VmmError::UnknownVm(vm_id.to_owned()));
        }
        if dir.live_pid(vm_id).is_none() {
            return Err(VmmError::NotRunning(vm_id.to_owned()));
        }
        QgaClient::connect(&dir.qga_socket(), &dir.qga_lock())
            .await
            .map_err(|source| VmmError::GuestAgent {
                vm_id: vm_id.to_owned(),
                source,
            })
    }

    /// Ask the guest whether it is ready ([`READY_TARGET`], read as
    /// [`READY_FLAG`]; for an image without it, whether its whole boot is
    /// over). `Running` is "ready means ready". A guest whose agent does not
    /// answer (yet) is [`GuestSystemState::NoAgent`], not an error: poll
    /// again.
    pub async fn guest_system_state(&self, vm_id: &str) -> Result<GuestSystemState, VmmError> {
        let mut agent = match self.guest_agent(vm_id).await {
            Ok(agent) => agent,
            Err(VmmError::GuestAgent { source, .. }) if source.is_no_agent() => {
                return Ok(GuestSystemState::NoAgent);
            }
            Err(err) => return Err(err),
        };
        let agent_err = |source| VmmError::GuestAgent {
            vm_id: vm_id.to_owned(),
            source,
        };
        if agent.file_opens(READY_FLAG).await.map_err(agent_err)? {
            tracing::debug!(vm_id, "guest ready flag found");
            return Ok(GuestSystemState::Running);
        }
        if agent.file_opens(READY_FLAG_UNIT).await.map_err(agent_err)? {
            return Ok(GuestSystemState::Starting);
        }
        // An image from before the flag, or an agent that refuses file
        // commands: systemd is asked.
        let show = ["show", "--property=LoadState,ActiveState", READY_TARGET];
        let out = agent
            .exec_with_timeout("/bin/systemctl", &show, SYSTEM_STATE_TIMEOUT)
            .await
            .map_err(agent_err)?;
        let target = ReadyTarget::parse(&out.stdout);
        tracing::debug!(vm_id, ?target, "guest ready target");
        match target {
            ReadyTarget::Reached => return Ok(GuestSystemState::Running),
            ReadyTarget::NotYet => return Ok(GuestSystemState::Starting),
            ReadyTarget::Missing => {}
        }
        // Exits non-zero for every state but `running`: the output decides.
        let out = agent
            .exec_with_timeout("/bin/systemctl", &["is-system-running"], SYSTEM_STATE_TIMEOUT)
            .await
            .map_err(agent_err)?;
        let state = GuestSystemState::parse(&out.stdout);
        tracing::debug!(vm_id, ?state, exit_code = ?out.exit_code, "guest system state");
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_target_maps_from_systemctl_show() {
        let show = |s: &str| ReadyTarget::parse(s.as_bytes());
        assert_eq!(
            show("LoadState=loaded\nActiveState=active\n"),
            ReadyTarget::Reached
        );
        assert_eq!(
            show("ActiveState=active\nLoadState=loaded\n"),
            ReadyTarget::Reached
        );
        assert_eq!(
            show("LoadState=loaded\nActiveState=inactive\n"),
            ReadyTarget::NotYet
        );
        assert_eq!(
            show("LoadState=not-found\nActiveState=inactive\n"),
            ReadyTarget::Missing
        );
        // Anything else (no answer, a hostile guest's) is not ready.
        assert_eq!(show(""), ReadyTarget::NotYet);
        assert_eq!(
            show("LoadState=loadedX\nActiveState=active\n"),
            ReadyTarget::NotYet
        );
    }

    #[test]
    fn states_map_from_systemctls_words() {
        assert_eq!(GuestSystemState::parse(b"running\n"), GuestSystemState::Running);
        assert_eq!(GuestSystemState::parse(b"starting\n"), GuestSystemState::Starting);
        assert_eq!(
            GuestSystemState::parse(b"initializing\n"),
            GuestSystemState::Starting
        );
        assert_eq!(GuestSystemState::parse(b"degraded\n"), GuestSystemState::Degraded);
        assert_eq!(
            GuestSystemState::parse(b"maintenance\n"),
            GuestSystemState::Other("maintenance".into())
        );
        assert_eq!(
            GuestSystemState::parse(b""),
            GuestSystemState::Other(String::new())
        );
        // A hostile guest's answer stays a short, printable word.
        let odd = GuestSystemState::parse(format!("\u{1b}[2J{}\nrunning\n", "z".repeat(500)).as_bytes());
        assert_eq!(odd, GuestSystemState::Other(format!("2J{}", "z".repeat(30))));
    }
}
