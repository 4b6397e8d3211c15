//! The `[kpi]` configuration section.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct KpiConfig {
    /// Periodic work: Prometheus gauges and today's snapshot. Queries (gRPC, HTTP, CLI) are
    /// answered either way; they compute on demand.
    pub enabled: bool,
    /// Province-level code of the city reported by default, gauged and snapshotted ("01": Hà Nội).
    pub city: String,
    /// A device counts as active when its last accepted reading is younger than this.
    pub activity_window: String,
    /// Per device kind, overriding `activity_window` (e.g. meters that report once a day).
    pub kind_windows: BTreeMap<String, String>,
    /// Per city code: year → IoT connections per resident to reach by the end of that year.
    pub targets: BTreeMap<String, BTreeMap<String, f64>>,
    /// How often gauges and today's snapshot are refreshed ("0s": no automatic snapshots).
    pub refresh: String,
    /// Offset of the city's local time from UTC, in hours: it decides which day a snapshot
    /// belongs to (Vietnam: +7).
    pub utc_offset_hours: i32,
    /// Snapshots of the last this many days give the growth rate of the projection.
    pub projection_days: u32,
    /// CSV with header `commune_code,population` (other columns ignored).
    pub commune_population_file: Option<PathBuf>,
    /// GeoJSON FeatureCollection of commune boundaries (Polygon/MultiPolygon, code in
    /// properties `commune_code`, `code` or `ma_xa`): point-in-polygon replaces the
    /// nearest-centroid approximation for devices that have coordinates only.
    pub boundaries_file: Option<PathBuf>,
    /// A coordinates-only device farther than this from every commune centroid is unassigned.
    pub max_centroid_km: f64,
}

impl Default for KpiConfig {
    fn default() -> Self {
        let hanoi = BTreeMap::from([("2026".to_string(), 1.0), ("2030".to_string(), 4.0)]);
        Self {
            enabled: true,
            city: "01".into(),
            activity_window: "24h".into(),
            kind_windows: BTreeMap::from([
                ("energy_meter".to_string(), "48h".to_string()),
                ("water_meter".to_string(), "48h".to_string()),
            ]),
            targets: BTreeMap::from([("01".to_string(), hanoi)]),
            refresh: "1m".into(),
            utc_offset_hours: 7,
            projection_days: 90,
            commune_population_file: None,
            boundaries_file: None,
            max_centroid_km: 25.0,
        }
    }
}

impl KpiConfig {
    /// Checks every value once at start, so a typo fails the start rather than a query.
    pub fn validate(&self) -> anyhow::Result<()> {
        parse_duration(&self.activity_window)
            .map_err(|e| anyhow::anyhow!("kpi.activity_window: {e}"))?;
        parse_duration(&self.refresh).map_err(|e| anyhow::anyhow!("kpi.refresh: {e}"))?;
        for (kind, window) in &self.kind_windows {
            anyhow::ensure!(
                crate::registry::KINDS.contains(&kind.as_str()),
                "kpi.kind_windows: unknown device kind {kind:?}"
            );
            parse_duration(window).map_err(|e| anyhow::anyhow!("kpi.kind_windows.{kind}: {e}"))?;
        }
        for (city, schedule) in &self.targets {
            for (year, target) in schedule {
                anyhow::ensure!(
                    year.parse::<i32>()
                        .is_ok_and(|y| (2000..=2100).contains(&y)),
                    "kpi.targets.{city}: {year:?} is not a year"
                );
                anyhow::ensure!(
                    target.is_finite() && *target > 0.0,
                    "kpi.targets.{city}.{year}: connections per resident must be positive"
                );
            }
        }
        anyhow::ensure!(
            (-12..=14).contains(&self.utc_offset_hours),
            "kpi.utc_offset_hours must be within -12..14"
        );
        anyhow::ensure!(
            self.projection_days >= 2,
            "kpi.projection_days must be at least 2"
        );
        anyhow::ensure!(
            self.max_centroid_km > 0.0,
            "kpi.max_centroid_km must be positive"
        );
        Ok(())
    }

    /// The target schedule of a city, sorted by year.
    pub fn schedule(&self, city: &str) -> Vec<(i32, f64)> {
        self.targets
            .get(city)
            .map(|s| {
                let mut v: Vec<_> = s
                    .iter()
                    .filter_map(|(y, t)| Some((y.parse().ok()?, *t)))
                    .collect();
                v.sort_by_key(|(y, _)| *y);
                v
            })
            .unwrap_or_default()
    }
}

/// "90s", "15m", "24h", "2d" (one number, one unit).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| anyhow::anyhow!("{s:?}: a number and a unit (s, m, h, d), e.g. \"24h\""))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?}: a number and a unit (s, m, h, d)"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("{s:?}: unit must be s, m, h or d"),
    };
    Ok(Duration::from_secs(n * secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["", "h", "24", "1.5h", "3w", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_are_valid_and_hanoi_targets_are_the_plan() {
        let cfg = KpiConfig::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.schedule("01"), vec![(2026, 1.0), (2030, 4.0)]);
        assert!(cfg.schedule("79").is_empty());
    }
}
