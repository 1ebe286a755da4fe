//! One VM on disk: `<vms_dir>/<vm_id>/` and the files in it, plus the checks
//! that decide whether a pid is really this VM's QEMU. Never spawns or
//! signals anything.
//!
//! ```text
//! vm.json            the VmSpec (labels shown by `webhoster vm list`)
//! disk.qcow2         qcow2 overlay on the base image, sized by plan
//! seed.iso           NoCloud seed (written by the caller; the spec names it)
//! qmp.sock           QMP for the supervisor (one client at a time)
//! qmp-operator.sock  QMP for operators: `webhoster vm qmp`, socat
//! qga.sock           the guest agent's virtio-serial port (one client at a time)
//! qga.lock           flock held by the one guest-agent client (vmm::qga)
//! qemu.pid           created by the engine, written and locked by QEMU
//! start.lock         flock held while a start checks and spawns
//! backups/           <id>.qcow2 per backup (vmm::backup)
//! serial.log (+.1..)  serial console, drained from QEMU's ring (vmm::logs)
//! qemu.log (+.1..)    QEMU's own stdout/stderr, through a pipe (vmm::logs)
//! ```
//!
//! Modes, set whatever the umask: everything is root's. `vms/` is 0711
//! (traversable, not listable), each VM directory 0710 with the group of
//! its VM's QEMU id (`vmm::sandbox`), so that QEMU alone may pass through
//! it, and may create, rename or remove nothing in it. QEMU gets exactly
//! the files it opens by path through that group: `disk.qcow2` and
//! `qemu.pid` 0660 (the engine creates the pidfile for it), the seed 0640.
//! Everything else is 0600: `vm.json`, the locks, the logs (written by the
//! engine alone, capped), and the sockets, which the engine binds
//! and passes to QEMU as descriptors ([`VmDir::listen`]). A QEMU cannot
//! chmod what it does not own, and cannot plant a symlink for the root
//! service to follow.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::VmSpec;

#[derive(Debug, Clone)]
pub struct VmDir {
    root: PathBuf,
}

impl VmDir {
    pub fn new(vms_dir: &Path, vm_id: &str) -> VmDir {
        VmDir {
            root: vms_dir.join(vm_id),
        }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn spec_file(&self) -> PathBuf {
        self.root.join("vm.json")
    }
    pub fn disk(&self) -> PathBuf {
        self.root.join("disk.qcow2")
    }
    /// Where the orchestrator is expected to write the seed (the spec may
    /// name another path).
    /// `backups/`: one `<id>.qcow2` per complete backup, `.<id>.qcow2.tmp`
    /// while one is written. Removed with the VM.
    pub fn backups(&self) -> PathBuf {
        self.root.join("backups")
    }
    pub fn backup_file(&self, id: i64) -> PathBuf {
        self.backups().join(format!("{id}.qcow2"))
    }
    pub fn backup_tmp(&self, id: i64) -> PathBuf {
        self.backups().join(format!(".{id}.qcow2.tmp"))
    }
    /// The disk being rebuilt from a backup, renamed over `disk.qcow2` when whole.
    pub fn restore_tmp(&self) -> PathBuf {
        self.root.join(".disk.qcow2.restore")
    }
    pub fn seed_iso(&self) -> PathBuf {
        self.root.join("seed.iso")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.root.join("qmp.sock")
    }
    pub fn operator_socket(&self) -> PathBuf {
        self.root.join("qmp-operator.sock")
    }
    /// The host end of the guest's `org.qemu.guest_agent.0` port.
    pub fn qga_socket(&self) -> PathBuf {
        self.root.join("qga.sock")
    }
    /// Held (flock) by whoever talks to the guest agent: its socket serves
    /// one client, and a second one would only see silence.
    pub fn qga_lock(&self) -> PathBuf {
        self.root.join("qga.lock")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.root.join("qemu.pid")
    }
    pub fn start_lock(&self) -> PathBuf {
        self.root.join("start.lock")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.root.join("serial.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.root.join("qemu.log")
    }

    /// The directory, 0710 (also when it already existed with another
    /// mode; its group is left alone); a missing `vms` dir is created 0711.
    pub fn create(&self) -> io::Result<()> {
        if let Some(parent) = self.root.parent()
            && !parent.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(VMS_DIR_MODE)
                .create(parent)?;
        }
        create_dir_with_mode(&self.root, VM_DIR_MODE)
    }

    /// Before a spawn: give group `gid` (the VM's QEMU id) what its QEMU
    /// opens by path, and nothing else (see the module doc). Creates the
    /// serial log and the pidfile for it; makes files left by an earlier
    /// version or another writer (the seed, when it lies in this directory)
    /// follow the same modes. Only root writes in this directory, so no
    /// path here can have been swapped for a symlink.
    pub fn grant(&self, gid: u32, seed: &Path) -> io::Result<()> {
        let mut files = vec![(self.disk(), QEMU_RW_MODE), (self.pidfile(), QEMU_RW_MODE)];
        if seed.parent() == Some(self.root.as_path()) {
            files.push((seed.to_owned(), QEMU_RO_MODE));
        }
        open_private(OpenOptions::new().append(true).create(true), &self.pidfile())?;
        for (file, mode) in files {
            std::os::unix::fs::chown(&file, Some(0), Some(gid))?;
            std::fs::set_permissions(&file, Permissions::from_mode(mode))?;
        }
        // The logs are webhoster's to write (vmm::logs), capped: QEMU must not
        // reach them by path, whatever an older version left.
        for log in [self.serial_log(), self.qemu_log()] {
            match std::fs::set_permissions(&log, Permissions::from_mode(PRIVATE_FILE_MODE)) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        Ok(())
    }

    /// QEMU's listening sockets, bound by the engine (QEMU may not create
    /// files here) in the order [`cmdline::QMP_FD`], [`cmdline::OPERATOR_FD`],
    /// [`cmdline::QGA_FD`], each 0600; a stale socket file is replaced. Only
    /// call when no QEMU of this VM runs.
    ///
    /// [`cmdline::QMP_FD`]: super::cmdline::QMP_FD
    /// [`cmdline::OPERATOR_FD`]: super::cmdline::OPERATOR_FD
    /// [`cmdline::QGA_FD`]: super::cmdline::QGA_FD
    pub fn listen(&self) -> io::Result<[UnixListener; 3]> {
        let bind = |path: PathBuf| -> io::Result<UnixListener> {
            match std::fs::remove_file(&path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
            let listener = UnixListener::bind(&path)?;
            std::fs::set_permissions(&path, Permissions::from_mode(PRIVATE_FILE_MODE))?;
            Ok(listener)
        };
        Ok([
            bind(self.qmp_socket())?,
            bind(self.operator_socket())?,
            bind(self.qga_socket())?,
        ])
    }

    pub fn read_spec(&self) -> io::Result<VmSpec> {
        let text = std::fs::read(self.spec_file())?;
        serde_json::from_slice(&text).map_err(io::Error::other)
    }

    /// Atomic replace, so a crash never leaves half a vm.json.
    pub fn write_spec(&self, spec: &VmSpec) -> io::Result<()> {
        use std::io::Write;
        self.create()?;
        let tmp = self.root.join(".vm.json.tmp");
        let text = serde_json::to_vec_pretty(spec).map_err(io::Error::other)?;
        open_private(OpenOptions::new().write(true).create(true).truncate(true), &tmp)?.write_all(&text)?;
        std::fs::rename(&tmp, self.spec_file())
    }

    pub fn read_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pidfile()).ok()?.trim().parse().ok()
    }

    /// The pid of this VM's live QEMU, trusting nothing: the pidfile's pid
    /// must be alive (not a zombie) and run our `-name <vm_id>`.
    pub fn live_pid(&self, vm_id: &str) -> Option<i32> {
        self.read_pid().filter(|pid| is_our_qemu(*pid, vm_id))
    }

    /// Remove what a dead QEMU left behind. Only call when no QEMU of this
    /// VM runs.
    pub fn clean_runtime_files(&self) {
        for path in [
            self.pidfile(),
            self.qmp_socket(),
            self.operator_socket(),
            self.qga_socket(),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::debug!(path = %path.display(), "removed stale file"),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!(path = %path.display(), %err, "cannot remove stale file"),
            }
        }
    }
}

