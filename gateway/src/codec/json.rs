//! The gateway's own JSON format: what a device with a JSON library and no knowledge of SenML
//! naturally writes.
//!
//! # Accepted shapes
//!
//! 1. A flat object of quantity -> value, with optional reserved keys:
//!    `{"temperature": 21.5, "humidity": 60, "ts": 1735689600000}`
//! 2. An object whose quantities sit under `values`:
//!    `{"ts": "2025-01-01T00:00:00Z", "seq": 7, "values": {"pm2_5": 12.1, "pm10": 20}}`
//! 3. An array of objects of either shape, each with its own `ts`, `seq` and position:
//!    `[{"ts": 1735689600000, "noise": 61.2}, {"ts": 1735689660000, "noise": 58.0}]`
//!
//! # Reserved keys (exact, case-sensitive; apply to every value of their object)
//!
//! - `ts`: the device timestamp. Epoch **milliseconds** (integer or float, rounded), or an RFC 3339
//!   string (`"2025-01-01T07:00:00+07:00"`). Heuristic: a number below 1e11 is taken as epoch
//!   **seconds**, because many devices send `time()`; 1e11 ms is March 1973, before any device that
//!   speaks to this gateway, while 1e11 s is the year 5138, so the two ranges cannot be confused.
//!   `0` means "the device does not know the time" and is treated like no `ts` (as SenML and the
//!   protobuf format do). Anything else (bool, null, negative, after year 9999, an unparseable
//!   string) is refused with `bad_timestamp`.
//! - `seq`: the device's message counter, a non-negative integer (else `unsupported_value`).
//! - `lat`, `lon`, `alt`: WGS 84 position in degrees and metres; `lat` and `lon` must both be
//!   present, finite and in range, else `bad_location`.
//! - `values`: an object of quantity -> value (shape 2). It may be combined with flat quantities.
//!
//! # Values
//!
//! A number becomes `Number` (f64), a bool `Boolean`, a string `Text`. An object
//! `{"value": x, "unit": "Cel"}` carries a unit with its value (`unit` optional). Any other nested
//! object or array, or `null`, is refused with `unsupported_value`: the schema holds one scalar per
//! reading, and silently dropping a value would hide a firmware bug.
//!
//! JSON has no NaN or infinity, but failing sensors send `NaN`, `Infinity`, `-Infinity` or
//! `1e999`; these are refused as `non_finite_value`, not `malformed_json`, so the operator sees
//! a sensor problem rather than a firmware-serialiser problem.
//!
//! An empty key is `malformed_json`; a document with no values at all is `no_readings`.
//!
//! # Cost
//!
//! This is the hot path (~100-byte payloads at 100k+/s), so the payload is parsed once, streaming,
//! straight into [`Decoded`] values: keys are borrowed from the input, and the only allocations are
//! the output vector and each reading's quantity (and text value) string.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{reason, DecodeError, Decoded, Decoder, Reason};
use crate::proto::reading::Value;

/// Decoder for [`Format::Json`](super::Format::Json); see the module docs for the format.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonDecoder;

impl Decoder for JsonDecoder {
    fn decode(&self, payload: &[u8], _now_ms: i64) -> Result<Vec<Decoded>, DecodeError> {
        let text = super::trim_text_payload(payload)?;
        let mut ctx = Ctx {
            out: Vec::new(),
            err: None,
        };
        let mut de = serde_json::Deserializer::from_slice(text);
        let parsed = Top(&mut ctx).deserialize(&mut de).and_then(|()| de.end());
        if let Err(e) = parsed {
            return Err(ctx
                .err
                .take()
                .unwrap_or_else(|| super::json_syntax_error(text, e)));
        }
        if ctx.out.is_empty() {
            return Err(DecodeError::new(
                reason::NO_READINGS,
                "document holds no values",
            ));
        }
        Ok(ctx.out)
    }
}

