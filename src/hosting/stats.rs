//! A lock-free histogram with fixed buckets (Prometheus style), used for the
//! create durations (by path and step) here and for request latency in `api`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::state::{CreatePath, Step};

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Appends the Prometheus text lines for `name` with extra `labels`
    /// (`route="x"` or empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Buckets for a create: a warm clone's second to a cold boot's minutes
/// under TCG.
pub const CREATE_BUCKETS: &[f64] = &[0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0];

/// Buckets for one create step: a file write to a guest boot.
pub const STEP_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 120.0];

/// How creates went, by path (warm or cold) and by step.
pub struct CreateMetrics {
    total: Vec<(CreatePath, Histogram)>,
    steps: Vec<(CreatePath, Step, Histogram)>,
    /// Warm creates that fell back to the cold path.
    fallbacks: AtomicU64,
}

impl Default for CreateMetrics {
    fn default() -> Self {
        CreateMetrics {
            total: CreatePath::ALL
                .into_iter()
                .map(|p| (p, Histogram::new(CREATE_BUCKETS)))
                .collect(),
            steps: CreatePath::ALL
                .into_iter()
                .flat_map(|p| p.steps().map(|s| (p, s, Histogram::new(STEP_BUCKETS))))
                .collect(),
            fallbacks: AtomicU64::new(0),
        }
    }
}

impl CreateMetrics {
    pub fn observe_create(&self, path: CreatePath, seconds: f64) {
        if let Some((_, h)) = self.total.iter().find(|(p, _)| *p == path) {
            h.observe(seconds);
        }
    }

    pub fn observe_step(&self, path: CreatePath, step: Step, seconds: f64) {
        if let Some((.., h)) = self.steps.iter().find(|(p, s, _)| *p == path && *s == step) {
            h.observe(seconds);
        }
    }

    pub fn fell_back(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Creates finished on `path`.
    pub fn count(&self, path: CreatePath) -> u64 {
        self.total
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(0, |(_, h)| h.count())
    }

    /// The Prometheus families.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str(
            "# HELP webhoster_create_duration_seconds Time from create request to a published site, by path (warm clone or cold boot).\n\
             # TYPE webhoster_create_duration_seconds histogram\n",
        );
        for (path, h) in &self.total {
            h.render(
                out,
                "webhoster_create_duration_seconds",
                &format!("path=\"{path}\""),
            );
        }
        out.push_str(
            "# HELP webhoster_create_step_duration_seconds Time of each create step, by path.\n\
             # TYPE webhoster_create_step_duration_seconds histogram\n",
        );
        for (path, step, h) in self.steps.iter().filter(|(.., h)| h.count() > 0) {
            let labels = format!("path=\"{path}\",step=\"{}\"", step.name());
            h.render(out, "webhoster_create_step_duration_seconds", &labels);
        }
        let _ = writeln!(
            out,
            "# HELP webhoster_create_fallbacks_total Warm creates whose clone failed and that went on cold.\n\
             # TYPE webhoster_create_fallbacks_total counter\n\
             webhoster_create_fallbacks_total {}",
            self.fallbacks.load(Ordering::Relaxed)
        );
    }
}
