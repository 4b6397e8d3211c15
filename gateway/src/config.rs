//! Configuration: TOML with every key defaulted, `CITYGW_*` environment overrides.
//!
//! `citygw run` with no file at all must give a working gateway (data under ./data), so every
//! field has a default here and the file only states differences. Environment variables override
//! the file: `CITYGW_DATA_DIR`, and `CITYGW_<SECTION>__<KEY>` for nested keys, e.g.
//! `CITYGW_MQTT__LISTEN=[::]:1884`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the store, the generated admin token, the PSK sealing key and other state live.
    pub data_dir: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// The MQTT listener (embedded broker).
    pub mqtt: MqttConfig,
    /// CoAP, CoAPS and LwM2M listeners.
    pub coap: CoapConfig,
    /// The gRPC listener: agency API (Telemetry), admin API, health, reflection.
    pub grpc: GrpcConfig,
    /// The HTTP listener: /metrics, /healthz, /readyz, the KPI as JSON.
    pub http: HttpConfig,
    /// The operator's admin API.
    pub admin: AdminConfig,
    /// The embedded durable store.
    pub store: StoreConfig,
    /// The operator console on the HTTP listener.
    pub console: ConsoleConfig,
    pub ingest: IngestConfig,
    /// Agencies fixed in the file; more can be added through the admin API.
    pub agencies: Vec<crate::registry::agencies::AgencyConfig>,
    /// Console operators (read-only) fixed in the file; more through the admin API.
    pub operators: Vec<crate::registry::operators::OperatorConfig>,
    /// Time-series stores to forward every reading to.
    pub sinks: Vec<crate::sinks::config::SinkConfig>,
    /// IoT connections per resident.
    pub kpi: crate::kpi::KpiConfig,
    /// LoRaWAN network server brokers to bridge (ChirpStack v4, The Things Stack v3).
    pub lorawan: Vec<crate::sources::lorawan::config::LorawanConfig>,
    /// What every TLS listener shares: device identity in certificates, reloads.
    pub tls: TlsConfig,
    /// Back-off of failed authentication, for every protocol and API.
    pub auth: crate::registry::throttle::ThrottleConfig,
    /// Single node (embedded store, the default) or several nodes on NATS JetStream.
    pub cluster: crate::store::jetstream::ClusterConfig,
    /// Alert rules over the readings (threshold, absence, rate of change) and their actions.
    pub rules: Vec<crate::control::rules::config::RuleConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Where a device certificate carries the device id: "cn", "san_dns" or "san_uri".
    pub device_identity: crate::tls::identity::IdentityField,
    /// Seconds between checks of the certificate, key, CA and CRL files for changes, which are
    /// then reloaded; 0: only on SIGHUP.
    pub watch_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            device_identity: Default::default(),
            watch_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter, e.g. "info" or "citygw=debug,rmqtt=warn"; `RUST_LOG` overrides it. The
    /// embedded broker and storage engine log only warnings by default.
    pub level: String,
    /// "text" for people, "json" for log shippers.
    pub format: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Address and TCP port; `[::]` is dual stack (IPv4 and IPv6).
    pub listen: SocketAddr,
    /// Payloads above this are dead-lettered as `payload_too_large`.
    pub max_payload_bytes: usize,
    /// Packets above this are refused by the protocol layer itself (the connection is closed),
    /// so it is kept well above `max_payload_bytes` to let oversize payloads reach the
    /// dead-letter record where an operator can see them.
    pub max_packet_bytes: u32,
    /// Most MQTT sessions held at once. Lowered at start to what the open-files limit leaves
    /// after a reserve for the store, so connections can never starve it of descriptors.
    pub max_connections: usize,
    /// Concurrent CONNECT handshakes; beyond it new connections wait (connection storms).
    pub max_handshaking: usize,
    /// Seconds a new TCP connection has to complete CONNECT.
    pub handshake_timeout_secs: u64,
    /// PUBLISH packets of one connection in the gateway at once (decoded and being stored
    /// side by side; PUBACKs still leave in arrival order). Sent to MQTT 5 clients as their
    /// Receive Maximum; beyond it the gateway stops reading the connection until a PUBACK goes
    /// out. 1 processes one message per connection at a time.
    pub max_inflight: u16,
    /// MQTT over TLS, devices authenticated by their secret as on `listen`; on when
    /// `tls_cert_file` and `tls_key_file` are set.
    pub tls_listen: SocketAddr,
    /// PEM: the server certificate (then intermediates) of both TLS listeners.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM: the key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// MQTT over TLS with client certificates: the certificate names the device (see
    /// `tls.device_identity`), no secret needed; on when `client_ca_file` is set too.
    pub mtls_listen: SocketAddr,
    /// PEM: the CA(s) device certificates must chain to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// PEM: revocation lists of those CAs; a certificate of a CA without one is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_crl_file: Option<PathBuf>,
}

