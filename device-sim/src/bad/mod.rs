//! `device-sim bad MODE`: bad input for reliability tests. Each mode sends `--count` attempts of
//! one kind of bad input over MQTT 5 (default), CoAP or CoAPS (`--protocol`), checks each got the
//! refusal it should, and checks that the gateway's Prometheus counter for that refusal moved by
//! exactly the number of attempts. Then a good device sends one reading over the same protocol
//! and must be acknowledged: the gateway keeps serving everyone else.
//!
//! The answers and counters of each mode and protocol are in [`expectation`] (and the README).

mod coap;
mod mqtt;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::credentials::{self, Credential};
use crate::report;

#[derive(Debug, Clone, Copy, ValueEnum, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    WrongCredentials,
    UnknownDevice,
    SpoofedTopic,
    Malformed,
    Oversize,
    Storm,
}

/// The listener the bad input goes to.
#[derive(Debug, Clone, Copy, ValueEnum, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    Mqtt,
    /// Plain CoAP, the device's access token in `?t=` (the gateway's listener must be enabled).
    Coap,
    /// CoAP over DTLS 1.2 PSK; the credentials need the `psk` column (CoAPS devices).
    Coaps,
}

#[derive(Args, Debug)]
pub struct BadArgs {
    #[arg(value_enum)]
    pub mode: Mode,
    /// Credentials CSV (id, secret, optional psk) of registered devices (`device-sim provision
    /// --out`).
    #[arg(long)]
    pub credentials: PathBuf,
    #[arg(long, value_enum, default_value_t = Via::Mqtt)]
    pub protocol: Via,
    #[arg(long, default_value = "127.0.0.1")]
    pub mqtt_host: String,
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    /// The gateway's plain CoAP listener, host:port.
    #[arg(long, default_value = "127.0.0.1:5683")]
    pub coap: String,
    /// The gateway's CoAPS listener, host:port.
    #[arg(long, default_value = "127.0.0.1:5684")]
    pub coaps: String,
    /// The gateway's Prometheus endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080/metrics")]
    pub metrics: String,
    /// Bad attempts to make (storm: simultaneous connections or requests).
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    /// The gateway's payload limit for the protocol (oversize sends one byte more); default
    /// the gateway's: `mqtt.max_payload_bytes` 262,144, `coap.max_payload_bytes` 65,536.
    #[arg(long)]
    pub max_payload_bytes: Option<usize>,
    /// Seconds to wait for each answer and for the counters to settle. CoAPS wrong-credentials
    /// is counted when the gateway's handshake timeout ends (`coap.dtls_handshake_timeout_secs`,
    /// 30 by default): wait longer than that.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl BadArgs {
    fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes.unwrap_or(match self.protocol {
            Via::Mqtt => 262_144,
            Via::Coap | Via::Coaps => 65_536,
        })
    }
}

#[derive(Serialize, Debug)]
pub struct BadReport {
    pub mode: Mode,
    pub protocol: Via,
    pub attempts: usize,
    pub expected_answer: String,
    /// Answers received, by kind.
    pub answers: BTreeMap<String, u64>,
    pub counter: String,
    pub counter_before: f64,
    pub counter_after: f64,
    pub counter_delta: f64,
    pub expected_counter_delta: f64,
    /// MQTT storm: the most connections the gateway showed at once (`citygw_connected_devices`).
    pub storm_peak_connected: Option<f64>,
    /// A good device sent a reading after the bad input and was acknowledged.
    pub control_acknowledged: bool,
    pub ok: bool,
}

/// Truncated JSON: what every protocol's malformed mode sends.
const MALFORMED_JSON: &[u8] = br#"{"temperature": 21.5, "humidity":"#;
/// The good device's reading.
const CONTROL_READING: &[u8] = br#"{"temperature": 21.5}"#;

/// What the attempts of one mode got back.
pub struct Attacks {
    answers: BTreeMap<String, u64>,
    storm_peak: Option<f64>,
}

/// The devices a run uses: a control device (sends the good reading at the end), a victim (whose
/// identity the spoofer claims), and the pool the attempts take turns from.
pub struct Roles {
    control: Credential,
    victim: Credential,
    pool: Vec<Credential>,
}

impl Roles {
    fn attacker(&self, i: usize) -> Credential {
        self.pool[i % self.pool.len()].clone()
    }
}

struct Expectation {
    answer: &'static str,
    metric: &'static str,
    labels: Vec<(&'static str, &'static str)>,
    /// Expected change of the counter per attempt.
    per_attempt: f64,
}

