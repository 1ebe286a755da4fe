//! What the agent does to the running kernel and daemons, rather than to
//! files: entropy, block device buffers, the NIC's MAC, the live addresses
//! and routes, sshd's reload. Used when a snapshot clone is personalised
//! (`--clone`) and when the template is prepared (`--template-prep`): the
//! system is already up as another instance, so files alone are not enough.
//! At boot, a static network is set here too, before networkd starts.
//! ioctls rather than processes where possible: each exec costs tens of ms
//! under TCG.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use nix::libc;

use crate::Steps;
use crate::dhcp;
use crate::network::{Link, Network};

/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool, with credit.
const RNDADDENTROPY: u64 = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: u64 = 0x5207;
/// `_IO(0x12, 97)`: write back and drop a block device's buffers.
const BLKFLSBUF: u64 = 0x1261;
/// Set an interface's hardware address.
const SIOCSIFHWADDR: u64 = 0x8924;

pub(crate) fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Adds host entropy to the kernel's pool, credited, and reseeds the CRNG at
/// once: a clone must not go on with the template's random state (vmgenid
/// reseeds too where the kernel has the driver; this covers the rest).
pub fn add_entropy(bytes: &[u8]) -> Result<(), String> {
    let f = fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
    let len = i32::try_from(bytes.len()).map_err(|_| "too much entropy".to_owned())?;
    // struct rand_pool_info { int entropy_count (bits); int buf_size; u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len() + 3);
    info.extend_from_slice(&(len * 8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(info.len().div_ceil(4) * 4, 0);
    // SAFETY: the buffer is a valid rand_pool_info of buf_size bytes.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(os_err("RNDADDENTROPY"));
    }
    // SAFETY: no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(os_err("RNDRESEEDCRNG"));
    }
    Ok(())
}

/// Moves the real-time clock by `ns` (a clone wakes at its template's time;
/// the host measured how far off that is). Read and set back to back: what
/// passes between the two is nanoseconds, not the process's start-up.
pub fn shift_clock(ns: i64) -> Result<(), String> {
    const NS: i128 = 1_000_000_000;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) } != 0 {
        return Err(os_err("clock_gettime"));
    }
    let to = i128::from(now.tv_sec) * NS + i128::from(now.tv_nsec) + i128::from(ns);
    let to = libc::timespec {
        tv_sec: libc::time_t::try_from(to.div_euclid(NS))
            .map_err(|_| format!("clock shift {ns} ns out of range"))?,
        tv_nsec: to.rem_euclid(NS) as libc::c_long,
    };
    // SAFETY: a valid, normalised timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &to) } != 0 {
        return Err(os_err("clock_settime"));
    }
    Ok(())
}

/// Drops a block device's cached buffers, so the next read sees what the
/// host wrote into the backing file since (the seed ISO is rewritten in
/// place for each clone, behind the guest's page cache).
pub fn flush_buffers(dev: &Path) -> Result<(), String> {
    let f = fs::File::open(dev).map_err(|e| format!("opening {}: {e}", dev.display()))?;
    // SAFETY: no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF as _, 0) } != 0 {
        return Err(os_err(&format!("BLKFLSBUF {}", dev.display())));
    }
    Ok(())
}

pub fn sync() {
    nix::unistd::sync();
}

fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let parts: Vec<u8> = mac
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad MAC address {mac:?}"))?;
    parts.try_into().map_err(|_| format!("bad MAC address {mac:?}"))
}

