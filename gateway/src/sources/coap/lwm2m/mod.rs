//! LwM2M 1.0/1.1 server, register interface and information reporting, on the CoAP listeners.
//!
//! - `POST /rd?ep=&lt=&lwm2m=&b=` registers (2.01, Location-Path `rd/{id}`), `POST /rd/{id}`
//!   updates, `DELETE /rd/{id}` de-registers. The endpoint name is a registered device id; a live
//!   registration counts as the device's session (online), expiry of its lifetime ends it.
//! - After registering, the server observes the sensor value of every known object instance the
//!   client listed ([`objects::KNOWN`]); each notification becomes readings, stored before a
//!   confirmable notification is acknowledged.
//! - `POST /dp` (LwM2M 1.1 Send) carries SenML values, stored directly.
//!
//! Identity: on CoAPS the DTLS identity, which must equal the endpoint name. On plain CoAP the
//! registration carries the device secret (`t=` query), or, with `coap.lwm2m_nosec` (LwM2M
//! "NoSec" mode, private networks only), the endpoint name alone is trusted.
//! Observations are sent over plain CoAP only; CoAPS clients report with Send. Commands go over
//! both: a CoAPS session lends its outbound queue while it lasts ([`Lwm2m::session_opened`]).
//!
//! Commands ([`requests`]): Write and Execute go to the client's registered address, one
//! request at a time. A queue-mode client (1.1 `Q` parameter, 1.0 `UQ` binding) is reachable
//! only for `coap.lwm2m_queue_awake_secs` after each Register, Update or Send (LwM2M 1.1
//! section 6.5 asks it to listen for CoAP MAX_TRANSMIT_WAIT, 93 s, the default); a client
//! that left a request unanswered is sent nothing more before its next Register, Update or
//! Send. Each of those wakes the device's waiting commands.

pub mod objects;
pub mod requests;
pub mod values;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use rand::RngCore;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};

use super::handler::{Identity, Response};
use super::request;
use crate::config::CoapConfig;
use crate::control::commands::Commands;
use crate::observability::clip;
use crate::pipeline::{now_ms, Delivery, IngestError, Pipeline, Rejection};
use crate::proto::Protocol;
use crate::reason;
use crate::registry::{AuthError, DeviceEntry, Registry};
use objects::Path;

/// Lifetime when the client gives none (LwM2M default).
const DEFAULT_LIFETIME: u64 = 86_400;

/// One client's registration.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: String,
    pub device_id: String,
    pub peer: SocketAddr,
    pub secure: bool,
    pub lifetime_secs: u64,
    pub version: String,
    pub objects: Vec<(u16, u16)>,
    pub registered_ms: i64,
    pub updated_ms: i64,
    /// The last observation or read failure, "" when none.
    pub last_error: String,
    /// The binding as registered ("U", "UQ"; 1.1 adds `Q` as its own parameter).
    pub binding: String,
    /// Queue mode: requests only while the client is awake.
    pub queue: bool,
    expires: Instant,
    /// Queue mode: the client listens until then (its last message + the awake time).
    awake_until: Instant,
    /// A request to it went unanswered; nothing more is sent before its next message.
    silent: bool,
}

struct Observation {
    registration: String,
    device_id: String,
    path: Path,
    answered: Arc<Notify>,
}

pub struct Lwm2m {
    registry: Registry,
    pipeline: Pipeline,
    nosec: bool,
    registrations: Mutex<HashMap<String, Registration>>,
    observations: Mutex<HashMap<Vec<u8>, Observation>>,
    plain: OnceLock<Arc<UdpSocket>>,
    next_message_id: AtomicU16,
    /// The server's outstanding command requests ([`requests`]).
    outstanding: Mutex<requests::Outstanding>,
    commands: OnceLock<Commands>,
    timing: requests::Timing,
    /// How long a queue-mode client listens after its last message.
    awake: Duration,
    /// The outbound queues of the DTLS sessions, by peer, with the session's number.
    sessions: Mutex<HashMap<SocketAddr, (u64, Outbound)>>,
    next_session: AtomicU64,
}

/// What a DTLS session sends to its client (it encrypts each datagram).
type Outbound = mpsc::Sender<Vec<u8>>;

