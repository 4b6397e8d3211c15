//! Commands over LwM2M: a Write (`PUT`) or Execute (`POST`) on one resource of a registered
//! client, sent by the LwM2M server of the CoAP source (sources/coap/lwm2m/requests.rs).
//!
//! When: at once to a registered client; a queue-mode client only while awake after its
//! Register/Update/Send; an unregistered one when it registers. One device's commands go one at
//! a time in creation order (the dispatch task of [`Commands`] awaits each request).
//!
//! States: SENT (durable) before the request leaves; DELIVERED on an empty ACK (the answer
//! follows separately); SUCCEEDED on a 2.xx response, FAILED on 4.xx/5.xx (the code and the
//! client's diagnostic in the history) or a Reset. No answer after the RFC 7252
//! retransmissions: back to QUEUED, with the attempt in the history, until the client's next
//! Register/Update (it is asleep or gone, and sending again blindly would only burn its battery
//! and our TTL unseen); after [`MAX_ATTEMPTS`] unanswered attempts, FAILED.
//!
//! Encoding (docs/decisions/0024): a Write carries the value as LwM2M plain text
//! (Content-Format 0), which every 1.0 and 1.1 client must accept for a single resource;
//! booleans are written "1"/"0" as that format requires. Execute arguments travel as given.
//!
//! Clients registered over CoAPS are refused (FAILED_PRECONDITION at SendCommand, FAILED if one
//! registers over CoAPS while its command waits): the DTLS session keeps no outbound path yet.

use std::sync::Arc;

use async_trait::async_trait;
use coap_lite::RequestType;

use super::{Dispatch, Kind, Transport};
use crate::control::commands::{Commands, Progress, ProgressError};
use crate::proto::{command_payload, lwm2m_operation, Command, CommandState, Lwm2mOperation};
use crate::sources::coap::lwm2m::objects::{self, Path};
use crate::sources::coap::lwm2m::requests::{NotSent, Outcome, Request};
use crate::sources::coap::lwm2m::Lwm2m;

/// Longest value or argument string.
const MAX_VALUE: usize = 1024;
/// Unanswered attempts (each a full RFC 7252 retransmission sequence) before a command fails.
pub const MAX_ATTEMPTS: usize = 3;
/// What the history says of an unanswered attempt (counted to apply [`MAX_ATTEMPTS`]).
const NO_ANSWER: &str = "no answer to";

/// Checks an operation before it is queued.
pub fn validate(op: &Lwm2mOperation) -> Result<(), String> {
    request(op).map(|_| ())
}

/// The CoAP request an operation becomes.
fn request(op: &Lwm2mOperation) -> Result<Request, String> {
    let path = Path::parse(&op.path).ok_or_else(|| {
        format!(
            "lwm2m path {:?}: /{{object}}/{{instance}}/{{resource}}, e.g. /3311/0/5850",
            op.path
        )
    })?;
    if op.value.len() > MAX_VALUE {
        return Err(format!(
            "lwm2m value: {} bytes, limit {MAX_VALUE}",
            op.value.len()
        ));
    }
    match lwm2m_operation::Kind::try_from(op.kind) {
        Ok(lwm2m_operation::Kind::Write) if op.value.is_empty() => {
            Err(format!("lwm2m write of {path} needs a value"))
        }
        Ok(lwm2m_operation::Kind::Write) => Ok(Request {
            method: RequestType::Put,
            path,
            content_format: Some(TEXT_PLAIN),
            payload: text_value(path, &op.value).into_bytes(),
        }),
        Ok(lwm2m_operation::Kind::Execute) => Ok(Request {
            method: RequestType::Post,
            path,
            content_format: (!op.value.is_empty()).then_some(TEXT_PLAIN),
            payload: op.value.clone().into_bytes(),
        }),
        _ => Err("lwm2m kind: WRITE or EXECUTE".into()),
    }
}

/// CoAP Content-Format text/plain; charset=utf-8: LwM2M's plain text format.
const TEXT_PLAIN: u16 = 0;

/// The plain-text form of a value: a boolean resource takes "1"/"0" (LwM2M 1.1 section 7.3.1),
/// so `true`/`on`/`false`/`off` are translated there; anything else is sent as given.
fn text_value(path: Path, value: &str) -> String {
    if objects::is_boolean(path.resource) {
        match value.to_ascii_lowercase().as_str() {
            "true" | "on" => return "1".into(),
            "false" | "off" => return "0".into(),
            _ => {}
        }
    }
    value.to_string()
}

pub struct Lwm2mTransport {
    server: Arc<Lwm2m>,
}

impl Lwm2mTransport {
    pub fn new(server: Arc<Lwm2m>) -> Self {
        Self { server }
    }
}

/// Unanswered attempts so far, from the command's history.
fn unanswered(c: &Command) -> usize {
    c.history
        .iter()
        .filter(|e| e.state == CommandState::Queued as i32 && e.detail.starts_with(NO_ANSWER))
        .count()
}

#[async_trait]
impl Transport for Lwm2mTransport {
    fn kind(&self) -> Kind {
        Kind::Lwm2m
    }

    fn reaches(&self, device_id: &str) -> bool {
        self.server.registered(device_id)
    }

    fn refusal(&self, device_id: &str) -> Option<String> {
        let why = if !self.server.sends() {
            Some(NotSent::NoSocket)
        } else {
            self.server
                .link(device_id)
                .err()
                .filter(|e| *e == NotSent::Secure)
        };
        why.map(|e| format!("LwM2M command to {device_id}: {e}"))
    }

