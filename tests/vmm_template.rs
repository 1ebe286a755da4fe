//! Snapshot templates and clones with the real Debian guest under TCG (needs
//! the cached guest image). One template serves every check, since a boot is
//! the expensive part:
//!
//! - the template is built (boot, `--template-prep`, save, seal), timings
//!   printed;
//! - three clones restored at once, each with its own overlay and user
//!   networking, two of them warmed up (a rehearsed claim, paused again),
//!   each resumed and personalised by the seed agent; the
//!   template's `ram` and disk are unchanged afterwards (sha256);
//! - the seal: no one, root included, can write the RAM memfd a clone's QEMU
//!   holds;
//! - a clone's QEMU killed after its resume comes back as a plain cold boot of
//!   its own disk (no `-incoming`);
//! - a template loaded from disk by a new engine (a restarted webhoster)
//!   gives a working clone.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::guest::{TestKey, http_get};
use common::host::free_port;
use common::vmm_stub::{QemuReaper, unique_vm_id};
use sha2::{Digest, Sha256};
use webhoster::vmm::{
    Engine, EngineOptions, Plan, QgaClient, RestartPolicy, Template, TemplateRequest, VmNet, VmSpec, VmState,
    template_key,
};

/// Under TCG on a loaded 2-core host a Debian boot takes 20-90 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Every seed drive has this size: the guest learnt the template's at boot.
const SEED_BYTES: u64 = 4 << 20;

fn sha256(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    format!("{:x}", hasher.finalize())
}

/// A NoCloud seed for `instance_id` (user `ubuntu` with `key`, QEMU user
/// networking's address), padded to [`SEED_BYTES`].
async fn write_seed(path: &Path, instance_id: &str, key: &TestKey) {
    webhoster::seed::write(
        &webhoster::seed::SeedSpec {
            instance_id: instance_id.to_owned(),
            hostname: instance_id.to_owned(),
            user: "ubuntu".into(),
            ssh_keys: vec![webhoster::auth::SshPublicKey::parse(key.public_line()).unwrap()],
            owner: instance_id.to_owned(),
            network: Some(webhoster::seed::StaticNetwork {
                mac: webhoster::vmm::cmdline::USER_NET_MAC.into(),
                address: "10.0.2.15/24".parse().unwrap(),
                gateway: "10.0.2.2".parse().unwrap(),
            }),
        },
        path,
    )
    .await
    .unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    assert!(file.metadata().unwrap().len() <= SEED_BYTES);
    file.set_len(SEED_BYTES).unwrap();
}

struct Clone {
    vm_id: String,
    http: u16,
}

/// The states `vm_id` went through, up to and with `last` (each next one
/// within `each`).
async fn states_until(
    events: &mut tokio::sync::broadcast::Receiver<webhoster::vmm::VmEvent>,
    vm_id: &str,
    last: VmState,
    each: Duration,
) -> Vec<VmState> {
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let ev = tokio::time::timeout(each, events.recv()).await.unwrap().unwrap();
        if ev.vm_id == vm_id {
            seen.push(ev.to);
        }
    }
    seen
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
}

/// A clone's spec and seed: its own overlay on the template disk, user
/// networking forwarding its HTTP.
async fn clone_spec(
    engine: &Engine,
    image: &webhoster::image::Image,
    template: &Template,
    key: &TestKey,
    tag: &str,
) -> (VmSpec, Clone) {
    let vm_id = unique_vm_id(tag);
    let dir = engine.vm_dir(&vm_id);
    std::fs::create_dir_all(dir.root()).unwrap();
    write_seed(&dir.seed_iso(), &vm_id, key).await;
    let http = free_port();
    let spec = VmSpec {
        vm_id: vm_id.clone(),
        plan: template.plan().clone(),
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        base_disk: template.disk(),
        append: webhoster::image::KERNEL_CMDLINE.into(),
        seed_iso: dir.seed_iso(),
        net: VmNet::User {
            hostfwd: vec![
                (SocketAddr::from(([127, 0, 0, 1], http)), 80),
                (SocketAddr::from(([127, 0, 0, 1], free_port())), 22),
            ],
        },
        labels: Default::default(),
        restore: None,
    };
    (spec, Clone { vm_id, http })
}

