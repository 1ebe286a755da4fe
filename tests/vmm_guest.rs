//! The engine with the real Debian guest under TCG (needs the cached guest
//! image: `make test` builds it first). One VM goes through everything, to
//! spare the CPU: start and `running` over QMP, the welcome page over HTTP,
//! data written over SSH, `kill -9` (the supervisor restarts it, the data is
//! still there), a new engine reattaching to the same pid without a guest
//! reboot, and a graceful stop that the guest performs itself. All of it
//! with a QEMU that never held root (its own id, seccomp denying set*id):
//! QMP, the guest agent, disk writes and the network work without it.
//! Guest networking is QEMU user mode, `restrict=on`, forwards on 127.0.0.1.

mod common;

use common::host::free_port;

use common::guest::{TestKey, ssh};

use std::path::Path;
use std::time::{Duration, Instant};

use common::vmm_stub::{QemuReaper, unique_vm_id};
use webhoster::vmm::{Engine, EngineOptions, QgaClient, ReattachOutcome, RestartPolicy, VmState};

/// Under TCG on a loaded 2-core host a Debian boot takes 20-90 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

async fn wait_http(port: u16, path: &str) -> String {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Some((200, body)) = http_get(port, path).await {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "no HTTP 200 for {path} within {BOOT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn wait_ssh(key: &TestKey, port: u16, command: &str) -> String {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let out = ssh("127.0.0.1", port, "ubuntu", key, command);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "ssh {command:?} failed until the timeout: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Status fields of `pid` (`Uid:` ...), whitespace normalised.
fn proc_status(pid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Real, effective, saved and fs uid all one non-root id of the engine's
/// range, no capability, no_new_privs, a seccomp filter, and a sandbox
/// that denies set*id calls.
fn assert_unprivileged(pid: i32, engine: &Engine) {
    let uids = proc_status(pid, "Uid:");
    let uid: u32 = uids.split(' ').next().unwrap().parse().unwrap();
    assert_ne!(uid, 0);
    assert!(engine.qemu_ids().contains(uid), "uid {uid}");
    let all = format!("{uid} {uid} {uid} {uid}");
    assert_eq!(uids, all);
    assert_eq!(proc_status(pid, "Gid:"), all);
    assert_eq!(proc_status(pid, "CapEff:"), "0000000000000000");
    assert_eq!(proc_status(pid, "NoNewPrivs:"), "1");
    assert_eq!(proc_status(pid, "Seccomp:"), "2");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    let sandbox = cmdline
        .split('\0')
        .skip_while(|a| *a != "-sandbox")
        .nth(1)
        .unwrap_or_default();
    assert!(sandbox.contains("elevateprivileges=deny"), "{cmdline:?}");
}

/// A guest-agent client once the agent answers (it starts late in the boot).
async fn qga_when_up(dir: &webhoster::vmm::VmDir) -> QgaClient {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        match QgaClient::connect(&dir.qga_socket(), &dir.qga_lock()).await {
            Ok(mut client) => {
                if client.ping().await.is_ok() {
                    return client;
                }
            }
            Err(err) => assert!(Instant::now() < deadline, "no guest agent: {err}"),
        }
        assert!(Instant::now() < deadline, "the guest agent never answered a ping");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn kernel_boots(serial_log: &Path) -> usize {
    std::fs::read_to_string(serial_log)
        .unwrap_or_default()
        .matches("Linux version")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_guest_serves_survives_kill_9_and_reattach() {
    let image = common::guest::test_image();
    let tmp = tempfile::Builder::new().prefix("vmm-guest").tempdir().unwrap();
    common::vmm_stub::let_qemu_through(tmp.path());
    let reaper = QemuReaper::default();
    let vm_id = unique_vm_id("guest");
    reaper.track(&vm_id);
    let engine_opts = || {
        let mut opts = EngineOptions::new(tmp.path().join("vms"));
        opts.restart = RestartPolicy {
            backoff_initial: Duration::from_millis(200),
            ..RestartPolicy::default()
        };
        opts
    };
    let engine = Engine::new(engine_opts()).unwrap();

    let key = TestKey::new();
    let (http_port, ssh_port) = (free_port(), free_port());
    let dir = engine.vm_dir(&vm_id);
    let spec =
        common::guest::user_net_spec(&engine, &image, &vm_id, "vmmtest", &key, (http_port, ssh_port)).await;
    engine.create_disk(&spec).await.unwrap();
    let status = engine.start(&spec).await.unwrap();
    assert_eq!(status.state, VmState::Running);
    let reply = engine
        .qmp(&vm_id, serde_json::json!({"execute": "query-status"}))
        .await
        .unwrap();
    assert_eq!(reply["return"]["status"], "running", "{reply}");

    let page = wait_http(http_port, "/").await;
    assert!(page.contains("vmmtest"), "welcome page names the owner: {page}");

    // Data written (and synced) inside the guest before the kill.
    let token = format!("token-{}", std::process::id());
    wait_ssh(
        &key,
        ssh_port,
        &format!("echo {token} > /var/www/html/marker.txt && sync"),
    )
    .await;
    assert_eq!(wait_http(http_port, "/marker.txt").await.trim(), token);

    // The console reaches serial.log (drained from QEMU's ring buffer every
    // 2 s), boot output included: that file is what `GET /host/my/console`
    // tails.
    wait_ssh(
        &key,
        ssh_port,
        &format!("echo console-{token} | sudo tee /dev/ttyS0"),
    )
    .await;
    // The boot's own output: the seed agent reports there (cloud-init did,
    // before the agent took the seed over), through journald, which starts
    // after sshd: the line may come after the token.
    let agent_line = "webhoster-seed-agent: applied the seed in";
    let started = Instant::now();
    let console = loop {
        let text = std::fs::read_to_string(dir.serial_log()).unwrap_or_default();
        let both = text.contains(&format!("console-{token}")) && text.contains(agent_line);
        if both || started.elapsed() > Duration::from_secs(60) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(console.contains(&format!("console-{token}")), "{console}");
    assert!(console.contains(agent_line), "boot output: {console}");
    // That QEMU never held root.
    let pid = engine.status(&vm_id).unwrap().pid.unwrap();
    assert_unprivileged(pid, &engine);
    // The guest agent answers through the socket passed to it, and reads
    // back what was written to the disk.
    let mut qga = qga_when_up(&dir).await;
    let out = qga.exec("/bin/cat", &["/var/www/html/marker.txt"]).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), token, "{out:?}");
    drop(qga);

    let mut events = engine.subscribe();
    let first = engine.status(&vm_id).unwrap().pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut seen = Vec::new();
    while seen.last() != Some(&VmState::Running) {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .unwrap()
            .unwrap();
        seen.push(ev.to);
    }
    assert_eq!(seen, vec![VmState::Crashed, VmState::Starting, VmState::Running]);
    let second = engine.status(&vm_id).unwrap().pid.unwrap();
    assert_ne!(first, second);
    assert_unprivileged(second, &engine);
    assert_eq!(
        wait_http(http_port, "/marker.txt").await.trim(),
        token,
        "data survived kill -9"
    );

    // A new engine reattaches: same pid, no second kernel boot, uptime goes on.
    let uptime_before: f64 = wait_ssh(&key, ssh_port, "cut -d' ' -f1 /proc/uptime")
        .await
        .parse()
        .unwrap();
    let boots_before = kernel_boots(&dir.serial_log());
    drop(engine);
    let engine = Engine::new(engine_opts()).unwrap();
    let outcome = engine.reattach(std::slice::from_ref(&spec)).await;
    assert_eq!(
        outcome[0].1.as_ref().unwrap(),
        &ReattachOutcome::Reattached { pid: second }
    );
    let uptime_after: f64 = wait_ssh(&key, ssh_port, "cut -d' ' -f1 /proc/uptime")
        .await
        .parse()
        .unwrap();
    assert!(
        uptime_after > uptime_before,
        "{uptime_after} <= {uptime_before}: the guest rebooted"
    );
    assert_eq!(kernel_boots(&dir.serial_log()), boots_before);

    // Graceful stop: the guest powers itself off on the ACPI button.
    let mut events = engine.subscribe();
    engine.stop(&vm_id, Duration::from_secs(120)).await.unwrap();
    let mut last = None;
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
        last = Some(ev);
    }
    let last = last.expect("stop events");
    assert_eq!(last.to, VmState::Stopped);
    assert!(
        last.reason.contains("powered off"),
        "the guest shut down by itself: {last:?}"
    );
    assert!(QemuReaper::pids_of(&vm_id).is_empty());
    engine.destroy(&vm_id).await.unwrap();
}
