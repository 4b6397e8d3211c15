//! Sensor profiles (device-sim/profiles.toml, embedded): what a simulated device reports and how
//! its values move over the day.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use rand::rngs::StdRng;
use rand::Rng;
use serde::Deserialize;

use super::parse_toml;

pub const DEFAULT_FILE: &str = include_str!("../../profiles.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The registry kind devices of this profile are provisioned as.
    pub kind: String,
    pub interval_secs: f64,
    pub quantities: Vec<QuantitySpec>,
    /// What the device does with commands, in a scenario with `commands = true`.
    #[serde(default)]
    pub commands: Option<CommandSet>,
}

/// The commands a simulated device understands (drivers/lamp.rs).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CommandSet {
    /// A street light: `on`, `off`, `dim` (`level` 0-100), `light` (`on`, `level`).
    Lamp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantitySpec {
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: QuantityType,
    #[serde(default)]
    pub mean: f64,
    #[serde(default)]
    pub amplitude: f64,
    #[serde(default)]
    pub peak_hour: f64,
    #[serde(default)]
    pub noise: f64,
    #[serde(default = "neg_inf")]
    pub min: f64,
    #[serde(default = "pos_inf")]
    pub max: f64,
    #[serde(default = "three")]
    pub decimals: u8,
    #[serde(default)]
    pub rate_per_hour: f64,
    #[serde(default)]
    pub on_hour: f64,
    #[serde(default)]
    pub off_hour: f64,
    #[serde(default)]
    pub probability: f64,
}

fn neg_inf() -> f64 {
    f64::NEG_INFINITY
}
fn pos_inf() -> f64 {
    f64::INFINITY
}
fn three() -> u8 {
    3
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QuantityType {
    #[default]
    Gauge,
    Counter,
    Count,
    Switch,
    Alarm,
}

/// One value of a reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Number(f64),
    Boolean(bool),
}

pub type Profiles = BTreeMap<String, Profile>;

/// Parses a profile file; errors carry the file name, line and column.
pub fn parse(name: &str, text: &str) -> anyhow::Result<Profiles> {
    let profiles: Profiles = parse_toml(name, text)?;
    for (pname, p) in &profiles {
        anyhow::ensure!(
            p.interval_secs >= 1.0,
            "{name}: profile {pname}: interval_secs must be at least 1"
        );
        anyhow::ensure!(
            !p.quantities.is_empty(),
            "{name}: profile {pname}: no quantities"
        );
    }
    Ok(profiles)
}

pub fn default_profiles() -> Profiles {
    parse("profiles.toml (embedded)", DEFAULT_FILE).expect("the embedded profiles parse")
}

/// Daily cycle in [-1, 1], 1 at `peak_hour`.
fn cycle(hour: f64, peak_hour: f64) -> f64 {
    (2.0 * PI * (hour - peak_hour) / 24.0).cos()
}

/// Standard normal sample (Box-Muller).
fn gaussian(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

fn round(v: f64, decimals: u8) -> f64 {
    let f = 10f64.powi(i32::from(decimals));
    (v * f).round() / f
}

/// The state of one simulated device's values (counters accumulate).
pub struct Generator {
    counters: Vec<f64>,
}

impl Generator {
    pub fn new(profile: &Profile, rng: &mut StdRng) -> Self {
        let counters = profile
            .quantities
            .iter()
            .map(|q| {
                if q.kind == QuantityType::Counter {
                    let hi = if q.max.is_finite() {
                        q.max / 10.0
                    } else {
                        1000.0
                    };
                    let lo = if q.min.is_finite() { q.min } else { 0.0 };
                    round(lo + rng.random::<f64>() * (hi - lo).max(0.0), 3)
                } else {
                    0.0
                }
            })
            .collect();
        Self { counters }
    }

    /// The values at local `hour` (0..24), `interval_secs` after the previous reading.
    pub fn sample(
        &mut self,
        profile: &Profile,
        hour: f64,
        interval_secs: f64,
        rng: &mut StdRng,
        out: &mut Vec<(String, Value)>,
    ) {
        out.clear();
        for (i, q) in profile.quantities.iter().enumerate() {
            let c = cycle(hour, q.peak_hour);
            let value = match q.kind {
                QuantityType::Gauge => {
                    let v = q.mean + q.amplitude * c + q.noise * gaussian(rng);
                    Value::Number(round(v.clamp(q.min, q.max), q.decimals))
                }
                QuantityType::Counter => {
                    let per_hour = (q.rate_per_hour * (1.0 + q.amplitude * c)).max(0.0);
                    self.counters[i] += per_hour * interval_secs / 3600.0;
                    Value::Number(round(self.counters[i], 3))
                }
                QuantityType::Count => {
                    let expected = (q.rate_per_hour * (1.0 + q.amplitude * c)).max(0.0)
                        * interval_secs
                        / 3600.0;
                    let v = expected * (1.0 + q.noise * gaussian(rng));
                    Value::Number(v.max(0.0).round())
                }
                QuantityType::Switch => {
                    let on = if q.on_hour <= q.off_hour {
                        hour >= q.on_hour && hour < q.off_hour
                    } else {
                        hour >= q.on_hour || hour < q.off_hour
                    };
                    Value::Boolean(on)
                }
                QuantityType::Alarm => Value::Boolean(rng.random::<f64>() < q.probability),
            };
            out.push((q.name.clone(), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn embedded_profiles_cover_the_city_domains() {
        let p = default_profiles();
        for name in [
            "traffic_counter",
            "air_quality",
            "noise",
            "water_level",
            "flood_gauge",
            "rain_gauge",
            "street_light",
            "energy_meter",
            "water_meter",
            "fire_alarm",
            "waste_bin",
            "parking",
            "weather",
        ] {
            assert!(p.contains_key(name), "{name}");
        }
        let aq: Vec<&str> = p["air_quality"]
            .quantities
            .iter()
            .map(|q| q.name.as_str())
            .collect();
        for q in ["pm2_5", "pm10", "no2", "o3"] {
            assert!(aq.contains(&q), "{q}");
        }
    }

    #[test]
    fn values_stay_in_range_and_follow_the_day() {
        let p = default_profiles();
        let mut rng = StdRng::seed_from_u64(1);
        let light = &p["street_light"];
        let mut g = Generator::new(light, &mut rng);
        let mut out = Vec::new();
        g.sample(light, 23.0, 900.0, &mut rng, &mut out);
        assert_eq!(out[0], ("lamp_state".into(), Value::Boolean(true)));
        let Value::Number(e1) = out[2].1 else {
            panic!()
        };
        g.sample(light, 12.0, 900.0, &mut rng, &mut out);
        assert_eq!(out[0].1, Value::Boolean(false));
        let Value::Number(e2) = out[2].1 else {
            panic!()
        };
        assert!(e2 >= e1, "energy is cumulative: {e1} -> {e2}");

        let aq = &p["air_quality"];
        let mut g = Generator::new(aq, &mut rng);
        for h in 0..24 {
            g.sample(aq, f64::from(h), 300.0, &mut rng, &mut out);
            for ((name, v), q) in out.iter().zip(&aq.quantities) {
                let Value::Number(v) = v else { panic!() };
                assert!(*v >= q.min && *v <= q.max, "{name} {v}");
            }
        }
    }

    #[test]
    fn profile_errors_are_line_numbered() {
        let e = parse(
            "p.toml",
            "[a]\nkind = \"noise\"\ninterval_secs = \"x\"\nquantities = []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("p.toml:3:"), "{e}");
    }
}
