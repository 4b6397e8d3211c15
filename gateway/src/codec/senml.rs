//! SenML (RFC 8428) in JSON and in CBOR: the standard format of LwM2M and many NB-IoT and
//! LoRaWAN devices, so the gateway accepts it without a custom per-vendor decoder.
//!
//! Both encodings are read into the same record model and resolved by one `Resolver`, so the
//! RFC's base-value rules are implemented once.
//!
//! # Fields
//!
//! `bver`, `bn`, `bt`, `bu`, `bv`, `bs`, `n`, `u`, `v`, `vs`, `vb`, `vd`, `s`, `t`, `ut`. In CBOR
//! both the RFC's integer labels (bver=-1, bn=-2, bt=-3, bu=-4, bv=-5, bs=-6, n=0, u=1, v=2, vs=3,
//! vb=4, s=5, t=6, ut=7, vd=8) and the JSON string keys are accepted, because some encoders
//! write string keys into CBOR. Unknown fields are ignored, except must-understand fields (names
//! ending in `_`), which refuse the pack as the RFC requires; so does a `bver` above 10.
//!
//! # Resolution (RFC 8428 section 4.6)
//!
//! - Base fields (`bn`, `bt`, `bu`, `bv`, `bs`) apply to their own record and every following one
//!   until a later record sets them again. A record with only base fields just sets them.
//! - Quantity name: the record's `n`, as sent. The base name usually identifies the *device*, and
//!   identity comes from the authenticated session, so it is **not** prepended. Only when `n` is
//!   empty or absent is `bn` used, minus trailing `:` or `/` (a single-sensor device).
//! - Value: `v` (plus `bv`) becomes a `Number`, `vs` a `Text`, `vb` a `Boolean`, `vd` a `Text`
//!   holding base64url (as sent in JSON; CBOR's byte string is encoded without padding). A sum `s`
//!   (plus `bs`) becomes a separate `Number` named `<name>_sum`. A record may carry at most one of
//!   `v`/`vs`/`vb`/`vd`, and needs one of them or `s`.
//! - Unit: `u`, else `bu`, else "".
//! - Time: `bt + t` in seconds. 0 (no time at all) leaves the time to the pipeline; 2^28 s or more
//!   is absolute Unix time; anything else (typically negative) is relative to the receive time.
//!   Converted to milliseconds, rounded. `ut` is checked but not used.
//!
//! # Errors
//!
//! Invalid JSON is `malformed_json`, invalid or truncated CBOR `malformed_cbor`; a well-formed
//! document that is not a SenML pack (not an array of maps, a record without value or name, a
//! field of the wrong type) is `malformed_senml`. Non-finite `v`/`s` are `non_finite_value`, bad
//! or non-finite times `bad_timestamp`, and a pack without any value `no_readings`.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use ciborium::Value as Cbor;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::json::{Key, Scalar};
use super::{reason, DecodeError, Decoded, Decoder};
use crate::proto::reading::Value;

/// Decoder for [`Format::SenmlJson`](super::Format::SenmlJson).
#[derive(Debug, Default, Clone, Copy)]
pub struct SenmlJsonDecoder;

/// Decoder for [`Format::SenmlCbor`](super::Format::SenmlCbor).
#[derive(Debug, Default, Clone, Copy)]
pub struct SenmlCborDecoder;

/// Times at or above 2^28 seconds (1978) are absolute, below are relative (RFC 8428 section 4.5.3).
const ABSOLUTE_TIME_THRESHOLD: f64 = (1u64 << 28) as f64;

/// The highest SenML version this decoder understands; the RFC says to refuse newer packs.
const SENML_VERSION: f64 = 10.0;

fn senml_err(detail: impl Into<String>) -> DecodeError {
    DecodeError::new(reason::MALFORMED_SENML, detail)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Bver,
    Bn,
    Bt,
    Bu,
    Bv,
    Bs,
    N,
    U,
    V,
    Vs,
    Vb,
    S,
    T,
    Ut,
    Vd,
}

impl Field {
    fn from_name(name: &str) -> Result<Option<Field>, DecodeError> {
        Ok(Some(match name {
            "bver" => Field::Bver,
            "bn" => Field::Bn,
            "bt" => Field::Bt,
            "bu" => Field::Bu,
            "bv" => Field::Bv,
            "bs" => Field::Bs,
            "n" => Field::N,
            "u" => Field::U,
            "v" => Field::V,
            "vs" => Field::Vs,
            "vb" => Field::Vb,
            "s" => Field::S,
            "t" => Field::T,
            "ut" => Field::Ut,
            "vd" => Field::Vd,
            _ if name.ends_with('_') => {
                return Err(senml_err(format!(
                    "unsupported must-understand field {name:?}"
                )))
            }
            _ => return Ok(None),
        }))
    }

