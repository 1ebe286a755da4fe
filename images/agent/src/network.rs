//! network-config v1 and v2 (ethernets only, static or DHCP) rendered as
//! systemd-networkd `.network` files, plus a `.link` file per renamed NIC
//! (udev applies it when the NIC appears: the agent runs before udev's
//! coldplug). Bonds, bridges, VLANs and the like hand over to cloud-init.

use std::net::IpAddr;

use serde_yaml::{Mapping, Value};

use crate::seed::Handover;

/// One NIC's configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Link {
    /// The config's own name for it (v2 id, v1 name): used in file names.
    pub id: String,
    pub mac: Option<String>,
    /// A name glob to match when there is no MAC.
    pub name: Option<String>,
    pub set_name: Option<String>,
    pub dhcp4: bool,
    pub dhcp6: bool,
    /// CIDR addresses.
    pub addresses: Vec<String>,
    /// (destination, gateway)
    pub routes: Vec<(String, String)>,
    pub dns: Vec<String>,
    pub search: Vec<String>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum Network {
    /// No network-config: DHCP on the first Ethernet NIC, as cloud-init does.
    #[default]
    Fallback,
    /// `config: disabled`: leave the image's network alone.
    Disabled,
    Links(Vec<Link>),
}

impl Network {
    /// Every NIC has a static address and none uses DHCP: nothing to wait for.
    pub fn is_static(&self) -> bool {
        match self {
            Network::Links(links) => {
                !links.is_empty()
                    && links
                        .iter()
                        .all(|l| !l.dhcp4 && !l.dhcp6 && !l.addresses.is_empty())
            }
            _ => false,
        }
    }

    /// (file name, content) for /etc/systemd/network.
    pub fn render(&self) -> Vec<(String, String)> {
        match self {
            Network::Disabled => Vec::new(),
            Network::Fallback => vec![(
                "10-webhoster-fallback.network".into(),
                "# webhoster-seed-agent: no network-config in the seed, DHCP as cloud-init would.\n\
                 # The agent took a lease at boot: asked for with the same client\n\
                 # identifier, and its address kept while networkd takes it over.\n\
                 [Match]\nName=e*\n\n[Network]\nDHCP=yes\nIPv6AcceptRA=no\nKeepConfiguration=dhcp\n\n\
                 [DHCPv4]\nClientIdentifier=mac\n"
                    .into(),
            )],
            Network::Links(links) => links.iter().flat_map(render_link).collect(),
        }
    }
}

fn render_link(l: &Link) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let stem = format!("10-webhoster-{}", file_safe(&l.id));
    if let (Some(mac), Some(new)) = (&l.mac, &l.set_name) {
        files.push((
            format!("{stem}.link"),
            format!("# webhoster-seed-agent\n[Match]\nMACAddress={mac}\n\n[Link]\nName={new}\n"),
        ));
    }
    let mut s = String::from("# webhoster-seed-agent, from the seed's network-config\n[Match]\n");
    match (&l.mac, &l.name, &l.set_name) {
        (Some(mac), _, _) => s += &format!("MACAddress={mac}\n"),
        (None, Some(name), _) => s += &format!("Name={name}\n"),
        (None, None, Some(name)) => s += &format!("Name={name}\n"),
        (None, None, None) => s += &format!("Name={}\n", l.id),
    }
    if let Some(mtu) = l.mtu {
        s += &format!("\n[Link]\nMTUBytes={mtu}\n");
    }
    s += "\n[Network]\n";
    s += match (l.dhcp4, l.dhcp6) {
        (true, true) => "DHCP=yes\n",
        (true, false) => "DHCP=ipv4\n",
        (false, true) => "DHCP=ipv6\n",
        (false, false) => "DHCP=no\n",
    };
    // Nothing on webhoster's networks sends router advertisements, and
    // waiting for one held the link "configuring" for about 13 s under TCG.
    if !l.dhcp6 {
        s += "IPv6AcceptRA=no\n";
    }
    for a in &l.addresses {
        s += &format!("Address={a}\n");
    }
    for d in &l.dns {
        s += &format!("DNS={d}\n");
    }
    if !l.search.is_empty() {
        s += &format!("Domains={}\n", l.search.join(" "));
    }
    for (to, via) in &l.routes {
        s += &format!("\n[Route]\nDestination={to}\nGateway={via}\n");
    }
    files.push((format!("{stem}.network"), s));
    files
}