/// Parse state. Semantic errors are kept here because serde errors can only carry a message;
/// the visitor stores the typed error and aborts the parse with a placeholder.
struct Ctx {
    out: Vec<Decoded>,
    err: Option<DecodeError>,
}

impl Ctx {
    fn fail<E: de::Error>(&mut self, reason: Reason, detail: impl Into<String>) -> E {
        let detail = detail.into();
        let e = E::custom(&detail);
        self.err = Some(DecodeError::new(reason, detail));
        e
    }
}

/// A map key, borrowed from the input unless it contained escapes.
pub(crate) struct Key<'de>(pub(crate) Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Any JSON value, with containers skipped rather than built: used where only a scalar is valid
/// and the containers are errors anyway.
pub(crate) enum Scalar<'de> {
    U(u64),
    I(i64),
    F(f64),
    B(bool),
    S(Cow<'de, str>),
    Null,
    Object,
    Array,
}

impl Scalar<'_> {
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match *self {
            Scalar::U(u) => Some(u as f64),
            Scalar::I(i) => Some(i as f64),
            Scalar::F(f) => Some(f),
            _ => None,
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Scalar::U(_) | Scalar::I(_) | Scalar::F(_) => "a number",
            Scalar::B(_) => "a bool",
            Scalar::S(_) => "a string",
            Scalar::Null => "null",
            Scalar::Object => "an object",
            Scalar::Array => "an array",
        }
    }
}

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::U(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::I(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::F(v))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::B(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::S(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::S(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar<'de>, E> {
                Ok(Scalar::S(Cow::Owned(v)))
            }
            fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Scalar<'de>, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Scalar<'de>, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Array)
            }
        }
        d.deserialize_any(V)
    }
}

/// The document: an object, or an array of objects.
struct Top<'c>(&'c mut Ctx);

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object or an array of objects")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        object(self.0, map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Element(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

/// One element of a top-level array: must be an object.
struct Element<'c>(&'c mut Ctx);

impl<'de> DeserializeSeed<'de> for Element<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Element<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        object(self.0, map)
    }
}

/// One reading object: quantities (flat and under `values`) plus reserved keys. Reserved keys may
/// come after the quantities, so they are applied to this object's readings once it is complete.
fn object<'de, A: MapAccess<'de>>(ctx: &mut Ctx, mut map: A) -> Result<(), A::Error> {
    let start = ctx.out.len();
    let mut ts: Option<i64> = None;
    let mut seq: Option<u64> = None;
    let (mut lat, mut lon, mut alt) = (None, None, None);
    while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
        match &*key {
            "ts" => {
                let v: Scalar = map.next_value()?;
                ts = parse_ts(&v).map_err(|e| fail_with(ctx, e))?;
            }
            "seq" => {
                let v: Scalar = map.next_value()?;
                seq = Some(parse_seq(&v).map_err(|e| fail_with(ctx, e))?);
            }
            "lat" | "lon" | "alt" => {
                let v: Scalar = map.next_value()?;
                let Some(n) = v.as_f64() else {
                    return Err(ctx.fail(
                        reason::BAD_LOCATION,
                        format!("{key} is {}, not a number", v.kind()),
                    ));
                };
                match &*key {
                    "lat" => lat = Some(n),
                    "lon" => lon = Some(n),
                    _ => alt = Some(n),
                }
            }
            "values" => map.next_value_seed(Values(&mut *ctx))?,
            _ => {
                let (value, unit) = map.next_value_seed(ValueSeed {
                    ctx: &mut *ctx,
                    key: &key,
                })?;
                push(ctx, &key, value, unit)?;
            }
        }
    }
    let location = super::location(lat, lon, alt).map_err(|e| fail_with(ctx, e))?;
    for d in &mut ctx.out[start..] {
        d.time_ms = ts;
        d.seq = seq;
        d.location = location;
    }
    Ok(())
}

fn fail_with<E: de::Error>(ctx: &mut Ctx, e: DecodeError) -> E {
    ctx.fail(e.reason, e.detail)
}

