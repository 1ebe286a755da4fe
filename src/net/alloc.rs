//! Pure allocation helpers: guest addresses, MACs, free-port checks. They
//! never persist anything: uniqueness across concurrent creates is the
//! store's job (unique constraints), these only propose candidates.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use super::NetError;

/// The gateway of a subnet: its first host address (it sits on the bridge).
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Addresses a guest may get, in order: every host address of `subnet` except
/// the network, the gateway and the broadcast address.
pub fn guest_ips(subnet: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> + Clone {
    let net = u32::from(subnet.network());
    let bcast = u32::from(subnet.broadcast());
    // net+1 is the gateway; a /31 or /32 has no room for guests at all.
    let first = net.saturating_add(2);
    (first..bcast).map(Ipv4Addr::from)
}

/// The first guest address of `subnet` not in `used`.
pub fn first_free_ip(subnet: Ipv4Net, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, NetError> {
    guest_ips(subnet)
        .find(|ip| !used.contains(ip))
        .ok_or(NetError::SubnetFull(subnet))
}

/// A locally administered, unicast MAC derived from the vm_id:
/// `02:` (bit 0x02 set, bit 0x01 clear) followed by 5 bytes of SHA-256.
/// Deterministic, so a restart re-derives the same MAC; the store still
/// enforces uniqueness (a 40-bit hash collision is possible in principle).
pub fn mac_for(vm_id: &str) -> String {
    let digest = Sha256::digest(vm_id.as_bytes());
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2], digest[3], digest[4]
    )
}

/// The bridge's own MAC in namespace `netns`: `06:` (locally administered,
/// unicast) and 5 bytes of SHA-256, so it never equals a guest's `02:` MAC,
/// and stays the same across rebuilds (guests keep the gateway's entry).
pub fn bridge_mac(netns: &str) -> [u8; 6] {
    let d = Sha256::digest(format!("bridge {netns}").as_bytes());
    [0x06, d[0], d[1], d[2], d[3], d[4]]
}

/// Probes of this process, one at a time: a probe holds its port for a
/// moment, and a concurrent probe of the same port (one create picking a
/// candidate while another checks the port it was given) would take that
/// for another process holding it.
static PROBING: Mutex<()> = Mutex::new(());

/// Whether nothing on the host holds TCP `bind:port` (binding proves it, and
/// the probe socket is closed at once). Ports forwarded by our nftables table
/// are bound by nothing: ask `Network::port_available` to include those.
pub fn port_is_free(bind: Ipv4Addr, port: u16) -> bool {
    let _one_at_a_time = PROBING.lock().unwrap_or_else(|e| e.into_inner());
    // A listener on 0.0.0.0 also blocks specific addresses and vice versa;
    // probing both covers the two cases.
    let specific = TcpListener::bind(SocketAddrV4::new(bind, port)).is_ok();
    if !specific {
        return false;
    }
    if bind.is_unspecified() {
        return true;
    }
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// The first port of `range` that is neither in `used` nor held on the host.
pub fn first_free_port(
    bind: Ipv4Addr,
    range: RangeInclusive<u16>,
    used: &HashSet<u16>,
) -> Result<u16, NetError> {
    let (lo, hi) = (*range.start(), *range.end());
    range
        .filter(|p| !used.contains(p))
        .find(|p| port_is_free(bind, *p))
        .ok_or(NetError::PortsFull { lo, hi })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ips_skip_network_gateway_broadcast() {
        let net: Ipv4Net = "10.1.2.0/29".parse().unwrap();
        let ips: Vec<_> = guest_ips(net).collect();
        assert_eq!(ips.first(), Some(&Ipv4Addr::new(10, 1, 2, 2)));
        assert_eq!(ips.last(), Some(&Ipv4Addr::new(10, 1, 2, 6)));
        assert_eq!(ips.len(), 5);
        assert_eq!(gateway(net), Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(guest_ips("10.0.0.0/24".parse().unwrap()).count(), 253);
        assert_eq!(guest_ips("10.0.0.0/30".parse().unwrap()).count(), 1);
        assert_eq!(guest_ips("10.0.0.0/31".parse().unwrap()).count(), 0);
    }

    #[test]
    fn full_subnet_is_reported() {
        let net: Ipv4Net = "10.1.2.0/30".parse().unwrap();
        let mut used = HashSet::new();
        assert_eq!(first_free_ip(net, &used).unwrap(), Ipv4Addr::new(10, 1, 2, 2));
        used.insert(Ipv4Addr::new(10, 1, 2, 2));
        assert!(matches!(first_free_ip(net, &used), Err(NetError::SubnetFull(_))));
    }

    #[test]
    fn macs_are_local_unicast_and_stable() {
        let a = mac_for("vm-a");
        assert_eq!(a, mac_for("vm-a"));
        assert_ne!(a, mac_for("vm-b"));
        let first = u8::from_str_radix(&a[..2], 16).unwrap();
        assert_eq!(first & 0x02, 0x02, "locally administered");
        assert_eq!(first & 0x01, 0, "unicast");
        assert_eq!(a.len(), 17);
        let b = bridge_mac("whns");
        assert_eq!(b, bridge_mac("whns"));
        assert_ne!(b, bridge_mac("other"));
        assert_eq!(b[0], 0x06, "locally administered, unicast, never a guest's 02:");
    }

    #[test]
    fn held_ports_are_not_free() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(!port_is_free(Ipv4Addr::LOCALHOST, port));
        assert!(!port_is_free(Ipv4Addr::UNSPECIFIED, port));
        let used: HashSet<u16> = HashSet::new();
        assert!(matches!(
            first_free_port(Ipv4Addr::LOCALHOST, port..=port, &used),
            Err(NetError::PortsFull { .. })
        ));
        drop(l);
        assert!(port_is_free(Ipv4Addr::LOCALHOST, port));
    }

    #[test]
    fn concurrent_probes_of_a_free_port_all_see_it_free() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let busy: usize = std::thread::scope(|s| {
            let probes: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..300)
                            .filter(|_| !port_is_free(Ipv4Addr::LOCALHOST, port))
                            .count()
                    })
                })
                .collect();
            probes.into_iter().map(|p| p.join().unwrap()).sum()
        });
        assert_eq!(busy, 0, "a probe took another probe for a holder");
    }
}
