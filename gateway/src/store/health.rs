//! Whether the store can take writes, and why not: a full disk, or a storage engine that failed a
//! commit and is being reopened (docs/decisions/0027-store-fault-recovery.md).
//!
//! The writer owns the state and changes it; readiness (`/readyz`), metrics and every refused
//! request read it. The reason is logged once per change of state, never once per refused message:
//! a full disk refuses thousands of messages a second, and their log lines would fill it further.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shared view of the store's writability.
#[derive(Default)]
pub(super) struct Health {
    /// `None` while writable; otherwise why not, as shown by `/readyz` and in refusals.
    blocked: Mutex<Option<String>>,
}

impl Health {
    pub(super) fn blocked(&self) -> Option<String> {
        self.blocked.lock().expect("health lock").clone()
    }

    /// Records a new state; logs and sets the gauge only when it changes.
    pub(super) fn set(&self, blocked: Option<String>) {
        let mut current = self.blocked.lock().expect("health lock");
        if *current == blocked {
            return;
        }
        match (&*current, &blocked) {
            (_, Some(why)) => tracing::error!(reason = %why, "store refuses new data"),
            (Some(was), None) => tracing::info!(was = %was, "store takes new data again"),
            (None, None) => {}
        }
        metrics::gauge!("citygw_store_writable").set(if blocked.is_some() { 0.0 } else { 1.0 });
        *current = blocked;
    }
}

/// How much room the data directory's filesystem has, against the low-space watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    /// Above the watermark: everything is written.
    Enough,
    /// Below the watermark: new readings are refused; dead letters, registry records and sink
    /// cursors still go in, from the reserve the watermark keeps.
    Low,
    /// Below half the watermark: only registry records and sink cursors (small, and needed to
    /// recover) are written.
    Critical,
}

/// Free space of the data directory's filesystem, checked at most every [`Space::EVERY`].
pub(super) struct Space {
    dir: PathBuf,
    watermark: u64,
    checked: Option<(Instant, u64)>,
}

impl Space {
    const EVERY: Duration = Duration::from_millis(250);

    pub(super) fn new(dir: &Path, watermark: u64) -> Self {
        Space {
            dir: dir.to_path_buf(),
            watermark,
            checked: None,
        }
    }

    /// Bytes available to the gateway (not root's reserve); `None` when the filesystem cannot
    /// tell, which counts as enough: a statvfs failure must not stop ingestion.
    pub(super) fn free(&mut self) -> Option<u64> {
        let now = Instant::now();
        if let Some((at, free)) = self.checked {
            if now.duration_since(at) < Self::EVERY {
                return Some(free);
            }
        }
        match rustix::fs::statvfs(&self.dir) {
            Ok(st) => {
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                metrics::gauge!("citygw_store_free_bytes").set(free as f64);
                self.checked = Some((now, free));
                Some(free)
            }
            Err(e) => {
                tracing::debug!(error = %e, dir = %self.dir.display(), "statvfs failed");
                None
            }
        }
    }

    pub(super) fn room(&mut self) -> Room {
        match self.free() {
            Some(free) if free < self.watermark / 2 => Room::Critical,
            Some(free) if free < self.watermark => Room::Low,
            _ => Room::Enough,
        }
    }

    /// Why new readings are refused, for `/readyz` and the refusals.
    pub(super) fn low_reason(&mut self) -> String {
        format!(
            "free space {} MiB on the data directory's filesystem is below store.min_free_mb = {} MiB",
            self.free().unwrap_or(0) >> 20,
            self.watermark >> 20
        )
    }
}
