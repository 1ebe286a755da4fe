//! API latency under load: the real API, auth and store (SQLite by default,
//! PostgreSQL with `WEBHOSTER_BENCH_DATABASE_URL`), the VM parts faked. Drives
//! it with wrk (Debian package `wrk`) and prints req/s and p99 for
//! `GET /api/v1/host/my`, `GET /api/v1/auth/me`, login alone, and `/auth/me`
//! during a login flood. Targets on 2 cores: p99 <= 5 ms, >= 5000 req/s.
//! Then `/health` latency from a paced client, alone and while 200
//! connections flood `/health/detailed` (served from a snapshot, so the flood
//! should cost the liveness probe little), and the ratio of the two p99s.
//!
//! Knobs: `BENCH_SECONDS` (default 10), `BENCH_CONNECTIONS` (default 128),
//! `API_BENCH_PARTS` (comma separated: `routes`, `health`; default both).

use std::process::Command;
use std::time::Duration;

use webhoster::api::{self, ApiConfig, ApiState};
use webhoster::auth::Auth;
use webhoster::hosting::{HostingConfig, HostingService};
use webhoster::store::{self, Store};

#[allow(dead_code)]
#[path = "../tests/common/fakes.rs"]
mod fakes;
use fakes::FakeWorld;

struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
}

/// Offered load of the paced runs, in requests per second.
const PACED_RATE: u64 = 6000;

fn parse_ms(v: &str) -> f64 {
    let v = v.trim();
    let (num, mul) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mul
}

fn parse(out: &str) -> Run {
    let mut run = Run {
        rps: 0.0,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        non_2xx: 0,
    };
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            run.p50_ms = parse_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            run.p99_ms = parse_ms(v);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            run.non_2xx = v.trim().parse().unwrap_or(0);
        }
    }
    run
}

