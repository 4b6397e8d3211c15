//! Registry records in a replicated key-value bucket, watched by every node.
//!
//! `put_records` (a device added or disabled, an agency or console operator added or removed, a
//! sink cursor, a KPI snapshot) writes to the bucket, pipelined, and returns once this node has applied its own
//! write back from the watch (read-your-writes). Every node's watcher applies each change to its
//! store in bucket order, keeps the bucket revision it reached in the same commit (a restart
//! resumes after it), and announces it on [`Store::record_changes`], from which the registry and
//! the agencies update their in-memory state: a device disabled on node A is refused, and its
//! live session closed, on node B within the watch's latency (milliseconds).
//!
//! Keys are `{table}.{escaped key}` ([`super::escape_token`]), so device ids with `.` or `:`
//! fit. A device's last-seen time is not replicated: every node derives it from the readings it
//! materialises.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{Entry, Operation};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{escape_token, unescape_token, Cluster};
use crate::store::{keys, RecordChange, Store, StoreError, Table};

/// Most bucket entries applied in one commit.
const BATCH: usize = 4096;
/// After this long without a change the watch is compared with the bucket. The consumer behind
/// a watch lives on one NATS server; when that server dies the client notices only after two
/// missed idle heartbeats (10 s), far beyond "a change reaches every node within a second".
/// A watch seen behind the bucket at two checks in a row, without progress, is replaced, so a
/// lost consumer delays changes by at most about twice this.
const STALL_CHECK: Duration = Duration::from_millis(250);
/// A new watch that is not set up within this is abandoned and asked for again at once: right
/// after a server died, NATS may still place the new consumer on it and never answer.
const WATCH_SETUP: Duration = Duration::from_secs(1);

const TABLES: [(Table, &str); 5] = [
    (Table::Devices, "devices"),
    (Table::Agencies, "agencies"),
    (Table::Operators, "operators"),
    (Table::Cursors, "cursors"),
    (Table::KpiSnapshots, "kpi"),
];

fn bucket_key(table: Table, key: &str) -> String {
    let prefix = TABLES
        .iter()
        .find(|(t, _)| *t == table)
        .map_or("other", |(_, p)| p);
    format!("{prefix}.{}", escape_token(key))
}

fn parse_bucket_key(key: &str) -> Option<(Table, String)> {
    let (prefix, rest) = key.split_once('.')?;
    let table = TABLES.iter().find(|(_, p)| *p == prefix)?.0;
    Some((table, unescape_token(rest)?))
}

