//! Payload decoders: bytes from a device become [`Decoded`] values.
//!
//! Every way in (MQTT, CoAP, LoRaWAN bridges) carries the same few payload formats, so the
//! decoders live here, behind one [`Decoder`] trait, and the sources only have to work out which
//! [`Format`] a payload is in (topic suffix, MQTT 5 content type or CoAP Content-Format).
//!
//! Decoders know nothing of identity: which device sent a payload comes from the authenticated
//! session, never from the payload, so a device cannot publish as another by writing a different
//! name into its JSON. Decoders also do not rename quantities; that is
//! [`crate::pipeline::normalise`], so every format shares one quantity table.
//!
//! A payload is accepted or refused as a whole. A refusal carries a stable [`DecodeError::reason`]
//! (see [`crate::reason`]) that becomes a metrics label and the dead-letter reason, so an operator
//! can see why a device's data is missing without reading gateway logs.

pub mod cayenne_lpp;
pub mod json;
pub mod protobuf;
pub mod senml;

use crate::proto::reading::Value;
use crate::proto::Location;
use crate::reason::{self, Reason};

/// Payload formats a device can send.
///
/// One variant per [`Decoder`] implementation; adding a format means adding a variant, a file and a
/// line in [`decoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// The gateway's own flat JSON, see [`json`].
    Json,
    /// SenML in JSON (RFC 8428, `application/senml+json`).
    SenmlJson,
    /// SenML in CBOR (RFC 8428, `application/senml+cbor`), the compact choice for NB-IoT.
    SenmlCbor,
    /// A protobuf `citygw.v1.ReadingBatch`, for devices and bridges that already speak the schema.
    Proto,
    /// Cayenne LPP, the binary format of off-the-shelf LoRaWAN sensors, see [`cayenne_lpp`].
    Lpp,
}

impl Format {
    /// Every format, for listings and tests.
    pub const ALL: [Format; 5] = [
        Format::Json,
        Format::SenmlJson,
        Format::SenmlCbor,
        Format::Proto,
        Format::Lpp,
    ];

    /// From an MQTT topic suffix.
    ///
    /// Accepts the canonical names ("json", "senml+json", "senml+cbor", "proto") and the spellings
    /// device firmware commonly uses instead, because '+' is a wildcard character in MQTT topic
    /// filters and some firmware refuses it in topic names: "senml-json", "senml-cbor", "pb",
    /// "protobuf". ASCII case is ignored.
    pub fn from_name(s: &str) -> Option<Format> {
        const NAMES: &[(&str, Format)] = &[
            ("json", Format::Json),
            ("senml+json", Format::SenmlJson),
            ("senml-json", Format::SenmlJson),
            ("senml+cbor", Format::SenmlCbor),
            ("senml-cbor", Format::SenmlCbor),
            ("proto", Format::Proto),
            ("pb", Format::Proto),
            ("protobuf", Format::Proto),
            ("lpp", Format::Lpp),
            ("cayenne", Format::Lpp),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s))
            .map(|&(_, f)| f)
    }

    /// From a MIME content type (the MQTT 5 content-type property, an HTTP Content-Type).
    ///
    /// Parameters such as `;charset=utf-8` are ignored and the comparison is case-insensitive,
    /// as RFC 2045 says media types are.
    pub fn from_content_type(s: &str) -> Option<Format> {
        const TYPES: &[(&str, Format)] = &[
            ("application/json", Format::Json),
            ("application/senml+json", Format::SenmlJson),
            ("application/senml+cbor", Format::SenmlCbor),
            ("application/x-protobuf", Format::Proto),
            ("application/protobuf", Format::Proto),
        ];
        let essence = s.split(';').next().unwrap_or("").trim();
        TYPES
            .iter()
            .find(|(t, _)| t.eq_ignore_ascii_case(essence))
            .map(|&(_, f)| f)
    }

    /// From a CoAP Content-Format number (IANA "CoAP Content-Formats" registry).
    ///
    /// Protobuf has no registered number, so CoAP devices use JSON or SenML.
    pub fn from_coap_content_format(n: u16) -> Option<Format> {
        match n {
            50 => Some(Format::Json),
            110 => Some(Format::SenmlJson),
            112 => Some(Format::SenmlCbor),
            _ => None,
        }
    }

    /// The canonical name, as used in topic suffixes, metrics labels and the book.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::SenmlJson => "senml+json",
            Format::SenmlCbor => "senml+cbor",
            Format::Proto => "proto",
            Format::Lpp => "lpp",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One decoded value, before identity and normalisation are applied.
