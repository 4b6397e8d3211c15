//! Latency summaries and the human-readable tables the benchmarks print.

use std::path::Path;
use tokio::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

/// A benchmark's time line: warm-up from `start`, measurement from `measure_from` to `end`.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start: Instant,
    pub measure_from: Instant,
    pub end: Instant,
}

impl Window {
    /// Whether `t` falls inside the measured part.
    pub fn measuring(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.end
    }
}

/// Latency histogram in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// Percentiles of a latency histogram recorded in microseconds, reported in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p99_9_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p99_9_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Two-column table: label, value.
impl LatencySummary {
    /// The two latency cells of a report table: "p50 / p90 / p99" and "p99.9 / max (n samples)".
    pub fn cells(&self) -> (String, String) {
        (
            format!(
                "{:.3} / {:.3} / {:.3}",
                self.p50_ms, self.p90_ms, self.p99_ms
            ),
            format!(
                "{:.3} / {:.3} ({} samples)",
                self.p99_9_ms, self.max_ms, self.count
            ),
        )
    }
}

/// A benchmark report: its table under `device-sim bench KIND — LABEL`, then sampled errors.
pub fn print_report(kind: &str, label: Option<&str>, rows: &[(&str, String)], errors: &[String]) {
    let title = format!(
        "device-sim bench {kind}{}",
        label.map(|l| format!(" — {l}")).unwrap_or_default()
    );
    print_table(&title, rows);
    for e in errors {
        println!("  error: {e}");
    }
}

pub fn print_table(title: &str, rows: &[(&str, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{title}");
    println!("{}", "-".repeat(title.len().max(20)));
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// This process's resident set in KiB (Linux), for reporting the client's own footprint.
pub fn own_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) this process has used, in seconds (Linux; /proc reports it in
/// USER_HZ ticks, which Linux fixes at 100 for user space).
pub fn own_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; the fields after it are space separated.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_in_milliseconds() {
        let mut h = latency_histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap();
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 5.0).abs() < 0.01, "{}", s.p50_ms);
        assert!((s.max_ms - 10.0).abs() < 0.01, "{}", s.max_ms);
    }

    #[test]
    fn rss_is_readable_here() {
        assert!(own_rss_kib().unwrap_or(1) > 0);
    }

    #[test]
    fn cpu_is_readable_here() {
        assert!(own_cpu_secs().unwrap_or(0.0) >= 0.0);
    }
}
