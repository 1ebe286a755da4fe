//! The layer-2 wall in front of every guest: the namespace's nftables table
//! `bridge webhoster_guard`. Its `prerouting` chain sees every frame a guest
//! puts on the bridge (before the bridge learns its source MAC, before the
//! namespace's ARP and IP stack see it) and lets through only:
//!
//! - IPv4 from the guest's own MAC and own address (never a DHCP server
//!   answer, UDP source port 67);
//! - ARP requests and replies whose Ethernet source, ARP sender MAC and ARP
//!   sender address are the guest's own, so a guest can answer ARP only for
//!   itself.
//!
//! Everything else is dropped: IPv6 (router advertisements, NDP), other
//! ethertypes, VLAN-tagged frames, and every frame of a port without a guard
//! (policy drop: a port is mute until its guard is in). The allowed
//! (port, MAC, IPv4) triples are elements of one set, `guests`, so adding or
//! removing a guest is one element in one transaction; the rules never
//! change per guest. A flushed table therefore fails closed (policy drop),
//! and a flushed set mutes every guest until convergence puts the elements
//! back; only a deleted table lets frames through, until the next pass.
//!
//! Why a bridge table and not a `netdev` ingress chain per tap: a netdev base
//! chain needs its device to exist and goes with it, so every tap would need
//! its own chain created after the tap and re-created after any loss, and a
//! port without one is open. One bridge chain keyed by `iifname` covers
//! every port, present or future, and is closed by default.
//!
//! This module renders the table and edits the set, nothing else; the
//! permanent neighbour entries that go with each guard are `link`'s, and
//! `mod.rs` decides when both happen.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde_json::Value;

use super::{NetError, nft};

/// The guard table in the namespace (names inside are ours alone).
pub const TABLE: &str = "webhoster_guard";
/// Its set of allowed (port, MAC, IPv4) triples.
pub const SET: &str = "guests";

/// A unicast Ethernet address (never all zeros, never multicast).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Mac, NetError> {
        let bad = || NetError::BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || out == [0; 6] || out[0] & 1 == 1 {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// What one bridge port may send from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guard {
    /// The bridge port (a tap, or a veth in tests).
    pub port: String,
    pub mac: Mac,
    pub ip: Ipv4Addr,
}

impl Guard {
    fn element(&self) -> String {
        format!("{} . {} . {}", nft::q(&self.port), self.mac, self.ip)
    }
}

/// The whole guard table with `guards` as its elements, replacing any
/// previous version in one transaction (so there is no moment without a
/// wall): `up` reads the elements back first and passes them here.
pub fn ruleset(guards: &[Guard]) -> String {
    let t = TABLE;
    let mut s = format!("add table bridge {t}\ndelete table bridge {t}\ntable bridge {t} {{\n");
    s += &format!("  set {SET} {{\n    type ifname . ether_addr . ipv4_addr\n");
    s += "    comment \"the one MAC and IPv4 address each port's guest may send from\"\n";
    if !guards.is_empty() {
        let els: Vec<String> = guards.iter().map(Guard::element).collect();
        s += &format!("    elements = {{ {} }}\n", els.join(", "));
    }
    s += "  }\n";
    // Priority filter (-200): bridge prerouting runs before the bridge
    // learns the source MAC and before br0's own stack (ARP, IP) sees the
    // frame, so a dropped frame teaches nothing to anyone.
    s += "  chain prerouting {\n    type filter hook prerouting priority filter; policy drop;\n";
    s += "    ether type ip6 counter drop comment \"guests send no IPv6: no RA, no NDP\"\n";
    // The fixed header fields first: nft reads the sender fields at the
    // offsets of Ethernet/IPv4 ARP. Both lookups hit the port's one
    // element, so Ethernet source and ARP sender MAC are both its own.
    s += &format!(
        "    ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp operation {{ request, reply }} \
         iifname . ether saddr . arp saddr ip @{SET} iifname . arp saddr ether . arp saddr ip @{SET} accept\n"
    );
    s += "    ether type ip udp sport 67 counter drop comment \"no DHCP server answers\"\n";
    s += &format!("    ether type ip iifname . ether saddr . ip saddr @{SET} accept\n");
    s += "    counter drop comment \"spoofed, unknown port or other ethertype\"\n";
    s += "  }\n}\n";
    s
}