///
/// Deliberately smaller than `proto::Reading`: a payload can only vouch for what it measured and
/// when; device id, tenant, commune and receive time come from the session and the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The quantity name as the device sent it (aliases are resolved later, by normalise).
    pub quantity: String,
    pub value: Value,
    /// Unit as sent, "" when none (normalise then supplies the canonical default).
    pub unit: String,
    /// Device timestamp, Unix ms. `None` when the payload has none, so the pipeline can tell
    /// "device said when" from "we stamped it on arrival".
    pub time_ms: Option<i64>,
    /// The device's own message sequence number, for gap and duplicate detection downstream.
    pub seq: Option<u64>,
    pub location: Option<Location>,
}

/// Why a payload was refused.
///
/// `reason` is a stable code from [`crate::reason`] because it is used as a metrics label and a
/// dead-letter reason: dashboards and alerts key on it, so it must never carry free text. The
/// human-readable specifics go in `detail`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct DecodeError {
    pub reason: Reason,
    pub detail: String,
}

impl DecodeError {
    pub fn new(reason: Reason, detail: impl Into<String>) -> DecodeError {
        DecodeError {
            reason,
            detail: detail.into(),
        }
    }
}

/// One trait per seam: every payload format implements it.
///
/// `now_ms` is the receive time, passed in rather than read from the clock so decoding is
/// deterministic and testable; it is used only to resolve SenML relative times.
pub trait Decoder: Send + Sync {
    fn decode(&self, payload: &[u8], now_ms: i64) -> Result<Vec<Decoded>, DecodeError>;
}

/// The decoder for a format. Decoders are stateless, so one static instance serves every thread.
pub fn decoder(format: Format) -> &'static dyn Decoder {
    static JSON: json::JsonDecoder = json::JsonDecoder;
    static SENML_JSON: senml::SenmlJsonDecoder = senml::SenmlJsonDecoder;
    static SENML_CBOR: senml::SenmlCborDecoder = senml::SenmlCborDecoder;
    static PROTO: protobuf::ProtoDecoder = protobuf::ProtoDecoder;
    static LPP: cayenne_lpp::LppDecoder = cayenne_lpp::LppDecoder;
    match format {
        Format::Json => &JSON,
        Format::SenmlJson => &SENML_JSON,
        Format::SenmlCbor => &SENML_CBOR,
        Format::Proto => &PROTO,
        Format::Lpp => &LPP,
    }
}

// ---- helpers shared by the decoders ----

/// Latest accepted timestamp: 9999-12-31T23:59:59.999Z. Beyond it a value is a unit mistake
/// (microseconds, nanoseconds), not a date, and chrono and most TSDBs cannot represent it.
pub(crate) const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Checks a millisecond timestamp computed as f64 and converts it, rounding to the nearest ms.
pub(crate) fn time_ms_from_f64(ms: f64, what: &str) -> Result<i64, DecodeError> {
    let ms = ms.round();
    if !ms.is_finite() || !(0.0..=MAX_TIME_MS as f64).contains(&ms) {
        return Err(DecodeError::new(
            reason::BAD_TIMESTAMP,
            format!("{what} {ms} is outside 1970..=9999 (Unix ms)"),
        ));
    }
    Ok(ms as i64)
}

