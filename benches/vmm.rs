//! VM engine figures (printed, not asserted):
//! - spawn -> QMP `running`: median over runs of `Engine::start` (QEMU
//!   process start, monitor up, `query-status` says running; no guest boot:
//!   the guest is a tiny multiboot stub that halts);
//! - QEMU's resident memory per idle VM beyond guest RAM (the stub touches
//!   no guest RAM, so the RSS of its QEMU is the overhead);
//! - how many idle `small` VMs fit in this machine's memory: extrapolated
//!   from the measured overhead, with guest RAM counted in full (an idle
//!   Debian guest touches less, so this is the conservative bound).

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
}
