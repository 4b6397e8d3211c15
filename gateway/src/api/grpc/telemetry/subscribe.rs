//! Live subscriptions: catch up from the store, then follow the committed-readings feed.
//!
//! No gaps, no duplicates: the subscription listens to the feed *before* it reads the store, and
//! a cursor (the last reading id looked at) drops whatever the feed repeats. A subscription that
//! falls behind the feed itself catches up from the store again, silently. A *client* too slow
//! for its buffer is told: the stream ends with RESOURCE_EXHAUSTED and the id to resume after.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::pages::PageCache;
use super::routes::Encoded;
use super::scope::Selection;
use crate::proto::{resume_point::Point, Reading, ResumePoint};
use crate::registry::agencies::{Agencies, Agency};
use crate::store::{Store, StoreError};

/// Trailer carrying the resume point when a subscription ends early.
pub const RESUME_TRAILER: &str = "citygw-resume-after-id";
/// How long a full buffer may stay full before the client counts as too slow: a client that
/// hiccups (a GC pause, a burst) keeps its stream; one that stopped reading is told.
const OVERFLOW_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

pub type ReadingStream = Pin<Box<dyn Stream<Item = Result<Reading, Status>> + Send>>;
/// The Subscribe stream: readings already encoded (see [`super::routes`]).
pub type EncodedStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

pub struct Subscription {
    pub store: Store,
    pub pages: Arc<PageCache>,
    pub agencies: Agencies,
    pub agency: Arc<Agency>,
    pub selection: Selection,
    pub buffer: usize,
}

/// How the subscription task ended, when the client must be told.
enum End {
    /// The client went away or the gateway is stopping: nothing to say.
    Quiet,
    Tell(Status),
}

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
        let (tx, rx) = mpsc::channel(self.buffer);
        let (end_tx, end_rx) = oneshot::channel::<Status>();
        let agency = self.agency.name.clone();
        metrics::gauge!("citygw_subscribers", "agency" => agency.clone()).increment(1.0);
        tokio::spawn(async move {
            let end = self.run(feed, cursor, since, tx).await;
            metrics::gauge!("citygw_subscribers", "agency" => agency).decrement(1.0);
            if let End::Tell(status) = end {
                let _ = end_tx.send(status);
            }
        });
        // Buffered readings first, then the reason the stream ended (if any).
        let readings = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        let ending = futures::stream::once(end_rx).filter_map(|r| async move { r.ok().map(Err) });
        Ok(Box::pin(readings.chain(ending)))
    }

    /// `since`: only readings received at or after it (a resume by time may name the future).
    async fn run(
        self,
        mut feed: broadcast::Receiver<crate::store::Committed>,
        mut cursor: u64,
        since: Option<i64>,
        tx: mpsc::Sender<Encoded>,
    ) -> End {
        let wanted = |r: &Reading| {
            self.selection.matches(r) && since.is_none_or(|s| r.received_time_ms >= s)
        };
        let streamed = metrics::counter!("citygw_readings_streamed_total", "agency" => self.agency.name.clone());
        if let Err(end) = self.catch_up(&mut cursor, &wanted, &tx, &streamed).await {
            return end;
        }
        loop {
            let batch = tokio::select! {
                b = feed.recv() => b,
                _ = tx.closed() => return End::Quiet,
            };
            match batch {
                Ok(batch) => {
                    if let Err(end) = self.still_authorised() {
                        return end;
                    }
                    let seen = cursor;
                    for shared in batch.iter().filter(|f| f.reading.id > seen) {
                        let r = &shared.reading;
                        if wanted(r) {
                            let id = r.id;
                            match tx.try_send(Encoded(shared.encoded())) {
                                Ok(()) => streamed.increment(1),
                                Err(mpsc::error::TrySendError::Full(encoded)) => {
                                    match tokio::time::timeout(OVERFLOW_GRACE, tx.send(encoded))
                                        .await
                                    {
                                        Ok(Ok(())) => streamed.increment(1),
                                        Ok(Err(_)) => return End::Quiet,
                                        Err(_) => return self.overflow(id - 1),
                                    }
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => return End::Quiet,
                            }
                        }
                        cursor = r.id;
                    }
                }
                // This task (not the client) fell behind the feed: the store has it all.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Err(end) = self.catch_up(&mut cursor, &wanted, &tx, &streamed).await {
                        return end;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return End::Tell(
                        Status::unavailable("gateway shutting down").with_resume(cursor),
                    );
                }
            }
        }
    }

    /// Sends stored readings after `cursor` until the store has no more. The client sets the
    /// pace here (the send waits), since these readings wait safely on disk.
    async fn catch_up(
        &self,
        cursor: &mut u64,
        wanted: &impl Fn(&Reading) -> bool,
        tx: &mpsc::Sender<Encoded>,
        streamed: &metrics::Counter,
    ) -> Result<(), End> {
        loop {
            self.still_authorised()?;
            let page = self.pages.after(*cursor).await.map_err(End::Tell)?;
            for shared in page.readings.iter().filter(|f| f.reading.id > *cursor) {
                if wanted(&shared.reading) {
                    tx.send(Encoded(shared.encoded()))
                        .await
                        .map_err(|_| End::Quiet)?;
                    streamed.increment(1);
                    // A page can take the client a while; a revoked token stops it mid-page.
                    self.still_authorised()?;
                }
            }
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

    fn overflow(&self, resume_after: u64) -> End {
        metrics::counter!("citygw_subscriber_overflows_total", "agency" => self.agency.name.clone()).increment(1);
        tracing::warn!(agency = %self.agency.name, resume_after, buffer = self.buffer, "slow subscriber ended");
        End::Tell(
            Status::resource_exhausted(format!(
                "subscriber too slow: its buffer of {} readings is full; subscribe again with resume.after_id = {resume_after} to continue without loss",
                self.buffer
            ))
            .with_resume(resume_after),
        )
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
