//! The embedded durable store: readings, the per-device time index, dead letters and registry
//! records, on fjall (an LSM with a write-ahead journal; see docs/decisions/0001-embedded-store.md).
//!
//! Durability is the gateway's promise to devices: an acknowledgement (QoS1 PUBACK, CoAP ACK, bridge
//! ack) is sent only once the reading is fsync'd. Fsync is the expensive part, so one writer thread
//! (`writer.rs`) owns every write and commits whatever is queued as one batch with one fsync (group
//! commit): throughput grows with load instead of being capped at one fsync per reading.
//!
//! Reads never go through the writer; they read fjall snapshots directly from the caller's thread.

mod dead_letters;
mod feed;
mod health;
pub mod jetstream;
mod keys;
mod readings;
mod records;
mod retention;
mod runs;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use tokio::sync::Semaphore;

pub use feed::{Committed, FeedReading};
pub use records::{RecordChange, Table};
pub use retention::RetentionReport;

use writer::{Queued, Request, Writer};

/// How many requests may wait for the writer before senders have to wait for room. This is the
/// gateway's backpressure to the network: a full queue slows acknowledgements, it never drops
/// acknowledged data.
const QUEUE_CAPACITY: usize = 65_536;

/// Tuning of the store; the defaults suit a small gateway.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long the writer keeps collecting after the first request of a batch. Zero still
    /// batches whatever queued up during the previous fsync, which is usually enough; a small
    /// window trades latency for fewer fsyncs when requests trickle in.
    pub commit_window: Duration,
    /// Upper bound on readings (plus dead letters and device records) per commit, to bound the
    /// latency of the requests at the front of a batch.
    pub max_batch: usize,
    /// How long readings and dead letters are kept, by receive time (see
    /// [`Store::enforce_retention`]).
    pub retention: Duration,
    /// Low-space watermark: below this many free bytes on the data directory's filesystem new
    /// readings are refused, keeping room for dead letters, registry records, sink cursors and
    /// the storage engine's own recovery; below half of it dead letters are refused too.
    pub min_free_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            commit_window: Duration::ZERO,
            max_batch: 4096,
            retention: Duration::from_secs(30 * 24 * 3600),
            min_free_bytes: 256 << 20,
        }
    }
}

/// Why a store call failed. `Clone` because one failed group commit fails every request in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store was closed (or is shutting down); nothing from this call was written.
    #[error("store is closed")]
    Closed,
    /// The storage engine failed (I/O, full disk, poisoned journal). After a failed commit the
    /// writer reopens the engine by itself (recovering from the journal) once the cause is gone.
    #[error("storage engine: {0}")]
    Engine(String),
    /// Stored bytes did not decode; points at a bug or disk corruption.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// Refused: free space is below the watermark, the embedded engine failed and is being
    /// reopened, or (cluster mode) JetStream did not acknowledge the write (no quorum, no leader,
    /// timeout). Nothing is acknowledged to the device; a retry may succeed once the cause is gone.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// A refusal without trying ([`StoreError::Unavailable`]): the store logs why once, when it
    /// starts refusing, so callers do not log it once per message (a full disk refuses thousands a
    /// second, and their log lines would fill it further).
    pub fn is_refusal(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<fjall::Error> for StoreError {
    fn from(e: fjall::Error) -> Self {
        StoreError::Engine(e.to_string())
    }
}

/// One open storage engine. After a failed commit fjall refuses every later write on that
/// instance ("poisoned"); the writer then drops every handle and opens a new `Engine` from disk.
pub(crate) struct Engine {
    pub(crate) db: Database,
    pub(crate) ks: Keyspaces,
}

impl Engine {
    fn open(dir: &Path) -> anyhow::Result<Engine> {
        let db = Database::builder(dir)
            .open()
            .with_context(|| format!("opening store at {}", dir.display()))?;
        let ks = Keyspaces::open(&db).context("opening store keyspaces")?;
        Ok(Engine { db, ks })
    }

    /// `(next reading id, next dead letter id)` as the stored data says.
    fn next_ids(&self) -> anyhow::Result<(u64, u64)> {
        let ks = &self.ks;
        let next_reading_id = next_id(
            last_reading_id(&ks.log)?,
            &ks.meta,
            keys::META_NEXT_READING_ID,
        )?;
        let next_dead_letter_id = next_id(
            last_id(&ks.dead_letters)?,
            &ks.meta,
            keys::META_NEXT_DEAD_LETTER_ID,
        )?;
        Ok((next_reading_id, next_dead_letter_id))
    }
}

/// The engine in use; `None` only while the writer reopens it.
pub(crate) type EngineSlot = Arc<RwLock<Option<Arc<Engine>>>>;

/// The keyspaces (handles are cheap `Arc`s).
pub(crate) struct Keyspaces {
    pub(crate) log: Keyspace,
    pub(crate) by_device: Keyspace,
    pub(crate) dead_letters: Keyspace,
    pub(crate) devices: Keyspace,
    pub(crate) agencies: Keyspace,
    pub(crate) operators: Keyspace,
    pub(crate) cursors: Keyspace,
    pub(crate) kpi_snapshots: Keyspace,
    pub(crate) commands: Keyspace,
    pub(crate) alerts: Keyspace,
    pub(crate) meta: Keyspace,
}

impl Keyspaces {
    pub(crate) fn table(&self, table: Table) -> &Keyspace {
        match table {
            Table::Devices => &self.devices,
            Table::Agencies => &self.agencies,
            Table::Operators => &self.operators,
            Table::Cursors => &self.cursors,
            Table::KpiSnapshots => &self.kpi_snapshots,
            Table::Commands => &self.commands,
            Table::Alerts => &self.alerts,
        }
    }

    fn open(db: &Database) -> fjall::Result<Self> {
        let ks = |name| db.keyspace(name, KeyspaceCreateOptions::default);
        Ok(Keyspaces {
            log: ks(keys::LOG)?,
            by_device: ks(keys::BY_DEVICE)?,
            dead_letters: ks(keys::DEAD_LETTERS)?,
            devices: ks(keys::DEVICES)?,
            agencies: ks(keys::AGENCIES)?,
            operators: ks(keys::OPERATORS)?,
            cursors: ks(keys::CURSORS)?,
            kpi_snapshots: ks(keys::KPI_SNAPSHOTS)?,
            commands: ks(keys::COMMANDS)?,
            alerts: ks(keys::ALERTS)?,
            meta: ks(keys::META)?,
        })
    }
}

/// Handle to the store; clone it freely (it is an `Arc`). The last handle dropped without
/// [`Store::close`] still commits what is queued and joins the writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    engine: EngineSlot,
    health: Arc<health::Health>,
    opts: StoreOptions,
    /// `None` only while dropping, so the writer sees the channel close.
    tx: Option<std::sync::mpsc::Sender<Queued>>,
    /// One permit per queued request: the bound of the queue.
    permits: Arc<Semaphore>,
    closed: AtomicBool,
    /// Highest reading id whose commit succeeded; updated by the writer.
    last_reading_id: Arc<AtomicU64>,
    feed: feed::Feed,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Cluster mode: appends and record writes go to JetStream, and this store is the node's
    /// materialised copy (see [`jetstream`]).
    cluster: OnceLock<Arc<jetstream::Cluster>>,
    /// Record changes applied from the cluster, for the in-memory registry.
    changes: tokio::sync::broadcast::Sender<RecordChange>,
}

