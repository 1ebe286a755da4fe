//! Named network namespaces, made the way `ip netns add` makes them: a bind
//! mount of a thread's `/proc/thread-self/ns/net` on `/run/netns/<name>`, with
//! `/run/netns` a shared mount, so operators can `ip netns exec` into ours.
//! Never touches a namespace it was not asked for by name.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::statfs::{NSFS_MAGIC, statfs};

use super::NetError;

pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Whether `/run/netns/<name>` is a live namespace mount (not a stale file).
pub fn exists(name: &str) -> bool {
    statfs(&path(name)).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Create the namespace unless it exists. Returns true when it was created.
pub fn create(name: &str) -> Result<bool, NetError> {
    if exists(name) {
        return Ok(false);
    }
    fs::create_dir_all(NETNS_DIR).map_err(NetError::io(format!("create {NETNS_DIR}")))?;
    make_shared()?;
    let target = path(name);
    // A stale file left by a crash between create and mount is reused.
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&target)
        .map_err(NetError::io(format!("create {}", target.display())))?;
    let t = target.clone();
    let res = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &t,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| NetError::Io {
        op: format!("create network namespace {name:?}"),
        source: io::Error::other("namespace thread panicked"),
    })?;
    if let Err(source) = res {
        let _ = fs::remove_file(&target);
        return Err(NetError::Io {
            op: format!("create network namespace {name:?}"),
            source,
        });
    }
    Ok(true)
}

/// Like iproute2: `/run/netns` must be a shared mount point so a namespace
/// mounted later is visible in every mount namespace.
fn make_shared() -> Result<(), NetError> {
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, NETNS_DIR, Some("none"), shared, None::<&str>) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| mount(None::<&str>, NETNS_DIR, Some("none"), shared, None::<&str>))
        .map_err(|e| NetError::Io {
            op: format!("make {NETNS_DIR} a shared mount"),
            source: e.into(),
        }),
        Err(e) => Err(NetError::Io {
            op: format!("make {NETNS_DIR} a shared mount"),
            source: e.into(),
        }),
    }
}

/// Remove the namespace by name. Its interfaces (bridge, taps, the inner end
/// of the veth and with it the host end) go away with the last reference.
/// Returns true when something was removed.
pub fn delete(name: &str) -> Result<bool, NetError> {
    let target = path(name);
    let mut removed = false;
    match umount2(&target, MntFlags::MNT_DETACH) {
        Ok(()) => removed = true,
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(NetError::Io {
                op: format!("unmount {}", target.display()),
                source: e.into(),
            });
        }
    }
    match fs::remove_file(&target) {
        Ok(()) => removed = true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(NetError::io(format!("remove {}", target.display()))(e)),
    }
    Ok(removed)
}
