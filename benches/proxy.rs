//! Throughput through webhoster's nginx front compared with the backend
//! alone, in one run: wrk straight at a local backend, then wrk at
//! `/<id>/` on the front proxying to the same backend, alternated over a few
//! rounds so both see the same machine load.
//!
//! Three backends, each on its own: a warp "hello" server on its own tokio
//! runtime, a second plain nginx master answering from memory (the cheapest
//! backend there is), and the warp server taking 1 ms per answer without
//! using CPU (`warp-io`: an app waiting on I/O, or a guest). The first two
//! measure the front's own cost on a CPU-bound box; the third how much of a
//! backend's pace the front keeps. Target: proxied >= 80% of direct.
//!
//! Knobs (env): `BENCH_SECS` (per wrk run, default 5), `BENCH_ROUNDS`
//! (default 3), `BENCH_CONNS` (default 32), `BENCH_BACKENDS` (`warp,nginx,warp-io`),
//! `BENCH_FRONT_WORKERS` (default: one per core).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use warp::Filter;
use webhoster::proxy::{Proxy, ProxyOptions, Site, SiteLimits};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Requests per second wrk reports for `url`.
fn wrk(url: &str, secs: u64, conns: u32) -> f64 {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), url])
        .output()
        .expect("wrk runs (Debian package wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        panic!("wrk saw errors for {url}:\n{text}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec from wrk for {url}:\n{text}"))
}

/// A warp "hello" server on a runtime of its own, so it does not share
/// threads with anything else in this process. With `work`, each answer
/// first waits that long (an app doing I/O): the backend, not the CPU, then
/// sets the pace, as a guest does.
fn warp_backend(work: Option<Duration>) -> SocketAddrV4 {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = match listener.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let hello = warp::any().then(move || async move {
                if let Some(work) = work {
                    tokio::time::sleep(work).await;
                }
                "hello from the backend\n"
            });
            warp::serve(hello).incoming(listener).run().await;
        });
    });
    addr
}

/// A plain nginx master answering every request from memory; stopped on drop.
struct NginxBackend {
    dir: PathBuf,
    addr: SocketAddrV4,
}

impl NginxBackend {
    fn start(root: &Path) -> NginxBackend {
        let dir = root.join("backend");
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port());
        let d = dir.display();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "pid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\nworker_processes 1;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
                 keepalive_requests 100000;\n\
                 server {{ listen {addr}; location / {{ return 200 \"hello from the backend\\n\"; }}\n\
                 location = /__status {{ stub_status; }} }} }}\n"
            ),
        )
        .unwrap();
        let status = Command::new("nginx")
            .arg("-p")
            .arg(format!("{d}/"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .status()
            .expect("nginx runs");
        assert!(status.success(), "the backend nginx starts");
        NginxBackend { dir, addr }
    }
}

impl NginxBackend {
    /// Connections the backend accepted and requests it handled so far.
    fn counters(&self) -> (u64, u64) {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(self.addr).expect("the backend answers");
        conn.write_all(b"GET /__status HTTP/1.0\r\nHost: backend\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        let text = reply.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        // "server accepts handled requests\n A H R"
        let nums: Vec<u64> = text
            .lines()
            .nth(2)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        (
            nums.first().copied().unwrap_or(0),
            nums.get(2).copied().unwrap_or(0),
        )
    }
}

impl Drop for NginxBackend {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("nginx.pid"));
        if let Some(pid) = pid.ok().and_then(|p| p.trim().parse().ok()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGQUIT);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Stops the front's master even if the bench panics.
struct FrontGuard(PathBuf);

impl Drop for FrontGuard {
    fn drop(&mut self) {
        let _ = webhoster::proxy::stop(&self.0, Duration::from_secs(10));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let secs: u64 = env_or("BENCH_SECS", 5);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let conns: u32 = env_or("BENCH_CONNS", 32);
    let backends: String = env_or("BENCH_BACKENDS", "warp,nginx,warp-io".to_string());

    let tmp = tempfile::Builder::new()
        .prefix("whproxy-bench-")
        .tempdir()
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let front_dir = tmp.path().join("nginx");
    let _front_guard = FrontGuard(front_dir.clone());
    let front_port = free_port();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut opts = ProxyOptions::new(&front_dir, SocketAddr::from((Ipv4Addr::LOCALHOST, front_port)));
    // The per-visitor rate limit would turn a load test into 429s.
    opts.limits = SiteLimits {
        rate_per_sec: 0,
        ..SiteLimits::default()
    };
    let front_workers: u32 = env_or("BENCH_FRONT_WORKERS", 0);
    opts.workers = (front_workers > 0).then_some(front_workers);
    let proxy = rt.block_on(Proxy::start(opts)).expect("the front starts");

    println!(
        "proxy bench: wrk -t1 -c{conns} -d{secs}s, {rounds} rounds, {} cores, front nginx with workers={}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if front_workers == 0 {
            "auto".to_string()
        } else {
            front_workers.to_string()
        }
    );
    let mut nginx_backend = None;
    for (user_id, kind) in backends.split(',').map(str::trim).enumerate() {
        let user_id = user_id as i64 + 1;
        let upstream = match kind {
            "warp" => warp_backend(None),
            "warp-io" => warp_backend(Some(Duration::from_millis(1))),
            "nginx" => nginx_backend.insert(NginxBackend::start(tmp.path())).addr,
            other => panic!("unknown backend {other:?} (warp, warp-io, nginx)"),
        };
        rt.block_on(proxy.add_site(&Site {
            user_id,
            username: format!("bench{user_id}"),
            upstream,
        }))
        .expect("the site is added");
        let direct_url = format!("http://{upstream}/");
        let proxied_url = format!("http://127.0.0.1:{front_port}/{user_id}/");
        // Warm both paths (connections, upstream keepalive).
        wrk(&direct_url, 1, conns);
        wrk(&proxied_url, 1, conns);
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        let (mut conns_opened, mut requests) = (0, 0);
        for _ in 0..rounds {
            direct.push(wrk(&direct_url, secs, conns));
            let before = nginx_backend
                .as_ref()
                .filter(|_| kind == "nginx")
                .map(|b| b.counters());
            proxied.push(wrk(&proxied_url, secs, conns));
            if let Some((a0, r0)) = before {
                let (a1, r1) = nginx_backend.as_ref().unwrap().counters();
                conns_opened += a1 - a0;
                requests += r1 - r0;
            }
        }
        if requests > 0 {
            println!(
                "backend {kind:7}: the front opened {conns_opened} upstream connections for {requests} requests"
            );
        }
        let (d, p) = (median(direct.clone()), median(proxied.clone()));
        println!("backend {kind:7}: direct  {d:>9.0} req/s (runs {direct:.0?})");
        println!("backend {kind:7}: proxied {p:>9.0} req/s (runs {proxied:.0?})");
        println!(
            "backend {kind:7}: proxied/direct = {:.0}% (target >= 80%)",
            100.0 * p / d
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average during the run: {}", load.trim());
    rt.block_on(proxy.shutdown()).expect("the front stops");
}
