//! What the agent does to the running kernel and daemons, rather than to
//! files: entropy, block device buffers, the NIC's MAC, the live addresses
//! and routes, sshd's reload. Used when a snapshot clone is personalised
//! (`--clone`) and when the template is prepared (`--template-prep`): the
//! system is already up as another instance, so files alone are not enough.
//! ioctls rather than processes where possible: each exec costs tens of ms
//! under TCG.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use nix::libc;

use crate::Steps;
use crate::network::{Link, Network};

/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool, with credit.
const RNDADDENTROPY: u64 = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: u64 = 0x5207;
/// `_IO(0x12, 97)`: write back and drop a block device's buffers.
const BLKFLSBUF: u64 = 0x1261;
/// Set an interface's hardware address.
const SIOCSIFHWADDR: u64 = 0x8924;

fn ioctl_err(what: &str) -> String {
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
        return Err(ioctl_err("RNDADDENTROPY"));
    }
    // SAFETY: no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(ioctl_err("RNDRESEEDCRNG"));
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
        return Err(ioctl_err(&format!("BLKFLSBUF {}", dev.display())));
    }
    Ok(())
}

/// Page cache, dentries and inodes out: a smaller RAM image to save.
pub fn drop_caches() -> Result<(), String> {
    fs::write("/proc/sys/vm/drop_caches", b"3").map_err(|e| format!("dropping the caches: {e}"))
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
        return Err(ioctl_err(&format!("setting the MAC of {ifname}")));
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

/// How the seed's addresses get onto the live NIC.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NetApply {
    /// Set here (one `ip -batch` process), then networkd reloads the files
    /// and finds its configuration already in place.
    Direct,
    /// networkd reloads the files and reconfigures the link; the agent
    /// waits for the result.
    Networkd,
}

/// Puts the seed's network on the live NICs: the MAC first (the device kept
/// the template's), the template's addresses and routes out, the seed's in,
/// and networkd told to reload the rewritten files. For a static network,
/// returns once the addresses and the default route are in place.
pub fn apply_network(network: &Network, how: NetApply, steps: &mut Steps) -> Result<(), String> {
    let Network::Links(links) = network else {
        // Fallback (DHCP) or disabled: networkd's business, nothing to wait for.
        let _ = run(&["networkctl", "reload"]);
        steps.step("network_dhcp");
        return Ok(());
    };
    let nics = ethernet_interfaces();
    let mut wanted: Wanted = Vec::new();
    let mut batch = String::new();
    for link in links {
        let Some(ifname) = interface_for(link, &nics) else {
            return Err(format!("no interface for the seed's link {}", link.id));
        };
        if let Some(mac) = &link.mac
            && current_mac(&ifname) != mac.to_ascii_lowercase()
        {
            set_mac(&ifname, parse_mac(mac)?)?;
        }
        if !link.dhcp4 {
            let ips: Vec<Ipv4Addr> = link
                .addresses
                .iter()
                .filter_map(|a| a.split('/').next()?.parse().ok())
                .collect();
            let gw = link
                .routes
                .iter()
                .find(|(to, _)| to == "0.0.0.0/0")
                .and_then(|(_, via)| via.parse().ok());
            batch += &format!("addr flush dev {ifname}\n");
            for a in link.addresses.iter().filter(|a| !a.contains(':')) {
                batch += &format!("addr replace {a} dev {ifname}\n");
            }
            for (to, via) in link.routes.iter().filter(|(to, _)| !to.contains(':')) {
                batch += &format!("route replace {to} via {via} dev {ifname}\n");
            }
            wanted.push((ifname, ips, gw, None));
        }
    }
    if how == NetApply::Direct && !batch.is_empty() {
        ip_batch(&batch)?;
        steps.step("network_ip");
    }
    // networkd rewrites (renames) its state file of a link when it has
    // reconfigured it: the inodes before the reload, to see that happen.
    for w in wanted.iter_mut() {
        w.3 = networkd_state(&w.0).map(|(inode, _)| inode);
    }
    run(&["networkctl", "reload"])?;
    steps.step("networkctl");
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

/// `ip -4 -batch -`: one process for every address and route.
fn ip_batch(batch: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Process::new("ip")
        .args(["-4", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running ip: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("ip's stdin")?
        .write_all(batch.as_bytes())
        .map_err(|e| format!("writing to ip: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("running ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip -batch failed ({}): {}; input:\n{batch}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
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
    fn the_loopback_listener_table_parses() {
        // Whatever listens here, a port nothing listens on has no listeners.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listeners(port).len(), 1);
        drop(l);
        assert!(listeners(port).is_empty());
    }
}
