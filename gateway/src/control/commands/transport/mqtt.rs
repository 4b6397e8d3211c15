//! Commands over MQTT, through the embedded broker.
//!
//! The device subscribes to `devices/{id}/commands/+` (only its own: the subscribe ACL) and gets
//! `devices/{id}/commands/{command_id}` with `{"id", "name", "params"}` (or `"raw"`, base64) at
//! QoS 1. The gateway keeps its own queue rather than trusting broker session state: a command
//! is published only to a subscribed session, and everything not yet acknowledged by the device
//! is published again when it subscribes anew (a clean session after a reconnect, a gateway
//! restart), so a device may see a command twice and recognises it by its id.
//!
//! States: SENT when the broker writes the PUBLISH to the device's connection, DELIVERED on its
//! PUBACK, SUCCEEDED or FAILED on the device's answer, `devices/{id}/commands/{command_id}/result`
//! with `{"status": "ok" | "error", "result": ..., "error": "..."}`. The answer is acknowledged
//! (PUBACK) only once its state is on disk. It is not a reading: it never becomes one, nor a
//! dead letter.

use std::num::NonZeroU32;

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use rmqtt::context::ServerContext;
use rmqtt::types::{CodecPublish, From, Id, Publish, QoS};

use super::{Dispatch, Kind, Transport};
use crate::control::commands::{Commands, Progress, ProgressError};
use crate::pipeline::now_ms;
use crate::proto::{command_payload, Command};
use crate::sources::mqtt::topic;
use crate::store::StoreError;

/// Largest answer a device may publish.
pub const MAX_RESULT_PAYLOAD: usize = 64 * 1024;

pub struct Mqtt {
    scx: ServerContext,
    /// The publisher identity of the gateway's own messages.
    from: Id,
}

impl Mqtt {
    pub fn new(scx: ServerContext) -> Self {
        let from = Id::from(scx.node.id(), "citygw".into());
        Self { scx, from }
    }
}

/// The message a device receives for a command.
pub fn message(c: &Command) -> serde_json::Value {
    let mut m = serde_json::json!({"id": c.id, "name": c.name});
    match c.payload.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(command_payload::Kind::ParamsJson(j)) => {
            m["params"] = serde_json::from_str(j).unwrap_or_default();
        }
        Some(command_payload::Kind::Raw(b)) => {
            m["raw"] = base64::engine::general_purpose::STANDARD.encode(b).into();
        }
        Some(command_payload::Kind::Lwm2m(_)) | None => m["params"] = serde_json::json!({}),
    }
    m
}

#[async_trait]
impl Transport for Mqtt {
    fn kind(&self) -> Kind {
        Kind::Mqtt
    }

    async fn dispatch(&self, _commands: &Commands, c: &Command) -> Dispatch {
        let body = serde_json::to_vec(&message(c)).expect("a JSON value serialises");
        let remaining_s = ((c.expires_time_ms - now_ms()) / 1000).max(1);
        let properties = rmqtt::codec::v5::PublishProperties {
            // MQTT 5 brokers and clients drop it once the command's TTL has passed.
            message_expiry_interval: NonZeroU32::new(
                u32::try_from(remaining_s).unwrap_or(u32::MAX),
            ),
            content_type: Some("application/json".into()),
            is_utf8_payload: true,
            ..Default::default()
        };
        let publish = CodecPublish {
            dup: false,
            retain: false,
            qos: QoS::AtLeastOnce,
            topic: topic::command(&c.device_id, &c.id).into(),
            packet_id: None,
            payload: Bytes::from(body),
            properties: Some(properties),
        };
        let publish = Publish::from(publish).create_time(now_ms());
        let shared = self.scx.extends.shared().await;
        // Routed like any message: only a session subscribed to the device's command topic (the
        // device's own, by the subscribe ACL) receives it.
        match shared
            .forwards(None, From::from_system(self.from.clone()), publish)
            .await
        {
            Ok(0) | Err((0, _)) => Dispatch::Waiting,
            Ok(_) | Err(_) => Dispatch::Handed,
        }
    }
}

