//! Structured logs (tracing) and the Prometheus recorder, and the two rules every log line about
//! untrusted input follows: what a client chose is cut to a fixed length ([`clip`]), and a flood
//! of refusals becomes a few lines and a count ([`LogLimiter`]).

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Logs go to stderr: text for people, JSON for log shippers. `RUST_LOG` overrides the level.
pub fn init_logging(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if cfg.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Latency buckets from 100 µs (a group commit on a fast disk) to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// Every metric the gateway records, with its help text: the one place they are described
/// (docs/src/reference/metrics.md is generated from it, see `reference_docs`).
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "citygw_messages_received_total",
        "Messages received from devices, by protocol"
    );
    describe_counter!(
        "citygw_bytes_received_total",
        Unit::Bytes,
        "Payload bytes received, by protocol"
    );
    describe_counter!(
        "citygw_messages_rejected_total",
        "Messages refused and dead-lettered, by protocol and reason (docs/src/reference/dead-letters.md)"
    );
    describe_counter!(
        "citygw_auth_failures_total",
        "Refused device authentications, by protocol and reason (bad_credentials, unknown_device, \
         disabled_device, anonymous, session_limit, throttled: refused unchecked by the back-off of \
         failed attempts, will_refused: a will on a topic the device may not publish to)"
    );
    describe_counter!(
        "citygw_subscribe_denied_total",
        "Refused MQTT subscriptions (outside the device's own topics), by protocol"
    );
    describe_counter!(
        "citygw_api_auth_failures_total",
        "Refused API calls with a missing or wrong token, by api (admin, telemetry, http, console) \
         and reason (throttled: refused unchecked by the back-off of failed attempts)"
    );
    describe_gauge!(
        "citygw_connected_devices",
        "Devices with a live connection, by protocol"
    );
    describe_histogram!(
        "citygw_ingest_seconds",
        Unit::Seconds,
        "Decode to durable, per message"
    );
    describe_histogram!(
        "citygw_store_commit_seconds",
        Unit::Seconds,
        "Write and fsync of one group commit"
    );
    describe_histogram!(
        "citygw_store_commit_batch_size",
        "Requests covered by one group commit"
    );
    describe_counter!(
        "citygw_readings_stored_total",
        "Readings written to the store"
    );
    describe_counter!(
        "citygw_dead_letters_stored_total",
        "Dead-letter records written"
    );
    describe_gauge!(
        "citygw_store_queue_depth",
        "Write requests waiting for the group commit"
    );
    describe_counter!("citygw_store_commit_errors_total", "Failed group commits");
    describe_gauge!(
        "citygw_store_writable",
        "1 while the store accepts new readings, 0 while it refuses them (low space, engine failed)"
    );
    describe_gauge!(
        "citygw_store_free_bytes",
        Unit::Bytes,
        "Free space on the data directory's filesystem (available to unprivileged users)"
    );
    describe_counter!(
        "citygw_store_refused_total",
        "Writes refused without trying (low space, engine being reopened), by what and reason"
    );
    describe_counter!(
        "citygw_store_recoveries_total",
        "Storage engine reopened from disk after a failed commit"
    );
    describe_counter!(
        "citygw_device_time_replaced_total",
        "Implausible device times replaced by the receive time, by protocol and direction"
    );
    describe_gauge!(
        "citygw_store_write_buffer_bytes",
        Unit::Bytes,
        "Storage engine write buffers in memory (active and sealed memtables)"
    );
    describe_gauge!(
        "citygw_store_block_cache_bytes",
        Unit::Bytes,
        "Storage engine block cache in use"
    );
    describe_counter!(
        "citygw_retention_deleted_total",
        "Records deleted by retention, by kind"
    );
    describe_gauge!("citygw_registered_devices", "Devices in the registry");
    describe_counter!(
        "citygw_api_denied_total",
        "Authenticated API calls refused for lack of scope, by api"
    );
    describe_gauge!(
        "citygw_kpi_city_devices",
        "Devices of the KPI city by state (active, silent, disabled)"
    );
    describe_gauge!(
        "citygw_kpi_city_connections_per_resident",
        "Active IoT connections per resident of the KPI city"
    );
    describe_gauge!(
        "citygw_kpi_city_target_per_resident",
        "Target in force, connections per resident"
    );
    describe_gauge!(
        "citygw_kpi_city_attainment_ratio",
        "Connections per resident over the target in force"
    );
    describe_gauge!(
        "citygw_kpi_city_devices_needed",
        "Active devices still needed for the target in force"
    );
    describe_gauge!(
        "citygw_kpi_kind_devices",
        "Devices of the KPI city by kind and state (active, silent)"
    );
    describe_gauge!(
        "citygw_kpi_commune_devices",
        "Devices by commune of the KPI city and state; only communes with devices"
    );
    describe_gauge!(
        "citygw_kpi_commune_connections_per_resident",
        "Active connections per resident, communes with a known population"
    );
    describe_histogram!(
        "citygw_kpi_compute_seconds",
        Unit::Seconds,
        "One KPI computation (registry scan, snapshots, projection)"
    );
    describe_counter!(
        "citygw_coap_datagrams_total",
        "CoAP datagrams received (plain and decrypted CoAPS)"
    );
    describe_counter!(
        "citygw_coap_responses_total",
        "CoAP requests answered, by response code"
    );
    describe_counter!(
        "citygw_coap_refused_total",
        "CoAP requests answered with an error, by reason"
    );
    describe_counter!(
        "citygw_coap_retransmissions_total",
        "Retransmitted CoAP requests recognised (answered again, processed once)"
    );
    describe_counter!(
        "citygw_coap_malformed_total",
        "CoAP datagrams dropped or reset as malformed, by reason"
    );
    describe_counter!(
        "citygw_coaps_datagrams_total",
        "Datagrams received on the CoAPS (DTLS) listener, before decryption"
    );
    describe_counter!(
        "citygw_coaps_datagrams_dropped_total",
        "CoAPS datagrams dropped: not a ClientHello from an unknown peer, the session limit \
         reached, or a session's queue full"
    );
    describe_counter!(
        "citygw_coaps_hello_verify_requests_total",
        "DTLS ClientHellos without a valid cookie, answered statelessly with a HelloVerifyRequest \
         (RFC 6347 4.2.1): no state is held for them"
    );
    describe_counter!(
        "citygw_coaps_handshakes_total",
        "DTLS handshakes, by result (ok, failed)"
    );
    describe_counter!(
        "citygw_coaps_handshake_failures_total",
        "Failed DTLS handshakes, by reason (timeout: a wrong PSK shows as one; handshake)"
    );
    describe_counter!(
        "citygw_tls_handshakes_total",
        "TLS handshakes on the gRPC and HTTP listeners, by listener and result (ok, failed, timeout)"
    );
    describe_counter!(
        "citygw_tls_client_certs_refused_total",
        "Client certificates refused at the TLS handshake, by listener and reason (unknown_issuer, \
         expired, revoked, pin_mismatch, no_identity, ...)"
    );
    describe_counter!(
        "citygw_tls_reloads_total",
        "Reloads of a TLS listener's certificate, key, CA and CRL files (SIGHUP or a file change), \
         by listener and result (ok, failed: the previous material stays in use)"
    );
    describe_gauge!(
        "citygw_tls_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "When the certificate a TLS listener serves expires, Unix seconds, by listener (alert on \
         less than 14 days left)"
    );
    describe_gauge!(
        "citygw_coaps_sessions",
        "DTLS sessions held, handshaking or established"
    );
    describe_gauge!(
        "citygw_lwm2m_registrations_active",
        "LwM2M clients registered and not expired"
    );
    describe_counter!(
        "citygw_lwm2m_registrations_total",
        "LwM2M registration events, by event (register, update, deregister, expire)"
    );
    describe_counter!(
        "citygw_lwm2m_notifications_total",
        "LwM2M observe notifications received"
    );
    describe_counter!(
        "citygw_lwm2m_observe_errors_total",
        "LwM2M observations that failed, by reason (timeout, bad_value, refused)"
    );
    describe_counter!(
        "citygw_lwm2m_responses_ignored_total",
        "LwM2M responses that answer no request of the server, by reason (unknown_token; \
         wrong_peer: a command request's token from another address; wrong_message_id)"
    );
    describe_gauge!(
        "citygw_lwm2m_requests_outstanding",
        "LwM2M command requests (Write, Execute) sent and not yet answered"
    );
    describe_gauge!(
        "citygw_lorawan_connected",
        "1 while connected to the network server's broker, by server"
    );
    describe_counter!(
        "citygw_lorawan_connects_total",
        "Connections made to a network server's broker, by server"
    );
    describe_counter!(
        "citygw_lorawan_connection_errors_total",
        "Broker connections lost or failed, by server"
    );
    describe_counter!(
        "citygw_lorawan_messages_total",
        "Network-server events handled, by server, event (up, join, status, error, downlink, \
         malformed, ...) and outcome (stored, duplicate, dead_letter, ignored, report)"
    );
    describe_counter!(
        "citygw_lorawan_downlinks_total",
        "Command downlinks the network server's broker accepted (PUBACK; TTS: published), by \
         server"
    );
    describe_counter!(
        "citygw_lorawan_downlink_reports_total",
        "Network-server reports on downlinks, by server, report (queued, transmitted, ack, nack, \
         failed) and outcome (matched, late, unknown_command, wrong_device, unknown_device, \
         no_command_id, no_downlinks)"
    );
    describe_counter!(
        "citygw_lorawan_dead_letters_total",
        "Network-server events dead-lettered, by server and reason"
    );
    describe_counter!(
        "citygw_lorawan_unknown_devices_total",
        "Events for DevEUIs no device is registered with, by server"
    );
    describe_gauge!(
        "citygw_mqtt_session_limit",
        "MQTT sessions this process may hold (from its open-files limit less a reserve for the \
         store)"
    );
    describe_counter!(
        "citygw_store_best_effort_dropped_total",
        "Best-effort readings (MQTT QoS 0, CoAP NON) dropped because the store's queue was full"
    );
    describe_counter!(
        "citygw_retention_held_total",
        "Readings retention kept past store.retention_days because a sink has not delivered them"
    );
    describe_gauge!("citygw_subscribers", "Live agency subscriptions, by agency");
    describe_counter!(
        "citygw_readings_streamed_total",
        "Readings sent to agency subscriptions, by agency"
    );
    describe_counter!(
        "citygw_subscriber_overflows_total",
        "Subscriptions ended (RESOURCE_EXHAUSTED, with a resume point) for a client too slow to \
         read, by agency"
    );
    describe_histogram!(
        "citygw_query_seconds",
        Unit::Seconds,
        "Agency history and device queries, by method"
    );
    describe_counter!(
        "citygw_sink_batches_total",
        "Batches a time-series store acknowledged, by sink"
    );
    describe_counter!(
        "citygw_sink_points_total",
        "Readings a time-series store acknowledged, by sink"
    );
    describe_counter!(
        "citygw_sink_retries_total",
        "Writes retried after a network error, 429, 5xx or a configuration error, by sink"
    );
    describe_counter!(
        "citygw_sink_errors_total",
        "Failed writes, by sink and status (HTTP status, or the kind of network error)"
    );
    describe_histogram!(
        "citygw_sink_write_seconds",
        Unit::Seconds,
        "One write to a time-series store, request to answer, by sink"
    );
    describe_gauge!(
        "citygw_sink_lag_readings",
        "Stored readings not yet delivered, by sink"
    );
    describe_gauge!(
        "citygw_sink_lag_seconds",
        Unit::Seconds,
        "Age of the oldest reading not yet delivered, by sink (0 when none)"
    );
    describe_gauge!(
        "citygw_sink_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last write a time-series store acknowledged, by sink"
    );
    describe_counter!(
        "citygw_console_sign_ins_total",
        "Console sign-ins, by role (admin, operator)"
    );
    describe_counter!(
        "citygw_console_requests_refused_total",
        "Console requests refused, by reason (no_session, csrf, cross_origin, read_only)"
    );
    describe_gauge!(
        "citygw_console_live_streams",
        "Console server-sent event streams open"
    );
    describe_counter!(
        "citygw_commands_total",
        "Commands to devices entering each state (QUEUED, SENT, DELIVERED, SUCCEEDED, FAILED, \
         EXPIRED), by transport and state"
    );
    describe_gauge!(
        "citygw_commands_open",
        "Commands to devices not in a final state yet"
    );
    describe_histogram!(
        "citygw_command_seconds",
        Unit::Seconds,
        "A command's creation to its final state, by transport and outcome"
    );
    describe_counter!(
        "citygw_command_results_refused_total",
        "Device answers to commands refused, by reason (malformed_result, unknown_command, \
         store_unavailable)"
    );
    describe_counter!(
        "citygw_command_reports_late_total",
        "Device reports for commands already in a final state (ignored), by transport"
    );
    describe_counter!(
        "citygw_command_requests_total",
        "Requests sent to devices for commands, by transport and event (sent, retransmitted, \
         no_answer: every transmission went unanswered)"
    );
    describe_counter!(
        "citygw_command_answers_total",
        "Devices' answers to command requests, by transport and code (2.04, 4.04, ... RST; \
         other for a code CoAP does not define)"
    );
    describe_counter!(
        "citygw_command_log_errors_total",
        "Command log writes that failed (retried)"
    );
    describe_counter!(
        "citygw_alerts_raised_total",
        "Alerts raised, by rule and severity"
    );
    describe_counter!(
        "citygw_alerts_cleared_total",
        "Alerts cleared, by rule, severity and who (rule, operator, rule_removed)"
    );
    describe_gauge!("citygw_alerts_active", "Alerts active now, by severity");
    describe_gauge!(
        "citygw_rules",
        "Alert rules in force, by origin (config file, api: added at run time)"
    );
    describe_counter!(
        "citygw_rule_changes_total",
        "Rules added or removed at run time, by change (added, removed)"
    );
    describe_counter!(
        "citygw_rule_actions_total",
        "Commands of rule actions per target, by rule and outcome (sent, cooldown, failed)"
    );
    describe_counter!(
        "citygw_rules_readings_evaluated_total",
        "Readings the rule evaluator went through"
    );
    describe_counter!(
        "citygw_rules_feed_lagged_total",
        "Times the rule evaluator fell behind the feed and caught up from the store"
    );
    describe_counter!(
        "citygw_alert_log_errors_total",
        "Writes of alert state that failed (retried)"
    );
    describe_gauge!(
        "citygw_cluster_healthy",
        "Cluster mode: 1 while the readings stream has a leader and a quorum (else /readyz is 503)"
    );
    describe_gauge!(
        "citygw_cluster_lag_messages",
        "Cluster mode: stream messages this node has not materialised into its store yet"
    );
    describe_gauge!(
        "citygw_cluster_applied_sequence",
        "Cluster mode: last stream sequence materialised into this node's store"
    );
    describe_histogram!(
        "citygw_cluster_publish_seconds",
        Unit::Seconds,
        "Cluster mode: publish to JetStream acknowledgement of one device message"
    );
    describe_counter!(
        "citygw_cluster_publish_errors_total",
        "Cluster mode: writes JetStream did not acknowledge (the device was told to retry), by \
         stage (publish, ack, records)"
    );
    describe_counter!(
        "citygw_cluster_duplicates_total",
        "Cluster mode: messages JetStream recognised as repeats by content id (stored once)"
    );
    describe_counter!(
        "citygw_cluster_materialised_messages_total",
        "Cluster mode: stream messages written into this node's store"
    );
    describe_counter!(
        "citygw_cluster_materialised_readings_total",
        "Cluster mode: readings written into this node's store from the stream"
    );
    describe_counter!(
        "citygw_cluster_materialise_restarts_total",
        "Cluster mode: stream consumer restarts (after a server or quorum loss)"
    );
    describe_counter!(
        "citygw_cluster_messages_skipped_total",
        "Cluster mode: stream messages that were not citygw records (skipped on every node)"
    );
    describe_gauge!(
        "citygw_cluster_records_revision",
        "Cluster mode: last records-bucket revision applied to this node"
    );
    describe_counter!(
        "citygw_cluster_records_watch_restarts_total",
        "Cluster mode: records-bucket watches replaced because they fell silent while the bucket moved on (their NATS server died)"
    );
    describe_gauge!(
        "citygw_sink_lease_held",
        "Cluster mode: 1 on the node that forwards this sink, by sink"
    );
}

