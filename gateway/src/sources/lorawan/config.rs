//! `[[lorawan]]` entries of the config file: one per network server broker.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ServerType {
    /// ChirpStack v4 MQTT integration.
    #[serde(rename = "chirpstack_v4")]
    ChirpstackV4,
    /// The Things Stack v3 (The Things Network, TTS Cloud, self-hosted) MQTT server.
    #[serde(rename = "ttn_v3")]
    TtnV3,
}

/// How ChirpStack events are marshaled; TTS always sends JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Marshaler {
    /// Per message: JSON when it starts with `{`, else binary protobuf.
    #[default]
    Auto,
    Json,
    Protobuf,
}

/// One network server broker to bridge. Secrets come inline (development), from an environment
/// variable or a file, and are never logged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LorawanConfig {
    /// Names the bridge in logs, metrics labels and dead letters.
    pub name: String,
    /// The network server: `chirpstack_v4` or `ttn_v3` (The Things Stack / The Things Network).
    #[serde(rename = "type")]
    pub server_type: ServerType,
    /// Host name or address of the network server's MQTT broker.
    pub host: String,
    /// 0: 1883, or 8883 with TLS.
    #[serde(default)]
    pub port: u16,
    /// MQTT over TLS (rustls; system roots unless `ca_file`).
    #[serde(default)]
    pub tls: bool,
    /// PEM CA bundle to trust instead of the system roots (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// MQTT username at the broker (TTS: `<application id>@<tenant>`).
    #[serde(default)]
    pub username: String,
    /// The broker password inline (development only; prefer `password_env` or `password_file`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    /// The environment variable holding the password (TTS: an application API key).
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file holding the password (e.g. a mounted secret).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Fixed client id of the persistent session; "" means `citygw-<name>`. Two gateways
    /// bridging the same broker need different ids (and then each stores every uplink).
    #[serde(default)]
    pub client_id: String,
    /// Topic filters; empty: every event (`application/+/device/+/event/+` for ChirpStack,
    /// `v3/+/devices/#` for TTS).
    #[serde(default)]
    pub topics: Vec<String>,
    /// citygw tenant whose devices this server may report for ("" = any): an uplink naming a
    /// device of another tenant is dead-lettered as `tenant_mismatch`.
    #[serde(default)]
    pub tenant: String,
    /// ChirpStack's integration marshaler: `auto` (per message), `json` or `protobuf`.
    #[serde(default)]
    pub marshaler: Marshaler,
    /// How long an uplink's (DevEUI, frame counter, time) is remembered in memory to drop a
    /// redelivery; after a restart the store itself answers.
    #[serde(default = "default_dedup_window_secs")]
    pub dedup_window_secs: u64,
    /// Uplinks being stored at once (each waits for its group commit before its ack).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// MQTT keep-alive towards the broker, seconds.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// First reconnect delay after the broker connection is lost; doubled up to `backoff_max_ms`.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Longest reconnect delay.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Send commands to this server's devices as downlinks (ChirpStack `command/down`, TTS
    /// `down/push`) through this connection; false: a read-only bridge (commands to its devices
    /// wait QUEUED until they expire).
    #[serde(default = "default_true")]
    pub downlinks: bool,
    /// LoRaWAN FPort of a downlink whose command gives none (1-223).
    #[serde(default = "default_downlink_f_port")]
    pub downlink_f_port: u32,
}

fn default_true() -> bool {
    true
}
fn default_downlink_f_port() -> u32 {
    1
}

fn default_dedup_window_secs() -> u64 {
    3600
}
fn default_max_inflight() -> usize {
    1024
}
fn default_keep_alive_secs() -> u64 {
    30
}
fn default_backoff_min_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    30_000
}

