//! One device's CoAP endpoint: the exchange state machine ([`super::exchange`]) driven over a
//! plain UDP or a DTLS link. Plain CoAP, CoAPS and LwM2M all go through [`Session::exchange`],
//! so there is one retransmission implementation.

use std::io;
use std::net::{IpAddr, SocketAddr};

use coap_lite::Packet;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::dtls::DtlsLink;
use super::exchange::{Client, Incoming, Outcome, Timer};

/// How datagrams reach the gateway.
pub enum Link {
    Udp(UdpSocket, Vec<u8>),
    Dtls(Box<DtlsLink>),
}

impl Link {
    /// Plain UDP, with a receive buffer above the gateway's largest datagram (its 1,280-byte
    /// MTU, a 1,024-byte block plus headers).
    pub fn udp(socket: UdpSocket) -> Self {
        Link::Udp(socket, vec![0u8; 2048])
    }

    async fn send(&mut self, d: &[u8]) -> io::Result<()> {
        match self {
            Link::Udp(s, _) => s.send(d).await.map(|_| ()),
            Link::Dtls(l) => l.send(d).await,
        }
    }

    async fn recv(&mut self) -> io::Result<Vec<u8>> {
        match self {
            Link::Udp(s, buf) => {
                let n = s.recv(buf).await?;
                Ok(buf[..n].to_vec())
            }
            Link::Dtls(l) => l.recv().await,
        }
    }
}

/// A UDP socket bound to `source` (any port) and connected to `gateway`, so only the gateway's
/// datagrams reach it.
pub async fn udp_socket(source: Option<IpAddr>, gateway: SocketAddr) -> io::Result<UdpSocket> {
    let source = source.unwrap_or(match gateway {
        SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
        SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
    });
    let socket = UdpSocket::bind(SocketAddr::new(source, 0)).await?;
    socket.connect(gateway).await?;
    Ok(socket)
}

/// Answers a request from the gateway (None: no answer).
pub type OnRequest<'a> = &'a mut (dyn FnMut(&Packet) -> Option<Packet> + Send);

pub struct Session {
    link: Link,
    client: Client,
    broken: bool,
}

impl Session {
    pub fn new(link: Link, seed: u64) -> Self {
        Self {
            link,
            client: Client::new(seed),
            broken: false,
        }
    }

    /// Whether the DTLS session is gone and a new handshake is needed: the gateway closed it
    /// (idle timeout, restart) or stopped answering in it.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// A received datagram as a packet; notes a session that ended.
    fn parse(&mut self, d: io::Result<Vec<u8>>) -> Option<Packet> {
        match d {
            Ok(d) => Packet::from_bytes(&d).ok(),
            Err(e) => {
                self.broken |= e.kind() == io::ErrorKind::ConnectionAborted;
                None
            }
        }
    }

    /// Sends `p` as a confirmable message and waits for its end, answering the gateway's
    /// requests meanwhile. `give_up_at` ends the wait early (the run's drain).
    pub async fn exchange(
        &mut self,
        p: Packet,
        give_up_at: Instant,
        on_request: OnRequest<'_>,
    ) -> Outcome {
        let bytes = self.client.start(p, Instant::now());
        // A send error (no route, ICMP refusal) is a lost datagram: the timer retransmits.
        let _ = self.link.send(&bytes).await;
        loop {
            let timer = self.client.deadline().expect("outstanding");
            tokio::select! {
                _ = tokio::time::sleep_until(timer.min(give_up_at)) => {
                    if Instant::now() >= give_up_at {
                        self.client.abandon();
                        return Outcome::Abandoned;
                    }
                    match self.client.on_timer(Instant::now()) {
                        Timer::Retransmit(bytes) => { let _ = self.link.send(&bytes).await; }
                        Timer::GiveUp => {
                            // A gateway that restarted drops records of sessions it no longer
                            // knows, silently.
                            self.broken |= matches!(self.link, Link::Dtls(_));
                            return Outcome::TimedOut;
                        }
                    }
                }
                d = self.link.recv() => {
                    let Some(p) = self.parse(d) else {
                        if self.broken {
                            self.client.abandon();
                            return Outcome::Abandoned;
                        }
                        continue;
                    };
                    match self.client.on_datagram(p) {
                        Incoming::Done(outcome) => return outcome,
                        Incoming::Request(req) => self.answer(&req, on_request).await,
                        Incoming::Ignored => {}
                    }
                }
            }
        }
    }

    /// Answers the gateway's requests until `until`.
    pub async fn serve_until(&mut self, until: Instant, on_request: OnRequest<'_>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                d = self.link.recv() => {
                    let Some(p) = self.parse(d) else {
                        continue;
                    };
                    if let Incoming::Request(req) = self.client.on_datagram(p) {
                        self.answer(&req, on_request).await;
                    }
                }
            }
        }
    }

    async fn answer(&mut self, req: &Packet, on_request: OnRequest<'_>) {
        if let Some(reply) = on_request(req) {
            if let Ok(bytes) = reply.to_bytes() {
                let _ = self.link.send(&bytes).await;
            }
        }
    }

    /// Ends a DTLS session with close_notify; a UDP socket just closes.
    pub async fn close(self) {
        if let Link::Dtls(l) = self.link {
            l.close().await;
        }
    }
}
