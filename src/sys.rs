//! The only place with `unsafe`: ioctls, `setns` and friends, each with a
//! `// SAFETY:` note. Everything else goes through these safe wrappers or nix.

// ===================================================================
// vmm: spawning QEMU detached with inherited descriptors.
// (Owned by the vmm engineer; keep other sections separate.)
// ===================================================================

/// Sends `signal` to `pid`. A pid below 1 is refused, never sent: `kill(0)`
/// signals our own process group and `kill(-1)` every process.
pub fn kill_process(pid: i32, signal: nix::sys::signal::Signal) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).is_ok()
}

/// The most descriptors [`spawn_detached`] can place (a tap per NIC).
pub const MAX_PASSED_FDS: usize = 8;

/// The most cgroups [`spawn_detached_with`] can put the child in (one per
/// hierarchy: memory and pids on cgroup v1).
pub const MAX_CGROUPS: usize = 4;

/// What the child of [`spawn_detached_with`] does before exec, besides
/// leaving our session.
#[derive(Debug, Default)]
pub struct Detach<'a> {
    /// `(fd, target)`: `fd` duplicated onto descriptor number `target`.
    pub fds: &'a [(std::os::fd::BorrowedFd<'a>, std::os::fd::RawFd)],
    /// `cgroup.procs` files the child writes "0" to (joining each cgroup)
    /// before exec, so not one allocation of the new program happens
    /// outside them. Failing to join fails the spawn.
    pub cgroup_procs: Vec<std::ffi::CString>,
    /// The child's umask, so what it creates (sockets, logs, pidfile) gets
    /// modes that do not depend on ours.
    pub umask: Option<libc::mode_t>,
    /// Who the child becomes after joining its cgroups (which needs root)
    /// and before exec; `None` keeps our ids.
    pub credentials: Option<Credentials>,
    /// The child's nice value (a template boot runs at 19, so running
    /// guests keep the CPU).
    pub nice: Option<i32>,
}

