//! nftables, through `nft -f -` and `nft -j`: webhoster's own table on the
//! host (`ip webhoster_<netns>`: SSH DNAT map, loopback masquerade, forward
//! guard, and an input guard: nothing from the namespace opens a connection
//! to the host) and its tables inside the namespace (`inet webhoster`:
//! guests get no egress, or with `--egress` only the outside world; `bridge
//! webhoster_guard`, rendered by `guard`: each guest sends only from its own
//! MAC and address). Only ever creates, replaces or deletes those tables;
//! never flushes the ruleset or touches another table.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use serde_json::Value;

use super::NetError;

/// Inside the namespace the table name is fixed: the namespace is ours.
pub const NS_TABLE: &str = "webhoster";

/// The host table of namespace `netns` (nft identifiers allow every
/// character a valid namespace name may hold).
pub fn host_table(netns: &str) -> String {
    format!("webhoster_{netns}")
}

/// One SSH forward: host `port` to `guest`:22, tagged with its vm_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub vm_id: String,
    pub port: u16,
    pub guest: Ipv4Addr,
    pub guest_port: u16,
}

/// Everything the host table is built from.
pub struct HostRules<'a> {
    pub table: &'a str,
    pub veth: &'a str,
    pub subnet: Ipv4Net,
    pub ssh_bind: Ipv4Addr,
    pub ports: RangeInclusive<u16>,
    pub egress: Option<&'a str>,
    /// Interfaces on which we turned IPv4 forwarding on (restored on down).
    pub opened: &'a BTreeSet<String>,
    pub forwards: &'a [Forward],
}

/// An nft string literal (quotes and backslashes cannot occur in our names).
pub(super) fn q(s: &str) -> String {
    format!("\"{}\"", s.replace(['"', '\\'], ""))
}

fn element(f: &Forward) -> String {
    format!(
        "{} comment {} : {} . {}",
        f.port,
        q(&f.vm_id),
        f.guest,
        f.guest_port
    )
}

/// The whole host table, replacing any previous version atomically (one nft
/// transaction: add, delete, define). Conntrack entries of open connections
/// are not part of the ruleset, so they survive this.
pub fn host_ruleset(r: &HostRules) -> String {
    let t = r.table;
    let veth = q(r.veth);
    let daddr = if r.ssh_bind.is_unspecified() {
        "fib daddr type local".to_string()
    } else {
        format!("ip daddr {}", r.ssh_bind)
    };
    let mut s = format!("add table ip {t}\ndelete table ip {t}\ntable ip {t} {{\n");
    s += &format!(
        "  set ports {{ type inet_service; flags interval; elements = {{ {}-{} }}; }}\n",
        r.ports.start(),
        r.ports.end()
    );
    s += "  set opened { type ifname;";
    if !r.opened.is_empty() {
        let names: Vec<String> = r.opened.iter().map(|n| q(n)).collect();
        s += &format!(" elements = {{ {} }};", names.join(", "));
    }
    s += " }\n";
    s += "  map ssh_fwd { type inet_service : ipv4_addr . inet_service;";
    if !r.forwards.is_empty() {
        let els: Vec<String> = r.forwards.iter().map(element).collect();
        s += &format!(" elements = {{ {} }};", els.join(", "));
    }
    s += " }\n";
    s += &format!(
        "  chain prerouting {{ type nat hook prerouting priority -100; policy accept;\n    {daddr} tcp dport @ports dnat ip to tcp dport map @ssh_fwd\n  }}\n"
    );
    s += &format!(
        "  chain output {{ type nat hook output priority -100; policy accept;\n    {daddr} tcp dport @ports dnat ip to tcp dport map @ssh_fwd\n  }}\n"
    );
    s += "  chain postrouting { type nat hook postrouting priority 100; policy accept;\n";
    // Connections to 127.0.0.1:<port> leave through the veth after DNAT
    // (route_localnet allows that); the guest cannot answer 127.0.0.1, so
    // the source becomes the veth's address.
    s += &format!("    oifname {veth} ip saddr 127.0.0.0/8 masquerade\n");
    if let Some(up) = r.egress {
        s += &format!("    oifname {} ip saddr {} masquerade\n", q(up), r.subnet);
    }
    s += "  }\n";
    s += "  chain forward { type filter hook forward priority 0; policy accept;\n";
    s += &format!("    oifname {veth} ct status dnat accept\n");
    s += &format!("    oifname {veth} ct state established,related accept\n");
    s += &format!("    oifname {veth} drop\n");
    s += &format!("    iifname {veth} ct state established,related accept\n");
    if let Some(up) = r.egress {
        s += &format!("    iifname {veth} oifname {} accept\n", q(up));
    }
    s += &format!("    iifname {veth} drop\n");
    // We turned forwarding on for these only so DNATed SSH reaches guests:
    // they must not start routing anything else.
    s += "    iifname @opened drop\n";
    s += "  }\n";
    // Nothing behind the veth (guests, with or without egress) opens a
    // connection to the host itself, on any of its addresses: only replies
    // to what the host started (nginx, SSH through the forwards) come in.
    s += "  chain input { type filter hook input priority 0; policy accept;\n";
    s += &format!("    iifname {veth} ct state established,related accept\n");
    s += &format!("    iifname {veth} drop\n");
    s += "  }\n}\n";
    s
}

