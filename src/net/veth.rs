//! The veth pair joining host and namespace, and its link-local /30
//! transfer net. Creates only the pair named after the namespace.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use ipnet::Ipv4Net;
use rtnetlink::Handle;
use sha2::{Digest, Sha256};

use super::{NS_UPLINK, NetError, link};

/// The /30 joining host and namespace: derived from the namespace name inside
/// 169.254.0.0/16 (link-local: never routed, never a VM subnet), skipping
/// blocks used by anything else. The host end is `.1`, the namespace `.2`.
pub(super) fn transfer_candidates(netns: &str) -> impl Iterator<Item = Ipv4Net> {
    let digest = Sha256::digest(netns.as_bytes());
    let start = u16::from_be_bytes([digest[0], digest[1]]) as u32;
    // 169.254.1.0 - 169.254.254.255: RFC 3927 reserves the first and last /24.
    const FIRST: u32 = 0xA9FE_0100;
    const BLOCKS: u32 = (254 * 256) / 4;
    (0..BLOCKS).filter_map(move |i| {
        let block = (start + i) % BLOCKS;
        let net = FIRST + block * 4;
        let n = Ipv4Net::new(Ipv4Addr::from(net), 30).ok()?;
        // 169.254.169.254 is the cloud metadata address on many hosts.
        (!n.contains(&Ipv4Addr::new(169, 254, 169, 254))).then_some(n)
    })
}

pub(super) fn host_end(t: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(u32::from(t.network()) + 1), 30).expect("valid /30")
}

pub(super) fn ns_end(t: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(u32::from(t.network()) + 2), 30).expect("valid /30")
}

/// Create the veth pair inside the namespace (no name clash possible there)
/// and move the host end out to the host. Returns the host end's index.
pub(super) async fn create_veth(host: &Handle, ns: &Handle, veth: &str) -> Result<u32, NetError> {
    // A crash between "create" and "move" leaves the host end inside.
    link::delete(ns, veth).await?;
    link::delete(ns, NS_UPLINK).await?;
    link::add_veth(ns, NS_UPLINK, veth).await?;
    let inner = link::get(ns, veth).await?.ok_or_else(|| NetError::Io {
        op: format!("veth {veth:?} vanished after creation"),
        source: std::io::Error::from_raw_os_error(libc::ENODEV),
    })?;
    let host_ns = File::open("/proc/self/ns/net").map_err(NetError::io("open the host network namespace"))?;
    link::move_to_netns(ns, inner.index, host_ns.as_raw_fd()).await?;
    link::get(host, veth)
        .await?
        .map(|l| l.index)
        .ok_or_else(|| NetError::Io {
            op: format!("veth {veth:?} did not arrive on the host"),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })
}

/// Reuse the /30 already on our veth, else the first derived block that no
/// host address overlaps.
pub(super) async fn pick_transfer(host: &Handle, netns: &str, index: u32) -> Result<Ipv4Net, NetError> {
    let addrs = link::addresses(host, None).await?;
    if let Some((_, a)) = addrs
        .iter()
        .find(|(i, a)| *i == index && a.prefix_len() == 30 && a.addr().is_link_local())
    {
        return Ok(a.trunc());
    }
    transfer_candidates(netns)
        .find(|t| {
            !addrs
                .iter()
                .any(|(_, a)| a.contains(&t.network()) || t.contains(&a.addr()))
        })
        .ok_or_else(|| NetError::Io {
            op: "find a free link-local /30 for the veth".into(),
            source: std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_nets_are_link_local_and_stable() {
        let a: Vec<_> = transfer_candidates("whns").take(3).collect();
        assert_eq!(a, transfer_candidates("whns").take(3).collect::<Vec<_>>());
        assert_ne!(a[0], transfer_candidates("other").next().unwrap());
        for t in transfer_candidates("whns") {
            assert_eq!(t.prefix_len(), 30);
            assert!(t.network().is_link_local());
            assert!(!t.contains(&Ipv4Addr::new(169, 254, 169, 254)));
            assert_ne!(t.network().octets()[2], 0);
            assert_ne!(t.network().octets()[2], 255);
        }
        assert_eq!(
            host_end(a[0]).addr(),
            Ipv4Addr::from(u32::from(a[0].network()) + 1)
        );
        assert_eq!(ns_end(a[0]).addr(), Ipv4Addr::from(u32::from(a[0].network()) + 2));
    }
}
