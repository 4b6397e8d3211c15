//! `device-sim verify`: proves end to end that every acknowledged reading reached the agency API
//! exactly once.
//!
//! It subscribes through `Telemetry.Subscribe` (agency token, filtered to the scenario's
//! tenant) from a resume point — by default the first stored reading, so it can start before,
//! during or after `device-sim run` — and counts every reading by (device, device time,
//! quantity). When the run's ack log is complete (`run` renames it into place at the end), the
//! acknowledged readings are known; verify goes on until each of them has arrived and the stream
//! has been quiet for `--settle` seconds (so a late duplicate is still seen), or `--timeout`.
//!
//! Reported: missing (acknowledged, never delivered), duplicated (delivered more than once) and
//! unacknowledged (delivered but never acknowledged to the device: messages whose PUBACK was
//! lost with their connection — allowed, the device would have sent them again). The exit status
//! is non-zero when anything is missing or duplicated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use citygw::api::grpc::telemetry::RESUME_TRAILER;
use citygw::cli::client::bearer;
use citygw::proto::telemetry_client::TelemetryClient;
use citygw::proto::{resume_point, Filter, ResumePoint, SubscribeRequest};
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic::Code;

use crate::report;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// citygw's gRPC endpoint (agency API).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub grpc: String,
    /// Agency bearer token; the agency's scope must cover the scenario's tenant and kinds.
    #[arg(long, env = "DEVICE_SIM_AGENCY_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The ack log written by `device-sim run --ack-log`.
    #[arg(long)]
    pub ack_log: PathBuf,
    /// Only readings of this tenant (the scenario's `tenant`).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Resume after this reading id (0: from the first stored reading).
    #[arg(long, default_value_t = 0)]
    pub resume_after_id: u64,
    /// Seconds to wait for the ack log to be complete (the run to end).
    #[arg(long, default_value_t = 3600)]
    pub wait: u64,
    /// Seconds after the ack log is complete to wait for the acknowledged readings.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Seconds of quiet stream, once everything acknowledged has arrived, before concluding.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

type Key = (Arc<str>, i64, Arc<str>);

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub acked_messages: u64,
    pub acked_readings: u64,
    pub delivered_readings: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub unacknowledged_delivered: u64,
    /// The delivered-but-unacknowledged readings by quantity: readings the gateway adds itself
    /// (LoRaWAN radio metadata) show up here by name, lost PUBACKs under the device's own.
    pub unacknowledged_by_quantity: std::collections::BTreeMap<String, u64>,
    pub last_id: u64,
    pub overflows: u64,
    pub missing_samples: Vec<String>,
    pub duplicate_samples: Vec<String>,
}

/// The acknowledged readings of an ack log: every (device, time, quantity), and the message
/// count.
fn load_ack_log(path: &Path) -> anyhow::Result<(Vec<Key>, u64)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut keys = Vec::new();
    let mut messages = 0;
    let mut names: HashMap<String, Arc<str>> = HashMap::new();
    let mut intern = |s: &str| -> Arc<str> {
        names
            .entry(s.to_string())
            .or_insert_with(|| s.into())
            .clone()
    };
    for (i, line) in text.lines().enumerate() {
        let mut parts = line.splitn(3, ',');
        let (Some(device), Some(ts), Some(quantities)) = (parts.next(), parts.next(), parts.next())
        else {
            anyhow::bail!("{}:{}: not device,time,quantities", path.display(), i + 1);
        };
        let ts: i64 = ts
            .parse()
            .with_context(|| format!("{}:{}: time", path.display(), i + 1))?;
        let device = intern(device);
        messages += 1;
        for q in quantities.split(';') {
            keys.push((device.clone(), ts, intern(q)));
        }
    }
    Ok((keys, messages))
}

