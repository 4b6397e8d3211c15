//! The quantity table: one canonical name and default unit per physical quantity.
//!
//! Devices from different vendors call the same thing `temp`, `Temperature` or `t`; agencies and
//! dashboards query one name. This table is the single place that decides the mapping, it is
//! printed in the book (docs/src/payload-formats.md) and by `citygw quantities`, and every payload format goes through it.
//!
//! Rules:
//! - A known alias (or the canonical name itself), matched ASCII case-insensitively after trimming
//!   whitespace, becomes the canonical name.
//! - Unknown quantities pass through as sent (only trimmed): renaming or lower-casing something we
//!   do not understand would make it harder for the device's owner to find.
//! - Units are never converted. A unit the device sent is kept (trimmed), because SenML units are
//!   exact and a silent conversion would be a silent error; only when the device sent none is the
//!   canonical default unit filled in. Units are SenML (RFC 8428 registry) / UCUM symbols.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::LazyLock;

/// One row of the quantity table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    /// Canonical name, snake_case, as stored and served.
    pub name: &'static str,
    /// Default unit when the device sends none; "" for booleans and text.
    pub unit: &'static str,
    /// Other names devices use, lower-case; matched case-insensitively.
    pub aliases: &'static [&'static str],
    pub description: &'static str,
}

const fn q(
    name: &'static str,
    unit: &'static str,
    aliases: &'static [&'static str],
    description: &'static str,
) -> Quantity {
    Quantity {
        name,
        unit,
        aliases,
        description,
    }
}

/// The table, for the book and `citygw quantities`. Order is for readers: grouped by domain.
pub static KNOWN_QUANTITIES: &[Quantity] = &[
    // Weather and air
    q(
        "temperature",
        "Cel",
        &["temp", "t", "tmp"],
        "Air temperature",
    ),
    q(
        "humidity",
        "%RH",
        &["hum", "rh", "relative_humidity"],
        "Relative humidity",
    ),
    q(
        "pressure",
        "hPa",
        &["baro", "barometer", "air_pressure"],
        "Barometric air pressure",
    ),
    q("wind_speed", "m/s", &[], "Wind speed"),
    q(
        "wind_direction",
        "deg",
        &[],
        "Wind direction, degrees clockwise from north",
    ),
    q(
        "rain",
        "mm",
        &["rainfall", "precipitation"],
        "Rainfall since the previous reading",
    ),
    q("lux", "lx", &["illuminance", "light"], "Illuminance"),
    q(
        "pm1",
        "ug/m3",
        &["pm1_0", "pm1.0"],
        "Particulate matter below 1 um",
    ),
    q(
        "pm2_5",
        "ug/m3",
        &["pm25", "pm2.5", "pm2p5"],
        "Particulate matter below 2.5 um",
    ),
    q("pm10", "ug/m3", &[], "Particulate matter below 10 um"),
    q("no2", "ug/m3", &[], "Nitrogen dioxide concentration"),
    q("o3", "ug/m3", &[], "Ozone concentration"),
    q("so2", "ug/m3", &[], "Sulphur dioxide concentration"),
    q("co", "mg/m3", &[], "Carbon monoxide concentration"),
    q("co2", "ppm", &[], "Carbon dioxide concentration"),
    // Noise
    q(
        "noise",
        "dBA",
        &["noise_level", "laeq", "sound_level"],
        "A-weighted sound level",
    ),
    // Water and flood
    q(
        "water_level",
        "m",
        &["level", "wl"],
        "Water level (river, canal, flood gauge)",
    ),
    q("flow", "m3/s", &["flow_rate"], "Water flow rate"),
    q(
        "water_volume",
        "m3",
        &["volume"],
        "Cumulative water volume (water meter)",
    ),
    // Energy
    q("power", "W", &["p", "active_power"], "Active power"),
    q(
        "energy",
        "kWh",
        &["e", "active_energy"],
        "Cumulative active energy (energy meter)",
    ),
    q("voltage", "V", &["volt", "u_v"], "Voltage"),
    q("current", "A", &[], "Electric current"),
    // Mobility, parking, waste, street lights, fire
    q(
        "vehicle_count",
        "count",
        &["vehicles", "traffic_count"],
        "Vehicles counted since the previous reading",
    ),
    q(
        "occupancy",
        "%",
        &["parking_occupancy"],
        "Occupied share of parking spaces",
    ),
    q(
        "fill_level",
        "%",
        &["fill", "bin_level"],
        "Waste bin fill level",
    ),
    q(
        "lamp_state",
        "",
        &[],
        "Street light on (true) or off (false)",
    ),
    q(
        "smoke",
        "",
        &[],
        "Smoke alarm raised (true) or clear (false)",
    ),
    // Device health
    q(
        "battery",
        "%EL",
        &["batt", "battery_level", "bat"],
        "Remaining battery charge",
    ),
];

