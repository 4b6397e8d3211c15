//! Registry persistence: the registry owns the record formats, the store only keeps the bytes,
//! one keyspace per table.

use tokio::sync::oneshot;

use super::writer::Request;
use super::{Store, StoreError};

/// Changes to apply that one broadcast may hold before a slow listener must resync.
pub(super) const CHANGES_CAPACITY: usize = 65_536;

/// A record another node (or this one) wrote through the cluster, now applied to this store.
#[derive(Debug, Clone)]
pub struct RecordChange {
    pub table: Table,
    pub key: String,
    /// None: deleted.
    pub value: Option<Vec<u8>>,
}

/// Registry tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Devices,
    Agencies,
    /// Console operators (read-only sign-in tokens).
    Operators,
    /// Forwarder cursors: sink name → last forwarded reading id.
    Cursors,
    /// Daily KPI snapshots: `{city}/{YYYY-MM-DD}` → figures (one small row per city and day).
    KpiSnapshots,
}

impl Store {
    /// Stores (`Some`) or deletes (`None`) records in one commit, fsync'd before returning: a
    /// provisioned device must survive a crash together with the readings it is about to send.
    pub async fn put_records(
        &self,
        table: Table,
        records: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        if let Some(cluster) = self.cluster() {
            return cluster.put_records(table, records).await;
        }
        self.put_local_records(table, records, None).await
    }

    /// Writes records to this node's store only. In cluster mode that is a node's own state
    /// (devices' last-seen times, which every node derives from the stream itself) or a change
    /// the cluster already agreed on, with the bucket revision it brings (`meta`).
    pub async fn put_local_records(
        &self,
        table: Table,
        records: Vec<(String, Option<Vec<u8>>)>,
        meta: Option<(&'static [u8], u64)>,
    ) -> Result<(), StoreError> {
        if records.is_empty() && meta.is_none() {
            return Ok(());
        }
        let (done, reply) = oneshot::channel();
        self.submit(Request::Records {
            table,
            records,
            meta,
            done,
        })
        .await?;
        reply.await.map_err(|_| StoreError::Closed)?
    }

    /// Record changes applied from the cluster (cluster mode only; nothing is sent otherwise).
    /// A receiver that lags must reload the table with [`Store::load_records`].
    pub fn record_changes(&self) -> tokio::sync::broadcast::Receiver<RecordChange> {
        self.inner.changes.subscribe()
    }

    pub(crate) fn publish_record_change(&self, change: RecordChange) {
        let _ = self.inner.changes.send(change);
    }

    /// Cluster mode: commits runs materialised from the stream, with the ids their sequence
    /// gave, and the last stream sequence they cover (see [`super::jetstream`]).
    pub(super) async fn apply_replicated(
        &self,
        runs: Vec<(u64, super::runs::EncodedRun)>,
        stream_seq: u64,
    ) -> Result<(), StoreError> {
        let (done, reply) = oneshot::channel();
        self.submit(Request::Replicated {
            runs,
            stream_seq,
            done,
        })
        .await?;
        reply.await.map_err(|_| StoreError::Closed)?
    }

    /// Every record of a table, ordered by key; the registry loads them once at start.
    pub fn load_records(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner
            .ks
            .table(table)
            .iter()
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                let id = String::from_utf8(key.to_vec())
                    .map_err(|_| StoreError::Corrupt("record key is not UTF-8".into()))?;
                Ok((id, value.to_vec()))
            })
            .collect()
    }
}
