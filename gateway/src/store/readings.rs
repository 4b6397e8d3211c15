//! Appending readings and reading them back: by device and time, or by global id.

use std::ops::Range;

use fjall::Readable as _;
use tokio::sync::oneshot;

use super::runs::{encode, Run};
use super::writer::Request;
use super::{keys, Engine, Store, StoreError};
use crate::proto::Reading;

impl Store {
    /// Makes readings durable and returns their ids. Resolves only after the group commit that
    /// holds them is fsync'd, so the caller may acknowledge the device. Ids are assigned in commit
    /// order, strictly increasing and never reused, even across crashes.
    pub async fn append(&self, readings: Vec<Reading>) -> Result<Range<u64>, StoreError> {
        self.append_identified(readings, None).await
    }

    /// [`Store::append`] for a message whose content identifies it (`content_id`: a LoRaWAN
    /// DevEUI + FCnt, a CoAP endpoint + message id). In cluster mode a repeat within the
    /// stream's duplicate window, on any node, is stored once; single-node sources
    /// de-duplicate these themselves.
    pub async fn append_identified(
        &self,
        readings: Vec<Reading>,
        content_id: Option<&str>,
    ) -> Result<Range<u64>, StoreError> {
        if let Some(cluster) = self.cluster() {
            if readings.is_empty() {
                return Ok(0..0);
            }
            return cluster.append(readings, content_id).await;
        }
        if readings.is_empty() {
            let next = self.last_reading_id() + 1;
            return Ok(next..next);
        }
        let (done, reply) = oneshot::channel();
        self.submit(Request::Readings {
            items: encode(readings),
            done: Some(done),
        })
        .await?;
        reply.await.map_err(|_| StoreError::Closed)?
    }

    /// For MQTT QoS 0: rides along in the next group commit, nobody waits. When the queue is full
    /// the readings are dropped (at-most-once is what QoS 0 promises) and counted in
    /// `citygw_store_best_effort_dropped_total`, so an overloaded gateway sheds QoS 0 first.
    pub fn append_best_effort(&self, readings: Vec<Reading>) {
        if readings.is_empty() {
            return;
        }
        if let Some(cluster) = self.cluster() {
            return cluster.append_best_effort(readings);
        }
        let n = readings.len() as u64;
        let queued = self.try_submit(Request::Readings {
            items: encode(readings),
            done: None,
        });
        if !queued {
            metrics::counter!("citygw_store_best_effort_dropped_total").increment(n);
        }
    }

    /// One device's readings with device time in `[from_ms, to_ms]` (use `i64::MIN`/`i64::MAX`
    /// for unbounded), ordered by device time then id, at most `limit`. Served from the
    /// `by_device` index, so the cost follows the result size, not the store size.
    pub fn device_readings(
        &self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        self.device_readings_from(device_id, (from_ms, 0), to_ms, limit)
    }