    fn from_label(label: i128) -> Option<Field> {
        Some(match label {
            -1 => Field::Bver,
            -2 => Field::Bn,
            -3 => Field::Bt,
            -4 => Field::Bu,
            -5 => Field::Bv,
            -6 => Field::Bs,
            0 => Field::N,
            1 => Field::U,
            2 => Field::V,
            3 => Field::Vs,
            4 => Field::Vb,
            5 => Field::S,
            6 => Field::T,
            7 => Field::Ut,
            8 => Field::Vd,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Field::Bver => "bver",
            Field::Bn => "bn",
            Field::Bt => "bt",
            Field::Bu => "bu",
            Field::Bv => "bv",
            Field::Bs => "bs",
            Field::N => "n",
            Field::U => "u",
            Field::V => "v",
            Field::Vs => "vs",
            Field::Vb => "vb",
            Field::S => "s",
            Field::T => "t",
            Field::Ut => "ut",
            Field::Vd => "vd",
        }
    }
}

/// A field's value in either encoding, borrowed from the parsed input.
enum FieldValue<'a> {
    Num(f64),
    Str(Cow<'a, str>),
    Bool(bool),
    Bytes(&'a [u8]),
    Other(&'static str),
}

impl FieldValue<'_> {
    fn kind(&self) -> &'static str {
        match self {
            FieldValue::Num(_) => "a number",
            FieldValue::Str(_) => "a string",
            FieldValue::Bool(_) => "a bool",
            FieldValue::Bytes(_) => "a byte string",
            FieldValue::Other(k) => k,
        }
    }
}

/// One record as sent, before base values are applied.
#[derive(Default)]
struct Record<'a> {
    bver: Option<f64>,
    bn: Option<Cow<'a, str>>,
    bt: Option<f64>,
    bu: Option<Cow<'a, str>>,
    bv: Option<f64>,
    bs: Option<f64>,
    n: Option<Cow<'a, str>>,
    u: Option<Cow<'a, str>>,
    v: Option<f64>,
    vs: Option<Cow<'a, str>>,
    vb: Option<bool>,
    vd: Option<Cow<'a, str>>,
    s: Option<f64>,
    t: Option<f64>,
    ut: Option<f64>,
}

impl<'a> Record<'a> {
    fn set(&mut self, field: Field, value: FieldValue<'a>) -> Result<(), DecodeError> {
        let wrong_type = |expected: &str, value: &FieldValue| {
            let detail = format!(
                "field {} must be {expected}, got {}",
                field.name(),
                value.kind()
            );
            match field {
                Field::Bt | Field::T | Field::Ut => DecodeError::new(reason::BAD_TIMESTAMP, detail),
                _ => senml_err(detail),
            }
        };
        match field {
            Field::Bver
            | Field::Bt
            | Field::Bv
            | Field::Bs
            | Field::V
            | Field::S
            | Field::T
            | Field::Ut => {
                let FieldValue::Num(x) = value else {
                    return Err(wrong_type("a number", &value));
                };
                if !x.is_finite() {
                    let detail = format!("field {} is {x}", field.name());
                    return Err(match field {
                        Field::Bt | Field::T | Field::Ut => {
                            DecodeError::new(reason::BAD_TIMESTAMP, detail)
                        }
                        Field::Bver => senml_err(detail),
                        _ => DecodeError::new(reason::NON_FINITE_VALUE, detail),
                    });
                }
                let slot = match field {
                    Field::Bver => &mut self.bver,
                    Field::Bt => &mut self.bt,
                    Field::Bv => &mut self.bv,
                    Field::Bs => &mut self.bs,
                    Field::V => &mut self.v,
                    Field::S => &mut self.s,
                    Field::T => &mut self.t,
                    _ => &mut self.ut,
                };
                *slot = Some(x);
            }
            Field::Bn | Field::Bu | Field::N | Field::U | Field::Vs => {
                let FieldValue::Str(x) = value else {
                    return Err(wrong_type("a string", &value));
                };
                let slot = match field {
                    Field::Bn => &mut self.bn,
                    Field::Bu => &mut self.bu,
                    Field::N => &mut self.n,
                    Field::U => &mut self.u,
                    _ => &mut self.vs,
                };
                *slot = Some(x);
            }
            Field::Vb => match value {
                FieldValue::Bool(b) => self.vb = Some(b),
                other => return Err(wrong_type("a bool", &other)),
            },
            Field::Vd => match value {
                // JSON carries base64url text already; it is kept as sent.
                FieldValue::Str(s) => self.vd = Some(s),
                FieldValue::Bytes(b) => {
                    self.vd = Some(Cow::Owned(
                        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
                    ))
                }
                other => return Err(wrong_type("base64url data", &other)),
            },
        }
        Ok(())
    }
}

