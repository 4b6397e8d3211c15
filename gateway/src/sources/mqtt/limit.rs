//! How many MQTT sessions this process can hold without starving the store of file descriptors.
//!
//! Every TCP connection is a descriptor. When connections take the last ones, the store cannot
//! open its next journal or table file, and an engine that fails a write must be reopened: every
//! device would be refused until a restart. So sessions are capped below the descriptor limit,
//! with a reserve for the store, the other listeners and the handshakes still queued.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Descriptors kept for the store (fjall caches up to 900 table files, plus journals) and for
/// everything that is not an MQTT session: gRPC and HTTP clients, sinks, logs.
const RESERVED_DESCRIPTORS: u64 = 1_280;

/// Live MQTT sessions against their cap. Clones share the count.
#[derive(Clone, Debug)]
pub struct SessionLimit {
    cap: usize,
    live: Arc<AtomicUsize>,
}

impl SessionLimit {
    /// The configured maximum, lowered to what `open_files` descriptors leave after the reserve
    /// and `pending_handshakes` (sockets accepted and queued before their CONNECT is read).
    pub fn new(configured: usize, open_files: u64, pending_handshakes: usize) -> SessionLimit {
        let budget = open_files
            .saturating_sub(RESERVED_DESCRIPTORS)
            .saturating_sub(pending_handshakes as u64);
        let cap = configured.min(usize::try_from(budget).unwrap_or(usize::MAX));
        SessionLimit {
            cap,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether one more session fits. Checked at authentication; the count moves on connect and
    /// disconnect, so a burst may pass the cap by the handshakes in flight, which the reserve
    /// covers.
    pub fn has_room(&self) -> bool {
        self.live.load(Ordering::Relaxed) < self.cap
    }

    pub fn opened(&self) {
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raises the soft descriptor limit to the hard one (what systemd's `LimitNOFILE` or
/// `ulimit -Hn` allows) and returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1_024)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_leaves_the_reserve_and_the_handshake_queue() {
        let limit = SessionLimit::new(1_000_000, 20_000, 2_000);
        assert_eq!(limit.cap(), 20_000 - 1_280 - 2_000);
        assert_eq!(SessionLimit::new(500, 20_000, 2_000).cap(), 500);
        assert_eq!(SessionLimit::new(500, 1_024, 2_000).cap(), 0);
    }

    #[test]
    fn room_follows_sessions() {
        let limit = SessionLimit::new(2, 1_000_000, 0);
        assert!(limit.has_room());
        limit.opened();
        limit.opened();
        assert!(!limit.has_room());
        limit.closed();
        assert!(limit.has_room());
    }
}
