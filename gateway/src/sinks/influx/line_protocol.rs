//! One reading → one line of InfluxDB line protocol.
//!
//! # The mapping
//!
//! | line protocol | from the reading | notes |
//! |---|---|---|
//! | measurement | `quantity` ([`MeasurementFrom::Quantity`], the default) or the device `kind` ([`MeasurementFrom::Kind`]) | e.g. `temperature`, or `air_quality` |
//! | tag `commune` | `commune_code` | omitted when empty |
//! | tag `device` | `device_id` | |
//! | tag `kind` | `kind` | |
//! | tag `protocol` | `protocol` | `mqtt`, `coap`, `lwm2m`, `lorawan` (`unspecified` for old records) |
//! | tag `tenant` | `tenant` | |
//! | tag `unit` | `unit` | omitted when empty (booleans, text) |
//! | field `value` (or the quantity name when the measurement is the kind) | `number`, `boolean` or `text` | typed, see below |
//! | field `seq` | `device_seq` | integer; only when the payload carried one |
//! | timestamp | `device_time_ms` × 1 000 000 | nanoseconds (`precision=ns`); the device's own time |
//!
//! Tags are written sorted by key, as InfluxDB recommends (it sorts them anyway; sorted input
//! saves it the work). Any tag whose value is empty is left out: InfluxDB rejects empty tag values.
//!
//! Field types:
//!
//! - a number is a **float** (`21.5`, `21.0`, `1e20`): always written with a decimal point or an
//!   exponent, so every store types it float and a quantity never flips between integer and float;
//! - a number of a quantity in [`COUNT_QUANTITIES`] is an **integer** (`42i`) when it is integral
//!   and fits in an i64; a non-integral count is written as a float, which the store then refuses
//!   with a field type conflict, so the reading is dead-lettered with the store's message instead
//!   of silently changing the series' type;
//! - a boolean is `true` / `false`;
//! - text is a double-quoted string.
//!
//! # Why the tags have bounded cardinality
//!
//! Every tag value comes from a bounded set, so the number of series grows with the number of
//! registered devices, never with the number of messages:
//!
//! - `device`: a device id exists only once the device is registered (`citygw device add`);
//!   unregistered devices are refused at the door, so their ids never reach a reading;
//! - `tenant`, `kind`, `commune`: copied from the device's registry entry at ingest time; kinds
//!   are a fixed list, communes the ~3,300 national commune codes, tenants a handful;
//! - `protocol`: a fixed enum of five values;
//! - `unit`: a SenML/UCUM symbol; a device uses one unit per quantity, so per device and quantity
//!   (which already make the series) it adds normally one value.
//!
//! Nothing free-text (a text reading, a location) is ever a tag. The device-chosen name of an
//! unknown quantity becomes a measurement name (or a field key), which does not multiply series.
//!
//! # Escaping
//!
//! As the line protocol reference asks:
//!
//! - measurement: comma, space and backslash are preceded by a backslash;
//! - tag keys, tag values, field keys: comma, equals sign, space and backslash;
//! - string field values: double quote and backslash.
//!
//! Line protocol cannot carry a line break anywhere (a newline ends the point), parsers split on
//! tabs as on spaces, and InfluxDB 3 refuses NUL in names, so every control character (`\n`,
//! `\r`, `\t`, NUL ...) in measurements, keys, tag values and text values is replaced with a space
//! (then escaped like one). Unicode (Vietnamese commune or street names: "Phường Ba Đình") passes
//! through as UTF-8.
//!
//! A note on backslashes: VictoriaMetrics and the line protocol reference read `\\` as one
//! backslash; InfluxDB 1.x and 2.x OSS unescape only `\,`, `\=` and `\ ` and so keep both. No
//! spelling of a backslash in a name or tag reads back the same everywhere, so a reading whose
//! quantity or unit contains one is refused ([`Unrepresentable::Backslash`]) and dead-lettered.
//! Values from the registry (device ids, tenants, kinds, communes) cannot contain one. In string
//! field values `\\` is read back as one backslash by every store.
//!
//! # What cannot be written
//!
//! [`write_line`] refuses, with an [`Unrepresentable`] reason and without writing anything, a
//! reading that no InfluxDB-compatible store could take: no value, a non-finite number (never
//! produced by the pipeline, but `NaN` is not line protocol), an empty measurement or field key, a
//! measurement starting with `#` (the line would be read as a comment and silently dropped), or a
//! device time outside the nanosecond range InfluxDB stores (1677-09-21 to 2262-04-11). The sink
//! dead-letters such a reading with that reason.

