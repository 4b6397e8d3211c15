//! The group-commit writer: the one thread that writes.
//!
//! It takes the first queued request, drains whatever else is queued (up to `max_batch` items),
//! keeps collecting until `commit_window` has passed since the first one, then writes all of it as
//! one fjall batch with one fsync and completes every waiter. Ids are assigned here, in commit
//! order, so a reader paging by id never sees id N+1 committed before id N.
//!
//! Callers encode values on their own tasks (see [`super::keys`]); this thread only builds keys,
//! so it stays lean: it is the serial part of ingestion.
//!
//! Faults (docs/decisions/0027-store-fault-recovery.md): below the low-space watermark new readings
//! are refused before anything is written; after a failed commit (a full disk, an I/O error) fjall
//! refuses every later write on that engine, so the writer refuses requests at once, and every
//! [`RETRY`] tries to drop the engine and open it again from disk (the journal replay keeps every
//! acknowledged batch and cuts a torn tail), until it succeeds.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::{PersistMode, Slice};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::feed::Feed;
use super::health::{Health, Room, Space};
use super::runs::EncodedRun;
use super::{keys, Engine, EngineSlot, StoreError, QUEUE_CAPACITY};
use crate::proto::Reading;

/// Reply channel of a durable request.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// How often a store that refuses writes looks again: free space, or reopening a failed engine.
const RETRY: Duration = Duration::from_secs(1);

