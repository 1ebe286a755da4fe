//! Engine tests against real QEMU (TCG) running a tiny multiboot stub instead
//! of a guest OS: spawn, QMP, stop, crash restarts, guest poweroff, the
//! undecodable-event reconnect, reattach, stale pidfiles, concurrent starts.
//! The Debian-guest tests are in `vmm_guest.rs`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::vmm_stub::{BOOT_LINE, QemuReaper, StubAction, stub_files, unique_vm_id};
use webhoster::config::Accel;
use webhoster::logfile::{LogCap, generation};
use webhoster::vmm::{
    Engine, EngineOptions, Plan, ReattachOutcome, RestartPolicy, VmEvent, VmNet, VmSpec, VmState, VmmError,
};

struct Fixture {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    reaper: QemuReaper,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::Builder::new().prefix("vmm-test").tempdir().unwrap();
        let root = tmp.path().to_owned();
        common::vmm_stub::let_qemu_through(&root);
        Fixture {
            _tmp: tmp,
            root,
            reaper: QemuReaper::default(),
        }
    }

    fn engine_with_log_cap(&self, cap: LogCap) -> Engine {
        let mut opts = EngineOptions::new(self.vms_dir());
        opts.restart = fast_restarts(3);
        opts.log_cap = cap;
        Engine::new(opts).unwrap()
    }

    fn vms_dir(&self) -> std::path::PathBuf {
        self.root.join("vms")
    }

    fn engine(&self, restart: RestartPolicy) -> Engine {
        let mut opts = EngineOptions::new(self.vms_dir());
        opts.accel = Accel::Auto;
        opts.restart = restart;
        Engine::new(opts).unwrap()
    }

    fn spec(&self, tag: &str, action: StubAction) -> VmSpec {
        let vm_id = unique_vm_id(tag);
        self.reaper.track(&vm_id);
        let (kernel, initrd, base, seed) = stub_files(&self.root.join("files"), action);
        VmSpec {
            vm_id,
            plan: Plan {
                name: "stub".into(),
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 2,
            },
            kernel,
            initrd,
            base_disk: base,
            append: "stub".into(),
            seed_iso: seed,
            net: VmNet::None,
            labels: Default::default(),
            restore: None,
        }
    }
}

fn fast_restarts(max_crashes: u32) -> RestartPolicy {
    RestartPolicy {
        max_crashes,
        window: Duration::from_secs(60),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
    }
}

async fn next_event(rx: &mut tokio::sync::broadcast::Receiver<VmEvent>, vm_id: &str) -> VmEvent {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("no VM event within 30 s")
            .unwrap();
        if ev.vm_id == vm_id {
            return ev;
        }
    }
}

