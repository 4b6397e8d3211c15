//! What a network server's event becomes, whatever its format: the bridge's own model, filled by
//! [`super::chirpstack`] and [`super::tts`], turned into readings here.

use crate::codec::{self, DecodeError, Decoded, Format};
use crate::pipeline::Rejection;
use crate::proto::reading::Value;
use crate::proto::Location;
use crate::reason;
use crate::registry::{DeviceEntry, CODEC_RAW};

/// Who an event is about, as the network server names it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceRef {
    /// Normalised DevEUI (16 lower-case hex digits), "" when the event has none.
    pub dev_eui: String,
    /// The network server's own device id (TTS `device_id`), "" when none.
    pub device_id: String,
    /// The application the topic names (ChirpStack's application id, TTS `{app}@{tenant}`):
    /// where a downlink to this device is published.
    pub application: String,
}

impl DeviceRef {
    /// The identity shown in dead letters of unknown devices.
    pub fn claimed(&self) -> &str {
        if self.dev_eui.is_empty() {
            &self.device_id
        } else {
            &self.dev_eui
        }
    }
}

/// Radio metadata of one uplink, best values over the receiving gateways.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Radio {
    pub rssi: Option<f64>,
    pub snr: Option<f64>,
    pub spreading_factor: Option<u32>,
    pub data_rate: Option<u32>,
    pub frequency: Option<u64>,
    pub gateways: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    pub f_cnt: u32,
    pub f_port: u32,
    /// The raw FRMPayload.
    pub data: Vec<u8>,
    /// The network server's decoding of the payload (ChirpStack `object`, TTS `decoded_payload`).
    pub object: Option<serde_json::Map<String, serde_json::Value>>,
    pub radio: Radio,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Up(Uplink),
    Join {
        dev_addr: String,
    },
    /// A DevStatusAns: battery (None when the device cannot tell), demodulation margin in dB.
    Status {
        battery: Option<f64>,
        margin: i32,
        external_power: bool,
    },
    /// A warning or error the network server logged for the device.
    Error {
        code: String,
        description: String,
    },
}

/// One event worth recording.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub device: DeviceRef,
    /// The network server's time of the event, Unix ms; `None` when it sent none.
    pub time_ms: Option<i64>,
    pub kind: Kind,
}

/// What a message on the network server's broker turned out to be.
#[derive(Debug)]
pub enum Parsed {
    Event(Event),
    /// What the network server reports about a downlink (a command) it was given.
    Downlink(DownlinkEvent),
    /// A kind of event the bridge does not record (locations, ...): counted and skipped.
    Ignored(&'static str),
}

/// A network server's report on a downlink, matched to a command by the id the gateway gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct DownlinkEvent {
    pub device: DeviceRef,
    /// The command id: ChirpStack's `queueItemId`, or the `citygw:cmd:{id}` correlation id of
    /// TTS; `None` when the event names none of ours (a downlink someone else enqueued).
    pub command_id: Option<String>,
    pub kind: DownlinkKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DownlinkKind {
    /// TTS `down/queued`: in the network server's queue (the command is SENT already).
    Queued,
    /// Transmitted by a gateway: ChirpStack `txack`, TTS `down/sent`.
    Transmitted,
    /// The device acknowledged a confirmed downlink: ChirpStack `ack` with `acknowledged`,
    /// TTS `down/ack`.
    Acknowledged,
    /// Not acknowledged: ChirpStack `ack` without `acknowledged`, TTS `down/nack`.
    NotAcknowledged,
    /// The network server gave up on it (TTS `down/failed`), with its reason.
    Failed(String),
}

impl DownlinkKind {
    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            DownlinkKind::Queued => "queued",
            DownlinkKind::Transmitted => "transmitted",
            DownlinkKind::Acknowledged => "ack",
            DownlinkKind::NotAcknowledged => "nack",
            DownlinkKind::Failed(_) => "failed",
        }
    }
}

/// Refusal of a message, with whatever identity could still be read from it.
#[derive(Debug)]
pub struct Malformed {
    pub device: DeviceRef,
    pub rejection: Rejection,
}

impl Kind {
    /// The metrics label of the event type.
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Up(_) => "up",
            Kind::Join { .. } => "join",
            Kind::Status { .. } => "status",
            Kind::Error { .. } => "error",
        }
    }

    /// The reading that marks this event as stored, and its sequence number: the pair the
    /// de-duplication looks for in the store after a restart.
    pub fn marker(&self) -> (&'static str, Option<u64>) {
        match self {
            Kind::Up(u) => (FRAME_COUNTER, Some(u64::from(u.f_cnt))),
            Kind::Join { .. } => (JOIN, None),
            Kind::Status { .. } => (LINK_MARGIN, None),
            Kind::Error { .. } => (ERROR, None),
        }
    }
}

