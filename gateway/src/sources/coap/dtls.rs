//! CoAPS: CoAP over DTLS 1.2 with pre-shared keys (RFC 7252 section 9.1.3.1), on OpenSSL.
//!
//! One UDP socket serves every peer. Each peer address gets a session task owning an OpenSSL
//! `SslStream` over an in-memory datagram channel ([`PeerIo`]): datagrams from the socket are
//! queued to it, records it writes go straight back out with `send_to`. The PSK identity is the
//! device id; the key comes from the registry during the handshake, and the identity of the
//! established session is the only identity its requests can have.
//!
//! Why OpenSSL, and how PSKs are kept: docs/decisions/0004-dtls.md.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openssl::error::ErrorStack;
use openssl::ssl::{
    ErrorCode, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslStream, SslVersion,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::handler::Identity;
use super::Server;
use crate::registry::{AuthError, Registry};

/// CoAP's mandatory suite first, then the GCM suite OpenSSL-based clients (libcoap) offer.
/// CCM_8's 64-bit tag puts it below OpenSSL 3's default security level 1, hence level 0.
/// Public so that device-sim's client offers exactly these.
pub const CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-GCM-SHA256:@SECLEVEL=0";
/// Records are sized for a 1280-byte IPv6 path without fragmentation.
pub const MTU: u32 = 1280;
/// Datagrams queued for one session before more are dropped (a flood from one peer).
const PEER_QUEUE: usize = 64;

pub struct DtlsListener {
    pub socket: Arc<UdpSocket>,
    pub context: SslContext,
    pub server: Arc<Server>,
    pub max_sessions: usize,
    pub idle: Duration,
    pub handshake_timeout: Duration,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>;

/// The server context: PSK only, DTLS 1.2, keys looked up by identity in the registry.
pub fn context(registry: Registry) -> Result<SslContext, ErrorStack> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list(CIPHERS)?;
    b.set_options(
        SslOptions::CIPHER_SERVER_PREFERENCE | SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET,
    );
    b.set_mode(SslMode::RELEASE_BUFFERS);
    b.set_psk_server_callback(move |_ssl, identity, key_out| {
        let identity = identity
            .and_then(|i| std::str::from_utf8(i).ok())
            .unwrap_or("");
        match registry.psk(identity) {
            Ok(psk) if psk.len() <= key_out.len() => {
                key_out[..psk.len()].copy_from_slice(&psk);
                Ok(psk.len())
            }
            Ok(_) => Err(ErrorStack::get()),
            Err(e) => {
                metrics::counter!("citygw_auth_failures_total", "protocol" => "coaps", "reason" => psk_reason(e))
                    .increment(1);
                tracing::warn!(identity, reason = psk_reason(e), "dtls psk refused");
                Err(ErrorStack::get())
            }
        }
    });
    Ok(b.build())
}

fn psk_reason(e: AuthError) -> &'static str {
    match e {
        AuthError::BadCredentials => "no_psk",
        other => other.reason(),
    }
}

