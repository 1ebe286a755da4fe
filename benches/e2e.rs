//! The headline figures of issue 12's targets table: time from `POST
//! /api/v1/host` to a live site (200 through nginx) and a successful SSH
//! login, warm (a clone from the pool) and cold (a boot), against a bare
//! `qemu-system` boot of the same image with the same resources in the same
//! run; concurrent creates; idle memory per VM; how many idle VMs fit.
//! Run with `cargo bench --bench e2e`; prints figures, asserts nothing.
//!
//! Parts, chosen by name (arguments after `--`, or `E2E_PARTS`, comma
//! separated; default `create`):
//! - `create`: cold creates (`WEBHOSTER_WARM_POOL=0`): 5 one after another,
//!   timed to site 200 and SSH login, with their step breakdown; 5 bare QEMU
//!   boots; 10 concurrent cold creates;
//! - `warm`: 5 bare QEMU boots; one cold create in a deployment without a
//!   pool (the reference for memory); then a deployment with a pool of 10
//!   (template built once, waited for): 5 warm creates one after another
//!   (each by a new user, the pool refilled and quiet before each, not
//!   timed), each timed from POST to its 201 (which means site and SSH
//!   ready), then the first site request through nginx and the first SSH
//!   login right after it; 10 concurrent warm creates by 10 users (pool
//!   full first): total, failures, ratio to one warm create; the machine's
//!   CPU time (busy and stolen) of one warm create and of the ten, and what
//!   ten need on this machine's cores; PSS of idle warm clones' QEMU vs the
//!   idle cold VM's, 60 s after their create, then their QEMU's idle CPU;
//! - `density`: idle `small` VMs created one after another (warm pool of 5).
//!   Every `E2E_DENSITY_STEP` VMs (default 10) a check: the API's p99
//!   latency (`GET /api/v1/health`, 200 requests) and whether every site
//!   answers. Creating stops at the first check that fails (p99 of 50 ms or
//!   more, or a site not answering), when memory runs low, at
//!   `E2E_DENSITY_MAX` VMs (default 100, the seeds' promise) or after
//!   `E2E_DENSITY_SECS` of creating (default 900); the figure is the most VMs
//!   a check passed with (admission's memory budget is lifted: the part
//!   measures what the host carries). Then the same measures once idle,
//!   without KSM and with it (`/sys/kernel/mm/ksm/run` = 1; the old value is
//!   put back);
//! - `teardown`: after `webhoster teardown` (what a host reboot leaves), the
//!   time from `serve` start until every hosting is live again (site 200
//!   through nginx and an SSH banner), with 1 and with 5 hostings
//!   (`E2E_TEARDOWN_SIZES`, comma separated, sets the counts).
//!
//! `cargo bench --bench e2e -- create warm` runs both.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::deploy::{Deployment, User, sign_up};
use common::guest::{Guest, GuestOptions, TestKey, ssh, ssh_banner, test_image, wait_for};
use common::host::unique_name;
use serde_json::Value;

const RUNS: usize = 5;
/// The product's default plan.
const PLAN: &str = "standard";
const CONCURRENT: usize = 10;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn summary(xs: &[f64]) -> String {
    summary_in(xs, 1, "s")
}

/// min / median / max of `xs` with `decimals`, in `unit`; "no samples" for
/// none.
fn summary_in(xs: &[f64], decimals: usize, unit: &str) -> String {
    if xs.is_empty() {
        return "no samples".into();
    }
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    format!(
        "min {:.*} {unit}, median {:.*} {unit}, max {:.*} {unit}",
        decimals,
        s[0],
        decimals,
        s[s.len() / 2],
        decimals,
        s[s.len() - 1]
    )
}

/// The parts named on the command line or in `E2E_PARTS`; `create` when none.
fn parts() -> Vec<String> {
    let mut parts: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if let Ok(env) = std::env::var("E2E_PARTS") {
        parts.extend(
            env.split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty()),
        );
    }
    if parts.is_empty() {
        parts.push("create".into());
    }
    parts
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    for part in parts() {
        match part.as_str() {
            "create" => create_figures().await,
            "warm" => warm_figures().await,
            "density" => density_figures().await,
            "teardown" => {
                let sizes: Vec<usize> = std::env::var("E2E_TEARDOWN_SIZES")
                    .unwrap_or_else(|_| "1,5".into())
                    .split(',')
                    .map(|n| n.trim().parse().expect("E2E_TEARDOWN_SIZES: counts like 1,5"))
                    .collect();
                for n in sizes {
                    back_after_teardown(n).await;
                }
            }
            other => panic!("unknown part {other:?}: the parts are create, warm, density and teardown"),
        }
    }
}

