//! VM engine figures (printed, not asserted):
//! - spawn -> QMP `running`: median over runs of `Engine::start` (QEMU
//!   process start, monitor up, `query-status` says running; no guest boot:
//!   the guest is a tiny multiboot stub that halts);
//! - QEMU's resident memory per idle VM beyond guest RAM (the stub touches
//!   no guest RAM, so the RSS of its QEMU is the overhead);
//! - how many idle `small` VMs fit in this machine's memory: extrapolated
//!   from the measured overhead with guest RAM counted in full (the
//!   conservative bound), and, when the guest image is cached, from the RSS
//!   of real idle Debian `small` guests after boot (HTTP answering).

#[path = "../tests/common/vmm_stub.rs"]
#[allow(dead_code)]
mod vmm_stub;

use std::time::{Duration, Instant};

use vmm_stub::{QemuReaper, StubAction, stub_files, unique_vm_id};
use webhoster::vmm::{Engine, EngineOptions, Plan, VmNet, VmSpec};

const SPAWN_RUNS: usize = 15;
const IDLE_VMS: usize = 6;

fn mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tmp = tempfile::Builder::new().prefix("vmm-bench").tempdir().unwrap();
    vmm_stub::let_qemu_through(tmp.path());
    let reaper = QemuReaper::default();
    let engine = Engine::new(EngineOptions::new(tmp.path().join("vms"))).unwrap();
    let (kernel, initrd, base, seed) = stub_files(&tmp.path().join("files"), StubAction::Idle);
    let small = Plan::load("small").unwrap();
    let spec = |vm_id: String| VmSpec {
        vm_id,
        plan: small.clone(),
        kernel: kernel.clone(),
        initrd: initrd.clone(),
        base_disk: base.clone(),
        append: String::new(),
        seed_iso: seed.clone(),
        net: VmNet::None,
        labels: Default::default(),
        restore: None,
    };
    println!("vmm bench: accel {} ({})", engine.accel().0, engine.accel().1);

    // 1. spawn -> QMP running.
    let mut times = Vec::new();
    for _ in 0..SPAWN_RUNS {
        let s = spec(unique_vm_id("spawn"));
        reaper.track(&s.vm_id);
        engine.create_disk(&s).await.unwrap();
        let t = Instant::now();
        engine.start(&s).await.unwrap();
        times.push(t.elapsed());
        engine.destroy(&s.vm_id).await.unwrap();
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "spawn -> QMP running: median {:.1} ms, min {:.1} ms, max {:.1} ms over {SPAWN_RUNS} runs (target <= 150 ms)",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
    );

    // 2. RSS of idle VMs.
    let mut ids = Vec::new();
    for _ in 0..IDLE_VMS {
        let s = spec(unique_vm_id("idle"));
        reaper.track(&s.vm_id);
        engine.create_disk(&s).await.unwrap();
        engine.start(&s).await.unwrap();
        ids.push(s.vm_id);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rss = Vec::new();
    for vm_id in &ids {
        let pid = engine.status(vm_id).unwrap().pid.unwrap();
        rss.push(webhoster::vmm::dir::rss_kib(pid).unwrap());
    }
    rss.sort();
    let median_mib = rss[rss.len() / 2] as f64 / 1024.0;
    let total_mib: f64 = rss.iter().sum::<u64>() as f64 / 1024.0;
    println!(
        "QEMU RSS overhead per idle VM (guest RAM untouched): median {median_mib:.1} MiB; {IDLE_VMS} VMs together {total_mib:.0} MiB"
    );
    let mem_mib = mem_total_kib() as f64 / 1024.0;
    // Keep 2 GiB for the host: webhoster, nginx, the database, page cache.
    let usable = mem_mib - 2048.0;
    let per_vm = small.memory_mib as f64 + median_mib;
    println!(
        "idle small VMs in {:.1} GiB (2 GiB kept for the host): about {} \
         (extrapolated: {usable:.0} MiB / ({} MiB guest RAM counted in full + {median_mib:.0} MiB QEMU), \
         not measured at that count; an idle Debian guest touches only part of its RAM, so more fit \
         until the guests' page caches grow)",
        mem_mib / 1024.0,
        (usable / per_vm).floor(),
        small.memory_mib,
    );
    for vm_id in &ids {
        engine.destroy(vm_id).await.unwrap();
    }

    // 3. Real idle Debian guests, when the image is there.
    let Some(image) = find_image() else {
        println!("real-guest RSS: skipped (no guest image in the cache)");
        return;
    };
    let mut guests = Vec::new();
    for i in 0..REAL_GUESTS {
        let vm_id = unique_vm_id("real");
        reaper.track(&vm_id);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = engine.vm_dir(&vm_id);
        std::fs::create_dir_all(dir.root()).unwrap();
        let key = tmp.path().join(format!("key{i}"));
        assert!(
            std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key)
                .status()
                .unwrap()
                .success()
        );
        webhoster::seed::write(
            &webhoster::seed::SeedSpec {
                instance_id: vm_id.clone(),
                hostname: format!("bench{i}"),
                user: "ubuntu".into(),
                ssh_keys: vec![
                    webhoster::auth::SshPublicKey::parse(
                        &std::fs::read_to_string(key.with_extension("pub")).unwrap(),
                    )
                    .unwrap(),
                ],
                owner: "bench".into(),
                network: Some(webhoster::seed::StaticNetwork {
                    mac: webhoster::vmm::cmdline::USER_NET_MAC.into(),
                    address: "10.0.2.15/24".parse().unwrap(),
                    gateway: "10.0.2.2".parse().unwrap(),
                }),
            },
            &dir.seed_iso(),
        )
        .await
        .unwrap();
        let s = VmSpec {
            vm_id: vm_id.clone(),
            plan: small.clone(),
            kernel: image.join("vmlinux"),
            initrd: image.join("initrd.img"),
            base_disk: image.join("disk.qcow2"),
            append: "console=ttyS0 root=/dev/vda rw".into(),
            seed_iso: dir.seed_iso(),
            net: VmNet::User {
                hostfwd: vec![(([127, 0, 0, 1], port).into(), 80)],
            },
            labels: Default::default(),
            restore: None,
        };
        engine.create_disk(&s).await.unwrap();
        engine.start(&s).await.unwrap();
        guests.push((vm_id, port));
    }
    let started = Instant::now();
    for (_, port) in &guests {
        while !reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
        {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "guests did not answer HTTP"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    println!(
        "real guests: {REAL_GUESTS} small guests answered HTTP after {:.0} s (TCG, shared CPU)",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut real = Vec::new();
    for (vm_id, _) in &guests {
        let pid = engine.status(vm_id).unwrap().pid.unwrap();
        real.push(webhoster::vmm::dir::rss_kib(pid).unwrap() as f64 / 1024.0);
    }
    let avg = real.iter().sum::<f64>() / real.len() as f64;
    println!(
        "real idle small guest RSS (QEMU + touched guest RAM): {:?} MiB, mean {avg:.0} MiB -> about {} idle small VMs in {usable:.0} MiB \
         (extrapolated from {REAL_GUESTS} guests; grows as guests fill their page cache, bounded by the {} MiB plan + overhead)",
        real.iter().map(|r| r.round()).collect::<Vec<_>>(),
        (usable / avg).floor(),
        small.memory_mib,
    );
    for (vm_id, _) in &guests {
        engine.destroy(vm_id).await.unwrap();
    }
}

const REAL_GUESTS: usize = 2;

/// The newest complete image in the cache (`<cache>/<hash>/{vmlinux,initrd.img,disk.qcow2}`).
fn find_image() -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("WEBHOSTER_IMAGE_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/webhoster/images".into());
    std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|d| {
            ["vmlinux", "initrd.img", "disk.qcow2"]
                .iter()
                .all(|f| d.join(f).is_file())
        })
        .max_by_key(|d| d.join("disk.qcow2").metadata().and_then(|m| m.modified()).ok())
}
