//! Payload formats a simulated device sends, as the gateway accepts them on
//! `devices/{id}/telemetry[/json|/senml-json|/senml-cbor|/proto]`.
//!
//! Every format carries the device time in whole seconds (SenML times are seconds; whole ones
//! survive the float round trip exactly), so (device, device time, quantity) identifies a reading
//! in every format: `verify` matches on it.

use std::str::FromStr;

use citygw::proto::{reading, Reading, ReadingBatch};
use prost::Message;
use serde_json::{json, Map, Value as Json};

use crate::scenario::profiles::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    Json,
    SenmlJson,
    SenmlCbor,
    Proto,
}

pub const ALL: [Format; 4] = [
    Format::Json,
    Format::SenmlJson,
    Format::SenmlCbor,
    Format::Proto,
];

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::SenmlJson => "senml-json",
            Format::SenmlCbor => "senml-cbor",
            Format::Proto => "proto",
        }
    }

    /// The MQTT telemetry topic of a device for this format.
    pub fn topic(self, device_id: &str) -> String {
        format!("devices/{device_id}/telemetry/{}", self.name())
    }

    /// One message: the readings of one sample at `ts_s` (Unix seconds), with the device's
    /// message counter where the format has a place for it.
    pub fn encode(
        self,
        device_id: &str,
        ts_s: u64,
        seq: u64,
        values: &[(String, Value)],
    ) -> Vec<u8> {
        match self {
            Format::Json => {
                let mut doc = Map::new();
                doc.insert("ts".into(), json!(ts_s * 1000));
                doc.insert("seq".into(), json!(seq));
                for (name, v) in values {
                    doc.insert(name.clone(), json_value(*v));
                }
                serde_json::to_vec(&doc).expect("JSON encodes")
            }
            Format::SenmlJson => {
                let records: Vec<Json> = values
                    .iter()
                    .enumerate()
                    .map(|(i, (name, v))| {
                        let mut r = Map::new();
                        if i == 0 {
                            r.insert("bn".into(), json!(format!("urn:dev:{device_id}:")));
                            r.insert("bt".into(), json!(ts_s));
                        }
                        r.insert("n".into(), json!(name));
                        match v {
                            Value::Number(x) => r.insert("v".into(), json!(x)),
                            Value::Boolean(b) => r.insert("vb".into(), json!(b)),
                        };
                        Json::Object(r)
                    })
                    .collect();
                serde_json::to_vec(&records).expect("JSON encodes")
            }
            Format::SenmlCbor => {
                use ciborium::Value as Cbor;
                let label = |l: i64| Cbor::Integer(l.into());
                let records: Vec<Cbor> = values
                    .iter()
                    .enumerate()
                    .map(|(i, (name, v))| {
                        let mut r = Vec::new();
                        if i == 0 {
                            r.push((label(-2), Cbor::Text(format!("urn:dev:{device_id}:"))));
                            r.push((label(-3), Cbor::Integer(ts_s.into())));
                        }
                        r.push((label(0), Cbor::Text(name.clone())));
                        match v {
                            Value::Number(x) => r.push((label(2), Cbor::Float(*x))),
                            Value::Boolean(b) => r.push((label(4), Cbor::Bool(*b))),
                        }
                        Cbor::Map(r)
                    })
                    .collect();
                let mut out = Vec::new();
                ciborium::into_writer(&Cbor::Array(records), &mut out).expect("CBOR encodes");
                out
            }
            Format::Proto => ReadingBatch {
                readings: values
                    .iter()
                    .map(|(name, v)| Reading {
                        quantity: name.clone(),
                        value: Some(match v {
                            Value::Number(x) => reading::Value::Number(*x),
                            Value::Boolean(b) => reading::Value::Boolean(*b),
                        }),
                        device_time_ms: (ts_s * 1000) as i64,
                        device_seq: Some(seq),
                        ..Default::default()
                    })
                    .collect(),
            }
            .encode_to_vec(),
        }
    }
}

fn json_value(v: Value) -> Json {
    match v {
        Value::Number(x) => json!(x),
        Value::Boolean(b) => json!(b),
    }
}

impl FromStr for Format {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown payload format {s:?} (formats: {})",
                ALL.map(Format::name).join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Vec<(String, Value)> {
        vec![
            ("pm2_5".into(), Value::Number(41.2)),
            ("lamp_state".into(), Value::Boolean(true)),
        ]
    }

    #[test]
    fn json_carries_ms_time_and_seq() {
        let v: Json =
            serde_json::from_slice(&Format::Json.encode("d", 1_700_000_000, 7, &values())).unwrap();
        assert_eq!(v["ts"], 1_700_000_000_000u64);
        assert_eq!(v["seq"], 7);
        assert_eq!(v["lamp_state"], true);
    }

    #[test]
    fn senml_cbor_uses_integer_labels() {
        let bytes = Format::SenmlCbor.encode("d", 1_700_000_000, 0, &values());
        let v: ciborium::Value = ciborium::from_reader(bytes.as_slice()).unwrap();
        let records = v.as_array().unwrap();
        assert_eq!(records.len(), 2);
        let first = records[0].as_map().unwrap();
        assert!(first
            .iter()
            .any(|(k, v)| k.as_integer() == Some((-3).into())
                && v.as_integer() == Some(1_700_000_000.into())));
    }

    #[test]
    fn proto_decodes_as_a_batch() {
        let b =
            ReadingBatch::decode(Format::Proto.encode("d", 5, 3, &values()).as_slice()).unwrap();
        assert_eq!(b.readings[1].device_time_ms, 5000);
        assert_eq!(b.readings[0].device_seq, Some(3));
    }

    #[test]
    fn topics_and_names_round_trip() {
        for f in ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        assert_eq!(
            Format::SenmlJson.topic("a"),
            "devices/a/telemetry/senml-json"
        );
    }
}
