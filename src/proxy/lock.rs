//! The file lock that serializes config changes between processes (the
//! service and an operator command, or two services started by mistake).
//! Within one process a mutex comes first, so the lock is taken once per
//! change, never contended by our own tasks.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::ProxyError;

pub(crate) struct FileLock {
    _lock: Flock<File>,
}

/// Blocks until the lock is ours; run it off the async threads.
pub(crate) fn acquire(path: &Path) -> Result<FileLock, ProxyError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(ProxyError::io("opening the lock file", path))?;
    let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| ProxyError::Lock {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(FileLock { _lock: lock })
}
