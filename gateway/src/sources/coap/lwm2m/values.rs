//! LwM2M payloads → resource values: plain text (0, and the pre-registration 1541), TLV (11542, and the pre-registration 1542),
//! SenML JSON (110) and SenML CBOR (112).
//!
//! LwM2M SenML names are resource paths (`bn` "/3303/0/" + `n` "5700"), so unlike the telemetry
//! SenML decoder (where the base name is the device and is dropped) the base name is part of the
//! name here.

use std::collections::BTreeMap;

use super::objects::{Kind, Path};
use crate::codec::Decoded;
use crate::proto::reading::Value;

pub const CF_TEXT: u16 = 0;
/// `application/vnd.oma.lwm2m+text` before IANA registration, used by LwM2M 1.0 clients.
pub const CF_TEXT_OLD: u16 = 1541;
pub const CF_TLV: u16 = 11542;
pub const CF_TLV_OLD: u16 = 1542;
pub const CF_SENML_JSON: u16 = 110;
pub const CF_SENML_CBOR: u16 = 112;

/// Values of the resources in `payload`; `requested` is the resource a read or observation
/// asked for (what a plain-text value or a bare TLV resource refers to).
pub fn decode(
    content_format: Option<u16>,
    payload: &[u8],
    requested: Option<Path>,
    now_ms: i64,
) -> Result<Vec<Decoded>, String> {
    let values = match content_format {
        None | Some(CF_TEXT | CF_TEXT_OLD) => {
            let path = requested.ok_or("a plain-text value needs a resource path")?;
            let text = std::str::from_utf8(payload).map_err(|_| "text value is not UTF-8")?;
            vec![(path, text_value(text.trim(), path.kind())?, None)]
        }
        Some(CF_TLV | CF_TLV_OLD) => {
            let path = requested.ok_or("a TLV value needs the path it was read from")?;
            tlv(payload, path)?
        }
        Some(CF_SENML_JSON) => {
            let v: serde_json::Value =
                serde_json::from_slice(payload).map_err(|e| format!("SenML JSON: {e}"))?;
            senml(json_records(&v)?, now_ms)?
        }
        Some(CF_SENML_CBOR) => {
            let v: ciborium::Value =
                ciborium::from_reader(payload).map_err(|e| format!("SenML CBOR: {e}"))?;
            senml(cbor_records(&v)?, now_ms)?
        }
        Some(n) => return Err(format!("content-format {n} is not an LwM2M value format")),
    };
    if values.is_empty() {
        return Err("no values".into());
    }
    Ok(values
        .into_iter()
        .map(|(path, value, time_ms)| {
            let (quantity, default_unit) = path.quantity();
            Decoded {
                quantity,
                value,
                unit: default_unit.to_string(),
                time_ms,
                seq: None,
                location: None,
            }
        })
        .collect())
}

type Values = Vec<(Path, Value, Option<i64>)>;

fn text_value(text: &str, kind: Kind) -> Result<Value, String> {
    let number = match kind {
        Kind::Integer => text.parse::<i64>().map(|i| i as f64).ok(),
        Kind::Float => text.parse::<f64>().ok(),
    };
    match number {
        Some(n) if n.is_finite() => Ok(Value::Number(n)),
        Some(_) => Err(format!("non-finite value {text:?}")),
        None => Ok(Value::Text(text.to_string())),
    }
}

/// OMA-TS-LightweightM2M section 6.4.3: type (2 bits), id length, length type, then id, length
/// and value; object instances and multiple resources nest.
fn tlv(mut b: &[u8], requested: Path) -> Result<Values, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (typ, id, value, rest) = tlv_entry(b)?;
        b = rest;
        match typ {
            // object instance: resources inside
            0b00 => {
                let inst = Path {
                    instance: id,
                    ..requested
                };
                let mut inner = value;
                while !inner.is_empty() {
                    let (t, rid, v, rest) = tlv_entry(inner)?;
                    inner = rest;
                    if t == 0b11 {
                        let p = Path {
                            resource: rid,
                            ..inst
                        };
                        out.push((p, tlv_value(v, p.kind())?, None));
                    }
                }
            }
            // resource with a value
            0b11 => {
                let p = Path {
                    resource: id,
                    ..requested
                };
                out.push((p, tlv_value(value, p.kind())?, None));
            }
            // multiple resource: the first instance stands for the resource
            0b10 => {
                if let Ok((_, _, v, _)) = tlv_entry(value) {
                    let p = Path {
                        resource: id,
                        ..requested
                    };
                    out.push((p, tlv_value(v, p.kind())?, None));
                }
            }
            _ => return Err("resource instance outside a multiple resource".into()),
        }
    }
    Ok(out)
}