async fn expect_transition(
    rx: &mut tokio::sync::broadcast::Receiver<VmEvent>,
    vm_id: &str,
    from: VmState,
    to: VmState,
) -> VmEvent {
    let ev = next_event(rx, vm_id).await;
    assert_eq!((ev.from, ev.to), (from, to), "event {ev:?}");
    ev
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn boots(serial_log: &Path) -> usize {
    std::fs::read_to_string(serial_log)
        .unwrap_or_default()
        .matches(BOOT_LINE)
        .count()
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_query_and_stop() {
    let fx = Fixture::new();
    let engine = fx.engine(fast_restarts(3));
    let spec = fx.spec("basic", StubAction::Idle);
    let mut events = engine.subscribe();
    let disk = engine.create_disk(&spec).await.unwrap();
    assert!(disk.ends_with("disk.qcow2"), "{disk:?}");

    let status = engine.start(&spec).await.unwrap();
    assert_eq!(status.state, VmState::Running);
    let pid = status.pid.unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Stopped, VmState::Starting).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Starting, VmState::Running).await;

    // Detached: its own session, so a signal to our process group misses it.
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
    assert_eq!(sid.as_raw(), pid);
    assert_ne!(sid, nix::unistd::getsid(None).unwrap());
    assert_eq!(QemuReaper::pids_of(&spec.vm_id), vec![pid]);

    // The operator passthrough answers with QEMU's own reply.
    let reply = engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "query-status"}))
        .await
        .unwrap();
    assert_eq!(reply["return"]["status"], "running", "{reply}");
    let reply = engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "no-such-command"}))
        .await
        .unwrap();
    assert_eq!(reply["error"]["class"], "CommandNotFound", "{reply}");

    let dir = engine.vm_dir(&spec.vm_id);
    wait_for("the stub's boot line", Duration::from_secs(30), || {
        boots(&dir.serial_log()) == 1
    })
    .await;
    assert_eq!(dir.read_pid(), Some(pid));

    // The stub ignores the ACPI power button: powerdown, then quit.
    engine
        .stop(&spec.vm_id, Duration::from_millis(500))
        .await
        .unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Stopping).await;
    let ev = expect_transition(&mut events, &spec.vm_id, VmState::Stopping, VmState::Stopped).await;
    assert!(ev.reason.contains("quit"), "{ev:?}");
    assert!(QemuReaper::pids_of(&spec.vm_id).is_empty());
    assert!(!dir.pidfile().exists() && !dir.qmp_socket().exists());
    assert_eq!(engine.status(&spec.vm_id).unwrap().state, VmState::Stopped);
    // Stopping again is fine; a VM nobody knows is a clear error.
    engine.stop(&spec.vm_id, Duration::from_secs(1)).await.unwrap();
    let err = engine.stop("nope", Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(err, VmmError::UnknownVm(_)), "{err}");
    let err = engine
        .qmp("nope", serde_json::json!({"execute": "quit"}))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "unknown VM \"nope\"");

    engine.destroy(&spec.vm_id).await.unwrap();
    assert!(!dir.root().exists());
    assert!(engine.status(&spec.vm_id).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_is_a_crash_restarted_with_backoff_then_failed() {
    let fx = Fixture::new();
    let engine = fx.engine(fast_restarts(2));
    let spec = fx.spec("crash", StubAction::Idle);
    let mut events = engine.subscribe();
    engine.create_disk(&spec).await.unwrap();
    let first = engine.start(&spec).await.unwrap().pid.unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Stopped, VmState::Starting).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Starting, VmState::Running).await;

    sigkill(first);
    let ev = expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Crashed).await;
    assert!(ev.reason.contains("SIGKILL"), "{ev:?}");
    expect_transition(&mut events, &spec.vm_id, VmState::Crashed, VmState::Starting).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Starting, VmState::Running).await;
    let second = engine.status(&spec.vm_id).unwrap().pid.unwrap();
    assert_ne!(first, second);
    assert_eq!(QemuReaper::pids_of(&spec.vm_id), vec![second]);

    // The second crash within the window reaches max_crashes = 2.
    sigkill(second);
    expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Crashed).await;
    let ev = expect_transition(&mut events, &spec.vm_id, VmState::Crashed, VmState::Failed).await;
    assert!(ev.reason.contains("2 crashes"), "{ev:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        QemuReaper::pids_of(&spec.vm_id).is_empty(),
        "a failed VM is not restarted"
    );

    // An explicit start clears the crash history.
    let third = engine.start(&spec).await.unwrap();
    assert_eq!(third.state, VmState::Running);
    engine.destroy(&spec.vm_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_poweroff_leaves_the_vm_stopped() {
    let fx = Fixture::new();
    let engine = fx.engine(fast_restarts(3));
    let spec = fx.spec("poweroff", StubAction::Poweroff);
    let mut events = engine.subscribe();
    engine.create_disk(&spec).await.unwrap();
    engine.start(&spec).await.unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Stopped, VmState::Starting).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Starting, VmState::Running).await;
    let ev = expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Stopped).await;
    assert!(ev.reason.contains("guest powered off"), "{ev:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        QemuReaper::pids_of(&spec.vm_id).is_empty(),
        "no restart after a guest poweroff"
    );
    assert_eq!(engine.status(&spec.vm_id).unwrap().state, VmState::Stopped);
}

/// QEMU pausing the guest (QMP STOP: what an I/O error with werror=stop or
/// a full host disk does) shows as `paused`, and its resume as `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_guest_is_paused_then_running_again() {
    let fx = Fixture::new();
    let engine = fx.engine(fast_restarts(3));
    let spec = fx.spec("pause", StubAction::Idle);
    let mut events = engine.subscribe();
    engine.create_disk(&spec).await.unwrap();
    engine.start(&spec).await.unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Stopped, VmState::Starting).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Starting, VmState::Running).await;
    let reply = engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "stop"}))
        .await
        .unwrap();
    assert!(reply.get("return").is_some(), "{reply}");
    expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Paused).await;
    assert_eq!(engine.status(&spec.vm_id).unwrap().state, VmState::Paused);
    engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "cont"}))
        .await
        .unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Paused, VmState::Running).await;
    // A paused VM stops like a running one.
    engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "stop"}))
        .await
        .unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Paused).await;
    engine
        .stop(&spec.vm_id, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(engine.status(&spec.vm_id).unwrap().state, VmState::Stopped);
}

