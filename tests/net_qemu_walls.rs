//! Tenant isolation with real guests (TCG): two Debian guests on guarded
//! taps of a real `Network` with egress on. From inside guest A, as root,
//! the test puts B's address on A's NIC and runs `common/forge.py` (the
//! image's own python3): gratuitous and unicast ARP for B's address, frames
//! from B's MAC, packets from B's address, a DHCP server answer, a
//! VLAN-tagged frame and an IPv6 router advertisement. Meanwhile and after,
//! from the host, B's page (through the namespace route) and B's SSH host
//! key (through its forward and directly) must stay B's, A's page A's, and
//! the namespace must have learned nothing. Then A tries to reach the host
//! and the metadata address through egress.
//!
//! One pair of guests for every check: a boot costs 30-40 s of TCG each.
//! Needs the guest image in the cache (`make test` builds it first).

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::guest::{TestKey, ssh, test_image};
use common::host::{TestNet, TestOutside, http_get, log_connections, run, run_ok, temp_dir, unique_name};
use common::tap_guest::{TapVm, boot, wait_http};
use common::walls::{FORGE_PORT, Forge, UdpLog};
use webhoster::net::{Network, alloc, netns};

/// The ed25519 host key `ssh-keyscan` reads from `host:port`, if any.
fn host_key(host: &str, port: u16) -> Option<String> {
    let out = run(
        "ssh-keyscan",
        &["-T", "5", "-t", "ed25519", "-p", &port.to_string(), host],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().nth(2))
        .map(str::to_string)
}

fn page(vm: &TapVm) -> String {
    http_get(SocketAddr::from((vm.ip, 80))).unwrap_or_else(|e| format!("error: {e}"))
}

