//! The sampling task: every interval, one [`Meter::read`] and one
//! [`Usage::record`]. Cheap by design: per VM one /proc read and one QMP
//! command, and one netlink link dump for all taps.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Pass, Sample, Usage, unix_now};

/// Why one VM could not be read this time.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error(transparent)]
    Vm(#[from] crate::vmm::VmmError),
    #[error("the taps' counters")]
    Network(#[source] Arc<crate::net::NetError>),
    #[error("no tap {0} in the namespace")]
    NoTap(String),
}

/// What one read of the host found.
#[derive(Debug, Default)]
pub struct Reading {
    /// Every VM the host has, running or not.
    pub known: HashSet<String>,
    /// One entry per running VM (`at` is set by the sampler).
    pub vms: Vec<(String, Result<Sample, MeterError>)>,
}

/// Reads the counters of the VMs (the real one is wired in `app`).
#[async_trait]
pub trait Meter: Send + Sync {
    async fn read(&self) -> Reading;
}

/// One pass: read, log the VMs that could not be read, record the rest.
pub async fn sample_once(usage: &Usage, meter: &dyn Meter) {
    let started = std::time::Instant::now();
    let reading = meter.read().await;
    let at = unix_now();
    let mut samples = Vec::with_capacity(reading.vms.len());
    for (vm_id, result) in reading.vms {
        match result {
            Ok(sample) => samples.push((vm_id, Sample { at, ..sample })),
            // A VM stopping or restarting between listing and reading is
            // normal: skipped this round, at debug.
            Err(err) => tracing::debug!(
                vm_id = %vm_id,
                error = %crate::vmm::error_chain(&err),
                "usage: VM not sampled"
            ),
        }
    }
    tracing::debug!(
        vms = samples.len(),
        micros = started.elapsed().as_micros() as u64,
        "usage: pass done"
    );
    usage.record(Pass {
        at,
        samples,
        known: reading.known,
    });
}

/// Samples every `every` until the returned task is aborted. The first pass
/// runs at once, so `/metrics` has the VMs soon after start.
pub fn spawn(usage: Arc<Usage>, meter: Arc<dyn Meter>, every: Duration) -> tokio::task::JoinHandle<()> {
    usage.set_every(every);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        // A slow pass (a wedged QMP times out after seconds) delays the
        // next one instead of bunching passes up.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            sample_once(&usage, meter.as_ref()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(std::sync::Mutex<u32>);

    #[async_trait]
    impl Meter for Fixed {
        async fn read(&self) -> Reading {
            let mut n = self.0.lock().unwrap();
            *n += 1;
            Reading {
                known: ["vm-a", "vm-b"].iter().map(|s| s.to_string()).collect(),
                vms: vec![
                    (
                        "vm-a".into(),
                        Ok(Sample {
                            cpu_seconds: f64::from(*n),
                            rss_bytes: 1 << 20,
                            ..Sample::default()
                        }),
                    ),
                    ("vm-b".into(), Err(MeterError::NoTap("whtap-b".into()))),
                ],
            }
        }
    }

    #[tokio::test]
    async fn a_failed_vm_is_skipped_and_the_others_recorded() {
        let usage = Usage::new();
        let meter = Fixed(std::sync::Mutex::new(0));
        sample_once(&usage, &meter).await;
        sample_once(&usage, &meter).await;
        let h = usage.history("vm-a");
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].cpu_seconds, 2.0);
        assert!(h[1].at >= unix_now() - 5);
        assert!(usage.history("vm-b").is_empty());
        assert_eq!(usage.live().len(), 1);
    }

    #[tokio::test]
    async fn the_task_samples_every_interval() {
        let usage = Arc::new(Usage::new());
        let meter = Arc::new(Fixed(std::sync::Mutex::new(0)));
        let task = spawn(usage.clone(), meter.clone(), Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(350)).await;
        task.abort();
        // At 0, 100, 200 and 300 ms (a loaded host may miss the last one).
        let passes = *meter.0.lock().unwrap();
        assert!((3..=4).contains(&passes), "{passes} passes");
        assert_eq!(usage.every(), Some(Duration::from_millis(100)));
    }
}
