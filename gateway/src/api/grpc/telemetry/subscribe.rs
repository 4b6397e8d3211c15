//! Live subscriptions: catch up from the store, then follow the committed-readings feed.
//!
//! No gaps, no duplicates: the subscription listens to the feed *before* it reads the store, and
//! a cursor (the last reading id looked at) drops whatever the feed repeats. A subscription that
//! falls behind the feed itself catches up from the store again, silently. A *client* too slow
//! for its buffer is told: the stream ends with RESOURCE_EXHAUSTED and the id to resume after.
//!
//! `Subscribe` sends each reading as its own message, `SubscribeBatches` sends `ReadingBatch`
//! messages ([`Framing`]); everything else is one code path. The buffer counts readings in both
//! (a semaphore of `grpc.subscription_buffer` permits, one per queued reading). A batch
//! subscriber gets one batch per commit while it keeps up; while it does not, the readings that
//! arrive meanwhile join the batch being built, so a slower client gets fewer, larger batches
//! before it gets cut off.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::pages::PageCache;
use super::routes::Encoded;
use super::scope::Selection;
use crate::proto::{resume_point::Point, Reading, ResumePoint};
use crate::registry::agencies::{Agencies, Agency};
use crate::store::{FeedReading, Store, StoreError};

/// Trailer carrying the resume point when a subscription ends early.
pub const RESUME_TRAILER: &str = "citygw-resume-after-id";
/// How long a full buffer may stay full before the client counts as too slow: a client that
/// hiccups (a GC pause, a burst) keeps its stream; one that stopped reading is told.
const OVERFLOW_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
/// Most readings in one `ReadingBatch`: one page of the store, a few group commits.
pub const MAX_BATCH_READINGS: usize = 1024;
/// A batch is closed once it passes this size, well below the 4 MiB that gRPC clients accept
/// by default.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Protobuf key of `ReadingBatch.readings` (field 1, length-delimited).
const READINGS_KEY: u8 = (1 << 3) | 2;

pub type ReadingStream = Pin<Box<dyn Stream<Item = Result<Reading, Status>> + Send>>;
/// The Subscribe and SubscribeBatches streams: messages already encoded (see [`super::routes`]).
pub type EncodedStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

/// How readings are put into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Subscribe`: one `Reading` per message.
    Each,
    /// `SubscribeBatches`: `ReadingBatch` messages.
    Batches,
}

pub struct Subscription {
    pub store: Store,
    pub pages: Arc<PageCache>,
    pub agencies: Agencies,
    pub agency: Arc<Agency>,
    pub selection: Selection,
    pub buffer: usize,
    pub framing: Framing,
}

/// How the subscription task ended, when the client must be told.
enum End {
    /// The client went away or the gateway is stopping: nothing to say.
    Quiet,
    Tell(Status),
}

/// A message on its way to the client, holding its readings' room in the buffer until the
/// gRPC encoder takes it.
type Queued = (Bytes, OwnedSemaphorePermit);

impl Subscription {
    /// Starts the subscription task and returns the stream the client reads.
    pub async fn start(self, resume: Option<ResumePoint>) -> Result<EncodedStream, Status> {
        let feed = self.store.subscribe();
        let last = self.store.last_reading_id();
        let mut since = None;
        let cursor = match resume.and_then(|r| r.point) {
            None => last,
            // A resume point this store never handed out means the client talks to another
            // (or a wiped) store: following it silently would lose data.
            Some(Point::AfterId(id)) if id > last => {
                return Err(Status::out_of_range(format!(
                    "resume after_id {id} is beyond the newest stored reading ({last})"
                )));
            }
            Some(Point::AfterId(id)) => id,
            Some(Point::SinceMs(ms)) => {
                since = Some(ms);
                let store = self.store.clone();
                blocking(move || store.first_reading_received_since(ms)).await? - 1
            }
        };
        let (tx, rx) = mpsc::unbounded_channel::<Queued>();
        let (end_tx, end_rx) = oneshot::channel::<Status>();
        let out = Outbox::new(&self, tx);
        let messages = out.start_stream(rx);
        let agency = self.agency.name.clone();
        metrics::gauge!("citygw_subscribers", "agency" => agency.clone()).increment(1.0);
        tokio::spawn(async move {
            let end = self.run(feed, cursor, since, out).await;
            metrics::gauge!("citygw_subscribers", "agency" => agency).decrement(1.0);
            if let End::Tell(status) = end {
                let _ = end_tx.send(status);
            }
        });
        // Buffered messages first, then the reason the stream ended (if any).
        let ending = futures::stream::once(end_rx).filter_map(|r| async move { r.ok().map(Err) });
        Ok(Box::pin(messages.chain(ending)))
    }

