//! Per-volume I/O counters of an engine: operations, bytes, errors and a latency histogram per
//! operation kind, lock-free, rendered as Prometheus text by the node.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 500_000, 2_000_000,
];

#[derive(Default)]
pub struct OpStats {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub latency_sum_us: AtomicU64,
    /// Counts per bucket (not cumulative); the last slot is +Inf.
    pub buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
}

impl OpStats {
    pub fn record(&self, bytes: u64, took: Duration, ok: bool) {
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        self.ops.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct IoStats {
    pub read: OpStats,
    pub write: OpStats,
    pub zero: OpStats,
    pub flush: OpStats,
}

impl IoStats {
    fn ops(&self) -> [(&'static str, &OpStats); 4] {
        [
            ("read", &self.read),
            ("write", &self.write),
            ("zero", &self.zero),
            ("flush", &self.flush),
        ]
    }

    /// Appends this volume's series (without HELP/TYPE lines; see [`write_headers`]).
    pub fn render(&self, volume: &str, out: &mut String) {
        for (op, s) in self.ops() {
            let l = format!("volume=\"{volume}\",op=\"{op}\"");
            let _ = writeln!(
                out,
                "zebu_volume_io_operations_total{{{l}}} {}",
                s.ops.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "zebu_volume_io_bytes_total{{{l}}} {}",
                s.bytes.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "zebu_volume_io_errors_total{{{l}}} {}",
                s.errors.load(Ordering::Relaxed)
            );
            let mut cum = 0;
            for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
                cum += s.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "zebu_volume_io_latency_seconds_bucket{{{l},le=\"{}\"}} {cum}",
                    *b as f64 / 1e6
                );
            }
            cum += s.buckets[LATENCY_BUCKETS_US.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "zebu_volume_io_latency_seconds_bucket{{{l},le=\"+Inf\"}} {cum}"
            );
            let _ = writeln!(
                out,
                "zebu_volume_io_latency_seconds_sum{{{l}}} {}",
                s.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "zebu_volume_io_latency_seconds_count{{{l}}} {cum}");
        }
    }
}

/// HELP and TYPE lines for the series [`IoStats::render`] writes.
pub fn write_headers(out: &mut String) {
    for (name, kind, help) in [
        (
            "zebu_volume_io_operations_total",
            "counter",
            "I/O operations served by the volume's engine.",
        ),
        (
            "zebu_volume_io_bytes_total",
            "counter",
            "Bytes read, written or zeroed by successful operations.",
        ),
        (
            "zebu_volume_io_errors_total",
            "counter",
            "Operations that failed.",
        ),
        (
            "zebu_volume_io_latency_seconds",
            "histogram",
            "Operation latency at the engine.",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }
}
