//! `device-sim bad MODE`: bad input for reliability tests. Each mode sends `--count` attempts of
//! one kind of bad input over MQTT 5, checks each got the refusal it should, and checks that the
//! gateway's Prometheus counter for that refusal moved by exactly the number of attempts. Then a
//! good device publishes once and must be acknowledged: the gateway keeps serving everyone else.
//!
//! | mode | sent | expected answer | counter |
//! |---|---|---|---|
//! | wrong-credentials | CONNECT with a wrong secret | CONNACK 0x86 | `citygw_auth_failures_total{reason="bad_credentials"}` |
//! | unknown-device | CONNECT as an unregistered id | CONNACK 0x87 | `citygw_auth_failures_total{reason="unknown_device"}` |
//! | spoofed-topic | PUBLISH on another device's topic | PUBACK 0x87 | `citygw_messages_rejected_total{reason="spoofed_topic"}` |
//! | malformed | PUBLISH of broken JSON | PUBACK 0x99 | `citygw_messages_rejected_total{reason="malformed_json"}` |
//! | oversize | PUBLISH above `mqtt.max_payload_bytes` | PUBACK 0x99 | `citygw_messages_rejected_total{reason="payload_too_large"}` |
//! | storm | `--count` CONNECTs at once, all valid | CONNACK success for each | `citygw_auth_failures_total` unchanged; `citygw_connected_devices` reaches the count |

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;
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