fn push<E: de::Error>(ctx: &mut Ctx, key: &str, value: Value, unit: String) -> Result<(), E> {
    if key.trim().is_empty() {
        return Err(ctx.fail(reason::MALFORMED_JSON, "empty quantity name"));
    }
    ctx.out.push(Decoded {
        quantity: key.to_owned(),
        value,
        unit,
        time_ms: None,
        seq: None,
        location: None,
    });
    Ok(())
}

fn parse_ts(v: &Scalar) -> Result<Option<i64>, DecodeError> {
    let ms = match v {
        Scalar::S(s) => {
            let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
                DecodeError::new(
                    reason::BAD_TIMESTAMP,
                    format!("ts {s:?} is not RFC 3339: {e}"),
                )
            })?;
            t.timestamp_millis() as f64
        }
        _ => match v.as_f64() {
            // Seconds vs milliseconds heuristic, see the module docs.
            Some(n) if n.abs() < 1e11 => n * 1000.0,
            Some(n) => n,
            None => {
                return Err(DecodeError::new(
                    reason::BAD_TIMESTAMP,
                    format!("ts is {}", v.kind()),
                ))
            }
        },
    };
    if ms == 0.0 {
        return Ok(None);
    }
    super::time_ms_from_f64(ms, "ts").map(Some)
}

fn parse_seq(v: &Scalar) -> Result<u64, DecodeError> {
    match *v {
        Scalar::U(u) => Ok(u),
        // Tolerate `7.0` from serialisers that only have doubles.
        Scalar::F(f) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => Ok(f as u64),
        _ => Err(DecodeError::new(
            reason::UNSUPPORTED_VALUE,
            "seq must be a non-negative integer",
        )),
    }
}

/// The `values` object of shape 2.
struct Values<'c>(&'c mut Ctx);

impl<'de> DeserializeSeed<'de> for Values<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Values<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of quantity -> value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let ctx = self.0;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let (value, unit) = map.next_value_seed(ValueSeed {
                ctx: &mut *ctx,
                key: &key,
            })?;
            push(ctx, &key, value, unit)?;
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.0.fail(
            reason::UNSUPPORTED_VALUE,
            "values must be an object of quantity -> value",
        ))
    }
}

/// A quantity's value: a scalar, or `{"value": x, "unit": "..."}`.
struct ValueSeed<'c, 'k> {
    ctx: &'c mut Ctx,
    key: &'k str,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = (Value, String);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(Value, String), D::Error> {
        d.deserialize_any(self)
    }
}

impl ValueSeed<'_, '_> {
    fn scalar<E: de::Error>(self, v: Scalar) -> Result<(Value, String), E> {
        match scalar_value(v) {
            Ok(v) => Ok((v, String::new())),
            Err(kind) => {
                let detail = format!("{}: {kind} is not a supported value", self.key);
                Err(self.ctx.fail(reason::UNSUPPORTED_VALUE, detail))
            }
        }
    }
}