impl MqttConfig {
    /// The TLS files of the listener on `tls_listen` (`mtls`: the one on `mtls_listen`), when
    /// it is configured.
    pub fn tls_files(&self, mtls: bool) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        let Some((cert, key)) = cert_and_key("mqtt", &self.tls_cert_file, &self.tls_key_file)?
        else {
            anyhow::ensure!(
                self.client_ca_file.is_none(),
                "mqtt.client_ca_file needs mqtt.tls_cert_file and mqtt.tls_key_file"
            );
            return Ok(None);
        };
        if mtls && self.client_ca_file.is_none() {
            return Ok(None);
        }
        Ok(Some(crate::tls::TlsFiles {
            cert,
            key,
            client_ca: self.client_ca_file.clone().filter(|_| mtls),
            client_crl: self.client_crl_file.clone().filter(|_| mtls),
            client_auth: if mtls {
                crate::tls::ClientAuth::Required
            } else {
                crate::tls::ClientAuth::None
            },
        }))
    }
}

/// A listener's certificate and key: both or neither.
fn cert_and_key(
    section: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c.clone(), k.clone()))),
        (None, None) => Ok(None),
        _ => anyhow::bail!("{section}: set both tls_cert_file and tls_key_file, or neither"),
    }
}

/// CoAP over UDP (`sources::coap`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct CoapConfig {
    /// Plain (unencrypted) CoAP listener. Off by default: requests then carry the device
    /// secret in clear text, acceptable only on a private APN (docs/src/coap.md).
    pub plain_enabled: bool,
    /// Address and UDP port of plain CoAP (when `plain_enabled`).
    pub listen: SocketAddr,
    /// Largest payload accepted, in one datagram or reassembled from Block1 transfers;
    /// beyond it the answer is 4.13 with Size1.
    pub max_payload_bytes: usize,
    /// How long a message id is remembered per endpoint, so a retransmitted request is
    /// answered again but stored once (RFC 7252 EXCHANGE_LIFETIME, 247 s).
    pub exchange_lifetime_secs: u64,
    /// Exchanges remembered at once; the oldest are forgotten first beyond it.
    pub max_exchanges: usize,
    /// Requests being processed at once; beyond it the answer is 5.03 with Max-Age.
    pub max_in_flight: usize,
    /// LwM2M register interface and information reporting on the CoAP listeners.
    pub lwm2m_enabled: bool,
    /// LwM2M "NoSec": on plain CoAP, trust the endpoint name of a registration that carries no
    /// secret. Only for private networks (docs/src/coap.md).
    pub lwm2m_nosec: bool,
    /// Seconds a queue-mode LwM2M client (binding UQ, or Q) listens after its last message (a
    /// Register, Update, Send or an answer to a command); commands wait for the next Update after
    /// that (LwM2M 1.1: MAX_TRANSMIT_WAIT, 93).
    pub lwm2m_queue_awake_secs: u64,
    /// First retransmission timeout of the LwM2M server's own confirmable requests (observe,
    /// command Write/Execute), in ms: RFC 7252 ACK_TIMEOUT, doubled for each of 4 retransmissions
    /// (93 s in all with 2000). Raise it on high-latency networks.
    pub lwm2m_ack_timeout_ms: u64,
    /// CoAPS: DTLS 1.2 with a pre-shared key per device (identity = device id).
    pub dtls_enabled: bool,
    /// Address and UDP port of CoAPS (when `dtls_enabled`).
    pub dtls_listen: SocketAddr,
    /// DTLS sessions (handshaking or established) held at once; new peers beyond it are ignored.
    pub dtls_max_sessions: usize,
    /// A DTLS session without traffic for this long is forgotten (the device handshakes again).
    pub dtls_idle_secs: u64,
    /// Seconds a peer has to complete the DTLS handshake.
    pub dtls_handshake_timeout_secs: u64,
    /// Key that seals device PSKs at rest; default `<data_dir>/psk.key`, created on first start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk_key_file: Option<PathBuf>,
    /// CoAPS with certificates (X.509 mode, beside PSK on the same port): the server
    /// certificate and key, and the CA device certificates chain to; on when all three are set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtls_cert_file: Option<PathBuf>,
    /// PEM: the key of `dtls_cert_file` (X.509 mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtls_key_file: Option<PathBuf>,
    /// PEM: the CA(s) device certificates must chain to (X.509 mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtls_client_ca_file: Option<PathBuf>,
    /// PEM: revocation lists of the device CAs (X.509 mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtls_client_crl_file: Option<PathBuf>,
    /// Seconds a DTLS cookie (HelloVerifyRequest) stays valid; cookies are keyed by the peer's
    /// address with a secret that changes this often.
    pub dtls_cookie_lifetime_secs: u64,
}

