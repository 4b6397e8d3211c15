//! Sink configuration: `[[sinks]]` entries of the config file.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::influx::line_protocol::MeasurementFrom;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    #[default]
    /// InfluxDB 2 `/api/v2/write` (and stores that speak it: VictoriaMetrics, InfluxDB 3).
    Influx2,
    /// InfluxDB 1.x `/write`.
    Influx1,
}

/// One forwarding destination. Secrets (token, password) come inline (development), from an
/// environment variable or from a file, and are never logged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Names the sink: its durable cursor, metrics label `sink`, `citygw sink status` (a-z 0-9 - _).
    pub name: String,
    /// The write API: `influx2` (`/api/v2/write`: InfluxDB 2, VictoriaMetrics, InfluxDB 3) or
    /// `influx1` (`/write`).
    pub kind: SinkKind,
    /// Base URL of the store, plain http (e.g. `http://influx.city.internal:8086`).
    pub url: String,
    /// influx2: the organisation.
    #[serde(default)]
    pub org: String,
    /// influx2: the bucket.
    #[serde(default)]
    pub bucket: String,
    /// influx2: the API token inline (development only; prefer `token_env` or `token_file`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// influx2: the environment variable holding the API token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// influx2: a file holding the API token (e.g. a mounted secret).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// influx1: the database.
    #[serde(default)]
    pub db: String,
    /// influx1: the retention policy ("": the database's default).
    #[serde(default)]
    pub retention_policy: String,
    /// influx1: basic-auth user ("": no authentication).
    #[serde(default)]
    pub username: String,
    /// influx1: basic-auth password inline (development only; prefer `password_env`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    /// influx1: the environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// What names a point's measurement: `quantity` (the field is `value`) or `kind` (the device
    /// kind; the quantity is the field key).
    #[serde(default = "default_measurement")]
    pub measurement: MeasurementFrom,
    /// Gzip the request bodies.
    #[serde(default = "yes")]
    pub gzip: bool,
    /// Most readings in one write.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// How long a partial batch waits for more readings before it is written.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// First retry delay after a failed write; doubled (with jitter) up to `backoff_max_ms`.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Longest retry delay: a store that comes back is written to within this.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Seconds one write may take before it counts as failed (and is retried).
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_measurement() -> MeasurementFrom {
    MeasurementFrom::Quantity
}
fn yes() -> bool {
    true
}
fn default_batch_max() -> usize {
    5000
}
fn default_linger_ms() -> u64 {
    200
}
fn default_backoff_min_ms() -> u64 {
    100
}
/// A store that comes back is found within this (one small write attempt per interval): a
/// 30 s cap made most of a backlog's drain time waiting (bench/sink_forwarding).
fn default_backoff_max_ms() -> u64 {
    5_000
}
fn default_timeout_secs() -> u64 {
    10
}

impl SinkConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        let n = &self.name;
        anyhow::ensure!(
            crate::config::is_slug(n),
            "sink name {n:?}: 1-64 characters of a-z 0-9 - _"
        );
        anyhow::ensure!(
            self.url.starts_with("http://") || self.url.starts_with("https://"),
            "sink {n}: url must be http(s)://"
        );
        match self.kind {
            SinkKind::Influx2 => anyhow::ensure!(
                !self.org.is_empty() && !self.bucket.is_empty(),
                "sink {n}: influx2 needs org and bucket"
            ),
            SinkKind::Influx1 => anyhow::ensure!(!self.db.is_empty(), "sink {n}: influx1 needs db"),
        }
        anyhow::ensure!(self.batch_max > 0, "sink {n}: batch_max must be positive");
        Ok(())
    }

    /// The token (influx2) or password (influx1), from wherever it is configured.
    pub fn secret(
        &self,
        inline: &str,
        env: &Option<String>,
        file: &Option<PathBuf>,
    ) -> anyhow::Result<String> {
        if let Some(var) = env {
            return std::env::var(var).map_err(|_| {
                anyhow::anyhow!("sink {}: environment variable {var} is not set", self.name)
            });
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("sink {}: {}: {e}", self.name, path.display()))?;
            return Ok(text.trim().to_string());
        }
        Ok(inline.to_string())
    }

    pub fn forwarder_options(&self) -> super::forwarder::ForwarderOptions {
        super::forwarder::ForwarderOptions {
            batch_max: self.batch_max,
            linger: Duration::from_millis(self.linger_ms),
            backoff_min: Duration::from_millis(self.backoff_min_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms.max(self.backoff_min_ms)),
        }
    }
}
