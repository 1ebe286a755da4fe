//! Per-VM cgroups: one cgroup per VM, named after its vm_id, under one
//! parent (`webhoster` by default), with a memory limit (plan RAM plus
//! QEMU's own overhead) and a pids limit. A tenant is root in its guest and
//! may be hostile: should it break out into QEMU, these bound what that QEMU
//! can take from the host and from the other tenants.
//!
//! ```text
//! cgroup v2:  <mount>/webhoster/<vm_id>/{memory.max,memory.swap.max,memory.oom.group,pids.max}
//! cgroup v1:  <memory mount>/webhoster/<vm_id>/{memory.limit_in_bytes,memory.memsw.limit_in_bytes}
//!             <pids mount>/webhoster/<vm_id>/pids.max
//! ```
//!
//! v2 is used where one writable cgroup2 hierarchy offers both the memory
//! and the pids controllers (`/sys/fs/cgroup` on a v2-only host, or a
//! hybrid host's unified hierarchy when the controllers are not bound to
//! v1); the v1 `memory` and `pids` hierarchies otherwise.
//!
//! The cgroup is created and its limits written before QEMU is spawned, and
//! the child joins it before exec (`sys::spawn_detached_with` writes "0" to
//! each `cgroup.procs`), so no allocation of QEMU's escapes it. It is
//! removed once its QEMU is gone; a zombie (PID 1 may never reap a detached
//! QEMU) does not keep a cgroup busy, but an `EBUSY` is tolerated and the
//! removal tried again at the next stop or destroy.
//!
//! Swap is bounded with memory (v1 `memsw` equal to the limit, v2
//! `swap.max` 0): the limit is the VM's whole footprint, and a VM over it
//! is OOM-killed inside its cgroup, never another process of the host.
//!
//! Never decides which VM runs: the launcher asks for a cgroup before each
//! spawn and the engine removes it when the VM stops or is destroyed.

use std::io;
use std::path::{Path, PathBuf};

/// QEMU's memory beyond guest RAM that a VM's limit allows for. Measured on
/// an idle Debian guest under TCG (1 vCPU, 1 GiB, `tb-size=128`): QEMU's
/// resident memory outside the guest-RAM mapping was about 210 MiB, of which
/// 128 MiB is the translation buffer (filled during boot) and the rest the
/// binary, its libraries, heap and thread arenas; KVM has no translation
/// buffer. 384 MiB leaves about 170 MiB for I/O buffers, the qcow2 caches
/// and page cache charged to the VM (reclaimed before any OOM kill).
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u64 = 384;

/// Tasks (threads) one QEMU may have: a main loop, an RCU thread, one
/// thread per vCPU and up to 64 block I/O workers. `-sandbox spawn=deny`
/// already forbids fork and exec; this bounds threads.
pub const DEFAULT_PIDS_MAX: u64 = 256;

/// The parent cgroup every VM cgroup lives under.
pub const DEFAULT_PARENT: &str = "webhoster";

const MIB: u64 = 1024 * 1024;

/// How the engine puts VMs into cgroups.
#[derive(Debug, Clone)]
pub struct CgroupOptions {
    pub policy: crate::config::CgroupPolicy,
    /// A relative cgroup path (`webhoster`, or `a/b`) under each hierarchy's
    /// root.
    pub parent: String,
    pub memory_overhead_mib: u64,
    pub pids_max: u64,
}

impl Default for CgroupOptions {
    fn default() -> Self {
        CgroupOptions {
            policy: crate::config::CgroupPolicy::Auto,
            parent: DEFAULT_PARENT.to_owned(),
            memory_overhead_mib: DEFAULT_MEMORY_OVERHEAD_MIB,
            pids_max: DEFAULT_PIDS_MAX,
        }
    }
}

impl CgroupOptions {
    /// The limits of a VM whose guest has `guest_mib` of RAM.
    pub fn limits(&self, guest_mib: u64) -> CgroupLimits {
        CgroupLimits {
            memory_bytes: guest_mib
                .saturating_add(self.memory_overhead_mib)
                .saturating_mul(MIB),
            pids_max: self.pids_max,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids_max: u64,
}

/// Which cgroup hierarchies hold the VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// One cgroup2 hierarchy with the memory and pids controllers.
    V2 { mount: PathBuf },
    /// The v1 memory and pids hierarchies.
    V1 { memory: PathBuf, pids: PathBuf },
}

impl std::fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CgroupMode::V2 { mount } => write!(f, "cgroup v2 at {}", mount.display()),
            CgroupMode::V1 { memory, pids } => write!(
                f,
                "cgroup v1 (memory at {}, pids at {})",
                memory.display(),
                pids.display()
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    #[error("cgroup parent {0:?} must be a relative path of a-z, A-Z, 0-9, '.', '-', '_' components")]
    BadParent(String),
    #[error("cgroup {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io { path, what, source }
}

/// One cgroup mount, from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    v2: bool,
    writable: bool,
    /// v1: the controllers bound to it (from the super options).
    controllers: Vec<String>,
}

