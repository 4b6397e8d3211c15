//! IoT connections per resident: the city plan's target (Hà Nội 09/KH-UBND, key indicator 7),
//! measured live from the registry, with daily snapshots and a projection.
//!
//! [`geo`] places devices in communes, [`compute`] counts them in one registry pass,
//! [`snapshots`] keeps the daily history and [`projection`] turns it into dates. [`Kpi`] ties
//! them together for the gRPC, HTTP and CLI outputs and keeps the Prometheus gauges fresh.

pub mod compute;
pub mod config;
pub mod geo;
pub mod projection;
pub mod snapshots;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use tokio_util::sync::CancellationToken;

use crate::proto::{CommuneKpi, ConnectionKpi, KindFigures, KpiSnapshot};
use crate::registry::{Registry, KINDS};
use crate::store::{Store, StoreError};
use compute::{Counts, Tally, NKINDS};
pub use config::KpiConfig;
use geo::Geo;

#[derive(Debug, thiserror::Error)]
pub enum KpiError {
    #[error("unknown city code {0:?} (province-level code of the 2025 units, e.g. \"01\")")]
    UnknownCity(String),
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The KPI service; clone it freely.
#[derive(Clone)]
pub struct Kpi {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    store: Store,
    geo: Geo,
    cfg: KpiConfig,
    windows_ms: [i64; NKINDS],
}

impl Kpi {
    pub fn new(cfg: &KpiConfig, registry: Registry, store: Store) -> anyhow::Result<Kpi> {
        cfg.validate()?;
        let geo = Geo::load(
            cfg.commune_population_file.as_deref(),
            cfg.boundaries_file.as_deref(),
            cfg.max_centroid_km,
        )?;
        anyhow::ensure!(
            geo.city(&cfg.city).is_some(),
            "kpi.city {:?} is not a province-level code of the 2025 units",
            cfg.city
        );
        let default = config::parse_duration(&cfg.activity_window)?;
        let mut windows_ms = [default.as_millis() as i64; NKINDS];
        for (kind, window) in &cfg.kind_windows {
            let k = KINDS
                .iter()
                .position(|x| x == kind)
                .expect("validated kind");
            windows_ms[k] = config::parse_duration(window)?.as_millis() as i64;
        }
        Ok(Kpi {
            inner: Arc::new(Inner {
                registry,
                store,
                geo,
                cfg: cfg.clone(),
                windows_ms,
            }),
        })
    }

    /// The configured city.
    pub fn city(&self) -> &str {
        &self.inner.cfg.city
    }

    /// The commune table (and boundaries, when configured).
    pub fn geo(&self) -> &Geo {
        &self.inner.geo
    }

    /// Whether a device counts as active at `now_ms`: enabled, with an accepted reading younger
    /// than its kind's window (the rule of every KPI figure).
    pub fn is_active(&self, d: &crate::registry::DeviceEntry, now_ms: i64) -> bool {
        let kind = KINDS
            .iter()
            .position(|k| *k == d.kind())
            .unwrap_or(NKINDS - 1);
        compute::active(d, self.inner.windows_ms[kind], now_ms)
    }

    fn local_date(&self, now_ms: i64) -> NaiveDate {
        let offset_ms = self.inner.cfg.utc_offset_hours as i64 * 3_600_000;
        chrono::DateTime::from_timestamp_millis(now_ms + offset_ms)
            .unwrap_or_default()
            .date_naive()
    }

    /// The KPI of a city (empty: the configured one) at `now_ms`. A registry scan: call it from
    /// a blocking thread ([`Kpi::report_async`]).
    pub fn report(&self, city: &str, now_ms: i64) -> Result<ConnectionKpi, KpiError> {
        let started = Instant::now();
        let inner = &*self.inner;
        let city_code = if city.is_empty() { self.city() } else { city };
        let city = inner
            .geo
            .city(city_code)
            .ok_or_else(|| KpiError::UnknownCity(city_code.to_string()))?;
        let counts = Counts::collect(&inner.registry, &inner.geo, &inner.windows_ms, now_ms);
        let today = self.local_date(now_ms);
        let schedule = inner.cfg.schedule(city_code);
        let (target_year, target) = target_in_force(&schedule, today);

        let mut city_tallies = [Tally::default(); NKINDS];
        let mut communes = Vec::new();
        let mut outside_city = 0;
        for (i, c) in inner.geo.communes().iter().enumerate() {
            let tallies = &counts.communes[i];
            if c.province != city.code {
                outside_city += compute::sum(tallies).registered;
                continue;
            }
            for (total, t) in city_tallies.iter_mut().zip(tallies) {
                *total += *t;
            }
            let sum = compute::sum(tallies);
            communes.push(CommuneKpi {
                code: c.code.clone(),
                name: c.name.clone(),
                figures: Some(compute::figures(sum, c.population, c.area_km2, target)),
                kinds: compute::kinds(tallies, &inner.windows_ms),
                approximated_devices: sum.approximated,
            });
        }
        let city_sum = compute::sum(&city_tallies);
        let unassigned = compute::sum(&counts.unassigned);
        let from = today
            .checked_sub_days(chrono::Days::new(inner.cfg.projection_days as u64 - 1))
            .unwrap_or(today)
            .format("%Y-%m-%d")
            .to_string();
        let history = snapshots::load(&inner.store, city_code, &from)?;
        let slope = projection::growth_per_day(&history);
        let projections = projection::project(
            &schedule,
            city.population,
            city_sum.active,
            today,
            &history,
            slope,
        );
        metrics::histogram!("citygw_kpi_compute_seconds").record(started.elapsed().as_secs_f64());
        Ok(ConnectionKpi {
            city_code: city.code.clone(),
            city_name: city.name.clone(),
            computed_time_ms: now_ms,
            date: today.format("%Y-%m-%d").to_string(),
            target_year,
            city: Some(compute::figures(
                city_sum,
                city.population,
                city.area_km2,
                target,
            )),
            kinds: compute::kinds(&city_tallies, &inner.windows_ms),
            communes,
            unassigned: Some(KindFigures {
                kind: String::new(),
                registered: unassigned.registered,
                active: unassigned.active,
                silent: unassigned.registered - unassigned.active,
                window_secs: 0,
            }),
            outside_city,
            approximated_devices: city_sum.approximated,
            attribution: if inner.geo.has_boundaries() {
                "boundaries"
            } else {
                "centroids"
            }
            .into(),
            history,
            growth_per_day: slope,
            projections,
        })
    }