fn scalar_value(v: Scalar) -> Result<Value, &'static str> {
    match v {
        Scalar::U(u) => Ok(Value::Number(u as f64)),
        Scalar::I(i) => Ok(Value::Number(i as f64)),
        Scalar::F(f) => Ok(Value::Number(f)),
        Scalar::B(b) => Ok(Value::Boolean(b)),
        Scalar::S(s) => Ok(Value::Text(s.into_owned())),
        other => Err(other.kind()),
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = (Value, String);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, bool, string or {\"value\": .., \"unit\": ..}")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok((Value::Number(v as f64), String::new()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok((Value::Number(v as f64), String::new()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok((Value::Number(v), String::new()))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok((Value::Boolean(v), String::new()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok((Value::Text(v.to_owned()), String::new()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok((Value::Text(v), String::new()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.scalar(Scalar::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.scalar(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        self.scalar(Scalar::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut value = None;
        let mut unit = String::new();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match &*k {
                "value" => {
                    let v: Scalar = map.next_value()?;
                    match scalar_value(v) {
                        Ok(v) => value = Some(v),
                        Err(kind) => {
                            let detail =
                                format!("{}.value: {kind} is not a supported value", self.key);
                            return Err(self.ctx.fail(reason::UNSUPPORTED_VALUE, detail));
                        }
                    }
                }
                "unit" => match map.next_value::<Scalar>()? {
                    Scalar::S(s) => unit = s.into_owned(),
                    other => {
                        let detail = format!("{}.unit is {}, not a string", self.key, other.kind());
                        return Err(self.ctx.fail(reason::UNSUPPORTED_VALUE, detail));
                    }
                },
                other => {
                    let detail = format!(
                        "{}: nested object with key {other:?}; only {{\"value\", \"unit\"}} is supported",
                        self.key
                    );
                    return Err(self.ctx.fail(reason::UNSUPPORTED_VALUE, detail));
                }
            }
        }
        match value {
            Some(v) => Ok((v, unit)),
            None => {
                let detail = format!("{}: nested object without \"value\"", self.key);
                Err(self.ctx.fail(reason::UNSUPPORTED_VALUE, detail))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Location;

    fn decode(s: &str) -> Result<Vec<Decoded>, DecodeError> {
        JsonDecoder.decode(s.as_bytes(), 1_700_000_000_000)
    }

    fn reason_of(s: &str) -> Reason {
        match decode(s) {
            Ok(v) => panic!("expected an error for {s}, got {v:?}"),
            Err(e) => e.reason,
        }
    }

    fn num(q: &str, v: f64) -> Decoded {
        Decoded {
            quantity: q.into(),
            value: Value::Number(v),
            unit: String::new(),
            time_ms: None,
            seq: None,
            location: None,
        }
    }

    #[test]
    fn flat_object() {
        let out = decode(
            r#"{"temperature": 21.5, "humidity": 60, "lamp": true, "status": "ok", "delta": -3}"#,
        )
        .unwrap();
        assert_eq!(
            out,
            vec![
                num("temperature", 21.5),
                num("humidity", 60.0),
                Decoded {
                    value: Value::Boolean(true),
                    ..num("lamp", 0.0)
                },
                Decoded {
                    value: Value::Text("ok".into()),
                    ..num("status", 0.0)
                },
                num("delta", -3.0),
            ]
        );
    }

    #[test]
    fn ts_after_values_applies_to_all() {
        let out = decode(r#"{"a": 1, "b": 2, "ts": 1735689600123, "seq": 42}"#).unwrap();
        assert!(out
            .iter()
            .all(|d| d.time_ms == Some(1_735_689_600_123) && d.seq == Some(42)));
    }

    #[test]
    fn ts_forms() {
        let t = |s: &str| decode(s).unwrap()[0].time_ms;
        assert_eq!(
            t(r#"{"ts": 1735689600000, "x": 1}"#),
            Some(1_735_689_600_000)
        );
        assert_eq!(
            t(r#"{"ts": 1735689600000.6, "x": 1}"#),
            Some(1_735_689_600_001)
        );
        // Seconds heuristic.
        assert_eq!(t(r#"{"ts": 1735689600, "x": 1}"#), Some(1_735_689_600_000));
        assert_eq!(
            t(r#"{"ts": 1735689600.25, "x": 1}"#),
            Some(1_735_689_600_250)
        );
        // RFC 3339, with offsets and fractions.
        assert_eq!(
            t(r#"{"ts": "2025-01-01T00:00:00Z", "x": 1}"#),
            Some(1_735_689_600_000)
        );
        assert_eq!(
            t(r#"{"ts": "2025-01-01T07:00:00.5+07:00", "x": 1}"#),
            Some(1_735_689_600_500)
        );
        // No ts, and ts 0 ("clock not set"), leave the time to the pipeline.
        assert_eq!(t(r#"{"x": 1}"#), None);
        assert_eq!(t(r#"{"ts": 0, "x": 1}"#), None);
    }

    #[test]
    fn bad_timestamps() {
        for s in [
            r#"{"ts": "yesterday", "x": 1}"#,
            r#"{"ts": "01/01/2025", "x": 1}"#,
            r#"{"ts": true, "x": 1}"#,
            r#"{"ts": null, "x": 1}"#,
            r#"{"ts": {"s": 1}, "x": 1}"#,
            r#"{"ts": [1], "x": 1}"#,
            r#"{"ts": -5, "x": 1}"#,
            r#"{"ts": 1e300, "x": 1}"#,
            r#"{"ts": 18446744073709551615, "x": 1}"#,
        ] {
            assert_eq!(reason_of(s), reason::BAD_TIMESTAMP, "{s}");
        }
    }

    #[test]
    fn values_shape_and_arrays() {
        let out =
            decode(r#"{"ts": 1735689600000, "values": {"pm2_5": 12.1, "pm10": 20}}"#).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].quantity, "pm2_5");
        assert!(out.iter().all(|d| d.time_ms == Some(1_735_689_600_000)));

        let out = decode(
            r#"[{"ts": 1735689600000, "noise": 61.2},
                {"ts": 1735689660000, "values": {"noise": 58}, "seq": 2},
                {"noise": 50}]"#,
        )
        .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].time_ms, Some(1_735_689_600_000));
        assert_eq!(out[0].seq, None);
        assert_eq!(out[1].time_ms, Some(1_735_689_660_000));
        assert_eq!(out[1].seq, Some(2));
        assert_eq!(out[2].time_ms, None);

        // Flat quantities and `values` may be mixed.
        let out = decode(r#"{"battery": 90, "values": {"temp": 20}}"#).unwrap();
        assert_eq!(
            out.iter().map(|d| d.quantity.as_str()).collect::<Vec<_>>(),
            ["battery", "temp"]
        );
    }

    #[test]
    fn value_with_unit() {
        let out = decode(r#"{"t": {"value": 21.5, "unit": "Cel"}, "values": {"h": {"unit": "%RH", "value": 40}}}"#).unwrap();
        assert_eq!(
            out[0],
            Decoded {
                unit: "Cel".into(),
                ..num("t", 21.5)
            }
        );
        assert_eq!(
            out[1],
            Decoded {
                unit: "%RH".into(),
                ..num("h", 40.0)
            }
        );
        let out = decode(r#"{"state": {"value": "on"}}"#).unwrap();
        assert_eq!(out[0].value, Value::Text("on".into()));
        assert_eq!(out[0].unit, "");
    }

    #[test]
    fn unsupported_values() {
        for s in [
            r#"{"x": null}"#,
            r#"{"x": [1, 2]}"#,
            r#"{"x": {"a": 1}}"#,
            r#"{"x": {"unit": "Cel"}}"#,
            r#"{"x": {"value": [1]}}"#,
            r#"{"x": {"value": null}}"#,
            r#"{"x": {"value": 1, "unit": 5}}"#,
            r#"{"values": [1]}"#,
            r#"{"values": {"x": {"y": 1}}}"#,
            r#"{"x": 1, "seq": -1}"#,
            r#"{"x": 1, "seq": 1.5}"#,
            r#"{"x": 1, "seq": "7"}"#,
        ] {
            assert_eq!(reason_of(s), reason::UNSUPPORTED_VALUE, "{s}");
        }
        assert_eq!(decode(r#"{"x": 1, "seq": 7.0}"#).unwrap()[0].seq, Some(7));
    }

    #[test]
    fn location() {
        let out =
            decode(r#"{"lat": 21.0285, "lon": 105.8542, "alt": 12.5, "level": 1.2, "flow": 3}"#)
                .unwrap();
        let loc = Location {
            lat: 21.0285,
            lon: 105.8542,
            alt_m: Some(12.5),
        };
        assert!(out.iter().all(|d| d.location == Some(loc)));
        assert_eq!(out.len(), 2);
        let out = decode(r#"{"lat": 10.8, "lon": 106.6, "level": 1}"#).unwrap();
        assert_eq!(
            out[0].location,
            Some(Location {
                lat: 10.8,
                lon: 106.6,
                alt_m: None
            })
        );
        for s in [
            r#"{"lat": 21.0, "level": 1}"#,
            r#"{"lon": 105.0, "level": 1}"#,
            r#"{"alt": 5, "level": 1}"#,
            r#"{"lat": 95, "lon": 105.0, "level": 1}"#,
            r#"{"lat": 21, "lon": 190, "level": 1}"#,
            r#"{"lat": "21", "lon": 105, "level": 1}"#,
            r#"{"lat": null, "lon": 105, "level": 1}"#,
        ] {
            assert_eq!(reason_of(s), reason::BAD_LOCATION, "{s}");
        }
    }

    #[test]
    fn non_finite_values() {
        for s in [
            r#"{"temperature": NaN}"#,
            r#"{"temperature": nan}"#,
            r#"{"temperature": Infinity}"#,
            r#"{"temperature": -Infinity}"#,
            r#"{"temperature": 1e999}"#,
            r#"{"temperature": -1e999}"#,
            r#"[{"a": 1}, {"b": NaN}]"#,
            r#"{"values": {"x": {"value": Infinity, "unit": "Cel"}}}"#,
        ] {
            assert_eq!(reason_of(s), reason::NON_FINITE_VALUE, "{s}");
        }
        // "NaN" inside a string is just text.
        assert_eq!(
            decode(r#"{"status": "NaN"}"#).unwrap()[0].value,
            Value::Text("NaN".into())
        );
        // Large but finite is fine.
        assert_eq!(
            decode(r#"{"x": 1e308}"#).unwrap()[0].value,
            Value::Number(1e308)
        );
    }

    #[test]
    fn malformed() {
        for s in [
            "{",
            r#"{"a": 1"#,
            r#"{"a": 1} trailing"#,
            r#"{"a": 1,}"#,
            "not json",
            "42",
            r#""text""#,
            "true",
            "null",
            "[1, 2]",
            r#"[[{"a": 1}]]"#,
            r#"{"": 1}"#,
            r#"{"  ": 1}"#,
        ] {
            assert_eq!(reason_of(s), reason::MALFORMED_JSON, "{s}");
        }
        let err = JsonDecoder.decode(b"{\"a\": \xff}", 0).unwrap_err();
        assert_eq!(err.reason, reason::MALFORMED_JSON);
    }

    #[test]
    fn empty_and_no_readings() {
        assert_eq!(reason_of(""), reason::EMPTY_PAYLOAD);
        assert_eq!(reason_of(" \r\n\t"), reason::EMPTY_PAYLOAD);
        for s in [
            "{}",
            "[]",
            "[{}]",
            r#"{"ts": 1735689600000}"#,
            r#"{"values": {}}"#,
            r#"[{"seq": 1}]"#,
        ] {
            assert_eq!(reason_of(s), reason::NO_READINGS, "{s}");
        }
    }

    #[test]
    fn unicode_and_escapes() {
        let out =
            decode(r#"{"mực_nước": 1.25, "nhiệt độ": 30, "esc\"aped\u00e9": "Hà Nội"}"#).unwrap();
        assert_eq!(out[0].quantity, "mực_nước");
        assert_eq!(out[1].quantity, "nhiệt độ");
        assert_eq!(out[2].quantity, "esc\"apedé");
        assert_eq!(out[2].value, Value::Text("Hà Nội".into()));
    }

    #[test]
    fn bom_is_ignored() {
        let out = JsonDecoder.decode(b"\xEF\xBB\xBF{\"x\": 1}", 0).unwrap();
        assert_eq!(out, vec![num("x", 1.0)]);
    }

    #[test]
    fn large_integers_and_precision() {
        let out = decode(
            r#"{"energy": 123456789012, "neg": -9007199254740993, "seq": 18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(out[0].value, Value::Number(123_456_789_012.0));
        assert_eq!(out[0].seq, Some(u64::MAX));
    }
}
