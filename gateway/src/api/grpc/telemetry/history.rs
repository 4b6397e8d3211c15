//! History: stored readings of many devices merged into one device-time order, streamed.
//!
//! Each matching device contributes a cursor over its own time index, read a page at a time, and
//! a heap merges the cursors, so memory follows the number of devices, not the size of the answer:
//! a month of one device or an hour of a whole commune streams without loading at once. With
//! downsampling, windows are aligned to the epoch, so every device shares the same boundaries and
//! a window can be emitted as soon as the merged time passes its end.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use tokio::sync::mpsc;
use tonic::Status;

use super::scope::Selection;
use crate::proto::{reading, Aggregate, AggregateWindow, Reading};
use crate::store::Store;

/// First page per device; later pages grow to this bound.
const FIRST_PAGE: usize = 64;
const MAX_PAGE: usize = 4096;

pub struct HistoryQuery {
    pub selection: Selection,
    pub device_ids: Vec<String>,
    pub from_ms: i64,
    /// Exclusive.
    pub to_ms: i64,
    pub every: AggregateWindow,
    pub limit: usize,
}

pub fn window_ms(every: AggregateWindow) -> Option<i64> {
    match every {
        AggregateWindow::None => None,
        AggregateWindow::AggregateWindow1m => Some(60_000),
        AggregateWindow::AggregateWindow15m => Some(15 * 60_000),
        AggregateWindow::AggregateWindow1h => Some(3_600_000),
    }
}

/// One device's position in its index.
struct Cursor {
    device_id: String,
    page: std::vec::IntoIter<Reading>,
    /// Where the next page starts, None once the device is exhausted.
    next: Option<(i64, u64)>,
    page_size: usize,
}

impl Cursor {
    fn fill(&mut self, store: &Store, to_ms: i64) -> Result<(), Status> {
        let Some(from) = self.next else { return Ok(()) };
        let page = store
            .device_readings_from(&self.device_id, from, to_ms - 1, self.page_size)
            .map_err(|e| Status::unavailable(format!("store: {e}")))?;
        self.next = match page.last() {
            Some(r) if page.len() == self.page_size => Some((r.device_time_ms, r.id + 1)),
            _ => None,
        };
        self.page_size = (self.page_size * 2).min(MAX_PAGE);
        self.page = page.into_iter();
        Ok(())
    }

    fn pop(&mut self, store: &Store, to_ms: i64) -> Result<Option<Reading>, Status> {
        if let Some(r) = self.page.next() {
            return Ok(Some(r));
        }
        self.fill(store, to_ms)?;
        Ok(self.page.next())
    }
}

/// Running statistics of one device and quantity in the current window.
struct Stats {
    template: Reading,
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
}

/// Runs on a blocking thread (store reads) and sends into `tx`; stops when the client goes away.
pub fn run(store: Store, q: HistoryQuery, tx: mpsc::Sender<Result<Reading, Status>>) {
    if let Err(status) = merge(&store, &q, &tx) {
        let _ = tx.blocking_send(Err(status));
    }
}

fn merge(
    store: &Store,
    q: &HistoryQuery,
    tx: &mpsc::Sender<Result<Reading, Status>>,
) -> Result<(), Status> {
    let mut cursors: Vec<Cursor> = q
        .device_ids
        .iter()
        .map(|id| Cursor {
            device_id: id.clone(),
            page: Vec::new().into_iter(),
            next: Some((q.from_ms, 0)),
            page_size: FIRST_PAGE,
        })
        .collect();
    // Heap of (device time, id, cursor index): smallest first.
    let mut heap = BinaryHeap::new();
    let mut heads: Vec<Option<Reading>> = Vec::with_capacity(cursors.len());
    for (i, c) in cursors.iter_mut().enumerate() {
        let head = c.pop(store, q.to_ms)?;
        if let Some(r) = &head {
            heap.push(Reverse((r.device_time_ms, r.id, i)));
        }
        heads.push(head);
    }
    let window = window_ms(q.every);
    let mut current_window: Option<i64> = None;
    let mut stats: BTreeMap<(String, String), Stats> = BTreeMap::new();
    let mut sent = 0usize;
    let mut send = |r: Reading| -> bool {
        if q.limit > 0 && sent >= q.limit {
            return false;
        }
        sent += 1;
        tx.blocking_send(Ok(r)).is_ok()
    };

    while let Some(Reverse((_, _, i))) = heap.pop() {
        let r = heads[i].take().expect("heap entries have heads");
        let next = cursors[i].pop(store, q.to_ms)?;
        if let Some(n) = &next {
            heap.push(Reverse((n.device_time_ms, n.id, i)));
        }
        heads[i] = next;
        if !q.selection.matches(&r) {
            continue;
        }
        let Some(w) = window else {
            if !send(r) {
                return Ok(());
            }
            continue;
        };
        let Some(reading::Value::Number(v)) = r.value else {
            continue;
        };
        let start = r.device_time_ms.div_euclid(w) * w;
        if current_window != Some(start) {
            if !flush(&mut stats, w, &mut send) {
                return Ok(());
            }
            current_window = Some(start);
        }
        let key = (r.device_id.clone(), r.quantity.clone());
        let s = stats.entry(key).or_insert_with(|| Stats {
            template: Reading {
                device_time_ms: start,
                ..r.clone()
            },
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
        });
        s.count += 1;
        s.min = s.min.min(v);
        s.max = s.max.max(v);
        s.sum += v;
    }
    if let Some(w) = window {
        flush(&mut stats, w, &mut send);
    }
    Ok(())
}

/// Emits the finished window, ordered by device then quantity; false when sending must stop.
fn flush(
    stats: &mut BTreeMap<(String, String), Stats>,
    window_ms: i64,
    send: &mut impl FnMut(Reading) -> bool,
) -> bool {
    for (_, s) in std::mem::take(stats) {
        let mean = s.sum / s.count as f64;
        let reading = Reading {
            id: 0,
            value: Some(reading::Value::Number(mean)),
            received_time_ms: 0,
            device_seq: None,
            aggregate: Some(Aggregate {
                window_start_ms: s.template.device_time_ms,
                window_ms,
                count: s.count,
                min: s.min,
                max: s.max,
                mean,
            }),
            ..s.template
        };
        if !send(reading) {
            return false;
        }
    }
    true
}
