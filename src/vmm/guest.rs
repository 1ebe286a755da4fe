//! What the engine asks of a running guest through its agent (`qga.rs`):
//! whether its boot is completely over. Owns no state: each call takes the
//! VM's agent lock, asks, and lets go. Never changes the guest, never
//! trusts what it answers beyond the words it maps.

use std::time::Duration;

use super::engine::Engine;
use super::qga::QgaClient;
use super::{VmmError, validate_vm_id};

/// `systemctl is-system-running` answers at once (it only asks PID 1); under
/// TCG on a loaded host starting the process takes a second or two.
pub const SYSTEM_STATE_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest state name kept from the guest's answer.
const MAX_STATE_LEN: usize = 32;

/// The guest's own view of its boot, from `systemctl is-system-running`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestSystemState {
    /// Boot is over: no job queued, no unit failed. Nothing started at boot
    /// (cloud-config, cloud-final) will restart sshd or nginx any more.
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

    /// Ask the guest whether its boot is over (`systemctl
    /// is-system-running`). `Running` is "ready means ready": the first
    /// boot's units, cloud-init's included, have all finished. A guest whose
    /// agent does not answer (yet) is [`GuestSystemState::NoAgent`], not an
    /// error: poll again.
    pub async fn guest_system_state(&self, vm_id: &str) -> Result<GuestSystemState, VmmError> {
        let mut agent = match self.guest_agent(vm_id).await {
            Ok(agent) => agent,
            Err(VmmError::GuestAgent { source, .. }) if source.is_no_agent() => {
                return Ok(GuestSystemState::NoAgent);
            }
            Err(err) => return Err(err),
        };
        // Exits non-zero for every state but `running`: the output decides.
        let out = agent
            .exec_with_timeout("/bin/systemctl", &["is-system-running"], SYSTEM_STATE_TIMEOUT)
            .await
            .map_err(|source| VmmError::GuestAgent {
                vm_id: vm_id.to_owned(),
                source,
            })?;
        let state = GuestSystemState::parse(&out.stdout);
        tracing::debug!(vm_id, ?state, exit_code = ?out.exit_code, "guest system state");
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
