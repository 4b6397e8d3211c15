//! The forwarder: one task per sink, following the store's log with a durable cursor.
//!
//! The store is the buffer. The forwarder reads the readings after its cursor, sends them as a
//! batch, and advances (and persists) the cursor only once the sink accepted them, so a sink that
//! is down for hours, or a gateway killed mid-batch, loses nothing (at-least-once; InfluxDB and
//! compatible stores overwrite an identical point, so a repeat changes nothing). Retryable
//! failures back off exponentially with jitter and honour Retry-After; a batch the sink refuses
//! as bad data is split in halves until the bad readings are isolated, which are dead-lettered,
//! and the rest is delivered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Sink, WriteOutcome};
use crate::pipeline::{now_ms, Pipeline, Rejection};
use crate::proto::{Protocol, Reading};
use crate::reason;
use crate::store::{Store, StoreError, Table};

/// Tuning of one forwarder.
#[derive(Debug, Clone)]
pub struct ForwarderOptions {
    /// Most readings per write.
    pub batch_max: usize,
    /// How long a partial batch waits for more readings before it is sent.
    pub linger: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// Progress of one forwarder, shared with status reporting.
#[derive(Debug, Default)]
pub struct Progress {
    /// Id of the last reading the sink accepted (or that was dead-lettered).
    pub cursor: AtomicU64,
    /// Unix ms of the last accepted write; 0 before the first.
    pub last_success_ms: std::sync::atomic::AtomicI64,
}

pub struct Forwarder {
    pub sink: Arc<dyn Sink>,
    pub store: Store,
    pub pipeline: Pipeline,
    pub options: ForwarderOptions,
    pub progress: Arc<Progress>,
    /// Cluster mode: forward only while this node holds the sink's lease (the cursor is
    /// replicated, so whoever takes over continues where the last holder stopped).
    pub lease: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Cursor key of a sink in the `cursors` table.
fn cursor_key(sink: &str) -> String {
    format!("sink/{sink}")
}

/// The persisted cursor of a sink (0: from the start of the store).
pub fn load_cursor(store: &Store, sink: &str) -> Result<u64, StoreError> {
    let key = cursor_key(sink);
    Ok(store
        .load_records(Table::Cursors)?
        .into_iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0))
}

impl Forwarder {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let name = self.sink.name().to_string();
        let mut feed = self.store.subscribe();
        let mut backoff = self.options.backoff_min;
        loop {
            if !self.hold_lease(&name, &shutdown).await {
                return;
            }
            let cursor = self.progress.cursor.load(Ordering::Acquire);
            let batch = match self.next_batch(cursor, &mut feed, &shutdown).await {
                Some(Ok(batch)) => batch,
                Some(Err(e)) => {
                    tracing::warn!(sink = %name, error = %e, "store read failed");
                    if sleep_or_stop(Duration::from_secs(1), &shutdown).await {
                        return;
                    }
                    continue;
                }
                None => return,
            };
            match self.deliver(&batch).await {
                Ok(()) => {
                    backoff = self.options.backoff_min;
                    let last = batch.last().map_or(cursor, |r| r.id);
                    if let Err(e) = self.advance(&name, last).await {
                        tracing::warn!(sink = %name, error = %e, "cursor not saved");
                    }
                }
                Err(Retry { done, retry_after }) => {
                    // Halves already delivered or dead-lettered while isolating bad readings are
                    // not sent (or dead-lettered) again.
                    if done > 0 {
                        if let Err(e) = self.advance(&name, batch[done - 1].id).await {
                            tracing::warn!(sink = %name, error = %e, "cursor not saved");
                        }
                    }
                    let wait = retry_after.unwrap_or(backoff).min(self.options.backoff_max);
                    metrics::counter!("citygw_sink_retries_total", "sink" => name.clone())
                        .increment(1);
                    backoff = (backoff * 2).min(self.options.backoff_max);
                    if sleep_or_stop(jitter(wait), &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Cluster mode: waits until this node holds the sink's lease, following the replicated
    /// cursor meanwhile (for status and retention). False when shutting down.
    async fn hold_lease(&mut self, name: &str, shutdown: &CancellationToken) -> bool {
        let Some(lease) = &mut self.lease else {
            return true;
        };
        if *lease.borrow() {
            return true;
        }
        metrics::gauge!("citygw_sink_lease_held", "sink" => name.to_string()).set(0.0);
        loop {
            match load_cursor(&self.store, name) {
                Ok(c) => self.progress.cursor.store(c, Ordering::Release),
                Err(e) => tracing::warn!(sink = %name, error = %e, "cursor not readable"),
            }
            if *lease.borrow_and_update() {
                tracing::info!(sink = %name, cursor = self.progress.cursor.load(Ordering::Acquire), "forwarding from this node");
                metrics::gauge!("citygw_sink_lease_held", "sink" => name.to_string()).set(1.0);
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = lease.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Readings after `cursor`: a full batch at once, a partial one after `linger`, nothing
    /// until the store has something. None when shutting down.
    async fn next_batch(
        &self,
        cursor: u64,
        feed: &mut tokio::sync::broadcast::Receiver<crate::store::Committed>,
        shutdown: &CancellationToken,
    ) -> Option<Result<Vec<Reading>, StoreError>> {
        let started = Instant::now();
        loop {
            let (store, max) = (self.store.clone(), self.options.batch_max);
            let batch = match tokio::task::spawn_blocking(move || store.readings_after(cursor, max))
                .await
            {
                Ok(r) => r,
                Err(e) => return Some(Err(StoreError::Engine(e.to_string()))),
            };
            match batch {
                Ok(b)
                    if b.len() >= max
                        || (!b.is_empty() && started.elapsed() >= self.options.linger) =>
                {
                    return Some(Ok(b));
                }
                Err(e) => return Some(Err(e)),
                Ok(_) => {}
            }
            let wait = self
                .options
                .linger
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(10));
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = feed.recv() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Sends a batch, splitting refused batches down to the bad readings (dead-lettered).
    /// `Err` when the sink asked to try again later, saying how many leading readings are done.
    async fn deliver(&self, batch: &[Reading]) -> Result<(), Retry> {
        let name = self.sink.name().to_string();
        let started = Instant::now();
        let outcome = self.sink.write(batch).await;
        metrics::histogram!("citygw_sink_write_seconds", "sink" => name.clone())
            .record(started.elapsed().as_secs_f64());
        match outcome {
            WriteOutcome::Ok => {
                metrics::counter!("citygw_sink_batches_total", "sink" => name.clone()).increment(1);
                metrics::counter!("citygw_sink_points_total", "sink" => name)
                    .increment(batch.len() as u64);
                Ok(())
            }
            WriteOutcome::Retry {
                status,
                retry_after,
                message,
            } => {
                let status = status.map_or_else(|| "network".to_string(), |s| s.to_string());
                metrics::counter!("citygw_sink_errors_total", "sink" => name.clone(), "status" => status.clone())
                    .increment(1);
                tracing::warn!(sink = %name, %status, %message, "sink unavailable, will retry");
                Err(Retry {
                    done: 0,
                    retry_after,
                })
            }
            WriteOutcome::Rejected { status, message } => {
                metrics::counter!("citygw_sink_errors_total", "sink" => name.clone(), "status" => status.to_string())
                    .increment(1);
                if batch.len() == 1 {
                    let r = &batch[0];
                    let rejection = Rejection::new(
                        reason::SINK_REJECTED,
                        format!("{name} ({status}): {message}"),
                    );
                    self.pipeline
                        .dead_letter_reading(
                            r,
                            Protocol::try_from(r.protocol).unwrap_or(Protocol::Unspecified),
                            &rejection,
                        )
                        .await;
                    return Ok(());
                }
                let (left, right) = batch.split_at(batch.len() / 2);
                Box::pin(self.deliver(left)).await?;
                Box::pin(self.deliver(right)).await.map_err(|r| Retry {
                    done: left.len() + r.done,
                    ..r
                })
            }
        }
    }

    async fn advance(&self, name: &str, last: u64) -> Result<(), StoreError> {
        self.store
            .put_records(
                Table::Cursors,
                vec![(cursor_key(name), Some(last.to_be_bytes().to_vec()))],
            )
            .await?;
        self.progress.cursor.store(last, Ordering::Release);
        self.progress
            .last_success_ms
            .store(now_ms(), Ordering::Release);
        Ok(())
    }
}

/// The sink asked to try again later; the first `done` readings of the batch are settled.
struct Retry {
    done: usize,
    retry_after: Option<Duration>,
}

/// Sleeps, or returns true at once when shutting down.
async fn sleep_or_stop(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}

/// 50–100 % of `wait`, so many gateways do not retry in lock-step.
fn jitter(wait: Duration) -> Duration {
    use rand::Rng;
    wait.mul_f64(rand::rng().random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::proto::reading::Value;

    /// A test double standing in for a time-series server (the real ones are exercised by the
    /// end-to-end tests): refuses readings whose quantity is "bad", is "down" while `down` is
    /// set, and records what it accepted.
    #[derive(Default)]
    struct FakeSink {
        accepted: Mutex<Vec<u64>>,
        down: std::sync::atomic::AtomicBool,
        writes: AtomicU64,
    }

    #[async_trait::async_trait]
    impl Sink for FakeSink {
        fn name(&self) -> &str {
            "fake"
        }
        async fn write(&self, batch: &[Reading]) -> WriteOutcome {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if self.down.load(Ordering::Relaxed) {
                return WriteOutcome::Retry {
                    status: Some(503),
                    retry_after: Some(Duration::from_millis(5)),
                    message: "down".into(),
                };
            }
            if batch.iter().any(|r| r.quantity == "bad") {
                return WriteOutcome::Rejected {
                    status: 400,
                    message: "field type conflict".into(),
                };
            }
            self.accepted
                .lock()
                .unwrap()
                .extend(batch.iter().map(|r| r.id));
            WriteOutcome::Ok
        }
    }

    fn reading(i: u64) -> Reading {
        Reading {
            device_id: format!("d{}", i % 3),
            quantity: if i == 5 { "bad".into() } else { "level".into() },
            value: Some(Value::Number(i as f64)),
            device_time_ms: i as i64,
            received_time_ms: i as i64,
            ..Default::default()
        }
    }

    fn options() -> ForwarderOptions {
        ForwarderOptions {
            batch_max: 4,
            linger: Duration::from_millis(20),
            backoff_min: Duration::from_millis(5),
            backoff_max: Duration::from_millis(50),
        }
    }

    async fn wait_for(mut pred: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pred() {
            assert!(Instant::now() < deadline, "condition not reached");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn delivers_in_order_isolates_bad_points_and_survives_outages_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        let pipeline = Pipeline::new(store.clone(), 1 << 20);
        let sink = Arc::new(FakeSink::default());
        sink.down.store(true, Ordering::Relaxed);
        for i in 1..=10 {
            store.append(vec![reading(i)]).await.unwrap();
        }
        let start = |progress: Arc<Progress>| {
            let shutdown = CancellationToken::new();
            let forwarder = Forwarder {
                sink: sink.clone(),
                store: store.clone(),
                pipeline: pipeline.clone(),
                options: options(),
                progress,
                lease: None,
            };
            (tokio::spawn(forwarder.run(shutdown.clone())), shutdown)
        };
        let progress = Arc::new(Progress::default());
        let (task, shutdown) = start(progress.clone());
        // Down: retried, nothing accepted, cursor unmoved.
        wait_for(|| sink.writes.load(Ordering::Relaxed) >= 3).await;
        assert_eq!(progress.cursor.load(Ordering::Acquire), 0);
        sink.down.store(false, Ordering::Relaxed);
        wait_for(|| progress.cursor.load(Ordering::Acquire) == 10).await;
        let expected: Vec<u64> = (1..=10).filter(|&i| i != 5).collect();
        assert_eq!(*sink.accepted.lock().unwrap(), expected);
        let dead = store.dead_letters(None, 0, 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].reason.as_str(), dead[0].address.as_str()),
            ("sink_rejected", "reading 5")
        );
        shutdown.cancel();
        task.await.unwrap();

        // A new forwarder resumes from the persisted cursor: nothing is sent twice.
        assert_eq!(load_cursor(&store, "fake").unwrap(), 10);
        store.append(vec![reading(11)]).await.unwrap();
        let progress = Arc::new(Progress::default());
        progress
            .cursor
            .store(load_cursor(&store, "fake").unwrap(), Ordering::Release);
        let (task, shutdown) = start(progress.clone());
        wait_for(|| progress.cursor.load(Ordering::Acquire) == 11).await;
        assert_eq!(
            sink.accepted
                .lock()
                .unwrap()
                .iter()
                .filter(|&&i| i == 11)
                .count(),
            1
        );
        assert_eq!(sink.accepted.lock().unwrap().len(), 10);
        shutdown.cancel();
        task.await.unwrap();
        store.close().await;
    }
}
