//! The live feed: committed readings, in id order, for subscribers.
//!
//! The writer publishes each group commit's readings after the fsync, so a subscriber never sees a
//! reading that a crash could take back, and sees them in the order of their ids (the resume
//! points). A commit is published when someone listens at that moment, which is decided after
//! the commit: a subscriber that subscribes and then reads the store cannot fall into a gap,
//! because whatever was not published to it was committed before it subscribed, and so is in the
//! store when it reads.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::broadcast;

use crate::proto::Reading;

/// One group commit's readings, shared by every subscriber.
pub type Committed = Arc<Vec<FeedReading>>;

/// A committed reading and, once the first subscriber asked, its protobuf encoding: a hundred
/// subscribers of the same reading share one encoding instead of cloning and encoding it a
/// hundred times (measured: those copies were most of the fan-out's CPU).
pub struct FeedReading {
    pub reading: Reading,
    encoded: OnceLock<Bytes>,
}

impl FeedReading {
    pub fn new(reading: Reading) -> Self {
        Self {
            reading,
            encoded: OnceLock::new(),
        }
    }

    pub fn encoded(&self) -> Bytes {
        self.encoded
            .get_or_init(|| Bytes::from(self.reading.encode_to_vec()))
            .clone()
    }
}

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
        if !readings.is_empty() && self.tx.receiver_count() > 0 {
            let shared = readings.into_iter().map(|reading| FeedReading {
                reading,
                encoded: OnceLock::new(),
            });
            let _ = self.tx.send(Arc::new(shared.collect()));
        }
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<Committed> {
        self.tx.subscribe()
    }
}