/// An event qapi cannot decode ends its stream (qapi's schema is QEMU 9.1;
/// Debian's 7.2 happens to send RTC_CHANGE with 9.1's `qom-path`, so the
/// line is injected): the supervisor must reconnect and keep managing the
/// VM. Real QEMU and real engine; a proxy on `qmp.sock` injects one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_event_reconnects_and_keeps_the_vm_managed() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let fx = Fixture::new();
    let spec = fx.spec("bogus", StubAction::Idle);
    let engine = fx.engine(fast_restarts(3));
    engine.create_disk(&spec).await.unwrap();
    let pid = engine.start(&spec).await.unwrap().pid.unwrap();
    drop(engine);

    let dir = webhoster::vmm::VmDir::new(&fx.vms_dir(), &spec.vm_id);
    let real = dir.root().join("qmp-real.sock");
    std::fs::rename(dir.qmp_socket(), &real).unwrap();
    let listener = tokio::net::UnixListener::bind(dir.qmp_socket()).unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    let proxy = tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let qemu = tokio::net::UnixStream::connect(&real).await.unwrap();
            let (mut client_r, mut client_w) = client.into_split();
            let (qemu_r, mut qemu_w) = qemu.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_r, &mut qemu_w).await;
            });
            tokio::spawn(async move {
                let mut lines = BufReader::new(qemu_r).lines();
                let mut forwarded = 0;
                while let Ok(Some(line)) = lines.next_line().await {
                    if client_w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        return;
                    }
                    forwarded += 1;
                    // After greeting, capabilities and query-status replies.
                    if n == 0 && forwarded == 3 {
                        let bogus = r#"{"event": "WEBHOSTER_NO_SUCH_EVENT", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}"#;
                        let _ = client_w.write_all(format!("{bogus}\n").as_bytes()).await;
                    }
                }
            });
        }
    });

    let engine = fx.engine(fast_restarts(3));
    let mut events = engine.subscribe();
    let outcome = engine.reattach(std::slice::from_ref(&spec)).await;
    assert_eq!(
        outcome[0].1.as_ref().unwrap(),
        &ReattachOutcome::Reattached { pid }
    );
    wait_for("a second QMP connection", Duration::from_secs(20), || {
        connections.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(engine.status(&spec.vm_id).unwrap().state, VmState::Running);
    // Still managed: the operator passthrough and a graceful stop work, and
    // the stop is recognised as ours (no crash event).
    let reply = engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "query-status"}))
        .await
        .unwrap();
    assert_eq!(reply["return"]["running"], true, "{reply}");
    engine
        .stop(&spec.vm_id, Duration::from_millis(300))
        .await
        .unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Stopping).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Stopping, VmState::Stopped).await;
    assert!(QemuReaper::pids_of(&spec.vm_id).is_empty());
    proxy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_engine_reattaches_to_the_same_pid_without_reboot() {
    let fx = Fixture::new();
    let spec = fx.spec("reattach", StubAction::Idle);
    let engine = fx.engine(fast_restarts(3));
    engine.create_disk(&spec).await.unwrap();
    let pid = engine.start(&spec).await.unwrap().pid.unwrap();
    let dir = engine.vm_dir(&spec.vm_id);
    wait_for("the stub's boot", Duration::from_secs(30), || {
        boots(&dir.serial_log()) == 1
    })
    .await;
    drop(engine);

    let engine = fx.engine(fast_restarts(3));
    let mut events = engine.subscribe();
    let outcome = engine.reattach(std::slice::from_ref(&spec)).await;
    assert_eq!(outcome.len(), 1);
    assert_eq!(
        outcome[0].1.as_ref().unwrap(),
        &ReattachOutcome::Reattached { pid }
    );
    let status = engine.status(&spec.vm_id).unwrap();
    assert_eq!((status.state, status.pid), (VmState::Running, Some(pid)));
    assert_eq!(boots(&dir.serial_log()), 1, "the guest did not reboot");
    // Supervised again: a crash is seen (QEMU is no longer our child).
    sigkill(pid);
    let ev = expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Crashed).await;
    assert!(ev.reason.contains("exited unasked"), "{ev:?}");
    expect_transition(&mut events, &spec.vm_id, VmState::Crashed, VmState::Starting).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Starting, VmState::Running).await;
    engine.destroy(&spec.vm_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pidfile_naming_an_unrelated_process() {
    let fx = Fixture::new();
    let engine = fx.engine(fast_restarts(3));
    let spec = fx.spec("stale", StubAction::Idle);
    engine.create_disk(&spec).await.unwrap();
    let mut sleeper = std::process::Command::new("sleep").arg("300").spawn().unwrap();
    let dir = engine.vm_dir(&spec.vm_id);
    std::fs::write(dir.pidfile(), format!("{}\n", sleeper.id())).unwrap();
    std::fs::write(dir.qmp_socket(), b"stale").unwrap();

    let outcome = engine.reattach(std::slice::from_ref(&spec)).await;
    match outcome[0].1.as_ref().unwrap() {
        ReattachOutcome::Crashed { reason } => assert!(reason.contains("not this VM"), "{reason}"),
        other => panic!("expected Crashed, got {other:?}"),
    }
    assert!(
        !dir.pidfile().exists() && !dir.qmp_socket().exists(),
        "stale files cleaned"
    );
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the unrelated process is untouched"
    );
    // Starting works from there.
    let status = engine.start(&spec).await.unwrap();
    assert_ne!(status.pid, Some(sleeper.id() as i32));
    sleeper.kill().unwrap();
    let _ = sleeper.wait();
    engine.destroy(&spec.vm_id).await.unwrap();

    // No pidfile at all: stopped.
    let spec2 = fx.spec("nopid", StubAction::Idle);
    engine.create_disk(&spec2).await.unwrap();
    let outcome = engine.reattach(std::slice::from_ref(&spec2)).await;
    assert_eq!(outcome[0].1.as_ref().unwrap(), &ReattachOutcome::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_starts_give_one_vm() {
    let fx = Fixture::new();
    let engine = Arc::new(fx.engine(fast_restarts(3)));
    let spec = fx.spec("twice", StubAction::Idle);
    engine.create_disk(&spec).await.unwrap();
    let (a, b) = tokio::join!(engine.start(&spec), engine.start(&spec));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.pid, b.pid);
    assert_eq!(QemuReaper::pids_of(&spec.vm_id), vec![a.pid.unwrap()]);

    // Another engine (another process's view) starting the same VM finds it.
    let other = fx.engine(fast_restarts(3));
    let c = other.start(&spec).await;
    assert!(QemuReaper::pids_of(&spec.vm_id) == vec![a.pid.unwrap()], "{c:?}");
    drop(other);
    engine.destroy(&spec.vm_id).await.unwrap();
}

/// Two engines (two processes' views) starting one VM at the same moment:
/// QEMU's pidfile lock lets one QEMU live; the other start fails cleanly and
/// does not take the winner's sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_starting_at_once_give_one_vm() {
    let fx = Fixture::new();
    let (e1, e2) = (fx.engine(fast_restarts(3)), fx.engine(fast_restarts(3)));
    let spec = fx.spec("race", StubAction::Idle);
    e1.create_disk(&spec).await.unwrap();
    let (a, b) = tokio::join!(e1.start(&spec), e2.start(&spec));
    let pids = QemuReaper::pids_of(&spec.vm_id);
    assert_eq!(pids.len(), 1, "one QEMU: {a:?} {b:?}");
    let (winner, loser) = match (&a, &b) {
        (Ok(_), _) => (&e1, &e2),
        (_, Ok(_)) => (&e2, &e1),
        _ => panic!("neither start succeeded: {a:?} {b:?}"),
    };
    let _ = loser;
    let reply = winner
        .qmp(&spec.vm_id, serde_json::json!({"execute": "query-status"}))
        .await
        .unwrap_or_else(|err| panic!("{err:?} after {a:?} / {b:?}"));
    assert_eq!(reply["return"]["running"], true, "{reply}");
    assert_eq!(winner.status(&spec.vm_id).unwrap().pid, Some(pids[0]));
}

