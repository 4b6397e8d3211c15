//! How a command reaches a device: one [`Transport`] per way out, one file each.
//!
//! - [`mqtt`]: published into the embedded broker on `devices/{id}/commands/{command}`; the
//!   device answers on `.../result`.
//! - [`lwm2m`]: an LwM2M Write (PUT) or Execute (POST) to the client's registered address,
//!   sent by the LwM2M server of the CoAP source; queue-mode clients only while awake.
//! - [`lorawan`]: a downlink through the network server that bridges the device (ChirpStack v4
//!   `command/down`, The Things Stack v3 `down/push`), on the bridge's own broker connection.
//!
//! A transport never decides a command's fate alone: it reports to [`Commands::progress`], which
//! keeps the state machine and the log.

pub mod lorawan;
pub mod lwm2m;
pub mod mqtt;

use async_trait::async_trait;

use super::Commands;
use crate::proto::Command;

/// The ways out, as named in `Command.transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Mqtt,
    Lwm2m,
    Lorawan,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Mqtt => "mqtt",
            Kind::Lwm2m => "lwm2m",
            Kind::Lorawan => "lorawan",
        }
    }

    pub fn from_label(s: &str) -> Option<Kind> {
        [Kind::Mqtt, Kind::Lwm2m, Kind::Lorawan]
            .into_iter()
            .find(|k| k.label() == s)
    }
}

/// What became of one dispatch attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Handed on; the transport reports what happens next. Not dispatched again unless the
    /// device reconnects.
    Handed,
    /// The device cannot be reached now; the command stays QUEUED until the transport wakes it.
    Waiting,
    /// The transport already reported the outcome of this attempt to [`Commands::progress`].
    Reported,
}

#[async_trait]
pub trait Transport: Send + Sync {
    fn kind(&self) -> Kind;

    /// Whether the device is a client of this transport right now (LwM2M: a live registration).
    fn reaches(&self, _device_id: &str) -> bool {
        false
    }

    /// Why a command for this device cannot be sent at all now (refused at SendCommand rather
    /// than queued to expire); `None` when it can be queued.
    fn refusal(&self, _device_id: &str) -> Option<String> {
        None
    }

    /// Refuses a payload this transport cannot carry (checked before the command is queued).
    fn accepts(&self, _payload: &crate::proto::CommandPayload) -> Result<(), String> {
        Ok(())
    }

    /// Tries to hand `command` to its device.
    async fn dispatch(&self, commands: &Commands, command: &Command) -> Dispatch;
}