fn wrk(
    url: &str,
    conns: u32,
    threads: u32,
    secs: u64,
    headers: &[String],
    script: Option<&std::path::Path>,
) -> std::process::Child {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-c{conns}"))
        .arg(format!("-t{threads}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency");
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    cmd.arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("wrk is missing: apt-get install wrk (make bench installs it)")
}

fn finish(child: std::process::Child) -> Run {
    let out = child.wait_with_output().expect("wrk failed");
    parse(&String::from_utf8_lossy(&out.stdout))
}

fn report(name: &str, r: &Run) {
    println!(
        "{name:<44} {:>9.0} req/s   p50 {:>7.2} ms   p99 {:>7.2} ms   non-2xx {}",
        r.rps, r.p50_ms, r.p99_ms, r.non_2xx
    );
}

fn main() {
    let secs: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let conns: u32 = std::env::var("BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let dir = tempfile::tempdir().unwrap();
    let url =
        std::env::var("WEBHOSTER_BENCH_DATABASE_URL").unwrap_or_else(|_| store::default_url(dir.path()));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (addr, token, shutdown) = rt.block_on(async {
        let store = Store::connect(&url).await.unwrap();
        let world = FakeWorld::new(dir.path(), "10.96.0.0/24".parse().unwrap());
        let hosting = HostingService::new(store.clone(), world.ports(), HostingConfig::default());
        let auth = Auth::new(
            b"bench-secret-bench-secret-bench-secret!!",
            Duration::from_secs(3600),
            cores.saturating_sub(1).max(1),
        )
        .unwrap();
        let state = ApiState::new(
            store.clone(),
            auth.clone(),
            hosting.clone(),
            // The bench measures the API, not the limiter: a flood from one
            // address would be refused at once.
            ApiConfig {
                auth_limits: api::ratelimit::AuthLimits::OFF,
                ..ApiConfig::default()
            },
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = api::serve("127.0.0.1:0".parse().unwrap(), state, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        tokio::spawn(server);
        let hash = auth.hash_password("password123".into()).await.unwrap();
        let user = store
            .create_user("bench@example.com", "bench", &hash)
            .await
            .unwrap();
        hosting.create(&user, None, true).await.unwrap();
        (
            addr,
            auth.issue(user.id, user.token_version).unwrap().access_token,
            tx,
        )
    });
    let base = format!("http://{addr}");
    println!(
        "webhoster API bench: {} backend, {conns} connections, {secs} s per run, {cores} cores",
        if url.starts_with("postgres") {
            "postgres"
        } else {
            "sqlite"
        }
    );

    let parts = std::env::var("API_BENCH_PARTS").unwrap_or_else(|_| "routes,health".into());
    for part in parts.split(',').map(str::trim) {
        match part {
            "routes" => routes(&base, &token, conns, secs, dir.path()),
            "health" => health(&base, secs, dir.path()),
            other => eprintln!("unknown part {other:?} (routes, health)"),
        }
    }
    let _ = shutdown.send(());
}

/// The account and hosting routes, paced and saturated, and log-in floods.
fn routes(base: &str, token: &str, conns: u32, secs: u64, dir: &std::path::Path) {
    let auth_header = vec![format!("Authorization: Bearer {token}")];
    // Paced: each connection waits between requests (wrk's `delay()`), so
    // the offered load is about PACED_RATE req/s over all connections and
    // p99 is the service's latency at that rate, not queueing at saturation.
    let pace = dir.join("pace.lua");
    let delay_ms = (u64::from(conns) * 1000 / PACED_RATE).max(1);
    std::fs::write(&pace, format!("function delay() return {delay_ms} end\n")).unwrap();
    let host_paced = finish(wrk(
        &format!("{base}/api/v1/host/my"),
        conns,
        2,
        secs,
        &auth_header,
        Some(&pace),
    ));
    report(
        &format!("GET /api/v1/host/my paced (~{PACED_RATE}/s)"),
        &host_paced,
    );
    let me_paced = finish(wrk(
        &format!("{base}/api/v1/auth/me"),
        conns,
        2,
        secs,
        &auth_header,
        Some(&pace),
    ));
    report(&format!("GET /api/v1/auth/me paced (~{PACED_RATE}/s)"), &me_paced);

    let host = finish(wrk(
        &format!("{base}/api/v1/host/my"),
        conns,
        2,
        secs,
        &auth_header,
        None,
    ));
    report("GET /api/v1/host/my saturated", &host);
    let me = finish(wrk(
        &format!("{base}/api/v1/auth/me"),
        conns,
        2,
        secs,
        &auth_header,
        None,
    ));
    report("GET /api/v1/auth/me saturated", &me);

    let script = dir.join("login.lua");
    std::fs::write(
        &script,
        "wrk.method = \"POST\"\nwrk.body = \"username=bench&password=password123\"\nwrk.headers[\"Content-Type\"] = \"application/x-www-form-urlencoded\"\n",
    )
    .unwrap();
    let login = finish(wrk(
        &format!("{base}/api/v1/auth/login"),
        16,
        1,
        secs,
        &[],
        Some(&script),
    ));
    report("POST /api/v1/auth/login (16 conns)", &login);

    // Both at once: the flood queues on the hashing semaphore, /auth/me should not.
    let flood = wrk(
        &format!("{base}/api/v1/auth/login"),
        64,
        1,
        secs + 2,
        &[],
        Some(&script),
    );
    std::thread::sleep(Duration::from_secs(1));
    let me_flood = finish(wrk(
        &format!("{base}/api/v1/auth/me"),
        conns,
        1,
        secs,
        &auth_header,
        Some(&pace),
    ));
    let flood = finish(flood);
    report("GET /api/v1/auth/me paced, during a login flood", &me_flood);
    report("  (the flood: POST /api/v1/auth/login, 64 conns)", &flood);

    let verdict = |r: &Run| {
        if r.p99_ms <= 5.0 && r.rps >= 5000.0 {
            "meets"
        } else {
            "misses"
        }
    };
    println!(
        "targets (p99 <= 5 ms at >= 5000 req/s, {conns} connections): host/my {} (max {:.0} req/s), auth/me {} (max {:.0} req/s), auth/me during a login flood {}",
        verdict(&host_paced),
        host.rps,
        verdict(&me_paced),
        me.rps,
        verdict(&me_flood),
    );
}

/// Connections flooding a route while `/health` is measured.
const FLOOD: u32 = 200;

/// `/health` from a paced prober (4 connections, one request every 10 ms
/// each: about 400/s): alone; while [`FLOOD`] connections ask `/health`
/// itself as fast as they can (the control: what any flood that fills both
/// cores costs); and while they ask `/health/detailed`. The last two should
/// be alike: `/health/detailed` serves a snapshot, so it costs no more than
/// liveness.
fn health(base: &str, secs: u64, dir: &std::path::Path) {
    let pace = dir.join("probe.lua");
    std::fs::write(&pace, "function delay() return 10 end\n").unwrap();
    let probe = || wrk(&format!("{base}/api/v1/health"), 4, 1, secs, &[], Some(&pace));
    let under = |route: &str| {
        let flood = wrk(&format!("{base}{route}"), FLOOD, 1, secs + 2, &[], None);
        std::thread::sleep(Duration::from_secs(1));
        let probed = finish(probe());
        (probed, finish(flood))
    };
    let alone = finish(probe());
    let (control, control_flood) = under("/api/v1/health");
    let (loaded, flood) = under("/api/v1/health/detailed");
    report("GET /api/v1/health paced (~400/s), alone", &alone);
    report(&format!("  same, {FLOOD} conns flooding /health"), &control);
    report(
        &format!("  same, {FLOOD} conns flooding /health/detailed"),
        &loaded,
    );
    report(
        &format!("  (flood: GET /api/v1/health, {FLOOD} conns)"),
        &control_flood,
    );
    report(
        &format!("  (flood: GET /api/v1/health/detailed, {FLOOD} conns)"),
        &flood,
    );
    println!(
        "/health p99 during the /health/detailed flood: {:.1}x alone, {:.2}x during a /health flood",
        loaded.p99_ms / alone.p99_ms,
        loaded.p99_ms / control.p99_ms,
    );
}
