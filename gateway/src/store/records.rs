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
    /// The command log: commands with their history and the open ones' markers
    /// (`control::commands::log` owns the keys).
    Commands,
    /// Alerts, alert rules added through the API, action cool-downs (`control` owns the keys).
    Alerts,
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
    /// A receiver that lags must reload the table ([`Store::load_records`], or
    /// [`Store::for_each_record`] for the device table).
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

    /// One record, by key.
    pub fn get_record(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .engine()?
            .ks
            .table(table)
            .get(key.as_bytes())?
            .map(|v| v.to_vec()))
    }

    /// Up to `limit` records whose keys start with `prefix`, in key order after the key `after`
    /// (or, with `newest_first`, in reverse key order before it); `after` empty: from the first
    /// (or last) one. Pages through a large table without loading it whole.
    pub fn records_with_prefix(
        &self,
        table: Table,
        prefix: &str,
        after: &str,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use std::ops::Bound;
        let start = prefix.as_bytes().to_vec();
        // Keys with the prefix sort below the prefix with its last byte incremented.
        let mut end = start.clone();
        while end.last() == Some(&u8::MAX) {
            end.pop();
        }
        let end = match end.last_mut() {
            Some(b) => {
                *b += 1;
                Bound::Excluded(end)
            }
            None => Bound::Unbounded,
        };
        let after = (!after.is_empty()).then(|| after.as_bytes().to_vec());
        let range = match (after, newest_first) {
            (None, _) => (Bound::Included(start), end),
            (Some(a), false) => (Bound::Excluded(a.max(start)), end),
            (Some(a), true) => (Bound::Included(start), Bound::Excluded(a)),
        };
        let engine = self.engine()?;
        let iter = engine.ks.table(table).range::<Vec<u8>, _>(range);
        let iter: Box<dyn Iterator<Item = fjall::Guard>> = if newest_first {
            Box::new(iter.rev())
        } else {
            Box::new(iter)
        };
        iter.take(limit)
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                let key = String::from_utf8(key.to_vec())
                    .map_err(|_| StoreError::Corrupt("record key is not UTF-8".into()))?;
                Ok((key, value.to_vec()))
            })
            .collect()
    }

    /// Calls `f` with every record under `prefix`, in key order, a page at a time.
    pub fn for_each_record(
        &self,
        table: Table,
        prefix: &str,
        mut f: impl FnMut(&str, Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        const PAGE: usize = 1000;
        let mut after = String::new();
        loop {
            let page = self.records_with_prefix(table, prefix, &after, false, PAGE)?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = last.clone();
            for (key, value) in page {
                f(&key, value)?;
            }
        }
    }

    /// Newest first (reverse key order) under `prefix`, below the key `before` (empty: from the
    /// last): the records `pick` turns into a `T`, at most `limit`, scanning at most `max_scan`
    /// records (a filter that matches little cannot read a whole table for one page).
    pub fn newest_records<T>(
        &self,
        table: Table,
        prefix: &str,
        before: &str,
        limit: usize,
        max_scan: usize,
        mut pick: impl FnMut(&str, &[u8]) -> Result<Option<T>, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        const PAGE: usize = 1000;
        let mut out = Vec::new();
        let mut before = before.to_string();
        let mut scanned = 0;
        while out.len() < limit && scanned < max_scan {
            let page = self.records_with_prefix(table, prefix, &before, true, PAGE)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            before = last.clone();
            for (key, bytes) in &page {
                scanned += 1;
                if let Some(t) = pick(key, bytes)? {
                    out.push(t);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every record of a small table (agencies, operators, cursors), ordered by key, collected.
    pub fn load_records(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.engine()?
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
