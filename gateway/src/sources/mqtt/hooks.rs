//! rmqtt hook handlers: where the broker asks citygw who may connect and what may be published.
//!
//! The durable write happens inside `MessagePublishCheckAcl`: rmqtt sends the PUBACK only after
//! this hook's future completes, and it is the first hook that can refuse a message
//! (`MessagePublish` runs earlier but cannot). So a PUBACK always means "on disk".
//!
//! A CONNECT's will message is checked at the CONNECT like a PUBLISH (rmqtt publishes wills
//! without the ACL hook): a will on any topic but the device's own telemetry refuses the
//! connection. When it fires, it is stored like any telemetry of the device.
//!
//! Up to `mqtt.max_inflight` of these futures run at once per connection (rmqtt patched in
//! vendor/, docs/decisions/0012): a connection's messages share group commits, and rmqtt holds
//! each outcome until every PUBLISH before it has been answered, so PUBACKs keep arrival order.
//! The hook depends only on its own future resolving when the message is durable (or refused).
//!
//! Commands to devices pass here too: answers on `devices/{id}/commands/{cmd}/result` go to
//! [`crate::control`] (not the pipeline), and a subscription to the command topic, a command
//! written to the connection and its PUBACK are reported there.

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use rmqtt::codec::v5::{PublishAckReason, SubscribeAckReason};
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::session::Session;
use rmqtt::types::{
    AuthResult, ConnectInfo, FromType, Publish, PublishAclResult, PublishResult, QoS,
    SubscribeReturn,
};

use super::topic::{self, Topic};
use crate::codec::Format;
use crate::control::commands::transport::mqtt::{self as commands_mqtt, ResultRefusal};
use crate::control::commands::Commands;
use crate::observability::{clip, LogLimiter};
use crate::pipeline::{Delivery, Inbound, IngestError, Pipeline, Rejection};
use crate::proto::Protocol;
use crate::reason;
use crate::registry::{AuthError, Registry};

const PROTOCOL: &str = "mqtt";

/// Refused CONNECTs are logged at most this often (the rest is counted): a password guesser or
/// a misconfigured fleet must not fill the disk.
static AUTH_LOG: LogLimiter = LogLimiter::new(60, Duration::from_secs(60));

#[derive(Clone)]
pub struct Hooks {
    pub registry: Registry,
    pub pipeline: Pipeline,
    pub sessions: super::limit::SessionLimit,
    pub commands: Commands,
}