impl CoapConfig {
    /// The files of CoAPS's X.509 mode, when it is configured.
    pub fn dtls_x509_files(&self) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        let Some((cert, key)) =
            cert_and_key("coap (dtls)", &self.dtls_cert_file, &self.dtls_key_file)?
        else {
            anyhow::ensure!(
                self.dtls_client_ca_file.is_none(),
                "coap.dtls_client_ca_file needs coap.dtls_cert_file and coap.dtls_key_file"
            );
            return Ok(None);
        };
        let client_ca = self.dtls_client_ca_file.clone().ok_or_else(|| {
            anyhow::anyhow!("coap.dtls_cert_file needs coap.dtls_client_ca_file (the device CA)")
        })?;
        Ok(Some(crate::tls::TlsFiles {
            cert,
            key,
            client_ca: Some(client_ca),
            client_crl: self.dtls_client_crl_file.clone(),
            client_auth: crate::tls::ClientAuth::Required,
        }))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Address and TCP port of the agency and admin APIs.
    pub listen: SocketAddr,
    /// Readings a live subscription may have queued for a slow client before it is ended with
    /// RESOURCE_EXHAUSTED and a resume point.
    pub subscription_buffer: usize,
    /// gRPC over TLS (agencies, the admin API): PEM certificate and key; plaintext when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM: the key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM: CA(s) of agency client certificates (mTLS). Bearer tokens still decide what a
    /// caller may read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// PEM: revocation lists of those CAs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_crl_file: Option<PathBuf>,
    /// With `client_ca_file`: refuse connections without a client certificate (false: verify
    /// certificates that are presented, serve the others on their token alone).
    pub client_cert_required: bool,
}

impl GrpcConfig {
    pub fn tls_files(&self) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        let Some((cert, key)) = cert_and_key("grpc", &self.tls_cert_file, &self.tls_key_file)?
        else {
            anyhow::ensure!(
                self.client_ca_file.is_none(),
                "grpc.client_ca_file needs grpc.tls_cert_file and grpc.tls_key_file"
            );
            return Ok(None);
        };
        Ok(Some(crate::tls::TlsFiles {
            cert,
            key,
            client_auth: match (&self.client_ca_file, self.client_cert_required) {
                (None, _) => crate::tls::ClientAuth::None,
                (Some(_), true) => crate::tls::ClientAuth::Required,
                (Some(_), false) => crate::tls::ClientAuth::Optional,
            },
            client_ca: self.client_ca_file.clone(),
            client_crl: self.client_crl_file.clone(),
        }))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address and TCP port of /metrics, /healthz, /readyz and /api/v1/kpi.
    pub listen: SocketAddr,
    /// HTTPS: PEM certificate (then intermediates); plain HTTP when unset. The console's
    /// session cookie is `Secure` then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM: the key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Bearer token `/metrics` requires (empty: open, as Prometheus scrapes by default). The
    /// metrics name agencies and carry the KPI; protect them where the port is reachable.
    pub metrics_token: String,
    /// Or read the token from this file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_token_file: Option<PathBuf>,
}