/// The guards in the table (empty when the table does not exist). Runs in
/// the calling thread's namespace.
pub fn list() -> Result<Vec<Guard>, NetError> {
    let out = match nft::run(
        &["-j", "list", "set", "bridge", TABLE, SET],
        None,
        "list the guard set",
    ) {
        Ok(out) => out,
        Err(NetError::Nft { stderr, .. }) if stderr.contains("No such file or directory") => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    parse_set(&out)
}

fn parse_set(json: &str) -> Result<Vec<Guard>, NetError> {
    let v: Value = serde_json::from_str(json).map_err(|e| NetError::Nft {
        op: "parse the guard set".into(),
        stderr: e.to_string(),
    })?;
    let mut out = Vec::new();
    let sets = v["nftables"].as_array().into_iter().flatten();
    for el in sets
        .filter_map(|i| i.get("set"))
        .flat_map(|s| s["elem"].as_array().into_iter().flatten())
    {
        // A plain element is {"concat": [...]}; one with a comment or
        // counter is {"elem": {"val": {"concat": [...]}, ...}}.
        let concat = el.get("concat").or_else(|| el["elem"]["val"].get("concat"));
        let Some(parts) = concat.and_then(Value::as_array) else {
            continue;
        };
        let field = |i: usize| parts.get(i).and_then(Value::as_str);
        if let (Some(port), Some(mac), Some(ip)) = (field(0), field(1), field(2))
            && let (Ok(mac), Ok(ip)) = (mac.parse(), ip.parse())
        {
            out.push(Guard {
                port: port.to_string(),
                mac,
                ip,
            });
        }
    }
    Ok(out)
}

/// The one transaction that makes `want` the only guard of its port, and
/// the only one holding its MAC or its address (a stale element of an
/// earlier VM with the same address must not let that port send as it).
pub fn install_script(current: &[Guard], want: &Guard) -> Option<String> {
    let stale: Vec<&Guard> = current
        .iter()
        .filter(|g| *g != want)
        .filter(|g| g.port == want.port || g.ip == want.ip || g.mac == want.mac)
        .collect();
    if stale.is_empty() && current.contains(want) {
        return None;
    }
    Some(delete_script(&stale) + &format!("add element bridge {TABLE} {SET} {{ {} }}\n", want.element()))
}

/// Deletes these elements (they must exist: nft 1.0.6 has no `destroy`).
pub fn delete_script(guards: &[&Guard]) -> String {
    if guards.is_empty() {
        return String::new();
    }
    let els: Vec<String> = guards.iter().map(|g| g.element()).collect();
    format!("delete element bridge {TABLE} {SET} {{ {} }}\n", els.join(", "))
}

/// Edit the set with a script computed from its current elements; a
/// concurrent edit between the read and the write (an element gone, ENOENT)
/// makes the whole transaction fail, so it is read and tried again.
pub fn edit(op: &str, script: impl Fn(&[Guard]) -> Option<String>) -> Result<Vec<Guard>, NetError> {
    let mut attempt = 0;
    loop {
        let current = list()?;
        let Some(s) = script(&current) else {
            return Ok(current);
        };
        match nft::apply(&s, op) {
            Ok(()) => return Ok(current),
            Err(NetError::Nft { stderr, .. })
                if attempt < 2 && stderr.contains("No such file or directory") =>
            {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(port: &str, mac: &str, ip: [u8; 4]) -> Guard {
        Guard {
            port: port.into(),
            mac: mac.parse().unwrap(),
            ip: Ipv4Addr::from(ip),
        }
    }

    #[test]
    fn macs_parse_and_print() {
        let m: Mac = "02:AB:cd:00:01:ff".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:cd:00:01:ff");
        for bad in [
            "",
            "02:ab:cd:00:01",
            "02:ab:cd:00:01:ff:00",
            "02:ab:cd:00:01:fg",
            "2:ab:cd:00:01:ff",
            "00:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
        ] {
            assert!(matches!(bad.parse::<Mac>(), Err(NetError::BadMac(_))), "{bad:?}");
        }
    }

    #[test]
    fn the_table_replaces_itself_and_keeps_its_guards() {
        let s = ruleset(&[
            g("whv0123456789ab", "02:00:00:00:00:02", [10, 83, 0, 2]),
            g("whvba9876543210", "02:00:00:00:00:03", [10, 83, 0, 3]),
        ]);
        assert!(s.starts_with(
            "add table bridge webhoster_guard\ndelete table bridge webhoster_guard\ntable bridge webhoster_guard {\n"
        ));
        assert!(s.contains("type ifname . ether_addr . ipv4_addr"));
        assert!(s.contains(
            "elements = { \"whv0123456789ab\" . 02:00:00:00:00:02 . 10.83.0.2, \"whvba9876543210\" . 02:00:00:00:00:03 . 10.83.0.3 }"
        ));
        assert!(!ruleset(&[]).contains("elements"));
    }

    #[test]
    fn the_chain_is_closed_by_default_and_opens_only_own_ipv4_and_arp() {
        let s = ruleset(&[]);
        let chain: Vec<&str> = s
            .lines()
            .skip_while(|l| !l.contains("chain prerouting"))
            .map(str::trim)
            .collect();
        assert_eq!(
            chain[1], "type filter hook prerouting priority filter; policy drop;",
            "a port without a guard is mute"
        );
        // IPv6 goes before anything could accept it.
        assert!(chain[2].starts_with("ether type ip6 counter drop"));
        // ARP: fixed Ethernet/IPv4 layout, request or reply only, and both
        // the frame's source and the ARP sender are the port's own.
        let arp = chain[3];
        for part in [
            "ether type arp",
            "arp htype 1 arp ptype ip arp hlen 6 arp plen 4",
            "arp operation { request, reply }",
            "iifname . ether saddr . arp saddr ip @guests",
            "iifname . arp saddr ether . arp saddr ip @guests",
        ] {
            assert!(arp.contains(part), "{part:?} missing in {arp:?}");
        }
        assert!(arp.ends_with("accept"));
        // DHCP server answers are dropped before the own-address accept.
        assert!(chain[4].starts_with("ether type ip udp sport 67 counter drop"));
        assert_eq!(
            chain[5],
            "ether type ip iifname . ether saddr . ip saddr @guests accept"
        );
        assert!(chain[6].starts_with("counter drop"));
        assert_eq!(chain[7], "}");
        // Nothing else accepts.
        assert_eq!(s.matches("accept").count(), 2);
    }

    #[test]
    fn installing_replaces_stale_elements_of_the_port_address_or_mac() {
        let want = g("whva", "02:00:00:00:00:0a", [10, 0, 0, 2]);
        assert_eq!(
            install_script(&[], &want).unwrap(),
            "add element bridge webhoster_guard guests { \"whva\" . 02:00:00:00:00:0a . 10.0.0.2 }\n"
        );
        assert_eq!(
            install_script(std::slice::from_ref(&want), &want),
            None,
            "idempotent"
        );
        let current = [
            want.clone(),
            g("whva", "02:00:00:00:00:0a", [10, 0, 0, 9]),
            g("whvold", "02:00:00:00:00:0b", [10, 0, 0, 2]),
            g("whvmac", "02:00:00:00:00:0a", [10, 0, 0, 7]),
            g("whvother", "02:00:00:00:00:0c", [10, 0, 0, 3]),
        ];
        let s = install_script(&current, &want).unwrap();
        assert_eq!(
            s,
            "delete element bridge webhoster_guard guests { \"whva\" . 02:00:00:00:00:0a . 10.0.0.9, \
             \"whvold\" . 02:00:00:00:00:0b . 10.0.0.2, \"whvmac\" . 02:00:00:00:00:0a . 10.0.0.7 }\n\
             add element bridge webhoster_guard guests { \"whva\" . 02:00:00:00:00:0a . 10.0.0.2 }\n"
        );
        assert!(!s.contains("whvother"));
    }

    #[test]
    fn the_set_is_read_back_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "bridge", "name": "guests", "table": "webhoster_guard",
             "type": ["ifname", "ether_addr", "ipv4_addr"], "handle": 2,
             "elem": [{"concat": ["whvaaa", "02:11:22:33:44:55", "10.9.0.2"]},
                      {"elem": {"val": {"concat": ["gpx", "02:11:22:33:44:56", "10.9.0.3"]}, "comment": "x"}},
                      {"concat": ["broken", "not-a-mac", "10.9.0.4"]}]}}]}"#;
        assert_eq!(
            parse_set(json).unwrap(),
            vec![
                g("whvaaa", "02:11:22:33:44:55", [10, 9, 0, 2]),
                g("gpx", "02:11:22:33:44:56", [10, 9, 0, 3]),
            ]
        );
        let empty =
            r#"{"nftables": [{"set": {"name": "guests", "type": ["ifname", "ether_addr", "ipv4_addr"]}}]}"#;
        assert!(parse_set(empty).unwrap().is_empty());
    }
}