impl LorawanConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        let n = &self.name;
        anyhow::ensure!(
            crate::config::is_slug(n),
            "lorawan name {n:?}: 1-64 characters of a-z 0-9 - _"
        );
        anyhow::ensure!(!self.host.is_empty(), "lorawan {n}: host is required");
        anyhow::ensure!(
            self.max_inflight > 0 && self.max_inflight <= 65_535,
            "lorawan {n}: max_inflight must be 1..=65535"
        );
        anyhow::ensure!(
            self.topics.iter().all(|t| !t.is_empty()),
            "lorawan {n}: empty topic filter"
        );
        anyhow::ensure!(
            (1..=223).contains(&self.downlink_f_port),
            "lorawan {n}: downlink_f_port must be 1..=223 (LoRaWAN application ports)"
        );
        anyhow::ensure!(
            self.ca_file.is_none() || self.tls,
            "lorawan {n}: ca_file needs tls = true"
        );
        Ok(())
    }

    pub fn port(&self) -> u16 {
        match (self.port, self.tls) {
            (0, false) => 1883,
            (0, true) => 8883,
            (p, _) => p,
        }
    }

    pub fn client_id(&self) -> String {
        if self.client_id.is_empty() {
            format!("citygw-{}", self.name)
        } else {
            self.client_id.clone()
        }
    }

    pub fn topics(&self) -> Vec<String> {
        if !self.topics.is_empty() {
            return self.topics.clone();
        }
        vec![match self.server_type {
            ServerType::ChirpstackV4 => super::chirpstack::DEFAULT_TOPIC.to_string(),
            ServerType::TtnV3 => super::tts::DEFAULT_TOPIC.to_string(),
        }]
    }

    pub fn password(&self) -> anyhow::Result<String> {
        let n = &self.name;
        if let Some(var) = &self.password_env {
            return std::env::var(var).map_err(|_| {
                anyhow::anyhow!("lorawan {n}: environment variable {var} is not set")
            });
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("lorawan {n}: {}: {e}", path.display()))?;
            return Ok(text.trim().to_string());
        }
        Ok(self.password.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> LorawanConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_per_server_type() {
        let cs = parse("name = \"cs\"\ntype = \"chirpstack_v4\"\nhost = \"h\"");
        assert_eq!((cs.port(), cs.client_id()), (1883, "citygw-cs".to_string()));
        assert_eq!(cs.topics(), ["application/+/device/+/event/+"]);
        assert_eq!(cs.marshaler, Marshaler::Auto);
        cs.validate().unwrap();
        let tts = parse("name = \"ttn\"\ntype = \"ttn_v3\"\nhost = \"h\"\ntls = true");
        assert_eq!(tts.port(), 8883);
        assert_eq!(tts.topics(), ["v3/+/devices/#"]);
    }

    #[test]
    fn refusals() {
        for bad in [
            "name = \"Bad Name\"\ntype = \"ttn_v3\"\nhost = \"h\"",
            "name = \"x\"\ntype = \"ttn_v3\"\nhost = \"\"",
            "name = \"x\"\ntype = \"ttn_v3\"\nhost = \"h\"\nca_file = \"/ca.pem\"",
            "name = \"x\"\ntype = \"ttn_v3\"\nhost = \"h\"\nmax_inflight = 0",
            "name = \"x\"\ntype = \"ttn_v3\"\nhost = \"h\"\ndownlink_f_port = 224",
            "name = \"x\"\ntype = \"ttn_v3\"\nhost = \"h\"\ndownlink_f_port = 0",
        ] {
            assert!(parse(bad).validate().is_err(), "{bad}");
        }
        assert!(
            toml::from_str::<LorawanConfig>("name = \"x\"\ntype = \"loriot\"\nhost = \"h\"")
                .is_err()
        );
        assert!(toml::from_str::<LorawanConfig>(
            "name = \"x\"\ntype = \"ttn_v3\"\nhost = \"h\"\nurl = \"u\""
        )
        .is_err());
    }

    #[test]
    fn printed_config_hides_the_password() {
        let mut cfg = crate::config::Config::default();
        cfg.lorawan.push(parse(
            "name = \"cs\"\ntype = \"chirpstack_v4\"\nhost = \"h\"\npassword = \"broker-secret\"",
        ));
        let text = cfg.to_toml();
        assert!(
            !text.contains("broker-secret") && text.contains("<redacted>"),
            "{text}"
        );
    }
}
