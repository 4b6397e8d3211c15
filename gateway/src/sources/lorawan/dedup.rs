//! Exactly-once storage of redelivered events.
//!
//! A network server's broker redelivers every QoS 1 message the bridge had not acknowledged when
//! it lost the connection or crashed, and the bridge acknowledges only after the readings are
//! durable; so a message can arrive again after its readings were stored. An event is identified
//! by (device, marker quantity, event time, frame counter): a redelivery carries the same bytes,
//! so the same identity, while a device that rejoined and restarted its frame counter sends a
//! different time.
//!
//! Two layers answer "stored already?": a window of recent identities in memory, each with a
//! cell that concurrent copies of the same event wait on (so a redelivery racing its original is
//! stored once), and, when memory does not know (after a restart), the store: every reading of an
//! event carries the event time and its frame counter as `device_seq`, so the per-device time
//! index finds the marker reading with a point range read. The readings of one event are
//! committed as one batch, so "marker stored" means "event stored".

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::proto::Protocol;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub device_id: String,
    pub marker: &'static str,
    pub time_ms: i64,
    pub seq: Option<u64>,
}

/// Whether this call stored the event or found it stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Now,
    Before,
}

pub struct Dedup {
    window: Duration,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    cells: HashMap<Key, Arc<OnceCell<()>>>,
    order: VecDeque<(Instant, Key)>,
}

impl Dedup {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: Mutex::new(Seen::default()),
        }
    }

    fn cell(&self, key: &Key) -> Arc<OnceCell<()>> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("dedup lock");
        while let Some((t, _)) = seen.order.front() {
            if now.duration_since(*t) < self.window {
                break;
            }
            let (_, old) = seen.order.pop_front().expect("front exists");
            seen.cells.remove(&old);
        }
        if let Some(cell) = seen.cells.get(key) {
            return cell.clone();
        }
        let cell = Arc::new(OnceCell::new());
        seen.cells.insert(key.clone(), cell.clone());
        seen.order.push_back((now, key.clone()));
        cell
    }

    /// Runs `store` unless the event is known to be stored; concurrent calls for one key wait for
    /// the first, and a failed `store` leaves the next copy to try again.
    pub async fn once<F, Fut, E>(
        &self,
        store_handle: &Store,
        key: Key,
        store: F,
    ) -> Result<Stored, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
        E: From<StoreError>,
    {
        let cell = self.cell(&key);
        if cell.initialized() {
            return Ok(Stored::Before);
        }
        let mut ran = false;
        cell.get_or_try_init(|| async {
            if in_store(store_handle, &key)? {
                return Ok(());
            }
            ran = true;
            store().await
        })
        .await?;
        Ok(if ran { Stored::Now } else { Stored::Before })
    }
}

/// Whether the event's marker reading is in the store.
fn in_store(store: &Store, key: &Key) -> Result<bool, StoreError> {
    // Readings of one device at one exact time are few; 256 bounds a pathological device.
    let found = store.device_readings(&key.device_id, key.time_ms, key.time_ms, 256)?;
    Ok(found.iter().any(|r| {
        r.quantity == key.marker
            && r.device_seq == key.seq
            && r.protocol == Protocol::Lorawan as i32
    }))
}
