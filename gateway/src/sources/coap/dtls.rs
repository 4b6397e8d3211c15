//! CoAPS: CoAP over DTLS 1.2, with pre-shared keys (RFC 7252 section 9.1.3.1) and, when
//! configured, device certificates (X.509 mode, section 9.1.3.3) on the same port, on OpenSSL.
//!
//! One UDP socket serves every peer. A peer gets state only once it has proved its address: a
//! ClientHello without a valid cookie is answered statelessly with a HelloVerifyRequest (RFC 6347
//! section 4.2.1) by OpenSSL's `DTLSv1_listen` on one listening SSL object, so a flood of
//! spoofed hellos costs one small reply each (smaller than the hello: no amplification) and no
//! memory. A ClientHello carrying a cookie bound to its source address becomes a session task
//! owning an OpenSSL `SslStream` over an in-memory datagram channel ([`PeerIo`]): datagrams from
//! the socket are queued to it, records it writes go straight back out with `send_to`.
//!
//! The identity of a session is the PSK identity (the device id; the key comes from the
//! registry during the handshake) or the device named by its client certificate (CN or the
//! configured subjectAltName, optionally pinned); it is the only identity its requests can have.
//!
//! Why OpenSSL, and how PSKs are kept: docs/decisions/0004-dtls.md; the cookie exchange and the
//! X.509 mode: docs/decisions/0021.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use foreign_types::ForeignTypeRef;
use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions,
    SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::verify::X509VerifyFlags;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::handler::Identity;
use super::Server;
use crate::observability::{clip, LogLimiter};
use crate::registry::{AuthError, Registry};
use crate::tls::identity::{self as cert_identity, IdentityField};
use crate::tls::TlsFiles;

/// CoAP's mandatory PSK suite first, then the GCM suite OpenSSL-based clients (libcoap) offer.
/// CCM_8's 64-bit tag puts it below OpenSSL 3's default security level 1, hence level 0.
/// Public so that device-sim's client offers exactly these.
pub const CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-GCM-SHA256:@SECLEVEL=0";
/// With X.509 mode: the PSK suites, then CoAP's mandatory certificate suite
/// (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8) and the ECDHE AEAD suites general DTLS clients offer.
const CIPHERS_X509: &str = "PSK-AES128-CCM8:PSK-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-CCM8:\
    ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:\
    ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:\
    @SECLEVEL=0";
/// Records are sized for a 1280-byte IPv6 path without fragmentation.
pub const MTU: u32 = 1280;
/// Datagrams queued for one session before more are dropped (a flood from one peer).
const PEER_QUEUE: usize = 64;
/// Bytes of cookie: 128 bits of HMAC-SHA256 over the peer's address.
const COOKIE_LEN: usize = 16;

static HANDSHAKE_LOG: LogLimiter = LogLimiter::new(60, Duration::from_secs(60));

pub struct DtlsListener {
    pub socket: Arc<UdpSocket>,
    pub context: Arc<DtlsContext>,
    pub server: Arc<Server>,
    pub registry: Registry,
    pub max_sessions: usize,
    pub idle: Duration,
    pub handshake_timeout: Duration,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>;

/// The peer a listening or handshaking SSL object is talking to, for the cookie and PSK
/// callbacks (OpenSSL hands them the SSL object only).
type PeerCell = Arc<Mutex<SocketAddr>>;

fn peer_index() -> Index<Ssl, PeerCell> {
    static INDEX: OnceLock<Index<Ssl, PeerCell>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("an SSL ex_data index"))
}

fn peer_of(ssl: &openssl::ssl::SslRef) -> Option<SocketAddr> {
    ssl.ex_data(peer_index())
        .map(|cell| *cell.lock().expect("peer lock"))
}

/// Secrets the cookies are keyed with: the current one, and the previous one so that a cookie
/// handed out just before a change still works. They change every `lifetime`.
struct CookieKeys {
    lifetime: Duration,
    keys: Mutex<(ring::hmac::Key, ring::hmac::Key, Instant)>,
}

