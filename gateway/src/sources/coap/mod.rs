//! CoAP over UDP (RFC 7252): `POST /t/{device_id}[/{format}]` carries telemetry.
//!
//! Messages are parsed and built with coap-lite; the transport is a tokio UDP socket. A
//! confirmable request is answered (2.04 piggybacked in the ACK) only after its readings are on
//! disk; a non-confirmable one is stored best effort and answered with a NON. Retransmissions are
//! recognised by endpoint and message id ([`exchange`]), large payloads arrive in Block1 blocks
//! ([`blockwise`]).
//!
//! Plain CoAP is off by default: there the device's secret travels in the request
//! (`?t=<secret>`), readable by anyone on the path.

mod blockwise;
pub mod dtls;
mod exchange;
pub(crate) mod handler;
pub mod lwm2m;
mod request;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Instant;

use coap_lite::{MessageClass, MessageType, Packet};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::CoapConfig;
use crate::pipeline::Pipeline;
use crate::registry::Registry;
use exchange::{Exchanges, Seen};
use handler::{Handler, Identity, Response};

/// Largest UDP payload; anything longer is truncated by the kernel and then fails to parse.
pub(crate) const MAX_DATAGRAM: usize = 65_535;

pub struct CoapSource {
    pub config: CoapConfig,
    pub registry: Registry,
    pub pipeline: Pipeline,
    /// The LwM2M server shared by both listeners (and the admin API); None when disabled.
    pub lwm2m: Option<Arc<lwm2m::Lwm2m>>,
    /// Where a device certificate names the device (X.509 mode).
    pub identity_field: crate::tls::identity::IdentityField,
    /// Certificate reloads (X.509 mode).
    pub reloader: crate::tls::Reloader,
}

impl super::Source for CoapSource {
    fn name(&self) -> &'static str {
        "coap"
    }

    fn start(
        self: Box<Self>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>> {
        let cfg = self.config;
        let mut listeners: Vec<BoxFuture<'static, anyhow::Result<()>>> = Vec::new();
        let lwm2m = self.lwm2m;
        if cfg.plain_enabled {
            let socket = Arc::new(bind(cfg.listen, "coap")?);
            if let Some(l) = &lwm2m {
                l.set_plain_socket(socket.clone());
            }
            let server = Arc::new(Server::new(
                &cfg,
                self.registry.clone(),
                self.pipeline.clone(),
                lwm2m.clone(),
            ));
            tracing::info!(listen = %cfg.listen, "coap listening (plain, token in ?t=)");
            listeners.push(serve_plain(socket, server, shutdown.clone()).boxed());
        } else {
            tracing::info!("plain coap disabled (coap.plain_enabled = false)");
        }
        if cfg.dtls_enabled {
            let socket = bind(cfg.dtls_listen, "coaps")?;
            let x509 = cfg.dtls_x509_files()?;
            let modes = if x509.is_some() {
                "PSK and X.509"
            } else {
                "PSK"
            };
            let context = dtls::DtlsContext::new(
                self.registry.clone(),
                x509.clone(),
                self.identity_field,
                std::time::Duration::from_secs(cfg.dtls_cookie_lifetime_secs),
            )
            .map_err(|e| anyhow::anyhow!("coaps: {e:#}"))?;
            if x509.is_some() {
                self.reloader.add(context.clone());
            }
            let listener = dtls::DtlsListener {
                context,
                server: Arc::new(Server::new(
                    &cfg,
                    self.registry.clone(),
                    self.pipeline,
                    lwm2m.clone(),
                )),
                registry: self.registry,
                max_sessions: cfg.dtls_max_sessions,
                idle: std::time::Duration::from_secs(cfg.dtls_idle_secs),
                handshake_timeout: std::time::Duration::from_secs(cfg.dtls_handshake_timeout_secs),
                socket: Arc::new(socket),
            };
            tracing::info!(listen = %cfg.dtls_listen, modes, "coaps listening (DTLS 1.2, cookie exchange)");
            listeners.push(listener.run(shutdown.clone()).boxed());
        }
        if let Some(l) = lwm2m.filter(|_| !listeners.is_empty()) {
            let shutdown = shutdown.clone();
            listeners.push(
                async move {
                    tokio::select! {
                        _ = l.expire() => {}
                        _ = shutdown.cancelled() => {}
                    }
                    Ok(())
                }
                .boxed(),
            );
        }
        Ok(async move {
            if listeners.is_empty() {
                shutdown.cancelled().await;
                return Ok(());
            }
            futures::future::try_join_all(listeners).await.map(|_| ())
        }
        .boxed())
    }
}