use std::fmt::Write as _;

use crate::pipeline::protocol_label;
use crate::proto::{reading, Protocol, Reading};

/// What names the measurement of a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum MeasurementFrom {
    /// `temperature value=21.5`: one measurement per quantity (the default).
    #[default]
    Quantity,
    /// `air_quality temperature=21.5`: one measurement per device kind, the quantity is the field.
    Kind,
}

/// Quantities that count things: written as integers (`42i`) when the number is integral.
///
/// Only quantities whose canonical unit is `count` in the quantity table (docs/src/payload-formats.md), so the
/// list and the table cannot drift apart (a unit test checks it). `occupancy` is a share of
/// parking spaces in percent, not a count, and stays a float.
pub const COUNT_QUANTITIES: &[&str] = &["vehicle_count"];

/// Why a reading cannot be written as line protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrepresentable {
    #[error("the reading has no value")]
    NoValue,
    #[error("the value is not a finite number ({0})")]
    NotFinite(String),
    #[error("the measurement name (the reading's {0}) is empty")]
    EmptyMeasurement(&'static str),
    #[error("the field key (the reading's quantity) is empty")]
    EmptyFieldKey,
    #[error("the measurement name {0:?} starts with '#', which line protocol reads as a comment")]
    CommentMeasurement(String),
    #[error(
        "device time {0} ms is outside the nanosecond range InfluxDB stores (1677-09-21 to 2262-04-11)"
    )]
    TimeOutOfRange(i64),
    #[error("{0:?} contains a backslash, which InfluxDB does not read back the way it was written in a name or tag")]
    Backslash(String),
}