#[derive(Args, Debug)]
pub struct BadArgs {
    #[arg(value_enum)]
    pub mode: Mode,
    /// Credentials CSV (id, secret) of registered devices (`device-sim provision --out`).
    #[arg(long)]
    pub credentials: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub mqtt_host: String,
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    /// The gateway's Prometheus endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080/metrics")]
    pub metrics: String,
    /// Bad attempts to make (storm: simultaneous connections).
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    /// The gateway's `mqtt.max_payload_bytes` (oversize sends one byte more).
    #[arg(long, default_value_t = 262_144)]
    pub max_payload_bytes: usize,
    /// Seconds to wait for each answer and for the counters to settle.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize, Debug)]
pub struct BadReport {
    pub mode: Mode,
    pub attempts: usize,
    pub expected_answer: String,
    /// Answers received, by kind.
    pub answers: BTreeMap<String, u64>,
    pub counter: String,
    pub counter_before: f64,
    pub counter_after: f64,
    pub counter_delta: f64,
    pub expected_counter_delta: f64,
    /// storm: the most connections the gateway showed at once (`citygw_connected_devices`).
    pub storm_peak_connected: Option<f64>,
    /// A good device published after the bad input and was acknowledged.
    pub control_acknowledged: bool,
    pub ok: bool,
}

struct Expectation {
    answer: &'static str,
    metric: &'static str,
    labels: Vec<(&'static str, &'static str)>,
    /// Expected change of the counter per attempt.
    per_attempt: f64,
}

fn expectation(mode: Mode) -> Expectation {
    let auth = |reason| Expectation {
        answer: if reason == "bad_credentials" {
            "connack BadUserNamePassword"
        } else {
            "connack NotAuthorized"
        },
        metric: "citygw_auth_failures_total",
        labels: vec![("protocol", "mqtt"), ("reason", reason)],
        per_attempt: 1.0,
    };
    let rejected = |answer, reason| Expectation {
        answer,
        metric: "citygw_messages_rejected_total",
        labels: vec![("protocol", "mqtt"), ("reason", reason)],
        per_attempt: 1.0,
    };
    match mode {
        Mode::WrongCredentials => auth("bad_credentials"),
        Mode::UnknownDevice => auth("unknown_device"),
        Mode::SpoofedTopic => rejected("puback NotAuthorized", "spoofed_topic"),
        Mode::Malformed => rejected("puback PayloadFormatInvalid", "malformed_json"),
        Mode::Oversize => rejected("puback PayloadFormatInvalid", "payload_too_large"),
        Mode::Storm => Expectation {
            answer: "connack Success",
            metric: "citygw_auth_failures_total",
            labels: vec![("protocol", "mqtt")],
            per_attempt: 0.0,
        },
    }
}

pub async fn run(args: BadArgs) -> anyhow::Result<()> {
    let creds = credentials::load(&args.credentials)?;
    let spoof = matches!(args.mode, Mode::SpoofedTopic);
    // The control device and (spoof) a victim are set apart from the attackers.
    let reserved = if spoof { 2 } else { 1 };
    anyhow::ensure!(
        creds.len() > reserved,
        "{} has too few devices",
        args.credentials.display()
    );
    let control = creds[0].clone();
    let victim = creds[1].clone();
    let pool: Vec<Credential> = creds[reserved..].to_vec();
    let n = args.count;
    let exp = expectation(args.mode);
    let timeout = Duration::from_secs(args.timeout);
    let target = Target {
        host: args.mqtt_host.clone(),
        port: args.mqtt_port,
        timeout,
    };

    let before = counter(&args.metrics, exp.metric, &exp.labels).await?;
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut storm_peak = None;
    let attacker = |i: usize| pool[i % pool.len()].clone();
    match args.mode {
        Mode::WrongCredentials | Mode::UnknownDevice => {
            for i in 0..n {
                let mut c = attacker(i);
                if args.mode == Mode::UnknownDevice {
                    c.id = format!("no-such-device-{i}");
                } else {
                    c.secret = format!("wrong-{}", c.secret.len() + i);
                }
                let answer = match target.connect(&c).await {
                    Ok((client, mut el)) => {
                        crate::mqtt::disconnect_v5(&client, &mut el).await;
                        "connack Success".to_string()
                    }
                    Err(a) => a,
                };
                *answers.entry(answer).or_default() += 1;
            }
        }
        Mode::SpoofedTopic | Mode::Malformed | Mode::Oversize => {
            for i in 0..n {
                let c = attacker(i);
                let (topic, payload) = match args.mode {
                    Mode::SpoofedTopic => (
                        format!("devices/{}/telemetry", victim.id),
                        br#"{"temperature": 99}"#.to_vec(),
                    ),
                    Mode::Malformed => (
                        format!("devices/{}/telemetry/json", c.id),
                        br#"{"temperature": 21.5, "humidity":"#.to_vec(),
                    ),
                    _ => (
                        format!("devices/{}/telemetry/json", c.id),
                        oversize_json(args.max_payload_bytes + 1),
                    ),
                };
                let answer = match target.connect(&c).await {
                    Ok((client, mut el)) => {
                        let a = publish_answer(&client, &mut el, &topic, payload, timeout).await;
                        crate::mqtt::disconnect_v5(&client, &mut el).await;
                        a
                    }
                    Err(a) => format!("attacker could not connect: {a}"),
                };
                *answers.entry(answer).or_default() += 1;
            }
        }
        Mode::Storm => {
            anyhow::ensure!(
                pool.len() >= n,
                "storm needs {n} distinct devices, {} has {}",
                args.credentials.display(),
                pool.len()
            );
            let barrier = Arc::new(Barrier::new(n + 1));
            let release = Arc::new(Barrier::new(n + 1));
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let (c, target) = (attacker(i), target.clone());
                    let (barrier, release) = (barrier.clone(), release.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        let r = target.connect(&c).await;
                        // Hold the connection until every storm connection has been answered.
                        release.wait().await;
                        match r {
                            Ok((client, mut el)) => {
                                crate::mqtt::disconnect_v5(&client, &mut el).await;
                                "connack Success".to_string()
                            }
                            Err(a) => a,
                        }
                    })
                })
                .collect();
            barrier.wait().await;
            let started = Instant::now();
            // All answered when the gateway shows them connected at once (or the wait ends).
            let peak = wait_for(
                &args.metrics,
                "citygw_connected_devices",
                &[],
                timeout,
                |v| v >= n as f64,
            )
            .await?;
            release.wait().await;
            for t in tasks {
                *answers.entry(t.await?).or_default() += 1;
            }
            eprintln!(
                "storm: the gateway showed {peak} connections {:.1} s after the storm started",
                started.elapsed().as_secs_f64()
            );
            storm_peak = Some(peak);
        }
    }
    let expected_delta = exp.per_attempt * n as f64;
    let after = wait_for(&args.metrics, exp.metric, &exp.labels, timeout, |v| {
        v - before >= expected_delta
    })
    .await?;
    let control_ok = match target.connect(&control).await {
        Ok((client, mut el)) => {
            let a = publish_answer(
                &client,
                &mut el,
                &format!("devices/{}/telemetry/json", control.id),
                br#"{"temperature": 21.5}"#.to_vec(),
                timeout,
            )
            .await;
            crate::mqtt::disconnect_v5(&client, &mut el).await;
            a == "puback Success"
        }
        Err(_) => false,
    };
    let expected_answers = answers.get(exp.answer).copied().unwrap_or(0);
    let report = BadReport {
        mode: args.mode,
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
    report::print_table(
        &format!(
            "device-sim bad {}",
            args.mode
                .to_possible_value()
                .expect("no skipped variants")
                .get_name()
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

#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    timeout: Duration,
}

impl Target {
    /// Connects as `c`; an error is the answer's name (e.g. "connack BadUserNamePassword").
    async fn connect(&self, c: &Credential) -> Result<(AsyncClient, EventLoop), String> {
        let mut opts = MqttOptions::new(c.id.clone(), self.host.as_str(), self.port);
        opts.set_credentials(c.id.clone(), c.secret.clone())
            .set_keep_alive(Duration::from_secs(60))
            .set_connection_timeout(self.timeout.as_secs().max(1))
            .set_max_packet_size(Some(32 << 20))
            .set_outgoing_inflight_upper_limit(4);
        let (client, mut el) = AsyncClient::new(opts, 4);
        match tokio::time::timeout(self.timeout, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) if a.code == ConnectReturnCode::Success => {
                Ok((client, el))
            }
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => Err(format!("connack {:?}", a.code)),
            Ok(Err(ConnectionError::ConnectionRefused(code))) => Err(format!("connack {code:?}")),
            Ok(Err(e)) => Err(format!("connect error: {e}")),
            Ok(Ok(other)) => Err(format!("unexpected {other:?}")),
            Err(_) => Err("connect timeout".into()),
        }
    }
}

/// Publishes at QoS 1 and names the answer ("puback Success", "puback NotAuthorized", ...).
async fn publish_answer(
    client: &AsyncClient,
    el: &mut EventLoop,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> String {
    if let Err(e) = client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
    {
        return format!("publish not queued: {e}");
    }
    let answer = tokio::time::timeout(timeout, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    return format!("puback {:?}", ack.reason)
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    return format!("disconnect {:?}", d.reason_code)
                }
                Ok(_) => {}
                Err(e) => return format!("connection lost: {e}"),
            }
        }
    })
    .await;
    answer.unwrap_or_else(|_| "no answer".into())
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
