//! One pass over the registry: every device counted once, by commune and kind.
//!
//! Nothing is tracked per reading: the pipeline already keeps each device's last-seen time in an
//! atomic (`DeviceEntry::touch`), and "active" is decided here, at query time, against the kind's
//! window. The cost is one registry scan per query (bench/kpi measures it at 1,000,000 devices).

use super::geo::{Attribution, Geo};
use crate::proto::{KindFigures, KpiFigures};
use crate::registry::{DeviceEntry, Registry, KINDS};

pub const NKINDS: usize = KINDS.len();

/// Devices of one commune (or the unassigned bucket) and one kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Enabled devices.
    pub registered: u64,
    pub active: u64,
    pub disabled: u64,
    /// Enabled devices placed by the nearest-centroid approximation.
    pub approximated: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.registered += o.registered;
        self.active += o.active;
        self.disabled += o.disabled;
        self.approximated += o.approximated;
    }
}

/// Tallies of every commune of the country (indexed like `Geo::communes`) by kind.
pub struct Counts {
    pub communes: Vec<[Tally; NKINDS]>,
    pub unassigned: [Tally; NKINDS],
}

impl Counts {
    /// Counts every registered device; `windows_ms[k]` is the activity window of `KINDS[k]`.
    pub fn collect(
        registry: &Registry,
        geo: &Geo,
        windows_ms: &[i64; NKINDS],
        now_ms: i64,
    ) -> Counts {
        let mut counts = Counts {
            communes: vec![[Tally::default(); NKINDS]; geo.communes().len()],
            unassigned: [Tally::default(); NKINDS],
        };
        registry.for_each(|d: &DeviceEntry| {
            let kind = d.kind_index();
            let attribution = geo.attribute(d.commune_code(), d.position());
            let tally = match attribution.commune() {
                Some(i) => &mut counts.communes[i as usize][kind],
                None => &mut counts.unassigned[kind],
            };
            if !d.enabled() {
                tally.disabled += 1;
                return;
            }
            tally.registered += 1;
            if active(d, windows_ms[kind], now_ms) {
                tally.active += 1;
            }
            if matches!(attribution, Attribution::Centroid(_)) {
                tally.approximated += 1;
            }
        });
        counts
    }
}

/// An enabled device is active when its last accepted reading is younger than `window_ms`.
pub fn active(d: &DeviceEntry, window_ms: i64, now_ms: i64) -> bool {
    let seen = d.last_seen_ms();
    seen > 0 && seen >= now_ms - window_ms
}

/// The figures of an area from its summed tally.
pub fn figures(
    t: Tally,
    population: Option<u64>,
    area_km2: f64,
    target: Option<f64>,
) -> KpiFigures {
    let per_resident = population
        .filter(|p| *p > 0)
        .map(|p| t.active as f64 / p as f64);
    let required = match (target, population) {
        (Some(target), Some(p)) => Some((target * p as f64).ceil() as u64),
        _ => None,
    };
    KpiFigures {
        registered: t.registered,
        active: t.active,
        silent: t.registered - t.active,
        disabled: t.disabled,
        population,
        area_km2,
        connections_per_resident: per_resident,
        target_per_resident: target,
        attainment_percent: per_resident.zip(target).map(|(r, t)| r / t * 100.0),
        devices_needed: required.map(|r| r.saturating_sub(t.active)),
        active_per_km2: if area_km2 > 0.0 {
            t.active as f64 / area_km2
        } else {
            0.0
        },
    }
}

/// Per-kind rows of the kinds that have any device.
pub fn kinds(tallies: &[Tally; NKINDS], windows_ms: &[i64; NKINDS]) -> Vec<KindFigures> {
    KINDS
        .iter()
        .zip(tallies)
        .zip(windows_ms)
        .filter(|((_, t), _)| t.registered + t.disabled > 0)
        .map(|((kind, t), w)| KindFigures {
            kind: kind.to_string(),
            registered: t.registered,
            active: t.active,
            silent: t.registered - t.active,
            window_secs: (*w / 1000) as u64,
        })
        .collect()
}

pub fn sum(tallies: &[Tally; NKINDS]) -> Tally {
    let mut total = Tally::default();
    for t in tallies {
        total += *t;
    }
    total
}
