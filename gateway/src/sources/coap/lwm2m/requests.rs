//! The server's own confirmable requests to a registered client: LwM2M Write (`PUT`) and Execute
//! (`POST`) for commands (control/commands/transport/lwm2m.rs decides what to send and when).
//!
//! Reliability is RFC 7252 section 4.2: the request is confirmable, retransmitted after
//! ACK_TIMEOUT × a random factor in [1, 1.5), doubling, at most MAX_RETRANSMIT times (93 s in
//! all with the defaults). It ends with
//! - a piggybacked response in the ACK, or an empty ACK followed by a separate response;
//! - a Reset: the client could not process it;
//! - no answer at all after the last transmission.
//!
//! An answer is matched by token **and** the address the request was sent to (a piggybacked
//! one also by message id): a datagram from another address, even another registered client,
//! cannot answer it. Answers that match nothing are counted
//! (`citygw_lwm2m_responses_ignored_total`) and otherwise ignored.
//!
//! Requests leave through a [`Link`]: the plain CoAP socket today. A client registered over
//! CoAPS has no link yet (its DTLS session keeps no outbound path), so its requests are refused
//! with [`NotSent::Secure`] rather than sent in the clear.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use rand::{Rng, RngCore};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::objects::Path;

/// RFC 7252 section 4.8 transmission parameters (defaults).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ack_timeout: Duration,
    pub max_retransmit: u32,
    /// How long a client that acknowledged with an empty ACK has to send its separate response.
    pub separate_response: Duration,
}

impl Timing {
    /// MAX_RETRANSMIT 4 and ACK_RANDOM_FACTOR 1.5 as RFC 7252 has them; the separate response
    /// may take MAX_TRANSMIT_WAIT (93 s with the default ACK_TIMEOUT of 2 s), time for the
    /// client's own retransmissions of it.
    pub fn new(ack_timeout: Duration) -> Self {
        Timing {
            ack_timeout,
            max_retransmit: 4,
            separate_response: ack_timeout.mul_f64(31.0 * 1.5),
        }
    }
}

/// One request to a client's resource.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: RequestType,
    pub path: Path,
    pub content_format: Option<u16>,
    pub payload: Vec<u8>,
}

impl Request {
    /// "PUT /3311/0/5850", for histories and logs.
    pub fn describe(&self) -> String {
        let m = match self.method {
            RequestType::Put => "PUT",
            RequestType::Post => "POST",
            RequestType::Get => "GET",
            RequestType::Delete => "DELETE",
            _ => "?",
        };
        format!("{m} {}", self.path)
    }

    fn packet(&self, message_id: u16, token: Vec<u8>) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(self.method);
        p.header.message_id = message_id;
        p.set_token(token);
        for seg in [self.path.object, self.path.instance, self.path.resource] {
            p.add_option(CoapOption::UriPath, seg.to_string().into_bytes());
        }
        if let Some(cf) = self.content_format {
            p.add_option(CoapOption::ContentFormat, uint(cf));
        }
        p.payload = self.payload.clone();
        p
    }
}

/// The shortest big-endian form of a CoAP uint option.
fn uint(n: u16) -> Vec<u8> {
    match n {
        0 => Vec::new(),
        1..=255 => vec![n as u8],
        _ => n.to_be_bytes().to_vec(),
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The client's response: its code ("2.04", "4.04", ...) and diagnostic payload.
    Answered { code: String, diagnostic: String },
    /// The client answered with a Reset.
    Reset,
    /// Nothing came back after every transmission.
    NoAnswer {
        transmissions: u32,
        waited: Duration,
    },
    /// An empty ACK came, the separate response did not.
    NoResponse { waited: Duration },
    /// The registration ended or moved to another address while the request was out.
    Moved,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, Outcome::Answered { code, .. } if code.starts_with("2."))
    }
}

/// Why a request was not sent at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotSent {
    #[error("the client is not registered")]
    NotRegistered,
    #[error("the client is in queue mode and asleep until its next Register/Update")]
    Asleep,
    #[error("the client did not answer the last request; waiting for its next Register/Update")]
    Silent,
    #[error(
        "the client registered over CoAPS; LwM2M requests over DTLS sessions are not sent yet"
    )]
    Secure,
    #[error("no plain CoAP listener to send from (coap.plain_enabled = false)")]
    NoSocket,
}

/// Where a client's requests go.
#[derive(Clone)]
pub enum Link {
    Plain {
        socket: Arc<UdpSocket>,
        peer: SocketAddr,
    },
}