/// Mode of the `vms` directory: every QEMU passes through to its own.
pub const VMS_DIR_MODE: u32 = 0o711;
/// Mode of each VM directory, whose group is its QEMU's id.
pub const VM_DIR_MODE: u32 = 0o710;
/// Mode of every file in a VM directory that QEMU does not open by path.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Directories only webhoster enters (`backups/`).
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Files QEMU writes (disk, serial log, pidfile): root and its group.
pub const QEMU_RW_MODE: u32 = 0o660;
/// Files QEMU only reads (the seed).
pub const QEMU_RO_MODE: u32 = 0o640;

/// Create `dir` (its parent must exist) or take the existing one, and give
/// it `mode` either way: the mode given at creation is reduced by the
/// umask, the one set afterwards is not.
pub fn create_dir_with_mode(dir: &Path, mode: u32) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(mode & 0o700).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(err) => return Err(err),
    }
    std::fs::set_permissions(dir, Permissions::from_mode(mode))
}

/// Open `path` with `opts`, a file created 0600, and an existing one made
/// 0600 too (on the open descriptor, whatever the umask).
pub fn open_private(opts: &mut OpenOptions, path: &Path) -> io::Result<File> {
    let file = opts.mode(PRIVATE_FILE_MODE).open(path)?;
    file.set_permissions(Permissions::from_mode(PRIVATE_FILE_MODE))?;
    Ok(file)
}

/// Whether `pid` is alive (not a zombie) and its command line holds
/// `-name <vm_id>` as two consecutive arguments. A reused pid runs something
/// else and fails this.
pub fn is_our_qemu(pid: i32, vm_id: &str) -> bool {
    if pid <= 0 || !is_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-name" && w[1] == vm_id.as_bytes())
}

/// Alive and not a zombie (a zombie's QEMU is gone, whoever reaps it).
pub fn is_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may contain
    // spaces and parentheses itself: split at the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}

/// Seconds since `pid` started, from /proc (for `vm list` uptime).
pub fn uptime_secs(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    // Field 22 (starttime) is the 20th after the command name.
    let start_ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()? as u64;
    let boot_uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((boot_uptime as u64).saturating_sub(start_ticks / ticks.max(1)))
}

/// Resident memory of `pid` in KiB (benches, `vm info`).
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The real uid `pid` runs as, from /proc.
pub fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The last `lines` lines of a log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_not_a_qemu() {
        let me = std::process::id() as i32;
        assert!(is_alive(me));
        assert!(!is_our_qemu(me, "vm-x"));
        assert!(!is_our_qemu(0, "vm-x"));
        assert!(!is_alive(i32::MAX));
    }

    #[test]
    fn uptime_and_rss_of_ourselves() {
        let me = std::process::id() as i32;
        assert!(uptime_secs(me).unwrap() < 3600 * 24 * 365);
        assert!(rss_kib(me).unwrap() > 0);
    }
}
