//! Backups and restore, end to end: the real `webhoster serve`, a real
//! guest (TCG here), real QEMU jobs and qemu-img. One hosting is shared by
//! every check, in order, because a booted guest costs a minute or two:
//!
//! 1. page A, a full backup (1) while the site is polled: every request
//!    answers 200, the API shows progress, the backup is `frozen`
//!    (the guest agent froze the file systems);
//! 2. page B, an incremental (2) on 1; page C, an incremental (3) on 2;
//!    then page D;
//! 3. restore 2, in the middle of the chain: the site shows B; restore 1:
//!    the site shows A (same address and SSH host key);
//! 4. 300 MB written, a backup started (full: a restore leaves no bitmap),
//!    `kill -9` of serve while QEMU copies, serve again: the listing shows
//!    1, 2, 3 only, no file of the killed backup is left, no job runs in
//!    QEMU, and the next backup (taken with `webhoster vm backup`) completes;
//! 5. deleting 2 (the middle of 1 <- 2 <- 3) keeps 3 restorable (page C);
//! 6. deleting the hosting removes its backups.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::deploy::{Deployment, User, call, sign_up};
use common::guest::{http_get, sftp_put, ssh, ssh_host_keys};
use common::host::unique_name;
use reqwest::Method;
use serde_json::Value;

/// A backup of a fresh small VM takes seconds; the bound is for a loaded host.
const BACKUP_DONE: Duration = Duration::from_secs(300);

struct Test {
    dep: Deployment,
    client: reqwest::Client,
    user: User,
    ssh_port: u16,
}

impl Test {
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

    fn upload(&self, content: &str) {
        let local = self.dep.state_dir().join("upload.html");
        std::fs::write(&local, content).unwrap();
        let out = sftp_put(
            "127.0.0.1",
            self.ssh_port,
            "ubuntu",
            &self.user.key,
            &local,
            "/var/www/html/index.html",
        );
        assert!(
            out.status.success(),
            "sftp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            self.dep.get_site(self.user.id).1.trim(),
            content,
            "the page was not replaced"
        );
    }

    fn sh(&self, cmd: &str) -> String {
        let out = ssh("127.0.0.1", self.ssh_port, "ubuntu", &self.user.key, cmd);
        assert!(
            out.status.success(),
            "ssh {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn backups(&self) -> Vec<Value> {
        let (status, body) = self.api(Method::GET, "/backups").await;
        assert_eq!(status, 200, "{body}");
        body["data"].as_array().unwrap().clone()
    }

    /// Starts a backup and returns its id.
    async fn start_backup(&self) -> i64 {
        let (status, body) = self.api(Method::POST, "/backups").await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["data"]["status"], "running", "{body}");
        body["data"]["id"].as_i64().unwrap()
    }

