//! Thin rtnetlink helpers over one `Handle` (whose socket belongs to one
//! namespace): look up links, add veths, bridges, addresses and routes,
//! idempotently. No policy here: `mod.rs` decides what to build.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoBridgePort, InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::NetError;

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const ENOENT: i32 = 2;

pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// A link as far as we care.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
    pub mac: Option<[u8; 6]>,
    /// The kernel's byte counters, `(rx, tx)` as the link sees them.
    pub bytes: Option<(u64, u64)>,
}

impl Link {
    fn from_msg(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            controller: None,
            mac: None,
            bytes: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Stats64(st) => link.bytes = Some((st.rx_bytes, st.tx_bytes)),
                // The 32-bit counters only when the 64-bit ones are absent.
                LinkAttribute::Stats(st) if link.bytes.is_none() => {
                    link.bytes = Some((u64::from(st.rx_bytes), u64::from(st.tx_bytes)));
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

pub async fn get(h: &Handle, name: &str) -> Result<Option<Link>, NetError> {
    let mut stream = h.link().get().match_name(name.to_string()).execute();
    match stream.try_next().await {
        Ok(Some(msg)) => Ok(Some(Link::from_msg(&msg))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(NetError::netlink(format!("look up link {name:?}"))(e)),
    }
}

pub async fn list(h: &Handle) -> Result<Vec<Link>, NetError> {
    let msgs: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(NetError::netlink("list links"))?;
    Ok(msgs.iter().map(Link::from_msg).collect())
}

pub async fn up(h: &Handle, index: u32) -> Result<(), NetError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(NetError::netlink(format!("set link {index} up")))
}

pub async fn delete(h: &Handle, name: &str) -> Result<bool, NetError> {
    let Some(link) = get(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
        Err(e) => Err(NetError::netlink(format!("delete link {name:?}"))(e)),
    }
}

/// Create a bridge unless a link of that name exists, with the fixed MAC
/// `mac`. A bridge left to itself takes the lowest MAC of its ports, so it
/// changes whenever a port joins or leaves, and every change flushes its
/// neighbour table, permanent entries included (`neigh_changeaddr`); a set
/// address stays. It is set only when it differs: setting it at all
/// flushes too.
pub async fn ensure_bridge(h: &Handle, name: &str, mac: [u8; 6]) -> Result<u32, NetError> {
    let existing = get(h, name).await?;
    if existing.is_none() {
        match h
            .link()
            .add(LinkBridge::new(name).address(mac.to_vec()).build())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(EEXIST) => {}
            Err(e) => return Err(NetError::netlink(format!("create bridge {name:?}"))(e)),
        }
    }
    let l = match existing {
        Some(l) => l,
        None => get(h, name).await?.ok_or_else(|| NetError::Io {
            op: format!("bridge {name:?} vanished after creation"),
            source: std::io::Error::from_raw_os_error(ENODEV),
        })?,
    };
    if l.mac != Some(mac) {
        h.link()
            .set(LinkUnspec::new_with_index(l.index).address(mac.to_vec()).build())
            .execute()
            .await
            .map_err(NetError::netlink(format!("set the address of bridge {name:?}")))?;
    }
    Ok(l.index)
}

/// Create a veth pair `name`/`peer` in the handle's namespace.
pub async fn add_veth(h: &Handle, name: &str, peer: &str) -> Result<(), NetError> {
    h.link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
        .map_err(NetError::netlink(format!("create veth {name:?}/{peer:?}")))
}

/// Move a link into the namespace referred to by `ns_fd`.
pub async fn move_to_netns(h: &Handle, index: u32, ns_fd: std::os::fd::RawFd) -> Result<(), NetError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).setns_by_fd(ns_fd).build())
        .execute()
        .await
        .map_err(NetError::netlink(format!(
            "move link {index} to another namespace"
        )))
}

/// Enslave `index` to `bridge` as an isolated port (it reaches non-isolated
/// ports such as the bridge itself, never another isolated port) and bring it up.
pub async fn plug_isolated(h: &Handle, index: u32, bridge: u32) -> Result<(), NetError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).controller(bridge).build())
        .execute()
        .await
        .map_err(NetError::netlink(format!("attach link {index} to the bridge")))?;
    h.link()
        .set_port(
            LinkBridgePort::new(index)
                .append_info_data(InfoBridgePort::Isolated(true))
                .build(),
        )
        .execute()
        .await
        .map_err(NetError::netlink(format!("make bridge port {index} isolated")))?;
    up(h, index).await
}

