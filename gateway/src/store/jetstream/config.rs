//! `[cluster]`: which store backend runs, and how the JetStream one reaches its servers.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// One node, its own fjall store (the default: `citygw run` needs nothing else).
    #[default]
    Embedded,
    /// Several nodes sharing a NATS JetStream cluster: readings in one replicated stream,
    /// registry in replicated key-value buckets, each node a materialised copy.
    Jetstream,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `embedded`: one node with its own store (the default); `jetstream`: cluster mode on NATS
    /// JetStream.
    pub backend: Backend,
    /// NATS servers to connect to (any of them; the client learns the rest of the cluster).
    pub nats_urls: Vec<String>,
    /// This node's name in `citygw cluster status` and in leases; empty: the host name.
    pub node_name: String,
    /// Copies JetStream keeps of the stream and the buckets (1, 3 or 5; 3 survives one server).
    pub replicas: usize,
    /// NATS user (with `password`; or a token, or a creds file).
    pub user: String,
    /// NATS password (`citygw config print` hides it).
    pub password: String,
    /// NATS token (`citygw config print` hides it).
    pub token: String,
    /// A NATS `.creds` file (JWT + nkey seed) for decentralised auth.
    pub creds_file: Option<PathBuf>,
    /// CA that signed the NATS servers' certificates; set it to require TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// The readings stream.
    pub stream: String,
    /// Subjects of the readings stream: `{subject_prefix}.{device id, escaped}`.
    pub subject_prefix: String,
    /// Devices, agencies, sink cursors and KPI snapshots (no expiry).
    pub records_bucket: String,
    /// Node heartbeats and sink leases (entries expire after `lease_secs`).
    pub leases_bucket: String,
    /// How long a write waits for JetStream's acknowledgement (quorum) before the device is
    /// told to retry (MQTT 5 PUBACK 0x80, a 3.1.1 disconnect, CoAP 5.03).
    pub ack_timeout_ms: u64,
    /// JetStream keeps `Nats-Msg-Id`s this long: a retry carrying the same content id (a
    /// LoRaWAN DevEUI + FCnt, a CoAP endpoint + message id) within it is stored once.
    pub duplicate_window_secs: u64,
    /// How long the stream keeps readings; 0: `store.retention_days`. A node that was down
    /// longer than this cannot catch up from the stream.
    pub stream_max_age_days: u64,
    /// Caps the readings stream's size (bytes per replica); 0: no cap but the servers' own
    /// (`max_file_store`, the disk). At the cap JetStream refuses new readings (discard new)
    /// rather than deleting old ones a lagging node has not read yet, and keeps the rest of the
    /// servers' JetStream storage for the records bucket (devices, sink cursors) and the leases.
    pub stream_max_bytes: u64,
    /// A node or sink lease not renewed for this long expires; another node takes the sink.
    pub lease_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            node_name: String::new(),
            replicas: 3,
            user: String::new(),
            password: String::new(),
            token: String::new(),
            creds_file: None,
            tls_ca_file: None,
            stream: "CITYGW_READINGS".into(),
            subject_prefix: "citygw.readings".into(),
            records_bucket: "citygw_records".into(), // not a metric
            leases_bucket: "citygw_leases".into(),   // not a metric
            ack_timeout_ms: 5_000,
            duplicate_window_secs: 600,
            stream_max_age_days: 0,
            stream_max_bytes: 0,
            lease_secs: 10,
        }
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        self.backend == Backend::Jetstream
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        anyhow::ensure!(
            !self.nats_urls.is_empty(),
            "cluster.nats_urls: at least one NATS server"
        );
        anyhow::ensure!(
            matches!(self.replicas, 1..=5),
            "cluster.replicas must be 1 to 5 (JetStream's limit), not {}",
            self.replicas
        );
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        };
        for (key, value) in [
            ("stream", &self.stream),
            ("records_bucket", &self.records_bucket),
            ("leases_bucket", &self.leases_bucket),
        ] {
            anyhow::ensure!(
                name_ok(value),
                "cluster.{key} {value:?}: letters, digits, - and _"
            );
        }
        anyhow::ensure!(
            !self.subject_prefix.is_empty()
                && self
                    .subject_prefix
                    .split('.')
                    .all(|t| !t.is_empty() && !t.contains(['*', '>', ' '])),
            "cluster.subject_prefix {:?}: dot-separated tokens without wildcards",
            self.subject_prefix
        );
        anyhow::ensure!(
            self.node_name.is_empty() || name_ok(&self.node_name),
            "cluster.node_name {:?}: letters, digits, - and _",
            self.node_name
        );
        anyhow::ensure!(
            self.ack_timeout_ms > 0 && self.lease_secs >= 2,
            "cluster.ack_timeout_ms must be positive and cluster.lease_secs at least 2"
        );
        Ok(())
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }

    /// The node name: configured, else the host name (made safe for keys).
    pub fn node(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "citygw".into());
        host.trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// Secrets replaced for `citygw config print`.
    pub fn redact(&mut self) {
        for s in [&mut self.password, &mut self.token] {
            if !s.is_empty() {
                *s = "<redacted>".into();
            }
        }
    }
}