impl Store {
    /// Opens (or creates) the store under `dir`, replays the journal, and starts the writer.
    pub fn open(dir: &Path, opts: StoreOptions) -> anyhow::Result<Store> {
        let engine = Engine::open(dir)?;
        let (next_reading_id, next_dead_letter_id) = engine.next_ids()?;
        let last_reading = last_reading_id(&engine.ks.log)?.unwrap_or(0);
        let last_reading_id = Arc::new(AtomicU64::new(last_reading));
        let engine: EngineSlot = Arc::new(RwLock::new(Some(Arc::new(engine))));
        let health = Arc::new(health::Health::default());
        metrics::gauge!("citygw_store_writable").set(1.0);
        let permits = Arc::new(Semaphore::new(QUEUE_CAPACITY));
        let (tx, rx) = std::sync::mpsc::channel();
        let feed = feed::Feed::new();

        let writer = Writer {
            dir: PathBuf::from(dir),
            engine: engine.clone(),
            health: health.clone(),
            space: health::Space::new(dir, opts.min_free_bytes),
            failed: None,
            next_reopen: std::time::Instant::now(),
            rx,
            commit_window: opts.commit_window,
            max_batch: opts.max_batch.max(1),
            permits: permits.clone(),
            next_reading_id,
            next_dead_letter_id,
            last_reading_id: last_reading_id.clone(),
            feed: feed.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("citygw-store-writer".into())
            .spawn(move || writer.run())
            .context("spawning the store writer thread")?;

        tracing::info!(
            dir = %dir.display(),
            next_reading_id,
            next_dead_letter_id,
            "store opened"
        );
        Ok(Store {
            inner: Arc::new(Inner {
                engine,
                health,
                opts,
                tx: Some(tx),
                permits,
                closed: AtomicBool::new(false),
                last_reading_id,
                feed,
                writer: Mutex::new(Some(handle)),
                cluster: OnceLock::new(),
                changes: tokio::sync::broadcast::channel(records::CHANGES_CAPACITY).0,
            }),
        })
    }

    /// Switches the store to cluster mode: from now on appends and record writes go to
    /// JetStream, and [`jetstream::Cluster::materialise`] fills this store from the stream.
    pub fn attach_cluster(&self, cluster: Arc<jetstream::Cluster>) {
        let _ = self.inner.cluster.set(cluster);
    }

    /// The cluster backend, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<jetstream::Cluster>> {
        self.inner.cluster.get()
    }