impl CookieKeys {
    fn new(lifetime: Duration) -> Self {
        Self {
            lifetime,
            keys: Mutex::new((random_key(), random_key(), Instant::now())),
        }
    }

    fn keys(&self) -> (ring::hmac::Key, ring::hmac::Key) {
        let mut k = self.keys.lock().expect("cookie keys lock");
        if k.2.elapsed() >= self.lifetime {
            k.1 = std::mem::replace(&mut k.0, random_key());
            k.2 = Instant::now();
        }
        (k.0.clone(), k.1.clone())
    }

    fn cookie(&self, peer: SocketAddr) -> [u8; COOKIE_LEN] {
        let (current, _) = self.keys();
        let tag = ring::hmac::sign(&current, &address_bytes(peer));
        tag.as_ref()[..COOKIE_LEN]
            .try_into()
            .expect("a 32-byte tag")
    }

    fn verify(&self, peer: SocketAddr, cookie: &[u8]) -> bool {
        if cookie.len() != COOKIE_LEN {
            return false;
        }
        let (current, previous) = self.keys();
        let msg = address_bytes(peer);
        [current, previous].iter().any(|k| {
            let tag = ring::hmac::sign(k, &msg);
            crate::registry::secret::constant_time_eq(&tag.as_ref()[..COOKIE_LEN], cookie)
        })
    }
}

fn random_key() -> ring::hmac::Key {
    let rng = ring::rand::SystemRandom::new();
    ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).expect("system randomness")
}

fn address_bytes(peer: SocketAddr) -> Vec<u8> {
    let mut v = match peer.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    v.extend_from_slice(&peer.port().to_be_bytes());
    v
}

/// The server's OpenSSL context, rebuilt when its certificate files change (X.509 mode).
pub struct DtlsContext {
    registry: Registry,
    x509: Option<TlsFiles>,
    identity_field: IdentityField,
    cookies: Arc<CookieKeys>,
    current: RwLock<SslContext>,
}

impl DtlsContext {
    pub fn new(
        registry: Registry,
        x509: Option<TlsFiles>,
        identity_field: IdentityField,
        cookie_lifetime: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        let cookies = Arc::new(CookieKeys::new(cookie_lifetime));
        let ctx = build_context(&registry, x509.as_ref(), &cookies)?;
        Ok(Arc::new(Self {
            registry,
            x509,
            identity_field,
            cookies,
            current: RwLock::new(ctx),
        }))
    }

    fn current(&self) -> SslContext {
        self.current.read().expect("dtls context lock").clone()
    }

    /// An SSL object bound to `peer`, listening or handshaking.
    fn ssl(&self, peer: PeerCell) -> Result<Ssl, ErrorStack> {
        let mut ssl = Ssl::new(&self.current())?;
        ssl.set_mtu(MTU)?;
        ssl.set_ex_data(peer_index(), peer);
        Ok(ssl)
    }
}

impl crate::tls::Reloadable for DtlsContext {
    fn name(&self) -> &str {
        "coaps"
    }

    fn files(&self) -> Vec<std::path::PathBuf> {
        self.x509
            .iter()
            .flat_map(|f| {
                [
                    Some(&f.cert),
                    Some(&f.key),
                    f.client_ca.as_ref(),
                    f.client_crl.as_ref(),
                ]
                .into_iter()
                .flatten()
                .cloned()
            })
            .collect()
    }

    fn reload(&self) -> anyhow::Result<()> {
        let ctx = build_context(&self.registry, self.x509.as_ref(), &self.cookies)?;
        *self.current.write().expect("dtls context lock") = ctx;
        Ok(())
    }
}

