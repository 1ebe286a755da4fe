//! The typed QEMU command builder: one small type per switch group, each
//! pushing its own arguments. The result is an argv for `Command::args`, never
//! a shell string. Golden tests (`tests/vmm_golden.rs`) pin the output.
//!
//! Hardware (the guest image is built for exactly this): q35, virtio-blk root
//! disk first (`/dev/vda`), the read-only NoCloud seed second (`/dev/vdb`),
//! one virtio-net-pci NIC, virtio-rng-pci, isa-serial on ttyS0, pvpanic so a
//! guest kernel panic reaches us as `GUEST_PANICKED`, a virtio-serial port
//! for the guest agent (`org.qemu.guest_agent.0`), no graphics, no
//! default devices; QEMU under its seccomp sandbox. QEMU is started
//! unprivileged (`vmm::sandbox`), so its listening sockets are made by the
//! engine and passed as descriptors. Must never decide policy (which VM,
//! which plan): it only spells out a [`CmdlineConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::accel::AccelChoice;
use super::plan::Plan;

/// Where each passed file descriptor lands in QEMU (0-2 are stdio).
pub const TAP_FD: i32 = 3;
/// The supervisor's QMP socket, listening.
pub const QMP_FD: i32 = 4;
/// The operators' QMP socket, listening.
pub const OPERATOR_FD: i32 = 5;
/// The guest agent's socket, listening.
pub const QGA_FD: i32 = 6;
/// A template's or clone's guest RAM: a memfd (`vmm::template`), named to
/// QEMU as `/proc/self/fd/7`, so QEMU never opens a RAM file by a path
/// another QEMU could reach.
pub const RAM_FD: i32 = 7;

/// Bumped whenever the template/clone command line changes in a way a saved
/// template cannot follow (device list, machine, memory backend): it is part
/// of every template key (`vmm::template::template_key`), so old templates
/// are rebuilt instead of restored into a different machine.
pub const TEMPLATE_FORMAT: u32 = 3;

/// The machine type of templates and clones, pinned: the `q35` alias may move
/// to a newer machine with a QEMU upgrade, and a saved state only restores
/// into the exact machine it was saved from.
pub const SNAPSHOT_MACHINE: &str = "pc-q35-7.2";

/// The memory backend's id on the command line.
const RAM_BACKEND_ID: &str = "mem0";

/// Which snapshot role a QEMU plays (none: a cold boot, the default line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    /// Boots to be saved: its RAM is the memfd, shared (`share=on`), so the
    /// guest's pages land in it and the migration stream leaves them out.
    Template,
    /// Restored from a template: the same memfd, private (`share=off`,
    /// copy-on-write), waiting for `migrate-incoming` and staying paused.
    Clone,
}

/// QEMU's default MAC, used when the spec has no tap (user networking).
pub const USER_NET_MAC: &str = "52:54:00:12:34:56";

/// Everything the command line depends on, already resolved to paths.
#[derive(Debug, Clone)]
pub struct CmdlineConfig {
    pub vm_id: String,
    pub plan: Plan,
    pub accel: AccelChoice,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub disk: PathBuf,
    pub seed_iso: PathBuf,
    pub nic: Nic,
    pub pidfile: PathBuf,
    /// `None` for every cold boot: the line stays byte-identical to the one
    /// before templates existed (golden tests pin it).
    pub snapshot: Option<Snapshot>,
}

/// One switch group.
pub trait Switch {
    fn push_args(&self, argv: &mut Vec<String>);
}

/// QEMU splits option values on `,`; a literal comma is written twice.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn path(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

/// `-name`: the vm_id on the command line is how a pid is recognised as ours.
pub struct Name<'a>(pub &'a str);
impl Switch for Name<'_> {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend(["-name".into(), escape(self.0)]);
    }
}