/// Destinations a guest never reaches through egress: this host's
/// link-local transfer net and the cloud metadata address (169.254/16),
/// loopback, "this network", multicast and reserved.
pub const NEVER_EGRESS: [&str; 4] = ["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3"];

/// Private and shared ranges a guest reaches through egress only when
/// configured (`--egress-allow`): the host's other networks, other
/// tenants' networks, the provider's internal ones.
pub const PRIVATE_RANGES: [&str; 4] = ["10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16"];

/// Everything the namespace's `inet` table is built from.
pub struct NsRules<'a> {
    pub bridge: &'a str,
    pub uplink: &'a str,
    pub subnet: Ipv4Net,
    /// Guests may start connections out of the uplink (`--egress`).
    pub egress: bool,
    /// Private ranges opened to guests anyway (`--egress-allow`).
    pub allow: &'a [Ipv4Net],
}

/// The namespace's table: forward host->guests and replies; guests start
/// nothing beyond the gateway unless `egress`, and then only to the outside
/// world: never to the host (its input guard), never to link-local,
/// loopback or multicast, never to the VM subnet (other guests), and to
/// private ranges only when allowed.
pub fn ns_ruleset(r: &NsRules) -> String {
    let t = NS_TABLE;
    let (bridge, uplink) = (q(r.bridge), q(r.uplink));
    let mut s = format!("add table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n");
    s += "  chain forward { type filter hook forward priority 0; policy drop;\n";
    s += "    ct state established,related accept\n";
    s += &format!("    iifname {uplink} oifname {bridge} accept\n");
    if r.egress {
        let out = format!("iifname {bridge} oifname {uplink} meta nfproto ipv4");
        let never: Vec<String> = NEVER_EGRESS
            .iter()
            .map(|n| n.to_string())
            .chain([r.subnet.trunc().to_string()])
            .collect();
        s += &format!("    {out} ip daddr {{ {} }} drop\n", never.join(", "));
        if !r.allow.is_empty() {
            let allow: Vec<String> = r.allow.iter().map(|n| n.trunc().to_string()).collect();
            s += &format!("    {out} ip daddr {{ {} }} accept\n", allow.join(", "));
        }
        s += &format!("    {out} ip daddr {{ {} }} drop\n", PRIVATE_RANGES.join(", "));
        s += &format!("    {out} accept\n");
    }
    s += "  }\n}\n";
    s
}