impl HttpConfig {
    pub fn tls_files(&self) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        Ok(
            cert_and_key("http", &self.tls_cert_file, &self.tls_key_file)?.map(|(cert, key)| {
                crate::tls::TlsFiles {
                    cert,
                    key,
                    client_ca: None,
                    client_crl: None,
                    client_auth: crate::tls::ClientAuth::None,
                }
            }),
        )
    }

    /// The `/metrics` token, if one is required.
    pub fn metrics_token(&self) -> anyhow::Result<Option<String>> {
        if !self.metrics_token.is_empty() {
            return Ok(Some(self.metrics_token.clone()));
        }
        match &self.metrics_token_file {
            Some(f) => {
                let token = std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("http.metrics_token_file {}: {e}", f.display()))?;
                let token = token.trim().to_string();
                anyhow::ensure!(
                    !token.is_empty(),
                    "http.metrics_token_file {} is empty",
                    f.display()
                );
                Ok(Some(token))
            }
            None => Ok(None),
        }
    }
}

/// The operator console (`api::console`), served at `/console/` on the HTTP listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the console at `/console/` on the HTTP listener.
    pub enabled: bool,
    /// IANA time zone the console shows dates in (the city's).
    pub time_zone: String,
    /// A session ends this long after sign-in, whatever happens.
    pub session_hours: u64,
    /// A session ends after this long without a request (an open live page keeps it alive).
    pub idle_minutes: u64,
    /// Sessions held at once; signing in beyond it ends the oldest session.
    pub max_sessions: usize,
    /// How often the overview's live figures are sampled and pushed to open pages.
    pub live_interval_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// The operator's bearer token for the admin API. Empty: a random token is generated on first
    /// start and kept in `<data_dir>/admin.token` (mode 0600), where the CLI finds it.
    pub token: String,
    /// Read the token from this file instead (e.g. a mounted secret).
    pub token_file: Option<PathBuf>,
}

/// What the pipeline believes of a device (`pipeline::clock`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// A device time more than this ahead of the receive time is replaced by the receive time.
    pub device_time_max_ahead_secs: u64,
    /// A device time more than this before the receive time is replaced by the receive time
    /// (a clock reset to 1970 or 2000); older buffered readings are kept as sent.
    pub device_time_max_behind_days: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            device_time_max_ahead_secs: 600,
            device_time_max_behind_days: 3650,
        }
    }
}

impl IngestConfig {
    pub fn device_clock(&self) -> crate::pipeline::clock::DeviceClock {
        let ms = |secs: u64| i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        crate::pipeline::clock::DeviceClock {
            max_ahead_ms: ms(self.device_time_max_ahead_secs),
            max_behind_ms: ms(self.device_time_max_behind_days.saturating_mul(86_400)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// How long the group commit waits for more writes before one fsync covers them all (0: it
    /// covers whatever queued during the previous fsync).
    pub commit_window_ms: u64,
    /// Upper bound of readings in one commit.
    pub max_batch: usize,
    /// Readings and dead letters older than this many days are deleted (hourly, in chunks),
    /// except readings a sink has not delivered yet; so are final commands created and alerts
    /// cleared longer ago (active alerts and open commands stay).
    pub retention_days: u64,
    /// Low-space watermark (MiB free on the data directory's filesystem): below it new readings
    /// are refused (devices retry), keeping room for dead letters, registry records, sink cursors
    /// and the store's recovery; below half of it dead letters are refused too.
    pub min_free_mb: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            log: LogConfig::default(),
            mqtt: MqttConfig::default(),
            coap: CoapConfig::default(),
            grpc: GrpcConfig::default(),
            http: HttpConfig::default(),
            admin: AdminConfig::default(),
            store: StoreConfig::default(),
            console: ConsoleConfig::default(),
            ingest: IngestConfig::default(),
            agencies: Vec::new(),
            operators: Vec::new(),
            sinks: Vec::new(),
            kpi: crate::kpi::KpiConfig::default(),
            lorawan: Vec::new(),
            tls: TlsConfig::default(),
            auth: Default::default(),
            cluster: Default::default(),
            rules: Vec::new(),
        }
    }
}

/// Our own events at info; the embedded broker and storage engine only when something is wrong
/// (rmqtt logs every dropped connection at info, which floods the log in a reconnect storm).
const DEFAULT_LOG_LEVEL: &str = "info,rmqtt=warn,rmqtt_net=warn,fjall=warn,lsm_tree=warn";

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: DEFAULT_LOG_LEVEL.into(),
            format: "text".into(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: "[::]:1883".parse().expect("static address"),
            max_payload_bytes: 256 * 1024,
            max_packet_bytes: 16 * 1024 * 1024,
            max_connections: 1_000_000,
            max_handshaking: 1_000,
            handshake_timeout_secs: 30,
            max_inflight: 64,
            tls_listen: "[::]:8883".parse().expect("static address"),
            tls_cert_file: None,
            tls_key_file: None,
            mtls_listen: "[::]:8884".parse().expect("static address"),
            client_ca_file: None,
            client_crl_file: None,
        }
    }
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            plain_enabled: false,
            listen: "[::]:5683".parse().expect("static address"),
            max_payload_bytes: 64 * 1024,
            exchange_lifetime_secs: 247,
            max_exchanges: 1_000_000,
            max_in_flight: 10_000,
            lwm2m_enabled: true,
            lwm2m_nosec: false,
            lwm2m_queue_awake_secs: 93,
            lwm2m_ack_timeout_ms: 2000,
            dtls_enabled: true,
            dtls_listen: "[::]:5684".parse().expect("static address"),
            dtls_max_sessions: 100_000,
            dtls_idle_secs: 900,
            dtls_handshake_timeout_secs: 30,
            psk_key_file: None,
            dtls_cert_file: None,
            dtls_key_file: None,
            dtls_client_ca_file: None,
            dtls_client_crl_file: None,
            dtls_cookie_lifetime_secs: 60,
        }
    }
}

