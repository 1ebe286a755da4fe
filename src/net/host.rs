//! Host-side checks and settings before and around `up`: subnet overlap,
//! SSH port range, and the forwarding sysctls DNATed SSH needs. Changes only
//! `net.ipv4.conf.<if>.forwarding`, and records every change in the table.

use std::collections::{BTreeSet, HashSet};
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;
use rtnetlink::Handle;
use tracing::info;

use super::{NetError, NetOptions, alloc, blocking, link, nft, sysctl};

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The subnet must not overlap any host address or route, except our own
/// route through our own veth (a second `up`).
pub(super) async fn check_subnet(host: &Handle, subnet: Ipv4Net, ours: Option<u32>) -> Result<(), NetError> {
    for (index, a) in link::addresses(host, None).await? {
        if Some(index) != ours && overlaps(a.trunc(), subnet) {
            return Err(NetError::SubnetOverlap {
                subnet,
                what: format!("address {a}"),
            });
        }
    }
    for r in link::routes(host).await? {
        if r.dest.prefix_len() == 0 || (ours.is_some() && r.oif == ours) {
            continue;
        }
        if overlaps(r.dest, subnet) {
            return Err(NetError::SubnetOverlap {
                subnet,
                what: format!("route {}", r.dest),
            });
        }
    }
    Ok(())
}

/// The SSH range must not overlap another webhoster network's range nor the
/// kernel's ephemeral ports, and must have at least one port free now.
pub(super) fn check_ports(opts: &NetOptions, table: &str) -> Result<(), NetError> {
    let (lo, hi) = (*opts.ssh_ports.start(), *opts.ssh_ports.end());
    let bad = |why: String| NetError::BadPortRange { lo, hi, why };
    let disjoint = |a: &RangeInclusive<u16>| a.end() < &lo || a.start() > &hi;
    for (family, other) in nft::tables()? {
        if family != "ip" || !other.starts_with("webhoster_") || other == table {
            continue;
        }
        if let Some(r) = nft::declared_ports(&other)?
            && !disjoint(&r)
        {
            return Err(bad(format!(
                "it overlaps {}-{} of the network in table {other}",
                r.start(),
                r.end()
            )));
        }
    }
    if let Ok(eph) = sysctl::read("ip_local_port_range") {
        let mut it = eph.split_whitespace().filter_map(|p| p.parse::<u16>().ok());
        if let (Some(a), Some(b)) = (it.next(), it.next())
            && !disjoint(&(a..=b))
        {
            return Err(bad(format!(
                "it overlaps the kernel's ephemeral ports {a}-{b} (net.ipv4.ip_local_port_range)"
            )));
        }
    }
    let ours: HashSet<u16> = nft::forwards(table)?.iter().map(|f| f.port).collect();
    if ours.is_empty()
        && !opts
            .ssh_ports
            .clone()
            .any(|p| alloc::port_is_free(opts.ssh_bind, p))
    {
        return Err(bad("every port in it is held by another process".into()));
    }
    Ok(())
}

/// Turn IPv4 forwarding on where DNATed SSH from outside (or egress) enters,
/// and remember where we did, so `down` restores it and the host table
/// stops those interfaces from forwarding anything else.
pub(super) async fn open_ingress(host: &Handle, opts: &NetOptions) -> Result<BTreeSet<String>, NetError> {
    let table = opts.table();
    let mut opened = {
        let t = table.clone();
        blocking(move || nft::opened(&t)).await?
    };
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let bind = opts.ssh_bind;
    if !bind.is_loopback() {
        let links = link::list(host).await?;
        let others: HashSet<String> = {
            let t = table.clone();
            blocking(move || {
                Ok(nft::tables()?
                    .into_iter()
                    .filter(|(f, n)| f == "ip" && n.starts_with("webhoster_") && *n != t)
                    .map(|(_, n)| n)
                    .collect())
            })
            .await?
        };
        for (index, a) in link::addresses(host, None).await? {
            let Some(l) = links.iter().find(|l| l.index == index) else {
                continue;
            };
            let webhoster_veth = l.name == opts.host_veth() || others.contains(&nft::host_table(&l.name));
            if a.addr().is_loopback() || webhoster_veth {
                continue;
            }
            if bind.is_unspecified() || a.addr() == bind {
                wanted.insert(l.name.clone());
            }
        }
    }
    if let Some(up) = &opts.egress {
        wanted.insert(up.clone());
    }
    for iface in wanted {
        let key = sysctl::conf(&iface, "forwarding");
        if sysctl::read(&key)? == "0" {
            sysctl::write(&key, "1")?;
            info!(%iface, "turned IPv4 forwarding on for SSH forwards");
            opened.insert(iface);
        }
    }
    Ok(opened)
}