/// The server context: DTLS 1.2, PSK (keys looked up by identity in the registry) and, with
/// `x509`, a certificate and the device CA; cookies keyed by the peer's address.
fn build_context(
    registry: &Registry,
    x509: Option<&TlsFiles>,
    cookies: &Arc<CookieKeys>,
) -> anyhow::Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_options(
        SslOptions::CIPHER_SERVER_PREFERENCE
            | SslOptions::NO_QUERY_MTU
            | SslOptions::NO_TICKET
            | SslOptions::COOKIE_EXCHANGE,
    );
    b.set_mode(SslMode::RELEASE_BUFFERS);
    let gen = cookies.clone();
    b.set_cookie_generate_cb(move |ssl, out| {
        let peer = peer_of(ssl).ok_or_else(ErrorStack::get)?;
        let cookie = gen.cookie(peer);
        out[..COOKIE_LEN].copy_from_slice(&cookie);
        metrics::counter!("citygw_coaps_hello_verify_requests_total").increment(1);
        Ok(COOKIE_LEN)
    });
    let check = cookies.clone();
    b.set_cookie_verify_cb(move |ssl, cookie| {
        peer_of(ssl).is_some_and(|p| check.verify(p, cookie))
    });
    let psk_registry = registry.clone();
    b.set_psk_server_callback(move |ssl, identity, key_out| {
        let identity = identity
            .and_then(|i| std::str::from_utf8(i).ok())
            .unwrap_or("");
        let peer = peer_of(ssl);
        let throttle = psk_registry.throttle();
        let known = psk_registry.get(identity).is_some().then_some(identity);
        if let Some(p) = peer {
            if let Err(t) = throttle.check(p.ip(), known) {
                auth_refused(peer, identity, AuthError::Throttled(t.retry_after));
                return Err(ErrorStack::get());
            }
        }
        match psk_registry.psk(identity) {
            Ok(psk) if psk.len() <= key_out.len() => {
                key_out[..psk.len()].copy_from_slice(&psk);
                Ok(psk.len())
            }
            Ok(_) => Err(ErrorStack::get()),
            Err(e) => {
                if let (Some(p), AuthError::UnknownDevice | AuthError::BadCredentials) = (peer, e) {
                    throttle.failed(p.ip(), known);
                }
                auth_refused(peer, identity, e);
                Err(ErrorStack::get())
            }
        }
    });
    match x509 {
        None => b.set_cipher_list(CIPHERS)?,
        Some(files) => {
            b.set_cipher_list(CIPHERS_X509)?;
            b.set_certificate_chain_file(&files.cert)
                .map_err(|e| anyhow::anyhow!("{}: {e}", files.cert.display()))?;
            b.set_private_key_file(&files.key, SslFiletype::PEM)
                .map_err(|e| anyhow::anyhow!("{}: {e}", files.key.display()))?;
            b.check_private_key()
                .map_err(|e| anyhow::anyhow!("{}: {e}", files.key.display()))?;
            let ca = files
                .client_ca
                .as_ref()
                .expect("X.509 mode has a client CA");
            b.set_ca_file(ca)
                .map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
            if let Some(crl) = &files.client_crl {
                // A PEM file of CRLs loads into the same store as the CA certificates.
                b.set_ca_file(crl)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", crl.display()))?;
                b.cert_store_mut().set_flags(X509VerifyFlags::CRL_CHECK)?;
            }
            // Asked for with the certificate suites only (never with PSK); a certificate
            // session without one is refused after the handshake.
            b.set_verify(SslVerifyMode::PEER);
        }
    }
    Ok(b.build())
}

fn auth_refused(peer: Option<SocketAddr>, identity: &str, e: AuthError) {
    let reason = match e {
        AuthError::BadCredentials => "no_psk",
        other => other.reason(),
    };
    metrics::counter!("citygw_auth_failures_total", "protocol" => "coaps", "reason" => reason)
        .increment(1);
    if let Some(suppressed) = HANDSHAKE_LOG.allow() {
        tracing::warn!(?peer, identity = %clip(identity), reason, suppressed, "dtls psk refused");
    }
}