/// A DTLS session's outbound queue lent to the LwM2M server; taken back when dropped (the
/// session ended).
pub struct SessionLink {
    lwm2m: Arc<Lwm2m>,
    peer: SocketAddr,
    number: u64,
}

impl Drop for SessionLink {
    fn drop(&mut self) {
        let mut sessions = self.lwm2m.sessions.lock().expect("sessions lock");
        if sessions
            .get(&self.peer)
            .is_some_and(|(n, _)| *n == self.number)
        {
            sessions.remove(&self.peer);
        }
    }
}

impl Lwm2m {
    pub fn new(registry: Registry, pipeline: Pipeline, cfg: &CoapConfig) -> Self {
        Self {
            registry,
            pipeline,
            nosec: cfg.lwm2m_nosec,
            registrations: Mutex::default(),
            observations: Mutex::default(),
            plain: OnceLock::new(),
            next_message_id: AtomicU16::new(rand::random()),
            outstanding: Mutex::default(),
            commands: OnceLock::new(),
            timing: requests::Timing::new(Duration::from_millis(cfg.lwm2m_ack_timeout_ms)),
            awake: Duration::from_secs(cfg.lwm2m_queue_awake_secs),
            sessions: Mutex::default(),
            next_session: AtomicU64::new(0),
        }
    }

    /// A DTLS session with `peer` is established: requests to a client registered through it
    /// go into `sender` until the returned link is dropped.
    pub fn session_opened(
        self: &Arc<Self>,
        peer: SocketAddr,
        sender: mpsc::Sender<Vec<u8>>,
    ) -> SessionLink {
        let number = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.sessions
            .lock()
            .expect("sessions lock")
            .insert(peer, (number, sender));
        SessionLink {
            lwm2m: self.clone(),
            peer,
            number,
        }
    }

    /// The command state machine, woken by every Register, Update and Send.
    pub fn set_commands(&self, commands: Commands) {
        let _ = self.commands.set(commands);
    }

    fn wake(&self, device_id: &str, reconnected: bool) {
        if let Some(c) = self.commands.get() {
            c.wake(device_id, reconnected);
        }
    }

    /// Whether the device has a live registration.
    pub fn registered(&self, device_id: &str) -> bool {
        self.registrations
            .lock()
            .expect("registrations lock")
            .values()
            .any(|r| r.device_id == device_id)
    }

    /// Why a request to the device could not be sent now, or the link to send it over.
    pub fn link(&self, device_id: &str) -> Result<requests::Link, requests::NotSent> {
        use requests::NotSent;
        let regs = self.registrations.lock().expect("registrations lock");
        let r = regs
            .values()
            .find(|r| r.device_id == device_id)
            .ok_or(NotSent::NotRegistered)?;
        if r.silent {
            return Err(NotSent::Silent);
        }
        if r.queue && r.awake_until <= Instant::now() {
            return Err(NotSent::Asleep);
        }
        if r.secure {
            let sessions = self.sessions.lock().expect("sessions lock");
            let (_, sender) = sessions.get(&r.peer).ok_or(NotSent::NoSession)?;
            return Ok(requests::Link::Session {
                peer: r.peer,
                sender: sender.clone(),
            });
        }
        let socket = self.plain.get().cloned().ok_or(NotSent::NoSocket)?;
        Ok(requests::Link::Plain {
            socket,
            peer: r.peer,
        })
    }

    /// Sends one request to a registered client and waits for its end ([`requests::send`]).
    /// A request left unanswered marks the client silent until its next message; an answer
    /// keeps a queue-mode client awake (its last message starts the awake time again).
    pub async fn request(
        &self,
        device_id: &str,
        link: requests::Link,
        req: &requests::Request,
        on_ack: impl FnOnce() + Send,
    ) -> requests::Outcome {
        let message_id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
        let outcome =
            requests::send(self, device_id, link, message_id, req, self.timing, on_ack).await;
        let mut regs = self.registrations.lock().expect("registrations lock");
        if let Some(r) = regs.values_mut().find(|r| r.device_id == device_id) {
            match outcome {
                requests::Outcome::NoAnswer { .. } => r.silent = true,
                // The client just spoke: a queue-mode client stays awake for the awake time
                // after its last message, so the next queued request still reaches it.
                requests::Outcome::Answered { .. } | requests::Outcome::Reset => {
                    r.awake_until = Instant::now() + self.awake
                }
                requests::Outcome::NoResponse { .. } | requests::Outcome::Moved => {}
            }
        }
        drop(regs);
        outcome
    }