    pub async fn report_async(&self, city: String) -> Result<ConnectionKpi, KpiError> {
        let kpi = self.clone();
        tokio::task::spawn_blocking(move || kpi.report(&city, crate::pipeline::now_ms()))
            .await
            .expect("kpi task does not panic")
    }

    /// Stores snapshots (history from before citygw, or corrections); all or none.
    pub async fn put_snapshots(&self, snaps: Vec<KpiSnapshot>) -> Result<usize, KpiError> {
        for s in &snaps {
            snapshots::validate(s).map_err(KpiError::InvalidSnapshot)?;
            if self.inner.geo.city(&s.city_code).is_none() {
                return Err(KpiError::UnknownCity(s.city_code.clone()));
            }
        }
        snapshots::put(&self.inner.store, &snaps).await?;
        Ok(snaps.len())
    }

    /// Every `kpi.refresh`: the configured city's gauges and today's snapshot. Nothing runs
    /// when `kpi.enabled` is false or the refresh is "0s".
    pub async fn run(self, shutdown: CancellationToken) {
        let every = config::parse_duration(&self.inner.cfg.refresh).unwrap_or_default();
        if !self.inner.cfg.enabled || every.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_written: Option<KpiSnapshot> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let report = match self.report_async(String::new()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "kpi refresh failed");
                    continue;
                }
            };
            export_gauges(&report);
            let city = report.city.as_ref().expect("city figures");
            let snapshot = KpiSnapshot {
                city_code: report.city_code.clone(),
                date: report.date.clone(),
                active: city.active,
                registered: city.registered,
            };
            if last_written.as_ref() != Some(&snapshot) {
                match snapshots::put(&self.inner.store, std::slice::from_ref(&snapshot)).await {
                    Ok(()) => last_written = Some(snapshot),
                    Err(e) => tracing::warn!(error = %e, "kpi snapshot not saved"),
                }
            }
        }
    }
}

/// The first target year not before today's year (the deadline being worked towards); past the
/// last one, the last one.
fn target_in_force(schedule: &[(i32, f64)], today: NaiveDate) -> (i32, Option<f64>) {
    use chrono::Datelike;
    match schedule
        .iter()
        .find(|(y, _)| *y >= today.year())
        .or(schedule.last())
    {
        Some(&(year, target)) => (year, Some(target)),
        None => (0, None),
    }
}

/// City and commune gauges. Label sets are bounded: one city, the 15 kinds, and only the
/// communes of that city that have devices (at most 168, TP. Hồ Chí Minh's count).
fn export_gauges(r: &ConnectionKpi) {
    let code = r.city_code.clone();
    let city = r.city.as_ref().expect("city figures");
    for (state, n) in [
        ("active", city.active),
        ("silent", city.silent),
        ("disabled", city.disabled),
    ] {
        metrics::gauge!("citygw_kpi_city_devices", "city" => code.clone(), "state" => state)
            .set(n as f64);
    }
    let optional = [
        (
            "citygw_kpi_city_connections_per_resident",
            city.connections_per_resident,
        ),
        (
            "citygw_kpi_city_target_per_resident",
            city.target_per_resident,
        ),
        (
            "citygw_kpi_city_attainment_ratio",
            city.attainment_percent.map(|p| p / 100.0),
        ),
        (
            "citygw_kpi_city_devices_needed",
            city.devices_needed.map(|n| n as f64),
        ),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            metrics::gauge!(name, "city" => code.clone()).set(v);
        }
    }
    for k in &r.kinds {
        for (state, n) in [("active", k.active), ("silent", k.silent)] {
            metrics::gauge!("citygw_kpi_kind_devices", "city" => code.clone(), "kind" => k.kind.clone(), "state" => state)
                .set(n as f64);
        }
    }
    for c in &r.communes {
        let f = c.figures.as_ref().expect("commune figures");
        if f.registered + f.disabled == 0 {
            continue;
        }
        for (state, n) in [("active", f.active), ("silent", f.silent)] {
            metrics::gauge!("citygw_kpi_commune_devices", "commune" => c.code.clone(), "state" => state)
                .set(n as f64);
        }
        if let Some(v) = f.connections_per_resident {
            metrics::gauge!("citygw_kpi_commune_connections_per_resident", "commune" => c.code.clone())
                .set(v);
        }
    }
}

#[cfg(test)]
mod tests;