#[tokio::test]
async fn missing_qemu_names_the_package() {
    let fx = Fixture::new();
    let mut opts = EngineOptions::new(fx.vms_dir());
    opts.qemu = "/nonexistent/qemu-system-x86_64".into();
    let err = Engine::new(opts).err().expect("an error");
    assert!(err.to_string().contains("qemu-system-x86"), "{err}");
    let mut opts = EngineOptions::new(fx.vms_dir());
    opts.qemu = "no-such-qemu-system".into();
    assert!(matches!(Engine::new(opts), Err(VmmError::QemuMissing { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cli_list_info_qmp() {
    let fx = Fixture::new();
    let engine = fx.engine(fast_restarts(3));
    let mut spec = fx.spec("cli", StubAction::Idle);
    spec.labels = [
        ("owner".to_owned(), "alice".to_owned()),
        ("ip".to_owned(), "10.83.0.7".to_owned()),
        ("ssh_port".to_owned(), "10007".to_owned()),
    ]
    .into();
    engine.create_disk(&spec).await.unwrap();
    let pid = engine.start(&spec).await.unwrap().pid.unwrap();
    let bin = env!("CARGO_BIN_EXE_webhoster");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .arg("--state-dir")
            .arg(&fx.root)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["vm", "list"]);
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.starts_with(&spec.vm_id)).expect(&out);
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &cols[1..6],
        &["alice", "running", &pid.to_string(), "10.83.0.7", "10007"],
        "{out}"
    );
    assert!(out.starts_with("VM_ID"), "{out}");

    let (ok, out, err) = run(&["vm", "qmp", &spec.vm_id, r#"{"execute":"query-status"}"#]);
    assert!(ok, "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["return"]["status"], "running");

    let (ok, out, err) = run(&["vm", "info", &spec.vm_id]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("pid:        {pid}")) && out.contains("\"running\""),
        "{out}"
    );
    let uid = webhoster::vmm::dir::uid_of(pid).unwrap();
    assert_ne!(uid, 0);
    assert!(out.contains(&format!("runs as:    uid {uid}\n")), "{out}");

    let (ok, _, err) = run(&["vm", "info", "nope"]);
    assert!(!ok && err.contains("unknown VM \"nope\""), "{err}");
    let (ok, _, err) = run(&["vm", "qmp", &spec.vm_id, "not json"]);
    assert!(!ok && err.contains("not JSON"), "{err}");

    engine
        .stop(&spec.vm_id, Duration::from_millis(200))
        .await
        .unwrap();
    let (_, out, _) = run(&["vm", "list"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&spec.vm_id) && l.contains("stopped")),
        "{out}"
    );
}

/// A console that never stops writing cannot fill the disk, with webhoster
/// (the supervisor drains QEMU's ring into a capped, rotated serial.log) or
/// without (QEMU keeps the newest MiB in its ring, nothing on disk grows),
/// and the next engine collects what the ring kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_console_stays_capped_with_or_without_webhoster() {
    let fx = Fixture::new();
    let cap = LogCap {
        max_bytes: 256 * 1024,
        keep: 1,
    };
    let engine = fx.engine_with_log_cap(cap);
    let spec = fx.spec("spam", StubAction::Spam);
    engine.create_disk(&spec).await.unwrap();
    let pid = engine.start(&spec).await.unwrap().pid.unwrap();
    let dir = engine.vm_dir(&spec.vm_id);
    let serial = dir.serial_log();
    let (old, older) = (generation(&serial, 1), generation(&serial, 2));
    wait_for("a rotation", Duration::from_secs(60), || old.exists()).await;
    // Keep it flooding through a few more supervisor ticks; what draining
    // costs the service is printed (CPU seconds of this process).
    let cpu = || {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        (fields[0] + fields[1]) as f64 / 100.0
    };
    let cpu_before = cpu();
    tokio::time::sleep(Duration::from_secs(6)).await;
    eprintln!(
        "draining a flooded console for 6 s took {:.2} s of CPU",
        cpu() - cpu_before
    );
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "serial.log {} bytes, serial.log.1 {} bytes",
        size(&serial),
        size(&old)
    );
    assert!(size(&serial) <= cap.max_bytes && size(&old) <= cap.max_bytes);
    assert!(!older.exists(), "keep 1 keeps one generation");
    assert!(std::fs::read_to_string(&serial).unwrap().contains(BOOT_LINE));

    // webhoster goes away; the guest floods on, and nothing in its
    // directory changes.
    drop(engine);
    let listing = || {
        let mut files: Vec<(String, u64, std::time::SystemTime)> = std::fs::read_dir(dir.root())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    meta.len(),
                    meta.modified().unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = listing();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        webhoster::vmm::dir::is_our_qemu(pid, &spec.vm_id),
        "the guest runs on"
    );
    assert_eq!(listing(), before, "nothing grew while no webhoster ran");

    // The next engine reattaches and collects what the ring kept.
    let engine = fx.engine_with_log_cap(cap);
    let outcome = engine.reattach(std::slice::from_ref(&spec)).await;
    assert_eq!(
        outcome[0].1.as_ref().unwrap(),
        &ReattachOutcome::Reattached { pid }
    );
    wait_for("the ring drained", Duration::from_secs(30), || {
        listing() != before
    })
    .await;
    assert!(size(&serial) <= cap.max_bytes && size(&old) <= cap.max_bytes);
    engine
        .stop(&spec.vm_id, Duration::from_millis(100))
        .await
        .unwrap();
}

/// A QMP command whose caller stops waiting (a timeout, an aborted
/// supervisor draining the console) leaves the connection usable: the next
/// command gets its answer (qapi alone would panic on a duplicate id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qmp_command_dropped_in_flight_leaves_the_client_usable() {
    let fx = Fixture::new();
    let engine = fx.engine(fast_restarts(3));
    let spec = fx.spec("dropped", StubAction::Spam);
    engine.create_disk(&spec).await.unwrap();
    engine.start(&spec).await.unwrap();
    let socket = engine.vm_dir(&spec.vm_id).operator_socket();
    let (client, _events) = webhoster::vmm::qmp::QmpClient::connect(&socket).await.unwrap();
    for _ in 0..5 {
        // Polled once (the request is on its way), then dropped: no timer,
        // so a fast reply cannot win the race.
        use futures::FutureExt as _;
        let dropped = client.ringbuf_read("serial0", 65536).now_or_never();
        assert!(dropped.is_none(), "the read was dropped in flight: {dropped:?}");
    }
    assert!(client.query_status().await.unwrap().running);
    engine
        .stop(&spec.vm_id, Duration::from_millis(100))
        .await
        .unwrap();
}