    /// `since`: only readings received at or after it (a resume by time may name the future).
    async fn run(
        self,
        mut feed: broadcast::Receiver<crate::store::Committed>,
        mut cursor: u64,
        since: Option<i64>,
        mut out: Outbox,
    ) -> End {
        let wanted = |r: &Reading| {
            self.selection.matches(r) && since.is_none_or(|s| r.received_time_ms >= s)
        };
        if let Err(end) = self.catch_up(&mut cursor, &wanted, &mut out).await {
            return end;
        }
        loop {
            let batch = tokio::select! {
                b = feed.recv() => b,
                // The client took everything sent: send what gathered meanwhile.
                _ = out.drained.notified(), if out.pending.count > 0 => {
                    out.send_if_idle();
                    continue;
                }
                _ = out.tx.closed() => return End::Quiet,
            };
            match batch {
                Ok(batch) => {
                    if let Err(end) = self.still_authorised() {
                        return end;
                    }
                    let seen = cursor;
                    for shared in batch.iter().filter(|f| f.reading.id > seen) {
                        if wanted(&shared.reading) {
                            if let Err(end) = out.push(shared, Some(OVERFLOW_GRACE)).await {
                                return end;
                            }
                        }
                        cursor = shared.reading.id;
                    }
                    out.send_if_idle();
                }
                // This task (not the client) fell behind the feed: the store has it all.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Err(end) = self.catch_up(&mut cursor, &wanted, &mut out).await {
                        return end;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return out.end(Status::unavailable("gateway shutting down"), cursor);
                }
            }
        }
    }

    /// Sends stored readings after `cursor` until the store has no more. The client sets the
    /// pace here (sending waits for room without a deadline), since these readings wait safely
    /// on disk.
    async fn catch_up(
        &self,
        cursor: &mut u64,
        wanted: &impl Fn(&Reading) -> bool,
        out: &mut Outbox,
    ) -> Result<(), End> {
        loop {
            self.still_authorised()?;
            let page = self.pages.after(*cursor).await.map_err(End::Tell)?;
            for shared in page.readings.iter().filter(|f| f.reading.id > *cursor) {
                if wanted(&shared.reading) {
                    let waited = out.push(shared, None).await?;
                    // A page can take the client a while; a revoked token stops it mid-page.
                    if waited {
                        self.still_authorised()?;
                    }
                }
            }
            out.send_if_idle();
            if page.end <= *cursor {
                return Ok(());
            }
            *cursor = page.end;
        }
    }

    fn still_authorised(&self) -> Result<(), End> {
        if self.agencies.is_current(&self.agency) {
            Ok(())
        } else {
            Err(End::Tell(Status::unauthenticated("agency token revoked")))
        }
    }
}

/// The readings of a subscription on their way out: the message being built and the buffer.
struct Outbox {
    tx: mpsc::UnboundedSender<Queued>,
    /// One permit per reading queued for the client, the message being built included.
    room: Arc<Semaphore>,
    /// Messages sent that the client's stream has not taken yet, and the signal that it took
    /// the last one (see [`Outbox::start_stream`]).
    unread: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    buffer: usize,
    pending: Pending,
    /// Readings per message: 1 for `Subscribe`, up to [`MAX_BATCH_READINGS`] for batches.
    per_message: usize,
    agency: String,
    streamed: metrics::Counter,
}

/// The message being built, and the buffer room its readings hold.
struct Pending {
    framing: Framing,
    /// `Each`: the reading's encoding; `Batches`: `ReadingBatch` fields.
    bytes: BytesMut,
    single: Option<Bytes>,
    count: usize,
    room: Option<OwnedSemaphorePermit>,
}

impl Pending {
    fn push(&mut self, shared: &FeedReading, room: OwnedSemaphorePermit) {
        let encoded = shared.encoded();
        match self.framing {
            Framing::Each => self.single = Some(encoded),
            Framing::Batches => {
                self.bytes.put_u8(READINGS_KEY);
                prost::encoding::encode_varint(encoded.len() as u64, &mut self.bytes);
                self.bytes.extend_from_slice(&encoded);
            }
        }
        match &mut self.room {
            Some(held) => held.merge(room),
            None => self.room = Some(room),
        }
        self.count += 1;
    }
}

impl Outbox {
    fn new(sub: &Subscription, tx: mpsc::UnboundedSender<Queued>) -> Outbox {
        let per_message = match sub.framing {
            Framing::Each => 1,
            Framing::Batches => MAX_BATCH_READINGS.min(sub.buffer),
        };
        Outbox {
            tx,
            room: Arc::new(Semaphore::new(sub.buffer)),
            unread: Arc::default(),
            drained: Arc::default(),
            buffer: sub.buffer,
            pending: Pending {
                framing: sub.framing,
                bytes: BytesMut::new(),
                single: None,
                count: 0,
                room: None,
            },
            per_message,
            agency: sub.agency.name.clone(),
            streamed: metrics::counter!("citygw_readings_streamed_total", "agency" => sub.agency.name.clone()),
        }
    }

