//! One telemetry request, from options to a durable reading and a response code.
//!
//! Every refusal has a specific code and a diagnostic payload (RFC 7252 section 5.5.2) and is
//! counted by reason in `citygw_coap_refused_total`; refusals of an authenticated device's data
//! are also dead-lettered by the pipeline, like MQTT rejects.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

use super::blockwise::{Block, Reassembly, Step};
use super::lwm2m::Lwm2m;
use super::request;
use crate::pipeline::{Delivery, Inbound, IngestError, Pipeline, Rejection};
use crate::proto::Protocol;
use crate::reason;
use crate::registry::{AuthError, DeviceEntry, Registry};

/// Who is speaking.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Plain CoAP: the request must carry the device's secret (`?t=`).
    Token,
    /// CoAPS: the device the DTLS session authenticated.
    Session(String),
}

/// A response before it is framed as ACK or NON.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub code: ResponseType,
    /// Diagnostic text for errors, empty on success.
    pub payload: Vec<u8>,
    pub block1: Option<Block>,
    pub size1: Option<usize>,
    pub max_age: Option<u32>,
    /// Location-Path segments (an LwM2M registration's `rd/{id}`).
    pub location: Vec<String>,
}

impl Response {
    pub fn new(code: ResponseType) -> Self {
        Self {
            code,
            payload: Vec::new(),
            block1: None,
            size1: None,
            max_age: None,
            location: Vec::new(),
        }
    }

