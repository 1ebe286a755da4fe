//! A VM's two logs on disk, each a capped [`RotatingFile`]:
//!
//! - `serial.log`: the guest's console, drained by the supervisor over QMP
//!   from QEMU's serial ring buffer (`cmdline::Serial`). While no webhoster
//!   runs, the ring keeps the newest [`SERIAL_RING_BYTES`] and nothing grows.
//! - `qemu.log`: QEMU's own stdout and stderr, through a pipe whose read end
//!   only webhoster holds. QEMU's end is non-blocking, so a slow reader never
//!   stalls it (a full pipe drops the line), and with no reader a write fails
//!   with EPIPE (QEMU ignores SIGPIPE): what QEMU says after the webhoster
//!   that started it went away is lost, never written.
//!
//! Never talks QMP beyond `ringbuf-read`, never decides a VM's state.

use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::AsyncReadExt;

use super::cmdline::{SERIAL_CHARDEV, SERIAL_RING_BYTES};
use super::qmp::{QmpClient, QmpError};
use crate::logfile::RotatingFile;

/// Bytes asked per `ringbuf-read`: QEMU base64-encodes them into one JSON
/// reply, so a whole ring at once would be a 1.4 MB line.
const READ_CHUNK: u32 = 64 * 1024;

/// The guest console's file, filled from the ring buffer.
pub(super) struct Console {
    file: RotatingFile,
}

impl Console {
    pub fn new(file: RotatingFile) -> Console {
        Console { file }
    }

    /// Move what the ring holds into the file. Reads at most one ring's
    /// worth, so a guest writing as fast as it can does not keep the
    /// supervisor here. Returns the bytes moved.
    pub async fn drain(&mut self, qmp: &QmpClient) -> Result<u64, QmpError> {
        let mut moved = 0u64;
        while moved < u64::from(SERIAL_RING_BYTES) {
            let bytes = qmp.ringbuf_read(SERIAL_CHARDEV, READ_CHUNK).await?;
            if let Err(err) = self.file.append(&bytes) {
                tracing::warn!(path = %self.file.path().display(), %err, "cannot write the console log");
            }
            moved += bytes.len() as u64;
            if bytes.len() < READ_CHUNK as usize {
                break;
            }
        }
        Ok(moved)
    }
}

/// The pipe QEMU's stdout and stderr go to: `(read end, write end)`, the
/// write end non-blocking (see the module doc).
pub(super) fn output_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    fcntl(write.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok((read, write))
}

/// Copy QEMU's output into `qemu.log` until QEMU and every copy of the
/// write end are gone (EOF).
pub(super) async fn copy_output(read: OwnedFd, mut file: RotatingFile) {
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(read) {
        Ok(pipe) => pipe,
        Err(err) => {
            tracing::warn!(%err, "cannot read QEMU's output");
            return;
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if let Err(err) = file.append(&buf[..n]) {
                    tracing::warn!(path = %file.path().display(), %err, "cannot write qemu.log");
                }
            }
            Err(err) => {
                tracing::warn!(%err, "reading QEMU's output failed");
                return;
            }
        }
    }
}
