//! The durable side of the rules: alerts and what the evaluator must remember across a restart,
//! in the store's `alerts` table, written through the group commit.
//!
//! Keys:
//! - `a/{id}`: the alert (protobuf `Alert`, history included). Ids are UUIDv7: key order is raise
//!   order, and listing newest first is a reverse range scan.
//! - `o/{id}`: marks an alert still active; the gateway reloads only these at start.
//! - `t/{rule}/{device}`: a threshold that began to hold (since when, the value), so a `for`
//!   duration resumes after a restart.
//! - `c/{rule}/{target}`: when the rule's action last sent a command to that target (cool-down).
//! - `p`: the id of the last reading evaluated; the evaluator resumes after it.
//! - `r/{name}`: a rule added at run time ([`StoredRule`], JSON): its definition as written,
//!   who added it and when. Config rules are never stored: the file is their record.
//!
//! Retention ([`AlertLog::expire`]) deletes alerts cleared before the cutoff; active ones stay
//! whatever their age.
//!
//! In cluster mode this is this node's own table (`put_local_records`), like the command log.

use prost::Message as _;
use serde::{Deserialize, Serialize};

use super::config::RuleConfig;
use crate::control::Aged;
use crate::proto::Alert;
use crate::store::{Store, StoreError, Table};

const ALERT: &str = "a/";
const OPEN: &str = "o/";
pub const PENDING: &str = "t/";
pub const COOLDOWN: &str = "c/";
const POSITION: &str = "p";
const RULE: &str = "r/";

/// A rule added at run time, as kept in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRule {
    pub definition: RuleConfig,
    pub by: String,
    pub time_ms: i64,
}

/// One durable commit's worth of changes.
#[derive(Default, Clone)]
pub struct Batch {
    records: Vec<(String, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The alert as it now is; `active` keeps (or drops) its reload marker.
    pub fn alert(&mut self, alert: &Alert, active: bool) {
        self.records
            .push((format!("{ALERT}{}", alert.id), Some(alert.encode_to_vec())));
        self.records
            .push((format!("{OPEN}{}", alert.id), active.then(Vec::new)));
    }

    /// A pending threshold (`None`: no longer pending).
    pub fn pending(&mut self, rule: &str, device: &str, pending: Option<(i64, f64)>) {
        let value = pending.map(|(since, v)| {
            let mut b = since.to_be_bytes().to_vec();
            b.extend_from_slice(&v.to_be_bytes());
            b
        });
        self.records
            .push((format!("{PENDING}{rule}/{device}"), value));
    }

    pub fn cooldown(&mut self, key: &str, at_ms: i64) {
        self.records.push((
            format!("{COOLDOWN}{key}"),
            Some(at_ms.to_be_bytes().to_vec()),
        ));
    }

    /// A rule added at run time (`None`: removed).
    pub fn rule(&mut self, name: &str, stored: Option<&StoredRule>) {
        let value = stored.map(|s| serde_json::to_vec(s).expect("a rule serialises"));
        self.records.push((format!("{RULE}{name}"), value));
    }

    /// Deletes a record (a removed rule's pending thresholds and cool-downs).
    pub fn forget(&mut self, key: String) {
        self.records.push((key, None));
    }

    pub fn position(&mut self, id: u64) {
        self.records
            .push((POSITION.to_string(), Some(id.to_be_bytes().to_vec())));
    }
}

#[derive(Clone)]
pub struct AlertLog {
    store: Store,
}

impl AlertLog {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// One durable commit of this node's store.
    pub async fn save(&self, batch: Batch) -> Result<(), StoreError> {
        self.store
            .put_local_records(Table::Alerts, batch.records, None)
            .await
    }

    pub fn get(&self, id: &str) -> Result<Option<Alert>, StoreError> {
        self.store
            .get_record(Table::Alerts, &format!("{ALERT}{id}"))?
            .map(|bytes| decode(id, &bytes))
            .transpose()
    }

