//! Round-trip properties: one SenML pack written as JSON and as CBOR decodes to the same readings;
//! a Cayenne LPP frame built by an encoder written from the LPP reference decodes to the values
//! it was built from.

use ciborium::Value as Cbor;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Map, Value as Json};

use super::codecs::NOW_MS;
use super::config;
use crate::codec::{decoder, Decoded, Format};
use crate::proto::reading::Value;

/// One SenML field value, written the same way in both encodings.
#[derive(Debug, Clone)]
enum Field {
    Num(f64),
    Text(String),
    Bool(bool),
}

/// (JSON key, CBOR label, value) of every field of a record.
type Record = Vec<(&'static str, i64, Field)>;

fn senml_record() -> impl Strategy<Value = Record> {
    let name = "[a-zđ0-9_/:]{0,8}";
    let num = prop_oneof![
        any::<f64>(),
        -1e3f64..1e3,
        Just(0.0),
        (1.6e9f64..2.0e9), // absolute times
    ];
    (
        proptest::option::of(name.prop_map(Field::Text)),
        proptest::option::of(num.clone().prop_map(Field::Num)),
        proptest::option::of("[a-zA-Z%/]{0,3}".prop_map(Field::Text)),
        proptest::option::of(num.clone().prop_map(Field::Num)),
        proptest::option::of(name.prop_map(Field::Text)),
        proptest::option::of("[a-zA-Z%/]{0,3}".prop_map(Field::Text)),
        proptest::option::of(prop_oneof![
            num.clone().prop_map(|n| ("v", 2, Field::Num(n))),
            "[ -~đ]{0,6}".prop_map(|s| ("vs", 3, Field::Text(s))),
            any::<bool>().prop_map(|b| ("vb", 4, Field::Bool(b))),
        ]),
        proptest::option::of(num.clone().prop_map(Field::Num)),
        proptest::option::of(num.prop_map(Field::Num)),
    )
        .prop_map(|(bn, bt, bu, bv, n, u, value, s, t)| {
            let mut r: Record = Vec::new();
            let mut put = |k, l, f: Option<Field>| {
                if let Some(f) = f {
                    r.push((k, l, f));
                }
            };
            put("bn", -2, bn);
            put("bt", -3, bt);
            put("bu", -4, bu);
            put("bv", -5, bv);
            put("n", 0, n);
            put("u", 1, u);
            if let Some((k, l, f)) = value {
                put(k, l, Some(f));
            }
            put("s", 5, s);
            put("t", 6, t);
            r
        })
}

fn as_json(pack: &[Record]) -> Vec<u8> {
    let records: Vec<Json> = pack
        .iter()
        .map(|r| {
            let map: Map<String, Json> = r
                .iter()
                .map(|(k, _, f)| {
                    let v = match f {
                        // serde_json writes a non-finite number as null; keep the comparison
                        // about encodings, not about NaN.
                        Field::Num(n) => json!(n),
                        Field::Text(s) => json!(s),
                        Field::Bool(b) => json!(b),
                    };
                    (k.to_string(), v)
                })
                .collect();
            Json::Object(map)
        })
        .collect();
    serde_json::to_vec(&records).expect("json")
}

fn as_cbor(pack: &[Record]) -> Vec<u8> {
    let records: Vec<Cbor> = pack
        .iter()
        .map(|r| {
            Cbor::Map(
                r.iter()
                    .map(|(_, l, f)| {
                        let v = match f {
                            Field::Num(n) => Cbor::Float(*n),
                            Field::Text(s) => Cbor::Text(s.clone()),
                            Field::Bool(b) => Cbor::Bool(*b),
                        };
                        (Cbor::Integer((*l).into()), v)
                    })
                    .collect(),
            )
        })
        .collect();
    let mut out = Vec::new();
    ciborium::into_writer(&Cbor::Array(records), &mut out).expect("cbor");
    out
}

#[test]
fn senml_json_and_cbor_agree() {
    let mut runner = TestRunner::new(config());
    let finite = |pack: &Vec<Record>| {
        pack.iter()
            .flatten()
            .all(|(_, _, f)| !matches!(f, Field::Num(n) if !n.is_finite()))
    };
    let packs = prop::collection::vec(senml_record(), 1..6).prop_filter("finite", finite);
    runner
        .run(&packs, |pack| {
            let from_json = decoder(Format::SenmlJson).decode(&as_json(&pack), NOW_MS);
            let from_cbor = decoder(Format::SenmlCbor).decode(&as_cbor(&pack), NOW_MS);
            match (&from_json, &from_cbor) {
                (Ok(j), Ok(c)) => prop_assert_eq!(j, c),
                (Err(j), Err(c)) => prop_assert_eq!(j.reason, c.reason, "{} / {}", j, c),
                _ => prop_assert!(false, "json {from_json:?} but cbor {from_cbor:?}"),
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("SenML JSON/CBOR: {e}"));
}

/// An LPP reference type: id, names, bytes per value, multiplier, signed, unit.
type LppType = (u8, &'static [&'static str], usize, f64, bool, &'static str);

/// The LPP reference's types, written down here independently of the decoder's table.
const LPP: &[LppType] = &[
    (0, &["digital_input"], 1, 1.0, false, ""),
    (2, &["analog_input"], 2, 100.0, true, ""),
    (101, &["lux"], 2, 1.0, false, "lx"),
    (103, &["temperature"], 2, 10.0, true, "Cel"),
    (104, &["humidity"], 1, 2.0, false, "%RH"),
    (
        113,
        &["accelerometer_x", "accelerometer_y", "accelerometer_z"],
        2,
        1000.0,
        true,
        "[g]",
    ),
    (115, &["pressure"], 2, 10.0, false, "hPa"),
    (122, &["load"], 3, 1000.0, true, "kg"),
    (133, &["unix_time"], 4, 1.0, false, "s"),
];

fn lpp_frame() -> impl Strategy<Value = Vec<(u8, usize, Vec<i64>)>> {
    let item = (0u8..4, 0..LPP.len(), prop::collection::vec(any::<i64>(), 3));
    prop::collection::vec(item, 1..8)
}

#[test]
fn lpp_encode_then_decode() {
    let mut runner = TestRunner::new(config());
    runner
        .run(&lpp_frame(), |items| {
            let mut frame = Vec::new();
            let mut expected = Vec::new();
            for (channel, t, raws) in &items {
                let (id, names, size, scale, signed, unit) = LPP[*t];
                frame.extend([*channel, id]);
                let plain = items.iter().filter(|(_, u, _)| LPP[*u].0 == id).count() == 1;
                for (name, raw) in names.iter().zip(raws) {
                    // Fit the raw number into `size` bytes, as an encoder would clamp it.
                    let bits = 8 * size as u32;
                    let raw = if signed {
                        raw.rem_euclid(1 << bits) - (1 << (bits - 1))
                    } else {
                        raw.rem_euclid(1 << bits)
                    };
                    frame.extend(&raw.to_be_bytes()[8 - size..]);
                    let quantity = if plain {
                        name.to_string()
                    } else {
                        format!("{name}_{channel}")
                    };
                    expected.push((quantity, raw as f64 / scale, unit.to_string()));
                }
            }
            let decoded = decoder(Format::Lpp)
                .decode(&frame, NOW_MS)
                .map_err(|e| TestCaseError::fail(format!("{frame:?}: {e}")))?;
            let got: Vec<_> = decoded
                .iter()
                .map(|d: &Decoded| match d.value {
                    Value::Number(n) => (d.quantity.clone(), n, d.unit.clone()),
                    ref v => panic!("LPP gave {v:?}"),
                })
                .collect();
            prop_assert_eq!(got, expected);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("LPP: {e}"));
}