/// One TLV entry: type bits, identifier, value, and the bytes after it.
type TlvEntry<'a> = (u8, u16, &'a [u8], &'a [u8]);

fn tlv_entry(b: &[u8]) -> Result<TlvEntry<'_>, String> {
    let short = || "truncated TLV".to_string();
    let head = *b.first().ok_or_else(short)?;
    let mut i = 1;
    let id = if head & 0x20 != 0 {
        let v = u16::from_be_bytes([*b.get(1).ok_or_else(short)?, *b.get(2).ok_or_else(short)?]);
        i += 2;
        v
    } else {
        i += 1;
        u16::from(*b.get(1).ok_or_else(short)?)
    };
    let len_bytes = usize::from((head >> 3) & 3);
    let len = if len_bytes == 0 {
        usize::from(head & 7)
    } else {
        let l = b.get(i..i + len_bytes).ok_or_else(short)?;
        i += len_bytes;
        l.iter().fold(0usize, |a, x| (a << 8) | usize::from(*x))
    };
    let value = b.get(i..i + len).ok_or_else(short)?;
    Ok((head >> 6, id, value, &b[i + len..]))
}

fn tlv_value(v: &[u8], kind: Kind) -> Result<Value, String> {
    let n = match (kind, v.len()) {
        (Kind::Float, 4) => f64::from(f32::from_be_bytes(v.try_into().expect("4 bytes"))),
        (Kind::Float, 8) => f64::from_be_bytes(v.try_into().expect("8 bytes")),
        (Kind::Integer, 1 | 2 | 4 | 8) => {
            // sign-extend from the first byte
            let init: i64 = if v[0] & 0x80 != 0 { -1 } else { 0 };
            v.iter().fold(init, |a, x| (a << 8) | i64::from(*x)) as f64
        }
        _ => return Err(format!("TLV value of {} bytes is not a {kind:?}", v.len())),
    };
    if n.is_finite() {
        Ok(Value::Number(n))
    } else {
        Err("non-finite TLV value".into())
    }
}

/// A SenML record reduced to the fields LwM2M uses.
#[derive(Default)]
struct Record {
    bn: Option<String>,
    bt: Option<f64>,
    n: Option<String>,
    t: Option<f64>,
    value: Option<Value>,
}

fn json_records(v: &serde_json::Value) -> Result<Vec<Record>, String> {
    let arr = v.as_array().ok_or("SenML pack must be an array")?;
    arr.iter()
        .map(|r| {
            let m = r.as_object().ok_or("SenML record must be a map")?;
            let mut rec = Record {
                bn: m.get("bn").and_then(|x| x.as_str()).map(str::to_string),
                bt: m.get("bt").and_then(|x| x.as_f64()),
                n: m.get("n").and_then(|x| x.as_str()).map(str::to_string),
                t: m.get("t").and_then(|x| x.as_f64()),
                value: None,
            };
            rec.value = if let Some(v) = m.get("v").and_then(|x| x.as_f64()) {
                Some(Value::Number(v))
            } else if let Some(s) = m.get("vs").and_then(|x| x.as_str()) {
                Some(Value::Text(s.to_string()))
            } else {
                m.get("vb").and_then(|x| x.as_bool()).map(Value::Boolean)
            };
            Ok(rec)
        })
        .collect()
}

fn cbor_records(v: &ciborium::Value) -> Result<Vec<Record>, String> {
    use ciborium::Value as C;
    let arr = v.as_array().ok_or("SenML pack must be an array")?;
    let num = |x: &C| match x {
        C::Float(f) => Some(*f),
        C::Integer(i) => Some(i128::from(*i) as f64),
        _ => None,
    };
    arr.iter()
        .map(|r| {
            let m = r.as_map().ok_or("SenML record must be a map")?;
            let mut fields = BTreeMap::new();
            for (k, v) in m {
                let label = match k {
                    C::Integer(i) => i128::from(*i),
                    C::Text(t) => match t.as_str() {
                        "bn" => -2,
                        "bt" => -3,
                        "n" => 0,
                        "v" => 2,
                        "vs" => 3,
                        "vb" => 4,
                        "t" => 6,
                        _ => continue,
                    },
                    _ => continue,
                };
                fields.insert(label, v);
            }
            let text = |l: i128| fields.get(&l).and_then(|x| x.as_text()).map(str::to_string);
            let value = if let Some(v) = fields.get(&2).and_then(|x| num(x)) {
                Some(Value::Number(v))
            } else if let Some(s) = text(3) {
                Some(Value::Text(s))
            } else {
                fields.get(&4).and_then(|x| x.as_bool()).map(Value::Boolean)
            };
            Ok(Record {
                bn: text(-2),
                bt: fields.get(&-3).and_then(|x| num(x)),
                n: text(0),
                t: fields.get(&6).and_then(|x| num(x)),
                value,
            })
        })
        .collect()
}

