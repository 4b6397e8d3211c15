//! Line-protocol escaping: whatever names, units and texts a device chooses, the Influx sink writes
//! exactly one point that an independent parser (InfluxDB 3's `influxdb-line-protocol`) reads back
//! to the same measurement, tags, field and time, or refuses the reading with a reason.

use influxdb_line_protocol::{parse_lines, FieldValue};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

use super::config;
use crate::proto::{reading, Protocol, Reading};
use crate::sinks::influx::line_protocol::{
    write_line, MeasurementFrom, Unrepresentable, COUNT_QUANTITIES,
};

/// Text full of what line protocol must escape, plus UTF-8 beyond ASCII.
fn text() -> impl Strategy<Value = String> {
    "[a-z0-9 ,=\"\\\\\n\r#_.ĐđÀ\u{0}\t\u{85}]{0,12}"
}

/// Registry values (ids, tenants, kinds, communes) are slugs, but escaping must not care.
fn tag() -> impl Strategy<Value = String> {
    "[a-z0-9 ,=\"\n_.Đ-]{0,10}"
}

fn value() -> impl Strategy<Value = reading::Value> {
    prop_oneof![
        any::<f64>().prop_map(reading::Value::Number),
        (-1e6f64..1e6).prop_map(|n| reading::Value::Number(n.round())),
        any::<bool>().prop_map(reading::Value::Boolean),
        text().prop_map(reading::Value::Text),
    ]
}

fn reading() -> impl Strategy<Value = Reading> {
    let names = prop_oneof![text(), Just("vehicle_count".to_string())];
    (
        (names, text(), value()),
        (tag(), tag(), tag(), tag()),
        (0..5i32, any::<i64>(), proptest::option::of(any::<u64>())),
    )
        .prop_map(
            |((quantity, unit, value), (device_id, tenant, kind, commune_code), (p, t, seq))| {
                Reading {
                    quantity,
                    unit,
                    value: Some(value),
                    device_id,
                    tenant,
                    kind,
                    commune_code,
                    protocol: p,
                    device_time_ms: t % 9_000_000_000_000,
                    device_seq: seq,
                    ..Default::default()
                }
            },
        )
}

/// What the store should read: control characters become spaces.
fn flat(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[test]
fn line_protocol_round_trip() {
    let mut runner = TestRunner::new(config());
    let strategy = (
        reading(),
        prop_oneof![Just(MeasurementFrom::Quantity), Just(MeasurementFrom::Kind)],
    );
    runner
        .run(&strategy, |(r, from)| {
            let mut out = String::from("earlier 1\n");
            let (measurement, field) = match from {
                MeasurementFrom::Quantity => (&r.quantity, "value".to_string()),
                MeasurementFrom::Kind => (&r.kind, flat(&r.quantity)),
            };
            let written = write_line(&mut out, &r, from);
            let refusal = if measurement.is_empty() || field.is_empty() {
                Some("empty")
            } else if measurement.starts_with('#') {
                Some("comment")
            } else if [measurement, &r.quantity, &r.unit]
                .iter()
                .any(|s| s.contains('\\'))
            {
                Some("backslash")
            } else {
                match r.value {
                    Some(reading::Value::Number(n)) if !n.is_finite() => Some("non-finite"),
                    _ => None,
                }
            };
            if let Err(e) = written {
                prop_assert!(refusal.is_some(), "refused {r:?}: {e}");
                prop_assert_eq!(&out, "earlier 1\n", "nothing written on refusal");
                if refusal == Some("backslash") {
                    prop_assert!(matches!(e, Unrepresentable::Backslash(_)));
                }
                return Ok(());
            }
            prop_assert!(refusal.is_none(), "{refusal:?} not refused: {out:?}");
            let line = &out["earlier 1\n".len()..];
            prop_assert!(
                line.ends_with('\n') && line.matches('\n').count() == 1,
                "{line:?}"
            );

            let parsed: Vec<_> = parse_lines(line).collect();
            prop_assert_eq!(parsed.len(), 1, "{:?}", line);
            let p = parsed
                .into_iter()
                .next()
                .expect("one")
                .map_err(|e| TestCaseError::fail(format!("{line:?} does not parse: {e}")))?;
            prop_assert_eq!(p.series.measurement.as_str(), flat(measurement));
            let protocol = crate::pipeline::protocol_label(
                Protocol::try_from(r.protocol).unwrap_or(Protocol::Unspecified),
            );
            let expected_tags: Vec<(&str, String)> = [
                ("commune", r.commune_code.as_str()),
                ("device", &r.device_id),
                ("kind", &r.kind),
                ("protocol", protocol),
                ("tenant", &r.tenant),
                ("unit", &r.unit),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k, flat(v)))
            .collect();
            let tags: Vec<(&str, String)> = p
                .series
                .tag_set
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.to_string()))
                .collect();
            prop_assert_eq!(tags, expected_tags);

            let fields = &p.field_set;
            prop_assert_eq!(fields[0].0.as_str(), field.as_str());
            match (&r.value, &fields[0].1) {
                (Some(reading::Value::Number(n)), FieldValue::F64(x)) => {
                    prop_assert_eq!(n.to_bits(), x.to_bits())
                }
                (Some(reading::Value::Number(n)), FieldValue::I64(i)) => {
                    prop_assert!(COUNT_QUANTITIES.contains(&r.quantity.as_str()));
                    prop_assert_eq!(*n, *i as f64)
                }
                (Some(reading::Value::Boolean(b)), FieldValue::Boolean(x)) => prop_assert_eq!(b, x),
                (Some(reading::Value::Text(t)), FieldValue::String(s)) => {
                    prop_assert_eq!(flat(t), s.to_string())
                }
                (v, f) => prop_assert!(false, "{v:?} written as {f:?}"),
            }
            let seq = r.device_seq.and_then(|s| i64::try_from(s).ok());
            prop_assert_eq!(fields.len(), 1 + usize::from(seq.is_some()));
            if let Some(seq) = seq {
                prop_assert_eq!(fields[1].0.as_str(), "seq");
                prop_assert!(matches!(fields[1].1, FieldValue::I64(s) if s == seq));
            }
            prop_assert_eq!(p.timestamp, Some(r.device_time_ms * 1_000_000));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("line protocol: {e}"));
}