    /// An empty ACK or a Reset from a client: perhaps for one of the command requests.
    pub fn on_empty(&self, peer: SocketAddr, typ: MessageType, message_id: u16) {
        self.outstanding
            .lock()
            .expect("outstanding lock")
            .on_empty(peer, typ, message_id);
    }

    /// The plain CoAP socket, for requests the server sends to clients.
    pub fn set_plain_socket(&self, socket: Arc<UdpSocket>) {
        let _ = self.plain.set(socket);
    }

    /// Registrations, in endpoint order, for the admin API.
    pub fn registrations(&self) -> Vec<Registration> {
        let mut v: Vec<Registration> = self
            .registrations
            .lock()
            .expect("registrations lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        v
    }

    /// Answers the LwM2M paths (`/rd...`, `/dp`); `None` for any other path.
    pub async fn handle(
        self: &Arc<Self>,
        peer: SocketAddr,
        identity: &Identity,
        req: &Packet,
        segments: &[String],
    ) -> Option<Response> {
        let method = match req.header.code {
            MessageClass::Request(m) => m,
            _ => return None,
        };
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        Some(match (segs.as_slice(), method) {
            (["rd"], RequestType::Post) => self.register(peer, identity, req).await,
            (["rd", id], RequestType::Post) => self.update(peer, identity, req, id).await,
            (["rd", id], RequestType::Delete) => self.deregister(peer, identity, req, id).await,
            (["dp"], RequestType::Post) => self.send(peer, identity, req).await,
            (["rd"] | ["rd", _] | ["dp"], _) => Response::refuse(
                ResponseType::MethodNotAllowed,
                "method_not_allowed",
                "registration: POST /rd, update: POST /rd/{id}, de-registration: DELETE /rd/{id}, send: POST /dp",
            ),
            _ => return None,
        })
    }

    async fn register(
        self: &Arc<Self>,
        peer: SocketAddr,
        identity: &Identity,
        req: &Packet,
    ) -> Response {
        let query = |k: &str| {
            request::query(req, k).and_then(|v| std::str::from_utf8(v).ok().map(str::to_string))
        };
        let Some(endpoint) = query("ep").filter(|e| !e.is_empty()) else {
            return Response::refuse(
                ResponseType::BadRequest,
                "lwm2m_bad_registration",
                "registration needs ?ep=<endpoint name>",
            );
        };
        let lifetime = match query("lt").map(|l| l.parse::<u64>()) {
            None => DEFAULT_LIFETIME,
            Some(Ok(l)) if l > 0 => l,
            _ => {
                return Response::refuse(
                    ResponseType::BadRequest,
                    "lwm2m_bad_registration",
                    "lt must be a positive number of seconds",
                )
            }
        };
        let device = match self.authenticate(peer, identity, &endpoint, req).await {
            Ok(d) => d,
            Err(r) => return r,
        };
        let objects = link_objects(&req.payload);
        let binding = query("b").unwrap_or_else(|| "U".into());
        let queue = queue_mode(req, &binding);
        let now = now_ms();
        let id = random_id();
        let registration = Registration {
            id: id.clone(),
            device_id: device.id().to_string(),
            peer,
            secure: matches!(identity, Identity::Session(_)),
            lifetime_secs: lifetime,
            version: query("lwm2m").unwrap_or_else(|| "1.0".into()),
            objects: objects.clone(),
            registered_ms: now,
            updated_ms: now,
            last_error: String::new(),
            binding,
            queue,
            expires: Instant::now() + Duration::from_secs(lifetime),
            awake_until: Instant::now() + self.awake,
            silent: false,
        };
        let replaced = {
            let mut regs = self.registrations.lock().expect("registrations lock");
            let old: Vec<String> = regs
                .values()
                .filter(|r| r.device_id == device.id())
                .map(|r| r.id.clone())
                .collect();
            for o in &old {
                regs.remove(o);
            }
            regs.insert(id.clone(), registration);
            old
        };
        for old in &replaced {
            self.forget_observations(old);
        }
        if replaced.is_empty() {
            device.session_opened();
        }
        self.count("register");
        tracing::info!(device = device.id(), %peer, lifetime, queue, objects = objects.len(), "lwm2m registered");
        self.wake(device.id(), true);
        self.observe_all(
            &id,
            peer,
            &objects,
            matches!(identity, Identity::Session(_)),
        );
        let mut r = Response::new(ResponseType::Created);
        r.location = vec!["rd".into(), id];
        r
    }

    async fn update(
        self: &Arc<Self>,
        peer: SocketAddr,
        identity: &Identity,
        req: &Packet,
        id: &str,
    ) -> Response {
        let device_id = match self.registration_owner(peer, identity, req, id).await {
            Ok(d) => d,
            Err(r) => return r,
        };
        let lifetime = request::query(req, "lt")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
            .filter(|l| *l > 0);
        let new_objects = (!req.payload.is_empty()).then(|| link_objects(&req.payload));
        let (objects, secure) = {
            let mut regs = self.registrations.lock().expect("registrations lock");
            let Some(r) = regs.get_mut(id) else {
                return unknown_registration(id);
            };
            if let Some(l) = lifetime {
                r.lifetime_secs = l;
            }
            if let Some(b) = request::query(req, "b").and_then(|b| std::str::from_utf8(b).ok()) {
                r.binding = b.to_string();
            }
            r.queue = queue_mode(req, &r.binding);
            r.peer = peer;
            r.updated_ms = now_ms();
            r.expires = Instant::now() + Duration::from_secs(r.lifetime_secs);
            r.awake_until = Instant::now() + self.awake;
            r.silent = false;
            let added: Vec<(u16, u16)> = new_objects
                .map(|objs| {
                    let added = objs
                        .iter()
                        .filter(|o| !r.objects.contains(o))
                        .copied()
                        .collect();
                    r.objects = objs;
                    added
                })
                .unwrap_or_default();
            (added, r.secure)
        };
        self.count("update");
        self.observe_all(id, peer, &objects, secure);
        self.wake(&device_id, false);
        Response::new(ResponseType::Changed)
    }

    async fn deregister(
        self: &Arc<Self>,
        peer: SocketAddr,
        identity: &Identity,
        req: &Packet,
        id: &str,
    ) -> Response {
        if let Err(r) = self.registration_owner(peer, identity, req, id).await {
            return r;
        }
        self.end(id, "deregister");
        Response::new(ResponseType::Deleted)
    }

    /// LwM2M 1.1 Send: SenML values from a registered (or DTLS-authenticated) client.
    async fn send(&self, peer: SocketAddr, identity: &Identity, req: &Packet) -> Response {
        let device = match identity {
            Identity::Session(id) => self.registry.get(id).filter(|d| d.enabled()),
            Identity::Token => {
                let regs = self.registrations.lock().expect("registrations lock");
                regs.values()
                    .find(|r| r.peer == peer && !r.secure)
                    .and_then(|r| self.registry.get(&r.device_id))
                    .filter(|d| d.enabled())
            }
        };
        let Some(device) = device else {
            return Response::refuse(
                ResponseType::Unauthorized,
                "unauthenticated",
                "Send (/dp) needs a registration from this address first",
            );
        };
        // A Send shows the client awake, like an Update.
        let awake = {
            let mut regs = self.registrations.lock().expect("registrations lock");
            regs.values_mut()
                .find(|r| r.device_id == device.id())
                .map(|r| {
                    r.awake_until = Instant::now() + self.awake;
                    r.silent = false;
                })
                .is_some()
        };
        if awake {
            self.wake(device.id(), false);
        }
        let cf = request::content_format(req).ok().flatten();
        let delivery = if req.header.get_type() == MessageType::Confirmable {
            Delivery::Durable
        } else {
            Delivery::BestEffort
        };
        self.store(&device, "lwm2m /dp", cf, &req.payload, None, delivery)
            .await
            .map_or_else(|r| r, |_| Response::new(ResponseType::Changed))
    }

    /// Decodes LwM2M values and stores them; a refusal is dead-lettered and answered.
    async fn store(
        &self,
        device: &DeviceEntry,
        address: &str,
        content_format: Option<u16>,
        payload: &[u8],
        requested: Option<Path>,
        delivery: Delivery,
    ) -> Result<usize, Response> {
        let decoded = match values::decode(content_format, payload, requested, now_ms()) {
            Ok(d) => d,
            Err(detail) => {
                let rejection = Rejection::new(reason::MALFORMED_LWM2M, detail);
                self.pipeline
                    .refuse(
                        device.id(),
                        Protocol::Lwm2m,
                        address,
                        Some(payload),
                        payload.len(),
                        &rejection,
                    )
                    .await;
                return Err(Response::refuse(
                    ResponseType::BadRequest,
                    "malformed_lwm2m",
                    rejection.to_string(),
                ));
            }
        };
        match self
            .pipeline
            .ingest_decoded(
                device,
                Protocol::Lwm2m,
                payload.len(),
                decoded,
                delivery,
                None,
            )
            .await
        {
            Ok(n) => Ok(n),
            Err(IngestError::Rejected(r)) => Err(Response::refuse(
                ResponseType::BadRequest,
                r.reason.as_str(),
                r.to_string(),
            )),
            Err(IngestError::Store(e)) => {
                if !e.is_refusal() {
                    tracing::error!(device = device.id(), error = %e, "lwm2m reading not stored");
                }
                let mut r = Response::refuse(
                    ResponseType::ServiceUnavailable,
                    "store_unavailable",
                    "gateway store unavailable; retry later",
                );
                r.max_age = Some(5);
                Err(r)
            }
        }
    }

    async fn authenticate(
        &self,
        peer: SocketAddr,
        identity: &Identity,
        endpoint: &str,
        req: &Packet,
    ) -> Result<Arc<DeviceEntry>, Response> {
        let result = match identity {
            Identity::Session(session) if session != endpoint => {
                return Err(Response::refuse(
                    ResponseType::Forbidden,
                    "spoofed_endpoint",
                    format!(
                        "DTLS identity {} may not register endpoint {}",
                        clip(session),
                        clip(endpoint)
                    ),
                ))
            }
            Identity::Session(session) => self.registry.enabled_device(session),
            Identity::Token => match request::query(req, "t") {
                Some(secret) => {
                    self.registry
                        .authenticate_from(peer.ip(), endpoint, Some(secret))
                        .await
                }
                None if self.nosec => self.registry.enabled_device(endpoint),
                None => Err(AuthError::Anonymous),
            },
        };
        result.map_err(|e| {
            Response::auth_refused(
                "lwm2m",
                e,
                "registration needs the device secret (?t=) or CoAPS",
            )
        })
    }

    /// The device of registration `id`, if `identity` may act on it. A CoAPS session asking for
    /// another device's registration learns nothing (not even that it exists): it gets the
    /// answer an unknown id gets, and the attempt is counted as `spoofed_endpoint`.
    /// The device behind registration `id`, when the request comes from that device and
    /// authenticates (Update and De-register).
    async fn registration_owner(
        &self,
        peer: SocketAddr,
        identity: &Identity,
        req: &Packet,
        id: &str,
    ) -> Result<String, Response> {
        let device_id = self.owned_registration(identity, id)?;
        self.authenticate(peer, identity, &device_id, req).await?;
        Ok(device_id)
    }

    fn owned_registration(&self, identity: &Identity, id: &str) -> Result<String, Response> {
        match (self.registration_device(id), identity) {
            (Some(d), Identity::Session(session)) if *session != d => {
                tracing::warn!(session = %clip(session), registration = %clip(id), "lwm2m request for another device's registration");
                Err(Response::refuse(
                    ResponseType::NotFound,
                    "spoofed_endpoint",
                    no_registration(id),
                ))
            }
            (Some(d), _) => Ok(d),
            (None, _) => Err(unknown_registration(id)),
        }
    }

    fn registration_device(&self, id: &str) -> Option<String> {
        self.registrations
            .lock()
            .expect("registrations lock")
            .get(id)
            .map(|r| r.device_id.clone())
    }

    /// Ends a registration (de-registration or expiry): the device goes offline.
    fn end(&self, id: &str, event: &'static str) {
        let removed = self
            .registrations
            .lock()
            .expect("registrations lock")
            .remove(id);
        if let Some(r) = removed {
            self.forget_observations(id);
            if let Some(d) = self.registry.get(&r.device_id) {
                d.session_closed();
            }
            self.count(event);
            tracing::info!(device = %r.device_id, event, "lwm2m registration ended");
        }
    }

    fn count(&self, event: &'static str) {
        metrics::counter!("citygw_lwm2m_registrations_total", "event" => event).increment(1);
        let n = self.registrations.lock().expect("registrations lock").len();
        metrics::gauge!("citygw_lwm2m_registrations_active").set(n as f64);
    }

    fn forget_observations(&self, registration: &str) {
        self.observations
            .lock()
            .expect("observations lock")
            .retain(|_, o| o.registration != registration);
    }

    /// Expires registrations whose lifetime passed without an update, every second.
    pub async fn expire(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = Instant::now();
            let expired: Vec<String> = self
                .registrations
                .lock()
                .expect("registrations lock")
                .values()
                .filter(|r| r.expires <= now)
                .map(|r| r.id.clone())
                .collect();
            for id in expired {
                self.end(&id, "expire");
            }
        }
    }