/// The answer each attempt must get and the counter that must move by one per attempt.
fn expectation(mode: Mode, via: Via) -> anyhow::Result<Expectation> {
    let exp = |answer, metric, labels: &[(&'static str, &'static str)], per_attempt| Expectation {
        answer,
        metric,
        labels: labels.to_vec(),
        per_attempt,
    };
    let auth = "citygw_auth_failures_total";
    let rejected = "citygw_messages_rejected_total";
    Ok(match (via, mode) {
        (Via::Mqtt, Mode::WrongCredentials) => exp(
            "connack BadUserNamePassword",
            auth,
            &[("protocol", "mqtt"), ("reason", "bad_credentials")],
            1.0,
        ),
        (Via::Mqtt, Mode::UnknownDevice) => exp(
            "connack NotAuthorized",
            auth,
            &[("protocol", "mqtt"), ("reason", "unknown_device")],
            1.0,
        ),
        (Via::Mqtt, Mode::SpoofedTopic) => exp(
            "puback NotAuthorized",
            rejected,
            &[("protocol", "mqtt"), ("reason", "spoofed_topic")],
            1.0,
        ),
        (Via::Mqtt, Mode::Malformed) => exp(
            "puback PayloadFormatInvalid",
            rejected,
            &[("protocol", "mqtt"), ("reason", "malformed_json")],
            1.0,
        ),
        (Via::Mqtt, Mode::Oversize) => exp(
            "puback PayloadFormatInvalid",
            rejected,
            &[("protocol", "mqtt"), ("reason", "payload_too_large")],
            1.0,
        ),
        (Via::Mqtt, Mode::Storm) => exp("connack Success", auth, &[("protocol", "mqtt")], 0.0),
        (Via::Coap, Mode::WrongCredentials) => exp(
            "coap 4.01",
            auth,
            &[("protocol", "coap"), ("reason", "bad_credentials")],
            1.0,
        ),
        (Via::Coap, Mode::UnknownDevice) => exp(
            "coap 4.01",
            auth,
            &[("protocol", "coap"), ("reason", "unknown_device")],
            1.0,
        ),
        (Via::Coap, Mode::SpoofedTopic) => anyhow::bail!(
            "spoofed-topic needs --protocol coaps: over plain CoAP the access token names the \
             device, so posting for another device is a wrong credential (wrong-credentials)"
        ),
        // A wrong key cannot decrypt the client's Finished; the gateway drops it and the
        // handshake ends at the gateway's timeout.
        (Via::Coaps, Mode::WrongCredentials) => exp(
            "dtls handshake timeout",
            "citygw_coaps_handshake_failures_total",
            &[("reason", "timeout")],
            1.0,
        ),
        (Via::Coaps, Mode::UnknownDevice) => exp(
            "dtls handshake failed",
            auth,
            &[("protocol", "coaps"), ("reason", "unknown_device")],
            1.0,
        ),
        (Via::Coaps, Mode::SpoofedTopic) => exp(
            "coap 4.03",
            rejected,
            &[("protocol", "coap"), ("reason", "spoofed_path")],
            1.0,
        ),
        (_, Mode::Malformed) => exp(
            "coap 4.00",
            rejected,
            &[("protocol", "coap"), ("reason", "malformed_json")],
            1.0,
        ),
        (_, Mode::Oversize) => exp(
            "coap 4.13",
            rejected,
            &[("protocol", "coap"), ("reason", "payload_too_large")],
            1.0,
        ),
        (Via::Coap, Mode::Storm) => exp(
            "coap 2.04",
            "citygw_messages_received_total",
            &[("protocol", "coap")],
            1.0,
        ),
        (Via::Coaps, Mode::Storm) => exp(
            "coap 2.04",
            "citygw_coaps_handshakes_total",
            &[("result", "ok")],
            1.0,
        ),
    })
}

/// Picks the control device, the victim and the attackers' pool; CoAPS needs devices with a PSK.
fn roles(creds: Vec<Credential>, args: &BadArgs) -> anyhow::Result<Roles> {
    let usable: Vec<Credential> = match args.protocol {
        Via::Coaps => creds.into_iter().filter(|c| c.psk.is_some()).collect(),
        _ => creds,
    };
    // The control device and (spoof) a victim are set apart from the attackers.
    let reserved = if args.mode == Mode::SpoofedTopic {
        2
    } else {
        1
    };
    anyhow::ensure!(
        usable.len() > reserved,
        "{} has too few devices{}",
        args.credentials.display(),
        if args.protocol == Via::Coaps {
            " with a psk (provision CoAPS devices)"
        } else {
            ""
        }
    );
    let pool = usable[reserved..].to_vec();
    // Storm attempts are simultaneous sessions: each needs a device of its own.
    anyhow::ensure!(
        args.mode != Mode::Storm || pool.len() >= args.count,
        "storm needs {} distinct devices, {} has {}",
        args.count,
        args.credentials.display(),
        pool.len()
    );
    Ok(Roles {
        control: usable[0].clone(),
        victim: usable[1].clone(),
        pool,
    })
}

