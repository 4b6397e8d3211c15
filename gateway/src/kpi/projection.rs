//! When each target is reached at the recent pace.
//!
//! Method (also in docs/src/kpi.md): the growth rate is the least-squares slope of active devices per
//! day over the daily snapshots of the last `kpi.projection_days` days (at least two snapshots on
//! different days). From the latest snapshot, a target needing `R` active devices is reached
//! `ceil((R - active) / slope)` days later. A slope of zero or less, or a date more than a
//! century away, gives "not at the current pace". The population is taken as constant.

use chrono::NaiveDate;

use crate::proto::{KpiSnapshot, TargetProjection};

/// Beyond this many days a projected date says nothing useful.
const HORIZON_DAYS: f64 = 36_525.0;

pub fn parse_date(s: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

/// Least-squares slope of active devices per day; None below two distinct days.
pub fn growth_per_day(history: &[KpiSnapshot]) -> Option<f64> {
    let points: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|s| {
            let day = parse_date(&s.date)?.signed_duration_since(NaiveDate::default());
            Some((day.num_days() as f64, s.active as f64))
        })
        .collect();
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// One projection per target of the schedule.
pub fn project(
    schedule: &[(i32, f64)],
    population: Option<u64>,
    active_now: u64,
    today: NaiveDate,
    history: &[KpiSnapshot],
    slope: Option<f64>,
) -> Vec<TargetProjection> {
    let latest = history
        .iter()
        .filter_map(|s| Some((parse_date(&s.date)?, s.active)))
        .max_by_key(|(d, _)| *d);
    schedule
        .iter()
        .map(|&(year, per_resident)| {
            let mut p = TargetProjection {
                year,
                per_resident,
                ..Default::default()
            };
            let Some(population) = population else {
                p.status = "no_population".into();
                return p;
            };
            let required = (per_resident * population as f64).ceil() as u64;
            p.devices_required = required;
            p.devices_still_needed = required.saturating_sub(active_now);
            let deadline = NaiveDate::from_ymd_opt(year, 12, 31).expect("valid year");
            if active_now >= required {
                p.status = "reached".into();
                p.on_time = today <= deadline;
                return p;
            }
            match (slope, latest) {
                (Some(slope), Some((base_date, base_active)))
                    if slope > 0.0
                        && (required as f64 - base_active as f64) / slope <= HORIZON_DAYS =>
                {
                    let days = ((required as f64 - base_active as f64) / slope)
                        .ceil()
                        .max(0.0);
                    let date = base_date
                        .checked_add_days(chrono::Days::new(days as u64))
                        .expect("within the horizon")
                        .max(today);
                    p.status = "projected".into();
                    p.projected_date = date.format("%Y-%m-%d").to_string();
                    p.on_time = date <= deadline;
                }
                (Some(_), Some(_)) => p.status = "not_at_current_pace".into(),
                _ => p.status = "no_history".into(),
            }
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(date: &str, active: u64) -> KpiSnapshot {
        KpiSnapshot {
            city_code: "01".into(),
            date: date.into(),
            active,
            registered: active,
        }
    }

    fn d(s: &str) -> NaiveDate {
        parse_date(s).unwrap()
    }

    #[test]
    fn least_squares_slope() {
        assert_eq!(growth_per_day(&[]), None);
        assert_eq!(growth_per_day(&[snap("2026-01-01", 5)]), None);
        // Same day twice: no time elapsed, no rate.
        assert_eq!(
            growth_per_day(&[snap("2026-01-01", 5), snap("2026-01-01", 9)]),
            None
        );
        let h = [
            snap("2026-01-01", 100),
            snap("2026-01-11", 200),
            snap("2026-01-21", 300),
        ];
        assert!((growth_per_day(&h).unwrap() - 10.0).abs() < 1e-9);
        // Noise around 2/day: the fit, not the end points.
        let h = [
            snap("2026-03-01", 10),
            snap("2026-03-02", 14),
            snap("2026-03-03", 13),
            snap("2026-03-04", 17),
        ];
        // x = 0..3, y = 10,14,13,17: slope = sum((x-1.5)(y-13.5)) / sum((x-1.5)^2) = 10 / 5.
        assert!((growth_per_day(&h).unwrap() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn dates_from_the_latest_snapshot() {
        let schedule = [(2026, 1.0), (2030, 4.0)];
        let history = [snap("2026-01-01", 1000), snap("2026-01-11", 1100)];
        let slope = growth_per_day(&history);
        assert_eq!(slope, Some(10.0));
        // Population 1500: 2026 needs 1500 (400 more from 1100 at 10/day = 40 days after
        // 2026-01-11), 2030 needs 6000 (490 days).
        let p = project(
            &schedule,
            Some(1500),
            1100,
            d("2026-01-11"),
            &history,
            slope,
        );
        assert_eq!(p[0].status, "projected");
        assert_eq!(p[0].projected_date, "2026-02-20");
        assert!(p[0].on_time);
        assert_eq!(p[0].devices_required, 1500);
        assert_eq!(p[0].devices_still_needed, 400);
        assert_eq!(p[1].projected_date, "2027-05-16");
        assert!(p[1].on_time);
        // Slow growth: too late for the deadline.
        let history = [snap("2026-01-01", 1000), snap("2026-12-01", 1100)];
        let p = project(
            &schedule,
            Some(1500),
            1100,
            d("2026-12-01"),
            &history,
            growth_per_day(&history),
        );
        assert_eq!(p[0].status, "projected");
        assert!(!p[0].on_time);
    }

    #[test]
    fn reached_flat_falling_and_unknown() {
        let schedule = [(2026, 1.0)];
        let flat = [snap("2026-01-01", 10), snap("2026-01-05", 10)];
        let falling = [snap("2026-01-01", 10), snap("2026-01-05", 8)];
        let today = d("2026-01-05");
        let p = project(&schedule, Some(10), 10, today, &flat, growth_per_day(&flat));
        assert_eq!(
            (p[0].status.as_str(), p[0].devices_still_needed),
            ("reached", 0)
        );
        // A device a year or so: more than a century away.
        let crawling = [
            snap("2026-01-01", 10),
            snap("2026-01-05", 10),
            snap("2026-01-09", 10),
            snap("2026-01-13", 10),
            snap("2029-01-01", 11),
        ];
        for h in [&flat[..], &falling[..], &crawling[..]] {
            let p = project(&schedule, Some(100), 10, today, h, growth_per_day(h));
            assert_eq!(p[0].status, "not_at_current_pace");
            assert_eq!(p[0].projected_date, "");
        }
        let p = project(&schedule, Some(100), 10, today, &flat[..1], None);
        assert_eq!(p[0].status, "no_history");
        let p = project(&schedule, None, 10, today, &flat, growth_per_day(&flat));
        assert_eq!(p[0].status, "no_population");
    }
}
