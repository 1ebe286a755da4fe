//! A hosting's lifecycle: one enum, one transition function, and the state
//! the user asked for. The hosting's state is what webhoster *saw* last; the
//! desired state is what the user *asked* for. Convergence moves the first
//! toward the second, and every move goes through [`HostingState::transition`].
//!
//! ```text
//! creating -> running | failed | deleting
//! starting -> running | stopping | stopped | restarting | paused | failed
//! running  -> starting (a part vanished: being repaired) | stopping | stopped
//!             | restarting (QEMU crashed) | paused (QMP STOP) | failed
//! stopping -> stopped | starting (a restart) | failed
//! stopped  -> starting
//! restarting -> starting | running | stopping | stopped | paused | failed
//! paused   -> running | starting | restarting | stopping | stopped | failed
//! failed   -> starting | stopping | stopped
//! any but deleting -> deleting; deleting is left only by removing the row
//! ```
//!
//! A leaf: the store reads and writes these types, so this module depends
//! on nothing of the crate.

use std::fmt;
use std::str::FromStr;

/// What a hosting is doing, as last observed. Stored as its `as_str` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostingState {
    /// The create steps run (the row's `step` says which).
    Creating,
    /// QEMU runs or is being started, and the site or SSH does not answer yet.
    Starting,
    /// QEMU runs, the site answers through nginx and SSH accepts.
    Running,
    /// A stop (ACPI power-down, then quit) is under way.
    Stopping,
    /// No QEMU, by request (or the guest powered itself off).
    Stopped,
    /// QEMU exited unasked; the supervisor restarts it with backoff.
    Restarting,
    /// QEMU runs but the guest is paused (QMP `STOP`: an I/O error, a full disk).
    Paused,
    /// Could not be brought to the desired state; `last_error` says why.
    Failed,
    /// Everything is being removed; the row goes when that is done.
    Deleting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid hosting state transition from {from} to {to}")]
pub struct InvalidTransition {
    pub from: HostingState,
    pub to: HostingState,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hosting state {0:?}")]
pub struct UnknownState(pub String);

impl HostingState {
    pub const ALL: [HostingState; 9] = [
        HostingState::Creating,
        HostingState::Starting,
        HostingState::Running,
        HostingState::Stopping,
        HostingState::Stopped,
        HostingState::Restarting,
        HostingState::Paused,
        HostingState::Failed,
        HostingState::Deleting,
    ];

    /// Whether `self -> to` is allowed. Staying put is not a transition.
    pub fn can_transition(self, to: HostingState) -> bool {
        use HostingState::*;
        match (self, to) {
            (Deleting, _) => false,
            (_, Deleting) => true,
            (Creating, Running | Failed) => true,
            (Creating, _) | (_, Creating) => false,
            (Starting, Running | Stopping | Stopped | Restarting | Paused | Failed) => true,
            (Running, Starting | Stopping | Stopped | Restarting | Paused | Failed) => true,
            (Stopping, Stopped | Starting | Failed) => true,
            (Stopped, Starting) => true,
            (Restarting, Starting | Running | Stopping | Stopped | Paused | Failed) => true,
            (Paused, Running | Starting | Restarting | Stopping | Stopped | Failed) => true,
            (Failed, Starting | Stopping | Stopped) => true,
            _ => false,
        }
    }

    pub fn transition(self, to: HostingState) -> Result<HostingState, InvalidTransition> {
        if self.can_transition(to) {
            Ok(to)
        } else {
            Err(InvalidTransition { from: self, to })
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HostingState::Creating => "creating",
            HostingState::Starting => "starting",
            HostingState::Running => "running",
            HostingState::Stopping => "stopping",
            HostingState::Stopped => "stopped",
            HostingState::Restarting => "restarting",
            HostingState::Paused => "paused",
            HostingState::Failed => "failed",
            HostingState::Deleting => "deleting",
        }
    }
}

impl FromStr for HostingState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostingState::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl fmt::Display for HostingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the user asked for. Deletion is a state of its own (`deleting`), not
/// a wish: once asked, it is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Desired {
    Running,
    Stopped,
}

impl Desired {
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }
}

impl FromStr for Desired {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(Desired::Running),
            "stopped" => Ok(Desired::Stopped),
            _ => Err(UnknownState(s.to_owned())),
        }
    }
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The steps of a create (their work and undo are in `steps`). Each create
/// runs the steps of its [`CreatePath`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Render cloud-init and write the seed ISO.
    Seed,
    /// qcow2 overlay on the base image.
    Disk,
    /// A warm clone, taken from the pool, is still there and paused.
    Claim,
    /// Tap in the namespace, on the bridge.
    Tap,
    /// Host SSH port to guest :22.
    Forward,
    /// nginx site block for `/<user_id>/`.
    Proxy,
    /// QEMU running.
    Spawn,
    /// The warm clone runs again and its agent applied the user's seed.
    Resume,
    /// Guest answers HTTP :80 and SSH :22.
    Ready,
    /// The site answers through nginx and SSH through the forward.
    Publish,
}

/// How a create gets its VM: a cold boot of a new disk, or a clone restored
/// from the template (the warm pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CreatePath {
    Cold,
    Warm,
}

impl CreatePath {
    pub const ALL: [CreatePath; 2] = [CreatePath::Cold, CreatePath::Warm];

