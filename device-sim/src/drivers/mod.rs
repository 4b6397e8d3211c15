//! Protocol drivers: how one simulated device reaches the gateway. One module per protocol.
//!
//! A driver runs one device from its ramp-up slot to the end of the run: connect, report every
//! interval, count what happened in [`crate::run::RunStats`], and hand every acknowledged
//! message to the ack log (what `verify` later checks against the agency stream).

pub mod coap;
mod lamp;
pub mod lorawan;
pub mod lwm2m;
pub mod mqtt;
mod sample;

use std::str::FromStr;
use std::sync::Arc;

use crate::credentials::Credential;
use crate::run::DriverContext;
use crate::scenario::SimDevice;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Mqtt,
    Coap,
    Coaps,
    Lwm2m,
    /// ChirpStack v4 integration events on an external MQTT broker, bridged by the gateway.
    LorawanChirpstack,
    /// The Things Stack v3 uplink messages on an external MQTT broker, bridged by the gateway.
    LorawanTts,
}

pub const ALL: [Protocol; 6] = [
    Protocol::Mqtt,
    Protocol::Coap,
    Protocol::Coaps,
    Protocol::Lwm2m,
    Protocol::LorawanChirpstack,
    Protocol::LorawanTts,
];

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Coap => "coap",
            Protocol::Coaps => "coaps",
            Protocol::Lwm2m => "lwm2m",
            Protocol::LorawanChirpstack => "lorawan-chirpstack",
            Protocol::LorawanTts => "lorawan-tts",
        }
    }

    /// Whether the device's uplinks travel through a LoRaWAN network server's broker.
    pub fn is_lorawan(self) -> bool {
        matches!(self, Protocol::LorawanChirpstack | Protocol::LorawanTts)
    }
}

impl FromStr for Protocol {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown protocol {s:?} (protocols: {})",
                ALL.map(Protocol::name).join(", ")
            )
        })
    }
}

/// The profile's quantities as the ack log records them ("a;b;c"), built once per device.
fn ack_log_quantities(profile: &crate::scenario::profiles::Profile) -> Arc<str> {
    profile
        .quantities
        .iter()
        .map(|q| q.name.as_str())
        .collect::<Vec<_>>()
        .join(";")
        .into()
}

/// Runs one device with its protocol's driver until the run ends.
pub async fn run_device(dev: SimDevice, cred: Credential, ctx: Arc<DriverContext>) {
    match dev.protocol {
        Protocol::Mqtt => mqtt::run_device(dev, cred.secret, ctx).await,
        Protocol::Coap | Protocol::Coaps => coap::run_device(dev, cred, ctx).await,
        Protocol::Lwm2m => lwm2m::run_device(dev, cred, ctx).await,
        // One shared connection to the network server's broker, opened by `run` when the
        // scenario has LoRaWAN devices.
        Protocol::LorawanChirpstack | Protocol::LorawanTts => {
            let (server, app) = if dev.protocol == Protocol::LorawanTts {
                (lorawan::Server::Tts, ctx.tts_application_id.clone())
            } else {
                (
                    lorawan::Server::ChirpStack,
                    ctx.chirpstack_application_id.clone(),
                )
            };
            match ctx.lorawan_hub.get() {
                Some(hub) => lorawan::run_device(dev, server, hub.clone(), app, ctx).await,
                None => ctx
                    .stats
                    .note_error(format!("{}: no LoRaWAN broker connection", dev.id)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_protocol_name_lists_the_known_ones() {
        let e = "zigbee".parse::<Protocol>().unwrap_err().to_string();
        assert!(e.contains("lorawan-chirpstack"), "{e}");
    }
}
