//! The VM lifecycle: one enum and one transition function. Every state change,
//! in the engine or the orchestrator, goes through [`VmState::transition`].
//!
//! ```text
//! creating -> starting -> running <-> stopped
//! running -> crashed -> starting       (supervised restart with backoff)
//! running <-> paused                    (QMP STOP / RESUME: an I/O error, a full disk)
//! starting -> paused                    (a clone restored from a template, not yet resumed)
//! crashed -> failed                     (too many crashes in the window)
//! any -> deleting -> deleted
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Resources are being allocated; no QEMU yet.
    Creating,
    /// QEMU is being spawned or the guest is booting.
    Starting,
    /// QEMU runs and the guest is up.
    Running,
    /// QEMU runs but has paused the guest (QMP `STOP`): a disk I/O error with
    /// `werror=stop`, a full host disk. It resumes by itself or on `cont`.
    Paused,
    /// A stop we asked for is under way.
    Stopping,
    /// No QEMU: stopped by us or shut down from inside the guest.
    Stopped,
    /// QEMU exited unasked or the guest panicked; the supervisor restarts it.
    Crashed,
    /// Create could not finish, or crashes repeated too often.
    Failed,
    /// Resources are being released.
    Deleting,
    /// Gone. Terminal.
    Deleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM state transition from {from} to {to}")]
pub struct InvalidTransition {
    pub from: VmState,
    pub to: VmState,
}

impl VmState {
    pub const ALL: [VmState; 10] = [
        VmState::Creating,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Crashed,
        VmState::Failed,
        VmState::Deleting,
        VmState::Deleted,
    ];

    /// Whether `self -> to` is allowed. Staying in the same state is not a
    /// transition and is rejected, so callers notice double work.
    pub fn can_transition(self, to: VmState) -> bool {
        use VmState::*;
        match (self, to) {
            (Deleted, _) => false,
            (Deleting, Deleted) => true,
            (Deleting, _) => false,
            (_, Deleting) => true,
            (Creating, Starting | Failed) => true,
            (Starting, Running | Paused | Stopped | Crashed | Failed | Stopping) => true,
            (Running, Stopping | Stopped | Crashed | Paused) => true,
            (Paused, Running | Stopping | Stopped | Crashed) => true,
            (Stopping, Stopped | Crashed) => true,
            (Stopped, Starting) => true,
            (Crashed, Starting | Failed | Stopped) => true,
            (Failed, Starting) => true,
            _ => false,
        }
    }

    pub fn transition(self, to: VmState) -> Result<VmState, InvalidTransition> {
        if self.can_transition(to) {
            Ok(to)
        } else {
            Err(InvalidTransition { from: self, to })
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Failed => "failed",
            VmState::Deleting => "deleting",
            VmState::Deleted => "deleted",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown VM state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for VmState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::VmState::{self, *};

    /// The whole table, written out so that a change to the rules shows up
    /// here as a diff of intent: every (from, to) pair is listed once.
    const ALLOWED: &[(VmState, VmState)] = &[
        (Creating, Starting),
        (Creating, Failed),
        (Creating, Deleting),
        (Starting, Running),
        (Starting, Paused),
        (Starting, Stopped),
        (Starting, Stopping),
        (Starting, Crashed),
        (Starting, Failed),
        (Starting, Deleting),
        (Running, Stopping),
        (Running, Stopped),
        (Running, Crashed),
        (Running, Deleting),
        (Running, Paused),
        (Paused, Running),
        (Paused, Stopping),
        (Paused, Stopped),
        (Paused, Crashed),
        (Paused, Deleting),
        (Stopping, Stopped),
        (Stopping, Crashed),
        (Stopping, Deleting),
        (Stopped, Starting),
        (Stopped, Deleting),
        (Crashed, Starting),
        (Crashed, Stopped),
        (Crashed, Failed),
        (Crashed, Deleting),
        (Failed, Starting),
        (Failed, Deleting),
        (Deleting, Deleted),
    ];

    #[test]
    fn every_pair_matches_the_table() {
        for from in VmState::ALL {
            for to in VmState::ALL {
                let expected = ALLOWED.contains(&(from, to));
                assert_eq!(from.can_transition(to), expected, "{from} -> {to}");
                match from.transition(to) {
                    Ok(state) => assert_eq!(state, to),
                    Err(err) => {
                        assert!(!expected);
                        assert_eq!((err.from, err.to), (from, to));
                        assert_eq!(
                            err.to_string(),
                            format!("invalid VM state transition from {from} to {to}")
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for state in VmState::ALL {
            assert_eq!(state.as_str().parse::<VmState>().unwrap(), state);
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{state}\""));
        }
        assert!("runing".parse::<VmState>().is_err());
    }
}
