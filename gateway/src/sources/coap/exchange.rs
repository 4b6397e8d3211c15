//! Message deduplication (RFC 7252 section 4.5): a request is identified by its sender's endpoint
//! and message id for EXCHANGE_LIFETIME. A retransmission of a request already answered gets the
//! same answer again; one still being processed is ignored (its answer is on the way). Either
//! way it is processed, and stored, once.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub type Key = (SocketAddr, u16);

/// What to do with an incoming request.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// First time: process it, then [`Exchanges::complete`].
    New,
    /// A retransmission still being processed: drop it.
    InProgress,
    /// A retransmission already answered: send this again (`None`: nothing was sent).
    Answered(Option<Vec<u8>>),
}

enum State {
    InProgress,
    Answered(Option<Vec<u8>>),
}

/// The remembered exchanges, bounded in time and in number.
pub struct Exchanges {
    lifetime: Duration,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    states: HashMap<Key, (Instant, State)>,
    /// Insertion order, for expiry and for evicting the oldest beyond capacity. A key may appear
    /// twice when an expired exchange was reused; the stamp tells the live one.
    order: VecDeque<(Instant, Key)>,
}

impl Exchanges {
    pub fn new(lifetime: Duration, capacity: usize) -> Self {
        Self {
            lifetime,
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Looks the request up, registering it as in progress when it is new.
    pub fn begin(&self, key: Key, now: Instant) -> Seen {
        let mut inner = self.inner.lock().expect("exchanges lock");
        inner.expire(now, self.lifetime, self.capacity);
        if let Some((_, state)) = inner.states.get(&key) {
            return match state {
                State::InProgress => Seen::InProgress,
                State::Answered(r) => Seen::Answered(r.clone()),
            };
        }
        inner.states.insert(key, (now, State::InProgress));
        inner.order.push_back((now, key));
        Seen::New
    }

    /// Records the answer sent, for retransmissions to come.
    pub fn complete(&self, key: Key, response: Option<Vec<u8>>) {
        let mut inner = self.inner.lock().expect("exchanges lock");
        if let Some((_, state)) = inner.states.get_mut(&key) {
            *state = State::Answered(response);
        }
    }

    /// Forgets a request that was not processed, so its retransmission is treated as new.
    pub fn forget(&self, key: Key) {
        self.inner
            .lock()
            .expect("exchanges lock")
            .states
            .remove(&key);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().expect("exchanges lock").states.len()
    }
}

impl Inner {
    fn expire(&mut self, now: Instant, lifetime: Duration, capacity: usize) {
        while let Some(&(stamp, key)) = self.order.front() {
            let expired = now.duration_since(stamp) >= lifetime;
            if !expired && self.states.len() < capacity {
                break;
            }
            self.order.pop_front();
            if self.states.get(&key).is_some_and(|(s, _)| *s == stamp) {
                self.states.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, mid: u16) -> Key {
        (SocketAddr::from(([127, 0, 0, 1], port)), mid)
    }

    #[test]
    fn retransmissions_are_answered_again_until_the_lifetime_ends() {
        let ex = Exchanges::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert_eq!(ex.begin(key(1, 7), t0), Seen::New);
        assert_eq!(ex.begin(key(1, 7), t0), Seen::InProgress);
        ex.complete(key(1, 7), Some(vec![1, 2]));
        assert_eq!(ex.begin(key(1, 7), t0), Seen::Answered(Some(vec![1, 2])));
        // Same id from another endpoint is another exchange.
        assert_eq!(ex.begin(key(2, 7), t0), Seen::New);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(ex.begin(key(1, 7), later), Seen::New);
        assert_eq!(ex.len(), 1);
    }

    #[test]
    fn capacity_forgets_the_oldest() {
        let ex = Exchanges::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        for mid in 0..3 {
            assert_eq!(ex.begin(key(1, mid), t0), Seen::New);
        }
        assert_eq!(ex.len(), 2);
        assert_eq!(ex.begin(key(1, 0), t0), Seen::New, "evicted");
    }
}
