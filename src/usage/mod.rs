//! usage: what each VM has used lately. A background sampler reads every
//! running VM's counters (CPU seconds, resident memory, disk and network
//! bytes) through a [`Meter`] every few seconds and keeps the last hour per
//! VM in memory, for `/metrics`, `GET /api/v1/host/my/usage` and the
//! dashboard's charts ([`chart`]).
//!
//! Owns only the in-memory history: never persists it (a restart starts a
//! new hour), never reads a VM itself (the meter, wired in `app`, does) and
//! never decides anything about a VM.

pub mod chart;
mod sampler;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::RwLock;
use std::time::Duration;

pub use chart::{ChartLabels, HourCharts, hour_charts};
pub use sampler::{Meter, MeterError, Reading, sample_once, spawn};

/// How far back the history goes.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// The default sampling interval (`--usage-every`).
pub const DEFAULT_EVERY: Duration = Duration::from_secs(15);
/// Samples kept per VM whatever the interval: an hour at one per second.
const MAX_SAMPLES: usize = 3600;

/// One VM's cumulative counters at one moment. CPU and disk count from its
/// QEMU's start (a new QEMU starts again at zero); network from its tap's
/// creation. Consumers take differences and treat a drop as a restart.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// When it was taken, unix seconds.
    pub at: i64,
    /// CPU time used by the VM's QEMU since it started.
    pub cpu_seconds: f64,
    /// Resident memory of the VM's QEMU.
    pub rss_bytes: u64,
    /// Bytes the guest read from and wrote to its drives since its QEMU started.
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    /// Bytes the guest received and sent on its network interface.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// The last hour of samples of every VM.
#[derive(Debug, Default)]
pub struct Usage {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    vms: HashMap<String, VecDeque<Sample>>,
    /// VMs read in the last pass: the ones `/metrics` reports.
    live: HashSet<String>,
    every: Option<Duration>,
}

/// What one sampling pass found.
#[derive(Debug, Default)]
pub struct Pass {
    pub at: i64,
    /// A sample per VM that could be read.
    pub samples: Vec<(String, Sample)>,
    /// Every VM the host still has (running or not); the history of any
    /// other is dropped.
    pub known: HashSet<String>,
}

impl Usage {
    pub fn new() -> Usage {
        Usage::default()
    }

    /// Oldest first, the last hour.
    pub fn history(&self, vm_id: &str) -> Vec<Sample> {
        self.read()
            .vms
            .get(vm_id)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn latest(&self, vm_id: &str) -> Option<Sample> {
        self.read().vms.get(vm_id).and_then(|h| h.back().copied())
    }

    /// The latest sample of each VM read in the last pass, by vm_id.
    pub fn live(&self) -> Vec<(String, Sample)> {
        let inner = self.read();
        let mut out: Vec<(String, Sample)> = inner
            .live
            .iter()
            .filter_map(|id| Some((id.clone(), *inner.vms.get(id)?.back()?)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The sampling interval, once a sampler runs.
    pub fn every(&self) -> Option<Duration> {
        self.read().every
    }

    pub(crate) fn set_every(&self, every: Duration) {
        self.write().every = Some(every);
    }

    /// Add a pass: append its samples, forget VMs the host no longer has
    /// and samples older than [`WINDOW`].
    pub fn record(&self, pass: Pass) {
        let oldest = pass.at - WINDOW.as_secs() as i64;
        let mut inner = self.write();
        inner
            .vms
            .retain(|id, _| pass.known.contains(id) || pass.samples.iter().any(|(s, _)| s == id));
        inner.live.clear();
        for (vm_id, sample) in pass.samples {
            let history = inner.vms.entry(vm_id.clone()).or_default();
            // A clock stepped back would make the series run backwards.
            if history.back().is_some_and(|last| last.at > sample.at) {
                history.clear();
            }
            history.push_back(sample);
            inner.live.insert(vm_id);
        }
        for history in inner.vms.values_mut() {
            while history.len() > MAX_SAMPLES || history.front().is_some_and(|s| s.at < oldest) {
                history.pop_front();
            }
        }
        inner.vms.retain(|_, h| !h.is_empty());
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Now as unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: i64, cpu: f64) -> Sample {
        Sample {
            at,
            cpu_seconds: cpu,
            ..Sample::default()
        }
    }

    fn pass(at: i64, samples: &[(&str, f64)], known: &[&str]) -> Pass {
        Pass {
            at,
            samples: samples
                .iter()
                .map(|(id, cpu)| (id.to_string(), sample(at, *cpu)))
                .collect(),
            known: known.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn keeps_the_last_hour_oldest_first() {
        let usage = Usage::new();
        for i in 0..300 {
            usage.record(pass(i * 15, &[("vm-a", i as f64)], &["vm-a"]));
        }
        let h = usage.history("vm-a");
        // 299*15 - 3600 = 880: samples at 885.. are within the hour.
        assert_eq!(h.first().unwrap().at, 885);
        assert_eq!(h.last().unwrap().at, 299 * 15);
        assert_eq!(h.len(), 241);
        assert!(h.windows(2).all(|w| w[0].at < w[1].at));
        assert_eq!(usage.latest("vm-a").unwrap().cpu_seconds, 299.0);
        assert_eq!(usage.latest("vm-b"), None);
        assert!(usage.history("vm-b").is_empty());
    }

    #[test]
    fn a_vm_that_is_gone_is_dropped_and_a_stopped_one_is_not_live() {
        let usage = Usage::new();
        usage.record(pass(0, &[("vm-a", 1.0), ("vm-b", 2.0)], &["vm-a", "vm-b"]));
        assert_eq!(usage.live().len(), 2);
        // vm-b stopped (known, not read); vm-a's reading failed this time.
        usage.record(pass(15, &[], &["vm-a", "vm-b"]));
        assert!(usage.live().is_empty());
        assert_eq!(usage.history("vm-b").len(), 1);
        // vm-b deleted.
        usage.record(pass(30, &[("vm-a", 3.0)], &["vm-a"]));
        assert!(usage.history("vm-b").is_empty());
        let live = usage.live();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].0, "vm-a");
        assert_eq!(live[0].1.cpu_seconds, 3.0);
        // A stopped VM's history ages out with the hour.
        usage.record(pass(30 + 3601, &[], &["vm-a"]));
        assert!(usage.history("vm-a").is_empty());
    }

    #[test]
    fn a_clock_stepped_back_starts_the_series_again() {
        let usage = Usage::new();
        usage.record(pass(100, &[("vm-a", 1.0)], &["vm-a"]));
        usage.record(pass(50, &[("vm-a", 2.0)], &["vm-a"]));
        assert_eq!(usage.history("vm-a"), vec![sample(50, 2.0)]);
    }
}
