//! ChirpStack v4 MQTT integration events.
//!
//! Topic `application/{application_id}/device/{dev_eui}/event/{type}`; the body is the
//! integration's `UplinkEvent`, `JoinEvent`, `StatusEvent` or `LogEvent`, marshaled either as
//! binary protobuf or with protobuf's JSON mapping (lowerCamelCase names; the original snake_case
//! names are accepted too, as every protobuf JSON parser does). Field names are those of
//! ChirpStack's published integration.proto (see proto/chirpstack).
//!
//! The downlink reports, `TxAckEvent` (`txack`: a gateway transmitted it) and `AckEvent` (`ack`:
//! the device acknowledged a confirmed downlink, or did not), carry the `queueItemId` the
//! gateway gave the downlink (its command id); they become [`Parsed::Downlink`] for the command
//! transport (control/commands/transport/lorawan.rs).

use prost::Message as _;
use serde::Deserialize;

use super::config::Marshaler;
use super::event::{
    base64, rfc3339_ms, DeviceRef, DownlinkEvent, DownlinkKind, Event, Kind, Malformed, Parsed,
    Radio, Uplink,
};
use crate::pipeline::Rejection;
use crate::reason;
use crate::registry::normalise_dev_eui;

/// ChirpStack's schema, generated from proto/chirpstack at build time.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod common {
        include!(concat!(env!("OUT_DIR"), "/common.rs"));
    }
    pub mod gw {
        include!(concat!(env!("OUT_DIR"), "/gw.rs"));
    }
    pub mod integration {
        include!(concat!(env!("OUT_DIR"), "/integration.rs"));
    }
}

use pb::integration as ipb;

/// Default subscription: every event of every application.
pub const DEFAULT_TOPIC: &str = "application/+/device/+/event/+";

/// Reads one message of a ChirpStack broker.
pub fn parse(topic: &str, payload: &[u8], marshaler: Marshaler) -> Result<Parsed, Malformed> {
    let levels: Vec<&str> = topic.split('/').collect();
    let (application, topic_eui, event) = match levels.as_slice() {
        ["application", app, "device", eui, "event", event] => (*app, *eui, *event),
        _ => return Ok(Parsed::Ignored("unknown")),
    };
    let device = DeviceRef {
        dev_eui: normalise_dev_eui(topic_eui).unwrap_or_default(),
        device_id: String::new(),
        application: application.to_string(),
    };
    let json = match marshaler {
        Marshaler::Json => true,
        Marshaler::Protobuf => false,
        Marshaler::Auto => payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
    };
    let fail = |rejection: Rejection| Malformed {
        device: device.clone(),
        rejection,
    };
    let parsed = match event {
        "up" | "join" | "status" | "log" if json => from_json(event, payload),
        "up" | "join" | "status" | "log" => from_protobuf(event, payload),
        "ack" | "txack" => {
            return downlink(event, payload, json, &device)
                .map(Parsed::Downlink)
                .map_err(fail)
        }
        "location" => return Ok(Parsed::Ignored("location")),
        "integration" => return Ok(Parsed::Ignored("integration")),
        _ => return Ok(Parsed::Ignored("unknown")),
    }
    .map_err(fail)?;
    let Some((event_eui, time_ms, kind)) = parsed else {
        return Ok(Parsed::Ignored("log_info"));
    };
    let dev_eui = normalise_dev_eui(&event_eui).ok_or_else(|| {
        fail(Rejection::new(
            reason::MALFORMED_EVENT,
            format!("deviceInfo.devEui {event_eui:?} is not 16 hex digits"),
        ))
    })?;
    if !device.dev_eui.is_empty() && device.dev_eui != dev_eui {
        return Err(fail(Rejection::new(
            reason::MALFORMED_EVENT,
            format!("topic names DevEUI {topic_eui}, the event {dev_eui}"),
        )));
    }
    Ok(Parsed::Event(Event {
        device: DeviceRef { dev_eui, ..device },
        time_ms,
        kind,
    }))
}

