//! Host helpers for tests: unique names, free ports, cleanup guards.
//!
//! Names and resources are reserved with `O_EXCL` files under
//! `/run/webhoster-tests/`, so concurrent test binaries (several engineers,
//! parallel tests) never share a namespace, subnet or port range. Every guard
//! cleans up in `Drop`, so a panicking test leaves nothing behind.

use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use rand::Rng;

const RESERVE_DIR: &str = "/run/webhoster-tests";

/// Reservation files, removed on drop.
#[derive(Debug)]
pub struct Reservation(Vec<PathBuf>);

impl Drop for Reservation {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// Reserve `kind/key` for this process; false if someone else holds it.
fn reserve(kind: &str, key: &str) -> Option<Reservation> {
    let dir = PathBuf::from(RESERVE_DIR);
    fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{kind}-{key}"));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .ok()
        .map(|_| Reservation(vec![path]))
}

/// A short unique name: `prefix` + 6 random base-36 characters + a counter
/// digit (at most prefix + 7 bytes; keep prefixes <= 6 bytes for IFNAMSIZ).
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..6)
        .map(|_| ALPHA[rng.random_range(0..ALPHA.len())] as char)
        .collect();
    let n = N.fetch_add(1, Ordering::Relaxed) % 36;
    format!("{prefix}{tail}{}", ALPHA[n as usize] as char)
}

/// A free TCP port on 127.0.0.1 (the OS picks it; racy only against
/// processes that bind explicit ports).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A /24 in 10.64.0.0/10 not used on the host and reserved for this test.
pub fn unique_subnet() -> (ipnet::Ipv4Net, Reservation) {
    let routes = run("ip", &["-4", "route", "show", "table", "all"]);
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let (b, c) = (rng.random_range(64..128u8), rng.random_range(0..=255u8));
        let net: ipnet::Ipv4Net = format!("10.{b}.{c}.0/24").parse().unwrap();
        if routes.contains(&format!("10.{b}.{c}.")) {
            continue;
        }
        if let Some(r) = reserve("subnet", &format!("10.{b}.{c}.0")) {
            return (net, r);
        }
    }
    panic!("no free test subnet");
}

/// Port ranges are reserved in slots of this many ports.
const PORT_SLOT: u16 = 20;
/// Slots in 20000-31999 (below the kernel's ephemeral range).
const PORT_SLOTS: u16 = 600;

/// A reserved range of `len` SSH ports in 20000-31999, disjoint from every
/// other test's range: it takes whole slots of [`PORT_SLOT`], each reserved.
pub fn unique_port_range(len: u16) -> (RangeInclusive<u16>, Reservation) {
    let slots = len.div_ceil(PORT_SLOT);
    assert!((1..=PORT_SLOTS / 2).contains(&slots), "{len} ports");
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let first = rng.random_range(0..=PORT_SLOTS - slots);
        let lo = 20000 + first * PORT_SLOT;
        let range = lo..=lo + len - 1;
        // Reserve before probing: a probe binds each port for a moment, and
        // must never do that inside a range another test already holds.
        let mut held = Reservation(Vec::new());
        for slot in first..first + slots {
            match reserve("ports", &(20000 + slot * PORT_SLOT).to_string()) {
                Some(mut r) => held.0.append(&mut r.0),
                None => break,
            }
        }
        if held.0.len() == usize::from(slots)
            && range
                .clone()
                .all(|p| webhoster::net::alloc::port_is_free(Ipv4Addr::UNSPECIFIED, p))
        {
            return (range, held);
        }
    }
    panic!("no free test port range of {len}");
}

/// Run a command to completion (stdout/stderr captured).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd} {args:?}: {e}"))
}

/// Run a command and panic with its stderr unless it succeeds; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip netns add <name>`, deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct NetnsGuard(pub String);

impl NetnsGuard {
    pub fn new(name: &str) -> NetnsGuard {
        run_ok("ip", &["netns", "add", name]);
        NetnsGuard(name.to_string())
    }

    /// Run `cmd args` inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.0.as_str(), cmd];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn exec_ok(&self, cmd: &str, args: &[&str]) -> String {
        let out = self.exec(cmd, args);
        assert!(
            out.status.success(),
            "in {}: {cmd} {args:?} failed: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A temporary directory removed on drop.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory")
}

/// Options for a test VM network with its own namespace, subnet and SSH port
/// range; the network is torn down on drop (whatever the test did).
pub struct TestNet {
    pub opts: webhoster::net::NetOptions,
    _subnet: Reservation,
    _ports: Reservation,
}