async fn create_figures() {
    let mut dep = Deployment::new();
    dep.env.insert("WEBHOSTER_PLAN", PLAN.into());
    // The cold figures: no warm clone may serve a create.
    dep.env.insert("WEBHOSTER_WARM_POOL", "0".into());
    // Ten TCG guests booting at once on two cores take minutes, not seconds.
    dep.env.insert("WEBHOSTER_READY_TIMEOUT", "1200".into());
    dep.start().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1800))
        .build()
        .unwrap();

    // Time to live site, one create at a time.
    let mut created = Vec::new();
    let mut live = Vec::new();
    let mut breakdowns = Vec::new();
    for run in 0..RUNS {
        let user = sign_up(&client, &dep.api, &unique_name("bench")).await;
        let started = Instant::now();
        let (status, body) = user.create(&client, &dep.api).await;
        assert_eq!(status, 201, "{body}");
        created.push(started.elapsed().as_secs_f64());
        let port = body["data"]["hosting"]["ssh_port"].as_u64().unwrap() as u16;
        wait_for("site", Duration::from_secs(600), || {
            dep.get_site(user.id).0 == 200
        });
        wait_for("ssh", Duration::from_secs(600), || {
            ssh("127.0.0.1", port, "ubuntu", &user.key, "true")
                .status
                .success()
        });
        let secs = started.elapsed().as_secs_f64();
        live.push(secs);
        breakdowns.push(dep.step_timings(body["data"]["hosting"]["vm_id"].as_str().unwrap()));
        eprintln!("run {run}: 201 in {:.1} s, live in {secs:.1} s", created[run]);
        user.delete_host(&client, &dep.api).await;
    }

    // The same image and resources, booted by hand with bare QEMU.
    let bare = bare_boots(PLAN, RUNS).await;

    // Concurrent creates.
    let mut users = Vec::new();
    for _ in 0..CONCURRENT {
        users.push(sign_up(&client, &dep.api, &unique_name("conc")).await);
    }
    let started = Instant::now();
    let results = futures::future::join_all(users.iter().map(|u| u.create(&client, &dep.api))).await;
    let concurrent_secs = started.elapsed().as_secs_f64();
    let failures = results.iter().filter(|(status, _)| *status != 201).count();
    // Say why: a count alone cannot tell a capacity answer from a boot timeout.
    for (status, body) in results.iter().filter(|(status, _)| *status != 201) {
        println!("concurrent create failed: {status} {body}");
    }
    for (user, (status, _)) in users.iter().zip(&results) {
        if *status == 201 {
            user.delete_host(&client, &dep.api).await;
        }
    }

    let (web, qemu) = (median(live.clone()), median(bare.clone()));
    println!(
        "cold create, POST -> 201 (site through nginx, SSH answering), {RUNS} runs: {} ({:.2}x bare QEMU's median)",
        summary(&created),
        median(created.clone()) / qemu
    );
    println!(
        "time to live site (POST -> 200 through nginx and SSH login), {RUNS} runs: {}",
        summary(&live)
    );
    println!(
        "bare qemu-system boot to HTTP 200 and SSH login, {RUNS} runs: {}",
        summary(&bare)
    );
    println!(
        "webhoster overhead over bare QEMU: {:.2}x (median {web:.1} s / {qemu:.1} s)",
        web / qemu
    );
    println!("step breakdown of each run (seconds per create step, from its log line):");
    for (run, steps) in breakdowns.iter().enumerate() {
        let line: Vec<String> = steps
            .iter()
            .map(|(step, secs)| format!("{step} {secs:.2}"))
            .collect();
        println!("  run {run}: {}", line.join(", "));
    }
    println!(
        "{CONCURRENT} concurrent creates: {concurrent_secs:.1} s total ({:.2}x one create), {failures} failures",
        concurrent_secs / web
    );
}

/// Seconds from spawning a bare `qemu-system` with the image and `plan`'s
/// resources (and a NoCloud seed of webhoster's kind) to HTTP 200 and an
/// SSH login, `runs` times one after another.
async fn bare_boots(plan: &str, runs: usize) -> Vec<f64> {
    let plan = webhoster::vmm::Plan::load(plan).unwrap();
    let image = test_image();
    let mut bare = Vec::new();
    for run in 0..runs {
        let key = TestKey::new();
        let seed_dir = tempfile::tempdir().unwrap();
        let seed = seed_dir.path().join("seed.iso");
        let spec = webhoster::seed::SeedSpec {
            instance_id: unique_name("bare"),
            hostname: "bare".into(),
            user: "ubuntu".into(),
            ssh_keys: vec![webhoster::auth::SshPublicKey::parse(key.public_line()).unwrap()],
            owner: "bench".into(),
            network: None,
        };
        webhoster::seed::write(&spec, &seed).await.unwrap();
        let opts = GuestOptions {
            memory_mib: plan.memory_mib,
            vcpus: plan.vcpus,
            disk_gib: plan.disk_gib,
            ..GuestOptions::default()
        };
        let guest = Guest::boot(&image, &seed, &opts);
        wait_for("bare site", Duration::from_secs(600), || {
            common::guest::http_get(guest.http, "/").is_ok_and(|(status, _)| status == 200)
        });
        wait_for("bare ssh", Duration::from_secs(600), || {
            ssh("127.0.0.1", guest.ssh_port, "ubuntu", &key, "true")
                .status
                .success()
        });
        let secs = guest.started.elapsed().as_secs_f64();
        eprintln!("bare run {run}: live in {secs:.1} s");
        bare.push(secs);
    }
    bare
}