    /// A `u64` kept in the store's meta keyspace (0 when absent).
    pub(crate) fn meta_u64(&self, key: &[u8]) -> Result<u64, StoreError> {
        Ok(match self.engine()?.ks.meta.get(key)? {
            Some(v) => {
                keys::parse_id(&v).ok_or_else(|| StoreError::Corrupt("meta value".into()))?
            }
            None => 0,
        })
    }

    /// Id of the newest committed reading (0 when there is none): where a live stream that must
    /// not miss anything starts before paging with [`Store::readings_after`].
    pub fn last_reading_id(&self) -> u64 {
        self.inner.last_reading_id.load(Ordering::Acquire)
    }

    /// Sets the gauges of the memory the storage engine holds: its write buffers (active and
    /// sealed memtables, which background flushes empty) and its block cache. fjall marks
    /// these two accessors experimental; they are plain reads of its own counters.
    pub fn export_memory_metrics(&self) {
        if let Ok(engine) = self.engine() {
            let db = &engine.db;
            metrics::gauge!("citygw_store_write_buffer_bytes").set(db.write_buffer_size() as f64);
            metrics::gauge!("citygw_store_block_cache_bytes").set(db.cache_size() as f64);
        }
    }

    /// Why the store refuses new data right now (a full disk, a failed engine being reopened),
    /// or `None` when it takes writes: what `/readyz` reports.
    pub fn unwritable(&self) -> Option<String> {
        self.inner.health.blocked()
    }

    /// The engine to read from; unavailable only for the moment the writer reopens it.
    pub(crate) fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.inner
            .engine
            .read()
            .expect("engine lock")
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the storage engine is being reopened".into()))
    }

    /// Readings as they are committed (after their fsync), in id order: the source of live
    /// subscriptions. A receiver that falls behind gets `Lagged` and must catch up from
    /// [`Store::readings_after`], which holds everything the feed ever carried.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Committed> {
        self.inner.feed.subscribe()
    }

    /// Stops accepting, commits and fsyncs what is queued, joins the writer thread. Calls made
    /// after (or racing with) close fail with [`StoreError::Closed`] rather than hang. Reads keep
    /// working; the directory is unlocked once the last handle is dropped.
    pub async fn close(&self) {
        let inner = &self.inner;
        if !inner.closed.swap(true, Ordering::AcqRel) {
            let (done, finished) = tokio::sync::oneshot::channel();
            if let Some(tx) = &inner.tx {
                // Bypasses the permits: shutdown must not wait behind a full queue.
                let _ = tx.send(Queued::unbounded(Request::Shutdown { done }));
            }
            inner.permits.close();
            let _ = finished.await;
        }
        let handle = inner.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let joined = tokio::task::spawn_blocking(move || handle.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::warn!("store writer thread panicked");
            }
        }
    }

    /// Queues a request for the writer, waiting for room in the queue (backpressure).
    async fn submit(&self, req: Request) -> Result<(), StoreError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let permit = inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let tx = inner.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Queued::new(req, permit))
            .map_err(|_| StoreError::Closed)
    }

    /// Queues a request if there is room right now; `false` when full or closed.
    fn try_submit(&self, req: Request) -> bool {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return false;
        }
        let Ok(permit) = inner.permits.clone().try_acquire_owned() else {
            return false;
        };
        inner
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(Queued::new(req, permit)).is_ok())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel makes the writer commit what is queued and exit; joining it
        // releases its database handle, so the directory can be reopened right away.
        drop(self.tx.take());
        let handle = self.writer.get_mut().ok().and_then(|h| h.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// Last id key of an id-keyed keyspace.
fn last_id(ks: &Keyspace) -> anyhow::Result<Option<u64>> {
    match ks.last_key_value() {
        None => Ok(None),
        Some(guard) => {
            let key = guard.key().context("reading the last id")?;
            Ok(Some(keys::parse_id(&key).context("malformed id key")?))
        }
    }
}

/// Id of the last reading of the last run in the log.
fn last_reading_id(log: &Keyspace) -> anyhow::Result<Option<u64>> {
    match log.last_key_value() {
        None => Ok(None),
        Some(guard) => {
            let (key, value) = guard.into_inner().context("reading the last run")?;
            Ok(Some(runs::Run::decode(&key, &value)?.last_id()))
        }
    }
}

/// The first id never handed out: past both the newest stored id and the recorded high-water
/// mark (retention may have deleted the newest records). Ids start at 1 so 0 can mean "from the
/// start".
fn next_id(last: Option<u64>, meta: &Keyspace, meta_key: &[u8]) -> anyhow::Result<u64> {
    let from_keys = last.map_or(1, |id| id + 1);
    let from_meta = match meta.get(meta_key).context("reading store meta")? {
        Some(v) => keys::parse_id(&v).context("malformed id in store meta")?,
        None => 1,
    };
    Ok(from_keys.max(from_meta))
}
