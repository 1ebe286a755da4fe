//! One DHCPv4 exchange at boot, for a seed without network-config (cloud-init's
//! fallback: DHCP on the first NIC). networkd starts seconds later under TCG;
//! until then the VM would not answer although sshd and nginx listen. The
//! address goes on with the lease's lifetimes, so networkd sees a DHCP
//! address it keeps (`KeepConfiguration=dhcp` in the fallback file), and its
//! own client asks with the same client identifier (`ClientIdentifier=mac`)
//! and gets the same lease.
//!
//! Raw (`AF_PACKET`) rather than UDP sockets: the link has no address yet,
//! and reverse-path filtering would drop the server's reply to a UDP socket.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::libc;

const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;
/// Options 1 (mask), 51 (lease time), 54 (server id); the router is
/// networkd's to set when it takes the lease over.
const PARAMS: [u8; 3] = [1, 51, 54];

/// What the server handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub server: Ipv4Addr,
    pub seconds: u32,
}

/// A server's answer to us: its message type and, but for a NAK, the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    kind: u8,
    lease: Option<Lease>,
}

/// A BOOTREQUEST of `kind`, broadcast flag set (we cannot take unicast yet),
/// client identifier type 1 + MAC as networkd's `ClientIdentifier=mac`.
fn message(kind: u8, xid: u32, mac: [u8; 6], requested: Option<&Lease>) -> Vec<u8> {
    let mut m = vec![0u8; 236];
    m[0] = 1; // BOOTREQUEST
    m[1] = 1; // Ethernet
    m[2] = 6;
    m[4..8].copy_from_slice(&xid.to_be_bytes());
    m[10..12].copy_from_slice(&0x8000u16.to_be_bytes());
    m[28..34].copy_from_slice(&mac);
    m.extend_from_slice(&MAGIC);
    m.extend_from_slice(&[53, 1, kind]);
    m.extend_from_slice(&[61, 7, 1]);
    m.extend_from_slice(&mac);
    m.extend_from_slice(&[55, PARAMS.len() as u8]);
    m.extend_from_slice(&PARAMS);
    if let Some(l) = requested {
        m.extend_from_slice(&[50, 4]);
        m.extend_from_slice(&l.address.octets());
        m.extend_from_slice(&[54, 4]);
        m.extend_from_slice(&l.server.octets());
    }
    m.push(255);
    // BOOTP's minimum message size; some servers ignore shorter ones.
    m.resize(m.len().max(300), 0);
    m
}