/// Appends one line for `r` to `out`, with its trailing `'\n'`.
///
/// On error nothing is appended (`out` is left as it was) and the reason says why the reading
/// cannot be stored; see the module documentation for the mapping.
pub fn write_line(
    out: &mut String,
    r: &Reading,
    measurement: MeasurementFrom,
) -> Result<(), Unrepresentable> {
    let start = out.len();
    let result = write_line_inner(out, r, measurement);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn write_line_inner(
    out: &mut String,
    r: &Reading,
    measurement: MeasurementFrom,
) -> Result<(), Unrepresentable> {
    let value = r.value.as_ref().ok_or(Unrepresentable::NoValue)?;
    if let reading::Value::Number(n) = value {
        if !n.is_finite() {
            return Err(Unrepresentable::NotFinite(n.to_string()));
        }
    }
    let timestamp_ns = r
        .device_time_ms
        .checked_mul(1_000_000)
        .ok_or(Unrepresentable::TimeOutOfRange(r.device_time_ms))?;
    let (name, source, field_key) = match measurement {
        MeasurementFrom::Quantity => (r.quantity.as_str(), "quantity", "value"),
        MeasurementFrom::Kind => (r.kind.as_str(), "kind", r.quantity.as_str()),
    };
    if name.is_empty() {
        return Err(Unrepresentable::EmptyMeasurement(source));
    }
    if name.starts_with('#') {
        return Err(Unrepresentable::CommentMeasurement(name.to_string()));
    }
    if field_key.is_empty() {
        return Err(Unrepresentable::EmptyFieldKey);
    }
    // InfluxDB 1.x and 2.x OSS keep `\\` as two backslashes in names and tags (and a trailing
    // one swallows the next separator: 204, then the point cannot be read), while
    // VictoriaMetrics unescapes it; no spelling round-trips everywhere, so such a reading is
    // dead-lettered rather than stored under a mangled name. Registry values cannot contain one.
    if let Some(bad) = [name, field_key, r.unit.as_str()]
        .into_iter()
        .find(|s| s.contains('\\'))
    {
        return Err(Unrepresentable::Backslash(bad.to_string()));
    }

    escape_into(out, name, MEASUREMENT_SPECIALS);
    let protocol = protocol_label(Protocol::try_from(r.protocol).unwrap_or(Protocol::Unspecified));
    // Sorted by key.
    let tags: [(&str, &str); 6] = [
        ("commune", &r.commune_code),
        ("device", &r.device_id),
        ("kind", &r.kind),
        ("protocol", protocol),
        ("tenant", &r.tenant),
        ("unit", &r.unit),
    ];
    for (key, value) in tags {
        if value.is_empty() {
            continue;
        }
        out.push(',');
        out.push_str(key);
        out.push('=');
        escape_into(out, value, KEY_SPECIALS);
    }

    out.push(' ');
    escape_into(out, field_key, KEY_SPECIALS);
    out.push('=');
    match value {
        reading::Value::Number(n) => write_number(out, &r.quantity, *n),
        reading::Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        reading::Value::Text(t) => {
            out.push('"');
            escape_into(out, t, STRING_SPECIALS);
            out.push('"');
        }
    }
    if let Some(seq) = r.device_seq.and_then(|s| i64::try_from(s).ok()) {
        // A sequence number beyond i64 (InfluxDB 1.x has no unsigned fields) is left out.
        let _ = write!(out, ",seq={seq}i");
    }
    let _ = writeln!(out, " {timestamp_ns}");
    Ok(())
}

/// A finite number: integer for integral counts, otherwise a float that always carries a
/// decimal point or an exponent (`21.0`, `21.5`, `1e20`, `1.5e-7`).
fn write_number(out: &mut String, quantity: &str, n: f64) {
    // i64::MIN is -2^63, exactly representable; i64::MAX + 1 is 2^63.
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if COUNT_QUANTITIES.contains(&quantity)
        && n.fract() == 0.0
        && (-TWO_POW_63..TWO_POW_63).contains(&n)
    {
        let _ = write!(out, "{}i", n as i64);
    } else {
        // `Debug` is the shortest representation that reads back to the same f64, and it keeps
        // ".0" on integral values and uses an exponent for very large or small ones.
        let _ = write!(out, "{n:?}");
    }
}

/// Characters a backslash must precede, per element.
const MEASUREMENT_SPECIALS: &[char] = &[',', ' ', '\\'];
const KEY_SPECIALS: &[char] = &[',', '=', ' ', '\\'];
const STRING_SPECIALS: &[char] = &['"', '\\'];

/// Appends `s` with `specials` escaped and control characters (line breaks, tabs, NUL) replaced
/// with a space (escaped too, where a space is special).
fn escape_into(out: &mut String, s: &str, specials: &[char]) {
    if !s.contains(|c: char| specials.contains(&c) || c.is_control()) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if specials.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::normalise::KNOWN_QUANTITIES;

    fn reading(quantity: &str, value: reading::Value) -> Reading {
        Reading {
            id: 7,
            device_id: "aq-0001".into(),
            tenant: "hanoi".into(),
            quantity: quantity.into(),
            value: Some(value),
            unit: "Cel".into(),
            device_time_ms: 1_767_225_600_123,
            received_time_ms: 1_767_225_600_500,
            protocol: Protocol::Mqtt as i32,
            location: None,
            commune_code: "00004".into(),
            device_seq: None,
            kind: "air_quality".into(),
            aggregate: None,
        }
    }

    fn line(r: &Reading, m: MeasurementFrom) -> String {
        let mut out = String::new();
        write_line(&mut out, r, m).expect("representable");
        assert!(out.ends_with('\n'));
        assert_eq!(out.matches('\n').count(), 1, "exactly one line: {out:?}");
        out
    }

    fn number(quantity: &str, n: f64) -> Reading {
        reading(quantity, reading::Value::Number(n))
    }

    #[test]
    fn full_line_with_sorted_tags() {
        assert_eq!(
            line(&number("temperature", 21.5), MeasurementFrom::Quantity),
            "temperature,commune=00004,device=aq-0001,kind=air_quality,protocol=mqtt,tenant=hanoi,unit=Cel value=21.5 1767225600123000000\n"
        );
    }

    #[test]
    fn protocol_tag_names() {
        let mut r = number("temperature", 1.5);
        for (p, name) in [
            (Protocol::Mqtt, "mqtt"),
            (Protocol::Coap, "coap"),
            (Protocol::Lwm2m, "lwm2m"),
            (Protocol::Lorawan, "lorawan"),
            (Protocol::Unspecified, "unspecified"),
        ] {
            r.protocol = p as i32;
            assert!(line(&r, MeasurementFrom::Quantity).contains(&format!(",protocol={name},")));
        }
        r.protocol = 99;
        assert!(line(&r, MeasurementFrom::Quantity).contains(",protocol=unspecified,"));
    }

    #[test]
    fn empty_tags_are_omitted() {
        let mut r = reading("lamp_state", reading::Value::Boolean(true));
        r.unit.clear();
        r.commune_code.clear();
        assert_eq!(
            line(&r, MeasurementFrom::Quantity),
            "lamp_state,device=aq-0001,kind=air_quality,protocol=mqtt,tenant=hanoi value=true 1767225600123000000\n"
        );
    }

    #[test]
    fn measurement_escapes() {
        let r = number("a b,c=d", 1.5);
        let l = line(&r, MeasurementFrom::Quantity);
        // '=' needs no escape in a measurement; comma and space do.
        assert!(l.starts_with("a\\ b\\,c=d,commune="), "{l}");
    }

    #[test]
    fn backslashes_in_names_and_units_are_refused() {
        for (quantity, unit) in [("a\\b", "Cel"), ("trailing\\", "Cel"), ("level", "m\\s")] {
            let mut r = number(quantity, 1.0);
            r.unit = unit.into();
            let mut out = String::from("kept");
            assert!(matches!(
                write_line(&mut out, &r, MeasurementFrom::Quantity),
                Err(Unrepresentable::Backslash(_))
            ));
            assert_eq!(out, "kept");
        }
    }

    #[test]
    fn tag_value_escapes() {
        let mut r = number("temperature", 1.5);
        r.device_id = "dev 1,x=y\\z".into();
        r.unit = "ug/m3 (x=1)".into();
        let l = line(&r, MeasurementFrom::Quantity);
        assert!(l.contains(",device=dev\\ 1\\,x\\=y\\\\z,"), "{l}");
        assert!(l.contains(",unit=ug/m3\\ (x\\=1) value="), "{l}");
    }

    #[test]
    fn field_key_escapes_when_measurement_is_kind() {
        let r = number("pm 2,5=x", 12.25);
        let l = line(&r, MeasurementFrom::Kind);
        assert!(l.starts_with("air_quality,commune=00004,"), "{l}");
        assert!(l.contains(" pm\\ 2\\,5\\=x=12.25 "), "{l}");
    }

    #[test]
    fn string_field_escapes() {
        let r = reading(
            "status",
            reading::Value::Text(r#"say "hi", a=b \ back\"#.into()),
        );
        let l = line(&r, MeasurementFrom::Quantity);
        // Inside a string only the quote and the backslash are escaped.
        assert!(l.contains(r#" value="say \"hi\", a=b \\ back\\" "#), "{l}");
    }

    #[test]
    fn newlines_become_spaces_everywhere() {
        let mut r = reading(
            "multi\nline",
            reading::Value::Text("one\r\ntwo\nthree".into()),
        );
        r.unit = "u\nv".into();
        let l = line(&r, MeasurementFrom::Quantity);
        assert!(l.starts_with("multi\\ line,"), "{l}");
        assert!(l.contains(",unit=u\\ v "), "{l}");
        assert!(l.contains(r#"value="one  two three""#), "{l}");

        let mut r = number("co\r2", 400.0);
        r.kind = "air\nquality".into();
        let l = line(&r, MeasurementFrom::Kind);
        assert!(l.starts_with("air\\ quality,"), "{l}");
        assert!(l.contains(",kind=air\\ quality,"), "{l}");
        assert!(l.contains(" co\\ 2=400.0 "), "{l}");
    }

    #[test]
    fn vietnamese_text_passes_through() {
        let mut r = reading(
            "nhiệt_độ",
            reading::Value::Text("Phường Ba Đình, Hà Nội".into()),
        );
        r.tenant = "Phường Ba Đình".into();
        let l = line(&r, MeasurementFrom::Quantity);
        assert!(l.starts_with("nhiệt_độ,"), "{l}");
        assert!(l.contains(",tenant=Phường\\ Ba\\ Đình,"), "{l}");
        assert!(l.contains(r#"value="Phường Ba Đình, Hà Nội""#), "{l}");
    }

    #[test]
    fn floats_always_typed_float() {
        let cases = [
            (21.5, "21.5"),
            (21.0, "21.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (-3.25, "-3.25"),
            (1e20, "1e20"),
            (1.5e-7, "1.5e-7"),
            (f64::MAX, "1.7976931348623157e308"),
            (f64::MIN_POSITIVE, "2.2250738585072014e-308"),
        ];
        for (n, text) in cases {
            let l = line(&number("temperature", n), MeasurementFrom::Quantity);
            assert!(l.contains(&format!(" value={text} ")), "{n}: {l}");
            // Reads back to the same number.
            assert_eq!(text.parse::<f64>().unwrap().to_bits(), n.to_bits());
        }
    }

    #[test]
    fn counts_are_integers_when_integral() {
        let l = line(&number("vehicle_count", 42.0), MeasurementFrom::Quantity);
        assert!(l.contains(" value=42i "), "{l}");
        let l = line(&number("vehicle_count", -3.0), MeasurementFrom::Quantity);
        assert!(l.contains(" value=-3i "), "{l}");
        // Not integral, or beyond i64: stays a float (and the store will say so).
        let l = line(&number("vehicle_count", 42.5), MeasurementFrom::Quantity);
        assert!(l.contains(" value=42.5 "), "{l}");
        let l = line(&number("vehicle_count", 1e19), MeasurementFrom::Quantity);
        assert!(l.contains(" value=1e19 "), "{l}");
        let l = line(
            &number("vehicle_count", i64::MIN as f64),
            MeasurementFrom::Quantity,
        );
        assert!(l.contains(" value=-9223372036854775808i "), "{l}");
        // Not a count quantity: float even when integral.
        let l = line(&number("occupancy", 42.0), MeasurementFrom::Quantity);
        assert!(l.contains(" value=42.0 "), "{l}");
        // Measurement = kind: the count is the field.
        let l = line(&number("vehicle_count", 7.0), MeasurementFrom::Kind);
        assert!(l.contains(" vehicle_count=7i "), "{l}");
    }

    #[test]
    fn count_list_matches_the_quantity_table() {
        let from_table: Vec<&str> = KNOWN_QUANTITIES
            .iter()
            .filter(|q| q.unit == "count")
            .map(|q| q.name)
            .collect();
        assert_eq!(from_table, COUNT_QUANTITIES);
    }

    #[test]
    fn booleans() {
        let l = line(
            &reading("smoke", reading::Value::Boolean(false)),
            MeasurementFrom::Quantity,
        );
        assert!(l.contains(" value=false "), "{l}");
        let l = line(
            &reading("smoke", reading::Value::Boolean(true)),
            MeasurementFrom::Kind,
        );
        assert!(l.contains(" smoke=true "), "{l}");
    }

    #[test]
    fn measurement_from_kind() {
        let l = line(&number("pm2_5", 35.0), MeasurementFrom::Kind);
        assert_eq!(
            l,
            "air_quality,commune=00004,device=aq-0001,kind=air_quality,protocol=mqtt,tenant=hanoi,unit=Cel pm2_5=35.0 1767225600123000000\n"
        );
    }

    #[test]
    fn seq_field() {
        let mut r = number("temperature", 20.5);
        r.device_seq = Some(17);
        let l = line(&r, MeasurementFrom::Quantity);
        assert!(
            l.ends_with(" value=20.5,seq=17i 1767225600123000000\n"),
            "{l}"
        );
        r.device_seq = Some(i64::MAX as u64);
        assert!(line(&r, MeasurementFrom::Quantity).contains(",seq=9223372036854775807i "));
        r.device_seq = Some(u64::MAX);
        assert!(!line(&r, MeasurementFrom::Quantity).contains("seq="));
    }

    #[test]
    fn timestamps_negative_and_pre_1970() {
        let mut r = number("temperature", 1.5);
        r.device_time_ms = 0;
        assert!(line(&r, MeasurementFrom::Quantity).ends_with(" 0\n"));
        r.device_time_ms = -1;
        assert!(line(&r, MeasurementFrom::Quantity).ends_with(" -1000000\n"));
        // 1969-07-20 20:17:40 UTC.
        r.device_time_ms = -14_182_940_000;
        assert!(line(&r, MeasurementFrom::Quantity).ends_with(" -14182940000000000\n"));
        // Limits of i64 nanoseconds.
        r.device_time_ms = i64::MAX / 1_000_000;
        assert!(line(&r, MeasurementFrom::Quantity).ends_with(" 9223372036854000000\n"));
        r.device_time_ms = i64::MIN / 1_000_000;
        assert!(line(&r, MeasurementFrom::Quantity).ends_with(" -9223372036854000000\n"));
    }

    #[test]
    fn unrepresentable_readings_write_nothing() {
        let mut out = String::from("kept\n");
        let mut check = |r: Reading, m: MeasurementFrom, want: Unrepresentable| {
            assert_eq!(write_line(&mut out, &r, m), Err(want));
            assert_eq!(out, "kept\n");
        };
        let mut r = number("temperature", 1.5);
        r.value = None;
        check(r, MeasurementFrom::Quantity, Unrepresentable::NoValue);
        for n in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            check(
                number("temperature", n),
                MeasurementFrom::Quantity,
                Unrepresentable::NotFinite(n.to_string()),
            );
        }
        let mut r = number("temperature", 1.5);
        r.device_time_ms = i64::MAX / 1_000_000 + 1;
        check(
            r.clone(),
            MeasurementFrom::Quantity,
            Unrepresentable::TimeOutOfRange(r.device_time_ms),
        );
        r.device_time_ms = i64::MIN;
        check(
            r,
            MeasurementFrom::Quantity,
            Unrepresentable::TimeOutOfRange(i64::MIN),
        );
        check(
            number("", 1.5),
            MeasurementFrom::Quantity,
            Unrepresentable::EmptyMeasurement("quantity"),
        );
        check(
            number("", 1.5),
            MeasurementFrom::Kind,
            Unrepresentable::EmptyFieldKey,
        );
        let mut r = number("temperature", 1.5);
        r.kind.clear();
        check(
            r,
            MeasurementFrom::Kind,
            Unrepresentable::EmptyMeasurement("kind"),
        );
        check(
            number("#hash", 1.5),
            MeasurementFrom::Quantity,
            Unrepresentable::CommentMeasurement("#hash".into()),
        );
        // '#' elsewhere is fine.
        assert!(line(&number("a#b", 1.5), MeasurementFrom::Quantity).starts_with("a#b,"));
        assert!(line(&number("#c", 1.5), MeasurementFrom::Kind).contains(" #c=1.5 "));
    }

    #[test]
    fn never_produces_nan_or_inf() {
        let values = [
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN,
            f64::EPSILON,
            f64::MIN_POSITIVE / 2.0, // subnormal
            0.1 + 0.2,
        ];
        let mut out = String::new();
        for n in values {
            for q in ["temperature", "vehicle_count"] {
                for m in [MeasurementFrom::Quantity, MeasurementFrom::Kind] {
                    let _ = write_line(&mut out, &number(q, n), m);
                }
            }
        }
        assert_eq!(out.lines().count(), 20, "the 5 finite values, 4 ways each");
        for l in out.lines() {
            // measurement+tags, fields, timestamp (no escaped spaces in these lines).
            let fields = l.split(' ').nth(1).unwrap();
            for field in fields.split(',') {
                let (_, v) = field.split_once('=').unwrap();
                let lower = v.to_ascii_lowercase();
                assert!(!lower.contains("nan") && !lower.contains("inf"), "{l}");
                let n: f64 = v.trim_end_matches('i').parse().unwrap();
                assert!(n.is_finite(), "{l}");
            }
        }
    }

    #[test]
    fn appends_to_existing_lines() {
        let mut out = String::new();
        write_line(
            &mut out,
            &number("temperature", 1.5),
            MeasurementFrom::Quantity,
        )
        .unwrap();
        write_line(
            &mut out,
            &number("humidity", 60.0),
            MeasurementFrom::Quantity,
        )
        .unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("temperature,"));
        assert!(lines[1].starts_with("humidity,"));
    }

    #[test]
    fn measurement_from_config_names() {
        #[derive(serde::Deserialize)]
        struct C {
            m: MeasurementFrom,
        }
        let c: C = toml::from_str("m = \"kind\"").unwrap();
        assert_eq!(c.m, MeasurementFrom::Kind);
        let c: C = toml::from_str("m = \"quantity\"").unwrap();
        assert_eq!(c.m, MeasurementFrom::Quantity);
        assert_eq!(MeasurementFrom::default(), MeasurementFrom::Quantity);
    }
}
