//! Request counters and latency histograms per route, rendered with the
//! hostings by status and the create duration in Prometheus text format.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hosting::Histogram;

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