    /// Waits for backup `id` to complete; returns its row and the progress
    /// figures seen on the way.
    async fn wait_backup(&self, id: i64) -> (Value, Vec<f64>) {
        let started = Instant::now();
        let mut seen = Vec::new();
        loop {
            let all = self.backups().await;
            let b = all
                .iter()
                .find(|b| b["id"] == id)
                .unwrap_or_else(|| panic!("backup {id} vanished: {all:?}\n{}", self.dep.log_tail()))
                .clone();
            if b["status"] == "complete" {
                assert!(b["progress"].is_null(), "{b}");
                return (b, seen);
            }
            if let Some(p) = b["progress"]["percent"].as_f64() {
                seen.push(p);
            }
            assert!(
                started.elapsed() < BACKUP_DONE,
                "backup {id} not complete after {BACKUP_DONE:?}: {b}\n{}",
                self.dep.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn restore(&self, id: i64) {
        let started = Instant::now();
        let (status, body) = self.api(Method::POST, &format!("/backups/{id}/restore")).await;
        assert_eq!(status, 200, "restore {id}: {body}\n{}", self.dep.log_tail());
        println!("restore of {id}: {:.1} s", started.elapsed().as_secs_f64());
        let (_, host) = self.api(Method::GET, "").await;
        assert_eq!(host["data"]["hosting"]["status"], "running", "{host}");
    }
}

/// Polls the site every 100 ms on its own thread until stopped; returns the
/// statuses of the requests that did not answer 200.
struct SiteWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl SiteWatch {
    fn start(http_port: u16, user_id: i64) -> SiteWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, http_port));
            let (mut n, mut bad) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                match http_get(addr, &format!("/{user_id}/")) {
                    Ok((200, _)) => {}
                    Ok((status, _)) => bad.push(status.to_string()),
                    Err(e) => bad.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (n, bad)
        });
        SiteWatch { stop, thread }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_restore_and_survive_a_crash_of_serve() {
    let mut dep = Deployment::new();
    dep.start().await;
    let client = reqwest::Client::new();
    let user = sign_up(&client, &dep.api, &unique_name("bk")).await;
    let started = Instant::now();
    let (status, created) = user.create(&client, &dep.api).await;
    assert_eq!(status, 201, "{created}\n{}", dep.log_tail());
    println!("create: {:.1} s", started.elapsed().as_secs_f64());
    let ssh_port = created["data"]["hosting"]["ssh_port"].as_u64().unwrap() as u16;
    let vm_id = created["data"]["hosting"]["vm_id"].as_str().unwrap().to_owned();
    let t = Test {
        dep,
        client,
        user,
        ssh_port,
    };
    let host_keys = ssh_host_keys("127.0.0.1", ssh_port);

    // 1. A full backup while the site is polled.
    t.upload("page A");
    let watch = SiteWatch::start(t.dep.http_port, t.user.id);
    let started = Instant::now();
    let b1 = t.start_backup().await;
    let (row, progress) = t.wait_backup(b1).await;
    println!("full backup: {:.1} s", started.elapsed().as_secs_f64());
    let (requests, failed) = watch.finish();
    println!("site during the backup: {requests} requests, failed: {failed:?}; progress seen: {progress:?}");
    assert!(
        requests > 0 && failed.is_empty(),
        "the site stopped answering during the backup: {failed:?}"
    );
    assert_eq!(row["kind"], "full", "{row}");
    assert_eq!(row["consistency"], "frozen", "{row}");
    assert!(row["size_bytes"].as_u64().unwrap() > 0, "{row}");

    // A second backup while one runs is refused.
    t.upload("page B");
    let b2 = t.start_backup().await;
    let (status, body) = t.api(Method::POST, "/backups").await;
    let (row, _) = t.wait_backup(b2).await;
    assert!(
        status == 409 || row["status"] == "complete",
        "a second backup at once answered {status}: {body}"
    );
    if status == 202 {
        // It started after the first ended: wait for it too and drop it.
        let extra = body["data"]["id"].as_i64().unwrap();
        t.wait_backup(extra).await;
        let (s, b) = t.api(Method::DELETE, &format!("/backups/{extra}")).await;
        assert_eq!(s, 200, "{b}");
    } else {
        assert_eq!(body["error"]["code"], "hosting_busy", "{body}");
    }
    assert_eq!(row["kind"], "incremental", "{row}");
    assert_eq!(row["parent_id"], b1, "{row}");

    // 2. Another increment, then the page changes again.
    t.upload("page C");
    let started = Instant::now();
    let b3 = t.start_backup().await;
    let (row, _) = t.wait_backup(b3).await;
    println!("incremental backup: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(row["kind"], "incremental", "{row}");
    assert_eq!(row["parent_id"], b2, "{row}");
    t.upload("page D");

    // 3. The middle of the chain, then its start.
    t.restore(b2).await;
    assert_eq!(t.dep.get_site(t.user.id).1.trim(), "page B");
    t.restore(b1).await;
    assert_eq!(t.dep.get_site(t.user.id).1.trim(), "page A");
    assert_eq!(
        ssh_host_keys("127.0.0.1", ssh_port),
        host_keys,
        "the SSH host key changed"
    );

    // 4. kill -9 of serve while QEMU copies: once the job has written into
    // the temporary file (watched on the host, much faster than the API).
    t.sh("dd if=/dev/urandom of=/var/tmp/fill bs=1M count=300 status=none && sync");
    let backups_dir = t.dep.vm_dir(&vm_id).join("backups");
    let b4 = t.start_backup().await;
    let partial = backups_dir.join(format!(".{b4}.qcow2.tmp"));
    let mut dep = t.dep;
    let started = Instant::now();
    loop {
        let written = std::fs::metadata(&partial).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        if written > 16 << 20 {
            println!(
                "killing serve with {} MiB in {}",
                written >> 20,
                partial.display()
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the backup never wrote 16 MiB: {}",
            dep.log_tail()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    dep.kill();
    assert!(partial.exists(), "the backup completed before serve was killed");
    dep.start().await;
    let t = Test { dep, ..t };
    let ids: Vec<i64> = t
        .backups()
        .await
        .iter()
        .map(|b| b["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![b1, b2, b3], "the listing after the restart");
    let mut files: Vec<String> = std::fs::read_dir(&backups_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut expected: Vec<String> = [b1, b2, b3].iter().map(|id| format!("{id}.qcow2")).collect();
    expected.sort();
    assert_eq!(files, expected, "files left in {}", backups_dir.display());
    let out = t
        .dep
        .command(&["vm", "qmp", &vm_id, r#"{"execute":"query-jobs"}"#])
        .output()
        .unwrap();
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        jobs["return"],
        serde_json::json!([]),
        "QEMU still runs a job: {jobs}"
    );
    // The next one, through the operator's CLI.
    let started = Instant::now();
    let out = t.dep.command(&["vm", "backup", &vm_id]).output().unwrap();
    assert!(
        out.status.success(),
        "vm backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "full backup after 300 MB written (CLI): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rows = t.backups().await;
    let row = rows.last().unwrap();
    assert!(row["id"].as_i64().unwrap() > b4, "{row}");
    assert_eq!(row["kind"], "full", "a restore leaves no bitmap: {row}");
    assert_eq!(row["status"], "complete", "{row}");
    let out = t.dep.command(&["vm", "backups", &vm_id]).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vm backups: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(listing.lines().count(), 5, "a header and 4 backups:\n{listing}");

    // 5. Deleting the middle of 1 <- 2 <- 3 keeps 3 whole.
    let (status, body) = t.api(Method::DELETE, &format!("/backups/{b2}")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = t.api(Method::DELETE, &format!("/backups/{b2}")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "no_backup", "{body}");
    let rows = t.backups().await;
    let row3 = rows.iter().find(|b| b["id"] == b3).unwrap();
    assert_eq!(row3["parent_id"], b1, "{row3}");
    t.restore(b3).await;
    assert_eq!(t.dep.get_site(t.user.id).1.trim(), "page C");

    // 6. Deleting the hosting removes its backups.
    let (status, body) = t.user.delete_host(&t.client, &t.dep.api).await;
    assert_eq!(status, 200, "{body}");
    assert!(!backups_dir.exists(), "{} is left", backups_dir.display());
}