/// Builds a location, refusing the half-positions and out-of-range values that would put a sensor
/// in the wrong place on the map.
pub(crate) fn location(
    lat: Option<f64>,
    lon: Option<f64>,
    alt: Option<f64>,
) -> Result<Option<Location>, DecodeError> {
    let bad = |d: String| Err(DecodeError::new(reason::BAD_LOCATION, d));
    match (lat, lon) {
        (None, None) if alt.is_none() => Ok(None),
        (Some(lat), Some(lon)) => {
            if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
                return bad(format!("lat {lat} is not within -90..=90"));
            }
            if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
                return bad(format!("lon {lon} is not within -180..=180"));
            }
            if let Some(a) = alt {
                if !a.is_finite() {
                    return bad(format!("alt {a} is not finite"));
                }
            }
            Ok(Some(Location {
                lat,
                lon,
                alt_m: alt,
            }))
        }
        _ => bad("lat and lon must both be present".to_string()),
    }
}

/// Text formats: a payload of only whitespace is as empty as no payload. A UTF-8 byte order mark,
/// which some firmware writes, is dropped so it does not make the JSON unparseable.
pub(crate) fn trim_text_payload(payload: &[u8]) -> Result<&[u8], DecodeError> {
    let p = payload.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(payload);
    if p.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::new(reason::EMPTY_PAYLOAD, "payload is empty"));
    }
    Ok(p)
}

/// Turns a serde_json failure into the right reason.
///
/// JSON cannot express NaN or infinities, so serde_json reports `NaN`, `Infinity` and `1e999` as
/// syntax errors; devices do send them (a failed sensor read printed with `%f`), and an operator
/// needs to see "the sensor sent NaN", not "the firmware writes bad JSON". This runs only on the
/// error path, so its cost does not matter.
pub(crate) fn json_syntax_error(text: &[u8], err: serde_json::Error) -> DecodeError {
    if let Some(token) = find_non_finite_token(text) {
        return DecodeError::new(
            reason::NON_FINITE_VALUE,
            format!("non-finite number {token}"),
        );
    }
    DecodeError::new(reason::MALFORMED_JSON, err.to_string())
}