/// Physical Ethernet interfaces (those with a device behind them).
fn ethernet_interfaces() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("device").exists())
                .filter(|e| fs::read_to_string(e.path().join("type")).is_ok_and(|t| t.trim() == "1"))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn current_mac(ifname: &str) -> String {
    fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The interface a seed's link means in a clone: the NIC still has the
/// template's name and MAC, so by name first, then by the seed's MAC, then
/// the only NIC there is.
fn interface_for(link: &Link, nics: &[String]) -> Option<String> {
    let by_name = [&link.set_name, &link.name]
        .into_iter()
        .flatten()
        .find(|n| nics.contains(n));
    if let Some(n) = by_name {
        return Some(n.clone());
    }
    if let Some(mac) = &link.mac
        && let Some(n) = nics.iter().find(|n| current_mac(n) == mac.to_ascii_lowercase())
    {
        return Some(n.clone());
    }
    (nics.len() == 1).then(|| nics[0].clone())
}

fn set_mac(ifname: &str, mac: [u8; 6]) -> Result<(), String> {
    let sock =
        std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("a socket for SIOCSIFHWADDR: {e}"))?;
    // struct ifreq: 16 bytes of name, then a struct sockaddr (family, data).
    let mut req = [0u8; 40];
    let name = ifname.as_bytes();
    if name.len() >= 16 {
        return Err(format!("interface name {ifname:?} too long"));
    }
    req[..name.len()].copy_from_slice(name);
    req[16..18].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
    req[18..24].copy_from_slice(&mac);
    // SAFETY: req is a valid struct ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFHWADDR as _, req.as_mut_ptr()) } != 0 {
        return Err(os_err(&format!("setting the MAC of {ifname}")));
    }
    Ok(())
}

fn run(argv: &[&str]) -> Result<(), String> {
    let out = Process::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", argv[0]))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// IPv4 addresses per interface, now.
fn ipv4_addresses() -> Vec<(String, Ipv4Addr)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let ip = a.address?.as_sockaddr_in()?.ip();
            Some((a.interface_name, ip))
        })
        .collect()
}

/// Default IPv4 gateways per interface, from /proc/net/route.
fn default_gateways() -> Vec<(String, Ipv4Addr)> {
    let text = fs::read_to_string("/proc/net/route").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
                return None;
            }
            let gw = u32::from_str_radix(f[2], 16).ok()?;
            Some((f[0].to_owned(), Ipv4Addr::from(u32::from_be(gw))))
        })
        .collect()
}

/// What the live interfaces should hold: (interface, IPv4 addresses, default gateway).
/// And the inode of networkd's state file for it before the change.
type Wanted = Vec<(String, Vec<Ipv4Addr>, Option<Ipv4Addr>, Option<u64>)>;

fn in_place(wanted: &Wanted) -> bool {
    let addrs = ipv4_addresses();
    let gws = default_gateways();
    wanted.iter().all(|(ifname, ips, gw, _)| {
        let have: Vec<Ipv4Addr> = addrs
            .iter()
            .filter(|(n, _)| n == ifname)
            .map(|(_, ip)| *ip)
            .collect();
        // The template's address gone, the seed's there.
        let addrs_ok = have.len() == ips.len() && ips.iter().all(|ip| have.contains(ip));
        let gw_ok = gw.is_none_or(|g| gws.iter().any(|(n, x)| n == ifname && *x == g));
        addrs_ok && gw_ok
    })
}

/// One link's static IPv4 configuration, as the kernel path sets it.
struct KernelLink {
    ifname: String,
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
}

/// The seed's static links when each is what the kernel path covers (what
/// webhoster writes: one IPv4 address, at most a default route, nothing for
/// networkd alone: no DHCP, IPv6, DNS or MTU); None otherwise.
fn kernel_links(links: &[(String, &Link)]) -> Option<Vec<KernelLink>> {
    links
        .iter()
        .map(|(ifname, l)| {
            let plain = !l.dhcp4 && !l.dhcp6 && l.dns.is_empty() && l.search.is_empty() && l.mtu.is_none();
            let [address] = l.addresses.as_slice() else {
                return None;
            };
            let (ip, prefix) = address.split_once('/')?;
            let gateway = match l.routes.as_slice() {
                [] => None,
                [(to, via)] if to == "0.0.0.0/0" => Some(via.parse().ok()?),
                _ => return None,
            };
            plain.then_some(KernelLink {
                ifname: ifname.clone(),
                address: ip.parse().ok()?,
                prefix: prefix.parse().ok().filter(|p| *p <= 32)?,
                gateway,
            })
        })
        .collect()
}