impl Cluster {
    /// Writes records to the bucket; returns once this node applied them.
    pub(crate) async fn put_records(
        &self,
        table: Table,
        records: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), StoreError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            metrics::counter!("citygw_cluster_publish_errors_total", "stage" => "records")
                .increment(1);
            StoreError::Unavailable(format!("jetstream records: {e}"))
        };
        let mut acks = Vec::with_capacity(records.len());
        for (key, value) in records {
            let subject = format!(
                "$KV.{}.{}",
                self.cfg.records_bucket,
                bucket_key(table, &key)
            );
            let ack = match value {
                Some(v) => self.js.publish(subject, Bytes::from(v)).await,
                None => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("KV-Operation", "DEL");
                    self.js
                        .publish_with_headers(subject, headers, Bytes::new())
                        .await
                }
            }
            .map_err(|e| unavailable(&e))?;
            acks.push(ack);
        }
        let mut revision = 0;
        for ack in acks {
            revision = revision.max(ack.await.map_err(|e| unavailable(&e))?.sequence);
        }
        let mut applied = self.records_applied.subscribe();
        tokio::time::timeout(self.cfg.ack_timeout(), applied.wait_for(|&r| r >= revision))
            .await
            .map_err(|_| unavailable(&"written, but not yet applied on this node"))?
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }

    /// Applies the bucket's changes to `store` until shutdown: first everything after the
    /// revision the store already holds, then live changes.
    pub async fn follow_records(self: Arc<Self>, store: Store, shutdown: CancellationToken) {
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.watch_records(&store) => r,
            };
            match result {
                // A stalled watch is replaced at once: changes are waiting.
                Ok(()) => continue,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "records watch interrupted, restarting");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Applies everything up to the bucket's current revision; returns once this node is
    /// up to date (start-up waits for it, so a node never serves an old registry).
    pub async fn catch_up_records(&self) -> anyhow::Result<()> {
        let last = self.records_revision().await?;
        let mut applied = self.records_applied.subscribe();
        tokio::time::timeout(super::SETUP_DEADLINE, applied.wait_for(|&r| r >= last))
            .await
            .map_err(|_| anyhow::anyhow!("records bucket not caught up within 60 s"))??;
        tracing::info!(revision = last, "registry caught up with the cluster");
        Ok(())
    }

    /// The bucket's latest revision, asked of its leader (`kv::Store::status` answers from the
    /// stream info cached when the bucket was opened).
    async fn records_revision(&self) -> anyhow::Result<u64> {
        let stream = format!("KV_{}", self.cfg.records_bucket);
        let info = self.js.get_stream_no_info(stream).await?.get_info().await?;
        Ok(info.state.last_sequence)
    }

    /// Follows the bucket; returns Ok when the watch stalled or was not set up in time (to be
    /// replaced at once), an error when it failed.
    async fn watch_records(&self, store: &Store) -> anyhow::Result<()> {
        let applied = store.meta_u64(keys::META_RECORDS_REVISION)?;
        self.records_applied.send_if_modified(|r| {
            let newer = applied > *r;
            *r = (*r).max(applied);
            newer
        });
        tracing::debug!(applied, "watching the records bucket");
        let setup = async {
            if applied == 0 {
                // Every key's current value, then live changes (`watch_all` gives changes only).
                self.records.watch_with_history(">").await
            } else {
                self.records.watch_all_from_revision(applied + 1).await
            }
        };
        let Ok(watch) = tokio::time::timeout(WATCH_SETUP, setup).await else {
            tracing::debug!(applied, "records watch not set up within 1 s; asking again");
            return Ok(());
        };
        let mut watch = watch?;
        // The applied revision at which the bucket was last seen ahead of this watch.
        let mut behind_at = None;
        loop {
            let first = match tokio::time::timeout(STALL_CHECK, watch.next()).await {
                Ok(Some(entry)) => entry,
                Ok(None) => anyhow::bail!("watch ended"),
                Err(_) => {
                    let last = self.records_revision().await?;
                    let applied = *self.records_applied.borrow();
                    if last <= applied {
                        behind_at = None;
                    } else if behind_at == Some(applied) {
                        metrics::counter!("citygw_cluster_records_watch_restarts_total")
                            .increment(1);
                        tracing::warn!(
                            applied,
                            last,
                            "records watch silent while the bucket moved on; replacing it"
                        );
                        return Ok(());
                    } else {
                        behind_at = Some(applied);
                    }
                    continue;
                }
            };
            behind_at = None;
            let mut batch = vec![first?];
            while batch.len() < BATCH {
                match watch.next().now_or_never() {
                    Some(Some(Ok(e))) => batch.push(e),
                    Some(Some(Err(e))) => {
                        self.apply_entries(store, batch).await?;
                        return Err(e.into());
                    }
                    Some(None) | None => break,
                }
            }
            self.apply_entries(store, batch).await?;
        }
    }

    /// Applies entries in order, one commit per run of the same table.
    async fn apply_entries(&self, store: &Store, entries: Vec<Entry>) -> anyhow::Result<()> {
        tracing::debug!(
            entries = entries.len(),
            last = entries.last().map(|e| e.revision),
            "applying records"
        );
        let mut i = 0;
        while i < entries.len() {
            let mut rows = Vec::new();
            let mut changes = Vec::new();
            let mut table = None;
            let mut revision = 0;
            while i < entries.len() {
                let e = &entries[i];
                let Some((t, key)) = parse_bucket_key(&e.key) else {
                    tracing::warn!(key = %e.key, "unknown key in the records bucket; ignored");
                    revision = e.revision;
                    i += 1;
                    continue;
                };
                if table.is_some_and(|tt| tt != t) {
                    break;
                }
                table = Some(t);
                let value = match e.operation {
                    Operation::Put => Some(e.value.to_vec()),
                    Operation::Delete | Operation::Purge => None,
                };
                rows.push((key.clone(), value.clone()));
                changes.push(RecordChange {
                    table: t,
                    key,
                    value,
                });
                revision = e.revision;
                i += 1;
            }
            store
                .put_local_records(
                    table.unwrap_or(Table::Devices),
                    rows,
                    Some((keys::META_RECORDS_REVISION, revision)),
                )
                .await?;
            for change in changes {
                store.publish_record_change(change);
            }
            metrics::gauge!("citygw_cluster_records_revision").set(revision as f64);
            self.records_applied
                .send_modify(|r| *r = (*r).max(revision));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_keys_name_their_table() {
        for (table, key) in [
            (Table::Devices, "HN.aq:01"),
            (Table::Agencies, "moitruong"),
            (Table::Cursors, "sink/vm"),
            (Table::KpiSnapshots, "01/2026-12-04"),
        ] {
            let k = bucket_key(table, key);
            assert_eq!(k.matches('.').count(), 1, "{k}");
            assert_eq!(parse_bucket_key(&k), Some((table, key.to_string())));
        }
        assert_eq!(parse_bucket_key("nodes.a"), None);
    }
}
