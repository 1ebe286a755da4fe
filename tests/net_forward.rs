//! SSH forwards (kernel DNAT) and taps against the real kernel (root): a TCP
//! echo and a real sshd session through 127.0.0.1:<port>, both surviving a
//! restart of the forward owner; taps plugged, opened, reclaimed.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::host::{ChildGuard, TestGuest, TestNet, run_ok, temp_dir};
use webhoster::net::{NetError, Network, alloc, tap_name};

fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}

#[tokio::test]
async fn forward_from_loopback_survives_a_restart_of_its_owner() {
    let t = TestNet::new();
    let o = t.opts.clone();
    let net = Network::up(o.clone()).await.expect("up");
    let guest = TestGuest::plug(&net, alloc::guest_ips(net.subnet()).nth(3).unwrap()).await;
    guest.serve_echo(22);
    let port = *o.ssh_ports.start();

    assert!(net.port_available(port).await.unwrap());
    net.add_forward("vm-echo", port, guest.ip)
        .await
        .expect("add forward");
    net.add_forward("vm-echo", port, guest.ip)
        .await
        .expect("same forward again");
    assert!(
        !net.port_available(port).await.unwrap(),
        "a forwarded port must count as taken"
    );
    let err = net.add_forward("vm-other", port, guest.ip).await.unwrap_err();
    assert!(matches!(err, NetError::PortInUse { .. }), "{err}");
    let err = net
        .add_forward("vm-x", *o.ssh_ports.end() + 1, guest.ip)
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::PortOutOfRange { .. }), "{err}");
    let err = net
        .add_forward("vm-x", port + 1, net.gateway())
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::NotAGuestAddress { .. }), "{err}");

    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect via forward");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_roundtrip(&mut conn, b"before restart\n");

    // "Restart" the owner: drop every handle, bring it up again.
    drop(net);
    let net = Network::up(o.clone()).await.expect("up again");
    echo_roundtrip(&mut conn, b"after restart\n");
    let mut fresh = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("new connection");
    fresh.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_roundtrip(&mut fresh, b"new one\n");

    // A held port is refused.
    let held = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).unwrap();
    let err = net.add_forward("vm-held", port + 1, guest.ip).await.unwrap_err();
    assert!(matches!(err, NetError::PortInUse { .. }), "{err}");
    drop(held);

    // Moving a VM's forward to another port replaces it.
    net.add_forward("vm-echo", port + 2, guest.ip).await.unwrap();
    let fw = net.forwards().await.unwrap();
    assert_eq!(fw.len(), 1, "{fw:?}");
    assert_eq!(fw[0].port, port + 2);

    net.remove_forward("vm-echo").await.unwrap();
    assert!(net.forwards().await.unwrap().is_empty());
    assert!(TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_err());
    net.remove_forward("vm-echo")
        .await
        .expect("removing twice is fine");
}