/// The server's message for our `xid` and `mac`, if `payload` (a UDP
/// payload) is one with a type and, unless it is a NAK, an address, a mask
/// and a server identifier.
fn parse(payload: &[u8], xid: u32, mac: [u8; 6]) -> Option<Reply> {
    if payload.len() < 240
        || payload[0] != 2
        || payload[4..8] != xid.to_be_bytes()
        || payload[28..34] != mac
        || payload[236..240] != MAGIC
    {
        return None;
    }
    let ip = |b: &[u8]| -> Option<Ipv4Addr> { Some(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?)) };
    let address = ip(&payload[16..20])?;
    let (mut kind, mut mask, mut server, mut seconds) = (None, None, None, 86_400);
    let mut opts = &payload[240..];
    while let [code, rest @ ..] = opts {
        match code {
            0 => {
                opts = rest;
                continue;
            }
            255 => break,
            _ => {}
        }
        let [len, rest @ ..] = rest else { break };
        let value = rest.get(..usize::from(*len))?;
        match (code, value) {
            (53, [k]) => kind = Some(*k),
            (1, v) => mask = ip(v),
            (54, v) => server = ip(v),
            (51, v) => seconds = u32::from_be_bytes(v.try_into().ok()?),
            _ => {}
        }
        opts = &rest[usize::from(*len)..];
    }
    let kind = kind?;
    if kind == NAK {
        return Some(Reply { kind, lease: None });
    }
    let prefix = u32::from(mask?).leading_ones();
    if address.is_unspecified() || u32::from(mask?).count_ones() != prefix {
        return None;
    }
    Some(Reply {
        kind,
        lease: Some(Lease {
            address,
            prefix: prefix as u8,
            server: server?,
            seconds,
        }),
    })
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `payload` in UDP (68 to 67, no checksum: optional in IPv4) in IPv4 (from
/// 0.0.0.0 to the broadcast address).
fn ip_udp(payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0x10]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    p.extend_from_slice(&Ipv4Addr::UNSPECIFIED.octets());
    p.extend_from_slice(&Ipv4Addr::BROADCAST.octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    p.extend_from_slice(&SERVER_PORT.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// The UDP payload of an IPv4 packet to our port, if it is one.
fn udp_to_client(packet: &[u8]) -> Option<&[u8]> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || header < 20 || *packet.get(9)? != libc::IPPROTO_UDP as u8 {
        return None;
    }
    let udp = packet.get(header..)?;
    let len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if udp.get(2..4)? != CLIENT_PORT.to_be_bytes() || len < 8 {
        return None;
    }
    udp.get(8..len)
}

/// A packet socket for IPv4 on one interface.
struct Raw {
    fd: OwnedFd,
    ifindex: i32,
}

impl Raw {
    fn open(ifname: &str) -> Result<Raw, String> {
        let ifindex = i32::try_from(crate::live::ifindex(ifname)?)
            .map_err(|_| format!("the index of {ifname} is out of range"))?;
        let proto = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                proto.into(),
            )
        };
        if fd < 0 {
            return Err(crate::live::os_err("a packet socket"));
        }
        // SAFETY: fd was just returned by socket(2) and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = Raw { fd, ifindex };
        let addr = raw.link_addr();
        // SAFETY: addr is a valid sockaddr_ll of its size.
        let bound = unsafe {
            libc::bind(
                raw.fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(crate::live::os_err(&format!(
                "binding a packet socket to {ifname}"
            )));
        }
        Ok(raw)
    }

    /// This interface, Ethernet broadcast.
    fn link_addr(&self) -> libc::sockaddr_ll {
        libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: (libc::ETH_P_IP as u16).to_be(),
            sll_ifindex: self.ifindex,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0],
        }
    }

    fn broadcast(&self, packet: &[u8]) -> Result<(), String> {
        let addr = self.link_addr();
        // SAFETY: packet and addr are valid for their lengths.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(crate::live::os_err("sending a DHCP message"));
        }
        Ok(())
    }

    /// The next packet within `wait`; None when none came.
    fn receive(&self, wait: Duration, buf: &mut [u8]) -> Option<usize> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&raw mut pfd, 1, ms) } <= 0 {
            return None;
        }
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).ok()
    }
}

/// Sends `msg` and waits for a reply of one of `kinds`, sending again after
/// 0.5, 1 and 2 s; None once `deadline` has passed.
fn ask(
    raw: &Raw,
    msg: &[u8],
    xid: u32,
    mac: [u8; 6],
    kinds: &[u8],
    deadline: Instant,
) -> Result<Option<Reply>, String> {
    let packet = ip_udp(msg);
    let mut buf = vec![0u8; 2048];
    let mut wait = Duration::from_millis(500);
    while Instant::now() < deadline {
        raw.broadcast(&packet)?;
        let resend = (Instant::now() + wait).min(deadline);
        while let Some(left) = resend.checked_duration_since(Instant::now()) {
            let Some(n) = raw.receive(left, &mut buf) else {
                break;
            };
            let reply = udp_to_client(&buf[..n]).and_then(|p| parse(p, xid, mac));
            if let Some(r) = reply.filter(|r| kinds.contains(&r.kind)) {
                return Ok(Some(r));
            }
        }
        wait = (wait * 2).min(Duration::from_secs(2));
    }
    Ok(None)
}