    /// Every active alert, oldest first.
    pub fn load_active(&self) -> Result<Vec<Alert>, StoreError> {
        let mut out = Vec::new();
        self.scan(OPEN, |key, _| {
            let id = &key[OPEN.len()..];
            match self.get(id)? {
                Some(a) => out.push(a),
                None => tracing::warn!(alert = id, "active marker without its alert"),
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Pending thresholds: (rule, device, since, value).
    pub fn load_pending(&self) -> Result<Vec<(String, String, i64, f64)>, StoreError> {
        let mut out = Vec::new();
        self.scan(PENDING, |key, v| {
            let rest = &key[PENDING.len()..];
            if let (Some((rule, device)), Ok(b)) = (rest.split_once('/'), <[u8; 16]>::try_from(v)) {
                let since = i64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                let value = f64::from_be_bytes(b[8..].try_into().expect("8 bytes"));
                out.push((rule.to_string(), device.to_string(), since, value));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Cool-downs: (key `{rule}/{target}`, last action time).
    pub fn load_cooldowns(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let mut out = Vec::new();
        self.scan(COOLDOWN, |key, v| {
            if let Ok(b) = <[u8; 8]>::try_from(v) {
                out.push((key[COOLDOWN.len()..].to_string(), i64::from_be_bytes(b)));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The rules added at run time, by name. One that cannot be read is skipped (and logged).
    pub fn load_rules(&self) -> Result<Vec<StoredRule>, StoreError> {
        let mut out = Vec::new();
        self.scan(RULE, |key, v| {
            match serde_json::from_slice::<StoredRule>(&v) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(rule = &key[RULE.len()..], error = %e,
                    "a rule added at run time cannot be read; not evaluated"),
            }
            Ok(())
        })?;
        Ok(out)
    }

    pub fn has_rule(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .store
            .get_record(Table::Alerts, &format!("{RULE}{name}"))?
            .is_some())
    }

    /// The keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        self.scan(prefix, |key, _| {
            out.push(key.to_string());
            Ok(())
        })?;
        Ok(out)
    }

    pub fn position(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .store
            .get_record(Table::Alerts, POSITION)?
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(u64::from_be_bytes))
    }

    fn scan(
        &self,
        prefix: &str,
        f: impl FnMut(&str, Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.store.for_each_record(Table::Alerts, prefix, f)
    }

    /// Alerts newest first, older than `before_id` (empty: from the newest), that `keep`
    /// accepts; at most `limit`, scanning at most `max_scan` records.
    pub fn list(
        &self,
        before_id: &str,
        limit: usize,
        max_scan: usize,
        mut keep: impl FnMut(&Alert) -> bool,
    ) -> Result<Vec<Alert>, StoreError> {
        let before = if before_id.is_empty() {
            String::new()
        } else {
            format!("{ALERT}{before_id}")
        };
        self.store.newest_records(
            Table::Alerts,
            ALERT,
            &before,
            limit,
            max_scan,
            |key, bytes| {
                let a = decode(&key[ALERT.len()..], bytes)?;
                Ok(keep(&a).then_some(a))
            },
        )
    }

    /// Deletes alerts cleared before `cutoff_ms` (retention), a page at a time; returns how
    /// many went. Active alerts stay whatever their age. Key order is raise order and an alert
    /// clears after it was raised, so the scan stops at the first alert raised after the cutoff.
    pub async fn expire(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        crate::control::expire_records(&self.store, Table::Alerts, ALERT, |id, bytes| {
            let a = decode(id, bytes)?;
            Ok(if a.raised_time_ms >= cutoff_ms {
                Aged::Stop
            } else if !super::is_active(&a) && a.cleared_time_ms < cutoff_ms {
                Aged::Delete
            } else {
                Aged::Keep
            })
        })
        .await
    }
}

fn decode(id: &str, bytes: &[u8]) -> Result<Alert, StoreError> {
    Alert::decode(bytes).map_err(|e| StoreError::Corrupt(format!("alert {id}: {e}")))
}