/// Binds now, so a taken port fails the start rather than a background task.
fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)
        .map_err(|e| anyhow::anyhow!("{what} listener {addr}: {e}"))?;
    socket.set_nonblocking(true)?;
    // Registering with the reactor needs the runtime, which `start` runs inside.
    Ok(UdpSocket::from_std(socket)?)
}

async fn serve_plain(
    socket: Arc<UdpSocket>,
    server: Arc<Server>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors of earlier sends surface here on some systems; not fatal.
                Err(e) => {
                    tracing::debug!(error = %e, "coap recv");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        let out = socket.clone();
        server.on_datagram(peer, Identity::Token, &buf[..n], move |bytes| async move {
            if let Err(e) = out.send_to(&bytes, peer).await {
                tracing::debug!(%peer, error = %e, "coap send");
            }
        });
    }
}

/// What plain CoAP and CoAPS share: deduplication, admission and the request handler.
pub struct Server {
    handler: Arc<Handler>,
    exchanges: Arc<Exchanges>,
    in_flight: Arc<Semaphore>,
    next_message_id: AtomicU16,
    lwm2m: Option<Arc<lwm2m::Lwm2m>>,
}

impl Server {
    pub fn new(
        cfg: &CoapConfig,
        registry: Registry,
        pipeline: Pipeline,
        lwm2m: Option<Arc<lwm2m::Lwm2m>>,
    ) -> Self {
        Self {
            handler: Arc::new(Handler {
                registry,
                pipeline,
                reassembly: blockwise::Reassembly::new(
                    cfg.max_payload_bytes,
                    cfg.exchange_lifetime(),
                ),
                max_payload_bytes: cfg.max_payload_bytes,
                lwm2m: lwm2m.clone(),
            }),
            exchanges: Arc::new(Exchanges::new(cfg.exchange_lifetime(), cfg.max_exchanges)),
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight)),
            next_message_id: AtomicU16::new(rand::random()),
            lwm2m,
        }
    }

    /// A DTLS session with `peer` lends its outbound queue to the LwM2M server (commands to a
    /// client registered through it) until the returned link is dropped.
    pub fn session_opened(
        &self,
        peer: SocketAddr,
        sender: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Option<lwm2m::SessionLink> {
        self.lwm2m.as_ref().map(|l| l.session_opened(peer, sender))
    }

    /// Handles one datagram from `peer`; `send` delivers a reply to it (spawned, so the receive
    /// loop never waits for the store).
    pub fn on_datagram<F, Fut>(
        &self,
        peer: SocketAddr,
        identity: Identity,
        datagram: &[u8],
        send: F,
    ) where
        F: FnOnce(Vec<u8>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        metrics::counter!("citygw_coap_datagrams_total").increment(1);
        let req = match Packet::from_bytes(datagram) {
            Ok(p) if datagram[0] >> 6 == 1 => p,
            // RFC 7252 section 3: other versions are silently ignored.
            Ok(_) => return malformed("bad_version", None, send),
            Err(e) => {
                // A CON whose header is readable learns of the failure by a Reset.
                let rst =
                    (datagram.len() >= 4 && datagram[0] >> 6 == 1 && (datagram[0] >> 4) & 3 == 0)
                        .then(|| reset(u16::from_be_bytes([datagram[2], datagram[3]])));
                tracing::debug!(%peer, error = %e, "malformed coap datagram");
                return malformed("unparseable", rst, send);
            }
        };
        let typ = req.header.get_type();
        match req.header.code {
            MessageClass::Request(_)
                if matches!(typ, MessageType::Confirmable | MessageType::NonConfirmable) => {}
            // A CON ping (empty message) is answered with a Reset, as RFC 7252 section 4.3 says.
            MessageClass::Empty if typ == MessageType::Confirmable => {
                return spawn_send(send, reset(req.header.message_id));
            }
            // Answers to the server's own requests (LwM2M observations and their notifications).
            // A confirmable notification is deduplicated like a request: stored once, acked again.
            MessageClass::Response(_) if self.lwm2m.is_some() && typ != MessageType::Reset => {
                let key = (peer, req.header.message_id);
                if typ == MessageType::Confirmable {
                    match self.exchanges.begin(key, Instant::now()) {
                        Seen::New => {}
                        Seen::InProgress => return,
                        Seen::Answered(reply) => {
                            metrics::counter!("citygw_coap_retransmissions_total").increment(1);
                            if let Some(reply) = reply {
                                spawn_send(send, reply);
                            }
                            return;
                        }
                    }
                }
                let (lwm2m, exchanges) =
                    (self.lwm2m.clone().expect("checked"), self.exchanges.clone());
                tokio::spawn(async move {
                    let reply = match lwm2m.on_response(peer, &req).await {
                        lwm2m::Answer::Send(reply) => reply,
                        // Not stored: no ACK, and the retransmission is processed afresh.
                        lwm2m::Answer::Retry => {
                            exchanges.forget(key);
                            return;
                        }
                    };
                    if typ == MessageType::Confirmable {
                        exchanges.complete(key, reply.clone());
                    }
                    if let Some(reply) = reply {
                        send(reply).await;
                    }
                });
                return;
            }
            // An empty ACK or a Reset: perhaps for a request of the LwM2M server (a command).
            MessageClass::Empty if typ != MessageType::NonConfirmable => {
                if let Some(l) = &self.lwm2m {
                    l.on_empty(peer, typ, req.header.message_id);
                }
                return;
            }
            // Stray responses: nothing of ours is waiting for them.
            MessageClass::Empty | MessageClass::Response(_) if typ != MessageType::Confirmable => {
                return
            }
            _ => {
                return malformed(
                    "unexpected_message",
                    Some(reset(req.header.message_id)),
                    send,
                )
            }
        }
        let key = (peer, req.header.message_id);
        match self.exchanges.begin(key, Instant::now()) {
            Seen::New => {}
            Seen::InProgress => {
                metrics::counter!("citygw_coap_retransmissions_total").increment(1);
                return;
            }
            Seen::Answered(reply) => {
                metrics::counter!("citygw_coap_retransmissions_total").increment(1);
                if let Some(reply) = reply {
                    spawn_send(send, reply);
                }
                return;
            }
        }
        let message_id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let mut busy = Response::refuse(
                coap_lite::ResponseType::ServiceUnavailable,
                "busy",
                "too many requests in progress; retry later",
            );
            busy.max_age = Some(2);
            metrics::counter!("citygw_coap_responses_total", "code" => code_label(&busy))
                .increment(1);
            // Not remembered: a retransmission deserves another try.
            self.exchanges.forget(key);
            return spawn_send(send, encode(&busy, &req, message_id));
        };
        let (handler, exchanges) = (self.handler.clone(), self.exchanges.clone());
        tokio::spawn(async move {
            let response = handler.handle(peer, identity, &req).await;
            drop(permit);
            metrics::counter!("citygw_coap_responses_total", "code" => code_label(&response))
                .increment(1);
            let bytes = encode(&response, &req, message_id);
            exchanges.complete(key, Some(bytes.clone()));
            send(bytes).await;
        });
    }
}