fn senml(records: Vec<Record>, now_ms: i64) -> Result<Values, String> {
    let (mut bn, mut bt) = (String::new(), 0.0);
    let mut out = Vec::new();
    for r in records {
        if let Some(b) = r.bn {
            bn = b;
        }
        if let Some(t) = r.bt {
            bt = t;
        }
        let Some(value) = r.value else { continue };
        if matches!(value, Value::Number(n) if !n.is_finite()) {
            return Err("non-finite value".into());
        }
        let name = format!("{bn}{}", r.n.unwrap_or_default());
        let path = Path::parse(&name).ok_or_else(|| format!("{name:?} is not a resource path"))?;
        let t = bt + r.t.unwrap_or(0.0);
        // RFC 8428: values below 2^28 are relative to now; 0 means "now".
        let time_ms = if t == 0.0 {
            None
        } else if t.abs() < 268_435_456.0 {
            Some(now_ms + (t * 1000.0).round() as i64)
        } else {
            Some((t * 1000.0).round() as i64)
        };
        out.push((path, value, time_ms));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> Option<Path> {
        Path::parse("/3303/0/5700")
    }

    fn number(d: &Decoded) -> f64 {
        match d.value {
            Value::Number(n) => n,
            ref other => panic!("{other:?}"),
        }
    }

    #[test]
    fn text_values() {
        let d = decode(None, b"21.5", temp(), 0).unwrap();
        assert_eq!(
            (d[0].quantity.as_str(), d[0].unit.as_str(), number(&d[0])),
            ("temperature", "Cel", 21.5)
        );
        let d = decode(Some(0), b"87", Path::parse("/3/0/9"), 0).unwrap();
        assert_eq!((d[0].quantity.as_str(), number(&d[0])), ("battery", 87.0));
    }

    #[test]
    fn tlv_values() {
        // resource 5700 (16-bit id), 8-byte float 22.25
        let mut b = vec![0b1110_1000, 0x16, 0x44, 8];
        b.extend_from_slice(&22.25f64.to_be_bytes());
        let d = decode(Some(CF_TLV), &b, temp(), 0).unwrap();
        assert_eq!(number(&d[0]), 22.25);
        // object instance 0 holding resource 9 = 1 byte integer 55 (battery)
        let inner = [0b1100_0001, 9, 55];
        let mut b = vec![0b0000_0011, 0];
        b.extend_from_slice(&inner);
        let d = decode(Some(CF_TLV), &b, Path::parse("/3/0/9"), 0).unwrap();
        assert_eq!((d[0].quantity.as_str(), number(&d[0])), ("battery", 55.0));
        // negative 2-byte integer
        assert_eq!(
            tlv_value(&[0xff, 0xfe], Kind::Integer).unwrap(),
            Value::Number(-2.0)
        );
        assert!(
            decode(Some(CF_TLV), &[0xe8, 0x16], temp(), 0).is_err(),
            "truncated"
        );
    }

    #[test]
    fn senml_with_paths() {
        let json = br#"[{"bn":"/3303/0/","bt":1700000000,"n":"5700","v":19.5},{"bn":"/3304/0/","n":"5700","v":40}]"#;
        let d = decode(Some(CF_SENML_JSON), json, None, 0).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].quantity.as_str(), d[0].time_ms),
            ("temperature", Some(1_700_000_000_000))
        );
        assert_eq!((d[1].quantity.as_str(), number(&d[1])), ("humidity", 40.0));

        use ciborium::Value as C;
        let pack = C::Array(vec![C::Map(vec![
            (C::Integer((-2).into()), C::Text("/3/0/".into())),
            (C::Integer(0.into()), C::Text("9".into())),
            (C::Integer(2.into()), C::Integer(77.into())),
            (C::Integer(6.into()), C::Integer((-5).into())),
        ])]);
        let mut cbor = Vec::new();
        ciborium::into_writer(&pack, &mut cbor).unwrap();
        let d = decode(Some(CF_SENML_CBOR), &cbor, None, 10_000).unwrap();
        assert_eq!(
            (d[0].quantity.as_str(), number(&d[0]), d[0].time_ms),
            ("battery", 77.0, Some(5_000))
        );
        assert!(decode(Some(CF_SENML_JSON), br#"[{"n":"temp","v":1}]"#, None, 0).is_err());
    }
}