impl CoapConfig {
    pub fn exchange_lifetime(&self) -> Duration {
        Duration::from_secs(self.exchange_lifetime_secs)
    }

    pub fn psk_key_path(&self, data_dir: &Path) -> PathBuf {
        self.psk_key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("psk.key"))
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: "[::]:50051".parse().expect("static address"),
            subscription_buffer: 10_000,
            tls_cert_file: None,
            tls_key_file: None,
            client_ca_file: None,
            client_crl_file: None,
            client_cert_required: true,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "[::]:8080".parse().expect("static address"),
            tls_cert_file: None,
            tls_key_file: None,
            metrics_token: String::new(),
            metrics_token_file: None,
        }
    }
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            time_zone: "Asia/Ho_Chi_Minh".into(),
            session_hours: 12,
            idle_minutes: 60,
            max_sessions: 1000,
            live_interval_ms: 2000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            commit_window_ms: 0,
            max_batch: 8192,
            retention_days: 30,
            min_free_mb: 256,
        }
    }
}

impl StoreConfig {
    pub fn commit_window(&self) -> Duration {
        Duration::from_millis(self.commit_window_ms)
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_days * 86_400)
    }

    pub fn min_free_bytes(&self) -> u64 {
        self.min_free_mb.saturating_mul(1 << 20)
    }
}

