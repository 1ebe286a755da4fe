//! Admission: whether the host can take one more hosting, and how many
//! creates run at once. A create the host's memory budget or free disk cannot
//! take is refused at once (503, `capacity`); creates beyond the concurrency
//! limit wait in a first-come queue, bounded in time, and `GET /host/my`
//! shows their place in it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What the host may give to hostings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Memory for all hostings together (host RAM minus a reserve), MiB.
    pub memory_mib: u64,
    /// What one hosting takes of it: the plan's RAM plus QEMU's overhead.
    pub per_hosting_mib: u64,
    /// Free disk that must stay free after a new hosting's disk starts to
    /// grow, bytes.
    pub disk_reserve: u64,
    /// What a new hosting's disk is counted as (disks are thin overlays:
    /// they start at a few MiB and grow with what the user stores).
    pub per_hosting_disk: u64,
    /// Creates that run at once; the rest wait in the queue.
    pub concurrent_creates: usize,
    /// How long a create may wait in the queue.
    pub queue_wait: Duration,
}

impl Budget {
    /// No limits: for fast tests on fakes.
    pub const UNLIMITED: Budget = Budget {
        memory_mib: u64::MAX,
        per_hosting_mib: 0,
        disk_reserve: 0,
        per_hosting_disk: 0,
        concurrent_creates: 1024,
        queue_wait: Duration::from_secs(3600),
    };

    /// Why a new hosting does not fit beside `hostings` others with
    /// `free_disk` bytes free, if it does not.
    pub fn refuse(&self, hostings: u64, free_disk: Option<u64>) -> Option<String> {
        let used = hostings.saturating_mul(self.per_hosting_mib);
        if used.saturating_add(self.per_hosting_mib) > self.memory_mib {
            return Some(format!(
                "the host's memory budget is taken ({used} of {} MiB by {hostings} hostings; one more needs {} MiB)",
                self.memory_mib, self.per_hosting_mib
            ));
        }
        if let Some(free) = free_disk
            && free < self.disk_reserve.saturating_add(self.per_hosting_disk)
        {
            return Some(format!(
                "the host's disk is full ({} MiB free; {} MiB must stay free)",
                free / (1024 * 1024),
                self.disk_reserve / (1024 * 1024)
            ));
        }
        None
    }
}

/// The create queue: a semaphore of `concurrent_creates` and the hostings
/// waiting for it, in order.
pub struct Queue {
    slots: Arc<Semaphore>,
    waiting: Mutex<VecDeque<i64>>,
    wait: Duration,
}

/// Waiting in the queue took longer than its bound.
#[derive(Debug, Clone, Copy)]
pub struct QueueTimeout(pub Duration);

impl Queue {
    pub fn new(budget: &Budget) -> Queue {
        Queue {
            slots: Arc::new(Semaphore::new(budget.concurrent_creates.max(1))),
            waiting: Mutex::new(VecDeque::new()),
            wait: budget.queue_wait,
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<i64>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot for hosting `id`; the slot is held until dropped.
    /// Leaving early (the task is cancelled) gives up the place in line.
    pub async fn admit(&self, id: i64) -> Result<OwnedSemaphorePermit, QueueTimeout> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned()
            && self.waiting().is_empty()
        {
            return Ok(permit);
        }
        self.waiting().push_back(id);
        struct Leave<'a>(&'a Queue, i64);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.waiting().retain(|x| *x != self.1);
            }
        }
        let _leave = Leave(self, id);
        // Tokio's semaphore is fair: waiters get slots in arrival order.
        tokio::time::timeout(self.wait, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| QueueTimeout(self.wait))?
            .map_err(|_| QueueTimeout(self.wait))
    }

    /// 1-based place of hosting `id` in the queue, while it waits.
    pub fn position(&self, id: i64) -> Option<usize> {
        self.waiting().iter().position(|x| *x == id).map(|i| i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            memory_mib: 3000,
            per_hosting_mib: 1000,
            disk_reserve: 5 << 30,
            per_hosting_disk: 1 << 30,
            concurrent_creates: 1,
            queue_wait: Duration::from_millis(200),
        }
    }

    #[test]
    fn memory_and_disk_budgets() {
        let b = budget();
        assert_eq!(b.refuse(2, Some(100 << 30)), None);
        assert!(b.refuse(3, Some(100 << 30)).unwrap().contains("memory"));
        assert!(b.refuse(0, Some(5 << 30)).unwrap().contains("disk"));
        assert_eq!(b.refuse(0, None), None);
        assert_eq!(Budget::UNLIMITED.refuse(1_000_000, Some(0)), None);
    }

    #[tokio::test]
    async fn queue_is_first_come_and_bounded() {
        let q = Arc::new(Queue::new(&budget()));
        let first = q.admit(1).await.unwrap();
        let q2 = q.clone();
        let second = tokio::spawn(async move { q2.admit(2).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(q.position(2), Some(1));
        assert_eq!(q.position(1), None);
        // Bounded: the slot is not freed in time.
        assert!(second.await.unwrap().is_err());
        assert_eq!(q.position(2), None, "a timed-out create leaves the line");
        drop(first);
        assert!(q.admit(3).await.is_ok());
    }
}
