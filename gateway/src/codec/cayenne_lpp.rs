//! Cayenne Low Power Payload (LPP), the compact binary format most off-the-shelf LoRaWAN sensors
//! (and many NB-IoT ones) can be configured to send.
//!
//! # Frame
//!
//! A payload is a sequence of `channel (1 byte) | type (1 byte) | value (fixed size per type)`.
//! Values are big-endian integers scaled by a per-type factor. Every type of the Cayenne LPP
//! reference and of its common extension (the set pycayennelpp and ChirpStack's LPP codec speak)
//! is decoded; see [`TYPES`] for sizes, scales and the quantity each becomes.
//!
//! # Readings
//!
//! Each value becomes one reading named after its type (`temperature`, `humidity`, `pressure`
//! ...; multi-axis types give `_x`/`_y`/`_z` or `_r`/`_g`/`_b` readings). When a type appears on
//! more than one channel of a frame, the channel number is appended (`temperature_1`,
//! `temperature_2`), so two probes of one device stay apart; a type on a single channel keeps the
//! plain name, so it meets the canonical quantity table.
//!
//! A GPS value (type 136) is the frame's position: it becomes the location of every reading of
//! the frame, and a `gps_altitude` reading (m) carries it when the frame has nothing else.
//!
//! An unknown type or a value cut short refuses the whole payload with `malformed_lpp`: without
//! the type's size the rest of the frame cannot be read.

use super::{reason, DecodeError, Decoded, Decoder};
use crate::proto::reading::Value;

/// Decoder for [`Format::Lpp`](super::Format::Lpp).
#[derive(Debug, Default, Clone, Copy)]
pub struct LppDecoder;

/// One LPP type: id, reading names (one per dimension), byte size and divisor of each dimension,
/// whether it is signed, and the unit.
struct LppType {
    id: u8,
    names: &'static [&'static str],
    size: usize,
    scale: f64,
    signed: bool,
    unit: &'static str,
}

const fn t(
    id: u8,
    names: &'static [&'static str],
    size: usize,
    scale: f64,
    signed: bool,
    unit: &'static str,
) -> LppType {
    LppType {
        id,
        names,
        size,
        scale,
        signed,
        unit,
    }
}

/// GPS location: lat, lon (0.0001 degree) and altitude (0.01 m), 3 signed bytes each.
const GPS: u8 = 136;

/// Every supported type, by IPSO id. Units are SenML/UCUM symbols.
const TYPES: &[LppType] = &[
    t(0, &["digital_input"], 1, 1.0, false, ""),
    t(1, &["digital_output"], 1, 1.0, false, ""),
    t(2, &["analog_input"], 2, 100.0, true, ""),
    t(3, &["analog_output"], 2, 100.0, true, ""),
    t(100, &["generic_sensor"], 4, 1.0, false, ""),
    t(101, &["lux"], 2, 1.0, false, "lx"),
    t(102, &["presence"], 1, 1.0, false, ""),
    t(103, &["temperature"], 2, 10.0, true, "Cel"),
    t(104, &["humidity"], 1, 2.0, false, "%RH"),
    t(
        113,
        &["accelerometer_x", "accelerometer_y", "accelerometer_z"],
        2,
        1000.0,
        true,
        "[g]",
    ),
    t(115, &["pressure"], 2, 10.0, false, "hPa"),
    t(116, &["voltage"], 2, 100.0, false, "V"),
    t(117, &["current"], 2, 1000.0, false, "A"),
    t(118, &["frequency"], 4, 1.0, false, "Hz"),
    t(120, &["percentage"], 1, 1.0, false, "%"),
    t(121, &["altitude"], 2, 1.0, true, "m"),
    t(122, &["load"], 3, 1000.0, true, "kg"),
    t(125, &["concentration"], 2, 1.0, false, "ppm"),
    t(128, &["power"], 2, 1.0, false, "W"),
    t(130, &["distance"], 4, 1000.0, false, "m"),
    t(131, &["energy"], 4, 1000.0, false, "kWh"),
    t(132, &["direction"], 2, 1.0, false, "deg"),
    t(133, &["unix_time"], 4, 1.0, false, "s"),
    t(
        134,
        &["gyrometer_x", "gyrometer_y", "gyrometer_z"],
        2,
        100.0,
        true,
        "deg/s",
    ),
    t(
        135,
        &["colour_r", "colour_g", "colour_b"],
        1,
        1.0,
        false,
        "",
    ),
    t(
        GPS,
        &["gps_lat", "gps_lon", "gps_altitude"],
        3,
        1.0,
        true,
        "",
    ),
    t(142, &["switch"], 1, 1.0, false, ""),
];

fn lpp_type(id: u8) -> Option<&'static LppType> {
    TYPES.iter().find(|t| t.id == id)
}

/// Big-endian integer of 1 to 4 bytes, sign-extended when `signed`.
fn int(bytes: &[u8], signed: bool) -> i64 {
    let raw = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    let bits = bytes.len() * 8;
    if signed && raw >> (bits - 1) & 1 == 1 {
        raw as i64 - (1i64 << bits)
    } else {
        raw as i64
    }
}

/// One value of the frame before naming: channel, type, and its numbers.
struct Item {
    channel: u8,
    ty: &'static LppType,
    values: Vec<f64>,
}

