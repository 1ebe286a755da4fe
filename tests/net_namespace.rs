//! The VM network against the real kernel (root): namespace, bridge, veth,
//! routes and nftables, set up twice, checked, and torn down completely.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::host::{TestGuest, TestNet, run, run_ok, unique_name};
use webhoster::net::{NetError, NetOptions, Network, netns, nft};

fn host_has_table(table: &str) -> bool {
    run_ok("nft", &["list", "tables"])
        .lines()
        .any(|l| l.trim() == format!("table ip {table}"))
}

#[tokio::test]
async fn up_is_idempotent_and_down_removes_everything() {
    let t = TestNet::new();
    let o = t.opts.clone();
    let net = Network::up(o.clone()).await.expect("first up");
    let snapshot = || {
        (
            run_ok("ip", &["-o", "addr", "show", "dev", &o.netns]),
            run_ok("ip", &["route", "show", &o.subnet.to_string()]),
            run_ok("ip", &["netns", "exec", &o.netns, "ip", "-o", "addr"]),
            run_ok("ip", &["netns", "exec", &o.netns, "ip", "route"]),
            run_ok("nft", &["list", "table", "ip", &o.table()]),
            run_ok("ip", &["netns", "exec", &o.netns, "nft", "list", "ruleset"]),
        )
    };
    let first = snapshot();
    assert!(
        first.1.contains(&format!("dev {}", o.netns)),
        "host route: {}",
        first.1
    );
    assert!(
        first
            .2
            .contains(&format!("{}/{}", net.gateway(), o.subnet.prefix_len()))
    );
    drop(net);

    let net = Network::up(o.clone()).await.expect("second up");
    assert_eq!(snapshot(), first, "a second up changed something");
    assert_eq!(
        run_ok(
            "ip",
            &["netns", "exec", &o.netns, "cat", "/proc/sys/net/ipv4/ip_forward"]
        )
        .trim(),
        "1"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{}/route_localnet", o.netns))
            .unwrap()
            .trim(),
        "1"
    );

    // The host reaches the gateway through the route.
    // (Refused = the gateway answered with a reset: it is reachable.)
    let e =
        std::net::TcpStream::connect_timeout(&SocketAddr::from((net.gateway(), 80)), Duration::from_secs(3))
            .unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "host -> gateway: {e}"
    );

    Network::down(&o).await.expect("down");
    assert!(!netns::exists(&o.netns));
    assert!(!run_ok("ip", &["netns", "list"]).contains(&o.netns));
    assert!(!run("ip", &["link", "show", "dev", &o.netns]).status.success());
    assert!(!run_ok("ip", &["route"]).contains(&o.subnet.network().to_string()));
    assert!(!host_has_table(&o.table()));
    // Down twice is fine.
    Network::down(&o).await.expect("second down");
}

#[tokio::test]
async fn bad_input_fails_before_anything_is_created() {
    // Too long a name.
    let mut o = TestNet::new().opts.clone();
    o.netns = "a-name-longer-than-15".into();
    assert!(matches!(Network::up(o).await, Err(NetError::BadNetnsName { .. })));

    let a = TestNet::new();
    let _net_a = Network::up(a.opts.clone()).await.expect("up A");

    // A subnet overlapping A's (a route on the host).
    let b = TestNet::new();
    let mut ob = b.opts.clone();
    ob.subnet = format!("{}/25", a.opts.subnet.network()).parse().unwrap();
    let err = Network::up(ob.clone()).await.unwrap_err();
    assert!(matches!(err, NetError::SubnetOverlap { .. }), "{err}");
    assert!(!netns::exists(&ob.netns), "namespace created despite the error");

    // A port range overlapping A's.
    let mut ob = b.opts.clone();
    ob.ssh_ports = *a.opts.ssh_ports.start()..=*a.opts.ssh_ports.start();
    let err = Network::up(ob.clone()).await.unwrap_err();
    assert!(matches!(err, NetError::BadPortRange { .. }), "{err}");
    assert!(!netns::exists(&ob.netns));

    // A port range inside the kernel's ephemeral range.
    let mut ob = b.opts.clone();
    ob.ssh_ports = 40000..=40010;
    assert!(matches!(
        Network::up(ob.clone()).await,
        Err(NetError::BadPortRange { .. })
    ));

    // A port range entirely held by someone else.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ob = b.opts.clone();
    let p = held.local_addr().unwrap().port();
    if p < 32768 {
        ob.ssh_ports = p..=p;
        assert!(matches!(
            Network::up(ob.clone()).await,
            Err(NetError::BadPortRange { .. })
        ));
    }

    // An existing host interface of that name that is not ours.
    let mut ob = b.opts.clone();
    ob.netns = unique_name("wd");
    run_ok("ip", &["link", "add", &ob.netns, "type", "bridge"]);
    let err = Network::up(ob.clone()).await.unwrap_err();
    run_ok("ip", &["link", "del", &ob.netns]);
    assert!(matches!(err, NetError::ForeignInterface { .. }), "{err}");
    assert!(!netns::exists(&ob.netns));
    assert!(!host_has_table(&nft::host_table(&ob.netns)));
}

