//! The group-commit writer: the one thread that writes.
//!
//! It takes the first queued request, drains whatever else is queued (up to `max_batch` items),
//! keeps collecting until `commit_window` has passed since the first one, then writes all of it as
//! one fjall batch with one fsync and completes every waiter. Ids are assigned here, in commit
//! order, so a reader paging by id never sees id N+1 committed before id N.
//!
//! Callers encode values on their own tasks (see [`super::keys`]); this thread only builds keys,
//! so it stays lean: it is the serial part of ingestion.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::{Database, PersistMode, Slice};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::feed::Feed;
use super::runs::EncodedRun;
use super::{keys, Keyspaces, StoreError, QUEUE_CAPACITY};
use crate::proto::Reading;

/// Reply channel of a durable request.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Request {
    Readings {
        items: Vec<EncodedRun>,
        /// `None` for best effort: nobody waits.
        done: Option<Reply<Range<u64>>>,
    },
    DeadLetter {
        /// prost-encoded `DeadLetter` with `id = 0`.
        value: Slice,
        done: Reply<u64>,
    },
    Records {
        table: super::Table,
        /// `None` deletes.
        records: Vec<(String, Option<Vec<u8>>)>,
        /// A meta value written in the same commit (cluster mode: the bucket revision applied).
        meta: Option<(&'static [u8], u64)>,
        done: Reply<()>,
    },
    /// Cluster mode: runs whose ids JetStream's sequence gave (`(first id, run)`, in id order),
    /// and the last stream sequence they cover, committed together.
    Replicated {
        runs: Vec<(u64, EncodedRun)>,
        stream_seq: u64,
        done: Reply<()>,
    },
    /// Commit what is queued, then exit.
    Shutdown { done: oneshot::Sender<()> },
}

impl Request {
    /// Items this request adds to a commit, for `max_batch`.
    fn weight(&self) -> usize {
        match self {
            Request::Readings { items, .. } => items.iter().map(|run| run.readings.len()).sum(),
            Request::DeadLetter { .. } => 1,
            Request::Records { records, .. } => records.len(),
            Request::Replicated { runs, .. } => runs.iter().map(|(_, r)| r.readings.len()).sum(),
            Request::Shutdown { .. } => 0,
        }
    }
}

/// A request in the queue, holding its queue slot until the writer takes it.
pub(super) struct Queued {
    req: Request,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Queued {
    pub(super) fn new(req: Request, permit: OwnedSemaphorePermit) -> Self {
        Queued {
            req,
            _permit: Some(permit),
        }
    }

    pub(super) fn unbounded(req: Request) -> Self {
        Queued { req, _permit: None }
    }
}

/// Completion owed once the batch's commit is known.
enum Done {
    Readings(Option<Reply<Range<u64>>>, Range<u64>),
    DeadLetter(Reply<u64>, u64),
    Records(Reply<()>),
}

pub(super) struct Writer {
    pub(super) db: Database,
    pub(super) ks: Keyspaces,
    pub(super) rx: Receiver<Queued>,
    pub(super) commit_window: Duration,
    pub(super) max_batch: usize,
    pub(super) permits: Arc<Semaphore>,
    pub(super) next_reading_id: u64,
    pub(super) next_dead_letter_id: u64,
    pub(super) last_reading_id: Arc<AtomicU64>,
    pub(super) feed: Feed,
}

/// One group commit being assembled.
struct Batch {
    wb: fjall::OwnedWriteBatch,
    done: Vec<Done>,
    weight: usize,
    readings: u64,
    dead_letters: u64,
    /// Readings with their ids, in id order, for the live feed.
    committed: Vec<Reading>,
}

impl Writer {
    pub(super) fn run(mut self) {
        let mut carry: Option<Request> = None;
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        loop {
            let first = match carry.take() {
                Some(req) => req,
                None if shutdown.is_some() => match self.rx.try_recv() {
                    Ok(q) => q.req,
                    Err(_) => break,
                },
                None => match self.rx.recv() {
                    Ok(q) => q.req,
                    Err(_) => break, // every handle dropped
                },
            };
            let deadline = Instant::now() + self.commit_window;
            let mut batch = self.new_batch();
            self.add(&mut batch, first, &mut shutdown);
            while batch.weight < self.max_batch {
                let next = match self.rx.try_recv() {
                    Ok(q) => q.req,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        let now = Instant::now();
                        if shutdown.is_some() || now >= deadline {
                            break;
                        }
                        match self.rx.recv_timeout(deadline - now) {
                            Ok(q) => q.req,
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                                break
                            }
                        }
                    }
                };
                if batch.weight > 0 && batch.weight + next.weight() > self.max_batch {
                    carry = Some(next);
                    break;
                }
                self.add(&mut batch, next, &mut shutdown);
            }
            metrics::gauge!("citygw_store_queue_depth")
                .set((QUEUE_CAPACITY - self.permits.available_permits()) as f64);
            self.commit(batch);
        }
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    fn new_batch(&self) -> Batch {
        Batch {
            wb: self.db.batch().durability(Some(PersistMode::SyncAll)),
            done: Vec::new(),
            weight: 0,
            readings: 0,
            dead_letters: 0,
            committed: Vec::new(),
        }
    }

