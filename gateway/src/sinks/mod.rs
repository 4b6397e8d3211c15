//! Ways out to other systems: forwarders that follow the store's log with a durable cursor, so a
//! sink that is down for hours loses nothing and a slow sink never holds back ingestion or
//! another sink.

pub mod config;
pub mod forwarder;
pub mod influx;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pipeline::{now_ms, Pipeline};
use crate::proto::{Reading, SinkState};
use crate::store::{Store, StoreError};
use config::{SinkConfig, SinkKind};
use forwarder::{Forwarder, Progress};

/// How a sink answered one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Accepted: the cursor may advance.
    Ok,
    /// Not now (network, 429, 5xx): try the same batch again later.
    Retry {
        status: Option<u16>,
        retry_after: Option<Duration>,
        message: String,
    },
    /// The data itself was refused (4xx): isolate the bad readings, deliver the rest.
    Rejected { status: u16, message: String },
}

/// One seam per destination: something that takes batches of readings, in id order.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Stable name: the cursor's key, the metrics label.
    fn name(&self) -> &str;
    async fn write(&self, batch: &[Reading]) -> WriteOutcome;
}

/// The configured sinks and their progress: started with the gateway, asked for status, and
/// consulted by retention (nothing a sink has not delivered is deleted).
#[derive(Clone, Default)]
pub struct Sinks {
    entries: Arc<Vec<(SinkConfig, Arc<Progress>)>>,
}

impl Sinks {
    /// Builds every sink and spawns its forwarder from its persisted cursor.
    pub fn start(
        configs: &[SinkConfig],
        pipeline: &Pipeline,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Sinks> {
        let store = pipeline.store();
        let mut entries = Vec::new();
        for cfg in configs {
            cfg.validate()?;
            anyhow::ensure!(
                !entries
                    .iter()
                    .any(|(c, _): &(SinkConfig, _)| c.name == cfg.name),
                "sink {:?} is configured twice",
                cfg.name
            );
            let sink: Arc<dyn Sink> = Arc::new(influx::InfluxSink::new(cfg)?);
            let progress = Arc::new(Progress::default());
            progress
                .cursor
                .store(forwarder::load_cursor(store, &cfg.name)?, Ordering::Release);
            // Cluster mode: one node forwards each sink, the holder of its lease.
            let lease = store
                .cluster()
                .map(|c| c.lease(&format!("sink/{}", cfg.name), shutdown.clone()));
            let forwarder = Forwarder {
                sink,
                store: store.clone(),
                pipeline: pipeline.clone(),
                options: cfg.forwarder_options(),
                progress: progress.clone(),
                lease,
            };
            tokio::spawn(forwarder.run(shutdown.clone()));
            tracing::info!(sink = %cfg.name, url = %cfg.url, cursor = progress.cursor.load(Ordering::Acquire), "forwarding");
            entries.push((cfg.clone(), progress));
        }
        Ok(Sinks {
            entries: Arc::new(entries),
        })
    }

    /// The id up to which every sink has delivered (`u64::MAX` without sinks).
    pub fn forwarded_up_to(&self) -> u64 {
        self.entries
            .iter()
            .map(|(_, p)| p.cursor.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Per sink: cursor, lag in readings and in seconds (age of the oldest undelivered reading).
    pub fn status(&self, store: &Store) -> Result<Vec<SinkState>, StoreError> {
        let last = store.last_reading_id();
        self.entries
            .iter()
            .map(|(cfg, p)| {
                let cursor = p.cursor.load(Ordering::Acquire);
                let lag_seconds = match store.readings_after(cursor, 1)?.first() {
                    Some(oldest) if cursor < last => {
                        (now_ms() - oldest.received_time_ms).max(0) as f64 / 1000.0
                    }
                    _ => 0.0,
                };
                Ok(SinkState {
                    name: cfg.name.clone(),
                    kind: match cfg.kind {
                        SinkKind::Influx2 => "influx2".into(),
                        SinkKind::Influx1 => "influx1".into(),
                    },
                    cursor,
                    last_reading_id: last,
                    lag_readings: match store.cluster() {
                        // Cluster ids have gaps (see store::jetstream::ids): count instead.
                        Some(_) => store.count_readings_after(cursor)?,
                        None => last.saturating_sub(cursor),
                    },
                    lag_seconds,
                    last_success_ms: p.last_success_ms.load(Ordering::Acquire),
                })
            })
            .collect()
    }

    /// Exports the lag of every sink as gauges.
    pub fn export_metrics(&self, store: &Store) {
        match self.status(store) {
            Ok(states) => {
                for s in states {
                    metrics::gauge!("citygw_sink_lag_readings", "sink" => s.name.clone())
                        .set(s.lag_readings as f64);
                    metrics::gauge!("citygw_sink_lag_seconds", "sink" => s.name.clone())
                        .set(s.lag_seconds);
                    metrics::gauge!("citygw_sink_last_success_timestamp_seconds", "sink" => s.name)
                        .set(s.last_success_ms as f64 / 1000.0);
                }
            }
            Err(e) => tracing::warn!(error = %e, "sink status unavailable"),
        }
    }
}
