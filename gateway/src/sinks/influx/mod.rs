//! The InfluxDB sink: readings as line protocol over HTTP, to InfluxDB 2 (`/api/v2/write`) or to
//! any store that speaks its write API (VictoriaMetrics, InfluxDB 3), or to InfluxDB 1.x
//! (`/write`).
//!
//! - [`line_protocol`]: the documented mapping of a reading to one line (measurement, tags,
//!   typed field, nanosecond timestamp) and its escaping;
//! - [`client`]: the HTTP writer (authentication, gzip, timeouts) and the classification of the
//!   store's answer into ok / retry later / data rejected;
//! - [`InfluxSink`]: both behind the [`Sink`] seam, built from a `[[sinks]]` entry.

pub mod client;
pub mod line_protocol;

use std::time::Duration;

pub use client::{Api, InfluxClient};
pub use line_protocol::{write_line, MeasurementFrom, Unrepresentable, COUNT_QUANTITIES};

use super::config::{SinkConfig, SinkKind};
use super::{Sink, WriteOutcome};
use crate::proto::Reading;

/// Status reported for a batch refused before sending because a reading in it cannot be written
/// as line protocol (no HTTP status exists for it): the forwarder isolates and dead-letters it.
pub const UNREPRESENTABLE_STATUS: u16 = 0;

/// One InfluxDB (or compatible) destination.
#[derive(Debug)]
pub struct InfluxSink {
    name: String,
    client: InfluxClient,
    measurement: MeasurementFrom,
}

impl InfluxSink {
    /// Builds the sink from its configuration, reading the token or password from wherever it is
    /// configured (inline, environment, file).
    pub fn new(cfg: &SinkConfig) -> anyhow::Result<Self> {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let api = match cfg.kind {
            SinkKind::Influx2 => Api::V2 {
                org: cfg.org.clone(),
                bucket: cfg.bucket.clone(),
                token: cfg.secret(&cfg.token, &cfg.token_env, &cfg.token_file)?,
            },
            SinkKind::Influx1 => Api::V1 {
                db: cfg.db.clone(),
                retention_policy: non_empty(&cfg.retention_policy),
                username: non_empty(&cfg.username),
                password: non_empty(&cfg.secret(&cfg.password, &cfg.password_env, &None)?),
            },
        };
        let client = InfluxClient::new(
            &cfg.url,
            api,
            cfg.gzip,
            Duration::from_secs(cfg.timeout_secs.max(1)),
        )
        .map_err(|e| anyhow::anyhow!("sink {}: {e:#}", cfg.name))?;
        Ok(Self {
            name: cfg.name.clone(),
            client,
            measurement: cfg.measurement,
        })
    }
}

/// The batch as line protocol, or the first reading that cannot be written and why.
pub fn encode_batch(
    batch: &[Reading],
    measurement: MeasurementFrom,
) -> Result<String, (u64, Unrepresentable)> {
    let mut body = String::with_capacity(batch.len() * 192);
    for r in batch {
        write_line(&mut body, r, measurement).map_err(|e| (r.id, e))?;
    }
    Ok(body)
}

#[async_trait::async_trait]
impl Sink for InfluxSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write(&self, batch: &[Reading]) -> WriteOutcome {
        if batch.is_empty() {
            return WriteOutcome::Ok;
        }
        match encode_batch(batch, self.measurement) {
            Ok(body) => self.client.write(&body).await,
            // Nothing is sent: the forwarder splits the batch until this reading is alone and
            // dead-letters it with the reason; the rest is delivered.
            Err((id, reason)) => WriteOutcome::Rejected {
                status: UNREPRESENTABLE_STATUS,
                message: format!("reading {id} cannot be written as line protocol: {reason}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reading;

    fn r(id: u64, value: Option<reading::Value>) -> Reading {
        Reading {
            id,
            device_id: "d1".into(),
            tenant: "t".into(),
            quantity: "temperature".into(),
            value,
            kind: "weather".into(),
            device_time_ms: 1_000,
            ..Default::default()
        }
    }

    #[test]
    fn batch_encodes_all_lines_or_names_the_bad_reading() {
        let good = [
            r(1, Some(reading::Value::Number(1.5))),
            r(2, Some(reading::Value::Boolean(true))),
        ];
        let body = encode_batch(&good, MeasurementFrom::Quantity).unwrap();
        assert_eq!(body.lines().count(), 2);
        let bad = [
            good[0].clone(),
            r(9, None),
            r(10, Some(reading::Value::Number(f64::NAN))),
        ];
        assert_eq!(
            encode_batch(&bad, MeasurementFrom::Quantity),
            Err((9, Unrepresentable::NoValue))
        );
    }

    #[tokio::test]
    async fn unrepresentable_reading_is_rejected_without_sending() {
        // Nothing listens on port 9 of the loopback; a send would be a Retry, not a Rejected.
        let sink = InfluxSink {
            name: "test".into(),
            client: InfluxClient::new(
                "http://127.0.0.1:9",
                Api::V1 {
                    db: "x".into(),
                    retention_policy: None,
                    username: None,
                    password: None,
                },
                false,
                Duration::from_secs(1),
            )
            .unwrap(),
            measurement: MeasurementFrom::Quantity,
        };
        assert_eq!(sink.write(&[]).await, WriteOutcome::Ok);
        match sink.write(&[r(5, None)]).await {
            WriteOutcome::Rejected { status, message } => {
                assert_eq!(status, UNREPRESENTABLE_STATUS);
                assert!(
                    message.contains("reading 5") && message.contains("no value"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
