//! The only place with `unsafe`: ioctls, `setns` and friends, each with a
//! `// SAFETY:` note. Everything else goes through these safe wrappers or nix.

// ===================================================================
// vmm: spawning QEMU detached with inherited descriptors.
// (Owned by the vmm engineer; keep other sections separate.)
// ===================================================================

/// The most descriptors [`spawn_detached`] can place (a tap per NIC).
pub const MAX_PASSED_FDS: usize = 8;

/// Spawn `cmd` in a new session (`setsid`, so signals to our process group
/// leave it running), with each `(fd, target)` duplicated onto descriptor
/// number `target` without close-on-exec, so the child finds it there.
/// All other descriptors keep their close-on-exec flag (std opens everything
/// with it), so nothing else leaks into the child.
pub fn spawn_detached(
    cmd: std::process::Command,
    fds: &[(std::os::fd::BorrowedFd<'_>, std::os::fd::RawFd)],
) -> std::io::Result<tokio::process::Child> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

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
    // async-signal-safe calls are allowed: it calls setsid, fcntl, dup2 and
    // close on plain integers and touches no allocator or lock (`pairs` is a
    // fixed array copied into the closure). The borrowed descriptors outlive
    // the spawn call, which is when the closure runs.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
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
            Ok(())
        });
    }
    tokio::process::Command::from(cmd).spawn()
}