    async fn dispatch(&self, commands: &Commands, c: &Command) -> Dispatch {
        let Some(command_payload::Kind::Lwm2m(op)) =
            c.payload.as_ref().and_then(|p| p.kind.as_ref())
        else {
            let _ = commands.progress(
                &c.id,
                Progress::Failed {
                    error: "not an LwM2M operation".into(),
                },
                "gateway",
            );
            return Dispatch::Reported;
        };
        let req = match request(op) {
            Ok(r) => r,
            Err(e) => {
                let _ = commands.progress(&c.id, Progress::Failed { error: e }, "gateway");
                return Dispatch::Reported;
            }
        };
        let link = match self.server.link(&c.device_id) {
            Ok(l) => l,
            Err(NotSent::NotRegistered | NotSent::Asleep | NotSent::Silent) => {
                return Dispatch::Waiting
            }
            Err(e @ (NotSent::Secure | NotSent::NoSocket)) => {
                let _ = commands.progress(
                    &c.id,
                    Progress::Failed {
                        error: e.to_string(),
                    },
                    "gateway",
                );
                return Dispatch::Reported;
            }
        };
        let what = req.describe();
        let peer = link.peer();
        // SENT is on disk before the request leaves. A command reloaded as SENT (the previous
        // process died with its request out) is simply sent again.
        match commands.progress(
            &c.id,
            Progress::Sent(format!("{what} to {peer}")),
            "gateway",
        ) {
            Ok(durable) => {
                if durable.wait().await.is_err() {
                    return Dispatch::Waiting;
                }
            }
            Err(ProgressError::Stale("SENT")) => {}
            Err(_) => return Dispatch::Reported,
        }
        tracing::debug!(command = %c.id, device = %c.device_id, %peer, request = %what, "lwm2m command sent");
        let by = format!("device:{}", c.device_id);
        let outcome = self
            .server
            .request(&c.device_id, link, &req, || {
                let _ = commands.progress(
                    &c.id,
                    Progress::Delivered {
                        detail: "empty ACK: the client has the request, its answer follows".into(),
                        last: false,
                    },
                    &by,
                );
            })
            .await;
        let (progress, reporter) = match outcome {
            Outcome::Answered { code, diagnostic } => {
                let text = if diagnostic.is_empty() {
                    code.clone()
                } else {
                    format!("{code} {diagnostic}")
                };
                if code.starts_with("2.") {
                    (Progress::Succeeded { result: text }, by.as_str())
                } else {
                    (
                        Progress::Failed {
                            error: format!("{what}: {text}"),
                        },
                        by.as_str(),
                    )
                }
            }
            Outcome::Reset => (
                Progress::Failed {
                    error: format!("{what}: the client answered with a Reset (RST)"),
                },
                by.as_str(),
            ),
            Outcome::NoResponse { waited } => (
                Progress::Failed {
                    error: format!(
                        "{what}: acknowledged, but no response within {} s",
                        waited.as_secs()
                    ),
                },
                "gateway",
            ),
            Outcome::NoAnswer {
                transmissions,
                waited,
            } => {
                let attempt = unanswered(c) + 1;
                let detail = format!(
                    "{NO_ANSWER} {what} after {transmissions} transmissions in {} s \
                     (attempt {attempt} of {MAX_ATTEMPTS})",
                    waited.as_secs()
                );
                if attempt >= MAX_ATTEMPTS {
                    (Progress::Failed { error: detail }, "gateway")
                } else {
                    (
                        Progress::Requeued(format!(
                            "{detail}; waiting for the client's next Register/Update"
                        )),
                        "gateway",
                    )
                }
            }
            Outcome::Moved => (
                Progress::Requeued(format!(
                    "{what}: the client re-registered or left while the request was out"
                )),
                "gateway",
            ),
        };
        if let Ok(durable) = commands.progress(&c.id, progress, reporter) {
            let _ = durable.wait().await;
        }
        Dispatch::Reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: lwm2m_operation::Kind, path: &str, value: &str) -> Lwm2mOperation {
        Lwm2mOperation {
            kind: kind as i32,
            path: path.into(),
            value: value.into(),
        }
    }

    #[test]
    fn operations_become_requests() {
        use lwm2m_operation::Kind::{Execute, Write};
        let w = request(&op(Write, "/3311/0/5850", "true")).unwrap();
        assert_eq!(w.method, RequestType::Put);
        assert_eq!(
            (w.content_format, w.payload.as_slice()),
            (Some(0), &b"1"[..])
        );
        assert_eq!(w.describe(), "PUT /3311/0/5850");
        let dim = request(&op(Write, "/3311/0/5851", "75.5")).unwrap();
        assert_eq!(dim.payload, b"75.5");
        // not a boolean resource: "true" stays text
        assert_eq!(
            request(&op(Write, "/3341/0/5527", "true")).unwrap().payload,
            b"true"
        );
        let x = request(&op(Execute, "/3/0/4", "")).unwrap();
        assert_eq!((x.method, x.content_format), (RequestType::Post, None));
        let x = request(&op(Execute, "/3/0/4", "0='now'")).unwrap();
        assert_eq!(
            (x.content_format, x.payload.as_slice()),
            (Some(0), &b"0='now'"[..])
        );
        for bad in [
            op(Write, "/3311/0", "1"),
            op(Write, "/3311/0/5850", ""),
            op(Write, "/3311/0/5850", &"x".repeat(MAX_VALUE + 1)),
            Lwm2mOperation {
                kind: 0,
                path: "/3/0/4".into(),
                value: String::new(),
            },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