impl Link {
    pub fn peer(&self) -> SocketAddr {
        match self {
            Link::Plain { peer, .. } => *peer,
        }
    }

    async fn send(&self, bytes: &[u8]) {
        match self {
            Link::Plain { socket, peer } => {
                if let Err(e) = socket.send_to(bytes, peer).await {
                    tracing::debug!(%peer, error = %e, "lwm2m request send");
                }
            }
        }
    }
}

/// What a client sent back for an outstanding request.
#[derive(Debug)]
enum Event {
    Ack,
    Reset,
    Response { code: String, diagnostic: String },
}

struct Entry {
    peer: SocketAddr,
    message_id: u16,
    events: mpsc::UnboundedSender<Event>,
}

/// The outstanding requests, by token and by (address, message id).
#[derive(Default)]
pub struct Outstanding {
    by_token: HashMap<Vec<u8>, Entry>,
    by_message: HashMap<(SocketAddr, u16), Vec<u8>>,
}

/// Why a response matched no outstanding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// No request of ours has this token (it may be an observation's).
    UnknownToken,
    /// The token is an outstanding request's, but the datagram came from another address.
    WrongPeer,
    /// A piggybacked response whose message id is not the request's.
    WrongMessageId,
}

impl Mismatch {
    pub fn reason(self) -> &'static str {
        match self {
            Mismatch::UnknownToken => "unknown_token",
            Mismatch::WrongPeer => "wrong_peer",
            Mismatch::WrongMessageId => "wrong_message_id",
        }
    }
}

impl Outstanding {
    /// Hands a response to the request it answers.
    pub fn on_response(&mut self, peer: SocketAddr, resp: &Packet) -> Result<(), Mismatch> {
        let entry = self
            .by_token
            .get(resp.get_token())
            .ok_or(Mismatch::UnknownToken)?;
        if entry.peer != peer {
            return Err(Mismatch::WrongPeer);
        }
        if resp.header.get_type() == MessageType::Acknowledgement
            && resp.header.message_id != entry.message_id
        {
            return Err(Mismatch::WrongMessageId);
        }
        let _ = entry.events.send(Event::Response {
            code: code_string(resp.header.code),
            diagnostic: diagnostic(&resp.payload),
        });
        Ok(())
    }

    /// An empty ACK or a Reset for one of our requests; `false` when it matches none.
    pub fn on_empty(&mut self, peer: SocketAddr, typ: MessageType, message_id: u16) -> bool {
        let Some(token) = self.by_message.get(&(peer, message_id)) else {
            return false;
        };
        let Some(entry) = self.by_token.get(token) else {
            return false;
        };
        let _ = entry.events.send(if typ == MessageType::Reset {
            Event::Reset
        } else {
            Event::Ack
        });
        true
    }

    fn remove(&mut self, token: &[u8]) {
        if let Some(e) = self.by_token.remove(token) {
            self.by_message.remove(&(e.peer, e.message_id));
        }
    }

    fn len(&self) -> usize {
        self.by_token.len()
    }
}

/// "2.04", "4.04": a response code as CoAP writes it.
pub fn code_string(code: MessageClass) -> String {
    let n = u8::from(code);
    format!("{}.{:02}", n >> 5, n & 31)
}

/// Counts one event of the request path (the transport label is the command metrics').
fn count(event: &'static str) {
    metrics::counter!("citygw_command_requests_total", "transport" => "lwm2m", "event" => event)
        .increment(1);
}

/// What [`send`] needs of the LwM2M server.
pub trait Registrations: Send + Sync {
    fn outstanding(&self) -> &std::sync::Mutex<Outstanding>;
    /// Whether the client is still registered at `peer` (a retransmission to an old address is
    /// pointless).
    fn still_at(&self, device_id: &str, peer: SocketAddr) -> bool;
}