/// No defaults, no user config, no display: only what we list exists.
pub struct Baseline;
impl Switch for Baseline {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend(
            [
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                // A guest reboot stays a reboot (RESET event, same QEMU), a
                // poweroff ends QEMU (SHUTDOWN guest=true), a panic ends it
                // too (GUEST_PANICKED) and the supervisor restarts it.
                "-action",
                "reboot=reset,shutdown=poweroff,panic=shutdown",
            ]
            .map(String::from),
        );
    }
}

/// QEMU's seccomp filter: no obsolete system calls, no set*id calls, no
/// fork or exec, no changes to scheduling or resource limits.
///
/// No `-runas`: QEMU 7.2 installs the filter before it would drop
/// privileges, so `elevateprivileges=deny` would kill it on its own
/// `setgid`. QEMU is started unprivileged instead, and never needs a set*id
/// call.
pub struct Sandbox;
impl Switch for Sandbox {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend(
            [
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ]
            .map(String::from),
        );
    }
}

/// Machine type and accelerator. A snapshot's machine is pinned and takes
/// its RAM from the memory backend.
pub struct Machine {
    pub accel: AccelChoice,
    pub snapshot: bool,
}
impl Switch for Machine {
    fn push_args(&self, argv: &mut Vec<String>) {
        let machine = if self.snapshot {
            format!("{SNAPSHOT_MACHINE},memory-backend={RAM_BACKEND_ID}")
        } else {
            "q35".into()
        };
        argv.extend(["-machine".into(), machine, "-accel".into()]);
        argv.push(match self.accel {
            AccelChoice::Kvm => "kvm".into(),
            // Bound the translation cache: QEMU's default reserves up to 1 GiB
            // per VM; 128 MiB keeps a Debian guest fast and RSS predictable.
            AccelChoice::Tcg => "tcg,tb-size=128".into(),
        });
    }
}

/// CPU model, vCPUs and memory.
pub struct Cpu<'a> {
    pub accel: AccelChoice,
    pub plan: &'a Plan,
}
impl Switch for Cpu<'_> {
    fn push_args(&self, argv: &mut Vec<String>) {
        // Under TCG `max` would enable 5-level paging and other features that
        // only cost emulation time; qemu64 is enough for Debian amd64.
        let model = match self.accel {
            AccelChoice::Kvm => "host",
            AccelChoice::Tcg => "qemu64",
        };
        argv.extend([
            "-cpu".into(),
            model.into(),
            "-smp".into(),
            self.plan.vcpus.to_string(),
            "-m".into(),
            format!("{}M", self.plan.memory_mib),
        ]);
    }
}

/// The guest RAM of a template or clone: the memfd at [`RAM_FD`]. The
/// template shares it (its writes land in the memfd, and `x-ignore-shared`
/// leaves them out of the stream); a clone maps it privately, so its writes
/// stay its own and the pages it never writes are shared by every clone.
pub struct RamBackend<'a> {
    pub plan: &'a Plan,
    pub snapshot: Snapshot,
}
impl Switch for RamBackend<'_> {
    fn push_args(&self, argv: &mut Vec<String>) {
        let share = match self.snapshot {
            Snapshot::Template => "on",
            Snapshot::Clone => "off",
        };
        argv.extend([
            "-object".into(),
            format!(
                "memory-backend-file,id={RAM_BACKEND_ID},size={}M,mem-path=/proc/self/fd/{RAM_FD},share={share}",
                self.plan.memory_mib
            ),
        ]);
    }
}

/// A VM generation id with a new GUID per QEMU: a guest kernel with the
/// vmgenid driver reseeds its RNG when a restored clone sees a new one.
pub struct VmGenId;
impl Switch for VmGenId {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend(["-device".into(), "vmgenid,guid=auto".into()]);
    }
}

/// A clone waits for its state (`migrate-incoming` over QMP, from a
/// descriptor: the sandbox forbids `exec:`) and stays paused after it.
pub struct Incoming;
impl Switch for Incoming {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend(["-incoming", "defer", "-S"].map(String::from));
    }
}