fn file_safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn handover<T>(why: impl Into<String>) -> Result<T, Handover> {
    Err(Handover(why.into()))
}

fn text(v: &Value, what: &str) -> Result<String, Handover> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return handover(format!("network-config: {what} is not a string")),
    };
    // Values go into INI lines: no line breaks, no spaces.
    if s.is_empty() || s.contains(|c: char| c.is_whitespace()) {
        return handover(format!("network-config: {what} {s:?}"));
    }
    Ok(s)
}

fn texts(v: Option<&Value>, what: &str) -> Result<Vec<String>, Handover> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(items)) => items.iter().map(|i| text(i, what)).collect(),
        Some(Value::String(s)) => s
            .split([',', ' '])
            .filter(|p| !p.is_empty())
            .map(|p| text(&Value::String(p.into()), what))
            .collect(),
        Some(_) => handover(format!("network-config: {what} is not a list")),
    }
}

fn flag(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(s.as_str(), "true" | "yes" | "on"),
        _ => false,
    }
}

fn ip(s: &str, what: &str) -> Result<IpAddr, Handover> {
    s.parse()
        .or_else(|_| handover(format!("network-config: {what} {s:?} is not an IP address")))
}

/// `addr/len`, or `addr` plus a netmask (v1), as CIDR.
fn cidr(addr: &str, netmask: Option<&str>) -> Result<String, Handover> {
    let (a, len) = match addr.split_once('/') {
        Some((a, l)) => (a, Some(l.to_owned())),
        None => (addr, None),
    };
    let ipaddr = ip(a, "address")?;
    let len = match (len, netmask) {
        (Some(l), _) => l,
        (None, Some(mask)) if mask.contains('.') => {
            let m: std::net::Ipv4Addr = mask.parse().or_else(|_| handover(format!("netmask {mask:?}")))?;
            u32::from(m).count_ones().to_string()
        }
        (None, Some(len)) => len.to_owned(),
        (None, None) => if ipaddr.is_ipv4() { "32" } else { "128" }.to_owned(),
    };
    let max = if ipaddr.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(l) if l <= max => Ok(format!("{a}/{l}")),
        _ => handover(format!("network-config: prefix length {len:?}")),
    }
}

fn route_to(to: &str) -> Result<String, Handover> {
    match to {
        "default" | "0.0.0.0/0" => Ok("0.0.0.0/0".into()),
        "::/0" => Ok("::/0".into()),
        other => cidr(other, None),
    }
}

fn default_route(via: &str) -> Result<(String, String), Handover> {
    let gw = ip(via, "gateway")?;
    Ok((
        if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" }.into(),
        via.to_owned(),
    ))
}

fn only(m: &Mapping, keys: &[&str], what: &str) -> Result<(), Handover> {
    for k in m.keys() {
        match k.as_str() {
            Some(k) if keys.contains(&k) => {}
            other => return handover(format!("network-config: {what} has {other:?}")),
        }
    }
    Ok(())
}

/// Parses a network-config document (v1 or v2; a top-level `network:` key
/// is allowed, as cloud-init allows it).
pub fn parse(doc: &Value) -> Result<Network, Handover> {
    let doc = match doc.get("network") {
        Some(inner) => inner,
        None => doc,
    };
    if doc.get("config").and_then(Value::as_str) == Some("disabled") {
        return Ok(Network::Disabled);
    }
    match doc.get("version").and_then(Value::as_u64) {
        Some(1) => v1(doc),
        Some(2) => v2(doc),
        _ => handover("network-config has no version 1 or 2"),
    }
}

