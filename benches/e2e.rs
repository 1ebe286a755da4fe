//! The headline figures: time from `POST /api/v1/host` to a live site (200
//! through nginx) and a successful SSH login, against a bare `qemu-system`
//! boot of the same image with the same resources; and 10 concurrent creates.
//! Run with `cargo bench --bench e2e`; prints figures, asserts nothing.
//!
//! Parts, chosen by name (arguments after `--`, or `E2E_PARTS`, comma
//! separated; default `create`, the figures above):
//! - `create`: the figures above;
//! - `teardown`: after `webhoster teardown` (what a host reboot leaves), the
//!   time from `serve` start until every hosting is live again (site 200
//!   through nginx and an SSH banner), with 1 and with 5 hostings
//!   (`E2E_TEARDOWN_SIZES`, comma separated, sets the counts).
//!
//! `cargo bench --bench e2e -- create teardown` runs both.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::deploy::{Deployment, sign_up};
use common::guest::{Guest, GuestOptions, TestKey, ssh, ssh_banner, test_image, wait_for};
use common::host::unique_name;

const RUNS: usize = 5;
/// The product's default plan.
const PLAN: &str = "standard";
const CONCURRENT: usize = 10;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn summary(xs: &[f64]) -> String {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    format!(
        "min {:.1} s, median {:.1} s, max {:.1} s",
        s[0],
        s[s.len() / 2],
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
            other => panic!("unknown part {other:?}: the parts are create and teardown"),
        }
    }
}

async fn create_figures() {
    let mut dep = Deployment::new();
    dep.env.insert("WEBHOSTER_PLAN", PLAN.into());
    // Ten TCG guests booting at once on two cores take minutes, not seconds.
    dep.env.insert("WEBHOSTER_READY_TIMEOUT", "1200".into());
    dep.start().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1800))
        .build()
        .unwrap();

    // Time to live site, one create at a time.
    let mut live = Vec::new();
    let mut breakdowns = Vec::new();
    for run in 0..RUNS {
        let user = sign_up(&client, &dep.api, &unique_name("bench")).await;
        let started = Instant::now();
        let (status, body) = user.create(&client, &dep.api).await;
        assert_eq!(status, 201, "{body}");
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
        breakdowns.push(
            dep.step_timings(body["data"]["hosting"]["vm_id"].as_str().unwrap())
                .await,
        );
        eprintln!("run {run}: live in {secs:.1} s");
        user.delete_host(&client, &dep.api).await;
    }

    // The same image and resources, booted by hand with bare QEMU.
    let plan = webhoster::vmm::Plan::load(PLAN).unwrap();
    let image = test_image();
    let mut bare = Vec::new();
    for run in 0..RUNS {
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
    println!("step breakdown of each run (seconds per create step, from the journal):");
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
