//! Scenarios: a city's simulated devices described in TOML (device-sim/scenarios/*.toml), and the
//! device plan derived from one. The plan is a pure function of the scenario (and its seed), so
//! `provision` and `run` computed separately agree on every device's id, kind, place, protocol
//! and payload format.

pub mod communes;
pub mod profiles;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::Spanned;

use crate::drivers::Protocol;
use crate::format::Format;
use communes::Commune;
use profiles::Profiles;

/// Line and column (1-based) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

/// A message located in a file: `name:line:col: message`.
fn located(name: &str, text: &str, offset: usize, msg: impl std::fmt::Display) -> anyhow::Error {
    let (line, col) = line_col(text, offset);
    anyhow::anyhow!("{name}:{line}:{col}: {msg}")
}

/// Deserializes TOML; a syntax or type error names the file, line and column.
pub fn parse_toml<T: DeserializeOwned>(name: &str, text: &str) -> anyhow::Result<T> {
    toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => located(name, text, span.start, e.message().trim()),
        None => anyhow::anyhow!("{name}: {}", e.message().trim()),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    name: String,
    #[serde(default = "default_seed")]
    seed: u64,
    tenant: String,
    /// Province code of the 2025 units (01 = Hà Nội, 79 = TP. Hồ Chí Minh).
    province: Spanned<String>,
    id_prefix: Option<String>,
    devices: Option<Spanned<u64>>,
    residents: Option<Spanned<u64>>,
    per_resident: Option<f64>,
    duration_secs: f64,
    #[serde(default)]
    ramp_up_secs: f64,
    /// Replaces every profile's reporting interval.
    interval_secs: Option<Spanned<f64>>,
    /// Per-profile reporting intervals (seconds).
    #[serde(default)]
    intervals: BTreeMap<String, Spanned<f64>>,
    #[serde(default = "default_qos")]
    qos: Spanned<u8>,
    #[serde(default = "default_utc_offset")]
    utc_offset_hours: f64,
    /// Profile name -> weight.
    profiles: BTreeMap<String, Spanned<f64>>,
    /// Protocol name -> weight (default: all MQTT).
    #[serde(default)]
    protocols: BTreeMap<String, Spanned<f64>>,
    /// Payload format name -> weight (default: all JSON).
    #[serde(default)]
    formats: BTreeMap<String, Spanned<f64>>,
    #[serde(default)]
    placement: PlacementFile,
    /// Devices whose profile has a command set subscribe to their commands and answer them.
    #[serde(default)]
    commands: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PlacementFile {
    #[serde(default)]
    weights: Option<Spanned<String>>,
    /// Commune code -> weight; when given, devices go only to these communes.
    #[serde(default)]
    communes: BTreeMap<String, Spanned<f64>>,
    #[serde(default = "default_jitter")]
    jitter_m: f64,
}

fn default_seed() -> u64 {
    1
}
fn default_qos() -> Spanned<u8> {
    Spanned::new(0..0, 1)
}
fn default_utc_offset() -> f64 {
    7.0
}
fn default_jitter() -> f64 {
    300.0
}

/// A validated scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// File name, for messages.
    pub source: String,
    pub name: String,
    pub seed: u64,
    pub tenant: String,
    pub province: String,
    pub province_name: String,
    pub id_prefix: String,
    pub devices: usize,
    pub duration: Duration,
    pub ramp_up: Duration,
    pub qos: u8,
    pub utc_offset_hours: f64,
    pub profile_mix: Vec<(String, f64)>,
    /// With the line each protocol is named on, so an unavailable one is reported there.
    pub protocol_mix: Vec<(Protocol, f64, usize)>,
    pub format_mix: Vec<(Format, f64)>,
    /// Devices whose profile has a command set take commands (`commands = true`); off by
    /// default, so a scenario that sends none pays nothing for them.
    pub commands: bool,
    intervals: BTreeMap<String, f64>,
    communes: Vec<(Commune, f64)>,
    jitter_m: f64,
    pub profiles: Profiles,
}

/// One simulated device.
#[derive(Debug, Clone, PartialEq)]
pub struct SimDevice {
    pub index: usize,
    pub id: String,
    pub profile: String,
    pub kind: String,
    pub commune_code: String,
    pub commune_name: String,
    pub lat: f64,
    pub lon: f64,
    pub protocol: Protocol,
    pub format: Format,
    pub interval: Duration,
    /// Seeds this device's value generator.
    pub seed: u64,
}

