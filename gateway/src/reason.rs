//! Why the gateway refuses a message: the one list of dead-letter reasons.
//!
//! A refusal's reason is a metrics label (`citygw_messages_rejected_total{reason}`), the `reason`
//! of its dead-letter record, and a row of the book's reference page
//! (docs/src/reference/dead-letters.md, generated from [`ALL`] and checked by a test).
//! Dashboards and alerts key on it, so it is a stable snake_case code, never free text; the
//! specifics go in the refusal's detail. A [`Reason`] can only be made in this file, so a new
//! reason cannot be used anywhere without being listed, explained and documented here.

use std::fmt;

/// A stable refusal code; one of [`ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason(&'static str);

impl Reason {
    pub const fn as_str(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<Reason> for &str {
    fn eq(&self, other: &Reason) -> bool {
        *self == other.0
    }
}

/// A reason with what it means and which part of the gateway gives it, for the reference page.
pub struct Documented {
    pub reason: Reason,
    pub meaning: &'static str,
    pub given_by: &'static str,
}

macro_rules! reasons {
    ($($(#[doc = $doc:literal])+ $name:ident = $code:literal, given by $by:literal;)+) => {
        $($(#[doc = $doc])+ pub const $name: Reason = Reason($code);)+

        /// Every reason, in the order of the reference page.
        pub const ALL: &[Documented] = &[$(Documented {
            reason: $name,
            meaning: concat!($($doc, " "),+),
            given_by: $by,
        }),+];
    };
}

reasons! {
    /// The payload has no bytes (or, for the text formats, only whitespace).
    EMPTY_PAYLOAD = "empty_payload", given by "every payload format";
    /// Not JSON at all, or JSON that is not in the shape of the gateway's JSON format.
    MALFORMED_JSON = "malformed_json", given by "JSON payloads";
    /// Well-formed JSON or CBOR that is not a valid SenML pack.
    MALFORMED_SENML = "malformed_senml", given by "SenML payloads (JSON, CBOR)";
    /// Truncated or invalid CBOR.
    MALFORMED_CBOR = "malformed_cbor", given by "SenML CBOR payloads";
    /// Not a valid protobuf message: a `ReadingBatch` without quantity or value, a truncated
    /// message, wrong wire types (also a ChirpStack event from a protobuf marshaler).
    MALFORMED_PROTOBUF = "malformed_protobuf", given by "protobuf payloads; LoRaWAN (ChirpStack protobuf events)";
    /// NaN or an infinity where a number was expected (JSON `NaN`, `Infinity`, `1e999`).
    NON_FINITE_VALUE = "non_finite_value", given by "every payload format";
    /// A timestamp of the wrong type, unparseable, negative or beyond year 9999.
    BAD_TIMESTAMP = "bad_timestamp", given by "every payload format";
    /// A position with only one of lat/lon, a non-number, or coordinates out of range.
    BAD_LOCATION = "bad_location", given by "every payload format";
    /// A value the schema cannot hold: null, a nested array or object, a bad `seq`.
    UNSUPPORTED_VALUE = "unsupported_value", given by "JSON, SenML";
    /// A valid document carrying no value at all.
    NO_READINGS = "no_readings", given by "every payload format";
    /// A Cayenne LPP frame with an unknown type or a value cut short.
    MALFORMED_LPP = "malformed_lpp", given by "Cayenne LPP payloads";
    /// Larger than the listener's limit (`mqtt.max_payload_bytes`, `coap.max_payload_bytes`; a
    /// LoRaWAN event above 64 KiB).
    PAYLOAD_TOO_LARGE = "payload_too_large", given by "MQTT, CoAP, LoRaWAN";
    /// The topic suffix, CoAP path or Content-Format names no format the gateway decodes.
    UNKNOWN_FORMAT = "unknown_format", given by "MQTT, CoAP";
    /// Published on another device's topic (its telemetry or any other of its topics); the
    /// payload is not kept.
    SPOOFED_TOPIC = "spoofed_topic", given by "MQTT";
    /// Published on a topic that is not `devices/{id}/telemetry[/{format}]` or a command result
    /// of the device's own; the payload is kept.
    BAD_TOPIC = "bad_topic", given by "MQTT";
    /// A PUBLISH topic name that is empty or holds a wildcard (`+`, `#`) or U+0000: a protocol
    /// violation, so the connection is closed; the payload is not kept.
    INVALID_TOPIC = "invalid_topic", given by "MQTT";
    /// A topic alias, which the gateway never offers (its Topic Alias Maximum is 0): a protocol
    /// violation, so the connection is closed.
    TOPIC_ALIAS = "topic_alias", given by "MQTT 5";
    /// A CoAPS session posted to another device's path; the payload is not kept.
    SPOOFED_PATH = "spoofed_path", given by "CoAPS";
    /// LwM2M resource values that cannot be decoded (TLV, text, SenML) for their object path.
    MALFORMED_LWM2M = "malformed_lwm2m", given by "LwM2M";
    /// Not a valid network-server event: not JSON, wrong types, a missing or non-hex DevEUI, or an
    /// event that names another device than its topic.
    MALFORMED_EVENT = "malformed_event", given by "LoRaWAN";
    /// An uplink's `data` / `frm_payload` is not base64.
    BAD_BASE64 = "bad_base64", given by "LoRaWAN";
    /// No device is registered with the event's DevEUI (or TTS device id); filed under the DevEUI.
    UNKNOWN_DEVICE = "unknown_device", given by "LoRaWAN";
    /// The event's device is disabled.
    DISABLED_DEVICE = "disabled_device", given by "LoRaWAN";
    /// The event's device belongs to another tenant than the network server's `tenant`.
    TENANT_MISMATCH = "tenant_mismatch", given by "LoRaWAN";
    /// A stored reading a time-series store refused (400, 413, 422): the store's message is in the
    /// detail, the reading itself is the payload.
    SINK_REJECTED = "sink_rejected", given by "forwarding (sinks)";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_unique_and_explained() {
        let mut seen = std::collections::HashSet::new();
        for d in ALL {
            let code = d.reason.as_str();
            assert!(
                code.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{code}"
            );
            assert!(seen.insert(code), "{code} listed twice");
            assert!(d.meaning.len() > 20 && !d.given_by.is_empty(), "{code}");
        }
    }
}