fn encode(response: &Response, req: &Packet, message_id: u16) -> Vec<u8> {
    response
        .to_packet(req, message_id)
        .to_bytes_unlimited()
        .expect("a response with a short diagnostic encodes")
}

fn reset(message_id: u16) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Reset);
    p.header.code = MessageClass::Empty;
    p.header.message_id = message_id;
    p.to_bytes().expect("an empty message encodes")
}

fn malformed<F, Fut>(reason: &'static str, reply: Option<Vec<u8>>, send: F)
where
    F: FnOnce(Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    metrics::counter!("citygw_coap_malformed_total", "reason" => reason).increment(1);
    if let Some(reply) = reply {
        spawn_send(send, reply);
    }
}

fn spawn_send<F, Fut>(send: F, bytes: Vec<u8>)
where
    F: FnOnce(Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(send(bytes));
}

/// "2.04", "4.13", ...: the code as CoAP writes it, for the requests-by-code counter.
fn code_label(r: &Response) -> &'static str {
    use coap_lite::ResponseType as R;
    match r.code {
        R::Changed => "2.04",
        R::Continue => "2.31",
        R::BadRequest => "4.00",
        R::Unauthorized => "4.01",
        R::BadOption => "4.02",
        R::Forbidden => "4.03",
        R::NotFound => "4.04",
        R::MethodNotAllowed => "4.05",
        R::RequestEntityIncomplete => "4.08",
        R::RequestEntityTooLarge => "4.13",
        R::UnsupportedContentFormat => "4.15",
        R::ServiceUnavailable => "5.03",
        _ => "other",
    }
}
