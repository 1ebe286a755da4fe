//! What convergence remembers of each hosting's doors between passes: when
//! its SSH door last answered or how many knocks in a row it did not, how
//! many looks in a row failed, and how many guest reboots it has seen.
//!
//! Knocking on SSH is what costs a guest: each connection makes its sshd
//! re-execute itself (OpenSSH 9.2), about 0.65 s of a TCG guest's CPU. A
//! busy host makes banners late, and a late banner must not bring more
//! knocks: seen with 20 idle VMs, one late banner each demoted every hosting
//! to `starting`, whose every-pass knocks then kept both cores busy and every
//! banner late, for good.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often SSH is knocked on at a hosting that is running and answered.
/// The site is looked at every pass; an SSH door that stopped answering is
/// seen within this. Measured: a banner read every 3 s kept an idle guest at
/// 18-22 % of a host core, 3-4 % without; an idle warm VM's QEMU took 42-44
/// ms of CPU a second with a knock a minute, 37 ms with one every 5 minutes.
pub const SSH_EVERY: Duration = Duration::from_secs(300);

/// The wait before the next knock after this many silent knocks in a row
/// (the last entry for more). The first two retries come at the next pass,
/// so a running hosting's [`DEMOTE_AFTER`] looks take seconds; then a guest
/// that takes the connection and stays silent is knocked on less and less
/// often, once a minute at the least: a door that fails is watched more
/// closely than one that answers. A guest that refuses (it is coming up) is
/// knocked on again at the next pass: that costs it nothing.
const SSH_RETRY: [Duration; 7] = [
    Duration::ZERO,
    Duration::ZERO,
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(20),
    Duration::from_secs(40),
    Duration::from_secs(60),
];

/// What a look found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every door it knocked on answered.
    Answered,
    /// A door failed before the look's patience ran out (refused, an error
    /// page): nothing is waiting on a slow guest.
    Refused,
    /// The look waited its whole patience: a door took the connection (or
    /// its SYN) and did not answer.
    Silent,
}

/// Looks in a row that must fail before a running hosting is said to be
/// `starting`: one late answer from a busy guest is not an outage.
pub const DEMOTE_AFTER: u32 = 3;

#[derive(Debug, Clone, Copy)]
enum Ssh {
    Answered(Instant),
    Failed { times: u32, last: Instant },
}

#[derive(Debug, Default, Clone, Copy)]
struct Memory {
    ssh: Option<Ssh>,
    failed_looks: u32,
    /// The engine's count of the guest's resets at the last pass.
    resets: Option<u64>,
}

/// By vm_id.
#[derive(Debug, Default)]
pub struct Looks(HashMap<String, Memory>);

impl Looks {
    /// Whether a look now knocks on SSH. At a hosting that is running and
    /// was looked at without repairs (`steady`): once an [`SSH_EVERY`]. At
    /// another: at every look, unless its last knocks found no banner.
    pub fn knock_ssh(&self, vm_id: &str, steady: bool, now: Instant) -> bool {
        match self.0.get(vm_id).and_then(|m| m.ssh) {
            None => true,
            Some(Ssh::Answered(at)) => !steady || now.duration_since(at) >= SSH_EVERY,
            Some(Ssh::Failed { times, last }) => {
                let wait = SSH_RETRY[(times as usize).saturating_sub(1).min(SSH_RETRY.len() - 1)];
                now.duration_since(last) >= wait
            }
        }
    }

    /// Records a look that knocked on SSH (`knocked`) or not. Returns how
    /// many looks in a row failed.
    pub fn record(&mut self, vm_id: &str, knocked: bool, outcome: Outcome, now: Instant) -> u32 {
        let m = self.0.entry(vm_id.to_owned()).or_default();
        m.ssh = match (knocked, outcome, m.ssh) {
            (true, Outcome::Answered, _) => Some(Ssh::Answered(now)),
            (true, Outcome::Silent, Some(Ssh::Failed { times, .. })) => Some(Ssh::Failed {
                times: times + 1,
                last: now,
            }),
            (true, Outcome::Silent, _) => Some(Ssh::Failed { times: 1, last: now }),
            (true, Outcome::Refused, _) => None,
            // The site failed: SSH is knocked on at the next look.
            (false, _, Some(Ssh::Answered(_))) if outcome != Outcome::Answered => None,
            (false, _, ssh) => ssh,
        };
        m.failed_looks = match outcome {
            Outcome::Answered => 0,
            Outcome::Refused | Outcome::Silent => m.failed_looks + 1,
        };
        m.failed_looks
    }

    /// SSH answered just now (a create's own readiness check).
    pub fn ssh_answered(&mut self, vm_id: &str, now: Instant) {
        let m = self.0.entry(vm_id.to_owned()).or_default();
        m.ssh = Some(Ssh::Answered(now));
        m.failed_looks = 0;
    }