/// Applies base values record by record, in pack order, and collects the readings.
struct Resolver<'a> {
    now_ms: i64,
    bn: Option<Cow<'a, str>>,
    bt: f64,
    bu: Option<Cow<'a, str>>,
    bv: f64,
    bs: f64,
    out: Vec<Decoded>,
}

impl<'a> Resolver<'a> {
    fn new(now_ms: i64) -> Self {
        Resolver {
            now_ms,
            bn: None,
            bt: 0.0,
            bu: None,
            bv: 0.0,
            bs: 0.0,
            out: Vec::new(),
        }
    }

    fn record(&mut self, rec: Record<'a>) -> Result<(), DecodeError> {
        if let Some(ver) = rec.bver {
            if ver > SENML_VERSION {
                return Err(senml_err(format!(
                    "SenML version {ver} is newer than {SENML_VERSION}"
                )));
            }
        }
        if rec.bn.is_some() {
            self.bn = rec.bn;
        }
        if let Some(bt) = rec.bt {
            self.bt = bt;
        }
        if rec.bu.is_some() {
            self.bu = rec.bu;
        }
        if let Some(bv) = rec.bv {
            self.bv = bv;
        }
        if let Some(bs) = rec.bs {
            self.bs = bs;
        }

        let value_fields = rec.v.is_some() as u8
            + rec.vs.is_some() as u8
            + rec.vb.is_some() as u8
            + rec.vd.is_some() as u8;
        if value_fields > 1 {
            return Err(senml_err("record has more than one of v, vs, vb, vd"));
        }
        if value_fields == 0 && rec.s.is_none() {
            if rec.n.is_some() || rec.u.is_some() || rec.t.is_some() || rec.ut.is_some() {
                let name = rec.n.as_deref().unwrap_or("");
                return Err(senml_err(format!(
                    "record {name:?} has no value (v, vs, vb, vd or s)"
                )));
            }
            return Ok(()); // base fields only
        }

        let name: &str = match rec.n.as_deref() {
            Some(n) if !n.is_empty() => n,
            _ => self
                .bn
                .as_deref()
                .unwrap_or("")
                .trim_end_matches([':', '/']),
        };
        if name.is_empty() {
            return Err(senml_err(
                "record has neither a name (n) nor a base name (bn)",
            ));
        }
        let unit = rec.u.as_deref().or(self.bu.as_deref()).unwrap_or("");
        let time_ms = self.time(rec.t.unwrap_or(0.0))?;

        let value = if let Some(v) = rec.v {
            Some(Value::Number(finite(self.bv + v, name)?))
        } else if let Some(vs) = rec.vs {
            Some(Value::Text(vs.into_owned()))
        } else if let Some(vb) = rec.vb {
            Some(Value::Boolean(vb))
        } else {
            rec.vd.map(|vd| Value::Text(vd.into_owned()))
        };
        if let Some(value) = value {
            self.out.push(Decoded {
                quantity: name.to_owned(),
                value,
                unit: unit.to_owned(),
                time_ms,
                seq: None,
                location: None,
            });
        }
        if let Some(s) = rec.s {
            self.out.push(Decoded {
                quantity: format!("{name}_sum"),
                value: Value::Number(finite(self.bs + s, name)?),
                unit: unit.to_owned(),
                time_ms,
                seq: None,
                location: None,
            });
        }
        Ok(())
    }

    fn time(&self, t: f64) -> Result<Option<i64>, DecodeError> {
        let secs = self.bt + t;
        if secs == 0.0 {
            Ok(None)
        } else if secs >= ABSOLUTE_TIME_THRESHOLD {
            super::time_ms_from_f64(secs * 1000.0, "time").map(Some)
        } else {
            super::time_ms_from_f64(self.now_ms as f64 + secs * 1000.0, "relative time").map(Some)
        }
    }

    fn finish(self) -> Result<Vec<Decoded>, DecodeError> {
        if self.out.is_empty() {
            return Err(DecodeError::new(
                reason::NO_READINGS,
                "SenML pack holds no values",
            ));
        }
        Ok(self.out)
    }
}

/// `bv + v` can overflow even when both are finite.
fn finite(x: f64, name: &str) -> Result<f64, DecodeError> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(DecodeError::new(
            reason::NON_FINITE_VALUE,
            format!("{name}: value is {x}"),
        ))
    }
}