/// Puts the seed's network on the live NICs: the MAC first (the device kept
/// the template's), then the template's address and default route replaced
/// by the seed's. For a static network, returns once they are in place.
///
/// What webhoster writes ([`kernel_links`]) is set by ioctls, and networkd
/// is left alone: it has the template's link configured, does not act on a
/// MAC change or on addresses removed under it, and reads the rewritten
/// files at the next boot (or reload), where they say what is already set.
/// A reload now cost the clone 0.45-0.7 s of TCG. Any other seed network:
/// networkd reloads its files and the agent waits until it has configured
/// the links.
pub fn apply_network(network: &Network, steps: &mut Steps) -> Result<(), String> {
    let Network::Links(links) = network else {
        // Fallback (DHCP) or disabled: networkd's business, nothing to wait for.
        let _ = networkd_reload();
        steps.step("network_dhcp");
        return Ok(());
    };
    let nics = ethernet_interfaces();
    let mut found = Vec::new();
    for link in links {
        let Some(ifname) = interface_for(link, &nics) else {
            return Err(format!("no interface for the seed's link {}", link.id));
        };
        if let Some(mac) = &link.mac
            && current_mac(&ifname) != mac.to_ascii_lowercase()
        {
            set_mac(&ifname, parse_mac(mac)?)?;
        }
        found.push((ifname, link));
    }
    let mut wanted: Wanted = found
        .iter()
        .filter(|(_, l)| !l.dhcp4)
        .map(|(ifname, l)| {
            let ips = l
                .addresses
                .iter()
                .filter_map(|a| a.split('/').next()?.parse().ok())
                .collect();
            let gw = l
                .routes
                .iter()
                .find(|(to, _)| to == "0.0.0.0/0")
                .and_then(|(_, via)| via.parse().ok());
            (ifname.clone(), ips, gw, None)
        })
        .collect();
    if let Some(kernel) = kernel_links(&found) {
        for k in &kernel {
            set_ipv4(k)?;
        }
        if !in_place(&wanted) {
            return Err("the seed's addresses and routes are not in place after setting them".into());
        }
        steps.step("network_kernel");
        return Ok(());
    }
    // networkd rewrites (renames) its state file of a link when it has
    // reconfigured it: the inodes before the reload, to see that happen.
    for w in wanted.iter_mut() {
        w.3 = networkd_state(&w.0).map(|(inode, _)| inode);
    }
    networkd_reload()?;
    steps.step("networkd_reload");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !in_place(&wanted) {
        if Instant::now() > deadline {
            return Err("the seed's addresses and routes are not in place after 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    steps.step("network_in_place");
    // Returned only once networkd has finished with the link too: nothing
    // of its reconfiguring may happen while the host checks the site.
    for (ifname, _, _, before) in &wanted {
        while !networkd_configured(ifname, *before) {
            if Instant::now() > deadline {
                return Err(format!("networkd did not configure {ifname} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if !in_place(&wanted) {
        return Err("networkd left other addresses or routes than the seed's".into());
    }
    steps.step("networkd_configured");
    Ok(())
}

/// At boot, before udev and networkd start: a seed network the kernel path
/// covers ([`kernel_links`]) is set by ioctls, when each link's NIC already
/// has the seed's MAC and the name the seed gives it (udev renames NICs
/// after this, and cannot rename one that is up). networkd starts later,
/// finds the address and route its files ask for, and keeps them. False,
/// with nothing done, for any other network: networkd's, as before.
pub fn network_at_boot(network: &Network) -> Result<bool, String> {
    let Network::Links(links) = network else {
        return Ok(false);
    };
    let nics = ethernet_interfaces();
    let mut found = Vec::new();
    for link in links {
        let (Some(mac), Some(set_name)) = (&link.mac, &link.set_name) else {
            return Ok(false);
        };
        let named = nics
            .iter()
            .find(|n| *n == set_name && current_mac(n) == mac.to_ascii_lowercase());
        let Some(ifname) = named else {
            return Ok(false);
        };
        found.push((ifname.clone(), link));
    }
    let Some(kernel) = kernel_links(&found) else {
        return Ok(false);
    };
    for k in &kernel {
        set_ipv4(k)?;
    }
    Ok(true)
}

fn sockaddr_v4(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes, plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

pub(crate) fn ifindex(ifname: &str) -> Result<u32, String> {
    let name = std::ffi::CString::new(ifname).map_err(|_| format!("bad interface name {ifname:?}"))?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(os_err(&format!("the index of {ifname}"))),
        index => Ok(index),
    }
}

fn ifname_bytes(ifname: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], String> {
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    if ifname.len() >= name.len() {
        return Err(format!("interface name {ifname:?} too long"));
    }
    for (d, s) in name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(name)
}

/// The link up (at boot it is still down).
fn link_up(sock: &impl AsRawFd, ifname: &str) -> Result<(), String> {
    let mut req = libc::ifreq {
        ifr_name: ifname_bytes(ifname)?,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: 0 },
    };
    // SAFETY: req is a valid struct ifreq; the flags are read, then written.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) != 0 {
            return Err(os_err(&format!("reading the flags of {ifname}")));
        }
        if req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req) != 0 {
                return Err(os_err(&format!("bringing {ifname} up")));
            }
        }
    }
    Ok(())
}

/// Where networkd's fallback file finds it: the first NIC keeps its kernel
/// name (udev cannot rename a link that is up, and fails its event if it
/// tries).
const FALLBACK_LINK: &str = "/etc/systemd/network/10-webhoster-fallback.link";

/// At boot, for a seed without network-config: the first NIC up, its name
/// pinned, one DHCP exchange, the lease's address on with the lease's
/// lifetimes (see `dhcp`). Its prefix route is enough for the host's
/// connections (the server is on the link); networkd adds the default route
/// when it takes the lease over. None when there is no NIC.
pub fn dhcp_at_boot(root: &Path) -> Result<Option<(String, dhcp::Lease)>, String> {
    let Some(ifname) = ethernet_interfaces().into_iter().next() else {
        return Ok(None);
    };
    let mac = current_mac(&ifname);
    let link = format!(
        "# webhoster-seed-agent: the NIC it took a DHCP lease on at boot keeps its name.\n\
         [Match]\nMACAddress={mac}\n\n[Link]\nName={ifname}\n"
    );
    crate::apply::write_atomic(&crate::apply::at(root, FALLBACK_LINK), link.as_bytes(), 0o644)?;
    let sock =
        std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("a socket for the link ioctls: {e}"))?;
    link_up(&sock, &ifname)?;
    let lease = dhcp::exchange(&ifname, parse_mac(&mac)?, Duration::from_secs(3))?;
    add_address(&ifname, &lease)?;
    Ok(Some((ifname, lease)))
}

/// `RTM_NEWADDR` with the lease's lifetimes (ioctls cannot set them; an
/// address without them is static to networkd, which would drop it).
fn add_address(ifname: &str, lease: &dhcp::Lease) -> Result<(), String> {
    fn attr(msg: &mut Vec<u8>, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        msg.extend_from_slice(&(len as u16).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(value);
        msg.resize(msg.len().next_multiple_of(4), 0);
    }
    let index = ifindex(ifname)?;
    let mut msg = vec![0u8; 16];
    // struct ifaddrmsg: family, prefix length, flags, scope, index.
    msg.extend_from_slice(&[libc::AF_INET as u8, lease.prefix, 0, libc::RT_SCOPE_UNIVERSE]);
    msg.extend_from_slice(&index.to_ne_bytes());
    let ip = lease.address.octets();
    attr(&mut msg, libc::IFA_LOCAL, &ip);
    attr(&mut msg, libc::IFA_ADDRESS, &ip);
    let host_bits = u32::MAX.checked_shr(u32::from(lease.prefix)).unwrap_or(0);
    let broadcast = Ipv4Addr::from(u32::from(lease.address) | host_bits);
    attr(&mut msg, libc::IFA_BROADCAST, &broadcast.octets());
    // struct ifa_cacheinfo: preferred and valid lifetimes, then two stamps.
    let mut cache = Vec::new();
    for v in [lease.seconds, lease.seconds, 0, 0] {
        cache.extend_from_slice(&v.to_ne_bytes());
    }
    attr(&mut msg, libc::IFA_CACHEINFO, &cache);
    let len = msg.len() as u32;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&libc::RTM_NEWADDR.to_ne_bytes());
    msg[6..8].copy_from_slice(&flags.to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(os_err("a netlink socket"));
    }
    // SAFETY: fd was just returned by socket(2) and is owned by no one else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; all zeroes is the kernel's address.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: msg and kernel are valid for their lengths.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(os_err(&format!("adding {} to {ifname}", lease.address)));
    }
    let mut reply = [0u8; 1024];
    // SAFETY: reply is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    // An NLMSG_ERROR message: its header, then the error (0 for the ack).
    if n < 20 || u16::from_ne_bytes([reply[4], reply[5]]) != libc::NLMSG_ERROR as u16 {
        return Err(format!(
            "no netlink answer to adding {} to {ifname}",
            lease.address
        ));
    }
    let errno = -i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    if errno != 0 {
        return Err(format!(
            "adding {}/{} to {ifname}: {}",
            lease.address,
            lease.prefix,
            std::io::Error::from_raw_os_error(errno)
        ));
    }
    Ok(())
}