    /// The client's side of the channel: each message gives back its readings' room, and the
    /// last unread one wakes the task to send what it gathered meanwhile.
    fn start_stream(
        &self,
        rx: mpsc::UnboundedReceiver<Queued>,
    ) -> impl Stream<Item = Result<Encoded, Status>> + Send + 'static {
        let (unread, drained) = (self.unread.clone(), self.drained.clone());
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |(bytes, _room)| {
            if unread.fetch_sub(1, Ordering::AcqRel) == 1 {
                drained.notify_one();
            }
            Ok(Encoded(bytes))
        })
    }

    /// Adds a wanted reading, waiting for room in the buffer: at most `grace` (then the client
    /// is too slow and the stream ends), or as long as it takes. A full message is sent at once.
    /// Returns whether it had to wait.
    async fn push(
        &mut self,
        shared: &FeedReading,
        grace: Option<std::time::Duration>,
    ) -> Result<bool, End> {
        if self.tx.is_closed() {
            return Err(End::Quiet);
        }
        let (room, waited) = match self.room.clone().try_acquire_owned() {
            Ok(room) => (room, false),
            Err(_) => {
                let acquire = self.room.clone().acquire_owned();
                let wait = async move {
                    match grace {
                        None => Ok(acquire.await),
                        Some(grace) => tokio::time::timeout(grace, acquire).await,
                    }
                };
                let room = tokio::select! {
                    r = wait => match r {
                        Ok(room) => room,
                        Err(_) => return Err(self.overflow(shared.reading.id - 1)),
                    },
                    // The client left (its queued messages, and their room, went with it).
                    _ = self.tx.closed() => return Err(End::Quiet),
                };
                (room.map_err(|_| End::Quiet)?, true)
            }
        };
        self.pending.push(shared, room);
        if self.pending.count >= self.per_message || self.pending.bytes.len() >= MAX_BATCH_BYTES {
            self.send();
        }
        Ok(waited)
    }

    /// Sends the message being built unless the client has not taken the previous ones yet: then
    /// it keeps growing (the drained signal or a full message sends it).
    fn send_if_idle(&mut self) {
        if self.pending.count > 0 && self.unread.load(Ordering::Acquire) == 0 {
            self.send();
        }
    }

    fn send(&mut self) {
        let n = self.pending.count;
        if n == 0 {
            return;
        }
        let bytes = match self.pending.framing {
            Framing::Each => self.pending.single.take().unwrap_or_default(),
            Framing::Batches => self.pending.bytes.split().freeze(),
        };
        let room = self
            .pending
            .room
            .take()
            .expect("room held by pending readings");
        self.pending.count = 0;
        self.unread.fetch_add(1, Ordering::AcqRel);
        // A closed channel means the client left; the task notices at its next select.
        let _ = self.tx.send((bytes, room));
        self.streamed.increment(n as u64);
    }

    /// Ends the stream with `status`, after what was gathered (it has its room): the client
    /// resumes after `resume_after`, everything wanted up to there having been sent.
    fn end(&mut self, status: Status, resume_after: u64) -> End {
        self.send();
        End::Tell(status.with_resume(resume_after))
    }

    fn overflow(&mut self, resume_after: u64) -> End {
        metrics::counter!("citygw_subscriber_overflows_total", "agency" => self.agency.clone())
            .increment(1);
        tracing::warn!(agency = %self.agency, resume_after, buffer = self.buffer, "slow subscriber ended");
        let status = Status::resource_exhausted(format!(
            "subscriber too slow: its buffer of {} readings is full; subscribe again with resume.after_id = {resume_after} to continue without loss",
            self.buffer
        ));
        self.end(status, resume_after)
    }
}

trait WithResume {
    fn with_resume(self, after_id: u64) -> Status;
}

impl WithResume for Status {
    fn with_resume(self, after_id: u64) -> Status {
        let mut md = MetadataMap::new();
        md.insert(
            RESUME_TRAILER,
            after_id
                .to_string()
                .parse()
                .expect("digits are a valid header"),
        );
        Status::with_metadata(self.code(), self.message().to_string(), md)
    }
}

/// Runs a store read off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))?
        .map_err(|e| Status::unavailable(format!("store: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn a_batch_is_the_readings_encodings_behind_the_field_key() {
        let readings: Vec<Reading> = (1..=3)
            .map(|i| Reading {
                id: i,
                device_id: format!("d-{i}"),
                quantity: "x".repeat(200 * i as usize),
                ..Default::default()
            })
            .collect();
        let room = Arc::new(Semaphore::new(3));
        let mut pending = Pending {
            framing: Framing::Batches,
            bytes: BytesMut::new(),
            single: None,
            count: 0,
            room: None,
        };
        for r in &readings {
            pending.push(
                &FeedReading::new(r.clone()),
                room.clone().try_acquire_owned().unwrap(),
            );
        }
        assert_eq!(room.available_permits(), 0);
        let batch = crate::proto::ReadingBatch::decode(pending.bytes.split().freeze()).unwrap();
        assert_eq!(batch.readings, readings);
        drop(pending);
        assert_eq!(room.available_permits(), 3);
    }
}