impl TestNet {
    /// Fresh options; SSH forwards listen on 127.0.0.1 so tests never turn
    /// forwarding on for the host's real interfaces.
    pub fn new() -> TestNet {
        let (subnet, sr) = unique_subnet();
        let (ports, pr) = unique_port_range(8);
        TestNet {
            opts: webhoster::net::NetOptions {
                netns: unique_name("wt"),
                subnet,
                ssh_bind: Ipv4Addr::LOCALHOST,
                ssh_ports: ports,
                egress: None,
                egress_allow: Vec::new(),
            },
            _subnet: sr,
            _ports: pr,
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let opts = self.opts.clone();
        // Drop may run inside a tokio runtime: tear down from a fresh thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            if let Err(e) = rt.block_on(webhoster::net::Network::down(&opts)) {
                eprintln!("teardown of {} failed: {e}", opts.netns);
            }
        })
        .join();
    }
}

/// A "guest": its own namespace joined to the VM bridge by a veth whose
/// bridge end is plugged as an isolated port, exactly like a tap.
pub struct TestGuest {
    pub ns: NetnsGuard,
    pub ip: Ipv4Addr,
    pub port: String,
}

impl TestGuest {
    pub async fn plug(net: &webhoster::net::Network, ip: Ipv4Addr) -> TestGuest {
        let ns = NetnsGuard::new(&unique_name("wg"));
        let port = unique_name("gp");
        let opts = net.options();
        run_ok(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                &ns.0,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &opts.netns,
            ],
        );
        // The port is guarded like a tap: it sends only from eth0's MAC and
        // the guest's address.
        let mac = ns.exec_ok("cat", &["/sys/class/net/eth0/address"]);
        net.plug_port(&port, mac.trim(), ip)
            .await
            .expect("plug the guest port");
        let cidr = format!("{ip}/{}", net.subnet().prefix_len());
        ns.exec_ok("ip", &["addr", "add", &cidr, "dev", "eth0"]);
        ns.exec_ok("ip", &["link", "set", "eth0", "up"]);
        ns.exec_ok("ip", &["link", "set", "lo", "up"]);
        ns.exec_ok(
            "ip",
            &["route", "add", "default", "via", &net.gateway().to_string()],
        );
        TestGuest { ns, ip, port }
    }

    /// Bind a TCP listener inside the guest namespace (the socket stays there).
    pub fn listen(&self, port: u16) -> TcpListener {
        let addr = std::net::SocketAddrV4::new(self.ip, port);
        webhoster::sys::in_netns(&self.ns.path(), move || TcpListener::bind(addr))
            .and_then(|r| r)
            .expect("bind in the guest namespace")
    }

    /// Connect from inside the guest namespace.
    pub fn connect(
        &self,
        to: std::net::SocketAddr,
        timeout: std::time::Duration,
    ) -> std::io::Result<std::net::TcpStream> {
        webhoster::sys::in_netns(&self.ns.path(), move || {
            std::net::TcpStream::connect_timeout(&to, timeout)
        })?
    }

    /// Serve a fixed HTTP 200 body on `ip:80` from a background thread.
    pub fn serve_http(&self, body: &str) {
        let listener = self.listen(80);
        let body = body.to_string();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { break };
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(resp.as_bytes());
            }
        });
    }

    /// Echo every TCP connection on `ip:port` back, from background threads.
    pub fn serve_echo(&self, port: u16) {
        let listener = self.listen(port);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(c) = conn else { break };
                std::thread::spawn(move || {
                    let mut r = c.try_clone().expect("clone");
                    let mut w = c;
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
    }
}

/// GET http://<addr>/ with a plain TCP client; returns the body.
pub fn http_get(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// True when process `pid` no longer runs: there is no such process, or it
/// is a zombie. PID 1 on these machines does not reap re-parented children,
/// so a killed detached QEMU or nginx stays a zombie; a zombie holds no
/// memory, file or socket, so it counts as gone.
pub fn pid_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name, which is in parentheses and
        // may itself hold spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// A stand-in for the outside world behind an egress uplink, that no packet
/// leaves the machine for: a namespace joined to the host by a veth
/// (`uplink`, host side `host_ip`), holding a private address
/// (`private_ip`, in a reserved 10.x /24), a public-looking one
/// (`public_ip`, in 198.18.0.0/15, the benchmarking range) and the cloud
/// metadata address 169.254.169.254. What the host forwards from a VM
/// network's veth (`route_from`) is routed by its own table to here and
/// nowhere else: anything else from that veth is unreachable.
pub struct TestOutside {
    pub ns: NetnsGuard,
    pub uplink: String,
    pub link_net: ipnet::Ipv4Net,
    pub host_ip: Ipv4Addr,
    pub private_ip: Ipv4Addr,
    pub public_ip: Ipv4Addr,
    pub metadata_ip: Ipv4Addr,
    routed: Option<(String, String)>,
    _reserved: Vec<Reservation>,
}

impl TestOutside {
    pub fn new() -> TestOutside {
        let (link_net, r_net) = unique_subnet();
        let mut hosts = link_net.hosts();
        let (host_ip, private_ip) = (hosts.next().unwrap(), hosts.next().unwrap());
        let [_, _, c, _] = link_net.network().octets();
        let public_ip = Ipv4Addr::new(198, 18 + (c & 1), c, 7);
        let ns = NetnsGuard::new(&unique_name("wo"));
        let uplink = unique_name("wu");
        run_ok(
            "ip",
            &[
                "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
            ],
        );
        let out = TestOutside {
            ns,
            uplink,
            link_net,
            host_ip,
            private_ip,
            public_ip,
            metadata_ip: Ipv4Addr::new(169, 254, 169, 254),
            routed: None,
            _reserved: vec![r_net],
        };
        let prefix = link_net.prefix_len();
        run_ok(
            "ip",
            &["addr", "add", &format!("{host_ip}/{prefix}"), "dev", &out.uplink],
        );
        run_ok("ip", &["link", "set", &out.uplink, "up"]);
        for a in [
            format!("{private_ip}/{prefix}"),
            format!("{public_ip}/32"),
            format!("{}/32", out.metadata_ip),
        ] {
            out.ns.exec_ok("ip", &["addr", "add", &a, "dev", "eth0"]);
        }
        out.ns.exec_ok("ip", &["link", "set", "eth0", "up"]);
        out.ns.exec_ok("ip", &["link", "set", "lo", "up"]);
        out
    }

    /// Route what the host forwards from `veth` here only (policy routing
    /// with a table of our own); everything else from it is unreachable.
    pub fn route_from(&mut self, veth: &str) {
        let (table, r) = (0..1000)
            .find_map(|_| {
                // Also the rule's preference: below main's (32766).
                let t: u32 = rand::rng().random_range(20000..32000);
                reserve("rtable", &t.to_string()).map(|r| (t.to_string(), r))
            })
            .expect("a free routing table number");
        self._reserved.push(r);
        let via = self.private_ip.to_string();
        for dest in [self.public_ip, self.metadata_ip] {
            run_ok(
                "ip",
                &[
                    "route",
                    "add",
                    &format!("{dest}/32"),
                    "via",
                    &via,
                    "dev",
                    &self.uplink,
                    "table",
                    &table,
                ],
            );
        }
        run_ok(
            "ip",
            &[
                "route",
                "add",
                &self.link_net.to_string(),
                "dev",
                &self.uplink,
                "table",
                &table,
            ],
        );
        run_ok("ip", &["route", "add", "unreachable", "default", "table", &table]);
        run_ok(
            "ip",
            &["rule", "add", "iif", veth, "lookup", &table, "pref", &table],
        );
        self.routed = Some((veth.to_string(), table));
    }

    /// Accept TCP on every address of the outside namespace on a port of
    /// its own; each connection is logged as (address reached, peer).
    pub fn listen(&self) -> (u16, ConnLog) {
        let listener = webhoster::sys::in_netns(&self.ns.path(), || TcpListener::bind("0.0.0.0:0"))
            .and_then(|r| r)
            .expect("listen in the outside namespace");
        log_connections(listener)
    }
}

/// (address reached, peer) of each connection a listener accepted.
pub type ConnLog = std::sync::Arc<std::sync::Mutex<Vec<(Ipv4Addr, Ipv4Addr)>>>;

/// Accept connections on `listener` from a background thread, logging
/// (local address, peer address) of each.
pub fn log_connections(listener: TcpListener) -> (u16, ConnLog) {
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            if let (Ok(std::net::SocketAddr::V4(l)), Ok(std::net::SocketAddr::V4(p))) =
                (c.local_addr(), c.peer_addr())
            {
                log.lock().unwrap().push((*l.ip(), *p.ip()));
            }
        }
    });
    (port, seen)
}

impl Drop for TestOutside {
    fn drop(&mut self) {
        if let Some((veth, table)) = self.routed.take() {
            let _ = run(
                "ip",
                &["rule", "del", "iif", &veth, "lookup", &table, "pref", &table],
            );
            let _ = run("ip", &["route", "flush", "table", &table]);
        }
        let _ = run("ip", &["link", "del", &self.uplink]);
    }
}