fn v2(doc: &Value) -> Result<Network, Handover> {
    let m = doc
        .as_mapping()
        .ok_or_else(|| Handover("network-config is not a mapping".into()))?;
    only(m, &["version", "ethernets", "renderer"], "v2")?;
    let mut links = Vec::new();
    let Some(eths) = m.get("ethernets") else {
        return Ok(Network::Links(links));
    };
    let eths = eths
        .as_mapping()
        .ok_or_else(|| Handover("ethernets is not a mapping".into()))?;
    for (id, cfg) in eths {
        let id = text(id, "an ethernet id")?;
        let c = cfg
            .as_mapping()
            .ok_or_else(|| Handover(format!("ethernet {id} is not a mapping")))?;
        only(
            c,
            &[
                "match",
                "set-name",
                "dhcp4",
                "dhcp6",
                "addresses",
                "gateway4",
                "gateway6",
                "routes",
                "nameservers",
                "mtu",
            ],
            "an ethernet",
        )?;
        let mut l = Link {
            id: id.clone(),
            dhcp4: flag(c.get("dhcp4")),
            dhcp6: flag(c.get("dhcp6")),
            set_name: c.get("set-name").map(|v| text(v, "set-name")).transpose()?,
            mtu: c.get("mtu").and_then(Value::as_u64).map(|n| n as u32),
            ..Link::default()
        };
        match c.get("match") {
            None => l.name = Some(id.clone()),
            Some(mv) => {
                let mm = mv
                    .as_mapping()
                    .ok_or_else(|| Handover("match is not a mapping".into()))?;
                only(mm, &["macaddress", "name"], "match")?;
                l.mac = mm
                    .get("macaddress")
                    .map(|v| text(v, "macaddress"))
                    .transpose()?
                    .map(|s| s.to_lowercase());
                l.name = mm.get("name").map(|v| text(v, "name")).transpose()?;
            }
        }
        for a in texts(c.get("addresses"), "address")? {
            l.addresses.push(cidr(&a, None)?);
        }
        for gw in ["gateway4", "gateway6"] {
            if let Some(v) = c.get(gw) {
                l.routes.push(default_route(&text(v, gw)?)?);
            }
        }
        if let Some(Value::Sequence(routes)) = c.get("routes") {
            for r in routes {
                let rm = r
                    .as_mapping()
                    .ok_or_else(|| Handover("a route is not a mapping".into()))?;
                only(rm, &["to", "via"], "a route")?;
                let to = rm
                    .get("to")
                    .map(|v| text(v, "to"))
                    .transpose()?
                    .unwrap_or_else(|| "default".into());
                let via = rm
                    .get("via")
                    .map(|v| text(v, "via"))
                    .transpose()?
                    .ok_or_else(|| Handover("a route has no via".into()))?;
                ip(&via, "via")?;
                l.routes.push((route_to(&to)?, via));
            }
        }
        if let Some(ns) = c.get("nameservers") {
            let nm = ns
                .as_mapping()
                .ok_or_else(|| Handover("nameservers is not a mapping".into()))?;
            only(nm, &["addresses", "search"], "nameservers")?;
            for a in texts(nm.get("addresses"), "nameserver")? {
                ip(&a, "nameserver")?;
                l.dns.push(a);
            }
            l.search = texts(nm.get("search"), "search")?;
        }
        links.push(l);
    }
    Ok(Network::Links(links))
}

