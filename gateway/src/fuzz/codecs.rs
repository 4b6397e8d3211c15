//! The payload decoders of `codec/` and the MQTT topic scheme.

use super::{run, MAX_DETAIL};
use crate::codec::{decoder, Decoded, Format, MAX_TIME_MS};
use crate::proto::reading::Value;
use crate::reason;
use crate::sources::mqtt::topic::{self, Topic};

/// A receive time for SenML's relative times.
pub(super) const NOW_MS: i64 = 1_780_000_000_000;

/// What every accepted value must be: something the schema and the sinks can hold.
pub(super) fn check_decoded(values: &[Decoded]) {
    assert!(!values.is_empty(), "accepted with no values");
    for d in values {
        assert!(!d.quantity.is_empty(), "empty quantity in {d:?}");
        if let Value::Number(n) = d.value {
            assert!(n.is_finite(), "non-finite value in {d:?}");
        }
        if let Some(t) = d.time_ms {
            assert!((0..=MAX_TIME_MS).contains(&t), "time out of range in {d:?}");
        }
        if let Some(l) = &d.location {
            assert!((-90.0..=90.0).contains(&l.lat) && (-180.0..=180.0).contains(&l.lon));
            assert!(l.alt_m.is_none_or(f64::is_finite));
        }
    }
}

fn check(format: Format, bytes: &[u8]) {
    match decoder(format).decode(bytes, NOW_MS) {
        Ok(values) => check_decoded(&values),
        Err(e) => {
            assert!(
                reason::ALL.iter().any(|d| d.reason == e.reason),
                "unknown reason {e:?}"
            );
            assert!(
                e.detail.len() <= MAX_DETAIL,
                "{} byte detail",
                e.detail.len()
            );
        }
    }
}

#[test]
fn json() {
    run("json", |b| check(Format::Json, b));
}

#[test]
fn senml_json() {
    run("senml_json", |b| check(Format::SenmlJson, b));
}

#[test]
fn senml_cbor() {
    run("senml_cbor", |b| check(Format::SenmlCbor, b));
}

#[test]
fn protobuf() {
    run("protobuf", |b| check(Format::Proto, b));
}

#[test]
fn cayenne_lpp() {
    run("cayenne_lpp", |b| check(Format::Lpp, b));
}

/// A publish topic is telemetry for exactly the device it names, and a device may subscribe only
/// below its own prefix, without wildcards that reach another device.
#[test]
fn mqtt_topic() {
    run("mqtt_topic", |b| {
        let t = String::from_utf8_lossy(b);
        if let Topic::Telemetry { device_id, format } = topic::parse(&t) {
            assert!(!device_id.is_empty() && !device_id.contains('/'));
            let rebuilt = match format {
                Some(f) => format!("devices/{device_id}/telemetry/{f}"),
                None => format!("devices/{device_id}/telemetry"),
            };
            assert!(
                t == rebuilt || t == format!("{rebuilt}/"),
                "{t:?} parsed as {rebuilt:?}"
            );
        }
        // The first level after `devices/` is the device: its own subscriptions only.
        let device = t.split('/').nth(1).unwrap_or("");
        for id in [device, "a", "dev-1"] {
            if !id.is_empty() && topic::may_subscribe(id, &t) {
                let rest = t
                    .strip_prefix(&format!("devices/{id}/"))
                    .unwrap_or_else(|| panic!("{id} may subscribe to {t:?}"));
                // Wildcards only as whole levels, `#` only last: never above its own prefix.
                let levels: Vec<&str> = rest.split('/').collect();
                for (i, level) in levels.iter().enumerate() {
                    assert!(
                        *level == "+"
                            || (*level == "#" && i == levels.len() - 1)
                            || !level.contains(['+', '#']),
                        "{t:?}"
                    );
                }
            }
        }
    });
}