/// The cgroup mounts listed in a mountinfo text.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 6 || right.len() < 3 {
            continue;
        }
        let fstype = right[0];
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let mount_opts = left[5].split(',');
        let super_opts: Vec<&str> = right[2].split(',').collect();
        mounts.push(Mount {
            point: PathBuf::from(unescape_mount_path(left[4])),
            v2: fstype == "cgroup2",
            writable: mount_opts.clone().any(|o| o == "rw") && !super_opts.contains(&"ro"),
            controllers: super_opts
                .iter()
                .filter(|o| !matches!(**o, "rw" | "ro") && !o.contains('='))
                .map(|o| (*o).to_owned())
                .collect(),
        });
    }
    mounts
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                u8::try_from(value).ok()
            });
        if bytes[i] == b'\\'
            && let Some(value) = octal
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Choose the hierarchies: a writable cgroup2 mount whose root offers memory
/// and pids (`/sys/fs/cgroup` first), else writable v1 memory and pids
/// mounts. `controllers` reads a v2 mount's `cgroup.controllers`.
fn choose(mounts: &[Mount], controllers: impl Fn(&Path) -> Option<String>) -> Result<CgroupMode, String> {
    let mut v2: Vec<&Mount> = mounts.iter().filter(|m| m.v2 && m.writable).collect();
    v2.sort_by_key(|m| m.point != Path::new("/sys/fs/cgroup"));
    let mut seen = Vec::new();
    for m in v2 {
        let offered = controllers(&m.point).unwrap_or_default();
        let offered: Vec<&str> = offered.split_whitespace().collect();
        if offered.contains(&"memory") && offered.contains(&"pids") {
            return Ok(CgroupMode::V2 {
                mount: m.point.clone(),
            });
        }
        seen.push(format!(
            "cgroup2 at {} offers [{}]",
            m.point.display(),
            offered.join(" ")
        ));
    }
    let v1 = |name: &str| {
        mounts
            .iter()
            .find(|m| !m.v2 && m.writable && m.controllers.iter().any(|c| c == name))
            .map(|m| m.point.clone())
    };
    match (v1("memory"), v1("pids")) {
        (Some(memory), Some(pids)) => Ok(CgroupMode::V1 { memory, pids }),
        (memory, pids) => {
            if memory.is_none() {
                seen.push("no writable v1 memory hierarchy".into());
            }
            if pids.is_none() {
                seen.push("no writable v1 pids hierarchy".into());
            }
            Err(seen.join("; "))
        }
    }
}

fn valid_parent(parent: &str) -> bool {
    !parent.is_empty()
        && parent.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        })
}

/// The VMs' cgroups on this host.
#[derive(Debug, Clone)]
pub struct Cgroups {
    mode: CgroupMode,
    parent: String,
}