/// `struct rtentry` of `<net/route.h>` (not in the libc crate for glibc).
#[repr(C)]
struct RtEntry {
    pad1: libc::c_ulong,
    dst: libc::sockaddr,
    gateway: libc::sockaddr,
    genmask: libc::sockaddr,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

/// The link's primary IPv4 address and mask replaced (`SIOCSIFADDR` changes
/// the one there in place, its routes with it), the link up (at boot it is
/// still down), every default route through it removed, the seed's added.
fn set_ipv4(k: &KernelLink) -> Result<(), String> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .map_err(|e| format!("a socket for the address ioctls: {e}"))?;
    let name = ifname_bytes(&k.ifname)?;
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(k.prefix)).unwrap_or(0));
    for (request, addr, what) in [
        (libc::SIOCSIFADDR, k.address, "address"),
        (libc::SIOCSIFNETMASK, mask, "netmask"),
    ] {
        let mut req = libc::ifreq {
            ifr_name: name,
            ifr_ifru: libc::__c_anonymous_ifr_ifru {
                ifru_addr: sockaddr_v4(addr),
            },
        };
        // SAFETY: req is a valid struct ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &mut req) } != 0 {
            return Err(os_err(&format!("setting the {what} {addr} on {}", k.ifname)));
        }
    }
    link_up(&sock, &k.ifname)?;
    let mut dev = name;
    let route = |gateway: Option<Ipv4Addr>, dev: &mut [libc::c_char]| RtEntry {
        pad1: 0,
        dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        gateway: sockaddr_v4(gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        flags: libc::RTF_UP | if gateway.is_some() { libc::RTF_GATEWAY } else { 0 },
        pad2: 0,
        pad3: 0,
        pad4: std::ptr::null_mut(),
        metric: 0,
        dev: dev.as_mut_ptr(),
        mtu: 0,
        window: 0,
        irtt: 0,
    };
    // The template's default route may have gone with its address; what
    // is left of it goes now (ESRCH: none left).
    loop {
        let mut old = route(None, &mut dev);
        // SAFETY: a valid struct rtentry; rt_dev points at a NUL-terminated name.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCDELRT as _, &mut old) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                break;
            }
            return Err(format!("removing the default route of {}: {err}", k.ifname));
        }
    }
    if let Some(gw) = k.gateway {
        let mut new = route(Some(gw), &mut dev);
        // SAFETY: as above.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT as _, &mut new) } != 0 {
            return Err(os_err(&format!(
                "adding the default route via {gw} on {}",
                k.ifname
            )));
        }
    }
    Ok(())
}