/// QEMU's own output reaches qemu.log through its pipe, and a QEMU that
/// dies at start-up is reported with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_output_reaches_qemu_log_and_the_start_error() {
    let fx = Fixture::new();
    let engine = fx.engine(fast_restarts(3));
    let mut spec = fx.spec("badkernel", StubAction::Idle);
    engine.create_disk(&spec).await.unwrap();
    spec.kernel = fx.root.join("no-such-kernel");
    let err = engine.start(&spec).await.expect_err("no kernel, no start");
    match &err {
        VmmError::StartExited { log_tail, .. } => assert!(log_tail.contains("no-such-kernel"), "{log_tail}"),
        other => panic!("expected StartExited, got {other:?}"),
    }
    let log = std::fs::read_to_string(engine.vm_dir(&spec.vm_id).qemu_log()).unwrap();
    assert!(log.contains("no-such-kernel"), "{log}");
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `Uid:`/`Gid:` (real, effective, saved, fs), `CapEff:` and `Seccomp:`
/// from /proc/<pid>/status.
fn proc_status(pid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// Whether a process running as `id` (uid and gid) can open `path` for
/// reading and writing.
fn can_open_as(id: u32, path: &Path) -> bool {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("sh")
        .args(["-c", "exec 3<>\"$0\"", path.to_str().unwrap()])
        .uid(id)
        .gid(id)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The host's walls around one VM, with the engine's defaults: QEMU joins
/// the VM's cgroup before exec (memory = plan + overhead, pids), runs from
/// exec on as an id of its own, never root, under a seccomp sandbox that
/// denies set*id, serves QMP, the operator socket and the guest-agent
/// socket passed to it, and reaches only its own VM's files, whatever the
/// umask: another VM's id cannot open its disk. The cgroup goes with a
/// stop, comes back with a start and a crash restart, stays with a
/// reattach, and is gone after destroy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_runs_in_its_cgroup_as_its_own_id_with_private_files() {
    use std::os::unix::fs::MetadataExt;
    use webhoster::vmm::CgroupLimits;
    // A permissive umask: modes must not depend on it. (Process-wide, but
    // no other test here looks at modes.)
    // SAFETY: umask only swaps an integer in the process's fs struct.
    unsafe { libc::umask(0) };
    let fx = Fixture::new();
    let engine = fx.engine(fast_restarts(3));
    let spec = fx.spec("walls", StubAction::Idle);
    let mut events = engine.subscribe();
    let cgroups = engine
        .cgroups()
        .expect("this host has cgroups (v2 with memory and pids, or v1)")
        .clone();
    eprintln!("cgroups: {}", cgroups.mode());

    engine.create_disk(&spec).await.unwrap();
    let pid = engine.start(&spec).await.unwrap().pid.unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Stopped, VmState::Starting).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Starting, VmState::Running).await;

    // In its cgroup in every hierarchy, with the limits of its plan.
    let in_cgroup = |pid: i32| cgroups.procs(&spec.vm_id).iter().all(|p| p.contains(&pid));
    assert!(in_cgroup(pid), "{:?}", cgroups.procs(&spec.vm_id));
    assert_eq!(
        cgroups.limits(&spec.vm_id).unwrap(),
        CgroupLimits {
            memory_bytes: (256 + 384) << 20,
            pids_max: 256
        }
    );
    for dir in cgroups.dirs(&spec.vm_id) {
        assert!(
            dir.ends_with(format!("webhoster/{}", spec.vm_id)),
            "{}",
            dir.display()
        );
    }

    // Never root: real, effective, saved and fs ids all the VM's own id,
    // no other group, no capability, no_new_privs, a seccomp filter that
    // denies set*id, and no `-runas`.
    let uid: u32 = proc_status(pid, "Uid:")
        .split('\t')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(engine.qemu_ids().contains(uid), "uid {uid}");
    assert_eq!(proc_status(pid, "Uid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(proc_status(pid, "Gid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(proc_status(pid, "Groups:"), "");
    assert_eq!(proc_status(pid, "CapEff:"), "0000000000000000");
    assert_eq!(proc_status(pid, "CapPrm:"), "0000000000000000");
    assert_eq!(proc_status(pid, "NoNewPrivs:"), "1");
    assert_eq!(proc_status(pid, "Seccomp:"), "2");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&str> = cmdline.split('\0').collect();
    assert!(
        args.contains(&"on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
        "{args:?}"
    );
    assert!(!args.contains(&"-runas"), "{args:?}");

    // It serves the sockets passed to it: QMP (the supervisor's and the
    // operator's) and the guest agent's (the stub has no agent, but the
    // socket accepts).
    let reply = engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "query-status"}))
        .await
        .unwrap();
    assert_eq!(reply["return"]["status"], "running", "{reply}");
    let dir = engine.vm_dir(&spec.vm_id);
    tokio::net::UnixStream::connect(dir.qga_socket()).await.unwrap();
    wait_for("the stub's boot line", Duration::from_secs(30), || {
        boots(&dir.serial_log()) == 1
    })
    .await;

    // Modes and owners, with umask 0: everything root's; the VM's id is
    // the group of its directory (pass through only) and of the files QEMU
    // opens by path; the rest, the logs included, is root's only.
    let owner = |path: &Path| {
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid(), mode(path))
    };
    assert_eq!(owner(&fx.vms_dir()), (0, 0, 0o711));
    assert_eq!(owner(dir.root()), (0, uid, 0o710));
    for file in [dir.disk(), dir.pidfile()] {
        assert_eq!(owner(&file), (0, uid, 0o660), "{}", file.display());
    }
    for file in [
        dir.spec_file(),
        dir.serial_log(),
        dir.qemu_log(),
        dir.start_lock(),
        dir.qmp_socket(),
        dir.operator_socket(),
        dir.qga_socket(),
    ] {
        assert_eq!(owner(&file), (0, 0, 0o600), "{}", file.display());
    }
    assert_eq!(
        std::fs::read_to_string(dir.pidfile()).unwrap().trim(),
        pid.to_string()
    );

    // A second VM runs as another id, which cannot open the first VM's
    // disk; the first VM's id can.
    let other = fx.spec("walls2", StubAction::Idle);
    engine.create_disk(&other).await.unwrap();
    let other_pid = engine.start(&other).await.unwrap().pid.unwrap();
    let other_uid: u32 = proc_status(other_pid, "Uid:")
        .split('\t')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(engine.qemu_ids().contains(other_uid));
    assert_ne!(other_uid, uid);
    assert!(can_open_as(uid, &dir.disk()), "the VM's own id opens its disk");
    assert!(
        !can_open_as(other_uid, &dir.disk()),
        "another VM's id opens the disk"
    );
    assert!(!can_open_as(uid, &engine.vm_dir(&other.vm_id).disk()));
    engine.destroy(&other.vm_id).await.unwrap();
    // A pause and a resume (`cont`) need nothing reopened.
    engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "stop"}))
        .await
        .unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Paused).await;
    engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "cont"}))
        .await
        .unwrap();
    expect_transition(&mut events, &spec.vm_id, VmState::Paused, VmState::Running).await;
    // So does a reset (a guest reboot): the same QEMU boots the stub again.
    engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "system_reset"}))
        .await
        .unwrap();
    wait_for("a second boot after the reset", Duration::from_secs(30), || {
        boots(&dir.serial_log()) == 2
    })
    .await;
    assert_eq!(engine.status(&spec.vm_id).unwrap().pid, Some(pid));
    // The supervisor counts it: convergence sees the outage by it.
    wait_for("the reset counted", Duration::from_secs(10), || {
        engine.status(&spec.vm_id).unwrap().resets >= 1
    })
    .await;

    // A stop removes the cgroup, a start makes it again.
    engine
        .stop(&spec.vm_id, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(!cgroups.exists(&spec.vm_id), "cgroup left after stop");
    let pid = engine.start(&spec).await.unwrap().pid.unwrap();
    assert!(in_cgroup(pid));

    // A crash restart lands in a cgroup again.
    let mut events = engine.subscribe();
    sigkill(pid);
    expect_transition(&mut events, &spec.vm_id, VmState::Running, VmState::Crashed).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Crashed, VmState::Starting).await;
    expect_transition(&mut events, &spec.vm_id, VmState::Starting, VmState::Running).await;
    let pid = engine.status(&spec.vm_id).unwrap().pid.unwrap();
    assert!(in_cgroup(pid), "{:?}", cgroups.procs(&spec.vm_id));
    assert_eq!(
        proc_status(pid, "Uid:"),
        format!("{uid}\t{uid}\t{uid}\t{uid}"),
        "same id after a restart"
    );

    // A new engine reattaches: same pid, same cgroup, still managed.
    drop(engine);
    let engine = fx.engine(fast_restarts(3));
    let outcome = engine.reattach(std::slice::from_ref(&spec)).await;
    assert_eq!(
        outcome[0].1.as_ref().unwrap(),
        &ReattachOutcome::Reattached { pid }
    );
    assert!(in_cgroup(pid));
    let reply = engine
        .qmp(&spec.vm_id, serde_json::json!({"execute": "query-status"}))
        .await
        .unwrap();
    assert_eq!(reply["return"]["running"], true, "{reply}");

    // Destroy: QEMU (no longer our child) is killed and the cgroup goes.
    engine.destroy(&spec.vm_id).await.unwrap();
    assert!(QemuReaper::pids_of(&spec.vm_id).is_empty());
    assert!(!cgroups.exists(&spec.vm_id), "cgroup left after destroy");
}