#[async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(ci) => (
                false,
                Some(HookResult::AuthResult(self.authenticate(ci).await)),
            ),
            Parameter::ClientConnected(s) => {
                if let Some(device) = self.registry.get(&s.id.client_id) {
                    device.session_opened();
                }
                self.sessions.opened();
                metrics::gauge!("citygw_connected_devices", "protocol" => PROTOCOL).increment(1.0);
                (true, acc)
            }
            Parameter::ClientDisconnected(s, reason) => {
                if let Some(device) = self.registry.get(&s.id.client_id) {
                    device.session_closed();
                }
                self.sessions.closed();
                metrics::gauge!("citygw_connected_devices", "protocol" => PROTOCOL).decrement(1.0);
                tracing::debug!(device = %clip(&s.id.client_id), %reason, "mqtt device disconnected");
                (true, acc)
            }
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let allowed = topic::may_subscribe(&s.id.client_id, &sub.topic_filter);
                let result = if allowed {
                    SubscribeReturn::new_success(sub.opts.qos(), None)
                } else {
                    metrics::counter!("citygw_subscribe_denied_total", "protocol" => PROTOCOL)
                        .increment(1);
                    tracing::warn!(device = %clip(&s.id.client_id), filter = %clip(&sub.topic_filter), "subscription denied");
                    SubscribeReturn::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::MessagePublishCheckAcl(s, p) => (
                false,
                Some(HookResult::PublishAclResult(self.publish(s, p).await)),
            ),
            // The will of a device that went away, already checked at its CONNECT.
            Parameter::MessagePublish(_, from, p) if matches!(from.typ(), FromType::LastWill) => {
                self.store_will(&from.id.client_id, p).await;
                (true, acc)
            }
            Parameter::SessionSubscribed(s, sub)
                if topic::receives_commands(&s.id.client_id, &sub.topic_filter) =>
            {
                // A new subscription is a new chance: everything not yet acknowledged goes again.
                self.commands.wake(&s.id.client_id, true);
                (true, acc)
            }
            Parameter::MessageDelivered(s, _, p) => {
                if let Some((device, command)) = topic::parse_command(&p.topic) {
                    if device == &*s.id.client_id {
                        commands_mqtt::delivered_to_connection(&self.commands, device, command);
                    }
                }
                (true, acc)
            }
            Parameter::MessageAcked(s, _, p) => {
                if let Some((device, command)) = topic::parse_command(&p.topic) {
                    if device == &*s.id.client_id {
                        commands_mqtt::acknowledged(&self.commands, device, command);
                    }
                }
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// Why a topic cannot carry a device's telemetry.
struct TopicRefusal {
    rejection: Rejection,
    code: PublishAckReason,
    /// Keep the payload in the dead letter (only for the device's own, merely wrong, topics).
    keep_payload: bool,
    /// Close the connection whatever the protocol version (a protocol violation).
    disconnect: bool,
}

/// Where a device's PUBLISH goes.
enum Route<'a> {
    /// Telemetry, to decode with this format (or the unknown name the topic gave).
    Telemetry(Result<Format, &'a str>),
    /// The device's answer to this command.
    CommandResult(&'a str),
}

/// What `device_id` publishing on `topic` means, or a refusal.
fn route<'a>(
    device_id: &str,
    topic: &'a str,
    content_type: Option<&str>,
) -> Result<Route<'a>, TopicRefusal> {
    match topic::parse(topic) {
        Topic::Invalid => Err(TopicRefusal {
            rejection: Rejection::new(
                reason::INVALID_TOPIC,
                "a topic name must be non-empty without wildcards (+ #) or U+0000",
            ),
            code: PublishAckReason::TopicNameInvalid,
            keep_payload: false,
            disconnect: true,
        }),
        Topic::Telemetry {
            device_id: claimed, ..
        }
        | Topic::CommandResult {
            device_id: claimed, ..
        }
        | Topic::OfDevice { device_id: claimed }
            if claimed != device_id =>
        {
            // Nothing of a spoofed message is kept, only the fact that it was tried.
            Err(TopicRefusal {
                rejection: Rejection::new(
                    reason::SPOOFED_TOPIC,
                    format!("device {} published for {}", clip(device_id), clip(claimed)),
                ),
                code: PublishAckReason::NotAuthorized,
                keep_payload: false,
                disconnect: false,
            })
        }
        Topic::Telemetry {
            format: Some(name), ..
        } => Ok(Route::Telemetry(Format::from_name(name).ok_or(name))),
        Topic::Telemetry { format: None, .. } => Ok(Route::Telemetry(Ok(content_type
            .and_then(Format::from_content_type)
            .unwrap_or(Format::Json)))),
        Topic::CommandResult { command_id, .. } => Ok(Route::CommandResult(command_id)),
        Topic::OfDevice { .. } | Topic::Other => Err(bad_topic()),
    }
}

fn bad_topic() -> TopicRefusal {
    TopicRefusal {
        rejection: Rejection::new(
            reason::BAD_TOPIC,
            "devices publish to devices/{id}/telemetry[/{format}] and devices/{id}/commands/{command}/result",
        ),
        code: PublishAckReason::TopicNameInvalid,
        keep_payload: true,
        disconnect: false,
    }
}

fn auth_result(e: AuthError) -> AuthResult {
    match e {
        AuthError::BadCredentials => AuthResult::BadUsernameOrPassword,
        AuthError::Anonymous
        | AuthError::UnknownDevice
        | AuthError::DisabledDevice
        | AuthError::Throttled(_) => AuthResult::NotAuthorized,
    }
}

impl Hooks {
    /// rmqtt turns the result into the CONNACK code: `BadUsernameOrPassword` is 0x04 (3.1.1) or
    /// 0x86 (5), `NotAuthorized` 0x05 or 0x87.
    async fn authenticate(&self, ci: &ConnectInfo) -> AuthResult {
        let client_id: &str = ci.client_id();
        let source = ci
            .id()
            .remote_addr
            .map(|a| a.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if !self.sessions.has_room() {
            // rmqtt's hooks cannot answer "server unavailable", so the device sees "not
            // authorised"; the counter and the log say why.
            metrics::counter!("citygw_auth_failures_total", "protocol" => PROTOCOL, "reason" => "session_limit")
                .increment(1);
            if let Some(suppressed) = AUTH_LOG.allow() {
                tracing::warn!(client_id = %clip(client_id), cap = self.sessions.cap(), suppressed, "mqtt connect refused: session limit");
            }
            return AuthResult::NotAuthorized;
        }
        let result = match (ci.cert(), ci.username()) {
            // The mTLS listener: the certificate, verified and pinned at the handshake, names
            // the device; the client id must be that device.
            (Some(cert), user) => {
                let named = cert.common_name.as_deref().unwrap_or("");
                if named != client_id || user.is_some_and(|u| &**u != client_id) {
                    Err(AuthError::BadCredentials)
                } else {
                    let r = self.registry.enabled_device(named);
                    if r.is_ok() {
                        self.registry.throttle().succeeded(source, named);
                    }
                    r
                }
            }
            (None, None) => Err(AuthError::Anonymous),
            // One identity per connection: a device may not log in as itself and publish as
            // another client id.
            (None, Some(user)) if &**user != client_id => Err(AuthError::BadCredentials),
            (None, Some(user)) => {
                self.registry
                    .authenticate_from(source, user, ci.password().map(|p| p.as_ref()))
                    .await
            }
        };
        if let Err(e) = result {
            return self.refused(ci, e);
        }
        if let Some(will) = ci.last_will() {
            let allowed =
                Publish::try_from(will).is_ok_and(|p| self.check_will(client_id, &p).is_ok());
            if !allowed {
                return AuthResult::NotAuthorized;
            }
        }
        AuthResult::Allow(false, None)
    }

    fn refused(&self, ci: &ConnectInfo, e: AuthError) -> AuthResult {
        metrics::counter!("citygw_auth_failures_total", "protocol" => PROTOCOL, "reason" => e.reason())
            .increment(1);
        if let Some(suppressed) =
            AUTH_LOG.allow_with(self.registry.throttle().config().log_lines_per_minute)
        {
            tracing::warn!(client_id = %clip(ci.client_id()), remote = ?ci.id().remote_addr, reason = e.reason(), suppressed, "mqtt connect refused");
        }
        auth_result(e)
    }

    /// A will is allowed on the device's own telemetry topic only. A refused will is counted
    /// and dead-lettered like the PUBLISH it would have been (without its payload when it
    /// names another device).
    fn check_will(&self, device_id: &str, will: &Publish) -> Result<(), ()> {
        let content_type = will
            .properties
            .as_ref()
            .and_then(|p| p.content_type.as_deref());
        // A will answering a command is no telemetry either.
        let checked = route(device_id, &will.topic, content_type).and_then(|r| match r {
            Route::Telemetry(_) => Ok(()),
            Route::CommandResult(_) => Err(bad_topic()),
        });
        match checked {
            Ok(()) => Ok(()),
            Err(refusal) => {
                metrics::counter!("citygw_auth_failures_total", "protocol" => PROTOCOL, "reason" => "will_refused")
                    .increment(1);
                let (pipeline, device, topic, payload) = (
                    self.pipeline.clone(),
                    device_id.to_string(),
                    will.topic.to_string(),
                    will.payload.clone(),
                );
                // The CONNACK does not wait for the dead letter's fsync.
                tokio::spawn(async move {
                    let address = format!("will {topic}");
                    pipeline
                        .refuse(
                            &device,
                            Protocol::Mqtt,
                            &address,
                            refusal.keep_payload.then_some(&payload[..]),
                            payload.len(),
                            &refusal.rejection,
                        )
                        .await;
                });
                Err(())
            }
        }
    }

    async fn store_will(&self, device_id: &str, p: &Publish) {
        let Some(device) = self.registry.get(device_id).filter(|d| d.enabled()) else {
            return;
        };
        let content_type = p
            .properties
            .as_ref()
            .and_then(|p| p.content_type.as_deref());
        let Ok(Route::Telemetry(format)) = route(device_id, &p.topic, content_type) else {
            return;
        };
        let inbound = Inbound {
            device: &device,
            protocol: Protocol::Mqtt,
            format,
            address: &p.topic,
            payload: &p.payload,
            delivery: Delivery::BestEffort,
            content_id: None,
        };
        let _ = self.pipeline.ingest(inbound).await;
    }

    async fn publish(&self, s: &Session, p: &Publish) -> PublishAclResult {
        let v5 = p.properties.is_some();
        let device_id: &str = &s.id.client_id;
        let Some(device) = self.registry.get(device_id).filter(|d| d.enabled()) else {
            // Disabled (or removed) while connected: the kick is on its way; refuse meanwhile.
            return refuse(PublishAckReason::NotAuthorized, "device disabled", true);
        };
        // The server advertises no topic aliases (Topic Alias Maximum 0), so any alias is a
        // protocol error (MQTT 5 section 3.3.2.3.4).
        if p.properties
            .as_ref()
            .is_some_and(|pp| pp.topic_alias.is_some())
        {
            let rejection = Rejection::new(reason::TOPIC_ALIAS, "topic aliases are not accepted");
            self.pipeline
                .refuse(
                    device_id,
                    Protocol::Mqtt,
                    &p.topic,
                    None,
                    p.payload.len(),
                    &rejection,
                )
                .await;
            return refuse(
                PublishAckReason::TopicNameInvalid,
                &rejection.to_string(),
                true,
            );
        }
        let content_type = p
            .properties
            .as_ref()
            .and_then(|p| p.content_type.as_deref());
        let format = match route(device_id, &p.topic, content_type) {
            Ok(Route::Telemetry(f)) => f,
            Ok(Route::CommandResult(command_id)) => {
                return self.command_result(device_id, command_id, p, v5).await
            }
            Err(r) => {
                self.pipeline
                    .refuse(
                        device_id,
                        Protocol::Mqtt,
                        &p.topic,
                        r.keep_payload.then_some(&p.payload[..]),
                        p.payload.len(),
                        &r.rejection,
                    )
                    .await;
                // MQTT 3.1.1 cannot refuse a PUBLISH in its PUBACK, so a spoofed message closes
                // the connection; a mere wrong topic is dead-lettered and acknowledged.
                let disconnect = r.disconnect || (!v5 && r.code == PublishAckReason::NotAuthorized);
                return refuse(r.code, &r.rejection.to_string(), disconnect);
            }
        };
        let delivery = if p.qos == QoS::AtMostOnce {
            Delivery::BestEffort
        } else {
            Delivery::Durable
        };
        let inbound = Inbound {
            device: &device,
            protocol: Protocol::Mqtt,
            format,
            address: &p.topic,
            payload: &p.payload,
            delivery,
            content_id: None,
        };
        match self.pipeline.ingest(inbound).await {
            Ok(_) => PublishAclResult::allow(),
            // The refusal is durably dead-lettered, so for 3.1.1 a plain PUBACK is honest; MQTT 5
            // carries the reason.
            Err(IngestError::Rejected(r)) => refuse(
                PublishAckReason::PayloadFormatInvalid,
                &r.to_string(),
                false,
            ),
            Err(IngestError::Store(e)) => {
                if !e.is_refusal() {
                    tracing::error!(device = device_id, error = %e, "reading not stored");
                }
                // Never acknowledge what is not on disk: 3.1.1 clients learn it by the disconnect
                // and resend; MQTT 5 clients get an error PUBACK.
                refuse(
                    PublishAckReason::UnspecifiedError,
                    "gateway store unavailable",
                    !v5,
                )
            }
        }
    }
}

impl Hooks {
    /// A device's answer to a command: acknowledged once its outcome is durable.
    async fn command_result(
        &self,
        device_id: &str,
        command_id: &str,
        p: &Publish,
        v5: bool,
    ) -> PublishAclResult {
        match commands_mqtt::result(&self.commands, device_id, command_id, &p.payload).await {
            Ok(()) => PublishAclResult::allow(),
            Err(e) => {
                metrics::counter!("citygw_command_results_refused_total", "reason" => e.reason())
                    .increment(1);
                tracing::warn!(device = %clip(device_id), reason = e.reason(), error = %clip(&e.to_string()), "command result refused");
                match e {
                    // Only MQTT 5 can say why in the PUBACK; a 3.1.1 device sees a plain one.
                    ResultRefusal::Malformed(_) => refuse(
                        PublishAckReason::PayloadFormatInvalid,
                        &e.to_string(),
                        false,
                    ),
                    ResultRefusal::UnknownCommand(_) => {
                        refuse(PublishAckReason::NotAuthorized, &e.to_string(), false)
                    }
                    // Not durable: never acknowledged (3.1.1 learns it by the disconnect).
                    ResultRefusal::Store(_) => refuse(
                        PublishAckReason::UnspecifiedError,
                        "gateway store unavailable",
                        !v5,
                    ),
                }
            }
        }
    }
}

fn refuse(code: PublishAckReason, reason: &str, disconnect: bool) -> PublishAclResult {
    PublishAclResult(PublishResult::reason_code(
        code,
        Some(reason.into()),
        disconnect,
    ))
}
