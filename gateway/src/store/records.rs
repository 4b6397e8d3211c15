//! Registry persistence: the registry owns the record formats, the store only keeps the bytes,
//! one keyspace per table.

use tokio::sync::oneshot;

use super::writer::Request;
use super::{Store, StoreError};

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
        let (done, reply) = oneshot::channel();
        self.submit(Request::Records {
            table,
            records,
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
