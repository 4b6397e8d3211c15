//! Store pages shared by the subscriptions that are catching up.
//!
//! With many subscribers, most fall behind the live feed at some point and read the store; each
//! decoding and encoding the same records for itself was the fan-out's main cost
//! (bench/agency_fanout). Pages are aligned on ids, so subscriptions at nearby positions ask for
//! the same page, read once and encoded once ([`FeedReading::encoded`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tonic::Status;

use super::subscribe::blocking;
use crate::store::{FeedReading, Store};

/// Readings ids per page.
const PAGE: u64 = 1024;
/// Complete pages kept (a few tens of MB at most).
const PAGES: usize = 64;

/// A page of committed readings: those with ids in `(start, end]`.
pub struct Page {
    pub readings: Arc<Vec<FeedReading>>,
    pub end: u64,
}

pub struct PageCache {
    store: Store,
    /// (page start, readings), oldest first; only complete pages.
    pages: Mutex<VecDeque<(u64, Arc<Vec<FeedReading>>)>>,
}

impl PageCache {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            pages: Mutex::new(VecDeque::new()),
        }
    }

    /// The page holding the reading after `after`. `end` is where the next page starts; it
    /// equals `after` when there is nothing newer in the store.
    pub async fn after(&self, after: u64) -> Result<Page, Status> {
        // Everything up to `last` is committed and visible, so a page is whole up to there.
        let last = self.store.last_reading_id();
        if after >= last {
            return Ok(Page {
                readings: Arc::default(),
                end: after,
            });
        }
        let start = after / PAGE * PAGE;
        let end = (start + PAGE).min(last).max(after);
        let cached = self
            .pages
            .lock()
            .expect("page cache")
            .iter()
            .find(|(s, _)| *s == start)
            .map(|(_, p)| p.clone());
        if let Some(readings) = cached {
            return Ok(Page {
                readings,
                end: start + PAGE,
            });
        }
        let store = self.store.clone();
        let page = blocking(move || store.readings_after(start, PAGE as usize)).await?;
        let readings: Arc<Vec<FeedReading>> = Arc::new(
            page.into_iter()
                .filter(|r| r.id <= end)
                .map(FeedReading::new)
                .collect(),
        );
        if end == start + PAGE {
            let mut pages = self.pages.lock().expect("page cache");
            if pages.len() >= PAGES {
                pages.pop_front();
            }
            pages.push_back((start, readings.clone()));
        }
        Ok(Page { readings, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Reading;

    #[tokio::test]
    async fn pages_are_aligned_whole_and_cached_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        let reading = |i: i64| Reading {
            device_id: format!("d{}", i % 7),
            device_time_ms: i,
            received_time_ms: i,
            ..Default::default()
        };
        store
            .append((0..2500).map(reading).collect())
            .await
            .unwrap();
        let cache = PageCache::new(store.clone());

        let first = cache.after(0).await.unwrap();
        assert_eq!(first.end, 1024);
        assert_eq!(
            first
                .readings
                .iter()
                .map(|f| f.reading.id)
                .collect::<Vec<_>>(),
            (1..=1024).collect::<Vec<_>>()
        );
        // Mid-page: the same aligned page, now from the cache.
        let again = cache.after(1000).await.unwrap();
        assert!(Arc::ptr_eq(&first.readings, &again.readings));
        // The head page is partial: up to the last committed id, not cached.
        let head = cache.after(2100).await.unwrap();
        assert_eq!(
            (head.readings.first().unwrap().reading.id, head.end),
            (2049, 2500)
        );
        assert_eq!(cache.pages.lock().unwrap().len(), 1);
        // Caught up: nothing, and the cursor stays.
        let done = cache.after(2500).await.unwrap();
        assert!(done.readings.is_empty() && done.end == 2500);
        store.close().await;
    }
}