pub async fn run(args: BadArgs) -> anyhow::Result<()> {
    let exp = expectation(args.mode, args.protocol)?;
    let roles = roles(credentials::load(&args.credentials)?, &args)?;
    let n = args.count;
    let timeout = Duration::from_secs(args.timeout);

    let before = counter(&args.metrics, exp.metric, &exp.labels).await?;
    let attacks = match args.protocol {
        Via::Mqtt => mqtt::attack(&args, &roles).await?,
        Via::Coap | Via::Coaps => coap::attack(&args, &roles).await?,
    };
    let expected_delta = exp.per_attempt * n as f64;
    let after = wait_for(&args.metrics, exp.metric, &exp.labels, timeout, |v| {
        v - before >= expected_delta
    })
    .await?;
    let control_ok = match args.protocol {
        Via::Mqtt => mqtt::control(&args, &roles.control).await,
        Via::Coap | Via::Coaps => coap::control(&args, &roles.control).await,
    };
    let Attacks {
        answers,
        storm_peak,
    } = attacks;
    let expected_answers = answers.get(exp.answer).copied().unwrap_or(0);
    let report = BadReport {
        mode: args.mode,
        protocol: args.protocol,
        attempts: n,
        expected_answer: exp.answer.to_string(),
        answers,
        counter: format!(
            "{}{{{}}}",
            exp.metric,
            exp.labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect::<Vec<_>>()
                .join(",")
        ),
        counter_before: before,
        counter_after: after,
        counter_delta: after - before,
        expected_counter_delta: expected_delta,
        storm_peak_connected: storm_peak,
        control_acknowledged: control_ok,
        ok: expected_answers == n as u64
            && after - before == expected_delta
            && control_ok
            && storm_peak.is_none_or(|p| p >= n as f64),
    };
    let rows = vec![
        ("attempts", report.attempts.to_string()),
        ("expected answer", report.expected_answer.clone()),
        ("answers", format!("{:?}", report.answers)),
        (
            "counter",
            format!(
                "{} +{} (expected +{})",
                report.counter, report.counter_delta, report.expected_counter_delta
            ),
        ),
        (
            "good device afterwards",
            if control_ok {
                "acknowledged"
            } else {
                "NOT acknowledged"
            }
            .to_string(),
        ),
        (
            "result",
            if report.ok { "ok" } else { "MISMATCH" }.to_string(),
        ),
    ];
    let name = |v: clap::builder::PossibleValue| v.get_name().to_string();
    report::print_table(
        &format!(
            "device-sim bad {} over {}",
            name(args.mode.to_possible_value().expect("no skipped variants")),
            name(
                args.protocol
                    .to_possible_value()
                    .expect("no skipped variants")
            )
        ),
        &rows,
    );
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    anyhow::ensure!(
        report.ok,
        "the gateway's answers or counters differ from what the bad input should cause"
    );
    Ok(())
}

/// A valid JSON reading padded with whitespace to exactly `size` bytes.
fn oversize_json(size: usize) -> Vec<u8> {
    let mut v = br#"{"temperature": 21.5"#.to_vec();
    v.resize(size - 1, b' ');
    v.push(b'}');
    v
}

/// Polls the counter until `done(value)` or the timeout; returns the last value.
async fn wait_for(
    url: &str,
    metric: &str,
    labels: &[(&str, &str)],
    timeout: Duration,
    done: impl Fn(f64) -> bool,
) -> anyhow::Result<f64> {
    let until = Instant::now() + timeout;
    loop {
        let v = counter(url, metric, labels).await?;
        if done(v) || Instant::now() >= until {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sum of a metric over the series whose labels include `labels`.
async fn counter(url: &str, metric: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    Ok(sum_metric(&http_get(url).await?, metric, labels))
}

fn sum_metric(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, rest) = match series.split_once('{') {
                Some((n, r)) => (n, r.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = name == metric
                && labels
                    .iter()
                    .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A plain HTTP/1.0 GET (the metrics endpoint is local and unencrypted).
async fn http_get(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .context("metrics URL must start with http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    let (head, body) = body.split_once("\r\n\r\n").context("no HTTP header end")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.split(' ').nth(1) == Some("200"),
        "GET {url}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_series() {
        let text = "# HELP x\ncitygw_auth_failures_total{protocol=\"mqtt\",reason=\"bad_credentials\"} 3\n\
                    citygw_auth_failures_total{protocol=\"mqtt\",reason=\"anonymous\"} 2\n\
                    citygw_connected_devices{protocol=\"mqtt\"} 7\n";
        assert_eq!(
            sum_metric(
                text,
                "citygw_auth_failures_total",
                &[("reason", "bad_credentials")]
            ),
            3.0
        );
        assert_eq!(sum_metric(text, "citygw_auth_failures_total", &[]), 5.0);
        assert_eq!(sum_metric(text, "citygw_connected_devices", &[]), 7.0);
        assert_eq!(sum_metric(text, "nothing", &[]), 0.0);
    }

    #[test]
    fn oversize_payload_is_valid_json_of_the_size() {
        let p = oversize_json(1000);
        assert_eq!(p.len(), 1000);
        assert!(serde_json::from_slice::<serde_json::Value>(&p).is_ok());
    }
}