impl Cgroups {
    /// Find the hierarchies from /proc/self/mountinfo.
    pub fn detect(parent: &str) -> Result<Cgroups, CgroupError> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| CgroupError::Unavailable(format!("cannot read /proc/self/mountinfo: {e}")))?;
        let mode = choose(&parse_mountinfo(&text), |mount| {
            std::fs::read_to_string(mount.join("cgroup.controllers")).ok()
        })
        .map_err(CgroupError::Unavailable)?;
        Cgroups::new(mode, parent)
    }

    pub fn new(mode: CgroupMode, parent: &str) -> Result<Cgroups, CgroupError> {
        if !valid_parent(parent) {
            return Err(CgroupError::BadParent(parent.to_owned()));
        }
        Ok(Cgroups {
            mode,
            parent: parent.to_owned(),
        })
    }

    pub fn mode(&self) -> &CgroupMode {
        &self.mode
    }

    fn roots(&self) -> Vec<&Path> {
        match &self.mode {
            CgroupMode::V2 { mount } => vec![mount],
            CgroupMode::V1 { memory, pids } => vec![memory, pids],
        }
    }

    /// `<root>/<parent>` in each hierarchy.
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.roots().into_iter().map(|r| r.join(&self.parent)).collect()
    }

    /// The VM's cgroup directory in each hierarchy (memory first on v1).
    pub fn dirs(&self, vm_id: &str) -> Vec<PathBuf> {
        self.parent_dirs().into_iter().map(|p| p.join(vm_id)).collect()
    }

    /// The files a process writes its pid (or "0") to, to join the VM's cgroup.
    pub fn procs_files(&self, vm_id: &str) -> Vec<PathBuf> {
        self.dirs(vm_id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// The parent cgroup, with the controllers delegated to its children on
    /// v2. Idempotent; the engine calls it at start and before each spawn
    /// (cgroupfs does not survive a reboot).
    pub fn ensure_parent(&self) -> Result<(), CgroupError> {
        match &self.mode {
            CgroupMode::V2 { mount } => {
                // Every level from the root down must hand memory and pids to
                // the next one (a cgroup with processes cannot, except the
                // root, which is why the parent holds no process).
                let mut dir = mount.clone();
                enable_v2_controllers(&dir)?;
                for component in self.parent.split('/') {
                    dir.push(component);
                    make_dir(&dir)?;
                    enable_v2_controllers(&dir)?;
                }
            }
            CgroupMode::V1 { .. } => {
                for dir in self.parent_dirs() {
                    std::fs::create_dir_all(&dir).map_err(io_err(&dir, "cannot create"))?;
                }
            }
        }
        Ok(())
    }

    /// Create (or reuse) the VM's cgroup and write its limits. Returns the
    /// `cgroup.procs` files the child joins before exec.
    pub fn prepare(&self, vm_id: &str, limits: CgroupLimits) -> Result<Vec<PathBuf>, CgroupError> {
        self.ensure_parent()?;
        for dir in self.dirs(vm_id) {
            make_dir(&dir)?;
        }
        let dirs = self.dirs(vm_id);
        match &self.mode {
            CgroupMode::V2 { .. } => {
                let dir = &dirs[0];
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                // The limit is the whole footprint: nothing beyond it in swap.
                write_if_present(&dir.join("memory.swap.max"), "0")?;
                // An OOM kill takes the whole QEMU, never one of its threads.
                write_if_present(&dir.join("memory.oom.group"), "1")?;
                write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
            }
            CgroupMode::V1 { .. } => {
                let (memory, pids) = (&dirs[0], &dirs[1]);
                set_v1_memory(memory, limits.memory_bytes)?;
                write(&pids.join("pids.max"), &limits.pids_max.to_string())?;
            }
        }
        Ok(self.procs_files(vm_id))
    }

    /// Remove the VM's cgroup. A cgroup that is already gone is fine; one
    /// that still holds a process fails with `EBUSY` (try again later).
    pub fn remove(&self, vm_id: &str) -> Result<(), CgroupError> {
        let mut first_err = None;
        for dir in self.dirs(vm_id) {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_err.get_or_insert(CgroupError::Io {
                        path: dir,
                        what: "cannot remove",
                        source: e,
                    });
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Whether any of the VM's cgroup directories still exists.
    pub fn exists(&self, vm_id: &str) -> bool {
        self.dirs(vm_id).iter().any(|d| d.exists())
    }

    /// The processes in the VM's cgroup, per hierarchy (memory first on v1).
    pub fn procs(&self, vm_id: &str) -> Vec<Vec<i32>> {
        self.procs_files(vm_id)
            .iter()
            .map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect()
            })
            .collect()
    }

    /// The limits written in the VM's cgroup.
    pub fn limits(&self, vm_id: &str) -> Result<CgroupLimits, CgroupError> {
        let dirs = self.dirs(vm_id);
        let (memory_file, pids_file) = match &self.mode {
            CgroupMode::V2 { .. } => (dirs[0].join("memory.max"), dirs[0].join("pids.max")),
            CgroupMode::V1 { .. } => (dirs[0].join("memory.limit_in_bytes"), dirs[1].join("pids.max")),
        };
        Ok(CgroupLimits {
            memory_bytes: read_number(&memory_file)?,
            pids_max: read_number(&pids_file)?,
        })
    }
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir, "cannot create")(e)),
    }
}

fn write(file: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(file, value).map_err(io_err(file, "cannot write"))
}

fn write_if_present(file: &Path, value: &str) -> Result<(), CgroupError> {
    if file.exists() { write(file, value) } else { Ok(()) }
}

fn read_number(file: &Path) -> Result<u64, CgroupError> {
    let text = std::fs::read_to_string(file).map_err(io_err(file, "cannot read"))?;
    text.trim().parse().map_err(|_| CgroupError::Io {
        path: file.to_owned(),
        what: "not a number",
        source: io::Error::new(io::ErrorKind::InvalidData, text.trim().to_owned()),
    })
}

/// `+memory +pids` in `dir/cgroup.subtree_control`, unless already there.
fn enable_v2_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&file).unwrap_or_default();
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    if enabled.contains(&"memory") && enabled.contains(&"pids") {
        return Ok(());
    }
    write(&file, "+memory +pids")
}