/// networkd's state file of a link: its inode and content.
fn networkd_state(ifname: &str) -> Option<(u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let index = fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex")).ok()?;
    let path = format!("/run/systemd/netif/links/{}", index.trim());
    let inode = fs::metadata(&path).ok()?.ino();
    Some((inode, fs::read_to_string(&path).ok()?))
}

/// networkd has written the link's state since `before` and calls it configured.
fn networkd_configured(ifname: &str, before: Option<u64>) -> bool {
    let Some((inode, state)) = networkd_state(ifname) else {
        return false;
    };
    Some(inode) != before && state.lines().any(|l| l == "ADMIN_STATE=configured")
}

/// networkd reads its files again and reconfigures the links they changed:
/// over D-Bus directly, `networkctl` if that fails.
fn networkd_reload() -> Result<(), String> {
    crate::dbus::call(
        "org.freedesktop.network1",
        "/org/freedesktop/network1",
        "org.freedesktop.network1.Manager",
        "Reload",
    )
    .or_else(|e| {
        crate::log(format!("{e}; networkctl reload instead"));
        run(&["networkctl", "reload"])
    })
}

/// Inodes of the sockets listening on TCP port `port` (v4 and v6).
fn listeners(port: u16) -> Vec<u64> {
    let local = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 9 && f[1].ends_with(&local) && f[3] == "0A" {
                inodes.extend(f[9].parse::<u64>().ok());
            }
        }
    }
    inodes
}

