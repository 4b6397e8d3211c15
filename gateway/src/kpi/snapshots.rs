//! Daily KPI snapshots in the store: one row per city and local day, `{city}/{YYYY-MM-DD}` →
//! the snapshot as JSON. The refresh rewrites today's row, so a day keeps its last figures.

use crate::proto::KpiSnapshot;
use crate::store::{Store, StoreError, Table};

use super::projection::parse_date;

fn key(s: &KpiSnapshot) -> String {
    format!("{}/{}", s.city_code, s.date)
}

/// Why a snapshot was refused.
pub fn validate(s: &KpiSnapshot) -> Result<(), String> {
    if s.city_code.len() != 2 || !s.city_code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("city_code {:?}: two digits", s.city_code));
    }
    if parse_date(&s.date).is_none() {
        return Err(format!("date {:?}: YYYY-MM-DD", s.date));
    }
    if s.active > s.registered {
        return Err(format!(
            "{}: active ({}) above registered ({})",
            s.date, s.active, s.registered
        ));
    }
    Ok(())
}

/// Stores (or replaces) snapshots in one durable commit.
pub async fn put(store: &Store, snapshots: &[KpiSnapshot]) -> Result<(), StoreError> {
    let rows = snapshots
        .iter()
        .map(|s| {
            (
                key(s),
                Some(serde_json::to_vec(s).expect("snapshot serialises")),
            )
        })
        .collect();
    store.put_records(Table::KpiSnapshots, rows).await
}

/// A city's snapshots dated `from` or later, oldest first.
pub fn load(store: &Store, city: &str, from: &str) -> Result<Vec<KpiSnapshot>, StoreError> {
    let prefix = format!("{city}/");
    let mut out = Vec::new();
    for (k, bytes) in store.load_records(Table::KpiSnapshots)? {
        if k.strip_prefix(&prefix).is_some_and(|date| date >= from) {
            out.push(
                serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("kpi snapshot {k}: {e}")))?,
            );
        }
    }
    Ok(out)
}