/// A `txack` or `ack` event: which downlink (our command id) and what became of it.
fn downlink(
    event: &str,
    payload: &[u8],
    json: bool,
    device: &DeviceRef,
) -> Result<DownlinkEvent, Rejection> {
    let (eui, queue_item_id, acknowledged) = if json {
        #[derive(Deserialize, Default)]
        #[serde(default, rename_all = "camelCase")]
        struct Report {
            #[serde(alias = "device_info")]
            device_info: Option<JsonDeviceInfo>,
            #[serde(alias = "queue_item_id")]
            queue_item_id: String,
            acknowledged: bool,
        }
        let e: Report = serde_json::from_slice(payload)
            .map_err(|e| Rejection::new(reason::MALFORMED_EVENT, e.to_string()))?;
        let eui = e.device_info.map(|d| d.dev_eui).unwrap_or_default();
        (eui, e.queue_item_id, e.acknowledged)
    } else if event == "txack" {
        let e = ipb::TxAckEvent::decode(payload).map_err(malformed_protobuf)?;
        (eui_of(&e.device_info), e.queue_item_id, false)
    } else {
        let e = ipb::AckEvent::decode(payload).map_err(malformed_protobuf)?;
        (eui_of(&e.device_info), e.queue_item_id, e.acknowledged)
    };
    // The event's own DevEUI must agree with the topic's, as for uplinks.
    if !eui.is_empty() {
        let dev_eui = normalise_dev_eui(&eui).ok_or_else(|| {
            Rejection::new(
                reason::MALFORMED_EVENT,
                format!("deviceInfo.devEui {eui:?} is not 16 hex digits"),
            )
        })?;
        if dev_eui != device.dev_eui {
            return Err(Rejection::new(
                reason::MALFORMED_EVENT,
                format!(
                    "topic names DevEUI {:?}, the event {dev_eui}",
                    device.dev_eui
                ),
            ));
        }
    }
    let kind = match (event, acknowledged) {
        ("txack", _) => DownlinkKind::Transmitted,
        (_, true) => DownlinkKind::Acknowledged,
        (_, false) => DownlinkKind::NotAcknowledged,
    };
    Ok(DownlinkEvent {
        device: device.clone(),
        command_id: (!queue_item_id.is_empty()).then_some(queue_item_id),
        kind,
    })
}

/// (DevEUI as sent, time, kind), or `None` for a log event below warning level.
type Fields = Option<(String, Option<i64>, Kind)>;

fn malformed_protobuf(e: prost::DecodeError) -> Rejection {
    Rejection::new(reason::MALFORMED_PROTOBUF, e.to_string())
}