    /// The steps, in order. Both paths have as many, and the same step at
    /// each place except the VM's own (disk/claim, spawn/resume), so a
    /// progress bar reads the same. The host's doors (forward, proxy) go in
    /// before the guest runs: nginx's reload then overlaps the guest's boot
    /// or resume instead of following it.
    pub fn steps(self) -> [Step; Step::PER_CREATE] {
        use Step::*;
        match self {
            CreatePath::Cold => [Seed, Disk, Tap, Forward, Proxy, Spawn, Ready, Publish],
            CreatePath::Warm => [Seed, Claim, Tap, Forward, Proxy, Resume, Ready, Publish],
        }
    }

    /// Whether `step` runs at once with the step after it: on the warm path
    /// nginx reloads (`proxy`) while the clone resumes; the two share
    /// nothing, and the reload would add its 0.1-0.2 s to the create.
    pub fn overlaps_next(self, step: Step) -> bool {
        self == CreatePath::Warm && step == Step::Proxy
    }

    pub fn name(self) -> &'static str {
        match self {
            CreatePath::Cold => "cold",
            CreatePath::Warm => "warm",
        }
    }
}

impl fmt::Display for CreatePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Step {
    /// Every step of both paths, in journal order (undo runs in reverse).
    pub const ALL: [Step; 10] = [
        Step::Seed,
        Step::Disk,
        Step::Claim,
        Step::Tap,
        Step::Forward,
        Step::Proxy,
        Step::Spawn,
        Step::Resume,
        Step::Ready,
        Step::Publish,
    ];

    /// Steps one create runs.
    pub const PER_CREATE: usize = 8;

    pub fn name(self) -> &'static str {
        match self {
            Step::Seed => "seed",
            Step::Disk => "disk",
            Step::Claim => "claim",
            Step::Tap => "tap",
            Step::Spawn => "spawn",
            Step::Resume => "resume",
            Step::Forward => "forward",
            Step::Ready => "ready",
            Step::Proxy => "proxy",
            Step::Publish => "publish",
        }
    }

    pub fn parse(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Position in the journal.
    pub fn seq(self) -> i64 {
        Step::ALL.iter().position(|s| *s == self).unwrap_or(0) as i64 + 1
    }

    /// 1-based place in its create (for progress): the same on both paths.
    pub fn place(self) -> usize {
        CreatePath::ALL
            .iter()
            .find_map(|p| p.steps().iter().position(|s| *s == self))
            .unwrap_or(0)
            + 1
    }
}

impl std::str::FromStr for Step {
    type Err = ();
    fn from_str(name: &str) -> Result<Step, ()> {
        Step::parse(name).ok_or(())
    }
}

#[cfg(test)]
mod tests {
    use super::HostingState::{self, *};

    /// Every allowed pair, written out once more: a change to the table in
    /// `can_transition` must be made here too, on purpose.
    const ALLOWED: &[(HostingState, HostingState)] = &[
        (Creating, Running),
        (Creating, Failed),
        (Creating, Deleting),
        (Starting, Running),
        (Starting, Stopping),
        (Starting, Stopped),
        (Starting, Restarting),
        (Starting, Paused),
        (Starting, Failed),
        (Starting, Deleting),
        (Running, Starting),
        (Running, Stopping),
        (Running, Stopped),
        (Running, Restarting),
        (Running, Paused),
        (Running, Failed),
        (Running, Deleting),
        (Stopping, Stopped),
        (Stopping, Starting),
        (Stopping, Failed),
        (Stopping, Deleting),
        (Stopped, Starting),
        (Stopped, Deleting),
        (Restarting, Starting),
        (Restarting, Running),
        (Restarting, Stopping),
        (Restarting, Stopped),
        (Restarting, Paused),
        (Restarting, Failed),
        (Restarting, Deleting),
        (Paused, Running),
        (Paused, Starting),
        (Paused, Restarting),
        (Paused, Stopping),
        (Paused, Stopped),
        (Paused, Failed),
        (Paused, Deleting),
        (Failed, Starting),
        (Failed, Stopping),
        (Failed, Stopped),
        (Failed, Deleting),
    ];

    #[test]
    fn every_pair_is_checked_against_the_table() {
        for from in HostingState::ALL {
            for to in HostingState::ALL {
                let want = ALLOWED.contains(&(from, to));
                assert_eq!(from.can_transition(to), want, "{from} -> {to}");
                match from.transition(to) {
                    Ok(s) => assert!(want && s == to, "{from} -> {to}"),
                    Err(e) => assert!(!want && e.from == from && e.to == to, "{from} -> {to}"),
                }
            }
        }
    }

    #[test]
    fn only_a_warm_proxy_overlaps_and_the_clones_resume_follows_it() {
        use super::{CreatePath, Step};
        let overlapping: Vec<(CreatePath, Step, Option<Step>)> = CreatePath::ALL
            .into_iter()
            .flat_map(|p| {
                let steps = p.steps();
                (0..steps.len())
                    .filter(move |i| p.overlaps_next(steps[*i]))
                    .map(move |i| (p, steps[i], steps.get(i + 1).copied()))
            })
            .collect();
        assert_eq!(
            overlapping,
            vec![(CreatePath::Warm, Step::Proxy, Some(Step::Resume))]
        );
    }

    #[test]
    fn names_round_trip() {
        for s in HostingState::ALL {
            assert_eq!(s.as_str().parse::<HostingState>(), Ok(s));
        }
        assert!("nope".parse::<HostingState>().is_err());
        for d in [super::Desired::Running, super::Desired::Stopped] {
            assert_eq!(d.as_str().parse::<super::Desired>(), Ok(d));
        }
    }
}
