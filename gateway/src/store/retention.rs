//! Retention: deletes readings and dead letters older than `StoreOptions::retention`.

use fjall::{Keyspace, PersistMode};
use prost::Message as _;

use super::runs::Run;
use super::{keys, Engine, Store, StoreError};
use crate::proto::DeadLetter;

/// Deletes per write batch: small enough that the group-commit writer, which shares the journal
/// lock, waits at most one small batch.
const CHUNK: usize = 1024;

/// Readings at or past the cutoff to scan past before stopping. Receive time and id both grow at
/// ingest, so expired records sit at the start of the log; the slack tolerates receive times
/// that are slightly out of id order without scanning the whole store every time.
const SLACK: usize = 10_000;

/// What retention needs to know of one stored record.
struct Expiring {
    received_time_ms: i64,
    records: u64,
    index: Vec<Vec<u8>>,
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Readings deleted (log entry and index entry).
    pub readings: u64,
    /// Dead letters deleted.
    pub dead_letters: u64,
}

impl Store {
    /// Deletes readings (log and index) and dead letters whose `received_time_ms` is older than
    /// `now_ms - retention`, in chunks so ingestion keeps flowing. Call it periodically from a
    /// blocking task; `now_ms` is a parameter so the caller owns the clock.
    ///
    /// Readings with ids above `forwarded_up_to` are kept whatever their age: a forwarder has not
    /// delivered them yet (pass `u64::MAX` when there is none). They are counted in
    /// `citygw_retention_held_total`, for an alert.
    pub fn enforce_retention(
        &self,
        now_ms: i64,
        forwarded_up_to: u64,
    ) -> Result<RetentionReport, StoreError> {
        let retention_ms = i64::try_from(self.inner.opts.retention.as_millis()).unwrap_or(i64::MAX);
        let engine = self.engine()?;
        let cutoff = now_ms.saturating_sub(retention_ms);

        let mut held = 0u64;
        let readings = Self::expire(&engine, &engine.ks.log, cutoff, |key, value| {
            let run = Run::decode(key, value)?;
            if run.last_id() > forwarded_up_to {
                if run.received_time_ms() < cutoff {
                    held += run.len();
                }
                return Ok(Expiring {
                    received_time_ms: i64::MAX,
                    records: 0,
                    index: Vec::new(),
                });
            }
            let index = run
                .device_times()
                .into_iter()
                .map(|t| keys::index_key(run.device_id(), t, run.first_id))
                .collect();
            Ok(Expiring {
                received_time_ms: run.received_time_ms(),
                records: run.len(),
                index,
            })
        })?;
        let dead_letters = Self::expire(&engine, &engine.ks.dead_letters, cutoff, |_, value| {
            let dl = DeadLetter::decode(value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok(Expiring {
                received_time_ms: dl.received_time_ms,
                records: 1,
                index: Vec::new(),
            })
        })?;

        metrics::counter!("citygw_retention_deleted_total", "kind" => "reading")
            .increment(readings);
        metrics::counter!("citygw_retention_held_total").increment(held);
        metrics::counter!("citygw_retention_deleted_total", "kind" => "dead_letter")
            .increment(dead_letters);
        tracing::info!(
            cutoff_ms = cutoff,
            readings,
            dead_letters,
            "retention pass done"
        );
        Ok(RetentionReport {
            readings,
            dead_letters,
        })
    }

    /// Deletes the expired records of an id-keyed keyspace from its start; `inspect` tells a
    /// record's receive time, how many readings (or dead letters) it holds, and its index keys.
    fn expire(
        engine: &Engine,
        ks: &Keyspace,
        cutoff: i64,
        mut inspect: impl FnMut(&[u8], &[u8]) -> Result<Expiring, StoreError>,
    ) -> Result<u64, StoreError> {
        let mut start = 0u64;
        let mut deleted = 0u64;
        let mut fresh = 0usize;
        loop {
            // Deletes need no fsync of their own: a lost delete is redone by the next pass, and
            // the writer's next commit fsyncs the journal anyway.
            let mut wb = engine.db.batch().durability(Some(PersistMode::Buffer));
            let mut scanned = 0usize;
            let mut last = None;
            for guard in ks.range(keys::id_key(start)..) {
                let (key, value) = guard.into_inner()?;
                let id =
                    keys::parse_id(&key).ok_or_else(|| StoreError::Corrupt("id key".into()))?;
                last = Some(id);
                scanned += 1;
                let record = inspect(&key, &value)?;
                if record.received_time_ms < cutoff {
                    wb.remove(ks, key);
                    for index_key in record.index {
                        wb.remove(&engine.ks.by_device, index_key);
                    }
                    deleted += record.records;
                } else {
                    fresh += 1;
                }
                if scanned >= CHUNK || fresh >= SLACK {
                    break;
                }
            }
            if !wb.is_empty() {
                wb.commit()?;
            }
            match last {
                Some(id) if scanned >= CHUNK && fresh < SLACK && id < u64::MAX => start = id + 1,
                _ => break,
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
pub(super) fn tests_chunk() -> usize {
    CHUNK
}
