//! The Things Stack v3 MQTT server events.
//!
//! Topic `v3/{application id}@{tenant}/devices/{device id}/{type}` (on a self-hosted stack the
//! application id has no `@tenant`); the body is JSON (TTS's protobuf JSON mapping with the
//! original snake_case names): `end_device_ids`, `received_at` and, for `up`, `uplink_message`
//! with `f_port`, `f_cnt`, `frm_payload`, `decoded_payload`, `rx_metadata` and `settings`.
//! Protobuf's JSON mapping leaves out zero values, so a missing `f_cnt` is frame 0.
//!
//! Downlink reports (`down/queued`, `down/sent`, `down/ack`, `down/nack`, `down/failed`) carry
//! the downlink (`downlink_sent`, ..., `downlink_failed.downlink`) with the correlation ids it
//! was pushed with; the gateway's `citygw:cmd:{command id}` among them names the command
//! ([`Parsed::Downlink`]).

use serde::Deserialize;

use super::chirpstack::lenient;
use super::event::{
    base64, rfc3339_ms, DeviceRef, DownlinkEvent, DownlinkKind, Event, Kind, Malformed, Parsed,
    Radio, Uplink,
};
use crate::pipeline::Rejection;
use crate::reason;
use crate::registry::normalise_dev_eui;

/// Default subscription: every device event of every application the credentials can see.
pub const DEFAULT_TOPIC: &str = "v3/+/devices/#";