/// How long a whole set of TCG guests may take to come back; a bench waits,
/// it never fails on speed: what is not back by then is reported as such.
const BACK_BOUND: Duration = Duration::from_secs(600);

/// A hosting is live when its site answers 200 through nginx and its SSH
/// port gives a banner.
fn live(dep: &Deployment, (user_id, ssh): &(i64, SocketAddr)) -> bool {
    dep.get_site(*user_id).0 == 200 && ssh_banner(*ssh, Duration::from_secs(3)).is_ok()
}

/// `n` hostings, then `serve` stopped and `teardown` run: seconds from the
/// next `serve` start until each hosting is live (site 200 through nginx and
/// an SSH banner on its port), and until all are.
async fn back_after_teardown(n: usize) {
    let mut dep = Deployment::new();
    dep.env.insert("WEBHOSTER_PLAN", PLAN.into());
    // n TCG guests booting at once on two cores take minutes, not seconds.
    dep.env.insert("WEBHOSTER_READY_TIMEOUT", "1200".into());
    dep.start().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1800))
        .build()
        .unwrap();
    let mut users = Vec::new();
    for _ in 0..n {
        users.push(sign_up(&client, &dep.api, &unique_name("tdown")).await);
    }
    let created = futures::future::join_all(users.iter().map(|u| u.create(&client, &dep.api))).await;
    let mut hostings = Vec::new();
    for (user, (status, body)) in users.iter().zip(&created) {
        assert_eq!(status, &201, "{body}");
        let port = body["data"]["hosting"]["ssh_port"].as_u64().unwrap() as u16;
        hostings.push((user.id, SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
    }
    wait_for("every hosting live before the teardown", BACK_BOUND, || {
        hostings.iter().all(|h| live(&dep, h))
    });

    dep.stop();
    let started = Instant::now();
    let out = dep.command(&["teardown"]).output().unwrap();
    assert!(
        out.status.success(),
        "teardown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let teardown_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    dep.start().await;
    let api_secs = started.elapsed().as_secs_f64();
    let mut back: Vec<Option<f64>> = vec![None; n];
    while back.iter().any(Option::is_none) && started.elapsed() < BACK_BOUND {
        for (i, hosting) in hostings.iter().enumerate() {
            if back[i].is_none() && live(&dep, hosting) {
                back[i] = Some(started.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let each: Vec<String> = back
        .iter()
        .map(|b| b.map_or("not back".into(), |s| format!("{s:.1} s")))
        .collect();
    println!(
        "after teardown, {n} hosting(s): teardown {teardown_secs:.1} s; serve start to API up {api_secs:.1} s; \
         to each hosting live: {}",
        each.join(", ")
    );
    match back.iter().copied().collect::<Option<Vec<f64>>>() {
        Some(all) => println!(
            "after teardown, {n} hosting(s): serve start to all live {:.1} s",
            all.iter().copied().fold(0.0, f64::max)
        ),
        None => println!(
            "after teardown, {n} hosting(s): {} of {n} not live {:.0} s after serve start",
            back.iter().filter(|b| b.is_none()).count(),
            BACK_BOUND.as_secs_f64()
        ),
    }
    for user in &users {
        user.delete_host(&client, &dep.api).await;
    }
}

/// The API's `data.pool` from `GET /health/detailed` (its data comes with a
/// 503 too); Null when there is none.
async fn pool_status(client: &reqwest::Client, api: &str) -> Value {
    let Ok(resp) = client.get(format!("{api}/health/detailed")).send().await else {
        return Value::Null;
    };
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    body["data"]["pool"].clone()
}

/// Waits until the pool holds `ready` clones and, with `quiet`, is making
/// none; how long it took, or the last status when `bound` ran out.
async fn wait_pool(
    client: &reqwest::Client,
    api: &str,
    ready: u64,
    quiet: bool,
    bound: Duration,
) -> Result<Duration, Value> {
    let started = Instant::now();
    loop {
        let pool = pool_status(client, api).await;
        let enough = pool["ready"].as_u64().is_some_and(|n| n >= ready);
        let calm = !quiet || pool["filling"].as_u64() == Some(0);
        if enough && calm {
            return Ok(started.elapsed());
        }
        if pool["template"]["state"] == "unsupported" || started.elapsed() > bound {
            return Err(pool);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Creates that took the warm path so far, from `/metrics`.
async fn warm_count(client: &reqwest::Client, api: &str) -> f64 {
    let url = format!("{}/metrics", api.trim_end_matches("/api/v1"));
    let text = match client.get(&url).send().await {
        Ok(resp) => resp.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let series = "webhoster_create_duration_seconds_count{path=\"warm\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// serve's log lines about warm clones that failed or were thrown away:
/// why a create took the cold path.
fn fallback_reasons(dep: &Deployment) -> Vec<String> {
    let log = std::fs::read_to_string(dep.state_dir().join("serve.log")).unwrap_or_default();
    log.lines()
        .filter(|l| {
            l.contains(" WARN ")
                && (l.contains("warm clone") || l.contains("warm pool:") || l.contains("template"))
        })
        .map(|l| l.chars().take(600).collect())
        .collect()
}

/// (PSS, RSS) of process `pid` in MiB, from `/proc/<pid>/smaps_rollup`.
fn memory_mib(pid: i32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
    };
    Some((field("Pss:")?, field("Rss:")?))
}

/// The machine's CPU time so far, in seconds, from `/proc/stat`: (busy:
/// user, nice, system, irq and softirq of all CPUs; stolen by the
/// hypervisor). Wall time on this shared machine swings with its
/// neighbours; the CPU a create costs does much less.
fn machine_cpu() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0) / webhoster::vmm::clock_ticks_per_second();
    (at(0) + at(1) + at(2) + at(5) + at(6), at(7))
}

/// How long the CPU of an idle VM's QEMU is sampled.
const IDLE_CPU_SAMPLE: Duration = Duration::from_secs(10);

/// Milliseconds of CPU per second each of `pids` uses over [`IDLE_CPU_SAMPLE`].
async fn idle_cpu_ms_per_s(pids: &[i32]) -> Vec<f64> {
    let process_cpu = |pid: i32| {
        webhoster::vmm::process_usage(std::path::Path::new(&format!("/proc/{pid}")))
            .ok()
            .map(|(cpu, _)| cpu)
    };
    let before: Vec<Option<f64>> = pids.iter().map(|&p| process_cpu(p)).collect();
    tokio::time::sleep(IDLE_CPU_SAMPLE).await;
    pids.iter()
        .zip(before)
        .filter_map(|(&p, b)| Some((process_cpu(p)? - b?) * 1000.0 / IDLE_CPU_SAMPLE.as_secs_f64()))
        .collect()
}

/// How long an idle VM runs before its memory is read.
const IDLE_AFTER_CREATE: Duration = Duration::from_secs(60);
/// Clones the warm part's pool keeps ready: the 10 concurrent creates.
const WARM_POOL: u64 = 10;
/// The template's boot and the pool's fill, generously for TCG on 2 cores.
const POOL_FILL_BOUND: Duration = Duration::from_secs(1800);
/// A refill of a few clones between sequential runs.
const REFILL_BOUND: Duration = Duration::from_secs(600);

/// One create, timed from POST to its answer; then the first site request
/// through nginx and the first SSH login, right after a 201.
struct Timed {
    status: u16,
    body: Value,
    secs: f64,
    /// Machine CPU seconds (busy, stolen) from POST to the answer.
    cpu: (f64, f64),
    /// (status, seconds) of the first site request.
    site: Option<(u16, f64)>,
    /// (logged in, seconds) of the first SSH login.
    login: Option<(bool, f64)>,
}

async fn timed_create(client: &reqwest::Client, dep: &Deployment, user: &User) -> Timed {
    let (cpu, started) = (machine_cpu(), Instant::now());
    let (status, body) = user.create(client, &dep.api).await;
    let secs = started.elapsed().as_secs_f64();
    let after = machine_cpu();
    Timed {
        status,
        body,
        secs,
        cpu: (after.0 - cpu.0, after.1 - cpu.1),
        site: None,
        login: None,
    }
}

impl Timed {
    fn vm_id(&self) -> &str {
        self.body["data"]["hosting"]["vm_id"].as_str().unwrap_or("")
    }

    /// The first site request and SSH login, one after the other.
    fn first_use(&mut self, dep: &Deployment, user: &User) {
        let port = self.body["data"]["hosting"]["ssh_port"].as_u64().unwrap_or(0) as u16;
        let at = Instant::now();
        let (code, _) = dep.get_site(user.id);
        self.site = Some((code, at.elapsed().as_secs_f64()));
        let at = Instant::now();
        let ok = ssh("127.0.0.1", port, "ubuntu", &user.key, "true")
            .status
            .success();
        self.login = Some((ok, at.elapsed().as_secs_f64()));
    }
}

/// The memory of the QEMU of `vm_id`, read once the VM is
/// [`IDLE_AFTER_CREATE`] old.
async fn idle_memory(dep: &Deployment, vm_id: &str, created: Instant) -> Option<(f64, f64)> {
    let wait = IDLE_AFTER_CREATE.saturating_sub(created.elapsed());
    tokio::time::sleep(wait).await;
    let pid = std::fs::read_to_string(dep.vm_dir(vm_id).join("qemu.pid")).ok()?;
    memory_mib(pid.trim().parse().ok()?)
}

/// The cold reference of the warm part: a deployment without a pool, one
/// create; (seconds to its 201, (PSS, RSS) of its QEMU once idle).
async fn cold_reference(client: &reqwest::Client) -> (f64, Option<(f64, f64)>) {
    let mut dep = Deployment::new();
    dep.env.insert("WEBHOSTER_PLAN", PLAN.into());
    dep.env.insert("WEBHOSTER_WARM_POOL", "0".into());
    dep.env.insert("WEBHOSTER_READY_TIMEOUT", "1200".into());
    dep.start().await;
    let user = sign_up(client, &dep.api, &unique_name("cold")).await;
    let created = timed_create(client, &dep, &user).await;
    assert_eq!(created.status, 201, "the cold reference create: {}", created.body);
    let memory = idle_memory(&dep, created.vm_id(), Instant::now()).await;
    eprintln!(
        "cold reference: 201 in {:.1} s, QEMU PSS/RSS {memory:?} MiB after {IDLE_AFTER_CREATE:?}",
        created.secs
    );
    user.delete_host(client, &dep.api).await;
    (created.secs, memory)
}

async fn warm_figures() {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1800))
        .build()
        .unwrap();
    // The machine is quietest before any deployment: the bare boots first.
    let bare = bare_boots(PLAN, RUNS).await;
    let (cold_secs, cold_memory) = cold_reference(&client).await;

    let mut dep = Deployment::new();
    dep.env.insert("WEBHOSTER_PLAN", PLAN.into());
    dep.env.insert("WEBHOSTER_WARM_POOL", WARM_POOL.to_string());
    dep.env.insert("WEBHOSTER_READY_TIMEOUT", "1200".into());
    let started = Instant::now();
    dep.start().await;
    let api = dep.api.clone();
    // The template is built once; its time is when its state turns ready.
    let mut template_secs = None;
    let filled = loop {
        let pool = pool_status(&client, &api).await;
        if template_secs.is_none() && pool["template"]["state"] == "ready" {
            template_secs = Some(started.elapsed().as_secs_f64());
        }
        if pool["ready"].as_u64().is_some_and(|n| n >= WARM_POOL) {
            break started.elapsed().as_secs_f64();
        }
        if pool["template"]["state"] == "unsupported" || started.elapsed() > POOL_FILL_BOUND {
            panic!(
                "the pool did not fill to {WARM_POOL} within {POOL_FILL_BOUND:?}: {pool}\n{}",
                dep.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "pool: template ready {template_secs:?} s, {WARM_POOL} clones ready {filled:.1} s after serve's start"
    );

    // One warm create at a time, each on a full and quiet pool.
    let mut runs = Vec::new();
    let mut hostings = Vec::new();
    for run in 0..RUNS {
        if let Err(pool) = wait_pool(&client, &api, WARM_POOL, true, REFILL_BOUND).await {
            eprintln!("run {run}: the pool is not full and quiet after {REFILL_BOUND:?}: {pool}");
        }
        let user = sign_up(&client, &api, &unique_name("warm")).await;
        let before = warm_count(&client, &api).await;
        let mut t = timed_create(&client, &dep, &user).await;
        let created = Instant::now();
        if t.status == 201 {
            t.first_use(&dep, &user);
        }
        let warm = warm_count(&client, &api).await > before;
        eprintln!(
            "warm run {run}: {} {} in {:.3} s, first site request {:?}, first SSH login {:?}",
            if warm { "warm" } else { "COLD" },
            t.status,
            t.secs,
            t.site,
            t.login
        );
        if t.status != 201 {
            println!("warm create {run} failed: {} {}", t.status, t.body);
        }
        let steps = dep.step_timings(t.vm_id());
        runs.push((warm, t, steps));
        hostings.push((user, created));
    }
    // Idle memory of each warm VM, 60 s after its create.
    let mut warm_memory = Vec::new();
    for ((_, t, _), (_, created)) in runs.iter().zip(&hostings) {
        if t.status == 201 {
            warm_memory.push(idle_memory(&dep, t.vm_id(), *created).await);
        }
    }
    // Then their CPU, idle: the guest's timers and webhoster's looks at
    // its doors, all emulated.
    let warm_pids: Vec<i32> = runs
        .iter()
        .filter(|(_, t, _)| t.status == 201)
        .filter_map(|(_, t, _)| std::fs::read_to_string(dep.vm_dir(t.vm_id()).join("qemu.pid")).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let idle_cpu = idle_cpu_ms_per_s(&warm_pids).await;
    let pool_clone_memory: Vec<(f64, f64)> = std::fs::read_dir(dep.state_dir().join("vms"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            runs.iter()
                .all(|(_, t, _)| t.vm_id() != e.file_name().to_string_lossy())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("qemu.pid")).ok())
        .filter_map(|p| p.trim().parse().ok())
        .filter_map(memory_mib)
        .collect();
    for (user, _) in &hostings {
        user.delete_host(&client, &api).await;
    }

    // Ten at once, on a full pool.
    if let Err(pool) = wait_pool(&client, &api, WARM_POOL, true, REFILL_BOUND).await {
        eprintln!("concurrent: the pool is not full and quiet after {REFILL_BOUND:?}: {pool}");
    }
    let mut users = Vec::new();
    for _ in 0..CONCURRENT {
        users.push(sign_up(&client, &api, &unique_name("wconc")).await);
    }
    let before = warm_count(&client, &api).await;
    let (cpu_before, started) = (machine_cpu(), Instant::now());
    let results = futures::future::join_all(users.iter().map(|u| timed_create(&client, &dep, u))).await;
    let concurrent_secs = started.elapsed().as_secs_f64();
    let cpu_after = machine_cpu();
    let concurrent_cpu = (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1);
    let concurrent_warm = warm_count(&client, &api).await - before;
    let failures = results.iter().filter(|t| t.status != 201).count();
    for t in results.iter().filter(|t| t.status != 201) {
        println!("concurrent warm create failed: {} {}", t.status, t.body);
    }
    let live_after = users
        .iter()
        .zip(&results)
        .filter(|(u, t)| t.status == 201 && dep.get_site(u.id).0 == 200)
        .count();
    for (user, t) in users.iter().zip(&results) {
        if t.status == 201 {
            user.delete_host(&client, &api).await;
        }
    }

    let warm_runs: Vec<_> = runs
        .iter()
        .filter(|(warm, t, _)| *warm && t.status == 201)
        .collect();
    let creates: Vec<f64> = warm_runs.iter().map(|(_, t, _)| t.secs).collect();
    let sites: Vec<f64> = warm_runs
        .iter()
        .filter_map(|(_, t, _)| t.site.filter(|(code, _)| *code == 200).map(|(_, s)| s * 1000.0))
        .collect();
    let logins: Vec<f64> = warm_runs
        .iter()
        .filter_map(|(_, t, _)| t.login.filter(|(ok, _)| *ok).map(|(_, s)| s))
        .collect();
    let qemu = median(bare.clone());
    println!("== warm create (plan {PLAN}, pool of {WARM_POOL}, TCG) ==");
    println!(
        "template ready {:.1} s and pool of {WARM_POOL} full {filled:.1} s after serve's start",
        template_secs.unwrap_or(f64::NAN)
    );
    println!(
        "bare qemu-system boot to HTTP 200 and SSH login, {RUNS} runs: {}",
        summary(&bare)
    );
    println!(
        "warm create (POST -> 201 = site and SSH ready), {} of {RUNS} runs warm: {}",
        creates.len(),
        summary_in(&creates, 3, "s")
    );
    if !creates.is_empty() {
        let warm = median(creates.clone());
        println!(
            "warm create / bare qemu boot: {:.3}x (median {warm:.3} s / {qemu:.1} s)",
            warm / qemu
        );
    }
    println!(
        "cold create (reference, no pool): {cold_secs:.1} s ({:.2}x bare qemu)",
        cold_secs / qemu
    );
    println!(
        "first site request after a warm create (through nginx), {} answered 200: {}",
        sites.len(),
        summary_in(&sites, 0, "ms")
    );
    println!(
        "first SSH login after a warm create, {} logged in: {}",
        logins.len(),
        summary_in(&logins, 2, "s")
    );
    for (run, (warm, t, steps)) in runs.iter().enumerate() {
        let line: Vec<String> = steps
            .iter()
            .map(|(step, secs)| format!("{step} {secs:.2}"))
            .collect();
        println!(
            "  run {run}: {} {} {:.3} s; steps: {}",
            if *warm { "warm" } else { "cold (fell back)" },
            t.status,
            t.secs,
            line.join(", ")
        );
    }
    let ones = if creates.is_empty() {
        f64::NAN
    } else {
        median(creates.clone())
    };
    println!(
        "{CONCURRENT} concurrent warm creates: {concurrent_secs:.1} s total ({:.2}x one warm create), \
         {failures} failures, {concurrent_warm} took the warm path, {live_after} sites answering right after",
        concurrent_secs / ones
    );
    let each: Vec<f64> = results.iter().map(|t| t.secs).collect();
    println!("  each of the {CONCURRENT}: {}", summary_in(&each, 2, "s"));
    // What the ratio can reach: ten creates' CPU spread over every core.
    let one_cpu: Vec<f64> = warm_runs.iter().map(|(_, t, _)| t.cpu.0).collect();
    let one_steal: Vec<f64> = warm_runs.iter().map(|(_, t, _)| t.cpu.1).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let one_cpu_median = if one_cpu.is_empty() {
        f64::NAN
    } else {
        median(one_cpu.clone())
    };
    let floor = CONCURRENT as f64 * one_cpu_median / cores;
    println!(
        "machine CPU of one warm create: {} (stolen: {}); on {cores} cores, {CONCURRENT} such creates need {floor:.1} s ({:.2}x one warm create)",
        summary_in(&one_cpu, 2, "CPU-s"),
        summary_in(&one_steal, 2, "s"),
        floor / ones
    );
    println!(
        "machine CPU of the {CONCURRENT} concurrent: {:.1} CPU-s ({:.2} per create, {:.2}x one's), {:.1} s stolen",
        concurrent_cpu.0,
        concurrent_cpu.0 / CONCURRENT as f64,
        concurrent_cpu.0 / CONCURRENT as f64 / one_cpu_median,
        concurrent_cpu.1
    );
    println!(
        "idle warm VMs' QEMU, {IDLE_CPU_SAMPLE:?} sampled {IDLE_AFTER_CREATE:?} or more after the create ({}): {}",
        idle_cpu.len(),
        summary_in(&idle_cpu, 0, "ms of CPU per s")
    );
    let pss: Vec<f64> = warm_memory.iter().flatten().map(|(p, _)| *p).collect();
    let rss: Vec<f64> = warm_memory.iter().flatten().map(|(_, r)| *r).collect();
    println!(
        "idle QEMU memory {IDLE_AFTER_CREATE:?} after the create, warm clones ({}): PSS {}; RSS {}",
        pss.len(),
        summary_in(&pss, 0, "MiB"),
        summary_in(&rss, 0, "MiB")
    );
    match cold_memory {
        Some((p, r)) => println!("idle QEMU memory of a cold VM: PSS {p:.0} MiB, RSS {r:.0} MiB"),
        None => println!("idle QEMU memory of a cold VM: not read"),
    }
    let pool_pss: Vec<f64> = pool_clone_memory.iter().map(|(p, _)| *p).collect();
    println!(
        "paused pool clones ({}): PSS {}",
        pool_pss.len(),
        summary_in(&pool_pss, 0, "MiB")
    );
    let reasons = fallback_reasons(&dep);
    if !reasons.is_empty() {
        println!("serve's log on warm clones that failed or were discarded:");
        for line in &reasons {
            println!("  {line}");
        }
    }
}

/// The density part's VMs at most (`E2E_DENSITY_MAX`): the seeds' promise.
const DENSITY_MAX: u16 = 100;
/// VMs between two of the density part's checks (`E2E_DENSITY_STEP`).
const DENSITY_STEP: usize = 10;
/// The API's p99 latency a density check allows, in milliseconds.
const DENSITY_P99_MS: f64 = 50.0;
/// The density part stops creating after this long (`E2E_DENSITY_SECS`):
/// under TCG idle guests still cost CPU, and creates slow down as they add up.
const DENSITY_BUDGET: Duration = Duration::from_secs(900);
/// The density part stops creating when the host has less than this.
const MEM_LOW_MIB: f64 = 2048.0;
/// Requests for the API's latency percentiles.
const LATENCY_REQUESTS: usize = 200;

fn mem_available_mib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

const KSM: &str = "/sys/kernel/mm/ksm";

fn ksm_read(name: &str) -> String {
    std::fs::read_to_string(format!("{KSM}/{name}"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn ksm_write(name: &str, value: &str) {
    if let Err(e) = std::fs::write(format!("{KSM}/{name}"), value) {
        eprintln!("writing {value} to {KSM}/{name}: {e}");
    }
}

/// KSM's settings as they were; put back on drop, also on a panic (they
/// are the whole host's).
struct KsmRestore {
    run: String,
    pages_to_scan: String,
}

impl KsmRestore {
    fn save() -> KsmRestore {
        KsmRestore {
            run: ksm_read("run"),
            pages_to_scan: ksm_read("pages_to_scan"),
        }
    }
}

impl Drop for KsmRestore {
    fn drop(&mut self) {
        if !self.pages_to_scan.is_empty() {
            ksm_write("pages_to_scan", &self.pages_to_scan);
        }
        if !self.run.is_empty() {
            ksm_write("run", &self.run);
        }
    }
}

/// What a density check measured.
struct DensityCheck {
    p99_ms: f64,
    errors: usize,
    answering: usize,
}

impl DensityCheck {
    fn passed(&self, vms: usize) -> bool {
        self.p99_ms < DENSITY_P99_MS && self.errors == 0 && self.answering == vms
    }
}

/// The API's latency and the sites of `users`, printed under `what`.
async fn density_snapshot(what: &str, dep: &Deployment, users: &[(User, String)]) -> DensityCheck {
    let fast = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let health = format!("{}/health", dep.api);
    let mut ms = Vec::with_capacity(LATENCY_REQUESTS);
    let mut errors = 0;
    for _ in 0..LATENCY_REQUESTS {
        let at = Instant::now();
        match fast.get(&health).send().await {
            Ok(resp) if resp.status().is_success() => {
                let _ = resp.bytes().await;
                ms.push(at.elapsed().as_secs_f64() * 1000.0);
            }
            _ => errors += 1,
        }
    }
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        ms.get(((ms.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let answering = users.iter().filter(|(u, _)| dep.get_site(u.id).0 == 200).count();
    let pss: f64 = users
        .iter()
        .filter_map(|(_, vm_id)| {
            let pid = std::fs::read_to_string(dep.vm_dir(vm_id).join("qemu.pid")).ok()?;
            memory_mib(pid.trim().parse().ok()?)
        })
        .map(|(p, _)| p)
        .sum();
    println!(
        "{what}: {} idle VMs; API GET /health p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         ({LATENCY_REQUESTS} requests, {errors} errors); {answering} of {} sites answer 200; \
         their QEMUs' PSS {pss:.0} MiB in all ({:.0} MiB each); host MemAvailable {:.0} MiB; \
         load {}",
        users.len(),
        pct(0.5),
        pct(0.99),
        ms.last().copied().unwrap_or(f64::NAN),
        users.len(),
        pss / users.len().max(1) as f64,
        mem_available_mib(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    DensityCheck {
        p99_ms: pct(0.99),
        errors,
        answering,
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn density_figures() {
    let max: u16 = env_or("E2E_DENSITY_MAX", DENSITY_MAX);
    let step: usize = env_or("E2E_DENSITY_STEP", DENSITY_STEP).max(1);
    let budget = Duration::from_secs(env_or("E2E_DENSITY_SECS", DENSITY_BUDGET.as_secs()));
    let ksm = KsmRestore::save();
    ksm_write("run", "0");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1800))
        .build()
        .unwrap();
    let mut dep = Deployment::with_ssh_ports(max);
    dep.env.insert("WEBHOSTER_PLAN", "small".into());
    dep.env.insert("WEBHOSTER_WARM_POOL", "5".into());
    dep.env.insert("WEBHOSTER_READY_TIMEOUT", "1200".into());
    // What the host carries, not what admission lets in: its default budget
    // counts each VM at its plan's RAM plus overhead (896 MiB for `small`,
    // 24 here), while an idle clone takes about 130 MiB.
    dep.env.insert("WEBHOSTER_MEMORY_BUDGET_MIB", "1000000".into());
    dep.start().await;
    let api = dep.api.clone();
    if let Err(pool) = wait_pool(&client, &api, 5, false, POOL_FILL_BOUND).await {
        println!("density: the pool did not fill (creates go cold): {pool}");
    }
    let started = Instant::now();
    let mut users = Vec::new();
    let mut secs = Vec::new();
    let mut failures = 0;
    let mut passed = 0;
    let mut stopped_by = format!("the cap of {max} (E2E_DENSITY_MAX)");
    while users.len() < usize::from(max) {
        if started.elapsed() > budget {
            stopped_by = format!("the time budget of {budget:?} (E2E_DENSITY_SECS)");
            break;
        }
        if mem_available_mib() < MEM_LOW_MIB {
            stopped_by = format!("MemAvailable under {MEM_LOW_MIB} MiB");
            break;
        }
        let _ = wait_pool(&client, &api, 1, false, REFILL_BOUND).await;
        let user = sign_up(&client, &api, &unique_name("dense")).await;
        let t = timed_create(&client, &dep, &user).await;
        if t.status != 201 {
            println!("density: create {} failed: {} {}", users.len(), t.status, t.body);
            failures += 1;
            if failures >= 3 {
                stopped_by = "3 failed creates".into();
                break;
            }
            continue;
        }
        eprintln!("density: VM {} in {:.2} s", users.len() + 1, t.secs);
        secs.push(t.secs);
        let vm_id = t.vm_id().to_owned();
        users.push((user, vm_id));
        if users.len() % step == 0 {
            let check = density_snapshot("density check", &dep, &users).await;
            if !check.passed(users.len()) {
                stopped_by = format!(
                    "a failed check at {} VMs (p99 {:.1} ms, {} of them answering)",
                    users.len(),
                    check.p99_ms,
                    check.answering
                );
                break;
            }
            passed = users.len();
        }
    }
    println!(
        "density: {passed} idle small VMs passed a check (API p99 under {DENSITY_P99_MS} ms, \
         every site answering), checked every {step}"
    );
    let pool = pool_status(&client, &api).await;
    println!(
        "density: {} small VMs created in {:.0} s (stopped by {stopped_by}; {failures} failures); \
         creates {}; besides them the pool holds {} paused clones",
        users.len(),
        started.elapsed().as_secs_f64(),
        summary_in(&secs, 2, "s"),
        pool["ready"]
    );
    tokio::time::sleep(IDLE_AFTER_CREATE).await;
    density_snapshot("without KSM", &dep, &users).await;

    ksm_write("pages_to_scan", "1000");
    ksm_write("run", "1");
    // Until ksmd has been over all memory twice (merging needs a page to
    // look the same in two scans), at most 5 minutes.
    let scans = ksm_read("full_scans").parse::<u64>().unwrap_or(0);
    let merging = Instant::now();
    while ksm_read("full_scans").parse::<u64>().unwrap_or(0) < scans + 2
        && merging.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let sharing: f64 = ksm_read("pages_sharing").parse().unwrap_or(f64::NAN);
    println!(
        "with KSM (pages_to_scan 1000): {:.0} s of merging, pages_sharing {sharing} ({:.0} MiB saved)",
        merging.elapsed().as_secs_f64(),
        sharing * 4.0 / 1024.0
    );
    density_snapshot("with KSM", &dep, &users).await;
    drop(ksm);
    for line in fallback_reasons(&dep) {
        println!("density: serve's log on a warm clone: {line}");
    }
    for (user, _) in &users {
        user.delete_host(&client, &api).await;
    }
}