/// What the guest kernel's command line adds to the image's under `accel`.
/// Under TCG the guest's Spectre mitigations (retpolines on every indirect
/// call, barriers on user copies, the RSB stuffed at each switch) are pure
/// emulation cost: TCG emulates no speculation, and a guest `lfence` is not
/// a host barrier, so they protect nothing. Without them a bare boot reached
/// its ready target 1.0-1.25 s sooner (three interleaved pairs, 10.3-12.2 s
/// instead of 11.2-13.4 s). Under KVM the guest runs natively and keeps them.
pub fn guest_append(image_append: &str, accel: AccelChoice) -> String {
    match accel {
        AccelChoice::Kvm => image_append.to_owned(),
        AccelChoice::Tcg => format!("{image_append} mitigations=off"),
    }
}

/// Direct kernel boot.
pub struct Boot<'a> {
    pub accel: AccelChoice,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub append: &'a str,
}
impl Switch for Boot<'_> {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend([
            "-kernel".into(),
            self.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            self.initrd.to_string_lossy().into_owned(),
            "-append".into(),
            guest_append(self.append, self.accel),
        ]);
    }
}

/// A virtio-blk disk: `-drive` backend plus its device. Order on the command
/// line is PCI order is guest name order (vda, vdb, ...).
pub struct Drive<'a> {
    pub id: &'a str,
    pub path: &'a Path,
    pub format: &'a str,
    pub read_only: bool,
}
impl Switch for Drive<'_> {
    fn push_args(&self, argv: &mut Vec<String>) {
        let mut drive = format!(
            "file={},format={},if=none,id={}",
            path(self.path),
            self.format,
            self.id
        );
        if self.read_only {
            drive.push_str(",readonly=on");
        } else {
            // Written out although it is QEMU's default, because durability
            // rests on it. A guest write lands in the host page cache, which
            // outlives a SIGKILL of QEMU, but the qcow2 metadata of newly
            // allocated clusters stays in QEMU's memory until the guest
            // flushes. A flush (ext4 sends one with each journal commit, at
            // least every second in our image) writes that metadata out and
            // fdatasyncs, so flushed data also survives a host crash.
            // `unsafe` would skip the fdatasync, `writethrough` would cost one
            // per write, `none` (O_DIRECT) would bypass the host page cache.
            drive.push_str(",cache=writeback,discard=unmap");
        }
        argv.extend([
            "-drive".into(),
            drive,
            "-device".into(),
            format!("virtio-blk-pci,drive={}", self.id),
        ]);
    }
}

/// The NIC backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nic {
    None,
    /// QEMU user networking with `restrict=on` (no egress), forwarding host
    /// addresses to guest ports. For tests and single-user setups.
    User {
        hostfwd: Vec<(SocketAddr, u16)>,
    },
    /// A tap already open in the parent, passed as fd [`TAP_FD`].
    Tap {
        mac: String,
    },
    /// The NIC with no backend (link down to nothing): a template boots so,
    /// because a backend with state of its own (slirp) would be in the
    /// saved state, and a clone on a tap could not load it.
    Detached,
}

/// The netdev + device pair (Kata's `add_nic`): they always come together.
pub struct NetPair<'a>(pub &'a Nic);
impl Switch for NetPair<'_> {
    fn push_args(&self, argv: &mut Vec<String>) {
        let (netdev, mac) = match self.0 {
            Nic::None => return,
            Nic::User { hostfwd } => {
                let mut netdev = "user,id=net0,restrict=on".to_owned();
                for (host, guest_port) in hostfwd {
                    netdev.push_str(&format!(
                        ",hostfwd=tcp:{}:{}-:{}",
                        host.ip(),
                        host.port(),
                        guest_port
                    ));
                }
                (netdev, USER_NET_MAC)
            }
            // vhost needs /dev/vhost-net and the tap's namespace; off keeps the
            // fd self-contained.
            Nic::Tap { mac } => (format!("tap,id=net0,fd={TAP_FD},vhost=off"), mac.as_str()),
            Nic::Detached => {
                argv.extend(["-device".into(), format!("virtio-net-pci,mac={USER_NET_MAC}")]);
                return;
            }
        };
        argv.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={mac}"),
        ]);
    }
}

