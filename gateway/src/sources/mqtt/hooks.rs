//! rmqtt hook handlers: where the broker asks citygw who may connect and what may be published.
//!
//! The durable write happens inside `MessagePublishCheckAcl`: rmqtt sends the PUBACK only after
//! this hook's future completes, and it is the first hook that can refuse a message
//! (`MessagePublish` runs earlier but cannot). So a PUBACK always means "on disk".
//!
//! Up to `mqtt.max_inflight` of these futures run at once per connection (rmqtt patched in
//! vendor/, docs/decisions/0012): a connection's messages share group commits, and rmqtt holds
//! each outcome until every PUBLISH before it has been answered, so PUBACKs keep arrival order.
//! The hook depends only on its own future resolving when the message is durable (or refused).
//!
//! Commands to devices pass here too: answers on `devices/{id}/commands/{cmd}/result` go to
//! [`crate::control`] (not the pipeline), and a subscription to the command topic, a command
//! written to the connection and its PUBACK are reported there.

use async_trait::async_trait;
use rmqtt::codec::v5::{PublishAckReason, SubscribeAckReason};
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::session::Session;
use rmqtt::types::{
    AuthResult, ConnectInfo, Publish, PublishAclResult, PublishResult, QoS, SubscribeReturn,
};

use super::topic::{self, Topic};
use crate::codec::Format;
use crate::control::commands::transport::mqtt::{self as commands_mqtt, ResultRefusal};
use crate::control::commands::Commands;
use crate::pipeline::{Delivery, Inbound, IngestError, Pipeline, Rejection};
use crate::proto::Protocol;
use crate::reason;
use crate::registry::{AuthError, Registry};

const PROTOCOL: &str = "mqtt";

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
                tracing::debug!(device = %s.id.client_id, %reason, "mqtt device disconnected");
                (true, acc)
            }
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let allowed = topic::may_subscribe(&s.id.client_id, &sub.topic_filter);
                let result = if allowed {
                    SubscribeReturn::new_success(sub.opts.qos(), None)
                } else {
                    metrics::counter!("citygw_subscribe_denied_total", "protocol" => PROTOCOL)
                        .increment(1);
                    tracing::warn!(device = %s.id.client_id, filter = %sub.topic_filter, "subscription denied");
                    SubscribeReturn::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::MessagePublishCheckAcl(s, p) => (
                false,
                Some(HookResult::PublishAclResult(self.publish(s, p).await)),
            ),
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

impl Hooks {
    /// rmqtt turns the result into the CONNACK code: `BadUsernameOrPassword` is 0x04 (3.1.1) or
    /// 0x86 (5), `NotAuthorized` 0x05 or 0x87.
    async fn authenticate(&self, ci: &ConnectInfo) -> AuthResult {
        let client_id = ci.client_id();
        if !self.sessions.has_room() {
            // rmqtt's hooks cannot answer "server unavailable", so the device sees "not
            // authorised"; the counter and the log say why.
            metrics::counter!("citygw_auth_failures_total", "protocol" => PROTOCOL, "reason" => "session_limit")
                .increment(1);
            tracing::warn!(client_id = %client_id, cap = self.sessions.cap(), "mqtt connect refused: session limit");
            return AuthResult::NotAuthorized;
        }
        let result = match ci.username() {
            None => Err(AuthError::Anonymous),
            // One identity per connection: a device may not log in as itself and publish as
            // another client id.
            Some(user) if user != client_id => Err(AuthError::BadCredentials),
            Some(user) => self
                .registry
                .authenticate(user, ci.password().map(|p| p.as_ref()))
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => AuthResult::Allow(false, None),
            Err(e) => {
                metrics::counter!("citygw_auth_failures_total", "protocol" => PROTOCOL, "reason" => e.reason())
                    .increment(1);
                tracing::warn!(client_id = %client_id, remote = ?ci.id().remote_addr, reason = e.reason(), "mqtt connect refused");
                match e {
                    AuthError::BadCredentials => AuthResult::BadUsernameOrPassword,
                    AuthError::Anonymous | AuthError::UnknownDevice | AuthError::DisabledDevice => {
                        AuthResult::NotAuthorized
                    }
                }
            }
        }
    }

    async fn publish(&self, s: &Session, p: &Publish) -> PublishAclResult {
        let v5 = p.properties.is_some();
        let device_id: &str = &s.id.client_id;
        let Some(device) = self.registry.get(device_id).filter(|d| d.enabled()) else {
            // Disabled (or removed) while connected: the kick is on its way; refuse meanwhile.
            return refuse(PublishAckReason::NotAuthorized, "device disabled", true);
        };
        let format = match topic::parse(&p.topic) {
            Topic::Telemetry {
                device_id: claimed, ..
            }
            | Topic::CommandResult {
                device_id: claimed, ..
            } if claimed != device_id => {
                let rejection = Rejection::new(
                    reason::SPOOFED_TOPIC,
                    format!("device {device_id} published for {claimed}"),
                );
                // Nothing of a spoofed message is kept, only the fact that it was tried.
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
                // MQTT 3.1.1 cannot refuse a PUBLISH in its PUBACK, so the connection goes.
                return refuse(PublishAckReason::NotAuthorized, &rejection.to_string(), !v5);
            }
            Topic::Telemetry {
                format: Some(name), ..
            } => Format::from_name(name).ok_or(name),
            Topic::Telemetry { format: None, .. } => {
                Ok(content_type_format(p).unwrap_or(Format::Json))
            }
            Topic::CommandResult { command_id, .. } => {
                return self.command_result(device_id, command_id, p, v5).await
            }
            Topic::Other => {
                let rejection = Rejection::new(
                    reason::BAD_TOPIC,
                    "devices publish to devices/{id}/telemetry[/{format}] and devices/{id}/commands/{command}/result",
                );
                self.pipeline
                    .refuse(
                        device_id,
                        Protocol::Mqtt,
                        &p.topic,
                        Some(&p.payload),
                        p.payload.len(),
                        &rejection,
                    )
                    .await;
                return refuse(
                    PublishAckReason::TopicNameInvalid,
                    &rejection.to_string(),
                    false,
                );
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
                tracing::warn!(device = device_id, reason = e.reason(), error = %e, "command result refused");
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

fn content_type_format(p: &Publish) -> Option<Format> {
    p.properties
        .as_ref()?
        .content_type
        .as_deref()
        .and_then(Format::from_content_type)
}

fn refuse(code: PublishAckReason, reason: &str, disconnect: bool) -> PublishAclResult {
    PublishAclResult(PublishResult::reason_code(
        code,
        Some(reason.into()),
        disconnect,
    ))
}
