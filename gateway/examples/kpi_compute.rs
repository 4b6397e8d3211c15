//! KPI computation benchmark: a real registry (real store, devices imported through
//! `Registry::import`, the path `citygw device import` takes) of `--devices` devices, then the
//! full KPI report timed against a bare registry scan of the same devices in the same run.
//!
//!     cargo run --release -p citygw --example kpi_compute -- --devices 1000000 --dir /var/tmp/kpi
//!
//! Device mix (deterministic): 80 % with a Hà Nội commune code, 15 % with coordinates only
//! (nearest-centroid attribution, the expensive path), 3 % in TP. Hồ Chí Minh, 2 % with neither;
//! kinds cycle through every kind; about half have a reading within their window, a quarter one
//! outside it, a quarter none. Also timed: the console overview's device pass (states by protocol
//! and kind, `api::console::count_devices`), which runs every `console.live_interval_ms` while an
//! overview page is open. Used by bench/kpi; not part of the product.

use std::time::{Duration, Instant};

use citygw::kpi::{geo::Geo, Kpi, KpiConfig};
use citygw::registry::{NewDevice, Registry, KINDS};
use citygw::store::{Store, StoreOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: i64 = 1_795_400_000_000;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = arg("--devices", "1000000").parse()?;
    let runs: usize = arg("--runs", "5").parse()?;
    let dir = std::path::PathBuf::from(arg("--dir", "/var/tmp/citygw-kpi-bench"));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(
        &dir,
        StoreOptions {
            commit_window: Duration::ZERO,
            max_batch: 8192,
            retention: Duration::from_secs(86_400),
            ..Default::default()
        },
    )?;
    let registry = Registry::load(store.clone())?;
    let geo = Geo::embedded(25.0);
    let hanoi: Vec<_> = geo
        .communes()
        .iter()
        .filter(|c| c.province == "01")
        .cloned()
        .collect();
    let hcmc: Vec<_> = geo
        .communes()
        .iter()
        .filter(|c| c.province == "79")
        .cloned()
        .collect();

    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(50_000) {
        let news = chunk
            .iter()
            .map(|&i| {
                let c = &hanoi[i % hanoi.len()];
                let (commune, lat, lon) = match i % 100 {
                    0..80 => (c.code.clone(), None, None),
                    // Within ~300 m of a centroid, on alternating sides.
                    80..95 => (
                        String::new(),
                        Some(c.lat + 0.002 * ((i % 3) as f64 - 1.0)),
                        Some(c.lon + 0.002 * ((i % 5) as f64 - 2.0) / 2.0),
                    ),
                    95..98 => (hcmc[i % hcmc.len()].code.clone(), None, None),
                    _ => (String::new(), None, None),
                };
                NewDevice {
                    id: format!("dev-{i:07}"),
                    tenant: "bench".into(),
                    kind: KINDS[i % KINDS.len()].into(),
                    commune_code: commune,
                    lat,
                    lon,
                    ..Default::default()
                }
            })
            .collect();
        for r in registry.import(news, 0).await? {
            r?;
        }
    }
    let import_secs = started.elapsed().as_secs_f64();
    let mut i = 0usize;
    registry.for_each(|d| {
        match i % 4 {
            0 | 1 => d.touch(NOW - 3_600_000),
            2 => d.touch(NOW - 72 * 3_600_000),
            _ => {}
        }
        i += 1;
    });

    // Baseline: the cheapest pass over the same registry (count enabled devices seen lately).
    let mut baseline = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut active = 0u64;
        registry.for_each(|d| {
            if d.enabled() && d.last_seen_ms() >= NOW - 86_400_000 {
                active += 1;
            }
        });
        std::hint::black_box(active);
        baseline.push(t.elapsed().as_secs_f64());
    }
    let kpi = Kpi::new(&KpiConfig::default(), registry.clone(), store.clone())?;
    let mut report_secs = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(kpi.report("01", NOW)?);
        report_secs.push(t.elapsed().as_secs_f64());
    }
    let mut overview_secs = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(citygw::api::console::count_devices(&registry, &kpi, NOW));
        overview_secs.push(t.elapsed().as_secs_f64());
    }
    let r = last.expect("at least one run");
    let city = r.city.unwrap_or_default();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (report_median, baseline_median) = (median(&mut report_secs), median(&mut baseline));
    let overview_median = median(&mut overview_secs);
    let out = serde_json::json!({
        "devices": n,
        "runs": runs,
        "import_secs": import_secs,
        "report_secs": report_secs,
        "report_median_secs": report_median,
        "baseline_scan_secs": baseline,
        "baseline_scan_median_secs": baseline_median,
        "ratio_report_to_scan": report_median / baseline_median,
        "console_overview_devices_secs": overview_secs,
        "console_overview_devices_median_secs": overview_median,
        "ratio_console_overview_to_scan": overview_median / baseline_median,
        "city_registered": city.registered,
        "city_active": city.active,
        "approximated_devices": r.approximated_devices,
        "outside_city": r.outside_city,
        "unassigned": r.unassigned.map(|u| u.registered),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