/// What `DTLSv1_listen` made of a datagram.
enum Listened {
    /// A ClientHello with a valid cookie: the SSL object now holds it, ready for `accept`.
    Verified,
    /// Answered with a HelloVerifyRequest, or dropped.
    Stateless,
    /// The listening object is unusable; make a new one.
    Broken,
}

mod ffi {
    use std::os::raw::c_int;

    /// OpenSSL's `BIO_ADDR`, opaque.
    pub enum BioAddr {}

    extern "C" {
        pub fn DTLSv1_listen(ssl: *mut openssl_sys::SSL, peer: *mut BioAddr) -> c_int;
        pub fn BIO_ADDR_new() -> *mut BioAddr;
        pub fn BIO_ADDR_free(addr: *mut BioAddr);
    }
}

/// Runs OpenSSL's stateless cookie exchange on the datagram queued in `stream`.
fn listen(stream: &mut SslStream<PeerIo>) -> Listened {
    // SAFETY: `stream` owns a live SSL object with its BIO attached; DTLSv1_listen reads the one
    // queued datagram through that BIO and may write a HelloVerifyRequest to it. The address
    // object is allocated, passed and freed here.
    let rc = unsafe {
        let addr = ffi::BIO_ADDR_new();
        if addr.is_null() {
            return Listened::Broken;
        }
        let rc = ffi::DTLSv1_listen(stream.ssl().as_ptr(), addr);
        ffi::BIO_ADDR_free(addr);
        rc
    };
    // Errors of a stateless exchange concern that one datagram only.
    let _ = ErrorStack::get();
    match rc {
        1 => Listened::Verified,
        0 => Listened::Stateless,
        _ => Listened::Broken,
    }
}

/// The listening SSL object and the peer its callbacks see.
struct Listening {
    stream: SslStream<PeerIo>,
    peer: PeerCell,
}

