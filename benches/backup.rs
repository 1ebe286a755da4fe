//! Backups on the real service and a real guest (`standard` plan: 20 GiB
//! thin disk): the time of a full and of an incremental backup of a fresh
//! VM and after 100 MB written in it, the time of a restore, and the site's
//! request latency while backups run against idle. Run with
//! `cargo bench --bench backup`; prints figures, asserts nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::deploy::{Deployment, User, call, sign_up};
use common::guest::{http_get, ssh};
use common::host::unique_name;
use reqwest::Method;
use serde_json::Value;

/// Site requests per latency sample.
const REQUESTS: usize = 200;
/// Between two site requests: nginx serves a visitor 20 requests a second
/// per site (then 429).
const PACE: Duration = Duration::from_millis(60);

struct Bench {
    dep: Deployment,
    client: reqwest::Client,
    user: User,
    ssh_port: u16,
}

impl Bench {
    async fn api(&self, method: Method, path: &str) -> (u16, Value) {
        call(
            &self.client,
            method,
            &format!("{}/host/my{path}", self.dep.api),
            Some(&self.user.token),
            None,
        )
        .await
    }

    /// Takes a backup and waits for it: (seconds, row).
    async fn backup(&self) -> (f64, Value) {
        let started = Instant::now();
        let (status, body) = self.api(Method::POST, "/backups").await;
        assert_eq!(status, 202, "{body}");
        let id = body["data"]["id"].clone();
        loop {
            let (_, all) = self.api(Method::GET, "/backups").await;
            let row = all["data"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["id"] == id)
                .cloned();
            let row = row.unwrap_or_else(|| panic!("backup {id} failed:\n{}", self.dep.log_tail()));
            if row["status"] == "complete" {
                return (started.elapsed().as_secs_f64(), row);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn delete_all(&self) {
        let (_, all) = self.api(Method::GET, "/backups").await;
        for b in all["data"].as_array().unwrap() {
            let (status, body) = self.api(Method::DELETE, &format!("/backups/{}", b["id"])).await;
            assert_eq!(status, 200, "{body}");
        }
    }

    fn report(what: &str, (secs, row): &(f64, Value)) {
        println!(
            "{what}: {secs:.2} s, {} backup of {:.1} MiB",
            row["kind"].as_str().unwrap_or("?"),
            row["size_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0
        );
    }
}

/// Site latencies (ms, sorted) of `REQUESTS` paced GETs through nginx.
fn latencies(http_port: u16, user_id: i64, stop: Option<Arc<AtomicBool>>) -> Vec<f64> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, http_port));
    let mut out = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        if stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        let started = Instant::now();
        let (status, _) = http_get(addr, &format!("/{user_id}/")).expect("the site answers");
        assert_eq!(status, 200);
        out.push(started.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(PACE);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn percentiles(xs: &[f64]) -> String {
    let at = |p: f64| xs[((xs.len() - 1) as f64 * p) as usize];
    format!(
        "n {}, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        xs.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        xs[xs.len() - 1]
    )
}

#[tokio::main]
async fn main() {
    let mut dep = Deployment::new();
    dep.env.insert("WEBHOSTER_PLAN", "standard".into());
    dep.start().await;
    let client = reqwest::Client::new();
    let user = sign_up(&client, &dep.api, &unique_name("bkb")).await;
    let (status, created) = user.create(&client, &dep.api).await;
    assert_eq!(status, 201, "{created}\n{}", dep.log_tail());
    let ssh_port = created["data"]["hosting"]["ssh_port"].as_u64().unwrap() as u16;
    let b = Bench {
        dep,
        client,
        user,
        ssh_port,
    };
    let used = ssh(
        "127.0.0.1",
        b.ssh_port,
        "ubuntu",
        &b.user.key,
        "df -m --output=used / | tail -1",
    );
    println!(
        "guest file system: {} MiB used of a 20 GiB thin disk",
        String::from_utf8_lossy(&used.stdout).trim()
    );

    Bench::report("full backup, fresh VM", &b.backup().await);
    Bench::report("incremental backup, fresh VM", &b.backup().await);
    let out = ssh(
        "127.0.0.1",
        b.ssh_port,
        "ubuntu",
        &b.user.key,
        "sudo dd if=/dev/urandom of=/var/tmp/fill bs=1M count=100 status=none && sync",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Bench::report("incremental backup after 100 MB written", &b.backup().await);
    b.delete_all().await;
    let last = b.backup().await;
    Bench::report("full backup after 100 MB written", &last);

    let started = Instant::now();
    let (status, body) = b
        .api(Method::POST, &format!("/backups/{}/restore", last.1["id"]))
        .await;
    assert_eq!(status, 200, "{body}");
    println!(
        "restore (clean stop, disk rebuilt, boot until the site and SSH answer): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (port, user_id) = (b.dep.http_port, b.user.id);
    let idle = tokio::task::spawn_blocking(move || latencies(port, user_id, None))
        .await
        .unwrap();
    println!("site latency, idle: {}", percentiles(&idle));
    // Full backups one after another (each after deleting the last, so each
    // copies everything) while the site is measured.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let measuring = tokio::task::spawn_blocking(move || latencies(port, user_id, Some(flag)));
    let mut backups = 0;
    while !measuring.is_finished() {
        b.delete_all().await;
        b.backup().await;
        backups += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let busy = measuring.await.unwrap();
    println!(
        "site latency, during {backups} full backups: {}",
        percentiles(&busy)
    );
}