/// A running sshd to be told about the new host key: SIGHUP makes it
/// re-exec and read its keys and config again. Returns its old listeners,
/// to wait on with [`wait_sshd`]; None when no sshd runs.
pub fn reload_sshd() -> Result<Option<Vec<u64>>, String> {
    let Ok(pid) = fs::read_to_string("/run/sshd.pid") else {
        return Ok(None);
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return Ok(None);
    };
    let old = listeners(22);
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGHUP) {
        Ok(()) => Ok(Some(old)),
        Err(nix::errno::Errno::ESRCH) => Ok(None),
        Err(e) => Err(format!("SIGHUP to sshd {pid}: {e}")),
    }
}

/// Until the re-executed sshd listens again (new sockets) and accepts.
pub fn wait_sshd(old: &[u64]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 22));
    while Instant::now() < deadline {
        let now = listeners(22);
        if !now.is_empty()
            && now.iter().all(|i| !old.contains(i))
            && TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("sshd did not listen again within 15 s of SIGHUP".into())
}

/// One request to each door a create's readiness check and its user's first
/// visit go through: nginx's page and sshd's banner (a connection makes
/// sshd fork and re-execute itself, the path of every login).
pub fn knock_doors() -> Result<(), String> {
    let limit = Duration::from_secs(10);
    let connect = |port: u16| {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let s = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connecting to {addr}: {e}"))?;
        s.set_read_timeout(Some(limit))
            .and_then(|()| s.set_write_timeout(Some(limit)))
            .map_err(|e| format!("{addr}: {e}"))?;
        Ok::<_, String>(s)
    };
    let mut http = connect(80)?;
    http.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| format!("nginx: {e}"))?;
    let mut page = Vec::new();
    http.read_to_end(&mut page).map_err(|e| format!("nginx: {e}"))?;
    if !page.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "nginx answered {:?}",
            String::from_utf8_lossy(&page[..page.len().min(40)])
        ));
    }
    let mut ssh = connect(22)?;
    let mut banner = [0u8; 64];
    let n = ssh.read(&mut banner).map_err(|e| format!("sshd: {e}"))?;
    if !banner[..n].starts_with(b"SSH-2.0-") {
        return Err("sshd sent no SSH banner".into());
    }
    ssh.write_all(b"SSH-2.0-webhoster-warm-up\r\n")
        .map_err(|e| format!("sshd: {e}"))?;
    Ok(())
}

