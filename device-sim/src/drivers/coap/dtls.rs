//! DTLS 1.2 PSK client for CoAPS, on OpenSSL like the gateway's listener.
//!
//! OpenSSL drives the protocol over an in-memory datagram adapter ([`Datagrams`]): records it
//! writes are queued and sent from async code, datagrams received are queued for it to read.
//! That keeps the handshake and every record on the tokio socket, with no blocking I/O inside
//! OpenSSL. One [`SslContext`] serves every device; each session's identity and key ride on
//! its `Ssl` as ex-data, read by the context's PSK callback.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Duration;

use citygw::sources::coap::dtls::{self, CIPHERS, MTU};
use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslStream,
    SslVersion,
};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// How long to wait for a handshake flight before asking OpenSSL to retransmit its own.
const FLIGHT_WAIT: Duration = Duration::from_secs(1);

/// A device's PSK identity (its id) and key.
struct Psk {
    identity: Vec<u8>,
    key: Vec<u8>,
}

/// The client context shared by every CoAPS device of a run.
pub struct DtlsClient {
    context: SslContext,
    psk: Index<Ssl, Psk>,
}

impl DtlsClient {
    pub fn new() -> Result<Self, ErrorStack> {
        let psk = Ssl::new_ex_index::<Psk>()?;
        let mut b = SslContextBuilder::new(SslMethod::dtls())?;
        b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
        b.set_cipher_list(CIPHERS)?;
        b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
        b.set_mode(SslMode::RELEASE_BUFFERS);
        b.set_psk_client_callback(move |ssl, _hint, identity_out, key_out| {
            let Some(p) = ssl.ex_data(psk) else {
                return Err(ErrorStack::get());
            };
            // The identity is written as a NUL-terminated C string.
            if p.identity.len() >= identity_out.len() || p.key.len() > key_out.len() {
                return Err(ErrorStack::get());
            }
            identity_out[..p.identity.len()].copy_from_slice(&p.identity);
            identity_out[p.identity.len()] = 0;
            key_out[..p.key.len()].copy_from_slice(&p.key);
            Ok(p.key.len())
        });
        Ok(Self {
            context: b.build(),
            psk,
        })
    }

    /// Handshakes over `socket` (connected to the gateway) as `identity` with `key`, within
    /// `timeout`. The error names what failed, for the run's outcome counts.
    pub async fn connect(
        &self,
        socket: UdpSocket,
        identity: &str,
        key: &[u8],
        timeout: Duration,
    ) -> Result<DtlsLink, HandshakeError> {
        let mut ssl = Ssl::new(&self.context).map_err(HandshakeError::Setup)?;
        ssl.set_mtu(MTU).map_err(HandshakeError::Setup)?;
        ssl.set_ex_data(
            self.psk,
            Psk {
                identity: identity.as_bytes().to_vec(),
                key: key.to_vec(),
            },
        );
        let mut stream =
            SslStream::new(ssl, Datagrams::default()).map_err(HandshakeError::Setup)?;
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        loop {
            let step = stream.connect();
            flush(&socket, stream.get_mut()).await;
            match step {
                Ok(()) => break,
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => return Err(HandshakeError::Refused(e.to_string())),
            }
            if Instant::now() >= deadline {
                return Err(HandshakeError::Timeout);
            }
            let wait = deadline.min(Instant::now() + FLIGHT_WAIT);
            // On a quiet wait, connect() again: OpenSSL retransmits its flight once its own
            // timer has expired. A receive error (a refused port's ICMP) counts as silence.
            if let Ok(Ok(n)) = tokio::time::timeout_at(wait, socket.recv(&mut buf)).await {
                stream.get_mut().inbound.push_back(buf[..n].to_vec());
            }
        }
        Ok(DtlsLink {
            socket,
            stream,
            received: VecDeque::new(),
            buf,
        })
    }
}

#[derive(Debug)]
pub enum HandshakeError {
    Setup(ErrorStack),
    /// OpenSSL gave up: an alert from the gateway (a wrong PSK ends in decrypt_error) or a
    /// broken record.
    Refused(String),
    Timeout,
}

impl HandshakeError {
    /// The outcome name the run counts it under.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Setup(_) => "dtls setup error",
            HandshakeError::Refused(_) => "dtls handshake failed",
            HandshakeError::Timeout => "dtls handshake timeout",
        }
    }
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Setup(e) => write!(f, "dtls setup: {e}"),
            HandshakeError::Refused(e) => write!(f, "dtls handshake failed: {e}"),
            HandshakeError::Timeout => f.write_str("dtls handshake timeout"),
        }
    }
}

/// An established session: CoAP datagrams in and out.
pub struct DtlsLink {
    socket: UdpSocket,
    stream: SslStream<Datagrams>,
    /// Decrypted datagrams not yet handed out.
    received: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl DtlsLink {
    pub async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        let r = self.stream.ssl_write(datagram);
        flush(&self.socket, self.stream.get_mut()).await;
        r.map(|_| ()).map_err(io::Error::other)
    }

    /// The next decrypted datagram. Cancel-safe: everything after the socket read is
    /// synchronous. `ConnectionAborted` when the session ended (the gateway's close_notify at
    /// its idle timeout, a fatal alert).
    pub async fn recv(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(d) = self.received.pop_front() {
                return Ok(d);
            }
            let n = self.socket.recv(&mut self.buf).await?;
            self.stream
                .get_mut()
                .inbound
                .push_back(self.buf[..n].to_vec());
            loop {
                match self.stream.ssl_read(&mut self.buf) {
                    Ok(n) => self.received.push_back(self.buf[..n].to_vec()),
                    Err(e) if e.code() == ErrorCode::WANT_READ => break,
                    Err(e) => return Err(io::Error::new(io::ErrorKind::ConnectionAborted, e)),
                }
            }
            // Reads can write too (an alert, a retransmitted flight).
            flush(&self.socket, self.stream.get_mut()).await;
        }
    }

    /// Sends close_notify, so the gateway ends the session now rather than at its idle timeout.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown();
        flush(&self.socket, self.stream.get_mut()).await;
    }
}

async fn flush(socket: &UdpSocket, io: &mut Datagrams) {
    for d in io.outbound.drain(..) {
        // A lost datagram is what DTLS and CoAP retransmit for.
        let _ = socket.send(&d).await;
    }
}

/// OpenSSL's view of the socket: one read is one datagram (DTLS needs record boundaries), one
/// write is one datagram.
#[derive(Default)]
struct Datagrams {
    inbound: VecDeque<Vec<u8>>,
    outbound: Vec<Vec<u8>>,
}

impl Read for Datagrams {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        dtls::read_datagram(&mut self.inbound, buf)
    }
}

impl Write for Datagrams {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbound.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