    /// An error answer: counted by `reason`, explained by `detail`.
    pub fn refuse(code: ResponseType, reason: &'static str, detail: impl Into<String>) -> Self {
        metrics::counter!("citygw_coap_refused_total", "reason" => reason).increment(1);
        let mut detail: String = detail.into();
        // A diagnostic payload must fit a datagram with room to spare.
        if detail.len() > 200 {
            let mut cut = 200;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        Self {
            payload: detail.into_bytes(),
            ..Self::new(code)
        }
    }

    /// The answer to a failed authentication, counted under `protocol`; `anonymous_hint` tells a
    /// device that sent no credential how to send one.
    pub fn auth_refused(protocol: &'static str, e: AuthError, anonymous_hint: &str) -> Self {
        metrics::counter!("citygw_auth_failures_total", "protocol" => protocol, "reason" => e.reason())
            .increment(1);
        match e {
            // RFC 8516: 4.29 with Max-Age saying when to try again.
            AuthError::Throttled(wait) => {
                let mut r = Self::refuse(
                    ResponseType::TooManyRequests,
                    "throttled",
                    "too many failed authentications; retry later",
                );
                r.max_age = Some(wait.as_secs().max(1).min(u32::MAX as u64) as u32);
                r
            }
            AuthError::DisabledDevice => Self::refuse(
                ResponseType::Forbidden,
                "disabled_device",
                "device is disabled",
            ),
            AuthError::Anonymous => Self::refuse(
                ResponseType::Unauthorized,
                "unauthenticated",
                anonymous_hint,
            ),
            AuthError::UnknownDevice | AuthError::BadCredentials => Self::refuse(
                ResponseType::Unauthorized,
                "unauthenticated",
                "unknown device or wrong access token",
            ),
        }
    }

    /// Frames the response to `req`: piggybacked in the ACK of a CON, or a NON of its own.
    pub fn to_packet(&self, req: &Packet, message_id: u16) -> Packet {
        let mut p = Packet::new();
        if req.header.get_type() == coap_lite::MessageType::Confirmable {
            p.header.set_type(coap_lite::MessageType::Acknowledgement);
            p.header.message_id = req.header.message_id;
        } else {
            p.header.set_type(coap_lite::MessageType::NonConfirmable);
            p.header.message_id = message_id;
        }
        p.header.code = MessageClass::Response(self.code);
        p.set_token(req.get_token().to_vec());
        for seg in &self.location {
            p.add_option(CoapOption::LocationPath, seg.clone().into_bytes());
        }
        if let Some(b) = self.block1 {
            p.add_option(CoapOption::Block1, b.encode());
        }
        if let Some(s) = self.size1 {
            p.add_option(CoapOption::Size1, uint(s as u32));
        }
        if let Some(a) = self.max_age {
            p.add_option(CoapOption::MaxAge, uint(a));
        }
        p.payload = self.payload.clone();
        p
    }
}

fn uint(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b[skip..].to_vec()
}

pub struct Handler {
    pub registry: Registry,
    pub pipeline: Pipeline,
    pub reassembly: Reassembly,
    pub max_payload_bytes: usize,
    pub lwm2m: Option<Arc<Lwm2m>>,
}

impl Handler {
    pub async fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        identity: Identity,
        req: &Packet,
    ) -> Response {
        if let Some(n) = request::unknown_critical_option(req) {
            return Response::refuse(
                ResponseType::BadOption,
                "bad_option",
                format!("critical option {n} is not supported"),
            );
        }
        let Some(segments) = request::path_segments(req) else {
            return Response::refuse(
                ResponseType::BadRequest,
                "bad_path",
                "Uri-Path is not UTF-8",
            );
        };
        if let Some(lwm2m) = &self.lwm2m {
            if let Some(r) = lwm2m.handle(peer, &identity, req, &segments).await {
                return r;
            }
        }
        let Some(path) = request::telemetry_path(&segments) else {
            return Response::refuse(
                ResponseType::NotFound,
                "not_found",
                format!(
                    "no resource /{}; telemetry goes to POST /t/{{device}}[/{{format}}]",
                    segments.join("/")
                ),
            );
        };
        if req.header.code != MessageClass::Request(RequestType::Post) {
            return Response::refuse(
                ResponseType::MethodNotAllowed,
                "method_not_allowed",
                "telemetry is sent with POST",
            );
        }
        let device = match self.authenticate(peer, &identity, &path, req).await {
            Ok(d) => d,
            Err(r) => return r,
        };
        let address = format!("coap /{}", segments.join("/"));
        let content_format = match request::content_format(req) {
            Ok(cf) => cf,
            Err(()) => {
                return Response::refuse(
                    ResponseType::BadOption,
                    "bad_option",
                    "Content-Format is not a 16-bit number",
                )
            }
        };
        let format = request::format(path.format.as_deref(), content_format);
        let block = match req.get_first_option(CoapOption::Block1) {
            None => None,
            Some(raw) => match Block::parse(raw) {
                Some(b) => Some(b),
                None => {
                    return Response::refuse(
                        ResponseType::BadOption,
                        "bad_option",
                        "invalid Block1 value",
                    )
                }
            },
        };
        let size1 = req
            .get_first_option(CoapOption::Size1)
            .filter(|v| v.len() <= 4)
            .map(|v| v.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b)));

        let (body, ack_block) = match block {
            None => (req.payload.clone(), None),
            Some(b) => {
                match self
                    .reassembly
                    .add(peer, &address, b, size1, &req.payload, Instant::now())
                {
                    Step::Continue => {
                        let mut r = Response::new(ResponseType::Continue);
                        r.block1 = Some(b);
                        return r;
                    }
                    Step::Complete(body) => (body, Some(b)),
                    Step::TooLarge => {
                        return self
                            .too_large(&device, &address, &req.payload, size1.unwrap_or(0))
                            .await
                    }
                    Step::Incomplete => {
                        return Response::refuse(
                            ResponseType::RequestEntityIncomplete,
                            "block_incomplete",
                            format!(
                                "block {} is not the next one; start again from block 0",
                                b.num
                            ),
                        )
                    }
                    Step::BadBlock => {
                        return Response::refuse(
                            ResponseType::BadRequest,
                            "bad_block",
                            format!("a block with more to follow must carry {} bytes", b.size()),
                        )
                    }
                }
            }
        };
        if body.len() > self.max_payload_bytes {
            return self.too_large(&device, &address, &body, body.len()).await;
        }
        let delivery = if req.header.get_type() == coap_lite::MessageType::Confirmable {
            Delivery::Durable
        } else {
            Delivery::BestEffort
        };
        let inbound = Inbound {
            device: &device,
            protocol: Protocol::Coap,
            format: format.as_ref().map(|f| *f).map_err(|s| s.as_str()),
            address: &address,
            payload: &body,
            delivery,
            content_id: Some(content_id(device.id(), req, &body)),
        };
        let mut response = match self.pipeline.ingest(inbound).await {
            Ok(_) => Response::new(ResponseType::Changed),
            Err(IngestError::Rejected(r)) => rejected(&r),
            Err(IngestError::Store(e)) => {
                if !e.is_refusal() {
                    tracing::error!(device = device.id(), error = %e, "coap reading not stored");
                }
                let mut r = Response::refuse(
                    ResponseType::ServiceUnavailable,
                    "store_unavailable",
                    "gateway store unavailable; retry later",
                );
                r.max_age = Some(5);
                r
            }
        };
        response.block1 = ack_block;
        response
    }

    async fn authenticate(
        &self,
        peer: SocketAddr,
        identity: &Identity,
        path: &request::TelemetryPath,
        req: &Packet,
    ) -> Result<Arc<DeviceEntry>, Response> {
        let result = match identity {
            Identity::Token => match request::query(req, "t") {
                None => Err(AuthError::Anonymous),
                Some(secret) => {
                    self.registry
                        .authenticate_from(peer.ip(), &path.device_id, Some(secret))
                        .await
                }
            },
            Identity::Session(session) if *session != path.device_id => {
                let rejection = Rejection::new(
                    reason::SPOOFED_PATH,
                    format!("device {session} posted for {}", path.device_id),
                );
                // Nothing of a spoofed message is kept, only the fact that it was tried.
                self.pipeline
                    .refuse(
                        session,
                        Protocol::Coap,
                        &format!("coap /t/{}", path.device_id),
                        None,
                        req.payload.len(),
                        &rejection,
                    )
                    .await;
                return Err(Response::refuse(
                    ResponseType::Forbidden,
                    rejection.reason.as_str(),
                    rejection.to_string(),
                ));
            }
            Identity::Session(session) => self.registry.enabled_device(session),
        };
        result.map_err(|e| {
            Response::auth_refused(
                "coap",
                e,
                "missing access token: add the Uri-Query t=<device secret>",
            )
        })
    }

    async fn too_large(
        &self,
        device: &DeviceEntry,
        address: &str,
        head: &[u8],
        size: usize,
    ) -> Response {
        let rejection = Rejection::new(
            reason::PAYLOAD_TOO_LARGE,
            format!("{size} bytes, limit {}", self.max_payload_bytes),
        );
        self.pipeline
            .refuse(
                device.id(),
                Protocol::Coap,
                address,
                Some(head),
                size.max(head.len()),
                &rejection,
            )
            .await;
        let mut r = Response::refuse(
            ResponseType::RequestEntityTooLarge,
            rejection.reason.as_str(),
            rejection.to_string(),
        );
        r.size1 = Some(self.max_payload_bytes);
        r
    }
}

/// The code for a payload the pipeline refused (it has dead-lettered it already).
fn rejected(r: &Rejection) -> Response {
    let code = match r.reason {
        reason::UNKNOWN_FORMAT => ResponseType::UnsupportedContentFormat,
        reason::PAYLOAD_TOO_LARGE => ResponseType::RequestEntityTooLarge,
        _ => ResponseType::BadRequest,
    };
    Response::refuse(code, r.reason.as_str(), r.to_string())
}

/// A CoAP request's identity across retransmissions, also to another node: the device, the
/// message id and token a retransmission repeats, and the payload's hash (so a rebooted device
/// reusing a message id with new data is not taken for a repeat).
fn content_id(device: &str, req: &Packet, body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(body);
    format!(
        "coap/{device}/{}/{}/{}",
        req.header.message_id,
        hex::encode(req.get_token()),
        hex::encode(&digest[..8])
    )
}
