//! Block1 reassembly (RFC 7959): a payload larger than one datagram arrives as numbered blocks,
//! each its own request; the body is processed once the last block is in.
//!
//! Transfers are keyed by endpoint and path (the RFC's "same resource from the same client").
//! A transfer bigger than the limit, announced (Size1) or discovered, is dropped and answered
//! 4.13; an out-of-order block is answered 4.08 and the client starts again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A Block1 option value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    pub szx: u8,
}

impl Block {
    /// Parses the option's value; `None` for the reserved size exponent 7 or an over-long value.
    pub fn parse(raw: &[u8]) -> Option<Block> {
        if raw.len() > 3 {
            return None;
        }
        let v = raw.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        let szx = (v & 7) as u8;
        (szx < 7).then_some(Block {
            num: v >> 4,
            more: v & 8 != 0,
            szx,
        })
    }

    pub fn size(self) -> usize {
        1 << (self.szx + 4)
    }

    pub fn encode(self) -> Vec<u8> {
        let v = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx);
        let bytes = v.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        bytes[skip..].to_vec()
    }
}

/// The outcome of adding one block.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// More to come: answer 2.31 Continue.
    Continue,
    /// The whole body.
    Complete(Vec<u8>),
    /// Over the limit: answer 4.13 with Size1.
    TooLarge,
    /// Not the block expected next: answer 4.08.
    Incomplete,
    /// A non-final block whose payload is not the announced block size: answer 4.00.
    BadBlock,
}

struct Transfer {
    body: Vec<u8>,
    started: Instant,
}

pub struct Reassembly {
    limit: usize,
    lifetime: Duration,
    transfers: Mutex<HashMap<(SocketAddr, String), Transfer>>,
}

impl Reassembly {
    pub fn new(limit: usize, lifetime: Duration) -> Self {
        Self {
            limit,
            lifetime,
            transfers: Mutex::new(HashMap::new()),
        }
    }

    /// Adds one block of the transfer `(peer, path)`. `size1` is the total the client announced.
    pub fn add(
        &self,
        peer: SocketAddr,
        path: &str,
        block: Block,
        size1: Option<usize>,
        payload: &[u8],
        now: Instant,
    ) -> Step {
        let mut transfers = self.transfers.lock().expect("reassembly lock");
        transfers.retain(|_, t| now.duration_since(t.started) < self.lifetime);
        let key = (peer, path.to_string());
        if block.more && payload.len() != block.size() {
            transfers.remove(&key);
            return Step::BadBlock;
        }
        if size1.is_some_and(|s| s > self.limit) {
            transfers.remove(&key);
            return Step::TooLarge;
        }
        if block.num == 0 {
            transfers.insert(
                key.clone(),
                Transfer {
                    body: Vec::new(),
                    started: now,
                },
            );
        }
        let Some(transfer) = transfers.get_mut(&key) else {
            return Step::Incomplete;
        };
        if transfer.body.len() != block.num as usize * block.size() {
            transfers.remove(&key);
            return Step::Incomplete;
        }
        if transfer.body.len() + payload.len() > self.limit {
            transfers.remove(&key);
            return Step::TooLarge;
        }
        transfer.body.extend_from_slice(payload);
        if block.more {
            Step::Continue
        } else {
            let body = transfers.remove(&key).expect("present").body;
            Step::Complete(body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(num: u32, more: bool) -> Block {
        Block { num, more, szx: 0 }
    }

    #[test]
    fn option_values_round_trip() {
        for b in [
            Block {
                num: 0,
                more: true,
                szx: 6,
            },
            Block {
                num: 300,
                more: false,
                szx: 2,
            },
            Block {
                num: 70_000,
                more: true,
                szx: 0,
            },
        ] {
            assert_eq!(Block::parse(&b.encode()), Some(b));
        }
        assert_eq!(Block::parse(&[0x0f]), None, "szx 7 is reserved");
        assert_eq!(Block::parse(&[1, 2, 3, 4]), None);
        assert_eq!(
            Block::parse(&[]),
            Some(Block {
                num: 0,
                more: false,
                szx: 0
            })
        );
    }

    #[test]
    fn blocks_in_order_make_the_body() {
        let r = Reassembly::new(100, Duration::from_secs(60));
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let t = Instant::now();
        assert_eq!(
            r.add(peer, "/t/a", block(0, true), None, &[1; 16], t),
            Step::Continue
        );
        assert_eq!(
            r.add(peer, "/t/a", block(1, true), None, &[2; 16], t),
            Step::Continue
        );
        let Step::Complete(body) = r.add(peer, "/t/a", block(2, false), None, &[3; 5], t) else {
            panic!("complete expected");
        };
        assert_eq!(body.len(), 37);
        assert_eq!(&body[16..18], &[2, 2]);
    }

    #[test]
    fn gaps_sizes_and_limits_are_refused() {
        let r = Reassembly::new(40, Duration::from_secs(60));
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let t = Instant::now();
        assert_eq!(
            r.add(peer, "/x", block(1, true), None, &[0; 16], t),
            Step::Incomplete
        );
        assert_eq!(
            r.add(peer, "/x", block(0, true), None, &[0; 15], t),
            Step::BadBlock
        );
        assert_eq!(
            r.add(peer, "/x", block(0, true), Some(41), &[0; 16], t),
            Step::TooLarge
        );
        assert_eq!(
            r.add(peer, "/x", block(0, true), None, &[0; 16], t),
            Step::Continue
        );
        assert_eq!(
            r.add(peer, "/x", block(2, true), None, &[0; 16], t),
            Step::Incomplete
        );
        assert_eq!(
            r.add(peer, "/x", block(0, true), None, &[0; 16], t),
            Step::Continue
        );
        assert_eq!(
            r.add(peer, "/x", block(1, true), None, &[0; 16], t),
            Step::Continue
        );
        assert_eq!(
            r.add(peer, "/x", block(2, true), None, &[0; 16], t),
            Step::TooLarge
        );
    }
}
