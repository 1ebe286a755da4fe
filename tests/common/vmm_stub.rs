//! A tiny multiboot "kernel" for engine tests that need a real QEMU but no
//! guest OS: it prints a line on the serial port, then does one thing
//! (idle, write the RTC, power off) and halts. Hand-assembled 32-bit x86;
//! QEMU loads it with `-kernel` like a Linux image.

use std::path::{Path, PathBuf};

/// Printed once per boot, so tests can count boots in serial.log.
pub const BOOT_LINE: &str = "webhoster-stub-boot";

#[derive(Debug, Clone, Copy)]
pub enum StubAction {
    /// Halt forever.
    Idle,
    /// Write the CMOS RTC seconds register: QEMU 7.2 emits an `RTC_CHANGE`
    /// event that qapi's 9.1 schema cannot decode. Then halt.
    RtcChange,
    /// ACPI soft-off (PM1a_CNT at 0x604, SLP_EN): a poweroff from inside the guest.
    Poweroff,
    /// Print the boot line forever (a console that never stops talking).
    Spam,
}

const LOAD: u32 = 0x0010_0000;
const HEADER_LEN: usize = 32;

pub fn stub_kernel(action: StubAction) -> Vec<u8> {
    let mut code: Vec<u8> = Vec::new();
    // mov esi, <message address> (patched below)
    code.push(0xBE);
    let msg_imm = code.len();
    code.extend([0, 0, 0, 0]);
    let next = code.len();
    code.push(0xAC); // lodsb
    code.extend([0x84, 0xC0]); // test al, al
    code.extend([0x74, 0x00]); // jz done
    let jz = code.len() - 1;
    code.extend([0x66, 0xBA, 0xF8, 0x03]); // mov dx, 0x3f8
    code.push(0xEE); // out dx, al
    code.extend([0xEB, 0x00]); // jmp next
    let jmp = code.len() - 1;
    code[jmp] = (next as isize - (jmp as isize + 1)) as i8 as u8;
    let done = code.len();
    code[jz] = (done - (jz + 1)) as u8;
    match action {
        StubAction::Idle => {}
        // mov al, 0; out 0x70, al; mov al, 0x30; out 0x71, al
        StubAction::RtcChange => code.extend([0xB0, 0x00, 0xE6, 0x70, 0xB0, 0x30, 0xE6, 0x71]),
        // mov dx, 0x604; mov ax, 0x2000; out dx, ax
        StubAction::Poweroff => code.extend([0x66, 0xBA, 0x04, 0x06, 0x66, 0xB8, 0x00, 0x20, 0x66, 0xEF]),
        // jmp to the start (mov esi, msg), with a 32-bit displacement.
        StubAction::Spam => {
            let rel = -((code.len() + 5) as i32);
            code.push(0xE9);
            code.extend(rel.to_le_bytes());
        }
    }
    let hlt = code.len();
    code.push(0xF4); // hlt
    code.extend([0xEB, 0x00]); // jmp hlt
    let back = code.len() - 1;
    code[back] = (hlt as isize - (back as isize + 1)) as i8 as u8;
    let msg_addr = LOAD + (HEADER_LEN + code.len()) as u32;
    code[msg_imm..msg_imm + 4].copy_from_slice(&msg_addr.to_le_bytes());
    code.extend(format!("{BOOT_LINE}\n").as_bytes());
    code.push(0);

    let total = (HEADER_LEN + code.len()) as u32;
    let magic: u32 = 0x1BAD_B002;
    let flags: u32 = 1 << 16; // the address fields below are valid
    let checksum = 0u32.wrapping_sub(magic.wrapping_add(flags));
    let mut image = Vec::new();
    for word in [
        magic,
        flags,
        checksum,
        LOAD,
        LOAD,
        LOAD + total,
        0,
        LOAD + HEADER_LEN as u32,
    ] {
        image.extend(word.to_le_bytes());
    }
    image.extend(code);
    image
}

/// Files for a stub VM in `dir`: kernel, a dummy module as initrd, a small
/// qcow2 base disk and a dummy seed. Returns (kernel, initrd, base, seed).
pub fn stub_files(dir: &Path, action: StubAction) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let kernel = dir.join(format!("stub-{action:?}.bin"));
    std::fs::write(&kernel, stub_kernel(action)).unwrap();
    let initrd = dir.join("stub-initrd");
    std::fs::write(&initrd, b"no initrd needed").unwrap();
    let seed = dir.join("stub-seed.img");
    std::fs::write(&seed, vec![0u8; 4096]).unwrap();
    let base = dir.join("stub-base.qcow2");
    if !base.exists() {
        let ok = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M")
            .status()
            .unwrap()
            .success();
        assert!(ok, "qemu-img create failed");
    }
    (kernel, initrd, base, seed)
}

/// Unique, short vm_ids for this test process (tests run in parallel).
pub fn unique_vm_id(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        tag
    )
}

/// Kills, on drop (also on panic), every QEMU whose command line carries
/// `-name <vm_id>` for a registered vm_id: the engine itself leaves QEMUs
/// running when dropped, by design.
#[derive(Default)]
pub struct QemuReaper {
    vm_ids: std::sync::Mutex<Vec<String>>,
}

impl QemuReaper {
    pub fn track(&self, vm_id: &str) {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(Self::kill_orphans);
        self.vm_ids.lock().unwrap().push(vm_id.to_owned());
    }

    /// A test process killed outright (a `timeout`, SIGKILL) runs no drop:
    /// its QEMUs, named `t<pid>-...` by [`unique_vm_id`], outlive it. The
    /// next test run kills those whose test process is gone.
    fn kill_orphans() {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let Some(owner) = args
                .windows(2)
                .find(|w| w[0] == "-name")
                .and_then(|w| w[1].strip_prefix('t')?.split('-').next()?.parse::<i32>().ok())
            else {
                continue;
            };
            let is_qemu = args.first().is_some_and(|a| a.contains("qemu-system"));
            if is_qemu && !webhoster::vmm::dir::is_alive(owner) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Pids of live processes running `-name <vm_id>`.
    pub fn pids_of(vm_id: &str) -> Vec<i32> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if webhoster::vmm::dir::is_our_qemu(pid, vm_id) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        let vm_ids = self.vm_ids.lock().unwrap();
        for vm_id in vm_ids.iter() {
            for pid in Self::pids_of(vm_id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // The VMs' cgroups (the engine removes them on stop and destroy,
        // which a test that ends early never reaches). A killed QEMU takes a
        // moment to let go of its cgroup.
        let Ok(cgroups) = webhoster::vmm::Cgroups::detect(webhoster::vmm::cgroup::DEFAULT_PARENT) else {
            return;
        };
        for vm_id in vm_ids.iter() {
            for _ in 0..40 {
                if cgroups.remove(vm_id).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// Make a test's temporary root traversable (0711, not listable): QEMU runs
/// as an unprivileged id of its own and opens its kernel, images and VM
/// files by path, as it does under `/var/lib/webhoster` (0711).
pub fn let_qemu_through(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)).unwrap();
}