#[tokio::test]
async fn taps_are_isolated_bridge_ports_opened_by_fd_and_reclaimed() {
    let t = TestNet::new();
    let o = t.opts.clone();
    let net = Network::up(o.clone()).await.expect("up");
    let name = tap_name("vm-tap-1");
    assert!(name.len() <= 15);
    let mut ips = alloc::guest_ips(net.subnet());
    let (ip1, ip2) = (ips.next().unwrap(), ips.next().unwrap());
    let mac1 = alloc::mac_for("vm-tap-1");
    assert_eq!(net.create_tap("vm-tap-1", &mac1, ip1).await.unwrap(), name);
    assert_eq!(
        net.create_tap("vm-tap-1", &mac1, ip1).await.unwrap(),
        name,
        "idempotent"
    );

    let detail = run_ok(
        "ip",
        &[
            "netns", "exec", &o.netns, "ip", "-d", "link", "show", "dev", &name,
        ],
    );
    assert!(detail.contains("master br0"), "{detail}");
    assert!(detail.contains("isolated on"), "{detail}");
    assert!(
        detail.contains("tun type tap") && detail.contains("persist"),
        "{detail}"
    );
    assert!(detail.contains("vnet_hdr on"), "{detail}");
    // Not on the host.
    assert!(!run_ok("ip", &["link"]).contains(&name));

    let fd = net.open_tap(&name).expect("open tap");
    drop(fd);
    let fd2 = net.open_tap(&name).expect("open tap again");
    assert!(
        net.open_tap("whvnonexistent").is_err(),
        "open must not create taps"
    );
    drop(fd2);

    // A tap left with no VM behind it (a crash) and a stale forward are reclaimed.
    net.create_tap("vm-orphan", &alloc::mac_for("vm-orphan"), ip2)
        .await
        .unwrap();
    net.add_forward("vm-orphan", *o.ssh_ports.start(), ip2)
        .await
        .unwrap();
    let keep: HashSet<String> = ["vm-tap-1".to_string()].into();
    let r = net.reclaim(&keep).await.unwrap();
    assert_eq!(r.taps, vec![tap_name("vm-orphan")]);
    assert_eq!(r.forwards.len(), 1);
    assert_eq!(net.taps().await.unwrap(), vec![name.clone()]);
    assert!(net.forwards().await.unwrap().is_empty());
    // The orphan's guard went with it; the kept tap's is whole.
    let guards = net.guards().await.unwrap();
    assert_eq!(guards, [(name.clone(), true)].into_iter().collect());

    net.delete_tap("vm-tap-1").await.unwrap();
    net.delete_tap("vm-tap-1").await.expect("deleting twice is fine");
    assert!(net.taps().await.unwrap().is_empty());
    assert!(
        net.guards().await.unwrap().is_empty(),
        "the guard goes with its tap"
    );
    let neigh = run_ok("ip", &["-n", &o.netns, "neigh", "show", "dev", "br0"]);
    assert!(!neigh.contains(&ip1.to_string()), "{neigh}");
}

/// A real sshd inside the guest namespace, with its own host key and one
/// authorized key; the client logs in through 127.0.0.1:<forwarded port>.
struct Sshd {
    _child: ChildGuard,
    _dir: tempfile::TempDir,
    key: std::path::PathBuf,
}