    /// Assigns ids and stages the request's writes.
    fn add(&mut self, batch: &mut Batch, req: Request, shutdown: &mut Option<oneshot::Sender<()>>) {
        batch.weight += req.weight();
        match req {
            Request::Readings { items, done } => {
                let first = self.next_reading_id;
                for run in items {
                    self.stage_run(batch, self.next_reading_id, run);
                }
                batch
                    .done
                    .push(Done::Readings(done, first..self.next_reading_id));
            }
            Request::DeadLetter { value, done } => {
                let id = self.next_dead_letter_id;
                self.next_dead_letter_id += 1;
                batch
                    .wb
                    .insert(&self.ks.dead_letters, keys::id_key(id), value);
                batch.dead_letters += 1;
                batch.done.push(Done::DeadLetter(done, id));
            }
            Request::Records {
                table,
                records,
                meta,
                done,
            } => {
                let ks = self.ks.table(table);
                for (id, record) in records {
                    match record {
                        Some(record) => batch.wb.insert(ks, id, record),
                        None => batch.wb.remove(ks, id),
                    }
                }
                if let Some((key, value)) = meta {
                    batch.wb.insert(&self.ks.meta, key, keys::id_key(value));
                }
                batch.done.push(Done::Records(done));
            }
            Request::Replicated {
                runs,
                stream_seq,
                done,
            } => {
                for (run_id, run) in runs {
                    self.stage_run(batch, run_id, run);
                }
                batch.wb.insert(
                    &self.ks.meta,
                    keys::META_STREAM_SEQ,
                    keys::id_key(stream_seq),
                );
                batch.done.push(Done::Records(done));
            }
            Request::Shutdown { done } => *shutdown = Some(done),
        }
    }

    /// Stages one run under `run_id` (log record, index entries, feed readings). Ids never go
    /// back: the next id assigned here is past the run.
    fn stage_run(&mut self, batch: &mut Batch, run_id: u64, run: EncodedRun) {
        batch
            .wb
            .insert(&self.ks.log, keys::id_key(run_id), run.value);
        for mut index_key in run.index_prefixes {
            index_key.extend_from_slice(&run_id.to_be_bytes());
            batch
                .wb
                .insert(&self.ks.by_device, index_key, Slice::empty());
        }
        for (id, mut reading) in (run_id..).zip(run.readings) {
            reading.id = id;
            batch.committed.push(reading);
            batch.readings += 1;
            self.next_reading_id = self.next_reading_id.max(id + 1);
        }
    }

    /// Writes and fsyncs the batch, then answers every waiter in it.
    fn commit(&mut self, mut batch: Batch) {
        if batch.done.is_empty() {
            return;
        }
        if batch.readings > 0 {
            batch.wb.insert(
                &self.ks.meta,
                keys::META_NEXT_READING_ID,
                keys::id_key(self.next_reading_id),
            );
        }
        if batch.dead_letters > 0 {
            batch.wb.insert(
                &self.ks.meta,
                keys::META_NEXT_DEAD_LETTER_ID,
                keys::id_key(self.next_dead_letter_id),
            );
        }
        let requests = batch.done.len();
        let started = Instant::now();
        // Durability SyncAll: the journal is fsync'd before the batch becomes visible to
        // readers, so nothing is served (or forwarded) that a crash could take back.
        let result = batch.wb.commit();
        metrics::histogram!("citygw_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("citygw_store_commit_batch_size").record(requests as f64);

        let error = match result {
            Ok(()) => {
                self.last_reading_id
                    .store(self.next_reading_id - 1, Ordering::Release);
                metrics::counter!("citygw_readings_stored_total").increment(batch.readings);
                metrics::counter!("citygw_dead_letters_stored_total").increment(batch.dead_letters);
                self.feed.publish(std::mem::take(&mut batch.committed));
                None
            }
            Err(e) => {
                // Ids of the failed batch are not handed out again: a partly written journal
                // entry must never be mistaken for a later reading.
                metrics::counter!("citygw_store_commit_errors_total").increment(1);
                tracing::warn!(error = %e, requests, "store commit failed");
                Some(StoreError::from(e))
            }
        };
        for done in batch.done {
            match done {
                Done::Readings(reply, ids) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(error.clone().map_or(Ok(ids), Err));
                    }
                }
                Done::DeadLetter(reply, id) => {
                    let _ = reply.send(error.clone().map_or(Ok(id), Err));
                }
                Done::Records(reply) => {
                    let _ = reply.send(error.clone().map_or(Ok(()), Err));
                }
            }
        }
    }
}
