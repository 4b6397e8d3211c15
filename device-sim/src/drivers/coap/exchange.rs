//! The client side of RFC 7252 confirmable messaging, without I/O, so retransmission and
//! matching can be tested with made-up clocks and datagrams.
//!
//! NSTART = 1: one confirmable message outstanding per endpoint, as a constrained device (and
//! RFC 7252 section 4.7) would have it. A retransmission repeats the same bytes, hence the same
//! message id: that is what lets the gateway recognise it and store the reading once.

use std::time::Duration;

use coap_lite::{MessageClass, MessageType, Packet};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::time::Instant;

/// RFC 7252 section 4.8 defaults.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
pub const ACK_RANDOM_FACTOR: f64 = 1.5;
pub const MAX_RETRANSMIT: u32 = 4;

/// How a confirmable message ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The peer's answer: a piggybacked response to a request, or an empty ACK (what a
    /// confirmable notification gets).
    Answer(Packet),
    /// The peer rejected the message (RST).
    Reset,
    /// No answer after MAX_RETRANSMIT retransmissions.
    TimedOut,
    /// The run ended (drain over), or the DTLS session did, before an answer or the last
    /// timeout.
    Abandoned,
}

/// What an incoming datagram means to the client.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// It ends the outstanding exchange.
    Done(Outcome),
    /// A request from the peer (LwM2M server operations), for the caller to answer.
    Request(Packet),
    /// Nothing of ours: a duplicate, a stale answer, a mismatched token.
    Ignored,
}

/// What the retransmission timer says when it fires.
#[derive(Debug, PartialEq)]
pub enum Timer {
    Retransmit(Vec<u8>),
    GiveUp,
}

struct Outstanding {
    message_id: u16,
    /// Checked on piggybacked responses (RFC 7252 section 5.3.2); empty for a notification.
    token: Vec<u8>,
    bytes: Vec<u8>,
    retransmissions: u32,
    timeout: Duration,
    deadline: Instant,
}

pub struct Client {
    next_message_id: u16,
    rng: StdRng,
    outstanding: Option<Outstanding>,
}