fn parse(payload: &[u8]) -> Result<Vec<Item>, DecodeError> {
    let malformed = |d: String| DecodeError::new(reason::MALFORMED_LPP, d);
    let mut items = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let offset = payload.len() - rest.len();
        let [channel, id, tail @ ..] = rest else {
            return Err(malformed(format!(
                "frame ends inside a header at byte {offset}"
            )));
        };
        let ty = lpp_type(*id)
            .ok_or_else(|| malformed(format!("unknown type {id} at byte {}", offset + 1)))?;
        let len = ty.size * ty.names.len();
        if tail.len() < len {
            return Err(malformed(format!(
                "type {id} on channel {channel} needs {len} bytes, {} left",
                tail.len()
            )));
        }
        let scale = |i: usize| match (ty.id, i) {
            (GPS, 2) => 100.0,
            (GPS, _) => 10_000.0,
            _ => ty.scale,
        };
        let values = tail[..len]
            .chunks(ty.size)
            .enumerate()
            .map(|(i, b)| int(b, ty.signed) as f64 / scale(i))
            .collect();
        items.push(Item {
            channel: *channel,
            ty,
            values,
        });
        rest = &tail[len..];
    }
    Ok(items)
}

impl Decoder for LppDecoder {
    fn decode(&self, payload: &[u8], _now_ms: i64) -> Result<Vec<Decoded>, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::new(reason::EMPTY_PAYLOAD, "payload is empty"));
        }
        let items = parse(payload)?;
        let location = items
            .iter()
            .rev()
            .find(|i| i.ty.id == GPS)
            .map(|i| super::location(Some(i.values[0]), Some(i.values[1]), Some(i.values[2])))
            .transpose()?
            .flatten();
        let only_gps = items.iter().all(|i| i.ty.id == GPS);
        // Counted once: a frame of a payload limit's worth of 3-byte items is ~87,000 items, and
        // counting per item would be quadratic in an attacker's hands.
        let mut per_type = [0u32; 256];
        for item in &items {
            per_type[usize::from(item.ty.id)] += 1;
        }
        let mut out = Vec::new();
        for item in &items {
            let suffix = if per_type[usize::from(item.ty.id)] > 1 {
                format!("_{}", item.channel)
            } else {
                String::new()
            };
            for (k, (name, value)) in item.ty.names.iter().zip(&item.values).enumerate() {
                if item.ty.id == GPS && (k < 2 || !only_gps) {
                    // The position rides on every reading as its location.
                    continue;
                }
                let unit = if item.ty.id == GPS { "m" } else { item.ty.unit };
                out.push(Decoded {
                    quantity: format!("{name}{suffix}"),
                    value: Value::Number(*value),
                    unit: unit.to_string(),
                    time_ms: None,
                    seq: None,
                    location,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(p: &[u8]) -> Result<Vec<Decoded>, DecodeError> {
        LppDecoder.decode(p, 0)
    }

    fn values(d: &[Decoded]) -> Vec<(String, f64, String)> {
        d.iter()
            .map(|d| match d.value {
                Value::Number(n) => (d.quantity.clone(), n, d.unit.clone()),
                _ => panic!("not a number"),
            })
            .collect()
    }

    #[test]
    fn reference_examples() {
        // The Cayenne LPP reference's examples: two temperatures, then accelerometer.
        let d = decode(&[0x03, 0x67, 0x01, 0x10, 0x05, 0x67, 0x00, 0xFF]).unwrap();
        assert_eq!(
            values(&d),
            vec![
                ("temperature_3".into(), 27.2, "Cel".into()),
                ("temperature_5".into(), 25.5, "Cel".into())
            ]
        );
        let d = decode(&[0x06, 0x71, 0x04, 0xD2, 0xFB, 0x2E, 0x00, 0x00]).unwrap();
        assert_eq!(
            values(&d),
            vec![
                ("accelerometer_x".into(), 1.234, "[g]".into()),
                ("accelerometer_y".into(), -1.234, "[g]".into()),
                ("accelerometer_z".into(), 0.0, "[g]".into())
            ]
        );
    }

    #[test]
    fn gps_is_the_location_of_the_frame() {
        // Reference example: 42.3519, -87.9094, 10 m, plus a humidity.
        let frame = [
            0x01, 0x88, 0x06, 0x76, 0x5f, 0xf2, 0x96, 0x0a, 0x00, 0x03, 0xe8, 0x02, 0x68, 0x50,
        ];
        let d = decode(&frame).unwrap();
        assert_eq!(values(&d), vec![("humidity".into(), 40.0, "%RH".into())]);
        let loc = d[0].location.unwrap();
        assert_eq!(
            (loc.lat, loc.lon, loc.alt_m),
            (42.3519, -87.9094, Some(10.0))
        );
        let d = decode(&frame[..11]).unwrap();
        assert_eq!(values(&d), vec![("gps_altitude".into(), 10.0, "m".into())]);
        assert!(d[0].location.is_some());
    }

    #[test]
    fn malformed_frames_are_refused() {
        for bad in [
            &[0x01][..],
            &[0x01, 0x67, 0x01],
            &[0x01, 0x42, 0x00],
            &[0x01, 0x67, 0x01, 0x10, 0x02],
        ] {
            assert_eq!(
                decode(bad).unwrap_err().reason,
                reason::MALFORMED_LPP,
                "{bad:?}"
            );
        }
        assert_eq!(decode(&[]).unwrap_err().reason, reason::EMPTY_PAYLOAD);
        // A GPS position off the globe.
        let off = [
            0x01, 0x88, 0x7f, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(decode(&off).unwrap_err().reason, reason::BAD_LOCATION);
    }

    #[test]
    fn sign_extension() {
        assert_eq!(int(&[0xff, 0xff], true), -1);
        assert_eq!(int(&[0xff, 0xff], false), 65535);
        assert_eq!(int(&[0x80, 0x00, 0x00], true), -8_388_608);
        assert_eq!(int(&[0xff, 0xff, 0xff, 0xff], false), 4_294_967_295);
    }
}