#[derive(Deserialize, Default)]
#[serde(default)]
struct Ids {
    device_id: String,
    dev_eui: Option<String>,
    dev_addr: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RxMetadata {
    #[serde(deserialize_with = "lenient::f64")]
    rssi: Option<f64>,
    #[serde(deserialize_with = "lenient::f64")]
    channel_rssi: Option<f64>,
    #[serde(deserialize_with = "lenient::f64")]
    snr: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Lora {
    #[serde(deserialize_with = "lenient::u64")]
    spreading_factor: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DataRate {
    lora: Option<Lora>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Settings {
    data_rate: Option<DataRate>,
    #[serde(deserialize_with = "lenient::u64")]
    data_rate_index: Option<u64>,
    #[serde(deserialize_with = "lenient::u64")]
    frequency: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct UplinkMessage {
    #[serde(deserialize_with = "lenient::u64")]
    f_port: Option<u64>,
    #[serde(deserialize_with = "lenient::u64")]
    f_cnt: Option<u64>,
    frm_payload: Option<String>,
    decoded_payload: Option<serde_json::Map<String, serde_json::Value>>,
    rx_metadata: Vec<RxMetadata>,
    settings: Option<Settings>,
    received_at: Option<String>,
}

/// An `ApplicationDownlink` as reported back: only its correlation ids matter here.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Downlink {
    correlation_ids: Vec<String>,
}

/// TTS's error details (`errors.Error` in its JSON mapping).
#[derive(Deserialize, Default)]
#[serde(default)]
struct ErrorDetails {
    namespace: String,
    name: String,
    message_format: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DownlinkFailed {
    downlink: Option<Downlink>,
    error: Option<ErrorDetails>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Message {
    end_device_ids: Option<Ids>,
    correlation_ids: Vec<String>,
    received_at: Option<String>,
    uplink_message: Option<UplinkMessage>,
    downlink_queued: Option<Downlink>,
    downlink_sent: Option<Downlink>,
    downlink_ack: Option<Downlink>,
    downlink_nack: Option<Downlink>,
    downlink_failed: Option<DownlinkFailed>,
}

/// The correlation id a downlink pushed for command `id` carries.
pub fn correlation_id(id: &str) -> String {
    format!("{CORRELATION_PREFIX}{id}")
}

const CORRELATION_PREFIX: &str = "citygw:cmd:";

/// Longest error text kept from a `down/failed` report.
const MAX_ERROR: usize = 256;

/// Reads one message of a TTS broker.
pub fn parse(topic: &str, payload: &[u8]) -> Result<Parsed, Malformed> {
    let levels: Vec<&str> = topic.split('/').collect();
    let (application, topic_device, event) = match levels.as_slice() {
        ["v3", app, "devices", device, rest @ ..] if !rest.is_empty() => {
            (*app, *device, rest.join("/"))
        }
        _ => return Ok(Parsed::Ignored("unknown")),
    };
    let mut device = DeviceRef {
        dev_eui: String::new(),
        device_id: topic_device.to_string(),
        application: application.to_string(),
    };
    match event.as_str() {
        "up" | "join" | "down/queued" | "down/sent" | "down/ack" | "down/nack" | "down/failed" => {}
        "service/data" => return Ok(Parsed::Ignored("service_data")),
        "location/solved" => return Ok(Parsed::Ignored("location")),
        _ => return Ok(Parsed::Ignored("unknown")),
    }
    let fail = |device: &DeviceRef, r: Rejection| Malformed {
        device: device.clone(),
        rejection: r,
    };
    let mut msg: Message = serde_json::from_slice(payload).map_err(|e| {
        fail(
            &device,
            Rejection::new(reason::MALFORMED_EVENT, e.to_string()),
        )
    })?;
    let ids = msg.end_device_ids.take().unwrap_or_default();
    if let Some(eui) = ids.dev_eui.as_deref().filter(|e| !e.is_empty()) {
        device.dev_eui = normalise_dev_eui(eui).ok_or_else(|| {
            fail(
                &device,
                Rejection::new(
                    reason::MALFORMED_EVENT,
                    format!("end_device_ids.dev_eui {eui:?} is not 16 hex digits"),
                ),
            )
        })?;
    }
    if ids.device_id != topic_device {
        return Err(fail(
            &device,
            Rejection::new(
                reason::MALFORMED_EVENT,
                format!(
                    "topic names device {topic_device:?}, the event {:?}",
                    ids.device_id
                ),
            ),
        ));
    }
    let time = |t: &Option<String>| -> Result<Option<i64>, Malformed> {
        match t {
            None => Ok(None),
            Some(s) => rfc3339_ms(s).map(Some).ok_or_else(|| {
                fail(
                    &device,
                    Rejection::new(
                        reason::MALFORMED_EVENT,
                        format!("received_at {s:?} is not RFC 3339"),
                    ),
                )
            }),
        }
    };
    if let Some(report) = event.strip_prefix("down/") {
        return Ok(Parsed::Downlink(downlink(report, msg, device)));
    }
    let kind = if event == "join" {
        Kind::Join {
            dev_addr: ids.dev_addr.unwrap_or_default(),
        }
    } else {
        let up = msg.uplink_message.ok_or_else(|| {
            fail(
                &device,
                Rejection::new(reason::MALFORMED_EVENT, "no uplink_message"),
            )
        })?;
        let mut radio = Radio {
            gateways: up.rx_metadata.len(),
            ..Default::default()
        };
        for rx in &up.rx_metadata {
            if let Some(v) = rx.rssi.or(rx.channel_rssi) {
                radio.rssi = Some(radio.rssi.map_or(v, |r: f64| r.max(v)));
            }
            if let Some(v) = rx.snr {
                radio.snr = Some(radio.snr.map_or(v, |r: f64| r.max(v)));
            }
        }
        if let Some(s) = &up.settings {
            radio.frequency = s.frequency;
            radio.data_rate = s.data_rate_index.map(|d| d as u32);
            radio.spreading_factor = s
                .data_rate
                .as_ref()
                .and_then(|d| d.lora.as_ref())
                .and_then(|l| l.spreading_factor)
                .map(|sf| sf as u32);
        }
        let data = match &up.frm_payload {
            Some(p) => base64("frm_payload", p).map_err(|r| fail(&device, r))?,
            None => Vec::new(),
        };
        let small = |name: &str, v: Option<u64>| {
            u32::try_from(v.unwrap_or(0)).map_err(|_| {
                fail(
                    &device,
                    Rejection::new(
                        reason::MALFORMED_EVENT,
                        format!("{name} does not fit uint32"),
                    ),
                )
            })
        };
        let time_ms = time(&up.received_at)?;
        return Ok(Parsed::Event(Event {
            time_ms: match time_ms {
                Some(t) => Some(t),
                None => time(&msg.received_at)?,
            },
            kind: Kind::Up(Uplink {
                f_cnt: small("f_cnt", up.f_cnt)?,
                f_port: small("f_port", up.f_port)?,
                data,
                object: up.decoded_payload,
                radio,
            }),
            device,
        }));
    };
    Ok(Parsed::Event(Event {
        time_ms: time(&msg.received_at)?,
        kind,
        device,
    }))
}

/// A `down/{report}` event: the command it is about (by our correlation id) and its outcome.
fn downlink(report: &str, msg: Message, device: DeviceRef) -> DownlinkEvent {
    let (kind, downlink) = match report {
        "queued" => (DownlinkKind::Queued, msg.downlink_queued),
        "sent" => (DownlinkKind::Transmitted, msg.downlink_sent),
        "ack" => (DownlinkKind::Acknowledged, msg.downlink_ack),
        "nack" => (DownlinkKind::NotAcknowledged, msg.downlink_nack),
        _ => {
            let failed = msg.downlink_failed.unwrap_or_default();
            let error = failed.error.unwrap_or_default();
            let text = [&error.namespace, &error.name, &error.message_format]
                .iter()
                .filter(|t| !t.is_empty())
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(": ");
            let text = if text.is_empty() {
                "the network server reported the downlink failed".to_string()
            } else {
                crate::control::commands::bounded(format!("network server: {text}"), MAX_ERROR)
            };
            (DownlinkKind::Failed(text), failed.downlink)
        }
    };
    let command_id = downlink
        .into_iter()
        .flat_map(|d| d.correlation_ids)
        .chain(msg.correlation_ids)
        .find_map(|c| c.strip_prefix(CORRELATION_PREFIX).map(str::to_string))
        .filter(|id| !id.is_empty());
    DownlinkEvent {
        device,
        command_id,
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The uplink example of the TTS documentation ("MQTT server", uplink messages).
    const DOC_UPLINK: &str = r#"{
      "end_device_ids": {
        "device_id": "dev1",
        "application_ids": {"application_id": "app1"},
        "dev_eui": "0004A30B001C0530",
        "join_eui": "800000000000000C",
        "dev_addr": "00BCB929"
      },
      "correlation_ids": ["as:up:01E0ZQ9BPXC8DFMG9FXDF0PAB4"],
      "received_at": "2020-02-12T15:15:49.126101008Z",
      "uplink_message": {
        "session_key_id": "AXBSH1Pk6Z0G166BTeIlPA==",
        "f_port": 1,
        "f_cnt": 2,
        "frm_payload": "gkHe",
        "decoded_payload": {"temperature": 21.5},
        "rx_metadata": [{
          "gateway_ids": {"gateway_id": "gtw1", "eui": "9C5C8E00001A05C4"},
          "time": "2020-02-12T15:15:48.951000Z",
          "timestamp": 2463457000,
          "rssi": -35,
          "channel_rssi": -35,
          "snr": 5.2,
          "location": {"latitude": 52.1, "longitude": 4.3, "altitude": 10},
          "uplink_token": "ChIKEAoEZ3R3MRIInFyOAAAaBcQQ6NPr9QgaDAiUw5DyBRDq0JXwAiCo+NTy3Ug=",
          "channel_index": 2
        }],
        "settings": {
          "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7}},
          "coding_rate": "4/5",
          "frequency": "868500000",
          "timestamp": 2463457000,
          "time": "2020-02-12T15:15:48.951000Z"
        },
        "received_at": "2020-02-12T15:15:48.964003107Z",
        "consumed_airtime": "0.056576s"
      }
    }"#;

    #[test]
    fn documented_uplink() {
        let Parsed::Event(e) = parse("v3/app1@ttn/devices/dev1/up", DOC_UPLINK.as_bytes()).unwrap()
        else {
            panic!("ignored")
        };
        assert_eq!(e.device.dev_eui, "0004a30b001c0530");
        assert_eq!(e.device.device_id, "dev1");
        assert_eq!(e.time_ms, Some(1_581_520_548_964));
        let Kind::Up(up) = e.kind else { panic!() };
        assert_eq!((up.f_cnt, up.f_port), (2, 1));
        assert_eq!(up.data, [0x82, 0x41, 0xde]);
        assert!(up.object.is_some());
        assert_eq!(up.radio.rssi, Some(-35.0));
        assert_eq!(up.radio.spreading_factor, Some(7));
        assert_eq!(up.radio.frequency, Some(868_500_000));
    }

    #[test]
    fn refusals_and_ignored() {
        let topic = "v3/app1@ttn/devices/dev1/up";
        let bad = DOC_UPLINK.replace("\"gkHe\"", "\"***\"");
        assert_eq!(
            parse(topic, bad.as_bytes()).unwrap_err().rejection.reason,
            reason::BAD_BASE64
        );
        let bad = DOC_UPLINK.replace("\"f_cnt\": 2", "\"f_cnt\": {}");
        assert_eq!(
            parse(topic, bad.as_bytes()).unwrap_err().rejection.reason,
            reason::MALFORMED_EVENT
        );
        let spoof = parse("v3/app1@ttn/devices/other/up", DOC_UPLINK.as_bytes()).unwrap_err();
        assert_eq!(spoof.rejection.reason, reason::MALFORMED_EVENT);
        assert!(matches!(
            parse("v3/app1@ttn/devices/dev1/service/data", b"{}"),
            Ok(Parsed::Ignored("service_data"))
        ));
    }

    #[test]
    fn downlink_reports() {
        let id = "0192f0c4-7d1e-7000-8000-000000000001";
        let report = |event: &str, body: String| match parse(
            &format!("v3/app1@ttn/devices/dev1/down/{event}"),
            body.as_bytes(),
        ) {
            Ok(Parsed::Downlink(d)) => d,
            other => panic!("{other:?}"),
        };
        let ids = r#""end_device_ids":{"device_id":"dev1","application_ids":{"application_id":"app1"},"dev_eui":"0004A30B001C0530"}"#;
        let sent = report(
            "sent",
            format!(
                r#"{{{ids},"correlation_ids":["as:downlink:01"],"downlink_sent":{{"f_port":15,"frm_payload":"vu8=","confirmed":true,"correlation_ids":["as:downlink:01","citygw:cmd:{id}"]}}}}"#
            ),
        );
        assert_eq!(
            (sent.kind, sent.command_id.as_deref()),
            (DownlinkKind::Transmitted, Some(id))
        );
        assert_eq!(
            (
                sent.device.device_id.as_str(),
                sent.device.dev_eui.as_str(),
                sent.device.application.as_str()
            ),
            ("dev1", "0004a30b001c0530", "app1@ttn")
        );
        let failed = report(
            "failed",
            format!(
                r#"{{{ids},"downlink_failed":{{"downlink":{{"correlation_ids":["citygw:cmd:{id}"]}},"error":{{"namespace":"pkg/networkserver","name":"application_downlink_too_long","message_format":"downlink too long"}}}}}}"#
            ),
        );
        assert_eq!(failed.command_id.as_deref(), Some(id));
        assert_eq!(failed.kind, DownlinkKind::Failed("network server: pkg/networkserver: application_downlink_too_long: downlink too long".into()));
        assert_eq!(
            report("ack", format!(r#"{{{ids},"downlink_ack":{{}}}}"#)).command_id,
            None
        );
        assert_eq!(
            report(
                "nack",
                format!(r#"{{{ids},"correlation_ids":["citygw:cmd:{id}"]}}"#)
            )
            .kind,
            DownlinkKind::NotAcknowledged
        );
        // another device's report on dev1's topic, garbage
        let other = format!(
            r#"{{"end_device_ids":{{"device_id":"dev2"}},"downlink_ack":{{"correlation_ids":["citygw:cmd:{id}"]}}}}"#
        );
        for bad in [other.as_str(), "{not json", r#"{"correlation_ids":"x"}"#] {
            let refused = parse("v3/app1@ttn/devices/dev1/down/ack", bad.as_bytes()).unwrap_err();
            assert_eq!(refused.rejection.reason, reason::MALFORMED_EVENT, "{bad}");
        }
    }
}
