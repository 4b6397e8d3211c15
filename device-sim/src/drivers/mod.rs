//! Protocol drivers: how one simulated device reaches the gateway. One module per protocol; a
//! protocol a scenario may name but this build has no driver for is refused before anything
//! starts, naming the scenario line.
//!
//! A driver runs one device from its ramp-up slot to the end of the run: connect, report every
//! interval, count what happened in [`crate::run::RunStats`], and hand every acknowledged
//! message to the ack log (what `verify` later checks against the agency stream).

pub mod lorawan;
pub mod mqtt;

use std::str::FromStr;
use std::sync::Arc;

use crate::run::DriverContext;
use crate::scenario::{Scenario, SimDevice};

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

    /// Whether this build has a driver for the protocol.
    pub fn implemented(self) -> bool {
        matches!(
            self,
            Protocol::Mqtt | Protocol::LorawanChirpstack | Protocol::LorawanTts
        )
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

fn implemented_names() -> String {
    ALL.into_iter()
        .filter(|p| p.implemented())
        .map(Protocol::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses a scenario that gives weight to a protocol without a driver in this build.
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

pub fn check_available(s: &Scenario) -> anyhow::Result<()> {
    for (p, w, line) in &s.protocol_mix {
        if *w > 0.0 && !p.implemented() {
            anyhow::bail!(
                "{}:{line}: protocol {:?} has no driver in this device-sim build (implemented: {}); \
                 remove it from [protocols] or set its weight to 0",
                s.source,
                p.name(),
                implemented_names()
            );
        }
    }
    Ok(())
}

/// Runs one device with its protocol's driver until the run ends.
pub async fn run_device(dev: SimDevice, secret: String, ctx: Arc<DriverContext>) {
    match dev.protocol {
        Protocol::Mqtt => mqtt::run_device(dev, secret, ctx).await,
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
        // `run` checks the scenario first (check_available), so no device gets here.
        other => ctx.stats.note_error(format!(
            "{}: protocol {} has no driver in this build",
            dev.id,
            other.name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::profiles::default_profiles;

    #[test]
    fn unimplemented_protocol_is_refused_with_its_line() {
        let text =
            "name = \"t\"\ntenant = \"x\"\nprovince = \"01\"\ndevices = 10\nduration_secs = 5\n\
                    [profiles]\nnoise = 1\n[protocols]\nmqtt = 1\ncoap = 1\n";
        let s = Scenario::parse("s.toml", text, default_profiles()).unwrap();
        let e = check_available(&s).unwrap_err().to_string();
        assert!(e.starts_with("s.toml:10:") && e.contains("\"coap\""), "{e}");
        let zero = text.replace("coap = 1", "coap = 0");
        let s = Scenario::parse("s.toml", &zero, default_profiles()).unwrap();
        check_available(&s).unwrap();
    }

    #[test]
    fn unknown_protocol_name_lists_the_known_ones() {
        let e = "zigbee".parse::<Protocol>().unwrap_err().to_string();
        assert!(e.contains("lorawan-chirpstack"), "{e}");
    }
}
