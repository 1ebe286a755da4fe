//! Candidate allocations: vm_id, MAC, guest IP, SSH port. A candidate is only
//! a guess; the database's unique constraints decide, and the orchestrator
//! retries with a new candidate when another create took it first.
//! The address rules themselves (which IPs a guest may get, how a MAC is
//! derived) are `net::alloc`'s; this file only picks among them at random.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;
use rand::Rng;

/// `vm-` and 10 hex digits: short enough for host interface names.
pub fn new_vm_id() -> String {
    let n: u64 = rand::rng().random::<u64>() & 0xff_ffff_ffff;
    format!("vm-{n:010x}")
}

pub use crate::net::alloc::mac_for;

/// A random free guest address: not the network, broadcast or gateway address.
pub fn pick_ip(subnet: Ipv4Net, used: &HashSet<String>) -> Option<Ipv4Addr> {
    let free: Vec<Ipv4Addr> = crate::net::alloc::guest_ips(subnet)
        .filter(|ip| !used.contains(&ip.to_string()))
        .collect();
    if free.is_empty() {
        return None;
    }
    // Random, not lowest-first: concurrent creates then rarely pick the same one.
    Some(free[rand::rng().random_range(0..free.len())])
}

/// A random port of `range` not held by a hosting and free on the host.
pub fn pick_port(
    range: &RangeInclusive<u16>,
    used: &HashSet<u16>,
    is_free: impl Fn(u16) -> bool,
) -> Option<u16> {
    let (lo, hi) = (*range.start(), *range.end());
    let mut rng = rand::rng();
    for _ in 0..32 {
        let port = rng.random_range(lo..=hi);
        if !used.contains(&port) && is_free(port) {
            return Some(port);
        }
    }
    // Nearly full range: scan from a random start.
    let span = u32::from(hi - lo) + 1;
    let start = rng.random_range(0..span);
    (0..span)
        .map(|i| lo + ((start + i) % span) as u16)
        .find(|p| !used.contains(p) && is_free(*p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_respect_the_used_sets() {
        let subnet: Ipv4Net = "10.9.0.0/29".parse().unwrap();
        let gw: Ipv4Addr = "10.9.0.1".parse().unwrap();
        let mut used = HashSet::new();
        for _ in 0..5 {
            let ip = pick_ip(subnet, &used).unwrap();
            assert_ne!(ip, gw);
            assert!(used.insert(ip.to_string()));
        }
        assert_eq!(pick_ip(subnet, &used), None, "a /29 holds 5 guests");

        let mut ports = HashSet::new();
        for _ in 0..3 {
            assert!(ports.insert(pick_port(&(100..=102), &ports, |_| true).unwrap()));
        }
        assert_eq!(pick_port(&(100..=102), &ports, |_| true), None);
        assert_eq!(pick_port(&(100..=102), &HashSet::new(), |p| p == 101), Some(101));

        let id = new_vm_id();
        assert_eq!(id.len(), 13);
        assert_eq!(mac_for(&id), mac_for(&id));
        assert!(mac_for(&id).starts_with("02:"));
    }
}
