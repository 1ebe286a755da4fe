//! The headline figures: time from `POST /api/v1/host` to a live site (200
//! through nginx) and a successful SSH login, against a bare `qemu-system`
//! boot of the same image with the same resources; and 10 concurrent creates.
//! Run with `cargo bench --bench e2e`; prints figures, asserts nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::deploy::{Deployment, sign_up};
use common::guest::{Guest, GuestOptions, TestKey, ssh, test_image, wait_for};
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

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
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