    /// Like [`Store::device_readings`], starting at `(device time, id)` inclusive: the next page
    /// after a reading `r` starts at `(r.device_time_ms, r.id + 1)`.
    pub fn device_readings_from(
        &self,
        device_id: &str,
        (from_ms, from_id): (i64, u64),
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 || from_ms > to_ms {
            return Ok(out);
        }
        let engine = self.engine()?;
        // One snapshot for index and log: retention deletes both in one batch.
        let snap = engine.db.snapshot();
        let key_len = keys::index_key_len(device_id.len());
        let range =
            keys::index_key(device_id, from_ms, 0)..=keys::index_key(device_id, to_ms, u64::MAX);
        // Index entries are (device time, run id): one per distinct time of a run, so each
        // entry contributes the run's readings at exactly that time, already in id order.
        for guard in snap.range(&engine.ks.by_device, range) {
            let key = guard.key()?;
            if key.len() != key_len {
                continue; // another device whose id extends this one past a NUL byte
            }
            for r in engine.indexed_readings(&snap, &key)? {
                if (r.device_time_ms, r.id) < (from_ms, from_id) {
                    continue;
                }
                out.push(r);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// One device's `limit` latest readings by device time, returned oldest first: what a
    /// device's page charts, however long ago the device last reported.
    pub fn device_latest_readings(
        &self,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let engine = self.engine()?;
        let snap = engine.db.snapshot();
        let key_len = keys::index_key_len(device_id.len());
        let range = keys::index_key(device_id, i64::MIN, 0)
            ..=keys::index_key(device_id, i64::MAX, u64::MAX);
        'index: for guard in snap.range(&engine.ks.by_device, range).rev() {
            let key = guard.key()?;
            if key.len() != key_len {
                continue;
            }
            for r in engine.indexed_readings(&snap, &key)?.into_iter().rev() {
                out.push(r);
                if out.len() >= limit {
                    break 'index;
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    /// The first reading id received at or after `since_ms` (or the next id to be assigned when
    /// there is none): where a subscription that resumes by time starts. Ids grow with receive
    /// time, so a binary search over ids finds it in a few dozen point reads.
    pub fn first_reading_received_since(&self, since_ms: i64) -> Result<u64, StoreError> {
        let (mut lo, mut hi) = (0u64, self.last_reading_id());
        // Invariant: readings with id <= lo were received before since_ms (or do not exist);
        // the answer is in (lo, hi + 1].
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.readings_after(mid, 1)?.pop() {
                Some(r) if r.received_time_ms < since_ms => lo = r.id,
                Some(_) | None => hi = mid,
            }
        }
        Ok(lo + 1)
    }

    /// How many readings the log holds after `after_id` (a sink's lag in cluster mode, where
    /// ids are not contiguous). Reads one record per run, not per reading.
    pub fn count_readings_after(&self, after_id: u64) -> Result<u64, StoreError> {
        let mut n = 0;
        let engine = self.engine()?;
        let log = &engine.ks.log;
        for guard in log.range(keys::id_key(after_id.saturating_add(1))..) {
            let (key, value) = guard.into_inner()?;
            n += Run::decode(&key, &value)?.len();
        }
        Ok(n)
    }

    /// The global log after `after_id`, in id order, at most `limit`: the resume point of
    /// forwarders and streams. Only committed (fsync'd) readings are visible, and they become
    /// visible in id order, so paging by the last seen id never skips one.
    pub fn readings_after(&self, after_id: u64, limit: usize) -> Result<Vec<Reading>, StoreError> {
        self.engine()?.readings_after(after_id, limit)
    }
}

impl Engine {
    /// The readings an index entry `(device, device time, run id)` points at: the run's
    /// readings at exactly that time, in id order (empty when retention took the run).
    fn indexed_readings(
        &self,
        snap: &fjall::Snapshot,
        key: &[u8],
    ) -> Result<Vec<Reading>, StoreError> {
        let run_id = keys::parse_id(key).ok_or_else(|| StoreError::Corrupt("index key".into()))?;
        let time =
            keys::parse_index_time(key).ok_or_else(|| StoreError::Corrupt("index key".into()))?;
        let log_key = keys::id_key(run_id);
        let Some(value) = snap.get(&self.ks.log, log_key)? else {
            return Ok(Vec::new());
        };
        Ok(Run::decode(&log_key, &value)?
            .readings()
            .filter(|r| r.device_time_ms == time)
            .collect())
    }

    pub(super) fn readings_after(
        &self,
        after_id: u64,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        let mut out = Vec::new();
        let Some(start) = after_id.checked_add(1) else {
            return Ok(out);
        };
        if limit == 0 {
            return Ok(out);
        }
        let log = &self.ks.log;
        // The run holding `start` may begin before it.
        let first_key = match log.range(..=keys::id_key(start)).next_back() {
            Some(guard) => guard.key()?.to_vec(),
            None => keys::id_key(start).to_vec(),
        };
        for guard in log.range(first_key..) {
            let (key, value) = guard.into_inner()?;
            for r in Run::decode(&key, &value)?
                .readings()
                .filter(|r| r.id >= start)
            {
                out.push(r);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }
}