impl Config {
    /// Defaults, then the file (if any), then `CITYGW_*` variables.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut builder =
            config::Config::builder().add_source(config::Config::try_from(&Config::default())?);
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "config file {} does not exist",
                file.display()
            );
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        let merged = builder
            .add_source(
                config::Environment::with_prefix("CITYGW")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("cluster.nats_urls")
                    .source(Some(config_env())),
            )
            .build()?;
        let cfg: Config = merged
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.log.format.as_str(), "text" | "json"),
            "log.format must be \"text\" or \"json\", not {:?}",
            self.log.format
        );
        anyhow::ensure!(self.store.max_batch > 0, "store.max_batch must be positive");
        anyhow::ensure!(
            self.grpc.subscription_buffer > 0,
            "grpc.subscription_buffer must be positive"
        );
        anyhow::ensure!(
            self.store.retention_days > 0,
            "store.retention_days must be positive"
        );
        anyhow::ensure!(
            self.mqtt.max_payload_bytes as u64 <= self.mqtt.max_packet_bytes as u64,
            "mqtt.max_payload_bytes must not exceed mqtt.max_packet_bytes"
        );
        anyhow::ensure!(
            self.mqtt.max_inflight > 0,
            "mqtt.max_inflight must be positive"
        );
        self.kpi.validate()?;
        self.cluster.validate()?;
        crate::control::rules::config::compile_all(&self.rules)?;
        let c = &self.console;
        anyhow::ensure!(
            c.session_hours > 0 && c.idle_minutes > 0 && c.max_sessions > 0,
            "console.session_hours, console.idle_minutes and console.max_sessions must be positive"
        );
        anyhow::ensure!(
            c.live_interval_ms >= 100,
            "console.live_interval_ms must be at least 100"
        );
        anyhow::ensure!(
            (100..=60_000).contains(&self.coap.lwm2m_ack_timeout_ms),
            "coap.lwm2m_ack_timeout_ms must be 100-60000"
        );
        // An IANA name (Region/City, UTC, Etc/GMT-7): the browser resolves it.
        anyhow::ensure!(
            !c.time_zone.is_empty()
                && c.time_zone.len() <= 64
                && c.time_zone
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+')),
            "console.time_zone {:?} is not an IANA time zone name (e.g. Asia/Ho_Chi_Minh)",
            c.time_zone
        );
        let mut names = std::collections::HashSet::new();
        for l in &self.lorawan {
            l.validate()?;
            anyhow::ensure!(
                names.insert(&l.name),
                "lorawan name {:?} is used twice",
                l.name
            );
        }
        // Each listener's TLS settings must be complete before anything starts.
        self.mqtt.tls_files(true)?;
        self.grpc.tls_files()?;
        self.http.tls_files()?;
        self.coap.dtls_x509_files()?;
        anyhow::ensure!(
            self.coap.dtls_cookie_lifetime_secs > 0,
            "coap.dtls_cookie_lifetime_secs must be positive"
        );
        anyhow::ensure!(
            self.coap.max_exchanges > 0
                && self.coap.max_in_flight > 0
                && self.coap.dtls_max_sessions > 0,
            "coap.max_exchanges, coap.max_in_flight and coap.dtls_max_sessions must be positive"
        );
        Ok(())
    }

    /// The configuration as TOML, with inline secrets replaced by `<redacted>`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        let redact = |s: &mut String| {
            if !s.is_empty() {
                *s = "<redacted>".into();
            }
        };
        redact(&mut shown.admin.token);
        redact(&mut shown.http.metrics_token);
        for sink in &mut shown.sinks {
            redact(&mut sink.token);
            redact(&mut sink.password);
        }
        for server in &mut shown.lorawan {
            redact(&mut server.password);
        }
        shown.cluster.redact();
        toml::to_string_pretty(&shown).expect("config serialises")
    }

    /// The admin token: configured, from a file, or generated once and kept under data_dir.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        if !self.admin.token.is_empty() {
            return Ok(self.admin.token.clone());
        }
        if let Some(file) = &self.admin.token_file {
            let token = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("admin.token_file {}: {e}", file.display()))?;
            return Ok(token.trim().to_string());
        }
        let path = self.generated_token_path();
        if let Ok(token) = std::fs::read_to_string(&path) {
            return Ok(token.trim().to_string());
        }
        std::fs::create_dir_all(&self.data_dir)?;
        let token = crate::registry::secret::generate();
        write_private(&path, &token)?;
        tracing::info!(path = %path.display(), "generated an admin token");
        Ok(token)
    }

    pub fn generated_token_path(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }
}

/// The sections whose keys `CITYGW_<SECTION>__<KEY>` variables override (the arrays of tables,
/// `[[sinks]]`, `[[lorawan]]`, `[[agencies]]`, `[[operators]]`, come from the file only).
pub(crate) const ENV_SECTIONS: &[&str] = &[
    "log", "mqtt", "coap", "grpc", "http", "admin", "store", "kpi", "console", "cluster", "ingest",
    "tls", "auth",
];

/// The `CITYGW_*` variables that name config keys; others (CITYGW_SERVER, CITYGW_ADMIN_TOKEN
/// for the CLI, CITYGW_CONFIG) are not configuration and must not trip `deny_unknown_fields`.
fn config_env() -> config::Map<String, String> {
    std::env::vars()
        .filter(|(k, _)| {
            let Some(key) = k.strip_prefix("CITYGW_") else {
                return false;
            };
            let key = key.to_ascii_lowercase();
            key == "data_dir"
                || ENV_SECTIONS
                    .iter()
                    .any(|s| key.strip_prefix(s).is_some_and(|r| r.starts_with("__")))
        })
        .collect()
}

