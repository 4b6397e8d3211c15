//! The live feed: committed readings, in id order, for subscribers.
//!
//! The writer publishes each group commit's readings after the fsync, so a subscriber never sees a
//! reading that a crash could take back, and sees them in the order of their ids (the resume
//! points). Every commit is published, listened to or not: a subscriber that subscribes and then
//! reads the store cannot fall into a gap, because whatever was published before it subscribed
//! was committed before, and so is in the store.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::proto::Reading;

/// One group commit's readings, shared by every subscriber.
pub type Committed = Arc<Vec<Reading>>;

/// Commits a slow receiver may fall behind before it must catch up from the store.
const FEED_CAPACITY: usize = 4096;

#[derive(Clone)]
pub(super) struct Feed {
    tx: broadcast::Sender<Committed>,
}

impl Feed {
    pub(super) fn new() -> Self {
        Self {
            tx: broadcast::channel(FEED_CAPACITY).0,
        }
    }

    pub(super) fn publish(&self, readings: Vec<Reading>) {
        if !readings.is_empty() {
            let _ = self.tx.send(Arc::new(readings));
        }
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<Committed> {
        self.tx.subscribe()
    }
}
