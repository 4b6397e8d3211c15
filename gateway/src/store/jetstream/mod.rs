//! The store's JetStream backend: cluster mode, several citygw nodes acting as one.
//!
//! Not a second pipeline: sources and the pipeline call [`Store::append`] and
//! [`Store::put_records`] exactly as in single-node mode, and the store sends them here instead of
//! to its own writer (docs/decisions/0017-cluster-on-jetstream.md).
//!
//! - **Readings** go to one replicated stream (file storage, R3): one NATS message per run of a
//!   device message, published pipelined (async-nats returns an ack future, thousands in flight on
//!   one connection). `append` resolves when JetStream acknowledged the message (stored on a
//!   quorum), and only then does the source acknowledge the device. Reading ids come from the
//!   stream sequence (`seq << 8 | k`, see [`ids`]), so an id means the same on every node.
//! - **Every node materialises** the stream into its own embedded store ([`materialise`]): the
//!   same log, per-device index and ids everywhere, so Subscribe, QueryHistory, the KPI and the
//!   admin read-back work on any node from local data.
//! - **Records** (devices, agencies, sink cursors, KPI snapshots) live in a replicated key-value
//!   bucket; every node watches it and applies changes to its store and, through
//!   [`Store::record_changes`], to the in-memory registry ([`records`]).
//! - **Leases** in a second bucket whose entries expire: node heartbeats for `citygw cluster
//!   status`, and one forwarder per sink across the cluster ([`lease`]).
//! - **Health** ([`status`]): without a stream leader (no quorum) `/readyz` is 503; writes time
//!   out, so devices get no success ack; when quorum returns everything resumes by itself. A
//!   stream at its size cap (`cluster.stream_max_bytes`) refuses writes and is not ready either.

pub mod config;
pub mod ids;
pub mod lease;
mod materialise;
mod publish;
pub mod records;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream};
use tokio_util::sync::CancellationToken;

use crate::store::Store;

pub use config::{Backend, ClusterConfig};

/// A connected node of the cluster: the client, the stream, the buckets.
pub struct Cluster {
    node: String,
    cfg: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    records: kv::Store,
    leases: kv::Store,
    /// Highest records-bucket revision this node applied (read-your-writes for `put_records`).
    records_applied: tokio::sync::watch::Sender<u64>,
    /// Whether the stream has a leader and this node reaches it; why not, when not.
    healthy: AtomicBool,
    problem: Mutex<String>,
}

/// How long start-up keeps trying to reach NATS and set up the stream (a cluster that is
/// still electing its leaders needs a few seconds).
const SETUP_DEADLINE: Duration = Duration::from_secs(60);

