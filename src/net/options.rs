//! `NetOptions`: what the network is built from, and the checks on it that
//! need nothing from the kernel. Never touches the system.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use ipnet::Ipv4Net;

use super::{BRIDGE, NS_UPLINK, NetError, TAP_PREFIX, netns, nft};
use crate::config::NetArgs;

/// What the network is built from; see `config::NetArgs`.
#[derive(Debug, Clone)]
pub struct NetOptions {
    pub netns: String,
    pub subnet: Ipv4Net,
    pub ssh_bind: Ipv4Addr,
    pub ssh_ports: RangeInclusive<u16>,
    pub egress: Option<String>,
    /// Private ranges guests may reach through `egress` anyway.
    pub egress_allow: Vec<Ipv4Net>,
}

impl From<&NetArgs> for NetOptions {
    fn from(a: &NetArgs) -> Self {
        NetOptions {
            netns: a.netns.clone(),
            subnet: a.subnet,
            ssh_bind: a.ssh_bind,
            ssh_ports: a.ssh_ports.clone(),
            egress: a.egress.clone(),
            egress_allow: a.egress_allow.clone(),
        }
    }
}

impl NetOptions {
    /// The host table holding this network's forwards.
    pub fn table(&self) -> String {
        nft::host_table(&self.netns)
    }

    /// The host end of the veth pair carries the namespace's name.
    pub fn host_veth(&self) -> &str {
        &self.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }

    /// Checks that need nothing from the kernel.
    pub fn validate(&self) -> Result<(), NetError> {
        validate_netns_name(&self.netns)?;
        let s = self.subnet;
        let bad = |why| NetError::BadSubnet { subnet: s, why };
        if s.prefix_len() > 30 {
            return Err(bad(
                "it needs at least a /30 (network, gateway, one guest, broadcast)",
            ));
        }
        if s.prefix_len() < 8 {
            return Err(bad("it is larger than a /8"));
        }
        let n = s.network();
        if n.is_loopback() || n.is_link_local() || n.is_multicast() || n.is_unspecified() || n.is_broadcast()
        {
            return Err(bad("it is loopback, link-local, multicast or reserved"));
        }
        if s.trunc() != s {
            return Err(bad("it has host bits set"));
        }
        if let Some(up) = &self.egress
            && (up.is_empty() || up.len() > 15 || up == &self.netns)
        {
            return Err(NetError::BadEgress(up.clone()));
        }
        for &net in &self.egress_allow {
            let bad = |why| NetError::BadEgressAllow { net, why };
            if self.egress.is_none() {
                return Err(bad("there is no egress (--egress) to open it on"));
            }
            let mut never = nft::NEVER_EGRESS.iter().filter_map(|n| n.parse::<Ipv4Net>().ok());
            // The VM subnet may overlap: its drop comes before the exceptions.
            if never.any(|n| n.contains(&net.network()) || net.contains(&n.network())) {
                return Err(bad(
                    "it overlaps link-local, loopback or multicast, which guests never reach",
                ));
            }
        }
        Ok(())
    }
}

/// A namespace name is also the host veth's name, so it must be a valid
/// interface name (<= 15 bytes) and must not clash with names inside.
pub fn validate_netns_name(name: &str) -> Result<(), NetError> {
    let bad = |why| NetError::BadNetnsName {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > 15 {
        return Err(bad(
            "it is longer than 15 bytes (it also names the host veth, IFNAMSIZ)",
        ));
    }
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return Err(bad("it must start with a letter"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad("only letters, digits, '_' and '-' are allowed"));
    }
    if [BRIDGE, NS_UPLINK, "lo"].contains(&name) || name.starts_with(TAP_PREFIX) {
        return Err(bad("it clashes with an interface name used inside the namespace"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> NetOptions {
        NetOptions {
            netns: "whns".into(),
            subnet: "10.83.0.0/24".parse().unwrap(),
            ssh_bind: Ipv4Addr::UNSPECIFIED,
            ssh_ports: 10000..=20000,
            egress: None,
            egress_allow: Vec::new(),
        }
    }

    #[test]
    fn netns_names() {
        assert!(validate_netns_name("whns").is_ok());
        assert!(validate_netns_name("a-b_c9").is_ok());
        assert!(validate_netns_name("abcdefghijklmno").is_ok());
        for bad in [
            "",
            "abcdefghijklmnop",
            "9ns",
            "has space",
            "a/b",
            "br0",
            "up0",
            "lo",
            "whvabc",
        ] {
            assert!(
                matches!(validate_netns_name(bad), Err(NetError::BadNetnsName { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn subnets() {
        assert!(opts().validate().is_ok());
        for bad in [
            "10.0.0.0/31",
            "127.0.0.0/24",
            "169.254.0.0/24",
            "224.0.0.0/24",
            "10.0.0.1/24",
            "10.0.0.0/7",
        ] {
            let mut o = opts();
            o.subnet = bad.parse().unwrap();
            assert!(
                matches!(o.validate(), Err(NetError::BadSubnet { .. })),
                "{bad} accepted"
            );
        }
        let mut o = opts();
        o.egress = Some("whns".into());
        assert!(matches!(o.validate(), Err(NetError::BadEgress(_))));
    }

    #[test]
    fn egress_exceptions() {
        let mut o = opts();
        o.egress_allow = vec!["192.168.5.0/24".parse().unwrap()];
        assert!(
            matches!(o.validate(), Err(NetError::BadEgressAllow { .. })),
            "an exception without egress"
        );
        o.egress = Some("eth1".into());
        assert!(o.validate().is_ok());
        // Overlapping the VM subnet is fine: other guests stay dropped first.
        o.egress_allow = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(o.validate().is_ok());
        for bad in [
            "169.254.169.254/32",
            "169.0.0.0/8",
            "127.0.0.1/32",
            "0.0.0.0/0",
            "239.1.1.1/32",
        ] {
            o.egress_allow = vec![bad.parse().unwrap()];
            assert!(
                matches!(o.validate(), Err(NetError::BadEgressAllow { .. })),
                "{bad} accepted"
            );
        }
    }
}