impl Scenario {
    pub fn load(path: &Path, profiles: Profiles) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        Self::parse(&path.display().to_string(), &text, profiles)
    }

    pub fn parse(name: &str, text: &str, profiles: Profiles) -> anyhow::Result<Scenario> {
        let f: ScenarioFile = parse_toml(name, text)?;
        let at = |span: std::ops::Range<usize>, msg: String| located(name, text, span.start, msg);
        let weight = |key: &str, w: &Spanned<f64>| -> anyhow::Result<f64> {
            let v = *w.get_ref();
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(at(
                    w.span(),
                    format!("weight of {key:?} must be a number ≥ 0, not {v}"),
                ))
            }
        };

        let devices = match (&f.devices, &f.residents, f.per_resident) {
            (Some(d), None, None) => *d.get_ref(),
            (None, Some(r), Some(per)) => {
                anyhow::ensure!(
                    per.is_finite() && per > 0.0,
                    "{name}: per_resident must be positive"
                );
                (*r.get_ref() as f64 * per).round() as u64
            }
            (None, Some(r), None) => {
                return Err(at(r.span(), "residents needs per_resident".into()))
            }
            (Some(d), Some(_), _) => {
                return Err(at(
                    d.span(),
                    "give either devices or residents × per_resident, not both".into(),
                ))
            }
            _ => anyhow::bail!(
                "{name}: the size is missing: devices = N, or residents = N with per_resident = X"
            ),
        };
        anyhow::ensure!(devices > 0, "{name}: the scenario has no devices");
        anyhow::ensure!(
            f.duration_secs > 0.0 && f.ramp_up_secs >= 0.0,
            "{name}: duration_secs must be positive and ramp_up_secs not negative"
        );
        if !(0..=1).contains(f.qos.get_ref()) {
            return Err(at(f.qos.span(), "qos must be 0 or 1".into()));
        }

        let mut profile_mix = Vec::new();
        for (pname, w) in &f.profiles {
            if !profiles.contains_key(pname) {
                return Err(at(
                    w.span(),
                    format!(
                        "unknown profile {pname:?} (profiles: {})",
                        profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            profile_mix.push((pname.clone(), weight(pname, w)?));
        }
        ensure_some_weight(name, "profiles", profile_mix.iter().map(|p| p.1))?;

        let mut protocol_mix = Vec::new();
        for (pname, w) in &f.protocols {
            let protocol = pname
                .parse::<Protocol>()
                .map_err(|e| at(w.span(), e.to_string()))?;
            protocol_mix.push((
                protocol,
                weight(pname, w)?,
                line_col(text, w.span().start).0,
            ));
        }
        if protocol_mix.is_empty() {
            protocol_mix.push((Protocol::Mqtt, 1.0, 0));
        }
        ensure_some_weight(name, "protocols", protocol_mix.iter().map(|p| p.1))?;

        let mut format_mix = Vec::new();
        for (fname, w) in &f.formats {
            let format = fname
                .parse::<Format>()
                .map_err(|e| at(w.span(), e.to_string()))?;
            format_mix.push((format, weight(fname, w)?));
        }
        if format_mix.is_empty() {
            format_mix.push((Format::Json, 1.0));
        }
        ensure_some_weight(name, "formats", format_mix.iter().map(|p| p.1))?;

        let mut intervals = BTreeMap::new();
        let interval_ok = |w: &Spanned<f64>| -> anyhow::Result<f64> {
            let v = *w.get_ref();
            if v >= 1.0 {
                Ok(v)
            } else {
                Err(at(
                    w.span(),
                    format!("interval must be at least 1 s, not {v}"),
                ))
            }
        };
        for (pname, secs) in &f.intervals {
            if !profiles.contains_key(pname) {
                return Err(at(secs.span(), format!("unknown profile {pname:?}")));
            }
            intervals.insert(pname.clone(), interval_ok(secs)?);
        }
        if let Some(all) = &f.interval_secs {
            let v = interval_ok(all)?;
            for pname in profiles.keys() {
                intervals.entry(pname.clone()).or_insert(v);
            }
        }

        let province = f.province.get_ref();
        let all =
            communes::of_province(province).map_err(|e| at(f.province.span(), e.to_string()))?;
        let province_name = all[0].province_name.clone();
        let by_area = match f
            .placement
            .weights
            .as_ref()
            .map(|w| (w.get_ref().as_str(), w))
        {
            None | Some(("area", _)) => true,
            Some(("equal", _)) => false,
            Some((other, w)) => {
                return Err(at(
                    w.span(),
                    format!("placement.weights {other:?}: \"area\" or \"equal\""),
                ))
            }
        };
        let communes: Vec<(Commune, f64)> = if f.placement.communes.is_empty() {
            // A unit without an area in the data weighs as the province's mean unit.
            let known: Vec<f64> = all.iter().filter_map(|c| c.area_km2).collect();
            let mean_area = known.iter().sum::<f64>() / known.len().max(1) as f64;
            all.into_iter()
                .map(|c| {
                    let area = c.area_km2.unwrap_or(mean_area).max(0.01);
                    let w = if by_area { area } else { 1.0 };
                    (c, w)
                })
                .collect()
        } else {
            let mut chosen = Vec::new();
            for (code, w) in &f.placement.communes {
                let c = all
                    .iter()
                    .find(|c| &c.commune_code == code)
                    .ok_or_else(|| {
                        at(
                            w.span(),
                            format!("commune {code:?} is not in province {province}"),
                        )
                    })?;
                chosen.push((c.clone(), weight(code, w)?));
            }
            chosen
        };
        ensure_some_weight(name, "placement.communes", communes.iter().map(|c| c.1))?;
        anyhow::ensure!(
            f.placement.jitter_m >= 0.0,
            "{name}: placement.jitter_m must not be negative"
        );

        Ok(Scenario {
            source: name.to_string(),
            id_prefix: f.id_prefix.unwrap_or_else(|| f.name.clone()),
            name: f.name,
            seed: f.seed,
            tenant: f.tenant,
            province: province.clone(),
            province_name,
            devices: usize::try_from(devices)?,
            duration: Duration::from_secs_f64(f.duration_secs),
            ramp_up: Duration::from_secs_f64(f.ramp_up_secs),
            qos: *f.qos.get_ref(),
            utc_offset_hours: f.utc_offset_hours,
            profile_mix,
            protocol_mix,
            format_mix,
            commands: f.commands,
            intervals,
            communes,
            jitter_m: f.placement.jitter_m,
            profiles,
        })
    }

    /// The reporting interval of a profile in this scenario.
    pub fn interval_of(&self, profile: &str) -> Duration {
        let secs = self
            .intervals
            .get(profile)
            .copied()
            .unwrap_or(self.profiles[profile].interval_secs);
        Duration::from_secs_f64(secs)
    }

    /// Every device of the scenario, deterministic for a given file.
    pub fn plan(&self) -> Vec<SimDevice> {
        let n = self.devices;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let profiles = apportion(&self.profile_mix, n, &mut rng);
        let protocols = apportion(
            &self
                .protocol_mix
                .iter()
                .map(|(p, w, _)| (*p, *w))
                .collect::<Vec<_>>(),
            n,
            &mut rng,
        );
        let formats = apportion(&self.format_mix, n, &mut rng);
        let total: f64 = self.communes.iter().map(|c| c.1).sum();
        let width = n.saturating_sub(1).to_string().len().max(6);
        (0..n)
            .map(|i| {
                let mut pick = rng.random::<f64>() * total;
                let commune = self
                    .communes
                    .iter()
                    .find(|(_, w)| {
                        pick -= w;
                        pick < 0.0
                    })
                    .unwrap_or(self.communes.last().expect("at least one commune"))
                    .0
                    .clone();
                let (lat, lon) = jitter(
                    commune.centroid_lat,
                    commune.centroid_lon,
                    self.jitter_m,
                    &mut rng,
                );
                let profile = profiles[i].clone();
                SimDevice {
                    index: i,
                    id: format!("{}-{i:0width$}", self.id_prefix),
                    kind: self.profiles[&profile].kind.clone(),
                    interval: self.interval_of(&profile),
                    profile,
                    commune_code: commune.commune_code,
                    commune_name: commune.commune_name,
                    lat,
                    lon,
                    protocol: protocols[i],
                    format: formats[i],
                    seed: rng.random(),
                }
            })
            .collect()
    }
}

fn ensure_some_weight(
    name: &str,
    what: &str,
    weights: impl Iterator<Item = f64>,
) -> anyhow::Result<()> {
    let sum: f64 = weights.sum();
    anyhow::ensure!(
        sum > 0.0,
        "{name}: [{what}] needs at least one positive weight"
    );
    Ok(())
}

/// `n` labels in the proportions of the weights (largest remainder, so a weight's share is exact
/// to one device), in a seeded random order.
fn apportion<T: Clone>(mix: &[(T, f64)], n: usize, rng: &mut StdRng) -> Vec<T> {
    let total: f64 = mix.iter().map(|m| m.1).sum();
    let quotas: Vec<f64> = mix.iter().map(|m| m.1 / total * n as f64).collect();
    let mut counts: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let mut order: Vec<usize> = (0..mix.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (quotas[a] - quotas[a].floor(), quotas[b] - quotas[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let short = n - counts.iter().sum::<usize>();
    for &i in order.iter().take(short) {
        counts[i] += 1;
    }
    let mut out: Vec<T> = mix
        .iter()
        .zip(counts)
        .flat_map(|((label, _), c)| std::iter::repeat_n(label.clone(), c))
        .collect();
    out.shuffle(rng);
    out
}

/// A point uniformly within `radius_m` of (lat, lon).
fn jitter(lat: f64, lon: f64, radius_m: f64, rng: &mut StdRng) -> (f64, f64) {
    let d = radius_m * rng.random::<f64>().sqrt();
    let theta = rng.random::<f64>() * std::f64::consts::TAU;
    let dlat = d * theta.cos() / 111_320.0;
    let dlon = d * theta.sin() / (111_320.0 * lat.to_radians().cos());
    let r6 = |v: f64| (v * 1e6).round() / 1e6;
    (r6(lat + dlat), r6(lon + dlon))
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiles::default_profiles;

    fn parse(text: &str) -> anyhow::Result<Scenario> {
        Scenario::parse("s.toml", text, default_profiles())
    }

    const BASE: &str = r#"name = "t"
tenant = "sim"
province = "01"
devices = 200
duration_secs = 10
[profiles]
air_quality = 1
street_light = 1
"#;

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for name in [
            "smoke.toml",
            "commune-target-density.toml",
            "stress.toml",
            "street-lights.toml",
        ] {
            let s = Scenario::load(&dir.join(name), default_profiles()).unwrap();
            assert!(s.devices >= 100, "{name}");
        }
    }

    #[test]
    fn plan_is_deterministic_and_proportional() {
        let text = format!("{BASE}[formats]\njson = 1\nsenml-cbor = 3\n");
        let s = parse(&text).unwrap();
        let a = s.plan();
        assert_eq!(a, s.plan());
        assert_eq!(a.len(), 200);
        let cbor = a.iter().filter(|d| d.format == Format::SenmlCbor).count();
        assert_eq!(cbor, 150);
        let lights = a.iter().filter(|d| d.kind == "street_light").count();
        assert_eq!(lights, 100);
        assert_eq!(a[7].id, "t-000007");
        // Hà Nội: every device near a Hà Nội commune centroid.
        assert!(a.iter().all(|d| (20.5..21.5).contains(&d.lat)));
    }

    #[test]
    fn residents_times_per_resident() {
        let text = BASE.replace("devices = 200", "residents = 1000\nper_resident = 4");
        assert_eq!(parse(&text).unwrap().devices, 4000);
    }

    #[test]
    fn custom_commune_weights_restrict_placement() {
        let text = format!("{BASE}[placement]\ncommunes = {{ \"00004\" = 1 }}\njitter_m = 0\n");
        let s = parse(&text).unwrap();
        assert!(s
            .plan()
            .iter()
            .all(|d| d.commune_code == "00004" && d.lat == 21.0386));
    }

    #[test]
    fn syntax_errors_are_line_numbered() {
        let text = BASE.replace("devices = 200", "devices = = 200");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("s.toml:4:"), "{e}");
    }

    #[test]
    fn type_and_unknown_key_errors_are_line_numbered() {
        let e = parse(&BASE.replace("duration_secs = 10", "duration_secs = \"long\""))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("s.toml:5:"), "{e}");
        let e = parse(&format!("{BASE}colour = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("s.toml:9:") && e.contains("colour"), "{e}");
    }

    #[test]
    fn semantic_errors_are_line_numbered() {
        let e = parse(&BASE.replace("street_light = 1", "street_lamp = 1"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("s.toml:8:") && e.contains("street_lamp"),
            "{e}"
        );
        let e = parse(&format!("{BASE}[formats]\nxml = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("s.toml:10:") && e.contains("xml"), "{e}");
        let e = parse(&BASE.replace("\"01\"", "\"99\""))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("s.toml:3:"), "{e}");
    }
}