/// Sends `req` over `link` and waits for its end; `on_ack` runs when an empty ACK says the
/// client has it and the answer follows separately.
pub async fn send(
    server: &dyn Registrations,
    device_id: &str,
    link: Link,
    message_id: u16,
    req: &Request,
    timing: Timing,
    on_ack: impl FnOnce() + Send,
) -> Outcome {
    let peer = link.peer();
    let mut token = vec![0u8; 8];
    rand::rng().fill_bytes(&mut token);
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut out = server.outstanding().lock().expect("outstanding lock");
        out.by_message.insert((peer, message_id), token.clone());
        out.by_token.insert(
            token.clone(),
            Entry {
                peer,
                message_id,
                events: tx,
            },
        );
        metrics::gauge!("citygw_lwm2m_requests_outstanding").set(out.len() as f64);
    }
    let bytes = req
        .packet(message_id, token.clone())
        .to_bytes()
        .expect("a request with a bounded payload encodes");
    let started = tokio::time::Instant::now();
    let factor: f64 = rand::rng().random_range(1.0..1.5);
    let mut wait = timing.ack_timeout.mul_f64(factor);
    let mut transmissions = 0;
    let outcome = 'outcome: {
        for attempt in 0..=timing.max_retransmit {
            if attempt > 0 {
                if !server.still_at(device_id, peer) {
                    break 'outcome Outcome::Moved;
                }
                count("retransmitted");
            } else {
                count("sent");
            }
            link.send(&bytes).await;
            transmissions += 1;
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(Event::Response { code, diagnostic })) => {
                    break 'outcome Outcome::Answered { code, diagnostic }
                }
                Ok(Some(Event::Reset)) => break 'outcome Outcome::Reset,
                Ok(Some(Event::Ack)) => {
                    on_ack();
                    let deadline = tokio::time::Instant::now() + timing.separate_response;
                    loop {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(Event::Response { code, diagnostic })) => {
                                break 'outcome Outcome::Answered { code, diagnostic }
                            }
                            // A repeated empty ACK (our retransmission crossed it) or a late
                            // Reset of an earlier copy: the client has the request.
                            Ok(Some(_)) => continue,
                            Ok(None) | Err(_) => {
                                break 'outcome Outcome::NoResponse {
                                    waited: timing.separate_response,
                                }
                            }
                        }
                    }
                }
                Ok(None) => unreachable!("the sender lives in the outstanding table"),
                Err(_) => wait *= 2,
            }
        }
        // The last transmission had its full wait: nothing came back.
        count("no_answer");
        Outcome::NoAnswer {
            transmissions,
            waited: started.elapsed(),
        }
    };
    let mut out = server.outstanding().lock().expect("outstanding lock");
    out.remove(&token);
    metrics::gauge!("citygw_lwm2m_requests_outstanding").set(out.len() as f64);
    if let Outcome::Answered { code, .. } = &outcome {
        metrics::counter!("citygw_command_answers_total", "transport" => "lwm2m", "code" => answer_label(code))
            .increment(1);
    } else if outcome == Outcome::Reset {
        metrics::counter!("citygw_command_answers_total", "transport" => "lwm2m", "code" => "RST")
            .increment(1);
    }
    outcome
}

/// The code as a metric label: the CoAP response codes RFC 7252 and RFC 7959 define, or "other"
/// (the label set stays bounded whatever a client sends).
fn answer_label(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "2.01", "2.02", "2.03", "2.04", "2.05", "2.31", "4.00", "4.01", "4.02", "4.03", "4.04",
        "4.05", "4.06", "4.08", "4.12", "4.13", "4.15", "5.00", "5.01", "5.02", "5.03", "5.04",
        "5.05",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("other")
}