    fn observe_all(
        self: &Arc<Self>,
        registration: &str,
        peer: SocketAddr,
        objects: &[(u16, u16)],
        secure: bool,
    ) {
        let targets: Vec<Path> = objects
            .iter()
            .filter_map(|&(object, instance)| {
                objects::observed_resource(object).map(|k| Path {
                    object,
                    instance,
                    resource: k.resource,
                })
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        if secure {
            tracing::debug!(
                registration,
                "observations are not sent over CoAPS; the client reports with Send"
            );
            return;
        }
        let Some(socket) = self.plain.get().cloned() else {
            return;
        };
        for path in targets {
            let (this, registration, socket) =
                (self.clone(), registration.to_string(), socket.clone());
            tokio::spawn(async move { this.observe(registration, peer, path, socket).await });
        }
    }

    /// Sends `GET path` with Observe 0 (retransmitted as RFC 7252 says) until the client answers.
    async fn observe(
        &self,
        registration: String,
        peer: SocketAddr,
        path: Path,
        socket: Arc<UdpSocket>,
    ) {
        let Some(device_id) = self.registration_device(&registration) else {
            return;
        };
        let mut token = vec![0u8; 8];
        rand::rng().fill_bytes(&mut token);
        let answered = Arc::new(Notify::new());
        self.observations.lock().expect("observations lock").insert(
            token.clone(),
            Observation {
                registration: registration.clone(),
                device_id: device_id.clone(),
                path,
                answered: answered.clone(),
            },
        );
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Get);
        p.header.message_id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
        p.set_token(token.clone());
        p.add_option(CoapOption::Observe, Vec::new());
        for seg in [path.object, path.instance, path.resource] {
            p.add_option(CoapOption::UriPath, seg.to_string().into_bytes());
        }
        let bytes = p.to_bytes().expect("a GET encodes");
        let mut wait = self.timing.ack_timeout;
        for _ in 0..=self.timing.max_retransmit {
            if let Err(e) = socket.send_to(&bytes, peer).await {
                tracing::debug!(%peer, error = %e, "lwm2m send");
            }
            if tokio::time::timeout(wait, answered.notified())
                .await
                .is_ok()
            {
                return;
            }
            if self.registration_device(&registration).is_none() {
                return;
            }
            wait *= 2;
        }
        self.observations
            .lock()
            .expect("observations lock")
            .remove(&token);
        self.observe_failed(
            &registration,
            &device_id,
            path,
            "timeout",
            "no answer to observe",
        );
    }

    fn observe_failed(
        &self,
        registration: &str,
        device_id: &str,
        path: Path,
        reason: &'static str,
        detail: &str,
    ) {
        metrics::counter!("citygw_lwm2m_observe_errors_total", "reason" => reason).increment(1);
        tracing::warn!(device = device_id, %path, reason, detail, "lwm2m observation failed");
        if let Some(r) = self
            .registrations
            .lock()
            .expect("registrations lock")
            .get_mut(registration)
        {
            r.last_error = format!("{path}: {reason}: {detail}");
        }
    }

    /// A response to one of the server's requests (read, observe, notification). Returns what to
    /// send back: an empty ACK for a confirmable notification once it is stored, a Reset for a
    /// notification nobody asked for (RFC 7641 section 3.6: that cancels it), nothing for a
    /// confirmable notification the store could not take now (the client retransmits it).
    pub async fn on_response(&self, peer: SocketAddr, resp: &Packet) -> Answer {
        let con = resp.header.get_type() == MessageType::Confirmable;
        let reply = |typ: MessageType| {
            let mut p = Packet::new();
            p.header.set_type(typ);
            p.header.code = MessageClass::Empty;
            p.header.message_id = resp.header.message_id;
            p.to_bytes().expect("an empty message encodes")
        };
        let mismatch = match self
            .outstanding
            .lock()
            .expect("outstanding lock")
            .on_response(peer, resp)
        {
            Ok(()) => return Answer::Send(con.then(|| reply(MessageType::Acknowledgement))),
            Err(m) => m,
        };
        if mismatch != requests::Mismatch::UnknownToken {
            // Another client (or a spoofer) answering a request that was not sent to it.
            ignored(mismatch.reason());
            tracing::debug!(%peer, reason = mismatch.reason(), "lwm2m response ignored");
            return Answer::Send(con.then(|| reply(MessageType::Reset)));
        }
        let found = {
            let obs = self.observations.lock().expect("observations lock");
            obs.get(resp.get_token()).map(|o| {
                (
                    o.registration.clone(),
                    o.device_id.clone(),
                    o.path,
                    o.answered.clone(),
                )
            })
        };
        let Some((registration, device_id, path, answered)) = found else {
            ignored(mismatch.reason());
            return Answer::Send(con.then(|| reply(MessageType::Reset)));
        };
        answered.notify_one();
        let observing = resp.get_observe_value().is_some();
        match resp.header.code {
            MessageClass::Response(ResponseType::Content) => {
                metrics::counter!("citygw_lwm2m_notifications_total").increment(1);
                if let Some(device) = self.registry.get(&device_id).filter(|d| d.enabled()) {
                    let cf = request::content_format(resp).ok().flatten();
                    let address = format!("lwm2m {path}");
                    if let Err(r) = self
                        .store(
                            &device,
                            &address,
                            cf,
                            &resp.payload,
                            Some(path),
                            Delivery::Durable,
                        )
                        .await
                    {
                        if con && r.code == ResponseType::ServiceUnavailable {
                            return Answer::Retry;
                        }
                        let detail = String::from_utf8_lossy(&r.payload).into_owned();
                        self.observe_failed(&registration, &device_id, path, "bad_value", &detail);
                    }
                }
            }
            MessageClass::Response(code) => {
                let detail = format!("{code:?}: {}", String::from_utf8_lossy(&resp.payload));
                self.observe_failed(&registration, &device_id, path, "refused", &detail);
            }
            _ => {}
        }
        if !observing
            || !matches!(
                resp.header.code,
                MessageClass::Response(ResponseType::Content)
            )
        {
            self.observations
                .lock()
                .expect("observations lock")
                .remove(resp.get_token());
        }
        Answer::Send(con.then(|| reply(MessageType::Acknowledgement)))
    }
}

/// What the server does about a response from a client.
pub enum Answer {
    /// Send this back (None: nothing).
    Send(Option<Vec<u8>>),
    /// Nothing now: the confirmable notification was not stored, its retransmission will be.
    Retry,
}

impl requests::Registrations for Lwm2m {
    fn outstanding(&self) -> &Mutex<requests::Outstanding> {
        &self.outstanding
    }

