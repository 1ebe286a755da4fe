//! Kept guest-agent connections: the supervisor of a VM keeps one open
//! while no client of this process uses the agent.
//!
//! qemu-ga reads its virtio-serial port as EOF while the port's host end
//! has no connection, and sleeps 100 ms before it reads again. So a guest
//! nobody is connected to wakes ten times a second for nothing (an idle
//! VM's QEMU took 22-26 ms of CPU per second under TCG without a
//! connection, 11-12 ms with one), and a client that connects waits out
//! the sleep (up to 0.1 s of a warm create). With a connection kept, the
//! agent blocks in its poll until a request comes.
//!
//! A kept connection holds the agent lock (`qga`): a client of this
//! process takes it, lock and all, instead of making its own, and gives it
//! back when dropped unbroken. Keeping is for one QEMU's life: `keep` starts
//! it and the guard it returns ends it, closing the connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard};

use super::qga::{Link, try_lock};

/// Per agent lock path: keeping enabled, and the connection kept if any.
static KEPT: LazyLock<Mutex<HashMap<PathBuf, Option<Link>>>> = LazyLock::new(Default::default);

fn kept() -> MutexGuard<'static, HashMap<PathBuf, Option<Link>>> {
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connections to the agent behind `socket` (lock `lock`) are kept until
/// the guard is dropped; [`refill`] makes them.
#[must_use = "keeping ends when the guard is dropped"]
pub struct Keeping {
    socket: PathBuf,
    lock: PathBuf,
}

pub fn keep(socket: &Path, lock: &Path) -> Keeping {
    kept().entry(lock.to_owned()).or_insert(None);
    Keeping {
        socket: socket.to_owned(),
        lock: lock.to_owned(),
    }
}

impl Keeping {
    /// A connection kept, unless one is, or a client holds the lock.
    pub async fn refill(&self) {
        if kept().get(&self.lock).is_none_or(Option::is_some) {
            return;
        }
        let lock = match try_lock(&self.lock) {
            Ok(Some(lock)) => lock,
            Ok(None) => return,
            Err(err) => {
                tracing::debug!(%err, "cannot keep a guest agent connection");
                return;
            }
        };
        match Link::connect(&self.socket, lock).await {
            Ok(link) => give_back(&self.lock, link),
            Err(err) => tracing::debug!(%err, "cannot keep a guest agent connection"),
        }
    }
}

impl Drop for Keeping {
    fn drop(&mut self) {
        // Dropped outside the registry's lock: closing is a syscall.
        let link = kept().remove(&self.lock).flatten();
        drop(link);
    }
}

/// The connection kept for `lock`, now the caller's.
pub(super) fn take(lock: &Path) -> Option<Link> {
    kept().get_mut(lock).and_then(Option::take)
}

/// `link` kept for the next client, when its VM keeps one and none is kept
/// already; closed otherwise.
pub(super) fn give_back(lock: &Path, link: Link) {
    let rejected = match kept().get_mut(lock) {
        Some(slot @ None) => {
            *slot = Some(link);
            None
        }
        _ => Some(link),
    };
    drop(rejected);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::QgaClient;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// A fake agent answering `guest-sync-delimited` and `guest-ping`, one
    /// connection at a time as QEMU's chardev serves them; how many it took.
    fn fake_agent(socket: &Path) -> Arc<AtomicUsize> {
        let listener = UnixListener::bind(socket).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).split(b'\n');
                while let Ok(Some(line)) = lines.next_segment().await {
                    let start = line.iter().rposition(|b| *b == 0xFF).map_or(0, |i| i + 1);
                    let req: serde_json::Value = serde_json::from_slice(&line[start..]).unwrap();
                    let mut bytes = Vec::new();
                    if req["execute"] == "guest-sync-delimited" {
                        bytes.push(0xFF);
                        bytes.extend(format!("{{\"return\":{}}}\n", req["arguments"]["id"]).bytes());
                    } else {
                        bytes.extend(b"{\"return\":{}}\n");
                    }
                    if write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            }
        });
        accepted
    }

    /// The fake agent's count once it has accepted what was connected.
    async fn accepted_now(accepted: &AtomicUsize, want: usize) -> usize {
        for _ in 0..100 {
            if accepted.load(Ordering::SeqCst) >= want {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        accepted.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn clients_reuse_the_kept_connection_until_keeping_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, lock) = (dir.path().join("qga.sock"), dir.path().join("qga.lock"));
        let accepted = fake_agent(&socket);

        // Not kept: each client connects anew.
        for _ in 0..2 {
            let mut c = QgaClient::connect(&socket, &lock).await.unwrap();
            c.ping().await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        let keeping = keep(&socket, &lock);
        keeping.refill().await;
        assert_eq!(accepted_now(&accepted, 3).await, 3);
        // The kept connection holds the lock: nobody else's to take.
        assert!(try_lock(&lock).unwrap().is_none());
        for _ in 0..3 {
            let mut c = QgaClient::connect(&socket, &lock).await.unwrap();
            c.ping().await.unwrap();
            // In use: nothing kept, nothing refilled.
            keeping.refill().await;
        }
        assert_eq!(
            accepted_now(&accepted, 4).await,
            3,
            "one connection served them all"
        );

        drop(keeping);
        assert!(
            try_lock(&lock).unwrap().is_some(),
            "the lock went with the connection"
        );
        let mut c = QgaClient::connect(&socket, &lock).await.unwrap();
        c.ping().await.unwrap();
        drop(c);
        assert_eq!(accepted_now(&accepted, 4).await, 4);
        assert!(take(&lock).is_none(), "nothing kept once keeping ended");
    }

    #[tokio::test]
    async fn a_kept_connection_that_broke_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, lock) = (dir.path().join("qga.sock"), dir.path().join("qga.lock"));
        let keeping = keep(&socket, &lock);
        // No agent yet: nothing to keep, and no error.
        keeping.refill().await;
        assert!(try_lock(&lock).unwrap().is_some());

        // A connection kept to an agent that then goes (its QEMU exited
        // and a new one listens on a new socket at the same path).
        let first = UnixListener::bind(&socket).unwrap();
        let held = tokio::spawn(async move { first.accept().await.map(|(s, _)| s) });
        keeping.refill().await;
        drop(held.await.unwrap().unwrap());
        std::fs::remove_file(&socket).unwrap();
        let accepted = fake_agent(&socket);

        let mut c = QgaClient::connect(&socket, &lock).await.unwrap();
        c.ping().await.unwrap();
        assert_eq!(accepted_now(&accepted, 1).await, 1);
    }
}