/// IPv4 addresses on a link (or every link when `index` is None), with the
/// index of the link holding each.
pub async fn addresses(h: &Handle, index: Option<u32>) -> Result<Vec<(u32, Ipv4Net)>, NetError> {
    let mut req = h.address().get();
    if let Some(i) = index {
        req = req.set_link_index_filter(i);
    }
    let msgs: Vec<_> = req
        .execute()
        .try_collect()
        .await
        .map_err(NetError::netlink("list addresses"))?;
    let mut out = Vec::new();
    for m in msgs {
        if m.header.family != AddressFamily::Inet {
            continue;
        }
        for a in &m.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip)) = a
                && let Ok(net) = Ipv4Net::new(*ip, m.header.prefix_len)
            {
                out.push((m.header.index, net));
            }
        }
    }
    Ok(out)
}

/// Put `addr` on link `index` unless it is there already.
pub async fn ensure_address(h: &Handle, index: u32, addr: Ipv4Net) -> Result<(), NetError> {
    if addresses(h, Some(index)).await?.iter().any(|(_, a)| *a == addr) {
        return Ok(());
    }
    match h
        .address()
        .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        Err(e) => Err(NetError::netlink(format!("add address {addr} to link {index}"))(
            e,
        )),
    }
}

/// `ip route replace <dest> via <gateway> dev <index>` (main table).
pub async fn replace_route(h: &Handle, dest: Ipv4Net, gateway: Ipv4Addr, index: u32) -> Result<(), NetError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dest.network(), dest.prefix_len())
        .gateway(gateway)
        .output_interface(index)
        .build();
    h.route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(NetError::netlink(format!("route {dest} via {gateway}")))
}

/// A unicast IPv4 route of the main table.
#[derive(Debug, Clone)]
pub struct Route {
    pub dest: Ipv4Net,
    pub oif: Option<u32>,
}

pub async fn routes(h: &Handle) -> Result<Vec<Route>, NetError> {
    let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(filter)
        .execute()
        .try_collect()
        .await
        .map_err(NetError::netlink("list routes"))?;
    let mut out = Vec::new();
    for m in msgs {
        if m.header.kind != RouteType::Unicast || m.header.table != 254 {
            continue;
        }
        let mut dest = Ipv4Addr::UNSPECIFIED;
        let mut oif = None;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dest = *d,
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        if let Ok(dest) = Ipv4Net::new(dest, m.header.destination_prefix_length) {
            out.push(Route { dest, oif });
        }
    }
    Ok(out)
}

/// `ip neigh replace <ip> lladdr <mac> nud permanent dev <index>`: a
/// permanent entry, which no ARP packet (gratuitous or not) can change.
pub async fn set_permanent_neighbour(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
) -> Result<(), NetError> {
    h.neighbours()
        .add(index, IpAddr::V4(ip))
        .link_layer_address(&mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(NetError::netlink(format!("set the neighbour entry of {ip}")))
}

/// One IPv4 neighbour entry of a link.
#[derive(Debug, Clone)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
    msg: NeighbourMessage,
}

/// The IPv4 neighbour entries of link `index`.
pub async fn neighbours(h: &Handle, index: u32) -> Result<Vec<Neighbour>, NetError> {
    let msgs: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .map_err(NetError::netlink("list neighbours"))?;
    let mut out = Vec::new();
    for m in msgs.into_iter().filter(|m| m.header.ifindex == index) {
        let mut ip = None;
        let mut mac = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => ip = Some(*d),
                NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
                _ => {}
            }
        }
        if let Some(ip) = ip {
            out.push(Neighbour {
                ip,
                mac,
                permanent: m.header.state == NeighbourState::Permanent,
                msg: m,
            });
        }
    }
    Ok(out)
}

/// Delete one entry (fine if it is gone).
pub async fn delete_neighbour(h: &Handle, n: &Neighbour) -> Result<(), NetError> {
    match h.neighbours().del(n.msg.clone()).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(ENOENT) => Ok(()),
        Err(e) => Err(NetError::netlink(format!(
            "delete the neighbour entry of {}",
            n.ip
        ))(e)),
    }
}