/// A response's diagnostic payload as text: at most 256 bytes, control characters dropped
/// (it is the client's text, kept in the command's history and logged).
fn diagnostic(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(256)])
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::ResponseType;
    use std::sync::Mutex;

    struct Fake {
        outstanding: Mutex<Outstanding>,
    }

    impl Registrations for Fake {
        fn outstanding(&self) -> &Mutex<Outstanding> {
            &self.outstanding
        }
        fn still_at(&self, _: &str, _: SocketAddr) -> bool {
            true
        }
    }

    fn write() -> Request {
        Request {
            method: RequestType::Put,
            path: Path::parse("/3311/0/5850").unwrap(),
            content_format: Some(0),
            payload: b"1".to_vec(),
        }
    }

    async fn pair() -> (Arc<UdpSocket>, UdpSocket) {
        let server = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (server, client)
    }

    fn timing() -> Timing {
        Timing {
            ack_timeout: Duration::from_millis(40),
            max_retransmit: 2,
            separate_response: Duration::from_millis(300),
        }
    }

    /// A silent client gets every retransmission, then the request ends with NoAnswer; another
    /// address cannot answer it, and an answer with the right token from the right address
    /// ends it.
    #[tokio::test]
    async fn retransmits_then_gives_up_and_matches_token_and_address() {
        let (server_sock, client) = pair().await;
        let fake = Arc::new(Fake {
            outstanding: Mutex::default(),
        });
        let link = Link::Plain {
            socket: server_sock.clone(),
            peer: client.local_addr().unwrap(),
        };
        let outcome = send(&*fake, "d", link.clone(), 7, &write(), timing(), || {}).await;
        let mut seen = 0;
        let mut buf = [0u8; 1500];
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(50), client.recv_from(&mut buf)).await
        {
            let p = Packet::from_bytes(&buf[..n]).unwrap();
            assert_eq!(
                p.header.message_id, 7,
                "a retransmission keeps its message id"
            );
            assert_eq!(p.payload, b"1");
            seen += 1;
        }
        assert_eq!(seen, 3);
        assert!(matches!(
            outcome,
            Outcome::NoAnswer {
                transmissions: 3,
                ..
            }
        ));
        assert_eq!(fake.outstanding.lock().unwrap().len(), 0);

        // Answered: by token and address only.
        let f2 = fake.clone();
        let task =
            tokio::spawn(async move { send(&*f2, "d", link, 9, &write(), timing(), || {}).await });
        let (n, from) = client.recv_from(&mut buf).await.unwrap();
        let req = Packet::from_bytes(&buf[..n]).unwrap();
        let mut resp = Packet::new();
        resp.header.set_type(MessageType::Acknowledgement);
        resp.header.code = MessageClass::Response(ResponseType::Changed);
        resp.header.message_id = req.header.message_id;
        resp.set_token(req.get_token().to_vec());
        let elsewhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
        {
            let mut out = fake.outstanding.lock().unwrap();
            assert_eq!(out.on_response(elsewhere, &resp), Err(Mismatch::WrongPeer));
            let mut other = resp.clone();
            other.set_token(vec![1, 2, 3]);
            assert_eq!(
                out.on_response(client.local_addr().unwrap(), &other),
                Err(Mismatch::UnknownToken)
            );
            let mut bad_mid = resp.clone();
            bad_mid.header.message_id = 1;
            assert_eq!(
                out.on_response(client.local_addr().unwrap(), &bad_mid),
                Err(Mismatch::WrongMessageId)
            );
            assert_eq!(out.on_response(client.local_addr().unwrap(), &resp), Ok(()));
        }
        let _ = from;
        assert_eq!(
            task.await.unwrap(),
            Outcome::Answered {
                code: "2.04".into(),
                diagnostic: String::new()
            }
        );
    }

    /// An empty ACK stops the retransmissions; the separate response ends the request, or its
    /// absence does after the wait.
    #[tokio::test]
    async fn empty_ack_then_separate_response() {
        let (server_sock, client) = pair().await;
        let fake = Arc::new(Fake {
            outstanding: Mutex::default(),
        });
        let peer = client.local_addr().unwrap();
        let link = Link::Plain {
            socket: server_sock,
            peer,
        };
        let acked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f2, a2, l2) = (fake.clone(), acked.clone(), link.clone());
        let task = tokio::spawn(async move {
            send(&*f2, "d", l2, 11, &write(), timing(), move || {
                a2.store(true, std::sync::atomic::Ordering::SeqCst)
            })
            .await
        });
        let mut buf = [0u8; 1500];
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        let req = Packet::from_bytes(&buf[..n]).unwrap();
        assert!(fake
            .outstanding
            .lock()
            .unwrap()
            .on_empty(peer, MessageType::Acknowledgement, 11));
        let mut resp = Packet::new();
        resp.header.set_type(MessageType::Confirmable);
        resp.header.code = MessageClass::Response(ResponseType::MethodNotAllowed);
        resp.header.message_id = 500;
        resp.set_token(req.get_token().to_vec());
        resp.payload = b"read-only".to_vec();
        tokio::time::sleep(Duration::from_millis(100)).await;
        fake.outstanding
            .lock()
            .unwrap()
            .on_response(peer, &resp)
            .unwrap();
        assert_eq!(
            task.await.unwrap(),
            Outcome::Answered {
                code: "4.05".into(),
                diagnostic: "read-only".into()
            }
        );
        assert!(acked.load(std::sync::atomic::Ordering::SeqCst));

        let f3 = fake.clone();
        let task =
            tokio::spawn(async move { send(&*f3, "d", link, 12, &write(), timing(), || {}).await });
        client.recv_from(&mut buf).await.unwrap();
        assert!(fake
            .outstanding
            .lock()
            .unwrap()
            .on_empty(peer, MessageType::Acknowledgement, 12));
        assert!(matches!(task.await.unwrap(), Outcome::NoResponse { .. }));
    }
}