impl DtlsListener {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let sessions: Sessions = Arc::default();
        let mut buf = vec![0u8; super::MAX_DATAGRAM];
        loop {
            let (n, peer) = tokio::select! {
                r = this.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "coaps recv");
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return Ok(()),
            };
            metrics::counter!("citygw_coaps_datagrams_total").increment(1);
            let datagram = buf[..n].to_vec();
            let mut map = sessions.lock().expect("sessions lock");
            if let Some(tx) = map.get(&peer) {
                if tx.try_send(datagram).is_err() {
                    metrics::counter!("citygw_coaps_datagrams_dropped_total").increment(1);
                }
                continue;
            }
            // Only a ClientHello (handshake record, epoch 0) may open a session; anything else
            // from an unknown peer is noise or a session this gateway no longer holds.
            if !is_client_hello(&datagram) {
                metrics::counter!("citygw_coaps_datagrams_dropped_total").increment(1);
                continue;
            }
            if map.len() >= this.max_sessions {
                metrics::counter!("citygw_coaps_datagrams_dropped_total").increment(1);
                tracing::warn!(%peer, sessions = map.len(), "dtls session limit reached");
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            let _ = tx.try_send(datagram);
            map.insert(peer, tx);
            metrics::gauge!("citygw_coaps_sessions").set(map.len() as f64);
            drop(map);
            let (this, sessions) = (this.clone(), sessions.clone());
            tokio::spawn(async move {
                this.session(peer, rx).await;
                let mut map = sessions.lock().expect("sessions lock");
                map.remove(&peer);
                metrics::gauge!("citygw_coaps_sessions").set(map.len() as f64);
            });
        }
    }

    async fn session(&self, peer: SocketAddr, mut rx: mpsc::Receiver<Vec<u8>>) {
        let io = PeerIo {
            inbound: VecDeque::new(),
            socket: self.socket.clone(),
            peer,
        };
        let ssl = match openssl::ssl::Ssl::new(&self.context) {
            Ok(mut ssl) => {
                let _ = ssl.set_mtu(MTU);
                ssl
            }
            Err(e) => {
                tracing::error!(error = %e, "dtls session setup");
                return;
            }
        };
        let Ok(mut stream) = SslStream::new(ssl, io) else {
            return;
        };
        let handshake = tokio::time::timeout(self.handshake_timeout, async {
            loop {
                match stream.accept() {
                    Ok(()) => return Ok(()),
                    Err(e) if e.code() == ErrorCode::WANT_READ => match rx.recv().await {
                        Some(d) => stream.get_mut().inbound.push_back(d),
                        None => return Err("closed".to_string()),
                    },
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await;
        let identity = match handshake {
            Ok(Ok(())) => stream
                .ssl()
                .psk_identity()
                .and_then(|i| std::str::from_utf8(i).ok())
                .map(str::to_string),
            Ok(Err(e)) => {
                handshake_failed(peer, "handshake", &e);
                return;
            }
            Err(_) => {
                handshake_failed(peer, "timeout", "no complete handshake in time");
                return;
            }
        };
        let Some(device_id) = identity else {
            handshake_failed(peer, "handshake", "no PSK identity");
            return;
        };
        let suite = stream
            .ssl()
            .current_cipher()
            .map(|c| c.name())
            .unwrap_or("?");
        metrics::counter!("citygw_coaps_handshakes_total", "result" => "ok").increment(1);
        tracing::debug!(%peer, device = %device_id, suite, "dtls session established");

        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(PEER_QUEUE);
        // The LwM2M server's requests (commands) to this client go out through this session.
        let _link = self.server.session_opened(peer, out_tx.clone());
        let mut buf = vec![0u8; super::MAX_DATAGRAM];
        loop {
            tokio::select! {
                d = rx.recv() => {
                    let Some(d) = d else { return };
                    stream.get_mut().inbound.push_back(d);
                    loop {
                        match stream.ssl_read(&mut buf) {
                            Ok(n) => {
                                let out = out_tx.clone();
                                self.server.on_datagram(
                                    peer,
                                    Identity::Session(device_id.clone()),
                                    &buf[..n],
                                    move |bytes| async move {
                                        let _ = out.send(bytes).await;
                                    },
                                );
                            }
                            Err(e) if e.code() == ErrorCode::WANT_READ => break,
                            // close_notify, a fatal alert or a broken record: the session ends
                            // and the device handshakes again.
                            Err(e) => {
                                tracing::debug!(%peer, device = %device_id, error = %e, "dtls session closed");
                                return;
                            }
                        }
                    }
                }
                Some(bytes) = out_rx.recv() => {
                    if let Err(e) = stream.ssl_write(&bytes) {
                        tracing::debug!(%peer, error = %e, "dtls write");
                        return;
                    }
                }
                _ = tokio::time::sleep(self.idle) => {
                    let _ = stream.shutdown();
                    return;
                }
            }
        }
    }
}

fn handshake_failed(peer: SocketAddr, reason: &'static str, detail: &str) {
    metrics::counter!("citygw_coaps_handshakes_total", "result" => "failed").increment(1);
    metrics::counter!("citygw_coaps_handshake_failures_total", "reason" => reason).increment(1);
    tracing::warn!(%peer, reason, detail, "dtls handshake failed");
}

/// A DTLS record of content type handshake (22), version 1.x, epoch 0, carrying a ClientHello (1).
fn is_client_hello(d: &[u8]) -> bool {
    d.len() > 13 && d[0] == 22 && d[1] == 0xfe && d[3..5] == [0, 0] && d[13] == 1
}

/// The datagram side of one session: reads return one queued datagram each (DTLS needs record
/// boundaries), writes are sent as one datagram each.
struct PeerIo {
    inbound: VecDeque<Vec<u8>>,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
}

impl Read for PeerIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_datagram(&mut self.inbound, buf)
    }
}

/// OpenSSL's read from a datagram queue: one read is one whole datagram (DTLS needs record
/// boundaries); an empty queue is `WouldBlock`, so OpenSSL answers WANT_READ.
pub fn read_datagram(queue: &mut VecDeque<Vec<u8>>, buf: &mut [u8]) -> io::Result<usize> {
    match queue.pop_front() {
        Some(d) => {
            let n = d.len().min(buf.len());
            buf[..n].copy_from_slice(&d[..n]);
            Ok(n)
        }
        None => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Write for PeerIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A full socket buffer loses the datagram, as the network might: DTLS and CoAP both
        // retransmit.
        if let Err(e) = self.socket.try_send_to(buf, self.peer) {
            tracing::debug!(peer = %self.peer, error = %e, "coaps send");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_is_recognised() {
        let mut hello = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 50, 1];
        assert!(is_client_hello(&hello));
        hello[3] = 1; // epoch 1: an encrypted record of an old session
        assert!(!is_client_hello(&hello));
        assert!(!is_client_hello(&[23, 0xfe, 0xfd]));
    }
}
