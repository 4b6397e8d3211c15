//! Every node's copy of the stream: an ordered consumer writes each message into the node's
//! embedded store under the ids its sequence gives.
//!
//! The consumer is JetStream's ordered kind (ephemeral, flow-controlled, recreated by the client
//! from the last sequence it saw whenever a gap or a lost heartbeat shows), started after the
//! last sequence this store committed; that sequence is written in the same commit as the
//! readings, so a restart (or kill -9) resumes exactly after what is on disk. Messages are
//! applied in batches of whatever has arrived, one commit each, so the copy keeps up with the
//! stream's rate without a commit per message. The store publishes each commit to its live feed,
//! which is how a Subscribe on node B sees a reading ingested on node A.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{ids, Cluster};
use crate::store::runs::EncodedRun;
use crate::store::{keys, Store};

/// Most messages applied in one commit.
const BATCH: usize = 4096;
/// After this long without a message the consumer is checked against the stream.
const STALL_CHECK: Duration = Duration::from_secs(2);

impl Cluster {
    /// Materialises the stream into `store` until shutdown.
    pub async fn materialise(self: Arc<Self>, store: Store, shutdown: CancellationToken) {
        let mut applied = match store.meta_u64(keys::META_STREAM_SEQ) {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the materialised stream position");
                return;
            }
        };
        tracing::info!(applied, "materialising the readings stream");
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.follow(&store, &mut applied) => r,
            };
            if let Err(e) = result {
                metrics::counter!("citygw_cluster_materialise_restarts_total").increment(1);
                tracing::warn!(error = %format!("{e:#}"), applied, "stream consumer interrupted, restarting");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Follows the stream from `applied + 1`; returns on an error the consumer did not recover.
    async fn follow(&self, store: &Store, applied: &mut u64) -> anyhow::Result<()> {
        let stream = self.js.get_stream_no_info(&self.cfg.stream).await?;
        let deliver_policy = match *applied {
            0 => DeliverPolicy::All,
            seq => DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
        };
        let consumer = stream
            .create_consumer(OrderedConfig {
                // A fresh name each time: the server may still hold the previous one (ephemeral,
                // removed after inactivity), and a name cannot change its start sequence.
                name: Some(format!(
                    "citygw-{}-{:08x}",
                    self.node,
                    rand::random::<u32>()
                )),
                deliver_policy,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let first = match tokio::time::timeout(STALL_CHECK, messages.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => anyhow::bail!("consumer ended"),
                Err(_) => {
                    // Quiet: fine if the stream has nothing new. A consumer that lost its
                    // server (its quorum went away and came back) can stay silent for good
                    // instead of failing, so compare with the stream and start a new one.
                    let last = stream.get_info().await?.state.last_sequence;
                    anyhow::ensure!(
                        last <= *applied,
                        "consumer stalled at {applied} while the stream is at {last}"
                    );
                    continue;
                }
            };
            let mut batch = vec![first?];
            while batch.len() < BATCH {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    Some(Some(Err(e))) => {
                        // Apply what arrived before the error; the consumer restarts after it.
                        self.apply(store, batch, applied).await?;
                        return Err(e.into());
                    }
                    Some(None) | None => break,
                }
            }
            self.apply(store, batch, applied).await?;
        }
    }

    async fn apply(
        &self,
        store: &Store,
        batch: Vec<async_nats::jetstream::Message>,
        applied: &mut u64,
    ) -> anyhow::Result<()> {
        let mut runs = Vec::with_capacity(batch.len());
        let mut last = *applied;
        for m in &batch {
            let seq = m
                .info()
                .map_err(|e| anyhow::anyhow!("message without stream info: {e}"))?
                .stream_sequence;
            if seq <= last {
                continue; // redelivered after a consumer restart
            }
            last = seq;
            match EncodedRun::replicated(ids::first_id(seq), &m.payload) {
                Ok(run) => runs.push((ids::first_id(seq), run)),
                Err(e) => {
                    // Not ours (someone else published on our subjects) or corrupt: skipped,
                    // counted, and the position moves past it on every node alike.
                    metrics::counter!("citygw_cluster_messages_skipped_total").increment(1);
                    tracing::error!(seq, subject = %m.subject, error = %e, "stream message is not a reading run; skipped");
                }
            }
        }
        if last == *applied {
            return Ok(());
        }
        let readings: usize = runs.iter().map(|(_, r)| r.readings.len()).sum();
        store.apply_replicated(runs, last).await?;
        metrics::counter!("citygw_cluster_materialised_messages_total").increment(last - *applied);
        metrics::counter!("citygw_cluster_materialised_readings_total").increment(readings as u64);
        metrics::gauge!("citygw_cluster_applied_sequence").set(last as f64);
        *applied = last;
        Ok(())
    }
}