/// The seed's runcmd, started as at first boot (its unit, not waited for):
/// through systemd so its output goes to the journal and nothing of it holds
/// the caller's (guest-exec's) pipes open.
pub fn start_runcmd() -> Result<(), String> {
    run(&[
        "systemctl",
        "restart",
        "--no-block",
        "webhoster-seed-runcmd.service",
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:AA:bb:0c").unwrap(),
            [0x52, 0x54, 0, 0xaa, 0xbb, 0x0c]
        );
        assert!(parse_mac("52:54:00:aa:bb").is_err());
        assert!(parse_mac("52:54:00:aa:bb:zz").is_err());
    }

    #[test]
    fn a_link_finds_its_interface() {
        let nics = vec!["eth0".to_owned()];
        let mut l = Link {
            id: "eth0".into(),
            set_name: Some("eth0".into()),
            mac: Some("52:54:00:aa:bb:cc".into()),
            ..Link::default()
        };
        assert_eq!(interface_for(&l, &nics).as_deref(), Some("eth0"));
        // Another name and a MAC no NIC has: the only NIC.
        l.set_name = Some("net9".into());
        assert_eq!(interface_for(&l, &nics).as_deref(), Some("eth0"));
        let two = vec!["eth0".to_owned(), "eth1".to_owned()];
        assert_eq!(interface_for(&l, &two), None);
    }

    #[test]
    fn the_kernel_path_takes_only_what_webhoster_writes() {
        let ours = Link {
            id: "eth0".into(),
            addresses: vec!["10.0.0.5/24".into()],
            routes: vec![("0.0.0.0/0".into(), "10.0.0.1".into())],
            ..Link::default()
        };
        let one = |l: &Link| kernel_links(&[("eth0".to_owned(), l)]);
        let k = one(&ours).unwrap();
        assert_eq!(
            (k[0].address, k[0].prefix, k[0].gateway),
            ("10.0.0.5".parse().unwrap(), 24, Some("10.0.0.1".parse().unwrap()))
        );
        let no_route = Link {
            routes: vec![],
            ..ours.clone()
        };
        assert_eq!(one(&no_route).unwrap()[0].gateway, None);
        // Anything more is networkd's to apply.
        for other in [
            Link {
                addresses: vec!["10.0.0.5/24".into(), "10.0.0.6/24".into()],
                ..ours.clone()
            },
            Link {
                addresses: vec!["fd00::5/64".into()],
                ..ours.clone()
            },
            Link {
                routes: vec![("10.9.0.0/16".into(), "10.0.0.1".into())],
                ..ours.clone()
            },
            Link {
                dns: vec!["10.0.0.1".into()],
                ..ours.clone()
            },
            Link {
                mtu: Some(1400),
                ..ours.clone()
            },
            Link {
                dhcp6: true,
                ..ours.clone()
            },
            Link {
                addresses: vec!["10.0.0.5/40".into()],
                ..ours.clone()
            },
        ] {
            assert!(one(&other).is_none(), "{other:?}");
        }
    }

    #[test]
    fn the_loopback_listener_table_parses() {
        // Whatever listens here, a port nothing listens on has no listeners.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listeners(port).len(), 1);
        drop(l);
        assert!(listeners(port).is_empty());
    }
}