/// Scans JSON-ish text outside string literals for NaN/Infinity words or numbers that overflow f64.
fn find_non_finite_token(text: &[u8]) -> Option<String> {
    let mut i = 0;
    while i < text.len() {
        let c = text[i];
        if c == b'"' {
            // Skip the string literal, honouring backslash escapes.
            i += 1;
            while i < text.len() && text[i] != b'"' {
                i += if text[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_alphabetic()
            || c == b'-'
            || c == b'+'
            || c.is_ascii_digit()
            || c == b'.'
        {
            let start = i;
            while i < text.len()
                && (text[i].is_ascii_alphanumeric() || matches!(text[i], b'-' | b'+' | b'.'))
            {
                i += 1;
            }
            let token = String::from_utf8_lossy(&text[start..i]);
            let word = token.trim_start_matches(['-', '+']);
            let non_finite = word.eq_ignore_ascii_case("nan")
                || word.eq_ignore_ascii_case("infinity")
                || word.eq_ignore_ascii_case("inf")
                || (word.starts_with(|c: char| c.is_ascii_digit() || c == '.')
                    && token.parse::<f64>().is_ok_and(f64::is_infinite));
            if non_finite {
                return Some(token.into_owned());
            }
        } else {
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_from_name() {
        assert_eq!(Format::from_name("json"), Some(Format::Json));
        assert_eq!(Format::from_name("senml+json"), Some(Format::SenmlJson));
        assert_eq!(Format::from_name("senml-json"), Some(Format::SenmlJson));
        assert_eq!(Format::from_name("senml+cbor"), Some(Format::SenmlCbor));
        assert_eq!(Format::from_name("senml-cbor"), Some(Format::SenmlCbor));
        assert_eq!(Format::from_name("proto"), Some(Format::Proto));
        assert_eq!(Format::from_name("pb"), Some(Format::Proto));
        assert_eq!(Format::from_name("protobuf"), Some(Format::Proto));
        assert_eq!(Format::from_name("JSON"), Some(Format::Json));
        assert_eq!(Format::from_name("xml"), None);
        assert_eq!(Format::from_name(""), None);
        for f in Format::ALL {
            assert_eq!(Format::from_name(f.name()), Some(f));
            assert_eq!(f.to_string(), f.name());
        }
    }

    #[test]
    fn format_from_content_type() {
        assert_eq!(
            Format::from_content_type("application/json"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type("application/json; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type("Application/JSON;charset=UTF-8"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type(" application/senml+json "),
            Some(Format::SenmlJson)
        );
        assert_eq!(
            Format::from_content_type("application/senml+cbor"),
            Some(Format::SenmlCbor)
        );
        assert_eq!(
            Format::from_content_type("application/x-protobuf"),
            Some(Format::Proto)
        );
        assert_eq!(
            Format::from_content_type("application/protobuf"),
            Some(Format::Proto)
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
        assert_eq!(Format::from_content_type(""), None);
    }

    #[test]
    fn format_from_coap() {
        assert_eq!(Format::from_coap_content_format(50), Some(Format::Json));
        assert_eq!(
            Format::from_coap_content_format(110),
            Some(Format::SenmlJson)
        );
        assert_eq!(
            Format::from_coap_content_format(112),
            Some(Format::SenmlCbor)
        );
        assert_eq!(Format::from_coap_content_format(0), None);
        assert_eq!(Format::from_coap_content_format(60), None);
    }

    #[test]
    fn decoder_dispatch_and_empty_payload() {
        for f in Format::ALL {
            let err = decoder(f).decode(b"", 0).unwrap_err();
            assert_eq!(err.reason, reason::EMPTY_PAYLOAD, "{f}");
        }
        let ok = decoder(Format::Json)
            .decode(br#"{"temperature":1}"#, 0)
            .unwrap();
        assert_eq!(ok.len(), 1);
    }

    #[test]
    fn error_display() {
        let e = DecodeError::new(reason::BAD_TIMESTAMP, "ts is a bool");
        assert_eq!(e.to_string(), "bad_timestamp: ts is a bool");
    }

    #[test]
    fn non_finite_scan() {
        assert_eq!(
            find_non_finite_token(br#"{"a":NaN}"#).as_deref(),
            Some("NaN")
        );
        assert_eq!(
            find_non_finite_token(br#"{"a":-Infinity}"#).as_deref(),
            Some("-Infinity")
        );
        assert_eq!(
            find_non_finite_token(br#"{"a":1e999}"#).as_deref(),
            Some("1e999")
        );
        assert_eq!(
            find_non_finite_token(br#"{"a":-1E400}"#).as_deref(),
            Some("-1E400")
        );
        assert_eq!(find_non_finite_token(br#"{"NaN":"Infinity \" NaN"}"#), None);
        assert_eq!(
            find_non_finite_token(br#"{"a":1e308,"b":true,"c":null}"#),
            None
        );
    }

    #[test]
    fn location_rules() {
        assert_eq!(location(None, None, None), Ok(None));
        let l = location(Some(21.0), Some(105.8), Some(12.0))
            .unwrap()
            .unwrap();
        assert_eq!((l.lat, l.lon, l.alt_m), (21.0, 105.8, Some(12.0)));
        for (lat, lon, alt) in [
            (Some(21.0), None, None),
            (None, Some(105.0), None),
            (None, None, Some(1.0)),
            (Some(91.0), Some(0.0), None),
            (Some(0.0), Some(-181.0), None),
            (Some(f64::NAN), Some(0.0), None),
            (Some(0.0), Some(0.0), Some(f64::INFINITY)),
        ] {
            assert_eq!(
                location(lat, lon, alt).unwrap_err().reason,
                reason::BAD_LOCATION
            );
        }
    }

    #[test]
    fn time_bounds() {
        assert_eq!(time_ms_from_f64(1.4, "t"), Ok(1));
        assert_eq!(
            time_ms_from_f64(-1.0, "t").unwrap_err().reason,
            reason::BAD_TIMESTAMP
        );
        assert_eq!(
            time_ms_from_f64(f64::NAN, "t").unwrap_err().reason,
            reason::BAD_TIMESTAMP
        );
        assert_eq!(
            time_ms_from_f64(MAX_TIME_MS as f64 + 10.0, "t")
                .unwrap_err()
                .reason,
            reason::BAD_TIMESTAMP
        );
    }
}