/// Makes the data directory private to the gateway's user: created 0700 (an existing one is
/// tightened, and so is anything in it still readable by others), and every file the process
/// creates from now on 0600 (umask 077): the store holds secret and token hashes and sealed PSKs.
pub fn private_data_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("data_dir {}: {e}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: umask only sets the process's file-creation mask; it cannot fail.
        unsafe {
            libc::umask(0o077);
        }
        let mut tightened = 0usize;
        let mut pending = vec![dir.to_path_buf()];
        while let Some(path) = pending.pop() {
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.file_type().is_symlink() {
                continue;
            }
            let mode = meta.permissions().mode();
            let private = if meta.is_dir() { 0o700 } else { 0o600 };
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & private))?;
                tightened += 1;
            }
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    pending.push(entry?.path());
                }
            }
        }
        if tightened > 0 {
            tracing::warn!(data_dir = %dir.display(), tightened, "data_dir was readable by other users; now private to this one");
        }
    }
    Ok(())
}

pub(crate) fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// A duration as operators write it: `30s`, `5m`, `2h`, `1d`, `500ms`, or a sum such as `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let bad =
        || format!("duration {s:?}: a number and a unit (ms, s, m, h, d), e.g. 30s, 5m, 1h30m");
    if text.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let millis = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += Duration::from_millis(n.checked_mul(millis).ok_or_else(bad)?);
    }
    Ok(total)
}

/// Names operators give things that end up in metric labels, keys and addresses (tenants,
/// agencies, sinks, network servers): 1-64 characters of a-z 0-9 - _.
pub fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = Config::default().to_toml();
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed.mqtt.listen, Config::default().mqtt.listen);
        assert_eq!(parsed.store.retention_days, 30);
    }

    #[test]
    fn file_then_env_override() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("citygw.toml");
        std::fs::write(
            &file,
            "[store]\nretention_days = 7\n[mqtt]\nmax_payload_bytes = 1000\n",
        )
        .unwrap();
        // Only this test sets this variable, so parallel tests are unaffected.
        std::env::set_var("CITYGW_GRPC__LISTEN", "127.0.0.1:6000");
        let cfg = Config::load(Some(&file)).unwrap();
        std::env::remove_var("CITYGW_GRPC__LISTEN");
        assert_eq!(cfg.store.retention_days, 7);
        assert_eq!(cfg.mqtt.max_payload_bytes, 1000);
        assert_eq!(cfg.grpc.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(cfg.http.listen, HttpConfig::default().listen);
    }

    /// deploy/citygw.toml documents every key with its default; keep it true.
    #[test]
    fn example_config_states_the_defaults() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/citygw.toml");
        let parsed: Config = toml::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
        assert_eq!(parsed.to_toml(), Config::default().to_toml());
    }

    #[test]
    fn printed_config_hides_secrets() {
        let mut cfg = Config::default();
        cfg.admin.token = "admin-secret".into();
        cfg.sinks.push(toml::from_str("name = \"vm\"\nkind = \"influx2\"\nurl = \"http://x\"\norg = \"o\"\nbucket = \"b\"\ntoken = \"influx-secret\"").unwrap());
        let text = cfg.to_toml();
        assert!(
            !text.contains("admin-secret") && !text.contains("influx-secret"),
            "{text}"
        );
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "5", "m", "5x", "1.5h", "-3s", "5 m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cluster_keys_from_the_environment_and_hidden_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("citygw.toml");
        std::fs::write(
            &file,
            "[cluster]\nbackend = \"jetstream\"\nnode_name = \"a\"\npassword = \"nats-secret\"\n",
        )
        .unwrap();
        // Only this test sets these variables, so parallel tests are unaffected.
        std::env::set_var(
            "CITYGW_CLUSTER__NATS_URLS",
            "nats://10.0.0.1:4222,nats://10.0.0.2:4222",
        );
        std::env::set_var("CITYGW_CLUSTER__TOKEN", "token-secret");
        let cfg = Config::load(Some(&file));
        std::env::remove_var("CITYGW_CLUSTER__NATS_URLS");
        std::env::remove_var("CITYGW_CLUSTER__TOKEN");
        let cfg = cfg.unwrap();
        assert!(cfg.cluster.enabled());
        assert_eq!(
            cfg.cluster.nats_urls,
            ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
        );
        assert_eq!(cfg.cluster.node(), "a");
        let text = cfg.to_toml();
        assert!(
            !text.contains("nats-secret") && !text.contains("token-secret"),
            "{text}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("citygw.toml");
        std::fs::write(&file, "[mqtt]\nlisten_port = 1\n").unwrap();
        assert!(Config::load(Some(&file)).is_err());
    }
}