fn until<T>(what: &str, deadline: Instant, mut f: impl FnMut() -> Option<T>) -> T {
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[tokio::test]
async fn a_root_guest_cannot_be_its_neighbour_nor_reach_the_host() {
    let started = Instant::now();
    let img = test_image();
    let mut outside = TestOutside::new();
    let (out_port, out_seen) = outside.listen();
    let (host_port, host_seen) = log_connections(TcpListener::bind("0.0.0.0:0").unwrap());
    let mut t = TestNet::new();
    t.opts.egress = Some(outside.uplink.clone());
    let net = Network::up(t.opts.clone()).await.expect("up");
    outside.route_from(&t.opts.netns);
    let ns = t.opts.netns.clone();
    let dir = temp_dir("wh-walls-");
    let key = Arc::new(TestKey::new());

    let mut ips = alloc::guest_ips(net.subnet());
    let (id_a, id_b) = (unique_name("wa"), unique_name("wb"));
    let a = boot(
        &net,
        &img,
        dir.path(),
        &id_a,
        ips.next().unwrap(),
        key.public_line(),
    )
    .await;
    let b = boot(
        &net,
        &img,
        dir.path(),
        &id_b,
        ips.next().unwrap(),
        key.public_line(),
    )
    .await;
    let (port_a, port_b) = (*t.opts.ssh_ports.start(), *t.opts.ssh_ports.start() + 1);
    net.add_forward(&id_a, port_a, a.ip).await.expect("forward A");
    net.add_forward(&id_b, port_b, b.ip).await.expect("forward B");

    // TCG on a shared 2-core machine: generous, bounded.
    let deadline = Instant::now() + Duration::from_secs(420);
    let (page_a, page_b) = (wait_http(&a, deadline), wait_http(&b, deadline));
    let (owner_a, owner_b) = (format!("owner-{id_a}"), format!("owner-{id_b}"));
    assert!(page_a.contains(&owner_a), "A's page: {page_a}");
    assert!(page_b.contains(&owner_b), "B's page: {page_b}");
    until("SSH into A", deadline, || {
        ssh("127.0.0.1", port_a, "ubuntu", &key, "true")
            .status
            .success()
            .then_some(())
    });
    // SSH answers before the guest's boot is over, and the rest of it
    // (tmpfiles clearing /tmp, where the forger goes) must not run under the
    // test. As root: systemctl then reaches PID 1 without D-Bus, which
    // starts late in the boot.
    for port in [port_a, port_b] {
        let boot = ssh(
            "127.0.0.1",
            port,
            "ubuntu",
            &key,
            "sudo -n timeout 180 systemctl is-system-running --wait",
        );
        let state = String::from_utf8_lossy(&boot.stdout);
        assert!(
            state.contains("running") || state.contains("degraded"),
            "boot of the guest behind :{port}: {state}"
        );
    }
    let key_b = until("B's host key", deadline, || host_key("127.0.0.1", port_b));
    let key_a = until("A's host key", deadline, || host_key("127.0.0.1", port_a));
    assert_ne!(key_a, key_b);
    assert_eq!(host_key(&b.ip.to_string(), 22).as_deref(), Some(key_b.as_str()));
    eprintln!("guests up after {:?}", started.elapsed());

    // The attack, from inside A as root.
    let gw_mac = common::walls::mac_of(&ns, "br0");
    let rounds = 16;
    let forge = Forge {
        iface: "eth0",
        my_ip: a.ip,
        gateway: net.gateway(),
        gateway_mac: &gw_mac,
        victim_ip: b.ip,
        victim_mac: &b.mac,
        rounds,
    };
    let ns_path = netns::path(&ns);
    let to_gateway = UdpLog::bind(&ns_path, SocketAddrV4::new(net.gateway(), FORGE_PORT));
    let dhcp = UdpLog::bind(&ns_path, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68));
    let ipv6_drops = common::walls::guard_ipv6_drops(&ns);
    let cmd = format!(
        "sudo ip addr add {b}/32 dev eth0 && ip -4 -o addr show dev eth0 && {}",
        forge.guest_command(),
        b = b.ip
    );
    let attacker = {
        let key = key.clone();
        std::thread::spawn(move || ssh("127.0.0.1", port_a, "ubuntu", &key, &cmd))
    };
    // While it runs, and a little after: pages and B's key stay theirs.
    let mut seen = Vec::new();
    let mut after = 0;
    while after < 4 {
        if attacker.is_finished() {
            after += 1;
        }
        seen.push((page(&b), page(&a), host_key("127.0.0.1", port_b)));
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = attacker.join().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the attack did not run: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("inet {}/32", b.ip)),
        "A holds B's address: {said}"
    );
    assert!(said.contains(&format!("sent ra {rounds}")), "{said}");
    eprintln!("attack done after {:?} ({} looks)", started.elapsed(), seen.len());

    // A look that got no key at all (ssh-keyscan's 5 s on a loaded host)
    // proves nothing either way; any other key is A answering as B, and
    // too few keys would be B made unreachable.
    let wrong: Vec<_> = seen
        .iter()
        .filter(|(pb, pa, kb)| {
            !pb.contains(&owner_b) || !pa.contains(&owner_a) || kb.as_ref().is_some_and(|k| *k != key_b)
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "during the attack (B's page, A's page, B's key via forward), B's key is {key_b}: {wrong:#?}"
    );
    let keys = seen.iter().filter(|(_, _, kb)| kb.is_some()).count();
    assert!(
        keys * 2 >= seen.len(),
        "B's SSH answered {keys} of {} looks",
        seen.len()
    );
    let b_ip = b.ip.to_string();
    let direct = until("B's host key, directly", deadline, || host_key(&b_ip, 22));
    assert_eq!(direct, key_b, "B's host key, directly on {b_ip}:22");
    let n = common::walls::neighbour(&ns, b.ip);
    assert!(
        n.contains(&format!("lladdr {}", b.mac)) && n.contains("PERMANENT"),
        "the namespace's entry for B: {n:?} (A is {})",
        a.mac
    );
    let fdb = common::walls::fdb(&ns, &a.tap);
    assert!(
        !fdb.contains(&b.mac),
        "the bridge learned B's MAC on A's port: {fdb}"
    );
    assert!(
        to_gateway.payloads().iter().any(|p| p == "legit"),
        "A's own packets must pass: {:?}",
        to_gateway.seen()
    );
    let forged: Vec<_> = to_gateway
        .seen()
        .into_iter()
        .filter(|(_, p)| p != "legit")
        .collect();
    assert!(forged.is_empty(), "forged packets arrived: {forged:?}");
    assert!(
        dhcp.seen().is_empty(),
        "a DHCP server answer arrived: {:?}",
        dhcp.seen()
    );
    let v6 = common::walls::ipv6_state(&ns);
    assert!(
        !v6.contains("2001:db8") && !v6.contains("default"),
        "the namespace learned IPv6 from a guest: {v6}"
    );
    assert!(
        common::walls::guard_ipv6_drops(&ns) >= ipv6_drops + u64::from(rounds),
        "the guard's IPv6 counter did not count the router advertisements"
    );

    // Egress from A (B's address off its NIC again): the outside world
    // only; not the host on any address, not metadata, not a private range,
    // not B.
    let mut host_addrs = vec![net.host_address(), outside.host_ip];
    for line in run_ok("ip", &["-4", "-o", "addr", "show", "scope", "global"]).lines() {
        if let Some(a) = line.split_whitespace().nth(3).and_then(|a| a.split('/').next()) {
            host_addrs.push(a.parse().unwrap());
        }
    }
    host_addrs.sort();
    host_addrs.dedup();
    let mut want: Vec<(String, bool)> = vec![
        ("127.0.0.1:80".into(), true),
        (format!("{}:{out_port}", outside.public_ip), true),
        (format!("{}:{out_port}", outside.private_ip), false),
        (format!("{}:{out_port}", outside.metadata_ip), false),
        (format!("{}:80", b.ip), false),
        (format!("{}:22", b.ip), false),
    ];
    want.extend(host_addrs.iter().map(|h| (format!("{h}:{host_port}"), false)));
    let targets: Vec<&str> = want.iter().map(|(t, _)| t.as_str()).collect();
    let probe = format!(
        "sudo ip addr del {b}/32 dev eth0; for t in {}; do \
           ( if timeout 5 bash -c \"exec 3<>/dev/tcp/${{t%:*}}/${{t#*:}}\" 2>/dev/null; \
             then echo \"REACH $t\"; else echo \"BLOCK $t\"; fi ) & done; wait",
        targets.join(" "),
        b = b.ip
    );
    let out = ssh("127.0.0.1", port_a, "ubuntu", &key, &probe);
    let said = String::from_utf8_lossy(&out.stdout);
    let got: Vec<(String, bool)> = want
        .iter()
        .map(|(t, _)| (t.clone(), said.contains(&format!("REACH {t}\n"))))
        .collect();
    assert_eq!(got, want, "egress from A: {said}");
    assert!(host_seen.lock().unwrap().is_empty(), "the host was reached");
    assert_eq!(
        out_seen.lock().unwrap().as_slice(),
        &[(outside.public_ip, outside.host_ip)],
        "only the public address, masqueraded"
    );
    eprintln!("done after {:?}", started.elapsed());

    drop((a, b));
    net.delete_tap(&id_a).await.unwrap();
    net.delete_tap(&id_b).await.unwrap();
}