/// DISCOVER, OFFER, REQUEST, ACK on `ifname` (up already), within `limit`.
pub fn exchange(ifname: &str, mac: [u8; 6], limit: Duration) -> Result<Lease, String> {
    let deadline = Instant::now() + limit;
    let raw = Raw::open(ifname)?;
    // Only needs to tell our exchange from others on the link.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let xid = nanos ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]);
    let offer = ask(
        &raw,
        &message(DISCOVER, xid, mac, None),
        xid,
        mac,
        &[OFFER],
        deadline,
    )?
    .and_then(|r| r.lease)
    .ok_or_else(|| format!("no DHCP offer on {ifname} within {limit:?}"))?;
    let reply = ask(
        &raw,
        &message(REQUEST, xid, mac, Some(&offer)),
        xid,
        mac,
        &[ACK, NAK],
        deadline,
    )?
    .ok_or_else(|| format!("no DHCP answer to the request on {ifname} within {limit:?}"))?;
    reply
        .lease
        .ok_or_else(|| format!("the DHCP server refused {} on {ifname}", offer.address))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// What a server answers to `request`, as QEMU's user network does.
    fn answer(request: &[u8], kind: u8, mask: [u8; 4]) -> Vec<u8> {
        let mut m = request[..236].to_vec();
        m[0] = 2;
        m[16..20].copy_from_slice(&[10, 0, 2, 15]);
        m.extend_from_slice(&MAGIC);
        m.extend_from_slice(&[53, 1, kind, 54, 4, 10, 0, 2, 2, 1, 4]);
        m.extend_from_slice(&mask);
        m.extend_from_slice(&[3, 4, 10, 0, 2, 2, 51, 4, 0, 1, 0x51, 0x80, 0, 0, 255]);
        m
    }

    #[test]
    fn a_request_names_the_offer_and_the_client() {
        let offer = Lease {
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            server: Ipv4Addr::new(10, 0, 2, 2),
            seconds: 60,
        };
        let m = message(REQUEST, 7, MAC, Some(&offer));
        assert_eq!(m.len(), 300);
        assert_eq!(&m[4..8], &7u32.to_be_bytes());
        assert_eq!(&m[10..12], &[0x80, 0], "broadcast flag");
        let opts = &m[240..];
        assert!(opts.starts_with(&[53, 1, REQUEST, 61, 7, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!(opts.windows(6).any(|w| w == [50, 4, 10, 0, 2, 15]));
        assert!(opts.windows(6).any(|w| w == [54, 4, 10, 0, 2, 2]));
    }

    #[test]
    fn replies_parse_and_strangers_do_not() {
        let req = message(DISCOVER, 9, MAC, None);
        let offer = parse(&answer(&req, OFFER, [255, 255, 255, 0]), 9, MAC).unwrap();
        assert_eq!(
            offer,
            Reply {
                kind: OFFER,
                lease: Some(Lease {
                    address: Ipv4Addr::new(10, 0, 2, 15),
                    prefix: 24,
                    server: Ipv4Addr::new(10, 0, 2, 2),
                    seconds: 86_400,
                }),
            }
        );
        assert_eq!(
            parse(&answer(&req, OFFER, [255, 255, 255, 0]), 10, MAC),
            None,
            "other xid"
        );
        let other = [2, 0, 0, 0, 0, 1];
        assert_eq!(
            parse(&answer(&req, OFFER, [255, 255, 255, 0]), 9, other),
            None,
            "other MAC"
        );
        assert_eq!(
            parse(&answer(&req, OFFER, [255, 0, 255, 0]), 9, MAC),
            None,
            "bad mask"
        );
        assert_eq!(
            parse(&answer(&req, ACK, [255, 255, 255, 0])[..250], 9, MAC),
            None,
            "cut short"
        );
        assert_eq!(
            parse(&answer(&req, NAK, [255, 255, 255, 0]), 9, MAC),
            Some(Reply {
                kind: NAK,
                lease: None
            })
        );
    }

    #[test]
    fn packets_wrap_and_unwrap() {
        let payload = message(DISCOVER, 1, MAC, None);
        let p = ip_udp(&payload);
        assert_eq!(checksum(&p[..20]), 0, "the IPv4 header checksum holds");
        assert_eq!(&p[16..20], &[255, 255, 255, 255]);
        // Turned around (to port 68), the payload comes back out.
        let mut back = p.clone();
        back[20..22].copy_from_slice(&SERVER_PORT.to_be_bytes());
        back[22..24].copy_from_slice(&CLIENT_PORT.to_be_bytes());
        assert_eq!(udp_to_client(&back), Some(payload.as_slice()));
        assert_eq!(udp_to_client(&p), None, "to the server's port");
        assert_eq!(udp_to_client(&p[..10]), None);
    }
}