pub const FRAME_COUNTER: &str = "frame_counter";
const JOIN: &str = "lorawan_join";
const LINK_MARGIN: &str = "link_margin";
const ERROR: &str = "lorawan_error";

/// The readings of an event for `device`. Every reading carries the event's time (so a
/// redelivered event maps to the same store keys) and, for uplinks, the frame counter as its
/// sequence number. `Err` holds the rejection and the bytes it is about (the raw payload).
pub fn readings(
    device: &DeviceEntry,
    event: &Event,
    now_ms: i64,
) -> Result<Vec<Decoded>, (Rejection, Vec<u8>)> {
    let mut out = match &event.kind {
        Kind::Up(up) => payload_values(device.codec(), up, now_ms).map_err(|e| {
            (
                Rejection::new(e.reason, format!("f_port {}: {}", up.f_port, e.detail)),
                up.data.clone(),
            )
        })?,
        _ => Vec::new(),
    };
    let mut push = |quantity: &str, value: Value, unit: &str| {
        // A network server's NaN (a protobuf float says nothing else) is no measurement: left out.
        if matches!(value, Value::Number(n) if !n.is_finite()) {
            return;
        }
        out.push(Decoded {
            quantity: quantity.to_string(),
            value,
            unit: unit.to_string(),
            time_ms: None,
            seq: None,
            location: None,
        })
    };
    match &event.kind {
        Kind::Up(up) => {
            let mut push =
                |quantity: &str, value: f64, unit: &str| push(quantity, Value::Number(value), unit);
            let r = &up.radio;
            push(FRAME_COUNTER, f64::from(up.f_cnt), "");
            if let Some(v) = r.rssi {
                push("rssi", v, "dBm");
            }
            if let Some(v) = r.snr {
                push("snr", v, "dB");
            }
            if let Some(v) = r.spreading_factor {
                push("spreading_factor", f64::from(v), "");
            }
            if let Some(v) = r.data_rate {
                push("data_rate", f64::from(v), "");
            }
            if let Some(v) = r.frequency {
                push("radio_frequency", v as f64, "Hz");
            }
            push("gateway_count", r.gateways as f64, "count");
        }
        Kind::Join { dev_addr } => push(JOIN, Value::Text(dev_addr.clone()), ""),
        Kind::Status {
            battery,
            margin,
            external_power,
        } => {
            push(LINK_MARGIN, Value::Number(f64::from(*margin)), "dB");
            push("external_power", Value::Boolean(*external_power), "");
            if let Some(b) = battery {
                push("battery", Value::Number(*b), "%EL");
            }
        }
        Kind::Error { code, description } => {
            push(ERROR, Value::Text(format!("{code}: {description}")), "")
        }
    }
    let (_, seq) = event.kind.marker();
    // The payload's own position wins; the rest of the uplink shares it.
    let location = out.iter().find_map(|d| d.location);
    for d in &mut out {
        d.time_ms = Some(event.time_ms.unwrap_or(now_ms));
        d.seq = seq;
        d.location = d.location.or(location);
    }
    Ok(out)
}

/// The application payload's values: the network server's decoding unless the device names a
/// codec of its own, else the raw bytes.
fn payload_values(codec: &str, up: &Uplink, now_ms: i64) -> Result<Vec<Decoded>, DecodeError> {
    if codec.is_empty() {
        if let Some(object) = &up.object {
            return object_values(object);
        }
    }
    if up.data.is_empty() {
        // A MAC-only uplink (f_port 0, or an empty frame): radio metadata only.
        return Ok(Vec::new());
    }
    match Format::from_name(codec) {
        Some(format) if codec != CODEC_RAW => codec::decoder(format).decode(&up.data, now_ms),
        _ => Ok(vec![Decoded {
            quantity: "payload".into(),
            value: Value::Text(hex::encode(&up.data)),
            unit: String::new(),
            time_ms: None,
            seq: None,
            location: None,
        }]),
    }
}