#[tokio::test]
async fn host_reaches_each_guest_and_guests_cannot_reach_each_other() {
    let t = TestNet::new();
    let net = Network::up(t.opts.clone()).await.expect("up");
    let mut ips = webhoster::net::alloc::guest_ips(net.subnet());
    let a = TestGuest::plug(&net, ips.next().unwrap()).await;
    let b = TestGuest::plug(&net, ips.next().unwrap()).await;
    a.serve_http("guest A");
    b.serve_http("guest B");

    // Host -> each guest's :80 through the route.
    let body = common::host::http_get(SocketAddr::from((a.ip, 80))).expect("GET A");
    assert_eq!(body, "guest A");
    let body = common::host::http_get(SocketAddr::from((b.ip, 80))).expect("GET B");
    assert_eq!(body, "guest B");

    // The port is an isolated bridge port.
    let detail = run_ok(
        "ip",
        &[
            "netns",
            "exec",
            &t.opts.netns,
            "ip",
            "-d",
            "link",
            "show",
            "dev",
            &a.port,
        ],
    );
    assert!(detail.contains("isolated on"), "{detail}");

    // A reaches the gateway (connection refused = it answered) ...
    let gw = SocketAddr::from((net.gateway(), 80));
    let e = a.connect(gw, Duration::from_secs(3)).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "A -> gateway: {e}"
    );
    // ... but never B, neither on the bridge nor routed through the gateway.
    let r = a.connect(SocketAddr::from((b.ip, 80)), Duration::from_secs(3));
    assert!(r.is_err(), "guest A reached guest B");
    let r = b.connect(SocketAddr::from((a.ip, 80)), Duration::from_secs(3));
    assert!(r.is_err(), "guest B reached guest A");
    // And no egress: the host side of the veth is not reachable from guests.
    let probe = std::net::TcpListener::bind(SocketAddr::from((net.host_address(), 0))).unwrap();
    let r = a.connect(probe.local_addr().unwrap(), Duration::from_secs(2));
    assert!(r.is_err(), "guest A reached the host through the namespace");
    let _ = Ipv4Addr::LOCALHOST;
}

