//! Tenant-isolation attacks and what to look at afterwards, shared by the
//! namespace tier (veth "guests") and the QEMU tier (real guests).
//!
//! `forge.py` (stdlib python3, also in the guest image) forges the frames;
//! the helpers here read the VM namespace: its neighbour table, bridge FDB,
//! IPv6 routes, the guard's IPv6 counter, and UDP listeners standing where
//! forged packets would land.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::host::run_ok;

/// The attack script (see its docstring for what it sends).
pub const FORGE: &str = include_str!("forge.py");

/// The UDP port forged packets aim at on the gateway.
pub const FORGE_PORT: u16 = 5399;

/// `forge.py`'s arguments, in order.
pub struct Forge<'a> {
    pub iface: &'a str,
    pub my_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub gateway_mac: &'a str,
    pub victim_ip: Ipv4Addr,
    pub victim_mac: &'a str,
    pub rounds: u32,
}

impl Forge<'_> {
    pub fn args(&self) -> Vec<String> {
        vec![
            self.iface.to_string(),
            self.my_ip.to_string(),
            self.gateway.to_string(),
            self.gateway_mac.to_string(),
            self.victim_ip.to_string(),
            self.victim_mac.to_string(),
            FORGE_PORT.to_string(),
            self.rounds.to_string(),
        ]
    }

    /// A shell command that writes the script and runs it as root (for a
    /// guest reached over SSH as a sudoer).
    pub fn guest_command(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(FORGE);
        format!(
            "echo {b64} | base64 -d > /tmp/forge.py && sudo python3 /tmp/forge.py {}",
            self.args().join(" ")
        )
    }
}

/// UDP datagrams received on a socket inside a namespace: (source, payload).
#[derive(Clone)]
pub struct UdpLog(Arc<Mutex<Vec<(Ipv4Addr, String)>>>);

impl UdpLog {
    /// Bind `addr` inside the namespace at `ns` and log what arrives.
    pub fn bind(ns: &Path, addr: SocketAddrV4) -> UdpLog {
        let sock = webhoster::sys::in_netns(ns, move || UdpSocket::bind(addr))
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("bind udp {addr} in the VM namespace: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let log = UdpLog(Arc::new(Mutex::new(Vec::new())));
        let out = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            // Ends with the test process; one socket per test.
            loop {
                if let Ok((n, std::net::SocketAddr::V4(from))) = sock.recv_from(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    out.0.lock().unwrap().push((*from.ip(), text));
                }
            }
        });
        log
    }

    pub fn seen(&self) -> Vec<(Ipv4Addr, String)> {
        self.0.lock().unwrap().clone()
    }

    pub fn payloads(&self) -> Vec<String> {
        self.seen().into_iter().map(|(_, p)| p).collect()
    }
}

/// `ip neigh show <ip> dev br0` in the namespace.
pub fn neighbour(netns: &str, ip: Ipv4Addr) -> String {
    run_ok(
        "ip",
        &["-n", netns, "neigh", "show", &ip.to_string(), "dev", "br0"],
    )
    .trim()
    .to_string()
}

/// The bridge's forwarding database entries learned on `port`.
pub fn fdb(netns: &str, port: &str) -> String {
    run_ok("bridge", &["-n", netns, "fdb", "show", "dev", port])
}

/// IPv6 routes and addresses in the namespace (empty when IPv6 is off).
pub fn ipv6_state(netns: &str) -> String {
    let routes = run_ok("ip", &["-n", netns, "-6", "route", "show"]);
    let addrs = run_ok("ip", &["-n", netns, "-6", "addr", "show"]);
    format!("{routes}{addrs}")
}

/// The MAC of `ifname` inside the namespace at `netns`.
pub fn mac_of(netns: &str, ifname: &str) -> String {
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "cat",
            &format!("/sys/class/net/{ifname}/address"),
        ],
    )
    .trim()
    .to_string()
}

/// Packets the guard dropped as IPv6 so far (0 when there is no guard).
pub fn guard_ipv6_drops(netns: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-j", "list", "chain", "bridge"])
        .args(["webhoster_guard", "prerouting"])
        .output()
        .expect("nft");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("rule"))
        .filter(|r| r["comment"].as_str().is_some_and(|c| c.contains("IPv6")))
        .flat_map(|r| r["expr"].as_array().cloned().unwrap_or_default())
        .find_map(|e| e["counter"]["packets"].as_u64())
        .unwrap_or(0)
}