/// Compares what was acknowledged with what was delivered.
fn compare(expected: &[Key], messages: u64, seen: &HashMap<Key, u32>) -> VerifyReport {
    let mut r = VerifyReport {
        acked_messages: messages,
        acked_readings: expected.len() as u64,
        delivered_readings: seen.values().map(|&c| u64::from(c)).sum(),
        missing: 0,
        duplicated: 0,
        unacknowledged_delivered: 0,
        unacknowledged_by_quantity: Default::default(),
        last_id: 0,
        overflows: 0,
        missing_samples: vec![],
        duplicate_samples: vec![],
    };
    let sample = |k: &Key| format!("{} t={} {}", k.0, k.1, k.2);
    let mut expected_set = std::collections::HashSet::with_capacity(expected.len());
    for k in expected {
        if !expected_set.insert(k) {
            continue;
        }
        if seen.get(k).copied().unwrap_or(0) == 0 {
            r.missing += 1;
            if r.missing_samples.len() < 10 {
                r.missing_samples.push(sample(k));
            }
        }
    }
    for (k, &c) in seen {
        if c > 1 {
            r.duplicated += u64::from(c - 1);
            if r.duplicate_samples.len() < 10 {
                r.duplicate_samples.push(format!("{} ×{c}", sample(k)));
            }
        }
        if !expected_set.contains(k) {
            r.unacknowledged_delivered += 1;
            *r.unacknowledged_by_quantity
                .entry(k.2.to_string())
                .or_default() += 1;
        }
    }
    r
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let channel = Endpoint::from_shared(args.grpc.clone())?
        .connect()
        .await
        .with_context(|| format!("cannot reach citygw at {}", args.grpc))?;
    let mut api = TelemetryClient::with_interceptor(channel, bearer(&args.token)?)
        .max_decoding_message_size(64 << 20);
    let filter = Filter {
        tenants: args.tenant.iter().cloned().collect(),
        ..Default::default()
    };

    let mut seen: HashMap<Key, u32> = HashMap::new();
    let mut names: HashMap<String, Arc<str>> = HashMap::new();
    let mut last_id = args.resume_after_id;
    let mut overflows = 0u64;
    let mut expected: Option<(Vec<Key>, u64)> = None;
    let mut outstanding = usize::MAX;
    let started = Instant::now();
    let mut log_loaded_at: Option<Instant> = None;
    let mut last_reading_at = Instant::now();
    let mut check = tokio::time::interval(Duration::from_millis(200));
    let mut retries = 0;

    'subscribe: loop {
        let req = SubscribeRequest {
            filter: Some(filter.clone()),
            resume: Some(ResumePoint {
                point: Some(resume_point::Point::AfterId(last_id)),
            }),
        };
        let mut stream = api
            .subscribe(req)
            .await
            .map_err(|s| anyhow::anyhow!("Subscribe: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(r)) => {
                        last_id = r.id;
                        last_reading_at = Instant::now();
                        let mut intern = |s: String| -> Arc<str> {
                            names.entry(s).or_insert_with_key(|k| k.as_str().into()).clone()
                        };
                        let key = (intern(r.device_id), r.device_time_ms, intern(r.quantity));
                        let count = seen.entry(key.clone()).or_default();
                        *count += 1;
                        if *count == 1 && outstanding != usize::MAX {
                            if let Some((keys, _)) = &expected {
                                if keys.binary_search(&key).is_ok() {
                                    outstanding -= 1;
                                }
                            }
                        }
                    }
                    Ok(None) => anyhow::bail!("the gateway ended the stream"),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        // A full buffer: resume from the id the gateway says it sent last.
                        overflows += 1;
                        if let Some(id) = s.metadata().get(RESUME_TRAILER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
                            last_id = id;
                        }
                        continue 'subscribe;
                    }
                    Err(s) if retries < 5 => {
                        retries += 1;
                        eprintln!("verify: stream error ({:?}: {}), resuming after id {last_id}", s.code(), s.message());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue 'subscribe;
                    }
                    Err(s) => anyhow::bail!("Subscribe stream: {:?}: {}", s.code(), s.message()),
                },
                _ = check.tick() => {
                    if expected.is_none() {
                        if args.ack_log.exists() {
                            let (mut keys, messages) = load_ack_log(&args.ack_log)?;
                            keys.sort();
                            keys.dedup();
                            outstanding = keys.iter().filter(|k| !seen.contains_key(*k)).count();
                            eprintln!("verify: ack log complete: {messages} messages, {} readings acknowledged; {outstanding} not delivered yet", keys.len());
                            expected = Some((keys, messages));
                            log_loaded_at = Some(Instant::now());
                        } else if started.elapsed() > Duration::from_secs(args.wait) {
                            anyhow::bail!("{} did not appear within {} s", args.ack_log.display(), args.wait);
                        }
                    }
                    if let Some(t) = log_loaded_at {
                        let settled = last_reading_at.elapsed() >= Duration::from_secs_f64(args.settle);
                        if (outstanding == 0 && settled) || t.elapsed() > Duration::from_secs(args.timeout) {
                            break 'subscribe;
                        }
                    }
                }
            }
        }
    }

    let (keys, messages) = expected.expect("loaded before the loop ends");
    let mut report = compare(&keys, messages, &seen);
    report.last_id = last_id;
    report.overflows = overflows;
    let rows = vec![
        (
            "acknowledged",
            format!(
                "{} messages, {} readings",
                report.acked_messages, report.acked_readings
            ),
        ),
        ("delivered readings", report.delivered_readings.to_string()),
        ("missing", report.missing.to_string()),
        ("duplicated", report.duplicated.to_string()),
        (
            "delivered, not acknowledged",
            format!(
                "{} {:?}",
                report.unacknowledged_delivered, report.unacknowledged_by_quantity
            ),
        ),
        (
            "stream",
            format!(
                "up to id {}, {} overflow resumes",
                report.last_id, report.overflows
            ),
        ),
    ];
    report::print_table("device-sim verify", &rows);
    for s in &report.missing_samples {
        println!("  missing: {s}");
    }
    for s in &report.duplicate_samples {
        println!("  duplicated: {s}");
    }
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    anyhow::ensure!(
        report.missing == 0 && report.duplicated == 0,
        "{} acknowledged readings missing, {} duplicated",
        report.missing,
        report.duplicated
    );
    println!("verify: every acknowledged reading arrived exactly once");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(d: &str, t: i64, q: &str) -> Key {
        (d.into(), t, q.into())
    }

    #[test]
    fn counts_missing_duplicated_and_unacknowledged() {
        let expected = vec![key("a", 1, "x"), key("a", 1, "y"), key("b", 2, "x")];
        let mut seen = HashMap::new();
        seen.insert(key("a", 1, "x"), 1);
        seen.insert(key("a", 1, "y"), 3);
        seen.insert(key("c", 9, "x"), 1);
        let r = compare(&expected, 2, &seen);
        assert_eq!(
            (r.missing, r.duplicated, r.unacknowledged_delivered),
            (1, 2, 1)
        );
        assert_eq!(r.delivered_readings, 5);
        assert_eq!(r.unacknowledged_by_quantity["x"], 1);
        assert_eq!(r.missing_samples, vec!["b t=2 x".to_string()]);
    }

    #[test]
    fn ack_log_lines_expand_to_readings() {
        let dir = std::env::temp_dir().join(format!("acklog-{}", std::process::id()));
        std::fs::write(&dir, "d1,1000,pm2_5;pm10\nd2,2000,noise\n").unwrap();
        let (keys, messages) = load_ack_log(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(messages, 2);
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[1], key("d1", 1000, "pm10"));
    }
}