/// Characters of a client-chosen string (client id, username, topic, path, endpoint name) that
/// a log line shows.
pub const LOG_CHARS: usize = 64;

/// A client-chosen string as logs and dead letters show it: at most `limit` characters, control
/// characters escaped, and how much was left out. Attackers choose these strings (65,535-byte
/// client ids and topics), so nothing of them is written unbounded.
pub struct Clipped<'a> {
    text: &'a str,
    limit: usize,
}

/// [`Clipped`] at [`LOG_CHARS`], for log fields: `client_id = %clip(id)`.
pub fn clip(text: &str) -> Clipped<'_> {
    clip_at(text, LOG_CHARS)
}

pub fn clip_at(text: &str, limit: usize) -> Clipped<'_> {
    Clipped { text, limit }
}

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (i, c)) in self.text.char_indices().enumerate() {
            if shown == self.limit {
                return write!(f, "…[{} more bytes]", self.text.len() - i);
            }
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// At most `per_window` log lines per window for one kind of event; the lines left out are
/// counted and reported with the next line written. For refusals an attacker can repeat at
/// will (failed logins, malformed packets), so they cannot fill the disk.
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl LogLimiter {
    pub const fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            state: Mutex::new(None),
        }
    }

    /// `Some(lines left out since the last one written)` when this line may be written.
    pub fn allow(&self) -> Option<u64> {
        self.allow_with(self.per_window)
    }

    /// As [`LogLimiter::allow`] with a configured number of lines per window.
    pub fn allow_with(&self, per_window: u32) -> Option<u64> {
        let now = Instant::now();
        let mut st = self.state.lock().expect("log limiter lock");
        let (start, written, dropped) = st.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= self.window {
            *start = now;
            *written = 0;
        }
        if *written < per_window {
            *written += 1;
            Some(std::mem::take(dropped))
        } else {
            *dropped += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_strings_are_bounded_and_escaped() {
        let long = "x".repeat(65_535);
        let shown = clip(&long).to_string();
        assert!(shown.len() < 100, "{}", shown.len());
        assert!(shown.ends_with("…[65471 more bytes]"), "{shown}");
        assert_eq!(clip("a\nb\u{0}").to_string(), "a\\nb\\u{0}");
        assert_eq!(
            clip("devices/ä/telemetry").to_string(),
            "devices/ä/telemetry"
        );
        assert_eq!(clip_at("abcdef", 3).to_string(), "abc…[3 more bytes]");
    }

    #[test]
    fn limiter_writes_a_few_lines_then_counts() {
        let l = LogLimiter::new(2, Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow_with(5), Some(2));
    }
}