/// Entropy for the guest: without it boot stalls on the entropy pool.
pub struct Rng;
impl Switch for Rng {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend(
            [
                "-object",
                "rng-random,id=rng0,filename=/dev/urandom",
                "-device",
                "virtio-rng-pci,rng=rng0",
            ]
            .map(String::from),
        );
    }
}

/// Panic notification device (`GUEST_PANICKED`).
pub struct PanicDevice;
impl Switch for PanicDevice {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend(["-device".into(), "pvpanic".into()]);
    }
}

/// The guest agent's channel: a virtio-serial controller with one port named
/// `org.qemu.guest_agent.0` (the name the guest's udev rule starts
/// `qemu-guest-agent.service` for), backed by a listening unix socket
/// passed as descriptor `fd`. `wait=off`: QEMU does not wait for a client.
/// Whatever sits in the channel from an earlier client (a late reply) is
/// skipped by the client's resync (`vmm::qga`).
pub struct GuestAgentPort {
    pub fd: i32,
}
impl Switch for GuestAgentPort {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend([
            "-chardev".into(),
            format!("socket,id=qga0,fd={},server=on,wait=off", self.fd),
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-device".into(),
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".into(),
        ]);
    }
}

/// A QMP monitor on a listening unix socket passed as descriptor `fd`.
pub struct QmpMonitor<'a> {
    pub id: &'a str,
    pub fd: i32,
}
impl Switch for QmpMonitor<'_> {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend([
            "-chardev".into(),
            format!("socket,id={},fd={},server=on,wait=off", self.id, self.fd),
            "-mon".into(),
            format!("chardev={},mode=control", self.id),
        ]);
    }
}

/// The serial console's chardev id, which `ringbuf-read` names.
pub const SERIAL_CHARDEV: &str = "serial0";

/// Bytes of serial console QEMU keeps (a power of two, as `ringbuf` wants).
pub const SERIAL_RING_BYTES: u32 = 1 << 20;

/// The serial console, into a ring buffer in QEMU's memory, never a file:
/// a guest that floods its console overwrites its own oldest output and
/// nothing grows on disk, also while no webhoster runs. The supervisor
/// drains it over QMP (`ringbuf-read`) into `serial.log`, and after a
/// restart of webhoster the last [`SERIAL_RING_BYTES`] are still there.
pub struct Serial;
impl Switch for Serial {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend([
            "-chardev".into(),
            format!("ringbuf,id={SERIAL_CHARDEV},size={SERIAL_RING_BYTES}"),
            "-serial".into(),
            format!("chardev:{SERIAL_CHARDEV}"),
        ]);
    }
}

/// QEMU writes and locks its pidfile; the engine reads it to find the VM after
/// a restart. The engine creates it for QEMU, which may not create files in
/// the VM directory. (The lock alone does not keep a second QEMU of the VM
/// off its sockets: the engine's `start.lock` does.)
pub struct PidFile<'a>(pub &'a Path);
impl Switch for PidFile<'_> {
    fn push_args(&self, argv: &mut Vec<String>) {
        argv.extend(["-pidfile".into(), self.0.to_string_lossy().into_owned()]);
    }
}