fn start_sshd(guest: &TestGuest) -> Sshd {
    let dir = temp_dir("wh-sshd-");
    let d = dir.path();
    let hostkey = d.join("host_ed25519");
    let key = d.join("client_ed25519");
    run_ok(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-f", hostkey.to_str().unwrap()],
    );
    run_ok(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-f", key.to_str().unwrap()],
    );
    let auth = d.join("authorized_keys");
    std::fs::copy(d.join("client_ed25519.pub"), &auth).unwrap();
    let cfg = d.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port 22\nListenAddress {ip}\nHostKey {hk}\nAuthorizedKeysFile {auth}\nPidFile {pid}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\n",
            ip = guest.ip,
            hk = hostkey.display(),
            auth = auth.display(),
            pid = d.join("sshd.pid").display(),
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &guest.ns.0, "/usr/sbin/sshd", "-D", "-e", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sshd");
    let child = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while guest
        .connect(SocketAddr::from((guest.ip, 22)), Duration::from_millis(500))
        .is_err()
    {
        assert!(Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Sshd {
        _child: child,
        _dir: dir,
        key,
    }
}

fn ssh_cmd(key: &std::path::Path, port: u16) -> Command {
    let mut c = Command::new("ssh");
    c.args(common::guest::ssh_key_opts(key))
        .args(["-p", &port.to_string(), "root@127.0.0.1"]);
    c
}

#[tokio::test]
async fn real_ssh_session_through_the_forward_survives_a_restart() {
    if !std::path::Path::new("/usr/sbin/sshd").exists() {
        panic!("openssh-server is required for this test (apt-get install openssh-server)");
    }
    let t = TestNet::new();
    let o = t.opts.clone();
    let net = Network::up(o.clone()).await.expect("up");
    let guest = TestGuest::plug(&net, alloc::guest_ips(net.subnet()).nth(7).unwrap()).await;
    let sshd = start_sshd(&guest);
    let port = *o.ssh_ports.start() + 3;
    net.add_forward("vm-ssh", port, guest.ip).await.unwrap();

    // One-shot command: the session really is inside the guest namespace.
    let out = ssh_cmd(&sshd.key, port)
        .arg("ip -4 -o addr show dev eth0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&guest.ip.to_string()));

    // A long session: `cat` echoes lines; it survives the owner's restart.
    let mut session = ssh_cmd(&sshd.key, port)
        .arg("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = session.stdin.take().unwrap();
    let mut lines = BufReader::new(session.stdout.take().unwrap()).lines();
    let mut session = ChildGuard(session);
    writeln!(stdin, "line one").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "line one");

    drop(net);
    let net = Network::up(o.clone()).await.expect("restart");
    writeln!(stdin, "line two").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "line two");
    drop(stdin);
    assert!(session.0.wait().unwrap().success());
    net.remove_forward("vm-ssh").await.unwrap();
}

#[tokio::test]
async fn forward_from_outside_is_dnat_and_forwarded_but_guests_are_not_routed_to() {
    // An "outside" client: its own namespace on a veth to the host, the host
    // end carrying the SSH bind address.
    let (link_net, _r) = common::host::unique_subnet();
    let hosts: Vec<Ipv4Addr> = link_net.hosts().take(2).collect();
    let (host_ip, client_ip) = (hosts[0], hosts[1]);
    let client = common::host::NetnsGuard::new(&common::host::unique_name("wc"));
    let host_if = common::host::unique_name("wx");
    run_ok(
        "ip",
        &[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &client.0,
        ],
    );
    struct DelLink(String);
    impl Drop for DelLink {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let _del = DelLink(host_if.clone());
    run_ok("ip", &["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
    run_ok("ip", &["link", "set", &host_if, "up"]);
    client.exec_ok("ip", &["addr", "add", &format!("{client_ip}/24"), "dev", "eth0"]);
    client.exec_ok("ip", &["link", "set", "eth0", "up"]);

    let mut t = TestNet::new();
    t.opts.ssh_bind = host_ip;
    let o = t.opts.clone();
    let fwd_key = format!("/proc/sys/net/ipv4/conf/{host_if}/forwarding");
    assert_eq!(std::fs::read_to_string(&fwd_key).unwrap().trim(), "0");
    let net = Network::up(o.clone()).await.expect("up");
    assert_eq!(std::fs::read_to_string(&fwd_key).unwrap().trim(), "1");
    let guest = TestGuest::plug(&net, alloc::guest_ips(net.subnet()).nth(1).unwrap()).await;
    guest.serve_echo(22);
    let port = *o.ssh_ports.start();
    net.add_forward("vm-out", port, guest.ip).await.unwrap();

    let path = client.path();
    let to = SocketAddr::from((host_ip, port));
    let mut conn = webhoster::sys::in_netns(&path, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5))
    })
    .unwrap()
    .expect("outside client through the forward");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_roundtrip(&mut conn, b"from outside\n");

    // Routing straight to a guest through the host is refused.
    client.exec_ok(
        "ip",
        &["route", "add", &o.subnet.to_string(), "via", &host_ip.to_string()],
    );
    let direct = SocketAddr::from((guest.ip, 22));
    let r = webhoster::sys::in_netns(&path, move || {
        TcpStream::connect_timeout(&direct, Duration::from_secs(2))
    })
    .unwrap();
    assert!(
        r.is_err(),
        "an outside client reached a guest without the forward"
    );

    drop(conn);
    drop(net);
    Network::down(&o).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&fwd_key).unwrap().trim(),
        "0",
        "down must restore the forwarding it turned on"
    );
}