impl Cluster {
    /// Connects, and creates the stream and buckets if this is the first node.
    pub async fn connect(cfg: &ClusterConfig, retention: Duration) -> anyhow::Result<Arc<Cluster>> {
        let node = cfg.node();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("citygw-{node}"))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    other => tracing::info!(event = %other, "nats"),
                }
            });
        if !cfg.user.is_empty() {
            options = options.user_and_password(cfg.user.clone(), cfg.password.clone());
        }
        if !cfg.token.is_empty() {
            options = options.token(cfg.token.clone());
        }
        if let Some(creds) = &cfg.creds_file {
            options = options
                .credentials_file(creds)
                .await
                .with_context(|| format!("cluster.creds_file {}", creds.display()))?;
        }
        if let Some(ca) = &cfg.tls_ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let urls = cfg.nats_urls.join(",");
        let addrs = cfg
            .nats_urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("cluster.nats_urls {urls}"))?;
        let client = tokio::time::timeout(SETUP_DEADLINE, options.connect(addrs))
            .await
            .map_err(|_| anyhow::anyhow!("no NATS server reachable at {urls} within 60 s"))?
            .with_context(|| format!("connecting to NATS at {urls}"))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.ack_timeout())
            .max_ack_inflight(65_536)
            .build(client.clone());

        let max_age = match cfg.stream_max_age_days {
            0 => retention,
            days => Duration::from_secs(days * 86_400),
        };
        let stream_config = stream::Config {
            name: cfg.stream.clone(),
            description: Some("citygw readings: one message per device message run".into()),
            subjects: vec![format!("{}.>", cfg.subject_prefix)],
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            retention: stream::RetentionPolicy::Limits,
            // A capped stream refuses at its cap: discarding old messages would delete
            // acknowledged readings that a lagging node has not materialised yet.
            discard: match cfg.stream_max_bytes {
                0 => stream::DiscardPolicy::Old,
                _ => stream::DiscardPolicy::New,
            },
            max_bytes: match cfg.stream_max_bytes {
                0 => -1,
                cap => i64::try_from(cap).unwrap_or(i64::MAX),
            },
            max_age,
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        };
        let records_config = kv::Config {
            bucket: cfg.records_bucket.clone(),
            description: "citygw devices, agencies, sink cursors, KPI snapshots".into(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            ..Default::default()
        };
        let leases_config = kv::Config {
            bucket: cfg.leases_bucket.clone(),
            description: "citygw node heartbeats and sink leases".into(),
            history: 1,
            max_age: cfg.lease(),
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            ..Default::default()
        };
        let started = Instant::now();
        let (records, leases) = loop {
            let setup = async {
                ensure_stream(&js, stream_config.clone()).await?;
                let records = ensure_bucket(&js, records_config.clone()).await?;
                let leases = ensure_bucket(&js, leases_config.clone()).await?;
                anyhow::Ok((records, leases))
            };
            match setup.await {
                Ok(buckets) => break buckets,
                Err(e) if started.elapsed() < SETUP_DEADLINE => {
                    tracing::warn!(error = %format!("{e:#}"), "jetstream not ready, retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.context("setting up the jetstream stream and buckets")),
            }
        };
        tracing::info!(%node, stream = %cfg.stream, replicas = cfg.replicas, "cluster backend connected");
        Ok(Arc::new(Cluster {
            node,
            cfg: cfg.clone(),
            client,
            js,
            records,
            leases,
            records_applied: tokio::sync::watch::channel(0).0,
            healthy: AtomicBool::new(true),
            problem: Mutex::new(String::new()),
        }))
    }

    /// Attaches this cluster to the node's store and starts following the cluster: records
    /// first (start-up waits until the registry is current), then the readings stream and
    /// the health monitor. The store must be empty or a copy made in cluster mode.
    pub async fn start(
        self: &Arc<Self>,
        store: &Store,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            store.last_reading_id() == 0
                || store.meta_u64(crate::store::keys::META_STREAM_SEQ)? > 0,
            "the data directory holds readings stored in single-node mode; cluster mode starts \
             from an empty data directory (see the Cluster chapter: moving to a cluster)"
        );
        store.attach_cluster(self.clone());
        tokio::spawn(self.clone().follow_records(store.clone(), shutdown.clone()));
        self.catch_up_records().await?;
        tokio::spawn(self.clone().materialise(store.clone(), shutdown.clone()));
        tokio::spawn(self.clone().monitor(store.clone(), shutdown.clone()));
        Ok(())
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// Whether writes can currently succeed (a stream leader is reachable); the reason if not.
    pub fn health(&self) -> Result<(), String> {
        if self.healthy.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self.problem.lock().expect("problem lock").clone())
        }
    }

    fn set_health(&self, result: Result<(), String>) {
        let ok = result.is_ok();
        let was = self.healthy.swap(ok, Ordering::AcqRel);
        metrics::gauge!("citygw_cluster_healthy").set(if ok { 1.0 } else { 0.0 });
        match result {
            Ok(()) if !was => tracing::info!("jetstream healthy again: writes resume"),
            Ok(()) => {}
            Err(problem) => {
                if was {
                    tracing::error!(%problem, "jetstream unavailable: devices get no success ack");
                }
                *self.problem.lock().expect("problem lock") = problem;
            }
        }
    }
}

async fn ensure_stream(js: &jetstream::Context, config: stream::Config) -> anyhow::Result<()> {
    match js.get_stream(&config.name).await {
        Ok(mut existing) => {
            let info = existing.info().await?;
            if info.config.num_replicas != config.num_replicas
                || info.config.max_age != config.max_age
                || info.config.duplicate_window != config.duplicate_window
                || info.config.max_bytes != config.max_bytes
                || info.config.discard != config.discard
            {
                js.update_stream(config).await?;
                tracing::info!("stream settings updated");
            }
            Ok(())
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref je)
                if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            js.create_stream(config).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn ensure_bucket(js: &jetstream::Context, config: kv::Config) -> anyhow::Result<kv::Store> {
    match js.get_key_value(&config.bucket).await {
        Ok(kv) => Ok(kv),
        // Not there yet (or not reachable: then creating fails too, and start-up retries).
        Err(_) => Ok(js.create_key_value(config).await?),
    }
}

/// Turns a device id, agency name or record key into one subject token / key-value key:
/// letters, digits, `-` and `_` stay; every other byte becomes `=XX`. Injective, since `=` is
/// always escaped.
pub fn escape_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// The inverse of [`escape_token`]; None for malformed input.
pub fn unescape_token(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_escape_separators_and_round_trip() {
        for s in ["aq-1", "HN.aq:01", "sink/vm", "01/2026-12-04", "a=b", "ä.b"] {
            let t = escape_token(s);
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=')),
                "{t}"
            );
            assert_eq!(unescape_token(&t).as_deref(), Some(s));
        }
        assert_eq!(escape_token("HN.aq:01"), "HN=2Eaq=3A01");
        assert_ne!(escape_token("a.b"), escape_token("a=2Eb"));
        assert_eq!(unescape_token("=G0"), None);
    }
}