/// An unprivileged identity for a child: real, effective and saved uid and
/// gid, exactly these supplementary groups, no capabilities (the kernel
/// clears them when every uid leaves 0), and `no_new_privs`, so no set-id
/// binary or file capability can give any of it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Spawn `cmd` in a new session (`setsid`, so signals to our process group
/// leave it running), with each `(fd, target)` duplicated onto descriptor
/// number `target` without close-on-exec, so the child finds it there.
/// All other descriptors keep their close-on-exec flag (std opens everything
/// with it), so nothing else leaks into the child.
pub fn spawn_detached(
    cmd: std::process::Command,
    fds: &[(std::os::fd::BorrowedFd<'_>, std::os::fd::RawFd)],
) -> std::io::Result<tokio::process::Child> {
    spawn_detached_with(
        cmd,
        Detach {
            fds,
            ..Detach::default()
        },
    )
}

/// [`spawn_detached`], and before exec: set the umask, join cgroups, then
/// drop to unprivileged credentials.
pub fn spawn_detached_with(
    cmd: std::process::Command,
    detach: Detach<'_>,
) -> std::io::Result<tokio::process::Child> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let Detach {
        fds,
        cgroup_procs,
        umask,
        credentials,
        nice,
    } = detach;
    if credentials.as_ref().is_some_and(|c| c.uid == 0 || c.gid == 0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "credentials to drop to must not be root's",
        ));
    }
    if cgroup_procs.len() > MAX_CGROUPS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("at most {MAX_CGROUPS} cgroups can be joined"),
        ));
    }
    if fds.len() > MAX_PASSED_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("at most {MAX_PASSED_FDS} descriptors can be passed"),
        ));
    }
    let mut pairs = [(-1, -1); MAX_PASSED_FDS];
    for (slot, (fd, target)) in pairs.iter_mut().zip(fds) {
        *slot = (fd.as_raw_fd(), *target);
    }
    let count = fds.len();
    let above = fds.iter().map(|(_, t)| *t).max().unwrap_or(2).max(2) + 1;
    let mut cmd = cmd;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it calls umask, open, write,
    // close, setsid, setpriority, fcntl, dup2, setgroups, setresgid, setresuid and prctl
    // on plain integers and on the pointers of C strings and a group list
    // built before the fork (owned by the closure, only read), and touches
    // no allocator or lock (`pairs` is a fixed array copied into the
    // closure). The borrowed descriptors outlive the spawn call, which is
    // when the closure runs.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(mask) = umask {
                libc::umask(mask);
            }
            for procs in &cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" is the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
            }
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(nice) = nice
                && libc::setpriority(libc::PRIO_PROCESS, 0, nice) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
            // First move every source above every target, so placing one
            // descriptor can never overwrite a source not yet placed.
            let mut moved = [(-1, -1); MAX_PASSED_FDS];
            for i in 0..count {
                let (src, target) = pairs[i];
                let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, above);
                if fd == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                moved[i] = (fd, target);
            }
            for &(fd, target) in &moved[..count] {
                // dup2 clears close-on-exec on the new descriptor.
                if libc::dup2(fd, target) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            // Last, since everything above may need root. Groups first and
            // the uid last: after setresuid nothing else can be changed.
            if let Some(c) = &credentials
                && (libc::setgroups(c.groups.len(), c.groups.as_ptr()) == -1
                    || libc::setresgid(c.gid, c.gid, c.gid) == -1
                    || libc::setresuid(c.uid, c.uid, c.uid) == -1
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    tokio::process::Command::from(cmd).spawn()
}

#[cfg(test)]
mod spawn_tests {
    /// The nice value reaches the child before exec (a template QEMU boots
    /// at 19, behind every running guest).
    #[tokio::test]
    async fn the_child_gets_its_nice_value() {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        let mut child = super::spawn_detached_with(
            cmd,
            super::Detach {
                nice: Some(19),
                ..super::Detach::default()
            },
        )
        .unwrap();
        let pid = child.id().unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let _ = child.start_kill();
        let _ = child.wait().await;
        // Field 19 is the nice value; fields after the `)` of the name.
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        assert_eq!(fields[16], "19", "{stat}");
    }
}

// ---------------------------------------------------------------------------
// net: tun/tap ioctls and running code inside a network namespace.
// (Owned by the net module; keep other areas' helpers in their own block.)
// ---------------------------------------------------------------------------

pub use self::net_sys::{TapFlags, in_netns, tap_open};

mod net_sys {
    use std::ffi::c_int;
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::path::Path;

    use nix::sched::{CloneFlags, setns};

    /// `TUNSETIFF` is declared `_IOW('T', 202, int)` but takes a `struct ifreq *`.
    const TUNSETIFF: u64 = nix::request_code_write!(b'T', 202, std::mem::size_of::<c_int>()) as u64;
    /// `TUNSETPERSIST` is `_IOW('T', 203, int)` and takes the value itself.
    const TUNSETPERSIST: u64 = nix::request_code_write!(b'T', 203, std::mem::size_of::<c_int>()) as u64;

    /// Flags for [`tap_open`].
    #[derive(Debug, Clone, Copy)]
    pub struct TapFlags {
        /// Prepend a `virtio_net_hdr` to each frame (QEMU's virtio-net wants it).
        pub vnet_hdr: bool,
        /// Make the device outlive this fd (`TUNSETPERSIST 1`).
        pub persist: bool,
    }

    /// Open `/dev/net/tun` and attach it to the tap `name` (created if missing),
    /// with `IFF_TAP | IFF_NO_PI` and optionally `IFF_VNET_HDR`. The device is
    /// created in the network namespace of the calling thread.
    pub fn tap_open(name: &str, flags: TapFlags) -> io::Result<OwnedFd> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tap name {name:?} must be 1..=15 bytes without NUL"),
            ));
        }
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let fd: OwnedFd = file.into();

        // SAFETY: `ifreq` is a plain C struct for which all-zero bytes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        let mut ifflags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        if flags.vnet_hdr {
            ifflags |= libc::IFF_VNET_HDR as libc::c_short;
        }
        req.ifr_ifru.ifru_flags = ifflags;

        // SAFETY: `fd` is an open /dev/net/tun descriptor and `req` is a valid,
        // NUL-terminated `ifreq` that lives across the call; the kernel only
        // reads and writes within `sizeof(struct ifreq)`.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req as *mut libc::ifreq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags.persist {
            // SAFETY: `fd` is attached to a tap by the ioctl above; TUNSETPERSIST
            // takes its argument by value and touches no memory of ours.
            let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(fd)
    }

    /// Run `f` on a fresh thread that has entered the network namespace at
    /// `ns_path` (a bind mount such as `/run/netns/<name>`). Namespaces are
    /// per thread, so the caller's thread never changes namespace; the helper
    /// thread ends with `f`, so no pooled thread is left in the namespace.
    /// Sockets and devices opened by `f` stay bound to that namespace.
    pub fn in_netns<T, F>(ns_path: &Path, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let ns = File::open(ns_path)?;
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || -> io::Result<T> {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok(f())
            })?
            .join()
            .map_err(|_| io::Error::other("thread inside the network namespace panicked"))?
    }

    use std::os::unix::fs::OpenOptionsExt;
}
