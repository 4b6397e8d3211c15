//! `citygw kpi`: the connections-per-resident report as a table, CSV or JSON, and the backfill of
//! snapshot history from a CSV file.

use std::path::Path;

use clap::ValueEnum;

use super::output::table;
use crate::proto::{ConnectionKpi, KindFigures, KpiFigures, KpiSnapshot};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ReportFormat {
    Table,
    Csv,
    Json,
}

/// History rows shown in the table (the JSON has the whole projection window).
const TREND_ROWS: usize = 10;

pub fn print(r: &ConnectionKpi, format: ReportFormat) -> anyhow::Result<()> {
    match format {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(r)?),
        ReportFormat::Csv => csv_report(r)?,
        ReportFormat::Table => table_report(r),
    }
    Ok(())
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// Per-resident figures of a young installation are tiny: keep three significant digits.
fn ratio(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.001 {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

fn figures_row(label: [String; 2], f: &KpiFigures) -> Vec<String> {
    let [code, name] = label;
    vec![
        code,
        name,
        f.registered.to_string(),
        f.active.to_string(),
        f.silent.to_string(),
        f.disabled.to_string(),
        opt(f.population, |p| p.to_string()),
        opt(f.connections_per_resident, ratio),
        opt(f.target_per_resident, |t| format!("{t}")),
        opt(f.attainment_percent, |a| format!("{}%", ratio(a))),
        opt(f.devices_needed, |n| n.to_string()),
        format!("{:.2}", f.active_per_km2),
    ]
}

const FIGURE_HEADER: [&str; 12] = [
    "code",
    "name",
    "registered",
    "active",
    "silent",
    "disabled",
    "population",
    "per resident",
    "target",
    "attainment",
    "still needed",
    "active/km2",
];

fn kind_rows(kinds: &[KindFigures]) -> Vec<Vec<String>> {
    kinds
        .iter()
        .map(|k| {
            vec![
                k.kind.clone(),
                k.registered.to_string(),
                k.active.to_string(),
                k.silent.to_string(),
                format!("{}h", k.window_secs as f64 / 3600.0),
            ]
        })
        .collect()
}

fn table_report(r: &ConnectionKpi) {
    let city = r.city.unwrap_or_default();
    println!(
        "IoT connections per resident: {} ({}), {}",
        r.city_name, r.city_code, r.date
    );
    match city.target_per_resident {
        Some(t) => println!(
            "target in force: {t} per resident by the end of {}",
            r.target_year
        ),
        None => println!("no target configured for this city (kpi.targets)"),
    }
    println!();
    table(
        &FIGURE_HEADER,
        vec![figures_row([r.city_code.clone(), "city".into()], &city)],
    );
    println!("\nby kind");
    table(
        &["kind", "registered", "active", "silent", "window"],
        kind_rows(&r.kinds),
    );
    let with_devices: Vec<_> = r
        .communes
        .iter()
        .filter(|c| {
            c.figures
                .as_ref()
                .is_some_and(|f| f.registered + f.disabled > 0)
        })
        .collect();
    println!(
        "\ncommunes with devices ({} of {}; * = some placed by nearest centroid, an approximation)",
        with_devices.len(),
        r.communes.len()
    );
    table(
        &FIGURE_HEADER,
        with_devices
            .iter()
            .map(|c| {
                let mark = if c.approximated_devices > 0 { " *" } else { "" };
                figures_row(
                    [c.code.clone(), format!("{}{mark}", c.name)],
                    &c.figures.unwrap_or_default(),
                )
            })
            .collect(),
    );
    let unassigned = r.unassigned.clone().unwrap_or_default();
    println!(
        "\nunassigned (no known commune code, no usable coordinates): {} registered, {} active",
        unassigned.registered, unassigned.active
    );
    println!("in other provinces: {} registered", r.outside_city);
    println!(
        "placed by nearest centroid: {} (attribution: {})",
        r.approximated_devices, r.attribution
    );
    println!(
        "\ntrend: {} daily snapshots in the projection window; growth {}",
        r.history.len(),
        opt(r.growth_per_day, |g| format!(
            "{g:+.3} active devices/day (least squares)"
        ))
    );
    let skip = r.history.len().saturating_sub(TREND_ROWS);
    table(
        &["date", "active", "registered"],
        r.history[skip..]
            .iter()
            .map(|s| {
                vec![
                    s.date.clone(),
                    s.active.to_string(),
                    s.registered.to_string(),
                ]
            })
            .collect(),
    );
    println!("\nprojection (at the recent growth rate)");
    table(
        &["year", "per resident", "required", "still needed", "when"],
        r.projections
            .iter()
            .map(|p| {
                let when = match p.status.as_str() {
                    "reached" => "reached".to_string(),
                    "projected" => format!(
                        "{} ({})",
                        p.projected_date,
                        if p.on_time { "on time" } else { "late" }
                    ),
                    "not_at_current_pace" => "not at the current pace".to_string(),
                    "no_history" => "no history yet (two daily snapshots needed)".to_string(),
                    other => other.replace('_', " "),
                };
                vec![
                    p.year.to_string(),
                    format!("{}", p.per_resident),
                    p.devices_required.to_string(),
                    p.devices_still_needed.to_string(),
                    when,
                ]
            })
            .collect(),
    );
}

/// One row per area: the city, its communes, and the city by kind.
fn csv_report(r: &ConnectionKpi) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(std::io::stdout());
    w.write_record([
        "scope",
        "code",
        "name",
        "registered",
        "active",
        "silent",
        "disabled",
        "population",
        "connections_per_resident",
        "target_per_resident",
        "attainment_percent",
        "devices_needed",
        "area_km2",
        "active_per_km2",
        "approximated_devices",
    ])?;
    let row = |scope: &str, code: &str, name: &str, f: &KpiFigures, approx: u64| {
        let o = |v: Option<String>| v.unwrap_or_default();
        vec![
            scope.to_string(),
            code.to_string(),
            name.to_string(),
            f.registered.to_string(),
            f.active.to_string(),
            f.silent.to_string(),
            f.disabled.to_string(),
            o(f.population.map(|p| p.to_string())),
            o(f.connections_per_resident.map(|v| v.to_string())),
            o(f.target_per_resident.map(|v| v.to_string())),
            o(f.attainment_percent.map(|v| v.to_string())),
            o(f.devices_needed.map(|v| v.to_string())),
            f.area_km2.to_string(),
            f.active_per_km2.to_string(),
            approx.to_string(),
        ]
    };
    let city = r.city.unwrap_or_default();
    w.write_record(row(
        "city",
        &r.city_code,
        &r.city_name,
        &city,
        r.approximated_devices,
    ))?;
    for c in &r.communes {
        w.write_record(row(
            "commune",
            &c.code,
            &c.name,
            &c.figures.unwrap_or_default(),
            c.approximated_devices,
        ))?;
    }
    for k in &r.kinds {
        let f = KpiFigures {
            registered: k.registered,
            active: k.active,
            silent: k.silent,
            ..Default::default()
        };
        let mut cells = row("kind", &k.kind, &k.kind, &f, 0);
        cells[12].clear(); // area and density are not per kind
        cells[13].clear();
        w.write_record(cells)?;
    }
    w.flush()?;
    Ok(())
}

/// Reads `city_code,date,active,registered` rows.
pub fn read_snapshots(path: &Path) -> anyhow::Result<Vec<KpiSnapshot>> {
    let mut rows =
        csv::Reader::from_path(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in rows.deserialize::<KpiSnapshot>().enumerate() {
        out.push(row.map_err(|e| anyhow::anyhow!("{} row {}: {e}", path.display(), i + 2))?);
    }
    Ok(out)
}