// ---------------------------------------------------------------- JSON

impl Decoder for SenmlJsonDecoder {
    fn decode(&self, payload: &[u8], now_ms: i64) -> Result<Vec<Decoded>, DecodeError> {
        let text = super::trim_text_payload(payload)?;
        let mut state = JsonState {
            res: Resolver::new(now_ms),
            err: None,
        };
        let mut de = serde_json::Deserializer::from_slice(text);
        let parsed = Pack(&mut state)
            .deserialize(&mut de)
            .and_then(|()| de.end());
        if let Err(e) = parsed {
            return Err(match state.err.take() {
                Some(err) => err,
                // A visitor refused a JSON type: well-formed JSON, but not SenML.
                None if e.classify() == serde_json::error::Category::Data => {
                    senml_err(e.to_string())
                }
                None => super::json_syntax_error(text, e),
            });
        }
        state.res.finish()
    }
}

/// Streaming parse state; the typed error is kept here because serde errors only carry text.
struct JsonState<'de> {
    res: Resolver<'de>,
    err: Option<DecodeError>,
}

impl JsonState<'_> {
    fn fail<E: de::Error>(&mut self, err: DecodeError) -> E {
        let e = E::custom(&err.detail);
        self.err = Some(err);
        e
    }
}

struct Pack<'s, 'de>(&'s mut JsonState<'de>);

impl<'de> DeserializeSeed<'de> for Pack<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Pack<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SenML pack (an array of records)")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(JsonRecord(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

struct JsonRecord<'s, 'de>(&'s mut JsonState<'de>);

impl<'de> DeserializeSeed<'de> for JsonRecord<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonRecord<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SenML record (an object)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let state = self.0;
        let mut rec = Record::default();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let field = match Field::from_name(&key) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                Err(e) => return Err(state.fail(e)),
            };
            let value = match map.next_value::<Scalar<'de>>()? {
                Scalar::U(u) => FieldValue::Num(u as f64),
                Scalar::I(i) => FieldValue::Num(i as f64),
                Scalar::F(f) => FieldValue::Num(f),
                Scalar::B(b) => FieldValue::Bool(b),
                Scalar::S(s) => FieldValue::Str(s),
                other => FieldValue::Other(other.kind()),
            };
            if let Err(e) = rec.set(field, value) {
                return Err(state.fail(e));
            }
        }
        match state.res.record(rec) {
            Ok(()) => Ok(()),
            Err(e) => Err(state.fail(e)),
        }
    }
}

// ---------------------------------------------------------------- CBOR

impl Decoder for SenmlCborDecoder {
    fn decode(&self, payload: &[u8], now_ms: i64) -> Result<Vec<Decoded>, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::new(reason::EMPTY_PAYLOAD, "payload is empty"));
        }
        let mut rest = payload;
        let doc: Cbor = ciborium::de::from_reader(&mut rest)
            .map_err(|e| DecodeError::new(reason::MALFORMED_CBOR, cbor_error_detail(&e)))?;
        if !rest.is_empty() {
            let detail = format!("{} bytes after the end of the CBOR item", rest.len());
            return Err(DecodeError::new(reason::MALFORMED_CBOR, detail));
        }
        let Cbor::Array(records) = untag(&doc) else {
            return Err(senml_err(format!(
                "a SenML pack is an array of records, got {}",
                cbor_kind(&doc)
            )));
        };
        let mut res = Resolver::new(now_ms);
        for (i, r) in records.iter().enumerate() {
            let Cbor::Map(entries) = untag(r) else {
                return Err(senml_err(format!(
                    "record {i} is {}, not a map",
                    cbor_kind(r)
                )));
            };
            let mut rec = Record::default();
            for (k, v) in entries {
                let field = match untag(k) {
                    Cbor::Integer(label) => Field::from_label(i128::from(*label)),
                    Cbor::Text(name) => Field::from_name(name)?,
                    other => {
                        return Err(senml_err(format!(
                            "record {i} has a key that is {}",
                            cbor_kind(other)
                        )))
                    }
                };
                if let Some(field) = field {
                    rec.set(field, cbor_value(v))?;
                }
            }
            res.record(rec)?;
        }
        res.finish()
    }
}

fn cbor_error_detail(e: &ciborium::de::Error<std::io::Error>) -> String {
    match e {
        ciborium::de::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "truncated CBOR".to_string()
        }
        ciborium::de::Error::Io(io) => io.to_string(),
        ciborium::de::Error::Syntax(at) => format!("invalid CBOR at byte {at}"),
        ciborium::de::Error::Semantic(Some(at), msg) => format!("invalid CBOR at byte {at}: {msg}"),
        ciborium::de::Error::Semantic(None, msg) => format!("invalid CBOR: {msg}"),
        ciborium::de::Error::RecursionLimitExceeded => "CBOR nested too deeply".to_string(),
    }
}

