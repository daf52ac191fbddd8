//! Prometheus text metrics: counters, gauges and fixed-bucket histograms on atomics, so the
//! request path never takes a lock to record.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Latency buckets in seconds: from a fast decode step to a long generation.
const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Batch-size buckets.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if v <= *b {
                c.fetch_add(1, Relaxed);
            }
        }
        self.sum_micros.fetch_add((v * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Relaxed));
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

pub struct Metrics {
    pub requests_ok: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    pub batch_size: Histogram,
    pub time_to_first_token: Histogram,
    pub request_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_ok: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            batch_size: Histogram::new(&BATCH_BUCKETS),
            time_to_first_token: Histogram::new(&LATENCY_BUCKETS),
            request_latency: Histogram::new(&LATENCY_BUCKETS),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP fp4moe_requests_total Requests by outcome.\n# TYPE fp4moe_requests_total counter"
        );
        for (outcome, v) in [
            ("ok", &self.requests_ok),
            ("rejected", &self.requests_rejected),
            ("failed", &self.requests_failed),
            ("cancelled", &self.requests_cancelled),
        ] {
            let _ = writeln!(out, "fp4moe_requests_total{{outcome=\"{outcome}\"}} {}", v.load(Relaxed));
        }
        for (name, help, kind, v) in [
            ("fp4moe_prompt_tokens_total", "Prompt tokens processed.", "counter", &self.prompt_tokens),
            ("fp4moe_generated_tokens_total", "Tokens generated.", "counter", &self.generated_tokens),
            ("fp4moe_queue_depth", "Requests waiting for a batch slot.", "gauge", &self.queue_depth),
            ("fp4moe_running_requests", "Requests in the running batch.", "gauge", &self.running),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", v.load(Relaxed));
        }
        self.batch_size.render(&mut out, "fp4moe_batch_size", "Sequences per forward step.");
        self.time_to_first_token.render(
            &mut out,
            "fp4moe_time_to_first_token_seconds",
            "Time to first token.",
        );
        self.request_latency.render(&mut out, "fp4moe_request_duration_seconds", "Request duration.");
        out
    }
}
