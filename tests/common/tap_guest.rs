//! Real Debian guests (TCG) on webhoster's taps: each VM gets its tap from a
//! real `net::Network` (guarded, on the bridge), its fd handed to QEMU as
//! `-netdev tap,fd=N`, and a NoCloud seed with a static address. QEMU is
//! killed when the `TapVm` drops, also when the test panics.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use webhoster::net::{Network, alloc};
use webhoster::seed::{SeedSpec, StaticNetwork};

use super::host::{ChildGuard, http_get, run_ok};

pub struct TapVm {
    _qemu: ChildGuard,
    pub vm_id: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub tap: String,
    pub serial: PathBuf,
}

impl TapVm {
    /// The last `n` lines of the serial console.
    pub fn serial_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Boot `vm_id` from the cached image on a tap of `net`, at `ip`, with
/// `pubkey` for the `ubuntu` user (a sudoer) and a page naming
/// `owner-<vm_id>`.
pub async fn boot(
    net: &Network,
    img: &webhoster::image::Image,
    dir: &Path,
    vm_id: &str,
    ip: Ipv4Addr,
    pubkey: &str,
) -> TapVm {
    let mac = alloc::mac_for(vm_id);
    let tap = net.create_tap(vm_id, &mac, ip).await.expect("create tap");
    let fd = net.open_tap(&tap).expect("open tap");
    // QEMU inherits the fd: clear close-on-exec on our copy.
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear FD_CLOEXEC");

    let seed = dir.join(format!("{vm_id}-seed.iso"));
    webhoster::seed::write(
        &SeedSpec {
            instance_id: vm_id.into(),
            hostname: vm_id.into(),
            user: "ubuntu".into(),
            ssh_keys: vec![webhoster::auth::SshPublicKey::parse(pubkey).unwrap()],
            owner: format!("owner-{vm_id}"),
            network: Some(StaticNetwork {
                mac: mac.clone(),
                address: Ipv4Net::new(ip, net.subnet().prefix_len()).unwrap(),
                gateway: net.gateway(),
            }),
        },
        &seed,
    )
    .await
    .expect("write seed");
    let disk = dir.join(format!("{vm_id}.qcow2"));
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            img.disk.to_str().unwrap(),
            disk.to_str().unwrap(),
        ],
    );
    let serial = dir.join(format!("{vm_id}-serial.log"));
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "1024",
        ])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-nodefaults",
            "-no-user-config",
        ])
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .arg("-append")
        .arg(webhoster::vmm::cmdline::guest_append(
            webhoster::image::KERNEL_CMDLINE,
            webhoster::vmm::AccelChoice::Tcg,
        ))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            seed.display()
        ))
        .args(["-netdev", &format!("tap,id=n0,fd={},vhost=off", fd.as_raw_fd())])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
        .args(["-device", "virtio-rng-pci"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    drop(fd);
    TapVm {
        _qemu: ChildGuard(child),
        vm_id: vm_id.to_string(),
        ip,
        mac,
        tap,
        serial,
    }
}

/// The guest's page once it answers on :80 (panics with the serial tail
/// after `deadline`).
pub fn wait_http(vm: &TapVm, deadline: Instant) -> String {
    loop {
        if let Ok(body) = http_get(SocketAddr::from((vm.ip, 80)))
            && !body.is_empty()
        {
            return body;
        }
        if Instant::now() > deadline {
            panic!(
                "guest {} never answered HTTP; serial tail:\n{}",
                vm.ip,
                vm.serial_tail(40)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