/// Tags carry no meaning for SenML (a self-describe tag 55799 may wrap the pack, an epoch tag a
/// time), so they are looked through.
fn untag(mut v: &Cbor) -> &Cbor {
    while let Cbor::Tag(_, inner) = v {
        v = inner;
    }
    v
}

fn cbor_value(v: &Cbor) -> FieldValue<'_> {
    match untag(v) {
        Cbor::Integer(i) => FieldValue::Num(i128::from(*i) as f64),
        Cbor::Float(f) => FieldValue::Num(*f),
        Cbor::Text(s) => FieldValue::Str(Cow::Borrowed(s)),
        Cbor::Bool(b) => FieldValue::Bool(*b),
        Cbor::Bytes(b) => FieldValue::Bytes(b),
        other => FieldValue::Other(cbor_kind(other)),
    }
}

fn cbor_kind(v: &Cbor) -> &'static str {
    match v {
        Cbor::Integer(_) | Cbor::Float(_) => "a number",
        Cbor::Text(_) => "a text string",
        Cbor::Bytes(_) => "a byte string",
        Cbor::Bool(_) => "a bool",
        Cbor::Null => "null",
        Cbor::Tag(_, inner) => cbor_kind(inner),
        Cbor::Array(_) => "an array",
        Cbor::Map(_) => "a map",
        _ => "an unsupported CBOR item",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::Reason;

    const NOW: i64 = 1_750_000_000_000;

    fn json(s: &str) -> Result<Vec<Decoded>, DecodeError> {
        SenmlJsonDecoder.decode(s.as_bytes(), NOW)
    }

    fn json_reason(s: &str) -> Reason {
        match json(s) {
            Ok(v) => panic!("expected an error for {s}, got {v:?}"),
            Err(e) => e.reason,
        }
    }

    fn cbor_bytes(v: &Cbor) -> Vec<u8> {
        let mut buf = Vec::new();
        ciborium::ser::into_writer(v, &mut buf).unwrap();
        buf
    }

    fn cbor(v: &Cbor) -> Result<Vec<Decoded>, DecodeError> {
        SenmlCborDecoder.decode(&cbor_bytes(v), NOW)
    }

    fn cbor_reason(v: &Cbor) -> Reason {
        match cbor(v) {
            Ok(out) => panic!("expected an error for {v:?}, got {out:?}"),
            Err(e) => e.reason,
        }
    }

    fn int(i: i64) -> Cbor {
        Cbor::Integer(i.into())
    }

    fn text(s: &str) -> Cbor {
        Cbor::Text(s.into())
    }

    fn map(entries: Vec<(Cbor, Cbor)>) -> Cbor {
        Cbor::Map(entries)
    }

    #[test]
    fn rfc_example_multiple_datapoints() {
        // RFC 8428 section 5.1.2, with the base name carrying the device id.
        let out = json(
            r#"[
              {"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,"bu":"%RH","v":20},
              {"u":"lon","v":24.30621},
              {"u":"lat","v":60.07965},
              {"t":60,"v":20.3},
              {"u":"lon","t":60,"v":24.30622},
              {"n":"temperature","u":"Cel","t":120,"v":20.7}
            ]"#,
        )
        .unwrap();
        assert_eq!(out.len(), 6);
        // No n: the base name (without its trailing ':') is the quantity.
        assert_eq!(out[0].quantity, "urn:dev:ow:10e2073a01080063");
        assert_eq!(out[0].unit, "%RH");
        assert_eq!(out[0].time_ms, Some(1_320_067_464_000));
        assert_eq!(out[1].unit, "lon");
        assert_eq!(out[3].time_ms, Some(1_320_067_524_000));
        assert_eq!(out[3].unit, "%RH");
        // n is not prefixed with bn.
        assert_eq!(out[5].quantity, "temperature");
        assert_eq!(out[5].unit, "Cel");
        assert_eq!(out[5].value, Value::Number(20.7));
        assert_eq!(out[5].time_ms, Some(1_320_067_584_000));
    }

    #[test]
    fn value_kinds_and_sum() {
        let out = json(
            r#"[{"bn":"dev/","n":"temp","v":21.5,"u":"Cel"},
                {"n":"status","vs":"ok"},
                {"n":"lamp_state","vb":true},
                {"n":"blob","vd":"aGVsbG8"},
                {"n":"energy","u":"kWh","s":1234.5},
                {"n":"flow","v":2,"s":100}]"#,
        )
        .unwrap();
        let q: Vec<_> = out.iter().map(|d| d.quantity.as_str()).collect();
        assert_eq!(
            q,
            [
                "temp",
                "status",
                "lamp_state",
                "blob",
                "energy_sum",
                "flow",
                "flow_sum"
            ]
        );
        assert_eq!(out[1].value, Value::Text("ok".into()));
        assert_eq!(out[2].value, Value::Boolean(true));
        assert_eq!(out[3].value, Value::Text("aGVsbG8".into()));
        assert_eq!(out[4].value, Value::Number(1234.5));
        assert_eq!(out[4].unit, "kWh");
        assert!(out
            .iter()
            .all(|d| d.time_ms.is_none() && d.seq.is_none() && d.location.is_none()));
    }

    #[test]
    fn base_values_apply_until_changed() {
        let out = json(
            r#"[{"bn":"meter:","bv":100,"bs":1000,"bu":"kWh","n":"e","v":1,"s":1},
                {"n":"e","v":2},
                {"bv":0,"n":"e","v":3},
                {"bu":"Wh","n":"e","v":4},
                {"n":"e","u":"MWh","v":5,"s":2}]"#,
        )
        .unwrap();
        let vals: Vec<_> = out
            .iter()
            .map(|d| (d.quantity.as_str(), d.value.clone(), d.unit.as_str()))
            .collect();
        assert_eq!(
            vals,
            [
                ("e", Value::Number(101.0), "kWh"),
                ("e_sum", Value::Number(1001.0), "kWh"),
                ("e", Value::Number(102.0), "kWh"),
                ("e", Value::Number(3.0), "kWh"),
                ("e", Value::Number(4.0), "Wh"),
                ("e", Value::Number(5.0), "MWh"),
                ("e_sum", Value::Number(1002.0), "MWh"),
            ]
        );
    }

    #[test]
    fn base_only_record_and_bn_name() {
        let out =
            json(r#"[{"bn":"urn:dev:mac:0024befffe804ff1/","bt":1700000000,"bver":10},{"v":3}]"#)
                .unwrap();
        assert_eq!(out[0].quantity, "urn:dev:mac:0024befffe804ff1");
        assert_eq!(out[0].time_ms, Some(1_700_000_000_000));
        // Empty n falls back to bn too.
        let out = json(r#"[{"bn":"water_level","n":"","v":1.5}]"#).unwrap();
        assert_eq!(out[0].quantity, "water_level");
    }

    #[test]
    fn times() {
        let t = |s: &str| json(s).unwrap()[0].time_ms;
        // No time at all.
        assert_eq!(t(r#"[{"n":"x","v":1}]"#), None);
        assert_eq!(t(r#"[{"n":"x","v":1,"t":0}]"#), None);
        // Relative to the receive time.
        assert_eq!(t(r#"[{"n":"x","v":1,"t":-5}]"#), Some(NOW - 5000));
        assert_eq!(t(r#"[{"n":"x","v":1,"t":-0.0016}]"#), Some(NOW - 2));
        assert_eq!(
            t(r#"[{"bt":-60,"n":"x","v":1,"t":10}]"#),
            Some(NOW - 50_000)
        );
        // Absolute, fractional seconds rounded to ms.
        assert_eq!(
            t(r#"[{"n":"x","v":1,"t":1700000000.1234}]"#),
            Some(1_700_000_000_123)
        );
        assert_eq!(
            t(r#"[{"bt":1700000000,"n":"x","v":1,"t":-1.5}]"#),
            Some(1_699_999_998_500)
        );
        // Just at the threshold is absolute.
        assert_eq!(
            t(r#"[{"n":"x","v":1,"t":268435456}]"#),
            Some(268_435_456_000)
        );
        for s in [
            r#"[{"n":"x","v":1,"t":"now"}]"#,
            r#"[{"n":"x","v":1,"bt":true}]"#,
            r#"[{"n":"x","v":1,"ut":null}]"#,
            r#"[{"n":"x","v":1,"t":1e300}]"#,
            r#"[{"n":"x","v":1,"t":-1e300}]"#,
        ] {
            assert_eq!(json_reason(s), reason::BAD_TIMESTAMP, "{s}");
        }
    }

    #[test]
    fn json_errors() {
        assert_eq!(json_reason(""), reason::EMPTY_PAYLOAD);
        assert_eq!(
            json_reason("[{\"n\":\"x\",\"v\":1}"),
            reason::MALFORMED_JSON
        );
        assert_eq!(json_reason("[{n:1}]"), reason::MALFORMED_JSON);
        for s in [
            r#"[{"n":"x","v":NaN}]"#,
            r#"[{"n":"x","v":Infinity}]"#,
            r#"[{"n":"x","v":-1e999}]"#,
        ] {
            assert_eq!(json_reason(s), reason::NON_FINITE_VALUE, "{s}");
        }
        assert_eq!(
            json_reason(r#"[{"n":"x","bv":1e308,"v":1e308}]"#),
            reason::NON_FINITE_VALUE
        );
        for s in [
            r#"{"n":"x","v":1}"#,
            r#"42"#,
            r#"[1]"#,
            r#"[[{"n":"x","v":1}]]"#,
            r#"[{"n":"x"}]"#,
            r#"[{"n":"x","u":"Cel"}]"#,
            r#"[{"v":1}]"#,
            r#"[{"bn":"/","v":1}]"#,
            r#"[{"n":"x","v":"1"}]"#,
            r#"[{"n":"x","vs":1}]"#,
            r#"[{"n":"x","vb":"true"}]"#,
            r#"[{"n":"x","vd":5}]"#,
            r#"[{"n":5,"v":1}]"#,
            r#"[{"n":"x","v":1,"vs":"a"}]"#,
            r#"[{"n":"x","v":{"a":1}}]"#,
            r#"[{"n":"x","v":1,"crit_":1}]"#,
            r#"[{"bver":11,"n":"x","v":1}]"#,
        ] {
            assert_eq!(json_reason(s), reason::MALFORMED_SENML, "{s}");
        }
        assert_eq!(json_reason("[]"), reason::NO_READINGS);
        assert_eq!(
            json_reason(r#"[{"bn":"dev:","bt":1700000000}]"#),
            reason::NO_READINGS
        );
        // Unknown (not must-understand) fields are ignored.
        assert_eq!(
            json(r#"[{"n":"x","v":1,"foo":{"bar":[1]}}]"#)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn unicode_name() {
        let out = json(r#"[{"n":"độ ẩm","u":"%RH","v":80}]"#).unwrap();
        assert_eq!(out[0].quantity, "độ ẩm");
    }

    #[test]
    fn cbor_integer_labels() {
        let pack = Cbor::Array(vec![
            map(vec![
                (int(-2), text("urn:dev:ow:10e2073a01080063:")),
                (int(-3), Cbor::Float(1_700_000_000.0)),
                (int(-4), text("Cel")),
                (int(-5), int(20)),
                (int(-1), int(10)),
                (int(0), text("temperature")),
                (int(2), Cbor::Float(1.5)),
            ]),
            map(vec![
                (int(0), text("temperature")),
                (int(6), int(60)),
                (int(2), int(2)),
            ]),
            map(vec![
                (int(0), text("status")),
                (int(3), text("ok")),
                (int(1), text("")),
            ]),
            map(vec![
                (int(0), text("lamp_state")),
                (int(4), Cbor::Bool(false)),
            ]),
            map(vec![
                (int(0), text("raw")),
                (int(8), Cbor::Bytes(vec![0xfb, 0xff, 0x01])),
            ]),
            map(vec![
                (int(-6), int(10)),
                (int(0), text("energy")),
                (int(5), int(5)),
                (int(7), int(60)),
            ]),
        ]);
        let out = cbor(&pack).unwrap();
        let summary: Vec<_> = out
            .iter()
            .map(|d| {
                (
                    d.quantity.as_str(),
                    d.value.clone(),
                    d.unit.as_str(),
                    d.time_ms,
                )
            })
            .collect();
        let t0 = Some(1_700_000_000_000);
        assert_eq!(
            summary,
            [
                ("temperature", Value::Number(21.5), "Cel", t0),
                (
                    "temperature",
                    Value::Number(22.0),
                    "Cel",
                    Some(1_700_000_060_000)
                ),
                ("status", Value::Text("ok".into()), "", t0),
                ("lamp_state", Value::Boolean(false), "Cel", t0),
                ("raw", Value::Text("-_8B".into()), "Cel", t0),
                ("energy_sum", Value::Number(15.0), "Cel", t0),
            ]
        );
    }

    #[test]
    fn cbor_string_keys_tags_and_relative_time() {
        let pack = Cbor::Tag(
            55799,
            Box::new(Cbor::Array(vec![map(vec![
                (text("n"), text("noise")),
                (text("u"), text("dBA")),
                (text("v"), Cbor::Float(61.5)),
                (text("t"), int(-10)),
            ])])),
        );
        let out = cbor(&pack).unwrap();
        assert_eq!(out[0].quantity, "noise");
        assert_eq!(out[0].time_ms, Some(NOW - 10_000));
        // Mixed integer and string keys; a string vd is kept as sent.
        let pack = Cbor::Array(vec![map(vec![
            (int(0), text("x")),
            (text("vd"), text("AAE")),
        ])]);
        assert_eq!(cbor(&pack).unwrap()[0].value, Value::Text("AAE".into()));
    }

    #[test]
    fn cbor_errors() {
        let good = Cbor::Array(vec![map(vec![
            (int(0), text("temperature")),
            (int(2), Cbor::Float(21.5)),
        ])]);
        let bytes = cbor_bytes(&good);
        assert!(SenmlCborDecoder.decode(&bytes, NOW).is_ok());
        // Every truncation is malformed CBOR.
        for len in 1..bytes.len() {
            let err = SenmlCborDecoder.decode(&bytes[..len], NOW).unwrap_err();
            assert_eq!(err.reason, reason::MALFORMED_CBOR, "truncated to {len}");
        }
        // Trailing garbage and invalid bytes.
        let mut trailing = bytes.clone();
        trailing.push(0x00);
        assert_eq!(
            SenmlCborDecoder.decode(&trailing, NOW).unwrap_err().reason,
            reason::MALFORMED_CBOR
        );
        assert_eq!(
            SenmlCborDecoder.decode(&[0xff], NOW).unwrap_err().reason,
            reason::MALFORMED_CBOR
        );
        assert_eq!(
            SenmlCborDecoder.decode(&[0x1c], NOW).unwrap_err().reason,
            reason::MALFORMED_CBOR
        );
        assert_eq!(
            SenmlCborDecoder.decode(b"", NOW).unwrap_err().reason,
            reason::EMPTY_PAYLOAD
        );
        // JSON sent to the CBOR topic.
        let err = SenmlCborDecoder
            .decode(br#"[{"n":"x","v":1}]"#, NOW)
            .unwrap_err();
        assert!(
            matches!(err.reason.as_str(), "malformed_cbor" | "malformed_senml"),
            "{err}"
        );

        // Valid CBOR, not SenML.
        for v in [
            map(vec![(int(0), text("x")), (int(2), int(1))]),
            int(5),
            Cbor::Array(vec![int(1)]),
            Cbor::Array(vec![map(vec![(int(0), text("x"))])]),
            Cbor::Array(vec![map(vec![(int(0), text("x")), (int(2), text("1"))])]),
            Cbor::Array(vec![map(vec![(int(0), text("x")), (int(4), int(1))])]),
            Cbor::Array(vec![map(vec![(int(0), text("x")), (int(2), Cbor::Null)])]),
            Cbor::Array(vec![map(vec![
                (Cbor::Bool(true), text("x")),
                (int(2), int(1)),
            ])]),
            Cbor::Array(vec![map(vec![
                (int(0), text("x")),
                (int(2), int(1)),
                (int(3), text("a")),
            ])]),
            Cbor::Array(vec![map(vec![
                (int(-1), int(11)),
                (int(0), text("x")),
                (int(2), int(1)),
            ])]),
        ] {
            assert_eq!(cbor_reason(&v), reason::MALFORMED_SENML, "{v:?}");
        }
        for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let v = Cbor::Array(vec![map(vec![
                (int(0), text("x")),
                (int(2), Cbor::Float(f)),
            ])]);
            assert_eq!(cbor_reason(&v), reason::NON_FINITE_VALUE);
            let v = Cbor::Array(vec![map(vec![
                (int(0), text("x")),
                (int(5), Cbor::Float(f)),
            ])]);
            assert_eq!(cbor_reason(&v), reason::NON_FINITE_VALUE);
            let v = Cbor::Array(vec![map(vec![
                (int(0), text("x")),
                (int(2), int(1)),
                (int(6), Cbor::Float(f)),
            ])]);
            assert_eq!(cbor_reason(&v), reason::BAD_TIMESTAMP);
        }
        assert_eq!(cbor_reason(&Cbor::Array(vec![])), reason::NO_READINGS);
        // Unknown integer labels are ignored.
        let v = Cbor::Array(vec![map(vec![
            (int(0), text("x")),
            (int(2), int(1)),
            (int(99), int(1)),
        ])]);
        assert_eq!(cbor(&v).unwrap().len(), 1);
    }

    #[test]
    fn cbor_unicode_and_large_integers() {
        let v = Cbor::Array(vec![map(vec![
            (int(0), text("mực nước")),
            (int(2), Cbor::Integer(u64::MAX.into())),
        ])]);
        let out = cbor(&v).unwrap();
        assert_eq!(out[0].quantity, "mực nước");
        assert_eq!(out[0].value, Value::Number(u64::MAX as f64));
    }
}