impl Client {
    /// Message ids and tokens start at random values, so a device that restarts (or many
    /// devices behind one address) does not repeat a recent message id.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Self {
            next_message_id: rng.random(),
            rng,
            outstanding: None,
        }
    }

    /// Frames `p` as the next confirmable message and returns its bytes to send. A request gets
    /// a fresh token; a response (a notification) keeps the token of the observation.
    ///
    /// Panics if another message is outstanding (NSTART = 1 is the caller's loop's invariant).
    pub fn start(&mut self, mut p: Packet, now: Instant) -> Vec<u8> {
        assert!(self.outstanding.is_none(), "NSTART = 1");
        p.header.set_type(MessageType::Confirmable);
        p.header.message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1);
        let request = matches!(p.header.code, MessageClass::Request(_));
        if request {
            let mut token = vec![0u8; 4];
            self.rng.fill_bytes(&mut token);
            p.set_token(token);
        }
        let bytes = p.to_bytes().expect("a client message encodes");
        let factor = self.rng.random_range(1.0..ACK_RANDOM_FACTOR);
        let timeout = ACK_TIMEOUT.mul_f64(factor);
        self.outstanding = Some(Outstanding {
            message_id: p.header.message_id,
            token: if request {
                p.get_token().to_vec()
            } else {
                Vec::new()
            },
            bytes: bytes.clone(),
            retransmissions: 0,
            timeout,
            deadline: now + timeout,
        });
        bytes
    }

    /// When the retransmission timer fires; `None` with nothing outstanding.
    pub fn deadline(&self) -> Option<Instant> {
        self.outstanding.as_ref().map(|o| o.deadline)
    }

    /// The timer fired: retransmit with the timeout doubled, or give up after MAX_RETRANSMIT.
    pub fn on_timer(&mut self, now: Instant) -> Timer {
        let Some(o) = self.outstanding.as_mut() else {
            return Timer::GiveUp;
        };
        if o.retransmissions == MAX_RETRANSMIT {
            self.outstanding = None;
            return Timer::GiveUp;
        }
        o.retransmissions += 1;
        o.timeout *= 2;
        o.deadline = now + o.timeout;
        Timer::Retransmit(o.bytes.clone())
    }

    /// Forgets the outstanding message (the run is over).
    pub fn abandon(&mut self) {
        self.outstanding = None;
    }

    pub fn on_datagram(&mut self, p: Packet) -> Incoming {
        match (p.header.get_type(), p.header.code) {
            (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Request(_)) => {
                Incoming::Request(p)
            }
            (MessageType::Acknowledgement | MessageType::Reset, _) => {
                let Some(o) = &self.outstanding else {
                    return Incoming::Ignored;
                };
                let piggybacked = matches!(p.header.code, MessageClass::Response(_));
                if p.header.message_id != o.message_id
                    || (piggybacked && p.get_token() != o.token.as_slice())
                {
                    return Incoming::Ignored;
                }
                self.outstanding = None;
                Incoming::Done(if p.header.get_type() == MessageType::Reset {
                    Outcome::Reset
                } else {
                    Outcome::Answer(p)
                })
            }
            // Separate responses are not expected: the gateway answers every confirmable
            // request in its ACK, after the durable write.
            _ => Incoming::Ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use coap_lite::{RequestType, ResponseType};

    use super::*;

    fn post() -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Post);
        p.payload = b"{}".to_vec();
        p
    }

    fn answer(to: &[u8], typ: MessageType, code: MessageClass, token: Option<&[u8]>) -> Packet {
        let sent = Packet::from_bytes(to).unwrap();
        let mut p = Packet::new();
        p.header.set_type(typ);
        p.header.code = code;
        p.header.message_id = sent.header.message_id;
        p.set_token(token.unwrap_or(sent.get_token()).to_vec());
        p
    }

    #[test]
    fn retransmits_the_same_message_with_doubling_timeouts_then_gives_up() {
        let mut c = Client::new(1);
        let t0 = Instant::now();
        let first = c.start(post(), t0);
        let sent = Packet::from_bytes(&first).unwrap();
        assert_eq!(sent.header.get_type(), MessageType::Confirmable);
        let initial = c.deadline().unwrap() - t0;
        assert!(initial >= ACK_TIMEOUT && initial < ACK_TIMEOUT.mul_f64(ACK_RANDOM_FACTOR));
        for i in 1..=MAX_RETRANSMIT {
            let now = c.deadline().unwrap();
            assert_eq!(
                c.on_timer(now),
                Timer::Retransmit(first.clone()),
                "attempt {i}"
            );
            assert_eq!(c.deadline().unwrap() - now, initial * 2u32.pow(i));
        }
        let now = c.deadline().unwrap();
        assert_eq!(c.on_timer(now), Timer::GiveUp);
        assert_eq!(c.deadline(), None);
        // Nothing outstanding any more: a late ACK is nobody's.
        let late = answer(
            &first,
            MessageType::Acknowledgement,
            MessageClass::Response(ResponseType::Changed),
            None,
        );
        assert_eq!(c.on_datagram(late), Incoming::Ignored);
    }

    #[test]
    fn ack_is_matched_by_message_id_and_token() {
        let mut c = Client::new(2);
        let bytes = c.start(post(), Instant::now());
        let changed = MessageClass::Response(ResponseType::Changed);
        let mut other_id = answer(&bytes, MessageType::Acknowledgement, changed, None);
        other_id.header.message_id = other_id.header.message_id.wrapping_add(1);
        assert_eq!(c.on_datagram(other_id), Incoming::Ignored);
        let wrong_token = answer(&bytes, MessageType::Acknowledgement, changed, Some(b"x"));
        assert_eq!(c.on_datagram(wrong_token), Incoming::Ignored);
        let ok = answer(&bytes, MessageType::Acknowledgement, changed, None);
        assert_eq!(
            c.on_datagram(ok.clone()),
            Incoming::Done(Outcome::Answer(ok))
        );
        // The duplicate ACK of a retransmission finds nothing outstanding.
        let dup = answer(&bytes, MessageType::Acknowledgement, changed, None);
        assert_eq!(c.on_datagram(dup), Incoming::Ignored);
    }

    #[test]
    fn notifications_keep_their_token_and_take_an_empty_ack_or_a_reset() {
        let mut c = Client::new(3);
        let mut n = Packet::new();
        n.header.code = MessageClass::Response(ResponseType::Content);
        n.set_token(b"obs1".to_vec());
        let bytes = c.start(n.clone(), Instant::now());
        assert_eq!(Packet::from_bytes(&bytes).unwrap().get_token(), b"obs1");
        let ack = answer(
            &bytes,
            MessageType::Acknowledgement,
            MessageClass::Empty,
            Some(b""),
        );
        assert!(matches!(
            c.on_datagram(ack),
            Incoming::Done(Outcome::Answer(_))
        ));
        let bytes = c.start(n, Instant::now());
        let rst = answer(&bytes, MessageType::Reset, MessageClass::Empty, Some(b""));
        assert_eq!(c.on_datagram(rst), Incoming::Done(Outcome::Reset));
    }

    #[test]
    fn message_ids_advance_and_requests_get_fresh_tokens() {
        let mut c = Client::new(4);
        let now = Instant::now();
        let a = Packet::from_bytes(&c.start(post(), now)).unwrap();
        c.abandon();
        let b = Packet::from_bytes(&c.start(post(), now)).unwrap();
        assert_eq!(b.header.message_id, a.header.message_id.wrapping_add(1));
        assert_ne!(a.get_token(), b.get_token());
        assert_eq!(a.get_token().len(), 4);
    }

    #[test]
    fn server_requests_are_handed_over_without_touching_the_exchange() {
        let mut c = Client::new(5);
        let bytes = c.start(post(), Instant::now());
        let mut get = Packet::new();
        get.header.set_type(MessageType::Confirmable);
        get.header.code = MessageClass::Request(RequestType::Get);
        get.header.message_id = Packet::from_bytes(&bytes).unwrap().header.message_id;
        assert!(matches!(c.on_datagram(get), Incoming::Request(_)));
        assert!(c.deadline().is_some());
    }
}