/// Run `nft` with `args`, feeding `stdin`; returns stdout. Runs in the
/// calling thread's network namespace.
pub fn run(args: &[&str], stdin: Option<&str>, op: &str) -> Result<String, NetError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetError::io(format!("run nft to {op}")))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .map_err(NetError::io(format!("write nft input to {op}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(NetError::io(format!("wait for nft to {op}")))?;
    if !out.status.success() {
        return Err(NetError::Nft {
            op: op.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn apply(ruleset: &str, op: &str) -> Result<(), NetError> {
    run(&["-f", "-"], Some(ruleset), op).map(|_| ())
}

/// Names of all `ip` tables (to tell whether ours exists).
pub fn tables() -> Result<Vec<(String, String)>, NetError> {
    let out = run(&["-j", "list", "tables"], None, "list tables")?;
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let mut names = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        if let Some(t) = item.get("table")
            && let (Some(f), Some(n)) = (t["family"].as_str(), t["name"].as_str())
        {
            names.push((f.to_string(), n.to_string()));
        }
    }
    Ok(names)
}

/// Rules per chain of a table (`None` when the table does not exist), to
/// notice a table that was flushed or deleted behind our back.
pub fn chain_rules(
    family: &str,
    table: &str,
) -> Result<Option<std::collections::BTreeMap<String, usize>>, NetError> {
    let out = match run(
        &["-j", "list", "table", family, table],
        None,
        &format!("list table {family} {table}"),
    ) {
        Ok(out) => out,
        Err(NetError::Nft { stderr, .. }) if stderr.contains("No such file or directory") => return Ok(None),
        Err(e) => return Err(e),
    };
    let v: Value = serde_json::from_str(&out).map_err(|e| NetError::Nft {
        op: format!("parse table {table}"),
        stderr: e.to_string(),
    })?;
    let mut chains = std::collections::BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        if let Some(name) = item.get("chain").and_then(|c| c["name"].as_str()) {
            chains.entry(name.to_owned()).or_insert(0);
        }
        if let Some(name) = item.get("rule").and_then(|r| r["chain"].as_str()) {
            *chains.entry(name.to_owned()).or_insert(0) += 1;
        }
    }
    Ok(Some(chains))
}

pub fn table_exists(family: &str, table: &str) -> Result<bool, NetError> {
    Ok(tables()?.iter().any(|(f, n)| f == family && n == table))
}

pub fn delete_table(family: &str, table: &str) -> Result<bool, NetError> {
    if !table_exists(family, table)? {
        return Ok(false);
    }
    apply(
        &format!("delete table {family} {table}\n"),
        &format!("delete table {family} {table}"),
    )?;
    Ok(true)
}

/// One nft call (each costs a process spawn): a missing table or set is
/// `None`, recognised by nft's ENOENT message rather than asked first.
fn set_json(table: &str, kind: &str, name: &str) -> Result<Option<Value>, NetError> {
    let out = match run(
        &["-j", "list", kind, "ip", table, name],
        None,
        &format!("list {kind} {name}"),
    ) {
        Ok(out) => out,
        Err(NetError::Nft { stderr, .. }) if stderr.contains("No such file or directory") => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let v: Value = serde_json::from_str(&out).map_err(|e| NetError::Nft {
        op: format!("parse {kind} {name}"),
        stderr: e.to_string(),
    })?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|i| i.get(kind).cloned()))
}

/// The forwards in the host table (empty when the table does not exist).
pub fn forwards(table: &str) -> Result<Vec<Forward>, NetError> {
    let Some(map) = set_json(table, "map", "ssh_fwd")? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for el in map["elem"].as_array().into_iter().flatten() {
        let (key, val) = (&el[0], &el[1]);
        let (port, vm_id) = match key.get("elem") {
            Some(e) => (e["val"].as_u64(), e["comment"].as_str().unwrap_or("")),
            None => (key.as_u64(), ""),
        };
        let concat = &val["concat"];
        let guest = concat[0].as_str().and_then(|s| s.parse().ok());
        let guest_port = concat[1].as_u64();
        if let (Some(port), Some(guest), Some(guest_port)) = (port, guest, guest_port) {
            out.push(Forward {
                vm_id: vm_id.to_string(),
                port: port as u16,
                guest,
                guest_port: guest_port as u16,
            });
        }
    }
    Ok(out)
}

/// The `opened` interface set of the host table.
pub fn opened(table: &str) -> Result<BTreeSet<String>, NetError> {
    let Some(set) = set_json(table, "set", "opened")? else {
        return Ok(BTreeSet::new());
    };
    Ok(set["elem"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect())
}

/// The SSH port range declared by a host table, if it has one.
pub fn declared_ports(table: &str) -> Result<Option<RangeInclusive<u16>>, NetError> {
    let Some(set) = set_json(table, "set", "ports")? else {
        return Ok(None);
    };
    let el = &set["elem"][0];
    let range = &el["range"];
    match (range[0].as_u64(), range[1].as_u64(), el.as_u64()) {
        (Some(lo), Some(hi), _) => Ok(Some(lo as u16..=hi as u16)),
        (_, _, Some(p)) => Ok(Some(p as u16..=p as u16)),
        _ => Ok(None),
    }
}

pub fn add_forward(table: &str, f: &Forward, replace: Option<&Forward>) -> Result<(), NetError> {
    let mut s = String::new();
    if let Some(old) = replace {
        s += &format!("delete element ip {table} ssh_fwd {{ {} }}\n", old.port);
    }
    s += &format!("add element ip {table} ssh_fwd {{ {} }}\n", element(f));
    apply(&s, &format!("add SSH forward for {}", f.vm_id))
}

pub fn delete_forwards(table: &str, ports: &[u16]) -> Result<(), NetError> {
    if ports.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    apply(
        &format!("delete element ip {table} ssh_fwd {{ {} }}\n", list.join(", ")),
        "delete SSH forwards",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(bind: Ipv4Addr, egress: Option<&str>, opened: &BTreeSet<String>, fw: &[Forward]) -> String {
        host_ruleset(&HostRules {
            table: "webhoster_whns",
            veth: "whns",
            subnet: "10.83.0.0/24".parse().unwrap(),
            ssh_bind: bind,
            ports: 10000..=20000,
            egress,
            opened,
            forwards: fw,
        })
    }

    #[test]
    fn host_table_replaces_itself_atomically_and_keeps_forwards() {
        let fw = [Forward {
            vm_id: "vm-1".into(),
            port: 10001,
            guest: Ipv4Addr::new(10, 83, 0, 2),
            guest_port: 22,
        }];
        let s = rules(Ipv4Addr::UNSPECIFIED, None, &BTreeSet::new(), &fw);
        assert!(s.starts_with("add table ip webhoster_whns\ndelete table ip webhoster_whns\n"));
        assert!(s.contains("elements = { 10001 comment \"vm-1\" : 10.83.0.2 . 22 }"));
        assert!(s.contains("fib daddr type local tcp dport @ports dnat ip to tcp dport map @ssh_fwd"));
        assert!(s.contains("oifname \"whns\" ip saddr 127.0.0.0/8 masquerade"));
        assert!(s.contains("iifname \"whns\" drop"));
        assert!(!s.contains("10.83.0.0/24 masquerade"), "no egress by default");
        assert!(!s.contains("set opened { type ifname; elements"));
    }

    #[test]
    fn specific_bind_and_egress() {
        let opened: BTreeSet<String> = ["eth1".to_string()].into();
        let s = rules(Ipv4Addr::new(192, 0, 2, 2), Some("eth1"), &opened, &[]);
        assert!(s.contains("ip daddr 192.0.2.2 tcp dport @ports dnat"));
        assert!(s.contains("oifname \"eth1\" ip saddr 10.83.0.0/24 masquerade"));
        assert!(s.contains("iifname \"whns\" oifname \"eth1\" accept"));
        assert!(s.contains("elements = { \"eth1\" }"));
    }

    fn ns(egress: bool, allow: &[Ipv4Net]) -> String {
        ns_ruleset(&NsRules {
            bridge: "br0",
            uplink: "up0",
            subnet: "10.83.0.0/24".parse().unwrap(),
            egress,
            allow,
        })
    }

    #[test]
    fn without_egress_guests_start_nothing() {
        let s = ns(false, &[]);
        assert!(s.starts_with("add table inet webhoster\ndelete table inet webhoster\n"));
        assert!(s.contains("type filter hook forward priority 0; policy drop;"));
        assert!(s.contains("iifname \"up0\" oifname \"br0\" accept"));
        assert!(!s.contains("iifname \"br0\""), "{s}");
    }

    #[test]
    fn egress_reaches_the_outside_world_only() {
        let s = ns(true, &[]);
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        let out = "iifname \"br0\" oifname \"up0\" meta nfproto ipv4";
        let i = lines
            .iter()
            .position(|l| l.starts_with(out))
            .expect("egress rules");
        assert_eq!(
            lines[i],
            format!(
                "{out} ip daddr {{ 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3, 10.83.0.0/24 }} drop"
            ),
            "link-local (metadata, the host's transfer net), loopback, multicast and the other guests first"
        );
        assert_eq!(
            lines[i + 1],
            format!("{out} ip daddr {{ 10.0.0.0/8, 100.64.0.0/10, 172.16.0.0/12, 192.168.0.0/16 }} drop")
        );
        assert_eq!(lines[i + 2], format!("{out} accept"));
        assert_eq!(lines[i + 3], "}");

        // An allowed private range opens between the two, never before the
        // link-local and subnet drop.
        let allow: [Ipv4Net; 2] = [
            "10.200.0.0/16".parse().unwrap(),
            "192.168.7.1/24".parse().unwrap(),
        ];
        let s = ns(true, &allow);
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        let i = lines.iter().position(|l| l.starts_with(out)).unwrap();
        assert!(lines[i].ends_with("10.83.0.0/24 } drop"));
        assert_eq!(
            lines[i + 1],
            format!("{out} ip daddr {{ 10.200.0.0/16, 192.168.7.0/24 }} accept")
        );
        assert!(lines[i + 2].contains("10.0.0.0/8") && lines[i + 2].ends_with("drop"));
    }

    #[test]
    fn nothing_behind_the_veth_opens_a_connection_to_the_host() {
        let s = rules(Ipv4Addr::UNSPECIFIED, Some("eth1"), &BTreeSet::new(), &[]);
        let input: Vec<&str> = s
            .lines()
            .skip_while(|l| !l.contains("chain input"))
            .map(str::trim)
            .collect();
        assert_eq!(
            input[..4],
            [
                "chain input { type filter hook input priority 0; policy accept;",
                "iifname \"whns\" ct state established,related accept",
                "iifname \"whns\" drop",
                "}",
            ]
        );
    }

    #[test]
    fn table_names() {
        assert_eq!(host_table("whns"), "webhoster_whns");
        assert_eq!(host_table("a-b"), "webhoster_a-b");
    }
}
