//! Request counters and latency histograms per route, rendered with the
//! hostings by status and the create duration in Prometheus text format.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hosting::Histogram;
use crate::usage::Sample;

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0,
];

struct RouteStats {
    /// By status class: 1xx..5xx.
    by_class: [AtomicU64; 5],
    latency: Histogram,
}

pub struct Metrics {
    routes: HashMap<&'static str, RouteStats>,
}

impl Metrics {
    /// `routes` are the labels requests are counted under (route patterns).
    pub fn new(routes: &[&'static str]) -> Metrics {
        Metrics {
            routes: routes
                .iter()
                .map(|r| {
                    (
                        *r,
                        RouteStats {
                            by_class: Default::default(),
                            latency: Histogram::new(LATENCY_BUCKETS),
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn record(&self, route: &'static str, status: u16, seconds: f64) {
        if let Some(stats) = self.routes.get(route) {
            let class = usize::from((status / 100).clamp(1, 5)) - 1;
            stats.by_class[class].fetch_add(1, Ordering::Relaxed);
            stats.latency.observe(seconds);
        }
    }

    pub fn render(&self, out: &mut String) {
        let mut routes: Vec<_> = self.routes.iter().collect();
        routes.sort_by_key(|(r, _)| *r);
        out.push_str("# HELP webhoster_http_requests_total HTTP requests by route and status class.\n");
        out.push_str("# TYPE webhoster_http_requests_total counter\n");
        for (route, stats) in &routes {
            for (i, n) in stats.by_class.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "webhoster_http_requests_total{{route=\"{route}\",status=\"{}xx\"}} {n}",
                        i + 1
                    );
                }
            }
        }
        out.push_str("# HELP webhoster_http_request_duration_seconds HTTP request latency by route.\n");
        out.push_str("# TYPE webhoster_http_request_duration_seconds histogram\n");
        for (route, stats) in &routes {
            if stats.latency.count() > 0 {
                stats.latency.render(
                    out,
                    "webhoster_http_request_duration_seconds",
                    &format!("route=\"{route}\""),
                );
            }
        }
    }
}

/// One per-VM family: name, type, help, and the value of a sample.
type VmFamily = (&'static str, &'static str, &'static str, fn(&Sample) -> f64);

/// The per-VM families, as Incus exports per instance. Counters count from
/// the QEMU's (CPU, disk) or the tap's (network) start: Prometheus' `rate()`
/// takes a restart as a counter reset.
const VM_FAMILIES: &[VmFamily] = &[
    (
        "webhoster_vm_cpu_seconds_total",
        "counter",
        "CPU time the VM's QEMU used (user + system, all threads).",
        |s| s.cpu_seconds,
    ),
    (
        "webhoster_vm_memory_rss_bytes",
        "gauge",
        "Resident memory of the VM's QEMU.",
        |s| s.rss_bytes as f64,
    ),
    (
        "webhoster_vm_disk_read_bytes_total",
        "counter",
        "Bytes the guest read from its drives (QMP query-blockstats).",
        |s| s.disk_read_bytes as f64,
    ),
    (
        "webhoster_vm_disk_write_bytes_total",
        "counter",
        "Bytes the guest wrote to its drives (QMP query-blockstats).",
        |s| s.disk_write_bytes as f64,
    ),
    (
        "webhoster_vm_network_receive_bytes_total",
        "counter",
        "Bytes the guest received on its network interface (its tap's transmit counter).",
        |s| s.net_rx_bytes as f64,
    ),
    (
        "webhoster_vm_network_transmit_bytes_total",
        "counter",
        "Bytes the guest sent on its network interface (its tap's receive counter).",
        |s| s.net_tx_bytes as f64,
    ),
];

/// The per-VM families for the VMs sampled last (`vms` sorted by vm_id).
pub fn render_vm_usage(out: &mut String, vms: &[(String, Sample)]) {
    for (name, kind, help, value) in VM_FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (vm_id, sample) in vms {
            let _ = writeln!(
                out,
                "{name}{{vm_id=\"{}\"}} {}",
                label_value(vm_id),
                value(sample)
            );
        }
    }
}

/// A label value in the text format: backslash, quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_families_have_help_type_and_one_series_per_vm() {
        let sample = Sample {
            at: 1,
            cpu_seconds: 12.5,
            rss_bytes: 300 << 20,
            disk_read_bytes: 1000,
            disk_write_bytes: 2000,
            net_rx_bytes: 3000,
            net_tx_bytes: 4000,
        };
        let mut out = String::new();
        render_vm_usage(
            &mut out,
            &[("vm-a".into(), sample), ("vm-\"b".into(), Sample::default())],
        );
        for (name, kind, _, _) in VM_FAMILIES {
            assert!(out.contains(&format!("# TYPE {name} {kind}\n")), "{out}");
            assert!(out.contains(&format!("# HELP {name} ")), "{out}");
        }
        for line in [
            "webhoster_vm_cpu_seconds_total{vm_id=\"vm-a\"} 12.5",
            "webhoster_vm_memory_rss_bytes{vm_id=\"vm-a\"} 314572800",
            "webhoster_vm_disk_read_bytes_total{vm_id=\"vm-a\"} 1000",
            "webhoster_vm_disk_write_bytes_total{vm_id=\"vm-a\"} 2000",
            "webhoster_vm_network_receive_bytes_total{vm_id=\"vm-a\"} 3000",
            "webhoster_vm_network_transmit_bytes_total{vm_id=\"vm-a\"} 4000",
            "webhoster_vm_cpu_seconds_total{vm_id=\"vm-\\\"b\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
        // Counters end in _total, the gauge does not.
        for (name, kind, _, _) in VM_FAMILIES {
            assert_eq!(name.ends_with("_total"), *kind == "counter", "{name}");
        }
    }
}