/// The whole argv after the program name.
pub fn build(cfg: &CmdlineConfig) -> Vec<String> {
    let switches: Vec<Box<dyn Switch + '_>> = vec![
        Box::new(Name(&cfg.vm_id)),
        Box::new(Baseline),
        Box::new(Sandbox),
        Box::new(Machine {
            accel: cfg.accel,
            snapshot: cfg.snapshot.is_some(),
        }),
        Box::new(Cpu {
            accel: cfg.accel,
            plan: &cfg.plan,
        }),
        Box::new(Boot {
            accel: cfg.accel,
            kernel: &cfg.kernel,
            initrd: &cfg.initrd,
            append: &cfg.append,
        }),
        Box::new(Drive {
            id: "disk0",
            path: &cfg.disk,
            format: "qcow2",
            read_only: false,
        }),
        Box::new(Drive {
            id: "seed0",
            path: &cfg.seed_iso,
            format: "raw",
            read_only: true,
        }),
        Box::new(NetPair(&cfg.nic)),
        Box::new(Rng),
        Box::new(PanicDevice),
        // After every existing PCI device, so theirs keep their addresses.
        Box::new(GuestAgentPort { fd: QGA_FD }),
        Box::new(QmpMonitor {
            id: "qmp0",
            fd: QMP_FD,
        }),
        // A second monitor for operators (`webhoster vm qmp`, socat), so the
        // supervisor's connection is never taken away.
        Box::new(QmpMonitor {
            id: "qmp1",
            fd: OPERATOR_FD,
        }),
        Box::new(Serial),
        Box::new(PidFile(&cfg.pidfile)),
    ];
    let mut argv = Vec::with_capacity(64);
    for switch in &switches {
        switch.push_args(&mut argv);
    }
    if let Some(snapshot) = cfg.snapshot {
        // Appended after the cold line, so a cold boot's argv never changes;
        // only the order among QEMU's devices matters for a restore, and
        // vmgenid is no PCI device.
        RamBackend {
            plan: &cfg.plan,
            snapshot,
        }
        .push_args(&mut argv);
        VmGenId.push_args(&mut argv);
        if snapshot == Snapshot::Clone {
            Incoming.push_args(&mut argv);
        }
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_are_doubled_in_option_values() {
        let mut argv = Vec::new();
        Drive {
            id: "d",
            path: Path::new("/a,b/disk.qcow2"),
            format: "qcow2",
            read_only: false,
        }
        .push_args(&mut argv);
        assert_eq!(
            argv[1],
            "file=/a,,b/disk.qcow2,format=qcow2,if=none,id=d,cache=writeback,discard=unmap"
        );
    }

    #[test]
    fn set_id_calls_are_always_denied() {
        let mut argv = Vec::new();
        Sandbox.push_args(&mut argv);
        assert_eq!(
            argv,
            [
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ]
        );
    }

    #[test]
    fn a_clone_maps_the_ram_fd_privately_and_waits_for_its_state() {
        let plan = Plan::load("small").unwrap();
        let mut argv = Vec::new();
        RamBackend {
            plan: &plan,
            snapshot: Snapshot::Clone,
        }
        .push_args(&mut argv);
        assert_eq!(argv[0], "-object");
        assert!(
            argv[1].contains(&format!("mem-path=/proc/self/fd/{RAM_FD},share=off")),
            "{}",
            argv[1]
        );
        assert!(argv[1].contains(&format!("size={}M", plan.memory_mib)));
        let mut argv = Vec::new();
        RamBackend {
            plan: &plan,
            snapshot: Snapshot::Template,
        }
        .push_args(&mut argv);
        assert!(argv[1].ends_with("share=on"), "{}", argv[1]);
        let mut argv = Vec::new();
        Machine {
            accel: AccelChoice::Tcg,
            snapshot: true,
        }
        .push_args(&mut argv);
        assert_eq!(argv[1], "pc-q35-7.2,memory-backend=mem0");
    }

    #[test]
    fn only_a_tcg_guest_boots_without_spectre_mitigations() {
        let append = |accel| {
            let mut argv = Vec::new();
            Boot {
                accel,
                kernel: Path::new("/k"),
                initrd: Path::new("/i"),
                append: "console=ttyS0 quiet",
            }
            .push_args(&mut argv);
            argv.last().cloned().unwrap()
        };
        assert_eq!(append(AccelChoice::Tcg), "console=ttyS0 quiet mitigations=off");
        assert_eq!(append(AccelChoice::Kvm), "console=ttyS0 quiet");
    }

    #[test]
    fn no_nic_means_no_netdev() {
        let mut argv = Vec::new();
        NetPair(&Nic::None).push_args(&mut argv);
        assert!(argv.is_empty());
    }
}