/// What the limits do, on a cgroup made by the engine's own code: a process
/// that allocates past the memory limit is OOM-killed inside its cgroup
/// (this test process, outside, lives on), and one that forks past the
/// pids limit gets EAGAIN.
#[tokio::test]
async fn limits_hold_inside_the_cgroup() {
    use webhoster::vmm::{CgroupLimits, Cgroups};
    let cgroups = Cgroups::detect("webhoster").unwrap();
    let name = unique_vm_id("limits");
    let procs = cgroups
        .prepare(
            &name,
            CgroupLimits {
                memory_bytes: 32 << 20,
                pids_max: 4,
            },
        )
        .unwrap();
    let join = || {
        procs
            .iter()
            .map(|p| std::ffi::CString::new(p.to_str().unwrap()).unwrap())
            .collect::<Vec<_>>()
    };
    let spawn = |argv: &[&str]| {
        let mut cmd = std::process::Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        webhoster::sys::spawn_detached_with(
            cmd,
            webhoster::sys::Detach {
                cgroup_procs: join(),
                ..Default::default()
            },
        )
        .unwrap()
    };
    // dd touches its whole 128 MiB block buffer: four times the limit.
    let out = spawn(&["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"])
        .wait_with_output()
        .await
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "dd was not OOM-killed: {out:?}");
    let memory_dir = &cgroups.dirs(&name)[0];
    let oom_kills = ["memory.events", "memory.oom_control"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(memory_dir.join(f)).ok())
        .flat_map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
        .find_map(|l| {
            l.strip_prefix("oom_kill ")
                .map(|n| n.trim().parse::<u64>().unwrap())
        });
    assert_eq!(oom_kills, Some(1), "the kill is counted in the VM's cgroup");

    // Eight background sleeps with room for four tasks (sh included).
    let out = spawn(&["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do sleep 2 & done; wait"])
        .wait_with_output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.to_lowercase().contains("fork"),
        "no fork refused: {stderr:?}"
    );
    let pids_dir = cgroups.dirs(&name).last().unwrap().clone();
    let events = std::fs::read_to_string(pids_dir.join("pids.events")).unwrap();
    assert_ne!(events.trim(), "max 0", "{events}");

    // dash gives up at the first refused fork, so sleeps it had started may
    // still run for their 2 s; once they are gone the cgroup goes.
    let procs = pids_dir.join("cgroup.procs");
    wait_for("the cgroup to empty", Duration::from_secs(20), || {
        std::fs::read_to_string(&procs).is_ok_and(|p| p.trim().is_empty())
    })
    .await;
    cgroups.remove(&name).unwrap();
    assert!(!cgroups.exists(&name));
}
