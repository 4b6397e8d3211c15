//! Vietnam's 2025 commune-level units (the gateway's gateway/data/geo/vn-communes-2025.csv, one
//! copy embedded in both binaries): where a scenario's devices are placed.

use anyhow::Context;
use serde::Deserialize;

const CSV: &str = citygw::kpi::geo::COMMUNES_CSV;

#[derive(Debug, Clone, Deserialize)]
pub struct Commune {
    pub province_code: String,
    pub province_name: String,
    pub commune_code: String,
    pub commune_name: String,
    pub centroid_lat: f64,
    pub centroid_lon: f64,
    /// Missing for a few units in the source data.
    pub area_km2: Option<f64>,
}

/// The communes of one province, in file order; an error names the known province codes when
/// none match.
pub fn of_province(code: &str) -> anyhow::Result<Vec<Commune>> {
    let mut all = Vec::new();
    for (i, row) in csv::Reader::from_reader(CSV.as_bytes())
        .deserialize::<Commune>()
        .enumerate()
    {
        all.push(row.with_context(|| format!("embedded commune data, row {}", i + 2))?);
    }
    let found: Vec<Commune> = all
        .iter()
        .filter(|c| c.province_code == code)
        .cloned()
        .collect();
    if found.is_empty() {
        let mut codes: Vec<&str> = all.iter().map(|c| c.province_code.as_str()).collect();
        codes.dedup();
        anyhow::bail!(
            "province {code:?} is not in the 2025 commune data (codes: {})",
            codes.join(", ")
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hanoi_and_hcmc_have_their_2025_units() {
        let hanoi = of_province("01").unwrap();
        assert_eq!(hanoi.len(), 126);
        assert!(hanoi.iter().any(|c| c.commune_code == "00004"));
        assert_eq!(of_province("79").unwrap().len(), 168);
    }

    #[test]
    fn unknown_province_lists_codes() {
        let e = of_province("99").unwrap_err().to_string();
        assert!(e.contains("\"99\"") && e.contains("01"), "{e}");
    }
}
