use super::*;
use crate::registry::NewDevice;

const NOW: i64 = 1_795_400_000_000; // 2026-11-23
const HOUR: i64 = 3_600_000;

async fn registry(dir: &std::path::Path) -> (Registry, Store) {
    let opts = crate::store::StoreOptions {
        commit_window: Duration::ZERO,
        max_batch: 1024,
        retention: Duration::from_secs(86_400),
        ..Default::default()
    };
    let store = Store::open(dir, opts).unwrap();
    (Registry::load(store.clone()).unwrap(), store)
}

fn device(id: &str, kind: &str, commune: &str, at: Option<(f64, f64)>) -> NewDevice {
    NewDevice {
        id: id.into(),
        tenant: "hanoi".into(),
        kind: kind.into(),
        commune_code: commune.into(),
        lat: at.map(|p| p.0),
        lon: at.map(|p| p.1),
        ..Default::default()
    }
}

#[tokio::test]
async fn counts_by_commune_kind_and_window() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, store) = registry(dir.path()).await;
    let news = vec![
        device("aq-active", "air_quality", "00004", None),
        device("aq-old", "air_quality", "00004", None), // seen 25 h ago: outside 24 h
        device("wm-daily", "water_meter", "00004", None), // seen 30 h ago: inside 48 h
        device("aq-silent", "air_quality", "00070", None),
        device("bin-near", "waste_bin", "", Some((21.0322, 105.8503))), // Hoàn Kiếm
        device("gen-none", "generic", "", None),
        device("hcmc", "air_quality", "25747", None),
        device("off", "fire_alarm", "00004", None),
    ];
    for r in reg.import(news, 0).await.unwrap() {
        r.unwrap();
    }
    let touch = |id: &str, ago: i64| reg.get(id).unwrap().touch(NOW - ago);
    touch("aq-active", HOUR);
    touch("aq-old", 25 * HOUR);
    touch("wm-daily", 30 * HOUR);
    touch("bin-near", 1000);
    touch("gen-none", 1000);
    touch("hcmc", 1000);
    touch("off", 1000);
    reg.set_enabled("off", false).await.unwrap();

    let mut cfg = KpiConfig::default();
    let pop = dir.path().join("pop.csv");
    std::fs::write(&pop, "commune_code,population\n00004,40000\n").unwrap();
    cfg.commune_population_file = Some(pop);
    let kpi = Kpi::new(&cfg, reg, store).unwrap();
    let r = kpi.report("", NOW).unwrap();

    assert_eq!((r.city_code.as_str(), r.target_year), ("01", 2026));
    let city = r.city.unwrap();
    // 00004: aq-active, aq-old, wm-daily (+ off, disabled); 00070: aq-silent, bin-near.
    assert_eq!(
        (city.registered, city.active, city.silent, city.disabled),
        (5, 3, 2, 1)
    );
    assert_eq!(city.population, Some(8_807_523));
    assert_eq!(city.devices_needed, Some(8_807_523 - 3));
    assert_eq!((r.outside_city, r.approximated_devices), (1, 1));
    let u = r.unassigned.unwrap();
    assert_eq!((u.registered, u.active), (1, 1));

    let commune = |code: &str| r.communes.iter().find(|c| c.code == code).unwrap();
    let ba_dinh = commune("00004").figures.unwrap();
    assert_eq!(
        (ba_dinh.registered, ba_dinh.active, ba_dinh.disabled),
        (3, 2, 1)
    );
    assert_eq!(ba_dinh.population, Some(40_000));
    assert_eq!(ba_dinh.connections_per_resident, Some(2.0 / 40_000.0));
    assert_eq!(ba_dinh.devices_needed, Some(40_000 - 2));
    assert!((ba_dinh.active_per_km2 - 2.0 / 2.97).abs() < 1e-12);
    let hoan_kiem = commune("00070");
    assert_eq!(hoan_kiem.approximated_devices, 1);
    assert_eq!(hoan_kiem.figures.as_ref().unwrap().population, None);
    assert_eq!(hoan_kiem.figures.as_ref().unwrap().devices_needed, None);
    let kinds: Vec<_> = r
        .kinds
        .iter()
        .map(|k| (k.kind.as_str(), k.registered, k.active, k.window_secs))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("air_quality", 3, 1, 86_400),
            ("water_meter", 1, 1, 172_800),
            ("fire_alarm", 0, 0, 86_400),
            ("waste_bin", 1, 1, 86_400),
        ]
    );
    assert!(matches!(
        kpi.report("zz", NOW),
        Err(KpiError::UnknownCity(_))
    ));
}

#[tokio::test]
async fn snapshots_feed_the_trend_and_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, store) = registry(dir.path()).await;
    let kpi = Kpi::new(&KpiConfig::default(), reg, store).unwrap();
    let snap = |date: &str, active| KpiSnapshot {
        city_code: "01".into(),
        date: date.into(),
        active,
        registered: active,
    };
    kpi.put_snapshots(vec![
        snap("2026-11-01", 1_000_000),
        snap("2026-11-11", 3_000_000),
        snap("2026-01-01", 1), // outside the 90-day window
    ])
    .await
    .unwrap();
    let r = kpi.report("01", NOW).unwrap();
    assert_eq!(r.history.len(), 2);
    assert_eq!(r.growth_per_day, Some(200_000.0));
    assert_eq!(r.projections[0].status, "projected");
    // Replaced, not duplicated.
    kpi.put_snapshots(vec![snap("2026-11-11", 1_000_000)])
        .await
        .unwrap();
    let r = kpi.report("01", NOW).unwrap();
    assert_eq!(r.growth_per_day, Some(0.0));
    assert_eq!(r.projections[0].status, "not_at_current_pace");

    let mut bad = snap("2026-11-12", 5);
    bad.registered = 4;
    assert!(matches!(
        kpi.put_snapshots(vec![snap("2026-11-12", 5), bad]).await,
        Err(KpiError::InvalidSnapshot(_))
    ));
    let mut other = snap("2026-11-12", 5);
    other.city_code = "00".into();
    assert!(matches!(
        kpi.put_snapshots(vec![other]).await,
        Err(KpiError::UnknownCity(_))
    ));
    // Nothing of a refused batch was stored.
    assert_eq!(kpi.report("01", NOW).unwrap().history.len(), 2);
}

#[test]
fn target_in_force_is_the_next_deadline() {
    let d = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).unwrap();
    let s = [(2026, 1.0), (2030, 4.0)];
    assert_eq!(target_in_force(&s, d(2025, 6, 1)), (2026, Some(1.0)));
    assert_eq!(target_in_force(&s, d(2026, 12, 31)), (2026, Some(1.0)));
    assert_eq!(target_in_force(&s, d(2027, 1, 1)), (2030, Some(4.0)));
    assert_eq!(target_in_force(&s, d(2031, 1, 1)), (2030, Some(4.0)));
    assert_eq!(target_in_force(&[], d(2026, 1, 1)), (0, None));
}
