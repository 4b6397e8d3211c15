//! Health and the cluster's picture: is there a stream leader with a quorum behind it, which
//! citygw nodes are alive, how far each has materialised the stream, who forwards each sink.
//!
//! [`Cluster::monitor`] asks JetStream for the stream's state every second. Without a leader, or
//! with fewer current replicas than a quorum, the node is unhealthy: `/readyz` answers 503 with
//! the reason (writes fail on their own, by timeout, so no device gets a success ack); so is a
//! stream at its size cap (`cluster.stream_max_bytes`), which refuses writes. It also
//! writes this node's heartbeat into the leases bucket, which `citygw cluster status` lists.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{escape_token, unescape_token, Cluster};
use crate::pipeline::now_ms;
use crate::proto::{ClusterNode, ClusterStatusResponse, SinkLease, StreamReplica};
use crate::store::{keys, Store};

const CHECK_EVERY: Duration = Duration::from_secs(1);
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Room a capped stream must have left to count as ready: 1 % of the cap, at most 1 MiB (a few
/// hundred device messages; JetStream itself refuses only the message that would not fit).
fn headroom(cap: u64) -> u64 {
    (cap / 100).min(1 << 20)
}

/// Why a stream takes no more readings: it refuses at its caps (discard new) and has less than
/// [`headroom`] bytes left, or no message left. `None` when it has room or has no caps.
fn full(config: &stream::Config, state: &stream::State) -> Option<String> {
    if config.discard != stream::DiscardPolicy::New {
        return None;
    }
    if let Ok(cap) = u64::try_from(config.max_bytes) {
        if state.bytes + headroom(cap) >= cap {
            return Some(format!(
                "stream {} is full: {} of its {} bytes (cluster.stream_max_bytes); new readings are refused",
                config.name, state.bytes, cap
            ));
        }
    }
    if let Ok(cap) = u64::try_from(config.max_messages) {
        if state.messages >= cap {
            return Some(format!(
                "stream {} is full: {} of its {} messages; new readings are refused",
                config.name, state.messages, cap
            ));
        }
    }
    None
}

/// A node's heartbeat, as kept in the leases bucket.
#[derive(Debug, Serialize, Deserialize)]
struct Beat {
    version: String,
    started_ms: i64,
    seen_ms: i64,
    applied_sequence: u64,
    healthy: bool,
    #[serde(default)]
    problem: String,
}

impl Cluster {
    /// Checks health every second and keeps this node's heartbeat fresh, until shutdown.
    pub async fn monitor(self: Arc<Self>, store: Store, shutdown: CancellationToken) {
        let started_ms = now_ms();
        let beat_every = self.cfg.lease() / 3;
        let mut last_beat = tokio::time::Instant::now() - beat_every;
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let health = match tokio::time::timeout(CHECK_TIMEOUT, self.check()).await {
                Ok(h) => h,
                Err(_) => Err("jetstream did not answer within 2 s".into()),
            };
            let last = match &health {
                Ok(last) => *last,
                Err(_) => 0,
            };
            self.set_health(health.map(|_| ()));
            let applied = store.meta_u64(keys::META_STREAM_SEQ).unwrap_or(0);
            if last > 0 {
                metrics::gauge!("citygw_cluster_lag_messages")
                    .set(last.saturating_sub(applied) as f64);
            }
            if last_beat.elapsed() >= beat_every {
                last_beat = tokio::time::Instant::now();
                let beat = Beat {
                    version: env!("CARGO_PKG_VERSION").into(),
                    started_ms,
                    seen_ms: now_ms(),
                    applied_sequence: applied,
                    healthy: self.health().is_ok(),
                    problem: self.health().err().unwrap_or_default(),
                };
                let key = format!("nodes.{}", escape_token(&self.node));
                let value = Bytes::from(serde_json::to_vec(&beat).expect("beat serialises"));
                if let Err(e) = self.leases.put(&key, value).await {
                    tracing::debug!(error = %e, "heartbeat not written");
                }
            }
        }
        let _ = self
            .leases
            .delete(format!("nodes.{}", escape_token(&self.node)))
            .await;
    }

    /// The stream's last sequence when it has a leader and a quorum of current replicas.
    async fn check(&self) -> Result<u64, String> {
        let info = self
            .js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| format!("stream {}: {e}", self.cfg.stream))?
            .get_info()
            .await
            .map_err(|e| format!("stream {}: {e}", self.cfg.stream))?;
        if let Some(cluster) = &info.cluster {
            if cluster.leader.as_deref().unwrap_or("").is_empty() {
                return Err(format!(
                    "stream {} has no leader (no quorum)",
                    self.cfg.stream
                ));
            }
            let current = 1 + cluster
                .replicas
                .iter()
                .filter(|r| r.current && !r.offline)
                .count();
            let quorum = info.config.num_replicas / 2 + 1;
            if current < quorum {
                return Err(format!(
                    "stream {}: {current} of {} replicas current, quorum is {quorum}",
                    self.cfg.stream, info.config.num_replicas
                ));
            }
        }
        if let Some(why) = full(&info.config, &info.state) {
            return Err(why);
        }
        Ok(info.state.last_sequence)
    }

    /// `citygw cluster status`: this node's view of the cluster.
    pub async fn status(&self, store: &Store) -> ClusterStatusResponse {
        let mut out = ClusterStatusResponse {
            backend: "jetstream".into(),
            node: self.node.clone(),
            stream: self.cfg.stream.clone(),
            healthy: self.health().is_ok(),
            problem: self.health().err().unwrap_or_default(),
            nats_server: self.client.server_info().server_name,
            ..Default::default()
        };
        let info = match tokio::time::timeout(CHECK_TIMEOUT, async {
            self.js
                .get_stream(&self.cfg.stream)
                .await?
                .get_info()
                .await
                .map_err(Into::into)
        })
        .await
        {
            Ok(Ok(info)) => Some(info),
            Ok(Err::<_, async_nats::Error>(e)) => {
                out.problem = format!("stream info: {e}");
                None
            }
            Err(_) => {
                out.problem = "stream info: no answer within 2 s".into();
                None
            }
        };
        if let Some(info) = &info {
            out.messages = info.state.messages;
            out.bytes = info.state.bytes;
            out.first_sequence = info.state.first_sequence;
            out.last_sequence = info.state.last_sequence;
            out.replicas = info.config.num_replicas as u32;
            if let Some(cluster) = &info.cluster {
                out.leader = cluster.leader.clone().unwrap_or_default();
                out.stream_replicas.push(StreamReplica {
                    name: out.leader.clone(),
                    leader: true,
                    current: true,
                    ..Default::default()
                });
                out.stream_replicas
                    .extend(cluster.replicas.iter().map(|r| StreamReplica {
                        name: r.name.clone(),
                        leader: false,
                        current: r.current,
                        offline: r.offline,
                        lag: r.lag.unwrap_or(0),
                        active_seconds: r.active.as_secs_f64(),
                    }));
            }
        }
        if let Ok(mut keys) = self.leases.keys().await {
            let mut names = Vec::new();
            while let Some(Ok(key)) = keys.next().await {
                names.push(key);
            }
            names.sort();
            for key in names {
                let Ok(Some(entry)) = self.leases.entry(&key).await else {
                    continue;
                };
                if let Some(node) = key.strip_prefix("nodes.").and_then(unescape_token) {
                    let Ok(beat) = serde_json::from_slice::<Beat>(&entry.value) else {
                        continue;
                    };
                    out.nodes.push(ClusterNode {
                        this_node: node == self.node,
                        name: node,
                        version: beat.version,
                        started_time_ms: beat.started_ms,
                        seen_time_ms: beat.seen_ms,
                        applied_sequence: beat.applied_sequence,
                        lag_messages: out.last_sequence.saturating_sub(beat.applied_sequence),
                        healthy: beat.healthy,
                        problem: beat.problem,
                    });
                } else if let Some(sink) = key.strip_prefix("leases.").and_then(unescape_token) {
                    out.sink_leases.push(SinkLease {
                        sink,
                        node: String::from_utf8_lossy(&entry.value).into_owned(),
                    });
                }
            }
        }
        // This node's own position, fresher than its last heartbeat.
        let applied = store.meta_u64(keys::META_STREAM_SEQ).unwrap_or(0);
        if let Some(me) = out.nodes.iter_mut().find(|n| n.this_node) {
            me.applied_sequence = applied;
            me.lag_messages = out.last_sequence.saturating_sub(applied);
        }
        out
    }
}