/// Longest name or alias in the table: anything longer cannot match, so it needs no lower-casing.
const MAX_KEY_LEN: usize = 32;

/// Lower-case name or alias -> row. Built once from [`KNOWN_QUANTITIES`], so the table stays the
/// single source of truth.
static LOOKUP: LazyLock<HashMap<&'static str, &'static Quantity>> = LazyLock::new(|| {
    let mut m = HashMap::new();
    for q in KNOWN_QUANTITIES {
        m.insert(q.name, q);
        for a in q.aliases {
            m.insert(*a, q);
        }
    }
    m
});

/// The table row for a name or alias (ASCII case-insensitive, trimmed), if any.
pub fn lookup(quantity: &str) -> Option<&'static Quantity> {
    let name = quantity.trim();
    if name.is_empty() || name.len() > MAX_KEY_LEN {
        return None;
    }
    if !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return LOOKUP.get(name).copied();
    }
    // Lower-case on the stack: this runs for every reading.
    let mut buf = [0u8; MAX_KEY_LEN];
    let buf = &mut buf[..name.len()];
    buf.copy_from_slice(name.as_bytes());
    buf.make_ascii_lowercase();
    let lower = std::str::from_utf8(buf).ok()?;
    LOOKUP.get(lower).copied()
}

/// Canonical quantity name and unit.
///
/// Known aliases map to the canonical name; when the device sent no unit, the canonical default
/// unit is used; a unit the device sent is kept as sent (SenML units are kept). Unknown quantities
/// pass through unchanged, only trimmed. Never allocates: the results borrow either the input or
/// the static table; `Cow` leaves room for conversions that would need to build a string.
pub fn canonical<'a>(quantity: &'a str, unit: &'a str) -> (Cow<'a, str>, Cow<'a, str>) {
    let unit = unit.trim();
    match lookup(quantity) {
        Some(q) => {
            let unit = if unit.is_empty() { q.unit } else { unit };
            (Cow::Borrowed(q.name), Cow::Borrowed(unit))
        }
        None => (Cow::Borrowed(quantity.trim()), Cow::Borrowed(unit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_map_to_canonical_with_default_unit() {
        let cases = [
            ("temp", "temperature", "Cel"),
            ("T", "temperature", "Cel"),
            ("Temperature", "temperature", "Cel"),
            ("tmp", "temperature", "Cel"),
            ("RH", "humidity", "%RH"),
            ("relative_humidity", "humidity", "%RH"),
            ("PM2.5", "pm2_5", "ug/m3"),
            ("pm25", "pm2_5", "ug/m3"),
            ("pm2p5", "pm2_5", "ug/m3"),
            ("pm10", "pm10", "ug/m3"),
            ("NO2", "no2", "ug/m3"),
            ("o3", "o3", "ug/m3"),
            ("CO2", "co2", "ppm"),
            ("LAeq", "noise", "dBA"),
            ("sound_level", "noise", "dBA"),
            ("level", "water_level", "m"),
            ("WL", "water_level", "m"),
            ("flow_rate", "flow", "m3/s"),
            ("rainfall", "rain", "mm"),
            ("precipitation", "rain", "mm"),
            ("baro", "pressure", "hPa"),
            ("air_pressure", "pressure", "hPa"),
            ("P", "power", "W"),
            ("active_power", "power", "W"),
            ("e", "energy", "kWh"),
            ("active_energy", "energy", "kWh"),
            ("volt", "voltage", "V"),
            ("u_v", "voltage", "V"),
            ("current", "current", "A"),
            ("batt", "battery", "%EL"),
            ("Battery_Level", "battery", "%EL"),
            ("bat", "battery", "%EL"),
            ("vehicles", "vehicle_count", "count"),
            ("traffic_count", "vehicle_count", "count"),
            ("parking_occupancy", "occupancy", "%"),
            ("fill", "fill_level", "%"),
            ("bin_level", "fill_level", "%"),
            ("illuminance", "lux", "lx"),
            ("light", "lux", "lx"),
            ("wind_speed", "wind_speed", "m/s"),
            ("wind_direction", "wind_direction", "deg"),
            ("lamp_state", "lamp_state", ""),
            ("smoke", "smoke", ""),
            ("volume", "water_volume", "m3"),
            ("  temp  ", "temperature", "Cel"),
        ];
        for (input, name, unit) in cases {
            let (n, u) = canonical(input, "");
            assert_eq!((n.as_ref(), u.as_ref()), (name, unit), "{input}");
        }
    }

    #[test]
    fn device_unit_is_kept() {
        assert_eq!(
            canonical("temp", "K"),
            (Cow::Borrowed("temperature"), Cow::Borrowed("K"))
        );
        assert_eq!(
            canonical("energy", " Wh "),
            (Cow::Borrowed("energy"), Cow::Borrowed("Wh"))
        );
        assert_eq!(
            canonical("temp", "   "),
            (Cow::Borrowed("temperature"), Cow::Borrowed("Cel"))
        );
    }

    #[test]
    fn unknown_passes_through() {
        assert_eq!(
            canonical("Soil_Moisture", ""),
            (Cow::Borrowed("Soil_Moisture"), Cow::Borrowed(""))
        );
        assert_eq!(
            canonical(" mực_nước ", "m"),
            (Cow::Borrowed("mực_nước"), Cow::Borrowed("m"))
        );
        assert_eq!(
            canonical("nhiệt độ", ""),
            (Cow::Borrowed("nhiệt độ"), Cow::Borrowed(""))
        );
        let long = "x".repeat(100);
        assert_eq!(canonical(&long, "").0, long);
        assert_eq!(canonical("", ""), (Cow::Borrowed(""), Cow::Borrowed("")));
        // Non-ASCII input of alias length must not panic or match.
        assert!(lookup("ТЕМР").is_none());
        assert!(lookup("TÉMP").is_none());
    }

    #[test]
    fn never_allocates() {
        for (q, u) in [
            ("temperature", ""),
            ("TEMP", ""),
            ("unknown", "x"),
            ("pm2.5", "ug/m3"),
        ] {
            let (n, u) = canonical(q, u);
            assert!(matches!(n, Cow::Borrowed(_)) && matches!(u, Cow::Borrowed(_)));
        }
    }

    #[test]
    fn table_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for q in KNOWN_QUANTITIES {
            assert!(!q.description.is_empty(), "{}", q.name);
            for key in std::iter::once(&q.name).chain(q.aliases) {
                assert!(key.len() <= MAX_KEY_LEN, "{key}");
                assert_eq!(
                    *key,
                    key.to_ascii_lowercase(),
                    "aliases are stored lower-case: {key}"
                );
                assert_eq!(key.trim(), *key);
                assert!(seen.insert(*key), "{key} appears twice");
                assert_eq!(lookup(key).map(|r| r.name), Some(q.name), "{key}");
            }
        }
        assert_eq!(LOOKUP.len(), seen.len());
    }

    #[test]
    fn required_rows_are_present() {
        for name in [
            "temperature",
            "humidity",
            "pm2_5",
            "pm10",
            "no2",
            "o3",
            "co2",
            "noise",
            "water_level",
            "flow",
            "rain",
            "pressure",
            "power",
            "energy",
            "voltage",
            "current",
            "battery",
            "vehicle_count",
            "occupancy",
            "fill_level",
            "lux",
            "wind_speed",
            "wind_direction",
            "lamp_state",
            "smoke",
            "water_volume",
        ] {
            assert_eq!(lookup(name).map(|q| q.name), Some(name));
        }
    }
}
