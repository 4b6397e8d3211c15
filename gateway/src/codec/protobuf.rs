//! Protobuf `citygw.v1.ReadingBatch`: for devices, bridges and the device simulator that already
//! speak the gateway's schema, so nothing is lost in translation and decoding is cheapest.
//!
//! Only what a device can vouch for is taken from each `Reading`: quantity, value, unit,
//! `device_time_ms` (0 = none, as proto3 cannot tell unset from 0), `device_seq` and `location`.
//! `id`, `device_id`, `tenant`, `received_time_ms`, `protocol`, `commune_code` and `kind` are
//! ignored: the gateway fills them from the authenticated session and the registry, so a device
//! cannot claim another identity or a place in the id sequence.
//!
//! Errors: bytes that are not a `ReadingBatch` and readings without a quantity or a value are
//! `malformed_protobuf`; non-finite numbers `non_finite_value`; negative or far-future times
//! `bad_timestamp`; impossible positions `bad_location`; an empty batch `no_readings`.

use prost::Message as _;

use super::{reason, DecodeError, Decoded, Decoder};
use crate::proto::reading::Value;
use crate::proto::ReadingBatch;

/// Decoder for [`Format::Proto`](super::Format::Proto).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProtoDecoder;

impl Decoder for ProtoDecoder {
    fn decode(&self, payload: &[u8], _now_ms: i64) -> Result<Vec<Decoded>, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::new(reason::EMPTY_PAYLOAD, "payload is empty"));
        }
        let batch = ReadingBatch::decode(payload).map_err(|e| {
            DecodeError::new(
                reason::MALFORMED_PROTOBUF,
                format!("not a ReadingBatch: {e}"),
            )
        })?;
        if batch.readings.is_empty() {
            return Err(DecodeError::new(
                reason::NO_READINGS,
                "ReadingBatch holds no readings",
            ));
        }
        let mut out = Vec::with_capacity(batch.readings.len());
        for (i, r) in batch.readings.into_iter().enumerate() {
            if r.quantity.trim().is_empty() {
                return Err(DecodeError::new(
                    reason::MALFORMED_PROTOBUF,
                    format!("reading {i} has no quantity"),
                ));
            }
            let value = match r.value {
                None => {
                    let detail = format!("reading {i} ({}) has no value", r.quantity);
                    return Err(DecodeError::new(reason::MALFORMED_PROTOBUF, detail));
                }
                Some(Value::Number(n)) if !n.is_finite() => {
                    let detail = format!("reading {i} ({}) is {n}", r.quantity);
                    return Err(DecodeError::new(reason::NON_FINITE_VALUE, detail));
                }
                Some(v) => v,
            };
            let time_ms = match r.device_time_ms {
                0 => None,
                t if (1..=super::MAX_TIME_MS).contains(&t) => Some(t),
                t => {
                    let detail = format!(
                        "reading {i} ({}): device_time_ms {t} is outside 1970..=9999",
                        r.quantity
                    );
                    return Err(DecodeError::new(reason::BAD_TIMESTAMP, detail));
                }
            };
            let location = match r.location {
                Some(l) => super::location(Some(l.lat), Some(l.lon), l.alt_m)?,
                None => None,
            };
            out.push(Decoded {
                quantity: r.quantity,
                value,
                unit: r.unit,
                time_ms,
                seq: r.device_seq,
                location,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Location, Reading};

    fn reading(q: &str, v: Value) -> Reading {
        Reading {
            quantity: q.into(),
            value: Some(v),
            ..Default::default()
        }
    }

    fn decode(readings: Vec<Reading>) -> Result<Vec<Decoded>, DecodeError> {
        ProtoDecoder.decode(&ReadingBatch { readings }.encode_to_vec(), 0)
    }

    #[test]
    fn decodes_fields_and_ignores_identity() {
        let loc = Location {
            lat: 16.05,
            lon: 108.2,
            alt_m: None,
        };
        let out = decode(vec![
            Reading {
                id: 99,
                device_id: "someone-else".into(),
                tenant: "other".into(),
                received_time_ms: 5,
                unit: "Cel".into(),
                device_time_ms: 1_735_689_600_000,
                device_seq: Some(7),
                location: Some(loc),
                ..reading("temperature", Value::Number(28.5))
            },
            reading("lamp_state", Value::Boolean(true)),
            reading("trạng_thái", Value::Text("bình thường".into())),
        ])
        .unwrap();
        assert_eq!(
            out[0],
            Decoded {
                quantity: "temperature".into(),
                value: Value::Number(28.5),
                unit: "Cel".into(),
                time_ms: Some(1_735_689_600_000),
                seq: Some(7),
                location: Some(loc),
            }
        );
        assert_eq!(out[1].value, Value::Boolean(true));
        assert_eq!(out[1].time_ms, None);
        assert_eq!(out[1].seq, None);
        assert_eq!(out[2].quantity, "trạng_thái");
    }

    #[test]
    fn errors() {
        let r = |readings| decode(readings).unwrap_err().reason;
        assert_eq!(
            ProtoDecoder.decode(b"", 0).unwrap_err().reason,
            reason::EMPTY_PAYLOAD
        );
        assert_eq!(
            ProtoDecoder.decode(b"\xff\xff\xff", 0).unwrap_err().reason,
            reason::MALFORMED_PROTOBUF
        );
        assert_eq!(
            ProtoDecoder
                .decode(br#"{"temperature": 1}"#, 0)
                .unwrap_err()
                .reason,
            reason::MALFORMED_PROTOBUF
        );
        // Truncated: a length-delimited field longer than the buffer.
        let mut bytes = ReadingBatch {
            readings: vec![reading("x", Value::Number(1.0))],
        }
        .encode_to_vec();
        bytes.pop();
        assert_eq!(
            ProtoDecoder.decode(&bytes, 0).unwrap_err().reason,
            reason::MALFORMED_PROTOBUF
        );
        // An empty batch encodes to zero bytes.
        assert_eq!(r(vec![]), reason::EMPTY_PAYLOAD);
        // Unknown fields only: valid, but empty.
        assert_eq!(
            ProtoDecoder.decode(&[0x10, 0x01], 0).unwrap_err().reason,
            reason::NO_READINGS
        );
        assert_eq!(
            r(vec![Reading {
                quantity: "x".into(),
                ..Default::default()
            }]),
            reason::MALFORMED_PROTOBUF
        );
        assert_eq!(
            r(vec![reading("", Value::Number(1.0))]),
            reason::MALFORMED_PROTOBUF
        );
        assert_eq!(
            r(vec![reading(" ", Value::Number(1.0))]),
            reason::MALFORMED_PROTOBUF
        );
        for n in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(
                r(vec![reading("x", Value::Number(n))]),
                reason::NON_FINITE_VALUE
            );
        }
        for t in [-1, i64::MIN, i64::MAX] {
            assert_eq!(
                r(vec![Reading {
                    device_time_ms: t,
                    ..reading("x", Value::Number(1.0))
                }]),
                reason::BAD_TIMESTAMP
            );
        }
        let far = Location {
            lat: 100.0,
            lon: 0.0,
            alt_m: None,
        };
        assert_eq!(
            r(vec![Reading {
                location: Some(far),
                ..reading("x", Value::Number(1.0))
            }]),
            reason::BAD_LOCATION
        );
    }
}