async fn guest_cat(engine: &Engine, vm_id: &str, path: &str) -> String {
    let mut agent = engine.guest_agent(vm_id).await.unwrap();
    let out = agent.exec("/bin/cat", &[path]).await.unwrap();
    assert!(out.success(), "cat {path} in {vm_id}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A guest-agent client once the agent answers (late in a cold boot).
async fn qga_when_up(dir: &webhoster::vmm::VmDir) -> QgaClient {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Ok(mut client) = QgaClient::connect(&dir.qga_socket(), &dir.qga_lock()).await
            && client.ping().await.is_ok()
        {
            return client;
        }
        assert!(Instant::now() < deadline, "the guest agent never answered");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn wait_http(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let Ok(Ok((200, body))) = tokio::task::spawn_blocking(move || http_get(addr, "/")).await {
            return body;
        }
        assert!(Instant::now() < deadline, "no HTTP 200 on port {port}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn cmdline_of(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_build_clones_restore_resume_and_survive() {
    let image = common::guest::test_image();
    let tmp = tempfile::Builder::new().prefix("vmm-template").tempdir().unwrap();
    common::vmm_stub::let_qemu_through(tmp.path());
    let reaper = QemuReaper::default();
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

    // 1. The template: its key unique to this run, so its vm_id is too.
    let plan = Plan::load("small").unwrap();
    let qemu_version = engine.qemu_version().await.unwrap();
    assert!(qemu_version.contains("QEMU"), "{qemu_version}");
    let tkey = template_key(
        &format!("{}-{}", image.manifest.key, unique_vm_id("k")),
        &plan,
        &qemu_version,
        engine.accel().0,
    );
    reaper.track(&format!("tpl-{}", &tkey[..12]));
    let tdir = tmp.path().join("templates").join(&tkey);
    std::fs::create_dir_all(&tdir).unwrap();
    write_seed(&tdir.join("seed.iso"), &format!("template-{}", &tkey[..12]), &key).await;
    let req = TemplateRequest {
        key: tkey.clone(),
        dir: tdir.clone(),
        spec: VmSpec {
            vm_id: "template".into(),
            plan: plan.clone(),
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            base_disk: image.disk.clone(),
            append: webhoster::image::KERNEL_CMDLINE.into(),
            seed_iso: tdir.join("seed.iso"),
            net: VmNet::None,
            labels: Default::default(),
            restore: None,
        },
        ready_timeout: BOOT_TIMEOUT,
    };
    let started = Instant::now();
    let template = engine.build_template(&req).await.unwrap();
    let t = template.meta().timings;
    println!(
        "template build: {:.1} s total; boot to running {} ms, prep {} ms, save {} ms, persist {} ms; RAM data {} MiB of {} MiB",
        started.elapsed().as_secs_f64(),
        t.boot_ms,
        t.prep_ms,
        t.save_ms,
        t.persist_ms,
        template.meta().ram_data_bytes >> 20,
        plan.memory_mib
    );
    assert_eq!(template.key(), tkey);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(template.disk()).unwrap().mode() & 0o777, 0o444);
    assert_eq!(std::fs::metadata(tdir.join("ram")).unwrap().mode() & 0o777, 0o600);
    assert!(tdir.join("template.json").exists() && tdir.join("state").exists());
    let run = tmp
        .path()
        .join("templates/.run")
        .join(format!("tpl-{}", &tkey[..12]));
    assert!(!run.exists(), "run directory removed");
    let ram_sha = sha256(&tdir.join("ram"));
    let disk_sha = sha256(&template.disk());

    // 2. Three clones at once: restored paused, then resumed.
    let mut specs = Vec::new();
    let mut clones = Vec::new();
    for i in 0..3 {
        let (spec, clone) = clone_spec(&engine, &image, &template, &key, &format!("clone{i}")).await;
        reaper.track(&clone.vm_id);
        specs.push(spec);
        clones.push(clone);
    }
    let restores = futures::future::join_all(specs.iter().map(|spec| {
        let (engine, template) = (&engine, &template);
        async move {
            let started = Instant::now();
            let status = engine.start_clone(spec, template).await.unwrap();
            (status, started.elapsed())
        }
    }))
    .await;
    for ((status, took), clone) in restores.iter().zip(&clones) {
        println!("clone {}: spawn to paused {} ms", clone.vm_id, took.as_millis());
        assert_eq!(status.state, VmState::Paused);
        let reply = engine
            .qmp(&clone.vm_id, serde_json::json!({"execute": "query-status"}))
            .await
            .unwrap();
        assert_eq!(reply["return"]["status"], "paused", "{reply}");
        let pid = status.pid.unwrap();
        let uid = webhoster::vmm::dir::uid_of(pid).unwrap();
        assert_ne!(uid, 0);
        assert_ne!(
            uid,
            engine.qemu_ids().template_id(),
            "no clone runs as the template's id"
        );
    }

    // 3. The seal: the RAM memfd a clone's QEMU holds refuses writes, even
    // root's through /proc, even opened read-write.
    let pid = restores[0].0.pid.unwrap();
    let ram_fd = format!("/proc/{pid}/fd/{}", webhoster::vmm::cmdline::RAM_FD);
    assert!(
        std::fs::read_link(&ram_fd)
            .unwrap()
            .to_string_lossy()
            .starts_with("/memfd:"),
        "{ram_fd}"
    );
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ram_fd)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let err = file.write_all_at(b"owned", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(
        file.set_len(0).unwrap_err().raw_os_error(),
        Some(libc::EPERM),
        "no truncation either"
    );
    drop(file);

    // 4. Two of the three are warmed up first, as the pool does: a
    // rehearsal seed in the seed file, `--warm-up`, paused again, then the
    // user's seed written over it. The third resumes straight from its
    // restore.
    for clone in &clones[..2] {
        let seed = engine.vm_dir(&clone.vm_id).seed_iso();
        write_seed(&seed, &format!("warm-up-{}", clone.vm_id), &key).await;
        let (took, says) = engine.warm_up_clone(&clone.vm_id).await.unwrap();
        println!("clone {}: warm-up {} ms ({says})", clone.vm_id, took.as_millis());
        assert!(says.contains("rehearsal") && says.contains("doors"), "{says}");
        assert_eq!(engine.status(&clone.vm_id).unwrap().state, VmState::Paused);
        let reply = engine
            .qmp(&clone.vm_id, serde_json::json!({"execute": "query-status"}))
            .await
            .unwrap();
        assert_eq!(reply["return"]["status"], "paused", "{reply}");
        write_seed(&seed, &clone.vm_id, &key).await;
    }

    let reports = futures::future::join_all(clones.iter().map(|c| engine.resume_clone(&c.vm_id))).await;
    for (report, clone) in reports.into_iter().zip(&clones) {
        let report = report.unwrap();
        println!(
            "clone {}: restore {} ms, cont {} ms, agent connect {} ms, clock {} ms, agent {} ms ({})",
            clone.vm_id,
            report.restore.as_millis(),
            report.cont.as_millis(),
            report.connect.as_millis(),
            report.clock.as_millis(),
            report.agent.as_millis(),
            report.agent_says
        );
        assert_eq!(engine.status(&clone.vm_id).unwrap().state, VmState::Running);
        let spec = engine.vm_dir(&clone.vm_id).read_spec().unwrap();
        assert_eq!(spec.restore, None, "vm.json says cold boot from now on");
    }
    for clone in &clones {
        // The guest's clock and its RTC are the host's (the template woke
        // behind by its age): the clock within a second of the host's
        // around the read.
        let host_now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        for what in ["clock", "rtc"] {
            let before = host_now();
            let guest: f64 = if what == "clock" {
                let mut agent = engine.guest_agent(&clone.vm_id).await.unwrap();
                let out = agent.exec("/bin/date", &["+%s.%N"]).await.unwrap();
                String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
            } else {
                guest_cat(&engine, &clone.vm_id, "/sys/class/rtc/rtc0/since_epoch")
                    .await
                    .parse()
                    .unwrap()
            };
            let after = host_now();
            // The RTC is only read at a boot (and a cold boot's QEMU starts
            // it at the host's time); it trails by about the seconds the
            // clone sat paused, never by the template's age.
            let slack = if what == "rtc" { 5.0 } else { 1.0 };
            assert!(
                guest > before.floor() - slack && guest < after + 1.0,
                "{what} of {}: guest {guest}, host {before}..{after}",
                clone.vm_id
            );
        }
        assert_eq!(
            guest_cat(&engine, &clone.vm_id, "/etc/hostname").await,
            clone.vm_id
        );
        // Nothing of a warm-up's rehearsal stays.
        assert_eq!(
            guest_cat(&engine, &clone.vm_id, "/var/lib/webhoster-seed/instance").await,
            format!("{}\tagent", clone.vm_id)
        );
        let mut agent = engine.guest_agent(&clone.vm_id).await.unwrap();
        let out = agent.exec("/bin/ls", &["/run/webhoster-seed"]).await.unwrap();
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("rehearsal"),
            "{out:?}"
        );
        let page = wait_http(clone.http).await;
        assert!(!page.is_empty());
    }
    let machine_ids: std::collections::BTreeSet<String> = {
        let mut ids = std::collections::BTreeSet::new();
        for c in &clones {
            ids.insert(guest_cat(&engine, &c.vm_id, "/etc/machine-id").await);
        }
        ids
    };
    assert_eq!(machine_ids.len(), 3, "every clone has its own machine-id");
    assert_eq!(
        sha256(&tdir.join("ram")),
        ram_sha,
        "the template RAM file is unchanged"
    );
    assert_eq!(
        sha256(&template.disk()),
        disk_sha,
        "the template disk is unchanged"
    );

    // A clone that dies before its resume is not restarted: it has no
    // guest of its own yet.
    let (doomed_spec, doomed) = clone_spec(&engine, &image, &template, &key, "doomed").await;
    reaper.track(&doomed.vm_id);
    let mut events = engine.subscribe();
    let status = engine.start_clone(&doomed_spec, &template).await.unwrap();
    kill9(status.pid.unwrap());
    let seen = states_until(
        &mut events,
        &doomed.vm_id,
        VmState::Failed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        seen,
        vec![
            VmState::Starting,
            VmState::Paused,
            VmState::Crashed,
            VmState::Failed
        ]
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(QemuReaper::pids_of(&doomed.vm_id).is_empty(), "not restarted");
    engine.destroy(&doomed.vm_id).await.unwrap();

    // 5. A resumed clone's QEMU killed: the supervisor brings it back as a
    // cold boot of its own disk.
    let crashed = &clones[0];
    let mut events = engine.subscribe();
    let first = engine.status(&crashed.vm_id).unwrap().pid.unwrap();
    kill9(first);
    let seen = states_until(
        &mut events,
        &crashed.vm_id,
        VmState::Running,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(seen, vec![VmState::Crashed, VmState::Starting, VmState::Running]);
    let second = engine.status(&crashed.vm_id).unwrap().pid.unwrap();
    let argv = cmdline_of(second);
    assert!(!argv.iter().any(|a| a == "-incoming"), "{argv:?}");
    assert!(
        !argv.iter().any(|a| a.contains("memory-backend")),
        "a cold line: {argv:?}"
    );
    assert!(
        argv.iter()
            .any(|a| a.contains(&format!("vms/{}/disk.qcow2", crashed.vm_id))),
        "{argv:?}"
    );
    let booted = Instant::now();
    let mut agent = qga_when_up(&engine.vm_dir(&crashed.vm_id)).await;
    let out = agent.exec("/bin/cat", &["/etc/hostname"]).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        crashed.vm_id,
        "same instance, own disk"
    );
    drop(agent);
    println!(
        "clone {}: cold boot after kill -9, agent answers after {:.1} s",
        crashed.vm_id,
        booted.elapsed().as_secs_f64()
    );

    // 6. A restarted webhoster: a paused clone is found paused again (its
    // vm.json says it is a clone, whatever spec the caller kept) and resumes;
    // a new engine loads the template from disk.
    for c in &clones {
        engine.destroy(&c.vm_id).await.unwrap();
    }
    // A paused clone runs no code and cannot answer a power-down: a stop
    // (teardown, --stop-guests) quits it at once instead of waiting.
    let (idle_spec, idle) = clone_spec(&engine, &image, &template, &key, "idle").await;
    reaper.track(&idle.vm_id);
    engine.start_clone(&idle_spec, &template).await.unwrap();
    let mut events = engine.subscribe();
    engine.stop(&idle.vm_id, Duration::from_secs(30)).await.unwrap();
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if ev.vm_id == idle.vm_id {
            seen.push((ev.to, ev.reason));
        }
    }
    assert!(
        seen.iter()
            .any(|(to, why)| *to == VmState::Stopped && why.contains("quit")),
        "{seen:?}"
    );
    engine.destroy(&idle.vm_id).await.unwrap();
    let (spare_spec, spare) = clone_spec(&engine, &image, &template, &key, "spare").await;
    reaper.track(&spare.vm_id);
    engine.start_clone(&spare_spec, &template).await.unwrap();
    drop(template);
    drop(engine);
    let engine = Engine::new(engine_opts()).unwrap();
    let outcome = engine.reattach(std::slice::from_ref(&spare_spec)).await;
    assert!(
        matches!(
            outcome[0].1,
            Ok(webhoster::vmm::ReattachOutcome::Reattached { .. })
        ),
        "{outcome:?}"
    );
    assert_eq!(engine.status(&spare.vm_id).unwrap().state, VmState::Paused);
    engine.resume_clone(&spare.vm_id).await.unwrap();
    assert_eq!(
        guest_cat(&engine, &spare.vm_id, "/etc/hostname").await,
        spare.vm_id
    );
    engine.destroy(&spare.vm_id).await.unwrap();
    let loaded_started = Instant::now();
    let template = engine
        .load_template(&tdir)
        .await
        .unwrap()
        .expect("a complete template");
    println!("template load: {} ms", loaded_started.elapsed().as_millis());
    assert_eq!(template.key(), tkey);
    let (spec, clone) = clone_spec(&engine, &image, &template, &key, "loaded").await;
    reaper.track(&clone.vm_id);
    engine.start_clone(&spec, &template).await.unwrap();
    let report = engine.resume_clone(&clone.vm_id).await.unwrap();
    println!(
        "clone of the loaded template: restore {} ms, cont {} ms, agent connect {} ms, clock {} ms, agent {} ms",
        report.restore.as_millis(),
        report.cont.as_millis(),
        report.connect.as_millis(),
        report.clock.as_millis(),
        report.agent.as_millis()
    );
    assert_eq!(
        guest_cat(&engine, &clone.vm_id, "/etc/hostname").await,
        clone.vm_id
    );
    engine.destroy(&clone.vm_id).await.unwrap();
    assert_eq!(sha256(&tdir.join("ram")), ram_sha);

    // An incomplete directory is no template.
    let partial: PathBuf = tmp.path().join("templates").join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    assert!(engine.load_template(&partial).await.unwrap().is_none());
}