fn ts_ms(t: &Option<prost_types::Timestamp>) -> Option<i64> {
    t.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn eui_of(info: &Option<ipb::DeviceInfo>) -> String {
    info.as_ref().map(|i| i.dev_eui.clone()).unwrap_or_default()
}

fn from_protobuf(event: &str, payload: &[u8]) -> Result<Fields, Rejection> {
    Ok(Some(match event {
        "up" => {
            let e = ipb::UplinkEvent::decode(payload).map_err(malformed_protobuf)?;
            let mut radio = Radio {
                data_rate: Some(e.dr),
                gateways: e.rx_info.len(),
                ..Default::default()
            };
            for rx in &e.rx_info {
                best(&mut radio.rssi, f64::from(rx.rssi));
                best(&mut radio.snr, f64::from(rx.snr));
            }
            if let Some(tx) = &e.tx_info {
                radio.frequency = Some(u64::from(tx.frequency));
                if let Some(pb::gw::modulation::Parameters::Lora(lora)) =
                    tx.modulation.as_ref().and_then(|m| m.parameters.as_ref())
                {
                    radio.spreading_factor = Some(lora.spreading_factor);
                }
            }
            let object = e.object.as_ref().map(struct_to_json);
            (
                eui_of(&e.device_info),
                ts_ms(&e.time),
                Kind::Up(Uplink {
                    f_cnt: e.f_cnt,
                    f_port: e.f_port,
                    data: e.data,
                    object,
                    radio,
                }),
            )
        }
        "join" => {
            let e = ipb::JoinEvent::decode(payload).map_err(malformed_protobuf)?;
            (
                eui_of(&e.device_info),
                ts_ms(&e.time),
                Kind::Join {
                    dev_addr: e.dev_addr,
                },
            )
        }
        "status" => {
            let e = ipb::StatusEvent::decode(payload).map_err(malformed_protobuf)?;
            (
                eui_of(&e.device_info),
                ts_ms(&e.time),
                Kind::Status {
                    battery: (!e.battery_level_unavailable).then_some(f64::from(e.battery_level)),
                    margin: e.margin,
                    external_power: e.external_power_source,
                },
            )
        }
        _ => {
            let e = ipb::LogEvent::decode(payload).map_err(malformed_protobuf)?;
            if e.level() == ipb::LogLevel::Info {
                return Ok(None);
            }
            (
                eui_of(&e.device_info),
                ts_ms(&e.time),
                Kind::Error {
                    code: e.code().as_str_name().to_string(),
                    description: e.description,
                },
            )
        }
    }))
}

fn best(slot: &mut Option<f64>, v: f64) {
    if v.is_finite() && slot.is_none_or(|s| v > s) {
        *slot = Some(v);
    }
}

fn struct_to_json(s: &prost_types::Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind as K;
    match &v.kind {
        None | Some(K::NullValue(_)) => serde_json::Value::Null,
        Some(K::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(K::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(K::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(K::StructValue(s)) => serde_json::Value::Object(struct_to_json(s)),
        Some(K::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
    }
}

// ---- protobuf JSON mapping ----

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct JsonDeviceInfo {
    #[serde(alias = "dev_eui")]
    dev_eui: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct JsonRxInfo {
    #[serde(deserialize_with = "lenient::f64")]
    rssi: Option<f64>,
    #[serde(deserialize_with = "lenient::f64")]
    snr: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct JsonLora {
    #[serde(alias = "spreading_factor", deserialize_with = "lenient::u64")]
    spreading_factor: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct JsonModulation {
    lora: Option<JsonLora>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct JsonTxInfo {
    #[serde(deserialize_with = "lenient::u64")]
    frequency: Option<u64>,
    modulation: Option<JsonModulation>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct JsonEvent {
    time: Option<String>,
    #[serde(alias = "device_info")]
    device_info: Option<JsonDeviceInfo>,
    #[serde(alias = "dev_addr")]
    dev_addr: String,
    #[serde(deserialize_with = "lenient::u64")]
    dr: Option<u64>,
    #[serde(alias = "f_cnt", deserialize_with = "lenient::u64")]
    f_cnt: Option<u64>,
    #[serde(alias = "f_port", deserialize_with = "lenient::u64")]
    f_port: Option<u64>,
    data: Option<String>,
    object: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(alias = "rx_info")]
    rx_info: Vec<JsonRxInfo>,
    #[serde(alias = "tx_info")]
    tx_info: Option<JsonTxInfo>,
    // status
    #[serde(deserialize_with = "lenient::i64")]
    margin: Option<i64>,
    #[serde(alias = "external_power_source")]
    external_power_source: bool,
    #[serde(alias = "battery_level_unavailable")]
    battery_level_unavailable: bool,
    #[serde(alias = "battery_level", deserialize_with = "lenient::f64")]
    battery_level: Option<f64>,
    // log
    level: Option<String>,
    code: Option<String>,
    description: String,
}

fn from_json(event: &str, payload: &[u8]) -> Result<Fields, Rejection> {
    let e: JsonEvent = serde_json::from_slice(payload)
        .map_err(|e| Rejection::new(reason::MALFORMED_EVENT, e.to_string()))?;
    let time_ms = match &e.time {
        Some(t) => Some(rfc3339_ms(t).ok_or_else(|| {
            Rejection::new(
                reason::MALFORMED_EVENT,
                format!("time {t:?} is not RFC 3339"),
            )
        })?),
        None => None,
    };
    let eui = e.device_info.map(|d| d.dev_eui).unwrap_or_default();
    let u32_field = |name: &str, v: Option<u64>| {
        u32::try_from(v.unwrap_or(0)).map_err(|_| {
            Rejection::new(
                reason::MALFORMED_EVENT,
                format!("{name} does not fit uint32"),
            )
        })
    };
    let kind = match event {
        "up" => {
            let mut radio = Radio {
                data_rate: Some(u32_field("dr", e.dr)?),
                gateways: e.rx_info.len(),
                ..Default::default()
            };
            for rx in &e.rx_info {
                if let Some(v) = rx.rssi {
                    best(&mut radio.rssi, v);
                }
                if let Some(v) = rx.snr {
                    best(&mut radio.snr, v);
                }
            }
            if let Some(tx) = &e.tx_info {
                radio.frequency = tx.frequency;
                radio.spreading_factor = tx
                    .modulation
                    .as_ref()
                    .and_then(|m| m.lora.as_ref())
                    .and_then(|l| l.spreading_factor)
                    .map(|sf| sf as u32);
            }
            let data = match &e.data {
                Some(d) => base64("data", d)?,
                None => Vec::new(),
            };
            Kind::Up(Uplink {
                f_cnt: u32_field("fCnt", e.f_cnt)?,
                f_port: u32_field("fPort", e.f_port)?,
                data,
                object: e.object,
                radio,
            })
        }
        "join" => Kind::Join {
            dev_addr: e.dev_addr,
        },
        "status" => Kind::Status {
            battery: (!e.battery_level_unavailable).then_some(e.battery_level.unwrap_or(0.0)),
            margin: i32::try_from(e.margin.unwrap_or(0)).map_err(|_| {
                Rejection::new(reason::MALFORMED_EVENT, "margin does not fit int32")
            })?,
            external_power: e.external_power_source,
        },
        _ => {
            if matches!(e.level.as_deref(), None | Some("INFO")) {
                return Ok(None);
            }
            Kind::Error {
                code: e.code.unwrap_or_else(|| "UNKNOWN".into()),
                description: e.description,
            }
        }
    };
    Ok(Some((eui, time_ms, kind)))
}

/// Protobuf's JSON mapping writes 64-bit integers as strings and accepts numbers as strings for
/// every numeric type; floats may also be "NaN" or "Infinity". These accept what the mapping
/// allows and refuse the rest (a bool, an object), which then dead-letters the event.
pub(super) mod lenient {
    use serde::{de::Error, Deserialize, Deserializer};

    enum Num {
        N(serde_json::Number),
        S(String),
    }

    fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Num>, D::Error> {
        match Option::<serde_json::Value>::deserialize(d)? {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Number(n)) => Ok(Some(Num::N(n))),
            Some(serde_json::Value::String(s)) => Ok(Some(Num::S(s))),
            Some(other) => Err(D::Error::custom(format!(
                "expected a number or a numeric string, found {other}"
            ))),
        }
    }

    fn num<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Number>, D::Error> {
        match raw(d)? {
            None => Ok(None),
            Some(Num::N(n)) => Ok(Some(n)),
            Some(Num::S(s)) => s
                .trim()
                .parse::<serde_json::Number>()
                .map(Some)
                .map_err(|_| D::Error::custom(format!("{s:?} is not a number"))),
        }
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        num(d)?
            .map(|n| {
                n.as_u64()
                    .ok_or_else(|| D::Error::custom(format!("{n} is not an unsigned integer")))
            })
            .transpose()
    }

    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        num(d)?
            .map(|n| {
                n.as_i64()
                    .ok_or_else(|| D::Error::custom(format!("{n} is not an integer")))
            })
            .transpose()
    }

    /// Non-finite values ("NaN", "Infinity") are no measurement: `None`.
    pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match raw(d)? {
            None => Ok(None),
            Some(Num::N(n)) => Ok(n.as_f64()),
            Some(Num::S(s)) => match s.trim() {
                "NaN" | "Infinity" | "-Infinity" => Ok(None),
                t => t
                    .parse::<f64>()
                    .map(Some)
                    .map_err(|_| D::Error::custom(format!("{s:?} is not a number"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uplink() {
        let body = br#"{"deduplicationId":"3ac7e3c4","time":"2022-07-18T09:34:15.775023242+00:00",
            "deviceInfo":{"tenantId":"t","applicationId":"a","deviceName":"d","devEui":"0101010101010101"},
            "devAddr":"00189440","dr":1,"fCnt":"7","fPort":1,"data":"qg==",
            "rxInfo":[{"gatewayId":"g1","rssi":-36,"snr":10.5},{"gatewayId":"g2","rssi":-80,"snr":"NaN"}],
            "txInfo":{"frequency":868500000,"modulation":{"lora":{"bandwidth":125000,"spreadingFactor":11,"codeRate":"CR_4_5"}}}}"#;
        let Parsed::Event(e) = parse(
            "application/a/device/0101010101010101/event/up",
            body,
            Marshaler::Auto,
        )
        .unwrap() else {
            panic!("ignored")
        };
        assert_eq!(e.device.dev_eui, "0101010101010101");
        assert_eq!(e.time_ms, Some(1_658_136_855_775));
        let Kind::Up(up) = e.kind else { panic!() };
        assert_eq!((up.f_cnt, up.f_port, up.data), (7, 1, vec![0xaa]));
        assert_eq!(
            up.radio,
            Radio {
                rssi: Some(-36.0),
                snr: Some(10.5),
                spreading_factor: Some(11),
                data_rate: Some(1),
                frequency: Some(868_500_000),
                gateways: 2
            }
        );
    }

    #[test]
    fn refusals() {
        let topic = "application/a/device/0101010101010101/event/up";
        let reason = |body: &[u8]| {
            parse(topic, body, Marshaler::Auto)
                .unwrap_err()
                .rejection
                .reason
        };
        assert_eq!(reason(b"{\"fCnt\": true}"), reason::MALFORMED_EVENT);
        assert_eq!(reason(b"{not json"), reason::MALFORMED_EVENT);
        assert_eq!(
            reason(br#"{"deviceInfo":{"devEui":"0101010101010101"},"data":"!!"}"#),
            reason::BAD_BASE64
        );
        assert_eq!(
            reason(br#"{"deviceInfo":{"devEui":"0202020202020202"}}"#),
            reason::MALFORMED_EVENT
        );
        assert_eq!(reason(&[0x1a, 0x40, 0x01]), reason::MALFORMED_PROTOBUF);
        assert!(matches!(
            parse(
                "application/a/device/x/event/location",
                b"",
                Marshaler::Auto
            ),
            Ok(Parsed::Ignored("location"))
        ));
    }

    #[test]
    fn downlink_reports() {
        let topic =
            |event: &str| format!("application/app-7/device/0101010101010101/event/{event}");
        let report = |event: &str, body: &[u8], m: Marshaler| match parse(&topic(event), body, m) {
            Ok(Parsed::Downlink(d)) => d,
            other => panic!("{other:?}"),
        };
        let id = "0192f0c4-7d1e-7000-8000-000000000001";
        let tx = report(
            "txack",
            format!(r#"{{"downlinkId":7,"deviceInfo":{{"devEui":"0101010101010101"}},"queueItemId":"{id}","fCntDown":3}}"#).as_bytes(),
            Marshaler::Auto,
        );
        assert_eq!(tx.kind, DownlinkKind::Transmitted);
        assert_eq!(tx.command_id.as_deref(), Some(id));
        assert_eq!(
            (tx.device.dev_eui.as_str(), tx.device.application.as_str()),
            ("0101010101010101", "app-7")
        );
        // protobuf's JSON mapping leaves `acknowledged: false` out
        let nack = report(
            "ack",
            format!(r#"{{"queueItemId":"{id}"}}"#).as_bytes(),
            Marshaler::Json,
        );
        assert_eq!(nack.kind, DownlinkKind::NotAcknowledged);
        let ack = ipb::AckEvent {
            queue_item_id: id.into(),
            acknowledged: true,
            device_info: Some(ipb::DeviceInfo {
                dev_eui: "0101010101010101".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ack = report("ack", &ack.encode_to_vec(), Marshaler::Auto);
        assert_eq!(
            (ack.kind, ack.command_id.as_deref()),
            (DownlinkKind::Acknowledged, Some(id))
        );
        assert_eq!(report("txack", b"{}", Marshaler::Auto).command_id, None);
        // another device's report on this device's topic, garbage
        for bad in [
            &br#"{"deviceInfo":{"devEui":"0202020202020202"},"queueItemId":"x"}"#[..],
            b"{not json",
            br#"{"acknowledged":"yes"}"#,
        ] {
            let refused = parse(&topic("ack"), bad, Marshaler::Auto).unwrap_err();
            assert_eq!(refused.rejection.reason, reason::MALFORMED_EVENT);
        }
    }
}