/// The v1 memory limit, and the same bound on memory plus swap where swap
/// accounting exists. `memsw` must stay at or above the limit at every
/// step, so the order depends on whether the limit goes up or down.
fn set_v1_memory(dir: &Path, bytes: u64) -> Result<(), CgroupError> {
    let limit = dir.join("memory.limit_in_bytes");
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    let value = bytes.to_string();
    if !memsw.exists() {
        return write(&limit, &value);
    }
    match std::fs::write(&limit, &value) {
        // Raising (or equal): the limit first, then memsw down to it.
        Ok(()) => write(&memsw, &value),
        // Lowering below the current memsw is refused (EINVAL): memsw first.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            write(&memsw, &value)?;
            write(&limit, &value)
        }
        Err(e) => Err(io_err(&limit, "cannot write")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,pids
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,xattr,name=systemd
";

    const V2_ONLY: &str = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn mountinfo_lists_cgroup_mounts_with_their_controllers() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 5);
        assert!(mounts[0].v2 && mounts[0].point == Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(mounts[1].controllers, vec!["memory"]);
        assert_eq!(mounts[3].point, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(mounts[3].controllers, vec!["cpu", "cpuacct"]);
        // Options other than controllers (`xattr`) may be listed; only
        // `memory` and `pids` are looked for.
        assert!(
            !mounts[4].controllers.iter().any(|c| c.contains("name")),
            "{:?}",
            mounts[4]
        );
        assert!(mounts.iter().all(|m| m.writable));
    }

    #[test]
    fn hybrid_host_without_v2_controllers_uses_v1() {
        let mode = choose(&parse_mountinfo(HYBRID), |_| Some(String::new())).unwrap();
        assert_eq!(
            mode,
            CgroupMode::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into()
            }
        );
    }

    #[test]
    fn unified_hierarchy_with_the_controllers_wins() {
        let mode = choose(&parse_mountinfo(HYBRID), |p| {
            (p == Path::new("/sys/fs/cgroup/unified")).then(|| "cpu memory pids\n".to_owned())
        })
        .unwrap();
        assert_eq!(
            mode,
            CgroupMode::V2 {
                mount: "/sys/fs/cgroup/unified".into()
            }
        );
        let mode = choose(&parse_mountinfo(V2_ONLY), |_| {
            Some("cpuset cpu io memory pids".into())
        })
        .unwrap();
        assert_eq!(
            mode,
            CgroupMode::V2 {
                mount: "/sys/fs/cgroup".into()
            }
        );
    }

    #[test]
    fn nothing_usable_says_why() {
        let err = choose(&parse_mountinfo(V2_ONLY), |_| Some("cpu io".into())).unwrap_err();
        assert!(
            err.contains("offers [cpu io]") && err.contains("no writable v1 memory"),
            "{err}"
        );
        let ro = V2_ONLY.replace("relatime - cgroup2 cgroup2 rw", "relatime - cgroup2 cgroup2 ro");
        let ro = ro.replace(" rw,nosuid", " ro,nosuid");
        assert!(choose(&parse_mountinfo(&ro), |_| Some("memory pids".into())).is_err());
    }

    #[test]
    fn escaped_mount_points() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/end\04"), r"/end\04");
    }

    #[test]
    fn parents_are_relative_and_plain() {
        for good in ["webhoster", "a/b", "machine.slice", "x_y-z"] {
            assert!(valid_parent(good), "{good}");
        }
        for bad in ["", "/abs", "a//b", "..", "a/../b", "a b", "a/", "a,b"] {
            assert!(!valid_parent(bad), "{bad}");
        }
    }

    #[test]
    fn limits_add_the_overhead() {
        let opts = CgroupOptions::default();
        assert_eq!(
            opts.limits(1024),
            CgroupLimits {
                memory_bytes: (1024 + 384) * MIB,
                pids_max: 256
            }
        );
    }

    /// The files written, on a plain directory standing in for cgroupfs
    /// (real hierarchies are exercised by tests/vmm_stub_engine.rs).
    #[test]
    fn v2_layout_and_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = Cgroups::new(
            CgroupMode::V2 {
                mount: tmp.path().to_owned(),
            },
            "webhoster",
        )
        .unwrap();
        let procs = cg
            .prepare(
                "vm-1",
                CgroupLimits {
                    memory_bytes: 5 * MIB,
                    pids_max: 7,
                },
            )
            .unwrap();
        assert_eq!(procs, vec![tmp.path().join("webhoster/vm-1/cgroup.procs")]);
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+memory +pids");
        assert_eq!(read("webhoster/cgroup.subtree_control"), "+memory +pids");
        assert_eq!(read("webhoster/vm-1/memory.max"), (5 * MIB).to_string());
        assert_eq!(read("webhoster/vm-1/pids.max"), "7");
        assert_eq!(
            cg.limits("vm-1").unwrap(),
            CgroupLimits {
                memory_bytes: 5 * MIB,
                pids_max: 7
            }
        );
        assert!(!tmp.path().join("webhoster/vm-1/memory.swap.max").exists());
    }
}