/// How long a reopen waits for readers to let go of the failed engine.
const READERS_GRACE: Duration = Duration::from_secs(5);

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
    pub(super) dir: PathBuf,
    pub(super) engine: EngineSlot,
    pub(super) health: Arc<Health>,
    pub(super) space: Space,
    /// Set by a failed commit, cleared by a successful reopen.
    pub(super) failed: Option<String>,
    /// No reopen before this: one attempt per [`RETRY`], however many requests arrive.
    pub(super) next_reopen: Instant,
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
    engine: Arc<Engine>,
    /// What may be written in this batch.
    room: Room,
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
                None => match self.next_request() {
                    Some(req) => req,
                    None => break, // every handle dropped
                },
            };
            let deadline = Instant::now() + self.commit_window;
            let Some(mut batch) = self.new_batch() else {
                // No engine to write to: refused at once, the request says why.
                self.refuse(first, &mut shutdown);
                continue;
            };
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

    /// The next request; while the store refuses writes, it wakes every [`RETRY`] to look again
    /// (recover), so readiness comes back without traffic.
    fn next_request(&mut self) -> Option<Request> {
        loop {
            if self.health.blocked().is_none() {
                return self.rx.recv().ok().map(|q| q.req);
            }
            self.recover();
            match self.rx.recv_timeout(RETRY) {
                Ok(q) => return Some(q.req),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Re-evaluates what may be written, and reopens a failed engine when there is room again.
    fn recover(&mut self) {
        let room = self.space.room();
        if self.failed.is_some() && room == Room::Enough && Instant::now() >= self.next_reopen {
            self.next_reopen = Instant::now() + RETRY;
            self.reopen();
        }
        let blocked = match (&self.failed, room) {
            (Some(error), _) => Some(failed_reason(error)),
            (None, Room::Enough) => None,
            (None, _) => Some(self.space.low_reason()),
        };
        self.health.set(blocked);
    }

    /// Drops every handle to the failed engine and opens it again from disk.
    fn reopen(&mut self) {
        let old = self.engine.write().expect("engine lock").take();
        if let Some(old) = old {
            let old = Arc::downgrade(&old);
            let deadline = Instant::now() + READERS_GRACE;
            while old.strong_count() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let opened = Engine::open(&self.dir).and_then(|engine| {
            let ids = engine.next_ids()?;
            Ok((engine, ids))
        });
        let (engine, (next_reading_id, next_dead_letter_id)) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "store reopen failed; retrying");
                self.failed = Some(format!("{e:#}"));
                return;
            }
        };
        // Ids never go back, also past a failed batch the journal did not keep.
        self.next_reading_id = self.next_reading_id.max(next_reading_id);
        self.next_dead_letter_id = self.next_dead_letter_id.max(next_dead_letter_id);
        // A failed commit's batch can still be in the journal (written, then the fsync failed):
        // it is durable now, so subscribers get it like any commit.
        let published = self.last_reading_id.load(Ordering::Acquire);
        match engine.readings_after(published, usize::MAX) {
            Ok(kept) if !kept.is_empty() => {
                tracing::warn!(
                    readings = kept.len(),
                    "readings of a failed commit survived in the journal; kept (their senders may \
                     send them again)"
                );
                let last = kept.last().map_or(published, |r| r.id);
                self.last_reading_id.store(last, Ordering::Release);
                self.feed.publish(kept);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the recovered journal tail"),
        }
        *self.engine.write().expect("engine lock") = Some(Arc::new(engine));
        self.failed = None;
        metrics::counter!("citygw_store_recoveries_total").increment(1);
        tracing::info!(
            next_reading_id = self.next_reading_id,
            "store engine reopened after a failed commit"
        );
    }

    /// A batch on the current engine, with what the free space allows; `None` when the engine
    /// failed and is not reopened yet.
    fn new_batch(&mut self) -> Option<Batch> {
        if self.failed.is_some() {
            self.recover();
            if self.failed.is_some() {
                return None;
            }
        }
        let room = self.space.room();
        if room != Room::Enough || self.health.blocked().is_some() {
            self.recover();
        }
        let engine = self.engine.read().expect("engine lock").clone()?;
        Some(Batch {
            wb: engine.db.batch().durability(Some(PersistMode::SyncAll)),
            engine,
            room,
            done: Vec::new(),
            weight: 0,
            readings: 0,
            dead_letters: 0,
            committed: Vec::new(),
        })
    }

    /// Answers a request that cannot be written now, without writing anything.
    fn refuse(&mut self, req: Request, shutdown: &mut Option<oneshot::Sender<()>>) {
        let why = self
            .health
            .blocked()
            .unwrap_or_else(|| "the store refuses writes".into());
        let reason = if self.failed.is_some() {
            "engine_failed"
        } else {
            "low_space"
        };
        let refused = || StoreError::Unavailable(why.clone());
        match req {
            Request::Readings { items, done } => {
                let n: usize = items.iter().map(|run| run.readings.len()).sum();
                metrics::counter!("citygw_store_refused_total", "what" => "reading", "reason" => reason)
                    .increment(n as u64);
                if let Some(done) = done {
                    let _ = done.send(Err(refused()));
                }
            }
            Request::DeadLetter { done, .. } => {
                metrics::counter!("citygw_store_refused_total", "what" => "dead_letter", "reason" => reason)
                    .increment(1);
                let _ = done.send(Err(refused()));
            }
            Request::Records { done, .. } | Request::Replicated { done, .. } => {
                metrics::counter!("citygw_store_refused_total", "what" => "record", "reason" => reason)
                    .increment(1);
                let _ = done.send(Err(refused()));
            }
            Request::Shutdown { done } => *shutdown = Some(done),
        }
    }

    /// Assigns ids and stages the request's writes, or refuses what the free space does not allow.
    fn add(&mut self, batch: &mut Batch, req: Request, shutdown: &mut Option<oneshot::Sender<()>>) {
        let allowed = matches!(
            (&req, batch.room),
            (_, Room::Enough)
                | (
                    Request::Records { .. } | Request::Replicated { .. } | Request::Shutdown { .. },
                    _
                )
                | (Request::DeadLetter { .. }, Room::Low)
        );
        if !allowed {
            return self.refuse(req, shutdown);
        }
        batch.weight += req.weight();
        let engine = batch.engine.clone();
        let ks = &engine.ks;
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
                batch.wb.insert(&ks.dead_letters, keys::id_key(id), value);
                batch.dead_letters += 1;
                batch.done.push(Done::DeadLetter(done, id));
            }
            Request::Records {
                table,
                records,
                meta,
                done,
            } => {
                let rows = ks.table(table);
                for (id, record) in records {
                    match record {
                        Some(record) => batch.wb.insert(rows, id, record),
                        None => batch.wb.remove(rows, id),
                    }
                }
                if let Some((key, value)) = meta {
                    batch.wb.insert(&ks.meta, key, keys::id_key(value));
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
                batch
                    .wb
                    .insert(&ks.meta, keys::META_STREAM_SEQ, keys::id_key(stream_seq));
                batch.done.push(Done::Records(done));
            }
            Request::Shutdown { done } => *shutdown = Some(done),
        }
    }

    /// Stages one run under `run_id` (log record, index entries, feed readings). Ids never go
    /// back: the next id assigned here is past the run.
    fn stage_run(&mut self, batch: &mut Batch, run_id: u64, run: EncodedRun) {
        let ks = &batch.engine.ks;
        batch.wb.insert(&ks.log, keys::id_key(run_id), run.value);
        for mut index_key in run.index_prefixes {
            index_key.extend_from_slice(&run_id.to_be_bytes());
            batch.wb.insert(&ks.by_device, index_key, Slice::empty());
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
                &batch.engine.ks.meta,
                keys::META_NEXT_READING_ID,
                keys::id_key(self.next_reading_id),
            );
        }
        if batch.dead_letters > 0 {
            batch.wb.insert(
                &batch.engine.ks.meta,
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
                // entry must never be mistaken for a later reading. The engine refuses every
                // later write now; the writer reopens it (`recover`).
                metrics::counter!("citygw_store_commit_errors_total").increment(1);
                tracing::error!(error = %e, requests, "store commit failed");
                // Reopened by the next request or wake-up, once this batch's handles are gone.
                self.health.set(Some(failed_reason(&e.to_string())));
                self.failed = Some(e.to_string());
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

fn failed_reason(error: &str) -> String {
    format!("storage engine failed ({error}); reopening once there is room")
}
