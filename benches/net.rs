//! Network bench (root): throughput and latency host -> guest through the
//! route, through the SSH forward (kernel DNAT) and direct, plus the time to
//! create and delete one tap + forward. Prints figures; asserts nothing.
//!
//! "guest" = a namespace plugged into the VM bridge by a veth (an isolated
//! port, like a tap), so the figures show the network path, not a VM.

#[allow(dead_code)]
#[path = "../tests/common/host.rs"]
mod host;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use host::{TestGuest, TestNet};
use webhoster::net::{Network, alloc};

const BULK: usize = 100 << 20;
const ROUND_TRIPS: usize = 2000;

/// Serve on `l`: a first byte `b` asks for BULK bytes, `p` starts ping-pong.
fn serve(l: TcpListener) {
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            std::thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut first = [0u8; 1];
                if c.read_exact(&mut first).is_err() {
                    return;
                }
                if first[0] == b'b' {
                    let chunk = vec![7u8; 1 << 16];
                    let mut left = BULK;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if c.write_all(&chunk[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                } else {
                    let mut b = [0u8; 64];
                    while c.read_exact(&mut b).is_ok() {
                        if c.write_all(&b).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
}

fn bulk(to: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(to).expect("connect");
    let t = Instant::now();
    s.write_all(b"b").unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    while got < BULK {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "short transfer");
        got += n;
    }
    (BULK as f64 / (1 << 20) as f64) / t.elapsed().as_secs_f64()
}

fn pingpong(to: SocketAddr) -> (f64, f64) {
    let mut s = TcpStream::connect(to).expect("connect");
    s.set_nodelay(true).unwrap();
    s.write_all(b"p").unwrap();
    let msg = [1u8; 64];
    let mut back = [0u8; 64];
    let mut lat = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}

fn http_latency(to: SocketAddr, n: usize) -> (f64, f64) {
    let mut lat: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let body = host::http_get(to).expect("GET");
            assert_eq!(body, "bench");
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    (lat[n / 2], lat[n * 99 / 100])
}

fn report(path: &str, to: SocketAddr) {
    let mib_s = bulk(to);
    let (p50, p99) = pingpong(to);
    println!("{path:<34} {mib_s:>9.0} MiB/s   rtt p50 {p50:>6.1} us  p99 {p99:>6.1} us");
}

fn median_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

async fn tap_and_forward_timing(net: &Network) {
    let ip = alloc::guest_ips(net.subnet()).nth(10).unwrap();
    let port = *net.options().ssh_ports.end();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let (mut create, mut delete, mut release) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tap_c, mut fwd_c, mut tap_d, mut fwd_d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..20 {
        let vm = format!("bench-vm-{i}");
        let t = Instant::now();
        net.create_tap(&vm, &alloc::mac_for(&vm), ip).await.unwrap();
        tap_c.push(ms(t));
        let t2 = Instant::now();
        net.add_forward(&vm, port, ip).await.unwrap();
        fwd_c.push(ms(t2));
        create.push(ms(t));
        let t = Instant::now();
        net.delete_tap(&vm).await.unwrap();
        tap_d.push(ms(t));
        let t2 = Instant::now();
        net.remove_forward(&vm).await.unwrap();
        fwd_d.push(ms(t2));
        delete.push(ms(t));
        net.create_tap(&vm, &alloc::mac_for(&vm), ip).await.unwrap();
        net.add_forward(&vm, port, ip).await.unwrap();
        let t = Instant::now();
        net.release_vm(&vm).await.unwrap();
        release.push(ms(t));
    }
    let line = |what: &str, v: Vec<f64>| {
        let (m, x) = median_max(v);
        println!("{what:<34} median {m:>6.1} ms  max {x:>6.1} ms");
    };
    line("create tap + forward (<= 20 ms)", create);
    line("  of which create_tap", tap_c);
    line("  of which add_forward", fwd_c);
    line("delete tap + forward (<= 20 ms)", delete);
    line("  of which delete_tap", tap_d);
    line("  of which remove_forward", fwd_d);
    line("release_vm (both, concurrently)", release);
}

/// scp of a 100 MiB file from a real sshd in a second guest, via the forward
/// and direct. Skipped when openssh-server is not installed.
async fn scp_compare(net: &Network) {
    if !std::path::Path::new("/usr/sbin/sshd").exists() {
        println!("scp: skipped (no /usr/sbin/sshd)");
        return;
    }
    let guest = TestGuest::plug(net, alloc::guest_ips(net.subnet()).nth(1).unwrap()).await;
    let port = *net.options().ssh_ports.start() + 1;
    net.add_forward("bench-scp", port, guest.ip).await.unwrap();
    let dir = host::temp_dir("wh-bench-ssh-");
    let d = dir.path();
    for k in ["hk", "ck"] {
        host::run_ok(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-f", d.join(k).to_str().unwrap()],
        );
    }
    std::fs::copy(d.join("ck.pub"), d.join("auth")).unwrap();
    let blob = d.join("blob");
    std::fs::write(&blob, vec![0x5au8; BULK]).unwrap();
    let cfg = d.join("cfg");
    std::fs::write(
        &cfg,
        format!(
            "Port 22\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n",
            guest.ip,
            d.join("hk").display(),
            d.join("auth").display(),
            d.join("pid").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &guest.ns.0, "/usr/sbin/sshd", "-D", "-f"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _sshd = host::ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while guest
        .connect(SocketAddr::from((guest.ip, 22)), Duration::from_millis(500))
        .is_err()
    {
        assert!(Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let scp = |host: String, port: u16| -> f64 {
        let t = Instant::now();
        let st = Command::new("scp")
            .args([
                "-q",
                "-i",
                d.join("ck").to_str().unwrap(),
                "-P",
                &port.to_string(),
            ])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
            ])
            .arg(format!("root@{host}:{}", blob.display()))
            .arg(d.join("copy"))
            .status()
            .unwrap();
        assert!(st.success(), "scp failed");
        (BULK as f64 / (1 << 20) as f64) / t.elapsed().as_secs_f64()
    };
    let fwd = scp("127.0.0.1".into(), port);
    let direct = scp(guest.ip.to_string(), 22);
    println!("scp 100 MiB via SSH forward        {fwd:>9.0} MiB/s");
    println!("scp 100 MiB direct to guest :22    {direct:>9.0} MiB/s");
    net.remove_forward("bench-scp").await.unwrap();
}

#[tokio::main]
async fn main() {
    let t = TestNet::new();
    let net = Network::up(t.opts.clone()).await.expect("net up");
    // NET_BENCH=taps: only the create/delete timings (quick).
    if std::env::var("NET_BENCH").as_deref() == Ok("taps") {
        tap_and_forward_timing(&net).await;
        return;
    }
    let guest = TestGuest::plug(&net, alloc::guest_ips(net.subnet()).next().unwrap()).await;
    serve(guest.listen(22));
    guest.serve_http("bench");
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let local_addr = local.local_addr().unwrap();
    serve(local);
    let port = *t.opts.ssh_ports.start();
    net.add_forward("bench-fwd", port, guest.ip).await.unwrap();

    println!(
        "== host -> guest (namespace on an isolated bridge port), 100 MiB + {ROUND_TRIPS} x 64 B round trips"
    );
    report("loopback on the host (baseline)", local_addr);
    report("route: host -> guest:22 direct", SocketAddr::from((guest.ip, 22)));
    report(
        "SSH forward: 127.0.0.1:port (DNAT)",
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    );
    let (p50, p99) = http_latency(SocketAddr::from((guest.ip, 80)), 500);
    println!("HTTP GET guest:80 via the route    connect+request+response p50 {p50:.1} us  p99 {p99:.1} us");
    scp_compare(&net).await;
    net.remove_forward("bench-fwd").await.unwrap();
    tap_and_forward_timing(&net).await;
}