    fn still_at(&self, device_id: &str, peer: SocketAddr) -> bool {
        self.registrations
            .lock()
            .expect("registrations lock")
            .values()
            .any(|r| r.device_id == device_id && r.peer == peer)
    }
}

/// A response that answers nothing of ours, counted by why.
fn ignored(reason: &'static str) {
    metrics::counter!("citygw_lwm2m_responses_ignored_total", "reason" => reason).increment(1);
}

/// Queue mode: LwM2M 1.1's `Q` query parameter, or a 1.0 binding with Q (`UQ`, `SQ`, `UQS`).
fn queue_mode(req: &Packet, binding: &str) -> bool {
    let q_parameter = req
        .get_option(CoapOption::UriQuery)
        .is_some_and(|qs| qs.iter().any(|q| q.as_slice() == b"Q"));
    q_parameter || binding.contains('Q')
}

fn unknown_registration(id: &str) -> Response {
    Response::refuse(
        ResponseType::NotFound,
        "lwm2m_unknown_registration",
        no_registration(id),
    )
}

fn no_registration(id: &str) -> String {
    format!("no registration {}; register again", clip(id))
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Object instances from a registration's CoRE link format: `</1/0>,</3/0>,</3303/0>;ver=1.1`.
fn link_objects(payload: &[u8]) -> Vec<(u16, u16)> {
    let text = String::from_utf8_lossy(payload);
    let mut out = Vec::new();
    for link in text.split(',') {
        let Some(target) = link
            .trim()
            .strip_prefix('<')
            .and_then(|l| l.split('>').next())
        else {
            continue;
        };
        let mut it = target.trim_start_matches('/').split('/');
        if let (Some(Ok(o)), Some(Ok(i)), None) = (
            it.next().map(str::parse::<u16>),
            it.next().map(str::parse::<u16>),
            it.next(),
        ) {
            if !out.contains(&(o, i)) {
                out.push((o, i));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_mode_from_binding_or_q_parameter() {
        let reg = |queries: &[&str]| {
            let mut p = Packet::new();
            for q in queries {
                p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
            }
            p
        };
        assert!(queue_mode(&reg(&["ep=a", "b=UQ"]), "UQ"));
        assert!(queue_mode(&reg(&["ep=a", "lwm2m=1.1", "b=U", "Q"]), "U"));
        assert!(!queue_mode(&reg(&["ep=a", "b=U"]), "U"));
        assert!(!queue_mode(&reg(&["ep=a", "Qx=1"]), "U"));
    }

    #[test]
    fn link_format_object_instances() {
        assert_eq!(
            link_objects(
                b"</>;rt=\"oma.lwm2m\",</1/0>, </3/0>,</3303/0>;ver=1.1,</3303/1>,</5>,</3303/0>"
            ),
            vec![(1, 0), (3, 0), (3303, 0), (3303, 1)]
        );
        assert!(link_objects(b"garbage").is_empty());
    }

    /// A confirmable notification the store cannot take is not acknowledged, so the client
    /// retransmits it; one it stored gets the empty ACK, and a non-confirmable one gets nothing.
    #[tokio::test]
    async fn notifications_are_acknowledged_only_once_stored() {
        use crate::registry::NewDevice;
        use crate::store::Store;

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        let registry = Registry::load(store.clone()).unwrap();
        let device = NewDevice {
            id: "lw-1".into(),
            tenant: "hanoi".into(),
            kind: "weather".into(),
            ..Default::default()
        };
        registry.add(device, 1000).await.unwrap();
        let lwm2m = Lwm2m::new(
            registry,
            Pipeline::new(store.clone(), 1 << 16),
            &CoapConfig::default(),
        );
        let token = vec![7u8, 7];
        let peer: SocketAddr = "127.0.0.1:5683".parse().unwrap();
        let path = Path {
            object: 3303,
            instance: 0,
            resource: 5700,
        };
        lwm2m.observations.lock().unwrap().insert(
            token.clone(),
            Observation {
                registration: "r1".into(),
                device_id: "lw-1".into(),
                path,
                answered: Arc::new(Notify::new()),
            },
        );
        let notification = |typ: MessageType, message_id: u16| {
            let mut p = Packet::new();
            p.header.set_type(typ);
            p.header.message_id = message_id;
            p.header.code = MessageClass::Response(ResponseType::Content);
            p.set_token(token.clone());
            p.set_observe_value(message_id.into());
            p.add_option(CoapOption::ContentFormat, vec![110]);
            p.payload = br#"[{"bn":"/3303/0/","n":"5700","v":21.5}]"#.to_vec();
            p
        };

        let Answer::Send(Some(ack)) = lwm2m
            .on_response(peer, &notification(MessageType::Confirmable, 1))
            .await
        else {
            panic!("a stored confirmable notification is acknowledged");
        };
        let ack = Packet::from_bytes(&ack).unwrap();
        assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(ack.header.message_id, 1);
        assert_eq!(store.last_reading_id(), 1);

        store.close().await;
        assert!(matches!(
            lwm2m
                .on_response(peer, &notification(MessageType::Confirmable, 2))
                .await,
            Answer::Retry
        ));
        assert!(matches!(
            lwm2m
                .on_response(peer, &notification(MessageType::NonConfirmable, 3))
                .await,
            Answer::Send(None)
        ));
        assert_eq!(store.last_reading_id(), 1);
    }
}