#[tokio::test]
async fn network_is_rebuilt_after_namespace_loss() {
    // Like a host reboot: the namespace (and with it the veth) disappears,
    // the host table stays stale; up rebuilds and keeps the forwards.
    let t = TestNet::new();
    let o: NetOptions = t.opts.clone();
    let net = Network::up(o.clone()).await.expect("up");
    let ip = webhoster::net::alloc::guest_ips(net.subnet()).next().unwrap();
    net.add_forward("vm-reboot", *o.ssh_ports.start(), ip)
        .await
        .unwrap();
    drop(net);
    netns::delete(&o.netns).unwrap();
    // The kernel destroys the veth pair with the namespace, asynchronously.
    for _ in 0..50 {
        if !run("ip", &["link", "show", "dev", &o.netns]).status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let net = Network::up(o.clone()).await.expect("up after loss");
    assert_eq!(net.forwards().await.unwrap().len(), 1);
    assert!(run_ok("ip", &["route", "show", &o.subnet.to_string()]).contains(&o.netns));
}

#[tokio::test]
async fn cli_and_operator_script_build_show_and_tear_down() {
    let t = TestNet::new();
    let o = t.opts.clone();
    let ports = format!("{}-{}", o.ssh_ports.start(), o.ssh_ports.end());
    let subnet = o.subnet.to_string();
    let args = |cmd: &str| -> Vec<String> {
        [
            "net",
            cmd,
            "--netns",
            &o.netns,
            "--subnet",
            &subnet,
            "--ssh-bind",
            "127.0.0.1",
            "--ssh-ports",
            &ports,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let bin = env!("CARGO_BIN_EXE_webhoster");
    let webhoster = |cmd: &str| {
        let out = std::process::Command::new(bin)
            .args(args(cmd))
            .env("WEBHOSTER_STATE_DIR", "/nonexistent-unused")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "net {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    webhoster("up");
    webhoster("up");
    let show = webhoster("show");
    let attached = Network::attach(o.clone()).await.expect("attach");
    assert_eq!(attached.gateway(), webhoster::net::alloc::gateway(o.subnet));
    drop(attached);
    assert!(
        show.contains(&format!("gateway {}", webhoster::net::alloc::gateway(o.subnet))),
        "{show}"
    );
    let script = run_ok(
        "sh",
        &[concat!(env!("CARGO_MANIFEST_DIR"), "/netns/show.sh"), &o.netns],
    );
    assert!(script.contains("isolated") || script.contains("br0"), "{script}");
    assert!(script.contains(&format!("table ip {}", o.table())), "{script}");

    // The operator script removes everything by name.
    run_ok(
        "sh",
        &[concat!(env!("CARGO_MANIFEST_DIR"), "/netns/down.sh"), &o.netns],
    );
    assert!(!netns::exists(&o.netns));
    assert!(!run("ip", &["link", "show", "dev", &o.netns]).status.success());
    assert!(!host_has_table(&o.table()));
    run_ok(
        "sh",
        &[concat!(env!("CARGO_MANIFEST_DIR"), "/netns/down.sh"), &o.netns],
    );

    // And `net down` does too.
    webhoster("up");
    webhoster("down");
    assert!(!netns::exists(&o.netns));
    assert!(!run("ip", &["link", "show", "dev", &o.netns]).status.success());
    assert!(!host_has_table(&o.table()));
    assert!(!run_ok("nft", &["list", "ruleset"]).contains(&o.netns));
}

/// What a guest reaches through the namespace: `addr` -> reached?
fn reach(guest: &TestGuest, targets: &[SocketAddr]) -> Vec<(SocketAddr, bool)> {
    // In parallel: every blocked target costs the whole timeout.
    std::thread::scope(|s| {
        let probes: Vec<_> = targets
            .iter()
            .map(|t| s.spawn(move || (*t, guest.connect(*t, Duration::from_secs(2)).is_ok())))
            .collect();
        probes.into_iter().map(|p| p.join().unwrap()).collect()
    })
}

#[tokio::test]
async fn egress_is_off_by_default_and_reaches_the_outside_world_only() {
    // The "outside" is a namespace behind a veth uplink, and the host routes
    // what comes from our veth there only: no packet leaves the machine.
    let mut outside = common::host::TestOutside::new();
    let (port, seen) = outside.listen();
    let (public, private, metadata) = (
        SocketAddr::from((outside.public_ip, port)),
        SocketAddr::from((outside.private_ip, port)),
        SocketAddr::from((outside.metadata_ip, port)),
    );
    // A listener on every host address, for "never the host itself".
    let (host_port, host_seen) =
        common::host::log_connections(std::net::TcpListener::bind("0.0.0.0:0").unwrap());

    let mut t = TestNet::new();
    let net = Network::up(t.opts.clone()).await.expect("up without egress");
    outside.route_from(&t.opts.netns);
    let mut ips = webhoster::net::alloc::guest_ips(net.subnet());
    let guest = TestGuest::plug(&net, ips.next().unwrap()).await;
    let other = TestGuest::plug(&net, ips.next().unwrap()).await;
    other.serve_http("the other guest");
    assert_eq!(
        reach(&guest, &[public, private, metadata]),
        [(public, false), (private, false), (metadata, false)],
        "a guest got out without --egress"
    );
    drop(net);

    t.opts.egress = Some(outside.uplink.clone());
    let fwd_key = format!("/proc/sys/net/ipv4/conf/{}/forwarding", outside.uplink);
    let net = Network::up(t.opts.clone()).await.expect("up with egress");
    assert_eq!(std::fs::read_to_string(&fwd_key).unwrap().trim(), "1");
    let mut host_addrs: Vec<Ipv4Addr> = vec![net.host_address(), outside.host_ip];
    for line in run_ok("ip", &["-4", "-o", "addr", "show", "scope", "global"]).lines() {
        if let Some(a) = line.split_whitespace().nth(3).and_then(|a| a.split('/').next()) {
            host_addrs.push(a.parse().unwrap());
        }
    }
    host_addrs.sort();
    host_addrs.dedup();
    let host_targets: Vec<SocketAddr> = host_addrs
        .iter()
        .map(|a| SocketAddr::from((*a, host_port)))
        .collect();
    let mut targets = vec![public, private, metadata, SocketAddr::from((other.ip, 80))];
    targets.extend(&host_targets);
    let got = reach(&guest, &targets);
    let mut want = vec![(public, true), (private, false), (metadata, false)];
    want.push((SocketAddr::from((other.ip, 80)), false));
    want.extend(host_targets.iter().map(|t| (*t, false)));
    assert_eq!(
        got, want,
        "with --egress a guest reaches public addresses only: not private ranges, not \
         169.254.169.254, not another guest, not the host's own addresses"
    );
    assert!(host_seen.lock().unwrap().is_empty(), "the host was reached");
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        &[(outside.public_ip, outside.host_ip)],
        "the guest must be masqueraded behind the uplink's address"
    );
    drop(net);

    // A private range opened on purpose: reachable; metadata still not.
    t.opts.egress_allow = vec![outside.link_net];
    let _net = Network::up(t.opts.clone()).await.expect("up with an exception");
    assert_eq!(
        reach(&guest, &[private, metadata]),
        [(private, true), (metadata, false)]
    );
    Network::down(&t.opts).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&fwd_key).unwrap().trim(),
        "0",
        "forwarding restored"
    );
}

/// Guest A is root on its side and tries to be guest B: B's address on its
/// NIC, gratuitous and unicast ARP for B's address, frames from B's MAC,
/// packets from B's address, a DHCP server answer, VLAN-tagged frames and
/// an IPv6 router advertisement (`common/forge.py`). The namespace must go
/// on sending B's traffic to B and A's to A, and learn nothing.
#[tokio::test]
async fn a_guest_cannot_be_another_guest() {
    use common::walls::{FORGE, FORGE_PORT, Forge, UdpLog};
    let t = TestNet::new();
    let ns = t.opts.netns.clone();
    let net = Network::up(t.opts.clone()).await.expect("up");
    let mut ips = webhoster::net::alloc::guest_ips(net.subnet());
    let a = TestGuest::plug(&net, ips.next().unwrap()).await;
    let b = TestGuest::plug(&net, ips.next().unwrap()).await;
    a.serve_http("guest A");
    b.serve_http("guest B");
    let get =
        |ip: Ipv4Addr| common::host::http_get(SocketAddr::from((ip, 80))).unwrap_or_else(|e| e.to_string());
    assert_eq!(get(b.ip), "guest B");
    assert_eq!(get(a.ip), "guest A");

    let (a_mac, b_mac) = (
        common::walls::mac_of(&a.ns.0, "eth0"),
        common::walls::mac_of(&b.ns.0, "eth0"),
    );
    let gw_mac = common::walls::mac_of(&ns, "br0");
    let ns_path = webhoster::net::netns::path(&ns);
    let to_gateway = UdpLog::bind(&ns_path, std::net::SocketAddrV4::new(net.gateway(), FORGE_PORT));
    let dhcp = UdpLog::bind(&ns_path, std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68));
    let ipv6_drops = common::walls::guard_ipv6_drops(&ns);

    // A claims B's address on its NIC (its kernel now answers ARP for it).
    a.ns.exec_ok("ip", &["addr", "add", &format!("{}/32", b.ip), "dev", "eth0"]);
    let script = common::host::temp_dir("wh-forge-");
    let path = script.path().join("forge.py");
    std::fs::write(&path, FORGE).unwrap();
    let rounds = 6;
    let forge = Forge {
        iface: "eth0",
        my_ip: a.ip,
        gateway: net.gateway(),
        gateway_mac: &gw_mac,
        victim_ip: b.ip,
        victim_mac: &b_mac,
        rounds,
    };
    let mut cmd = vec![
        "netns".to_string(),
        "exec".into(),
        a.ns.0.clone(),
        "python3".into(),
    ];
    cmd.push(path.display().to_string());
    cmd.extend(forge.args());
    let attacker = std::process::Command::new("ip")
        .args(&cmd)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut attacker = common::host::ChildGuard(attacker);

    // While the attack runs, and after: B's page is B's, A's is A's.
    let mut pages = Vec::new();
    for _ in 0..(rounds * 2 + 4) {
        pages.push((get(b.ip), get(a.ip)));
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut sent = String::new();
    std::io::Read::read_to_string(&mut attacker.0.stdout.take().unwrap(), &mut sent).unwrap();
    let status = attacker.0.wait().unwrap();
    assert!(
        status.success() && sent.contains(&format!("sent ra {rounds}")),
        "forge.py: {sent}"
    );
    std::thread::sleep(Duration::from_millis(500));

    let wrong: Vec<_> = pages
        .iter()
        .filter(|p| p.0 != "guest B" || p.1 != "guest A")
        .collect();
    assert!(wrong.is_empty(), "pages during the attack (B, A): {wrong:?}");
    let n = common::walls::neighbour(&ns, b.ip);
    assert!(
        n.contains(&format!("lladdr {b_mac}")) && n.contains("PERMANENT"),
        "the namespace's entry for B: {n:?} (A is {a_mac})"
    );
    let fdb = common::walls::fdb(&ns, &a.port);
    assert!(
        !fdb.contains(&b_mac),
        "the bridge learned B's MAC on A's port: {fdb}"
    );
    let payloads = to_gateway.payloads();
    assert!(
        payloads.iter().any(|p| p == "legit"),
        "A's own packets must pass: {payloads:?}"
    );
    assert_eq!(
        to_gateway
            .seen()
            .iter()
            .filter(|(_, p)| p != "legit")
            .collect::<Vec<_>>(),
        Vec::<&(Ipv4Addr, String)>::new(),
        "spoofed, MAC-spoofed or VLAN-tagged packets arrived"
    );
    assert!(
        dhcp.seen().is_empty(),
        "a DHCP server answer arrived: {:?}",
        dhcp.seen()
    );
    let v6 = common::walls::ipv6_state(&ns);
    assert!(
        !v6.contains("2001:db8") && !v6.contains("default"),
        "IPv6 learned from a guest: {v6}"
    );
    assert!(
        common::walls::guard_ipv6_drops(&ns) >= ipv6_drops + u64::from(rounds),
        "the guard's IPv6 drop counter did not count the router advertisements"
    );
}

/// A flushed or deleted guard table, a flushed guard set or a deleted
/// neighbour entry is noticed (`missing_parts`, the adapter's inventory)
/// and put back by what convergence calls: `ensure`, then `create_tap` on
/// the tap in place.
#[tokio::test]
async fn a_lost_guard_is_noticed_and_put_back() {
    use std::sync::Arc;
    use webhoster::app::adapters::NetworkAdapter;
    use webhoster::hosting::ports::VmNetwork;

    let t = TestNet::new();
    let ns = t.opts.netns.clone();
    let net = Network::up(t.opts.clone()).await.expect("up");
    let ip = webhoster::net::alloc::guest_ips(net.subnet()).next().unwrap();
    let mac = webhoster::net::alloc::mac_for("vm-guarded");
    let adapter = NetworkAdapter::new(Arc::new(net));
    let tap = adapter.create_tap("vm-guarded", &mac, ip).await.unwrap();
    let whole = || async { adapter.inventory().await.unwrap().guards.get(&tap).copied() };
    assert_eq!(whole().await, Some(true));
    assert!(!adapter.ensure().await.unwrap(), "nothing to rebuild");
    let nft = |args: &[&str]| {
        let mut all = vec!["netns", "exec", &ns, "nft"];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    };

    // Flushed rules: the chain's policy drops everything (fail closed)
    // until ensure rebuilds it; the set's elements survive a table flush.
    nft(&["flush", "table", "bridge", "webhoster_guard"]);
    assert_eq!(
        adapter.get().await.missing_parts().await.unwrap(),
        vec!["guard nft table"]
    );
    assert!(
        adapter.ensure().await.unwrap(),
        "a flushed guard table is rebuilt"
    );
    assert!(adapter.get().await.missing_parts().await.unwrap().is_empty());
    assert_eq!(whole().await, Some(true));

    // Deleted: rebuilt empty; the tap's guard comes back with create_tap.
    nft(&["delete", "table", "bridge", "webhoster_guard"]);
    assert!(
        adapter.ensure().await.unwrap(),
        "a deleted guard table is rebuilt"
    );
    assert_eq!(whole().await, None);
    adapter.create_tap("vm-guarded", &mac, ip).await.unwrap();
    assert_eq!(whole().await, Some(true));

    // A flushed set, or the neighbour entry gone: not whole, put back.
    nft(&["flush", "set", "bridge", "webhoster_guard", "guests"]);
    assert_eq!(whole().await, None);
    adapter.create_tap("vm-guarded", &mac, ip).await.unwrap();
    run_ok("ip", &["-n", &ns, "neigh", "del", &ip.to_string(), "dev", "br0"]);
    assert_eq!(whole().await, Some(false));
    adapter.create_tap("vm-guarded", &mac, ip).await.unwrap();
    assert_eq!(whole().await, Some(true));
    let n = common::walls::neighbour(&ns, ip);
    assert!(
        n.contains(&format!("lladdr {mac}")) && n.contains("PERMANENT"),
        "{n}"
    );

    // Deleting the tap takes its guard and neighbour entry along; a guard
    // whose tap is already gone is an orphan the reaper removes by name.
    adapter.delete_tap("vm-guarded").await.unwrap();
    assert!(adapter.inventory().await.unwrap().guards.is_empty());
    assert_eq!(common::walls::neighbour(&ns, ip), "");
    adapter.create_tap("vm-guarded", &mac, ip).await.unwrap();
    run_ok("ip", &["-n", &ns, "link", "del", &tap]);
    let inv = adapter.inventory().await.unwrap();
    assert!(!inv.taps.contains(&tap) && inv.guards.contains_key(&tap));
    adapter
        .remove_orphans(std::slice::from_ref(&tap), &[])
        .await
        .unwrap();
    assert!(adapter.inventory().await.unwrap().guards.is_empty());
    assert_eq!(common::walls::neighbour(&ns, ip), "");
}

/// Convergence reads taps and guards at once (one netlink socket in the
/// namespace): the kernel refuses a second dump in flight on a socket
/// (EBUSY), and a failed read once made convergence restart every QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespace_reads_can_run_at_once() {
    let t = TestNet::new();
    let net = std::sync::Arc::new(Network::up(t.opts.clone()).await.expect("up"));
    // Enough links that a link dump spans several reads.
    let n = 12;
    for (i, ip) in webhoster::net::alloc::guest_ips(net.subnet()).take(n).enumerate() {
        let vm = format!("vm-reads-{i}");
        net.create_tap(&vm, &webhoster::net::alloc::mac_for(&vm), ip)
            .await
            .unwrap();
    }
    let reads = (0..8).map(|_| {
        let net = net.clone();
        tokio::spawn(async move {
            for _ in 0..50 {
                let (taps, guards) = tokio::join!(net.taps(), net.guards());
                assert_eq!(taps.expect("taps").len(), n);
                assert_eq!(guards.expect("guards").len(), n);
            }
        })
    });
    for r in futures::future::join_all(reads).await {
        r.expect("concurrent reads of the namespace");
    }
}