/// Why a device's answer was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResultRefusal {
    /// Not `{"status": "ok" | "error", ...}`, or too large.
    #[error("{0}")]
    Malformed(String),
    /// No open command of this device has this id.
    #[error("no command {0} for this device")]
    UnknownCommand(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ResultRefusal {
    pub fn reason(&self) -> &'static str {
        match self {
            ResultRefusal::Malformed(_) => "malformed_result",
            ResultRefusal::UnknownCommand(_) => "unknown_command",
            ResultRefusal::Store(_) => "store_unavailable",
        }
    }
}

/// A device's answer to one of its commands. `Ok` once the outcome is durable (or when it
/// repeats an answer already recorded: a QoS 1 retransmission).
pub async fn result(
    commands: &Commands,
    device_id: &str,
    command_id: &str,
    payload: &[u8],
) -> Result<(), ResultRefusal> {
    if payload.len() > MAX_RESULT_PAYLOAD {
        return Err(ResultRefusal::Malformed(format!(
            "{} bytes, limit {MAX_RESULT_PAYLOAD}",
            payload.len()
        )));
    }
    let answer: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| ResultRefusal::Malformed(format!("not JSON: {e}")))?;
    let result = answer
        .get("result")
        .map(|r| r.to_string())
        .unwrap_or_default();
    let progress = match answer.get("status").and_then(|s| s.as_str()) {
        Some("ok") => Progress::Succeeded { result },
        Some("error") => Progress::Failed {
            error: match answer.get("error") {
                Some(serde_json::Value::String(e)) => e.clone(),
                Some(e) => e.to_string(),
                None if result.is_empty() => "the device reported an error".into(),
                None => result,
            },
        },
        _ => {
            return Err(ResultRefusal::Malformed(
                "expected {\"status\": \"ok\" | \"error\", \"result\": ...}".into(),
            ))
        }
    };
    let by = format!("device:{device_id}");
    match commands.open_for(device_id, command_id) {
        Ok(_) => {}
        Err(ProgressError::WrongDevice(_)) => {
            return Err(ResultRefusal::UnknownCommand(command_id.into()))
        }
        Err(_) => return late(commands, device_id, command_id),
    }
    match commands.progress(command_id, progress, &by) {
        Ok(durable) => Ok(durable.wait().await?),
        Err(ProgressError::Stale(_)) => late(commands, device_id, command_id),
        Err(_) => Err(ResultRefusal::UnknownCommand(command_id.into())),
    }
}

/// An answer for a command that is final already: accepted (so a retransmitted answer is not
/// refused) when the command is the device's, and counted.
fn late(commands: &Commands, device_id: &str, command_id: &str) -> Result<(), ResultRefusal> {
    match commands.get(command_id) {
        Ok(Some(c)) if c.device_id == device_id => {
            metrics::counter!("citygw_command_reports_late_total", "transport" => "mqtt")
                .increment(1);
            Ok(())
        }
        Ok(_) => Err(ResultRefusal::UnknownCommand(command_id.into())),
        Err(e) => Err(ResultRefusal::Store(e)),
    }
}

/// The broker wrote a command to the device's connection.
pub fn delivered_to_connection(commands: &Commands, device_id: &str, command_id: &str) {
    if commands.open_for(device_id, command_id).is_ok() {
        let _ = commands.progress(
            command_id,
            Progress::Sent(format!("published to the MQTT session of {device_id}")),
            "gateway",
        );
    }
}

/// The device acknowledged (PUBACK) a command.
pub fn acknowledged(commands: &Commands, device_id: &str, command_id: &str) {
    if commands.open_for(device_id, command_id).is_ok() {
        let _ = commands.progress(
            command_id,
            Progress::Delivered {
                detail: "PUBACK from the device".into(),
                last: false,
            },
            &format!("device:{device_id}"),
        );
    }
}