    /// Whether the guest rebooted since the last pass: `resets` (the
    /// engine's count) changed. A reboot is a known outage, so it must not
    /// wait for [`DEMOTE_AFTER`] failed looks; the first count seen is
    /// only remembered.
    pub fn rebooted(&mut self, vm_id: &str, resets: u64) -> bool {
        let m = self.0.entry(vm_id.to_owned()).or_default();
        m.resets.replace(resets).is_some_and(|seen| seen != resets)
    }

    pub fn forget(&mut self, vm_id: &str) {
        self.0.remove(vm_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "vm-1";

    #[test]
    fn a_running_hosting_is_knocked_on_every_five_minutes_another_at_every_look() {
        let t0 = Instant::now();
        let mut looks = Looks::default();
        assert!(looks.knock_ssh(VM, true, t0), "never knocked on");
        looks.ssh_answered(VM, t0);
        assert!(!looks.knock_ssh(VM, true, t0 + Duration::from_secs(299)));
        assert!(looks.knock_ssh(VM, true, t0 + SSH_EVERY));
        assert!(
            looks.knock_ssh(VM, false, t0),
            "not steady: an old answer says nothing"
        );
    }

    #[test]
    fn silent_knocks_back_off_and_an_answer_resets_them() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut looks = Looks::default();
        assert_eq!(looks.record(VM, true, Outcome::Silent, at(0)), 1);
        assert!(
            looks.knock_ssh(VM, false, at(0)),
            "a second knock at the next pass"
        );
        looks.record(VM, true, Outcome::Silent, at(3));
        assert!(looks.knock_ssh(VM, false, at(3)), "a third one too");
        assert_eq!(looks.record(VM, true, Outcome::Silent, at(6)), 3);
        assert!(!looks.knock_ssh(VM, false, at(10)));
        assert!(looks.knock_ssh(VM, false, at(11)), "5 s after the third");
        looks.record(VM, true, Outcome::Silent, at(11));
        assert!(!looks.knock_ssh(VM, false, at(20)));
        assert!(looks.knock_ssh(VM, false, at(21)), "10 s after the fourth");
        looks.record(VM, true, Outcome::Silent, at(21));
        assert!(!looks.knock_ssh(VM, false, at(40)));
        assert!(looks.knock_ssh(VM, false, at(41)), "20 s after the fifth");
        for s in [41, 81, 141] {
            looks.record(VM, true, Outcome::Silent, at(s));
        }
        assert!(
            !looks.knock_ssh(VM, false, at(200)),
            "a minute at most, and no less"
        );
        assert!(looks.knock_ssh(VM, false, at(201)));
        assert_eq!(looks.record(VM, true, Outcome::Answered, at(201)), 0);
        assert!(
            !looks.knock_ssh(VM, true, at(201 + 299)),
            "answered: every five minutes again"
        );
        assert!(looks.knock_ssh(VM, true, at(201 + 300)));
    }

    #[test]
    fn a_refusing_guest_is_knocked_on_at_every_look() {
        let t0 = Instant::now();
        let mut looks = Looks::default();
        for n in 1..=10 {
            assert_eq!(looks.record(VM, true, Outcome::Refused, t0), n);
            assert!(looks.knock_ssh(VM, false, t0), "refused {n} times");
        }
        for _ in 0..3 {
            looks.record(VM, true, Outcome::Silent, t0);
        }
        assert!(!looks.knock_ssh(VM, false, t0));
        looks.record(VM, false, Outcome::Refused, t0);
        assert!(
            !looks.knock_ssh(VM, false, t0),
            "a site look leaves the knocks' backoff"
        );
    }

    #[test]
    fn a_reboot_is_told_once_and_the_first_count_is_only_remembered() {
        let t0 = Instant::now();
        let mut looks = Looks::default();
        assert!(!looks.rebooted(VM, 4), "a restarted webhoster knows no past");
        assert!(!looks.rebooted(VM, 4));
        looks.ssh_answered(VM, t0);
        assert!(looks.rebooted(VM, 5), "the count survives other memories");
        assert!(!looks.rebooted(VM, 5), "told once");
    }

    #[test]
    fn a_failed_site_look_knocks_on_ssh_next() {
        let t0 = Instant::now();
        let mut looks = Looks::default();
        looks.ssh_answered(VM, t0);
        assert_eq!(looks.record(VM, false, Outcome::Silent, t0), 1);
        assert!(looks.knock_ssh(VM, true, t0), "the answer is forgotten");
        assert_eq!(
            looks.record(VM, false, Outcome::Answered, t0),
            0,
            "the site answered"
        );
        looks.forget(VM);
        assert!(looks.knock_ssh(VM, true, t0));
    }
}