fn v1(doc: &Value) -> Result<Network, Handover> {
    let m = doc
        .as_mapping()
        .ok_or_else(|| Handover("network-config is not a mapping".into()))?;
    only(m, &["version", "config"], "v1")?;
    let Some(Value::Sequence(items)) = m.get("config") else {
        return handover("network-config v1 has no config list");
    };
    let mut links = Vec::new();
    let (mut dns, mut search) = (Vec::new(), Vec::new());
    for item in items {
        let im = item
            .as_mapping()
            .ok_or_else(|| Handover("a v1 config entry is not a mapping".into()))?;
        match im.get("type").and_then(Value::as_str) {
            Some("nameserver") => {
                only(im, &["type", "address", "search"], "a nameserver")?;
                dns.extend(texts(im.get("address"), "nameserver")?);
                search.extend(texts(im.get("search"), "search")?);
            }
            Some("physical") => {
                only(
                    im,
                    &["type", "name", "mac_address", "mtu", "subnets"],
                    "a physical entry",
                )?;
                let name = im
                    .get("name")
                    .map(|v| text(v, "name"))
                    .transpose()?
                    .ok_or_else(|| Handover("a physical entry has no name".into()))?;
                let mac = im
                    .get("mac_address")
                    .map(|v| text(v, "mac_address"))
                    .transpose()?
                    .map(|s| s.to_lowercase());
                let mut l = Link {
                    id: name.clone(),
                    set_name: mac.as_ref().map(|_| name.clone()),
                    name: if mac.is_none() { Some(name.clone()) } else { None },
                    mac,
                    mtu: im.get("mtu").and_then(Value::as_u64).map(|n| n as u32),
                    ..Link::default()
                };
                if let Some(Value::Sequence(subnets)) = im.get("subnets") {
                    for s in subnets {
                        let sm = s
                            .as_mapping()
                            .ok_or_else(|| Handover("a subnet is not a mapping".into()))?;
                        only(
                            sm,
                            &[
                                "type",
                                "address",
                                "netmask",
                                "gateway",
                                "dns_nameservers",
                                "dns_search",
                                "routes",
                                "control",
                            ],
                            "a subnet",
                        )?;
                        match sm.get("type").and_then(Value::as_str) {
                            Some("dhcp" | "dhcp4") => l.dhcp4 = true,
                            Some("dhcp6") => l.dhcp6 = true,
                            Some("static" | "static4" | "static6") => {
                                let addr = sm
                                    .get("address")
                                    .map(|v| text(v, "address"))
                                    .transpose()?
                                    .ok_or_else(|| Handover("a static subnet has no address".into()))?;
                                let mask = sm.get("netmask").map(|v| text(v, "netmask")).transpose()?;
                                l.addresses.push(cidr(&addr, mask.as_deref())?);
                                if let Some(gw) = sm.get("gateway") {
                                    l.routes.push(default_route(&text(gw, "gateway")?)?);
                                }
                                if let Some(Value::Sequence(routes)) = sm.get("routes") {
                                    for r in routes {
                                        let rm = r
                                            .as_mapping()
                                            .ok_or_else(|| Handover("a route is not a mapping".into()))?;
                                        only(rm, &["network", "netmask", "prefix", "gateway"], "a route")?;
                                        let net = rm
                                            .get("network")
                                            .map(|v| text(v, "network"))
                                            .transpose()?
                                            .unwrap_or_else(|| "0.0.0.0".into());
                                        let mask = match (rm.get("netmask"), rm.get("prefix")) {
                                            (Some(v), _) | (None, Some(v)) => Some(text(v, "netmask")?),
                                            _ => None,
                                        };
                                        let gw = rm
                                            .get("gateway")
                                            .map(|v| text(v, "gateway"))
                                            .transpose()?
                                            .ok_or_else(|| Handover("a route has no gateway".into()))?;
                                        ip(&gw, "gateway")?;
                                        l.routes.push((cidr(&net, mask.as_deref())?, gw));
                                    }
                                }
                            }
                            other => return handover(format!("network-config v1 subnet type {other:?}")),
                        }
                        for a in texts(sm.get("dns_nameservers"), "nameserver")? {
                            ip(&a, "nameserver")?;
                            l.dns.push(a);
                        }
                        l.search.extend(texts(sm.get("dns_search"), "search")?);
                    }
                }
                links.push(l);
            }
            Some("loopback") => {}
            other => return handover(format!("network-config v1 type {other:?}")),
        }
    }
    // Global nameservers go to every link (networkd has no global section
    // in .network files; resolved.conf would need systemd-resolved).
    for l in &mut links {
        l.dns.extend(dns.iter().cloned());
        l.search.extend(search.iter().cloned());
    }
    Ok(Network::Links(links))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Network, Handover> {
        parse(&serde_yaml::from_str(s).unwrap())
    }

    #[test]
    fn v2_static_by_mac_renders_a_link_and_a_network() {
        let n = parse_str(include_str!("testdata/webhoster-network-config.yaml")).unwrap();
        assert!(n.is_static());
        let files = n.render();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].0, "10-webhoster-eth0.link");
        assert!(
            files[0]
                .1
                .contains("MACAddress=52:54:00:aa:bb:cc\n\n[Link]\nName=eth0\n"),
            "{}",
            files[0].1
        );
        let net = &files[1].1;
        assert!(net.contains("MACAddress=52:54:00:aa:bb:cc\n"), "{net}");
        assert!(
            net.contains("DHCP=no\nIPv6AcceptRA=no\nAddress=10.0.0.5/24\n"),
            "{net}"
        );
        assert!(
            net.contains("[Route]\nDestination=0.0.0.0/0\nGateway=10.0.0.1\n"),
            "{net}"
        );
    }

    #[test]
    fn v2_dhcp_and_v1_static_and_dhcp() {
        let n = parse_str("version: 2\nethernets:\n  ens3:\n    dhcp4: true\n").unwrap();
        assert!(!n.is_static());
        let f = n.render();
        assert!(
            f[0].1.contains("Name=ens3\n") && f[0].1.contains("DHCP=ipv4\n"),
            "{}",
            f[0].1
        );

        let n = parse_str(
            "network:\n  version: 1\n  config:\n  - type: physical\n    name: eth0\n    mac_address: '52:54:00:12:34:56'\n    subnets:\n    - type: static\n      address: 192.168.1.10\n      netmask: 255.255.255.0\n      gateway: 192.168.1.1\n      dns_nameservers: [192.168.1.1]\n  - type: nameserver\n    address: [9.9.9.9]\n    search: [example.org]\n",
        )
        .unwrap();
        assert!(n.is_static());
        let f = n.render();
        assert!(f[0].1.contains("Name=eth0"), "{}", f[0].1);
        let net = &f[1].1;
        assert!(net.contains("Address=192.168.1.10/24\n"), "{net}");
        assert!(
            net.contains("DNS=192.168.1.1\nDNS=9.9.9.9\nDomains=example.org\n"),
            "{net}"
        );
        assert!(net.contains("Gateway=192.168.1.1\n"), "{net}");

        let n = parse_str("version: 1\nconfig:\n- type: physical\n  name: eth1\n  subnets: [{type: dhcp}]\n")
            .unwrap();
        assert!(!n.is_static());
        assert!(n.render()[0].1.contains("Name=eth1\n"));
    }

    #[test]
    fn bonds_bridges_and_junk_hand_over() {
        assert!(parse_str("version: 2\nbonds: {bond0: {interfaces: [a]}}\n").is_err());
        assert!(parse_str("version: 1\nconfig:\n- type: bridge\n  name: br0\n").is_err());
        assert!(parse_str("version: 2\nethernets: {e: {addresses: ['10.0.0.1/99']}}\n").is_err());
        assert!(parse_str("version: 2\nethernets: {e: {addresses: [\"10.0.0.1/24\\nDNS=x\"]}}\n").is_err());
        assert!(parse_str("version: 3\n").is_err());
        assert_eq!(
            parse_str("network: {config: disabled}\n").unwrap(),
            Network::Disabled
        );
    }
}