impl DtlsListener {
    fn listening(&self) -> anyhow::Result<Listening> {
        let placeholder = SocketAddr::from(([0, 0, 0, 0], 0));
        let peer: PeerCell = Arc::new(Mutex::new(placeholder));
        let ssl = self.context.ssl(peer.clone())?;
        let io = PeerIo {
            inbound: VecDeque::new(),
            socket: self.socket.clone(),
            peer: placeholder,
        };
        Ok(Listening {
            stream: SslStream::new(ssl, io)?,
            peer,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let sessions: Sessions = Arc::default();
        let mut listening = this.listening()?;
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
            {
                let map = sessions.lock().expect("sessions lock");
                if let Some(tx) = map.get(&peer) {
                    if tx.try_send(datagram).is_err() {
                        metrics::counter!("citygw_coaps_datagrams_dropped_total").increment(1);
                    }
                    continue;
                }
            }
            // Only a ClientHello (handshake record, epoch 0) may open a session; anything else
            // from an unknown peer is noise or a session this gateway no longer holds.
            if !is_client_hello(&datagram) {
                metrics::counter!("citygw_coaps_datagrams_dropped_total").increment(1);
                continue;
            }
            *listening.peer.lock().expect("peer lock") = peer;
            let io = listening.stream.get_mut();
            io.peer = peer;
            io.inbound.clear();
            io.inbound.push_back(datagram);
            match listen(&mut listening.stream) {
                Listened::Stateless => continue,
                Listened::Broken => {
                    listening = this.listening()?;
                    continue;
                }
                Listened::Verified => {}
            }
            // The peer answered our cookie from its address: it may have a session.
            let fresh = this.listening()?;
            let verified = std::mem::replace(&mut listening, fresh);
            if let Err(t) = this.registry.throttle().check(peer.ip(), None) {
                metrics::counter!("citygw_coaps_handshake_failures_total", "reason" => "throttled")
                    .increment(1);
                tracing::debug!(%peer, retry_after = ?t.retry_after, "dtls peer throttled");
                continue;
            }
            let mut map = sessions.lock().expect("sessions lock");
            if map.len() >= this.max_sessions {
                metrics::counter!("citygw_coaps_datagrams_dropped_total").increment(1);
                if let Some(suppressed) = HANDSHAKE_LOG.allow() {
                    tracing::warn!(%peer, sessions = map.len(), suppressed, "dtls session limit reached");
                }
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            map.insert(peer, tx);
            metrics::gauge!("citygw_coaps_sessions").set(map.len() as f64);
            drop(map);
            let (this, sessions) = (this.clone(), sessions.clone());
            tokio::spawn(async move {
                this.session(peer, verified.stream, rx).await;
                let mut map = sessions.lock().expect("sessions lock");
                map.remove(&peer);
                metrics::gauge!("citygw_coaps_sessions").set(map.len() as f64);
            });
        }
    }

    async fn session(
        &self,
        peer: SocketAddr,
        mut stream: SslStream<PeerIo>,
        mut rx: mpsc::Receiver<Vec<u8>>,
    ) {
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
        let offered = stream
            .ssl()
            .psk_identity()
            .and_then(|i| std::str::from_utf8(i).ok())
            .map(str::to_string);
        match handshake {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.handshake_failed(peer, offered.as_deref(), "handshake", &e);
                return;
            }
            Err(_) => {
                self.handshake_failed(
                    peer,
                    offered.as_deref(),
                    "timeout",
                    "no complete handshake in time",
                );
                return;
            }
        };
        let device_id = match offered {
            Some(id) => id,
            None => match self.certificate_identity(&stream) {
                Ok(id) => id,
                Err((id, reason)) => {
                    self.handshake_failed(peer, id.as_deref(), reason, reason);
                    let _ = stream.shutdown();
                    return;
                }
            },
        };
        self.registry.throttle().succeeded(peer.ip(), &device_id);
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

    /// The device a certificate session's client certificate names (OpenSSL verified the chain
    /// and the CRL), if it is pinned to nothing else. The error carries the identity, when one
    /// was read, and the reason label.
    fn certificate_identity(
        &self,
        stream: &SslStream<PeerIo>,
    ) -> Result<String, (Option<String>, &'static str)> {
        let cert = stream
            .ssl()
            .peer_certificate()
            .ok_or((None, "no_certificate"))?;
        let der = cert.to_der().map_err(|_| (None, "bad_certificate"))?;
        let id = cert_identity::identity(&der, self.context.identity_field)
            .map_err(|_| (None, "no_identity"))?;
        if let Some(device) = self.registry.get(&id.device_id) {
            if device.cert_pin().is_some_and(|pin| *pin != id.fingerprint) {
                return Err((Some(id.device_id), "pin_mismatch"));
            }
        }
        Ok(id.device_id)
    }

    fn handshake_failed(
        &self,
        peer: SocketAddr,
        identity: Option<&str>,
        reason: &'static str,
        detail: &str,
    ) {
        let known = identity.filter(|i| self.registry.get(i).is_some());
        self.registry.throttle().failed(peer.ip(), known);
        metrics::counter!("citygw_coaps_handshakes_total", "result" => "failed").increment(1);
        metrics::counter!("citygw_coaps_handshake_failures_total", "reason" => reason).increment(1);
        if let Some(suppressed) = HANDSHAKE_LOG.allow() {
            tracing::warn!(%peer, identity = %clip(identity.unwrap_or("")), reason, detail, suppressed, "dtls handshake failed");
        }
    }
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

    #[test]
    fn cookies_are_bound_to_the_address_and_survive_one_key_change() {
        let keys = CookieKeys::new(Duration::from_millis(50));
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:5001".parse().unwrap();
        let cookie = keys.cookie(a);
        assert!(keys.verify(a, &cookie));
        assert!(!keys.verify(b, &cookie));
        assert!(!keys.verify(a, &cookie[..8]));
        std::thread::sleep(Duration::from_millis(60));
        assert!(keys.verify(a, &cookie), "the previous key still verifies");
        std::thread::sleep(Duration::from_millis(60));
        let _ = keys.cookie(a);
        assert!(!keys.verify(a, &cookie), "two changes later it does not");
    }
}