/// A network server's decoded object as readings: scalars by key, nested objects flattened with
/// `_` (`{"soil": {"moisture": 31}}` -> `soil_moisture`). An object holding `latitude` and
/// `longitude` (or `lat`/`lon`) is a position: it becomes the readings' location.
fn object_values(
    object: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<Decoded>, DecodeError> {
    let mut out = Vec::new();
    let mut location = None;
    flatten("", object, &mut out, &mut location)?;
    for d in &mut out {
        d.location = location;
    }
    Ok(out)
}

fn position(
    o: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<Location>, DecodeError> {
    let num = |k: &str| o.get(k).and_then(serde_json::Value::as_f64);
    let lat = num("latitude").or_else(|| num("lat"));
    let lon = num("longitude")
        .or_else(|| num("lon"))
        .or_else(|| num("lng"));
    if lat.is_none() || lon.is_none() {
        return Ok(None);
    }
    let alt = num("altitude").or_else(|| num("alt"));
    codec::location(lat, lon, alt)
}

fn flatten(
    prefix: &str,
    o: &serde_json::Map<String, serde_json::Value>,
    out: &mut Vec<Decoded>,
    location: &mut Option<Location>,
) -> Result<(), DecodeError> {
    if let Some(p) = position(o)? {
        *location = Some(p);
        return Ok(());
    }
    for (k, v) in o {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}_{k}")
        };
        let value = match v {
            serde_json::Value::Number(n) => Value::Number(n.as_f64().ok_or_else(|| {
                DecodeError::new(reason::NON_FINITE_VALUE, format!("{name}: {n}"))
            })?),
            serde_json::Value::Bool(b) => Value::Boolean(*b),
            serde_json::Value::String(s) => Value::Text(s.clone()),
            serde_json::Value::Object(inner) => {
                flatten(&name, inner, out, location)?;
                continue;
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let mut wrapped = serde_json::Map::new();
                    wrapped.insert(i.to_string(), item.clone());
                    flatten(&name, &wrapped, out, location)?;
                }
                continue;
            }
            // A codec's "no value" is not a reading.
            serde_json::Value::Null => continue,
        };
        out.push(Decoded {
            quantity: name,
            value,
            unit: String::new(),
            time_ms: None,
            seq: None,
            location: None,
        });
    }
    Ok(())
}

/// Unix ms of an RFC 3339 time as network servers write it (nanosecond fractions, `Z` or an
/// offset).
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Base64 of protobuf JSON and of TTS: standard or URL-safe alphabet, padded or not.
pub fn base64(field: &str, s: &str) -> Result<Vec<u8>, Rejection> {
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    use base64::Engine as _;
    const CONFIG: general_purpose::GeneralPurposeConfig =
        general_purpose::GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CONFIG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CONFIG);
    STANDARD
        .decode(s)
        .or_else(|_| URL_SAFE.decode(s))
        .map_err(|e| Rejection::new(reason::BAD_BASE64, format!("{field}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_objects_flatten_and_give_the_position() {
        let o: serde_json::Value = serde_json::json!({
            "temperature": 21.5,
            "valve": {"open": true, "state": "ok"},
            "gps": {"latitude": 21.03, "longitude": 105.85, "altitude": 12},
            "levels": [1, 2],
            "none": null
        });
        let d = object_values(o.as_object().unwrap()).unwrap();
        let names: Vec<_> = d.iter().map(|d| d.quantity.as_str()).collect();
        assert_eq!(
            names,
            [
                "levels_0",
                "levels_1",
                "temperature",
                "valve_open",
                "valve_state"
            ]
        );
        let loc = d[0].location.unwrap();
        assert_eq!((loc.lat, loc.lon, loc.alt_m), (21.03, 105.85, Some(12.0)));
        let bad = serde_json::json!({"gps": {"latitude": 91, "longitude": 0}});
        assert_eq!(
            object_values(bad.as_object().unwrap()).unwrap_err().reason,
            reason::BAD_LOCATION
        );
    }

    #[test]
    fn base64_alphabets() {
        assert_eq!(base64("d", "AQID").unwrap(), [1, 2, 3]);
        assert_eq!(base64("d", "-_8").unwrap(), [0xfb, 0xff]);
        assert_eq!(base64("d", "+/8=").unwrap(), [0xfb, 0xff]);
        assert_eq!(base64("d", "@@@").unwrap_err().reason, reason::BAD_BASE64);
    }

    #[test]
    fn times() {
        assert_eq!(
            rfc3339_ms("2020-02-12T15:15:49.126101008Z"),
            Some(1_581_520_549_126)
        );
        assert_eq!(
            rfc3339_ms("2022-07-18T09:34:15.775023242+00:00"),
            Some(1_658_136_855_775)
        );
        assert_eq!(rfc3339_ms("yesterday"), None);
    }
}
