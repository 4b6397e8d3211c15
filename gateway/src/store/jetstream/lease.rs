//! Leases: one holder of a named job across the cluster (a sink's forwarder), handed over when
//! its node dies.
//!
//! A lease is a key of the leases bucket, whose entries expire after `lease_secs`. A node takes a
//! free lease with `create` (fails while someone holds it) and renews it with a compare-and-set
//! `update` every third of the period; a node that cannot renew (dead, partitioned, no quorum)
//! stops acting as the holder once a period has passed since its last renewal, and the key
//! expires so another node's `create` succeeds. The window where two nodes act at once is the
//! renewal slack; forwarding tolerates it (a point written twice is overwritten by itself).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{escape_token, Cluster};

impl Cluster {
    /// Competes for the lease `name` until shutdown; the receiver says whether this node holds
    /// it right now.
    pub fn lease(
        self: &Arc<Self>,
        name: &str,
        shutdown: CancellationToken,
    ) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        let key = format!("leases.{}", escape_token(name));
        let cluster = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let period = cluster.cfg.lease();
            let mut tick = tokio::time::interval(period / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut revision: Option<u64> = None;
            let mut renewed = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let value = Bytes::from(cluster.node.clone());
                let result = match revision {
                    Some(rev) => cluster
                        .leases
                        .update(&key, value, rev)
                        .await
                        .map_err(|e| e.to_string()),
                    None => match cluster.leases.create(&key, value.clone()).await {
                        Ok(rev) => Ok(rev),
                        // Ours from before a restart (same node name): take it back at once.
                        Err(e) => match cluster.leases.entry(&key).await {
                            Ok(Some(entry)) if entry.value == value => cluster
                                .leases
                                .update(&key, value, entry.revision)
                                .await
                                .map_err(|e| e.to_string()),
                            _ => Err(e.to_string()),
                        },
                    },
                };
                match result {
                    Ok(rev) => {
                        if revision.is_none() {
                            tracing::info!(lease = %name, node = %cluster.node, "lease taken");
                        }
                        revision = Some(rev);
                        renewed = Instant::now();
                        tx.send_if_modified(|held| !std::mem::replace(held, true));
                    }
                    Err(e) => {
                        if revision.is_some() {
                            tracing::warn!(lease = %name, error = %e, "lease not renewed");
                        }
                        // A failed compare-and-set means someone else holds it now; a failure
                        // to reach JetStream keeps our claim until the period runs out.
                        if revision.is_some() && renewed.elapsed() >= period {
                            revision = None;
                        }
                        if revision.is_none() && *tx.borrow() {
                            tracing::warn!(lease = %name, "lease lost");
                            tx.send_replace(false);
                        }
                    }
                }
            }
            if revision.is_some() {
                // Hand over at once on a clean shutdown instead of waiting for expiry.
                let _ = cluster.leases.delete(&key).await;
            }
        });
        rx
    }
}
