//! The `log` record format: one record per *run* of readings that share their identity.
//!
//! A device message usually carries several readings (temperature, humidity, pm2_5 ...) with the
//! same device, tenant, kind, commune, protocol and receive time. Storing each as its own record
//! repeated all of that and cost one log and one index insert per reading, which made the single
//! writer thread the ingest bottleneck (measured: memtable inserts and allocation were a third of
//! the gateway's CPU). A run is stored once under the id of its first reading; reading `k` of the
//! run has id `first + k`. Each value is a `Reading` with the shared fields left empty, so prost
//! writes only what differs, and the index gets one entry per distinct device time in the run.

use prost::Message;

use super::StoreError;
use crate::proto::{Location, Reading};

/// A run as stored: shared identity once, then the values.
#[derive(Clone, PartialEq, Message)]
pub(super) struct StoredRun {
    #[prost(string, tag = "1")]
    device_id: String,
    #[prost(string, tag = "2")]
    tenant: String,
    #[prost(string, tag = "3")]
    kind: String,
    #[prost(string, tag = "4")]
    commune_code: String,
    #[prost(int32, tag = "5")]
    protocol: i32,
    #[prost(int64, tag = "6")]
    received_time_ms: i64,
    /// The position every value of the run shares, if they do (usually the device's own).
    #[prost(message, optional, tag = "7")]
    location: Option<Location>,
    /// Values with the shared fields (and a shared location) cleared.
    #[prost(message, repeated, tag = "8")]
    values: Vec<Reading>,
}

/// A run encoded on the caller's task, waiting for the writer to give it ids.
pub(super) struct EncodedRun {
    pub(super) value: fjall::Slice,
    /// `by_device` keys without the trailing run id, one per distinct device time.
    pub(super) index_prefixes: Vec<Vec<u8>>,
    /// The readings themselves, for the live feed once committed (moved, never copied).
    pub(super) readings: Vec<Reading>,
}

fn same_identity(a: &Reading, b: &Reading) -> bool {
    a.device_id == b.device_id
        && a.tenant == b.tenant
        && a.kind == b.kind
        && a.commune_code == b.commune_code
        && a.protocol == b.protocol
        && a.received_time_ms == b.received_time_ms
}

/// Splits readings into runs of shared identity (in order) and encodes each.
pub(super) fn encode(readings: Vec<Reading>) -> Vec<EncodedRun> {
    let mut runs: Vec<Vec<Reading>> = Vec::new();
    for r in readings {
        match runs.last_mut() {
            Some(run) if same_identity(&run[0], &r) => run.push(r),
            _ => runs.push(vec![r]),
        }
    }
    runs.into_iter().map(encode_run).collect()
}

/// Encodes a run in the [`StoredRun`] layout without copying the readings: each one is encoded
/// with its shared fields briefly taken out (a `mem::take` of a `String` does not allocate).
fn encode_run(mut readings: Vec<Reading>) -> EncodedRun {
    use prost::encoding::{int32, int64, message, string};
    let first = &readings[0];
    let shared_location = first
        .location
        .filter(|l| readings.iter().all(|r| r.location.as_ref() == Some(l)));
    let mut times: Vec<i64> = readings.iter().map(|r| r.device_time_ms).collect();
    times.sort_unstable();
    times.dedup();
    let index_prefixes = times
        .iter()
        .map(|&t| super::keys::index_prefix(&first.device_id, t))
        .collect();

    let mut buf = Vec::with_capacity(64 + readings.iter().map(|r| r.encoded_len()).sum::<usize>());
    string::encode(1, &first.device_id, &mut buf);
    string::encode(2, &first.tenant, &mut buf);
    string::encode(3, &first.kind, &mut buf);
    string::encode(4, &first.commune_code, &mut buf);
    int32::encode(5, &first.protocol, &mut buf);
    int64::encode(6, &first.received_time_ms, &mut buf);
    if let Some(l) = &shared_location {
        message::encode(7, l, &mut buf);
    }
    for r in &mut readings {
        let identity = (
            std::mem::take(&mut r.device_id),
            std::mem::take(&mut r.tenant),
            std::mem::take(&mut r.kind),
            std::mem::take(&mut r.commune_code),
            std::mem::take(&mut r.protocol),
            std::mem::take(&mut r.received_time_ms),
            std::mem::take(&mut r.id),
        );
        let location = if shared_location.is_some() {
            r.location.take()
        } else {
            None
        };
        message::encode(8, r, &mut buf);
        (
            r.device_id,
            r.tenant,
            r.kind,
            r.commune_code,
            r.protocol,
            r.received_time_ms,
            r.id,
        ) = identity;
        if location.is_some() {
            r.location = location;
        }
    }
    EncodedRun {
        value: fjall::Slice::from(buf),
        index_prefixes,
        readings,
    }
}

impl EncodedRun {
    /// A run as another node encoded it (a message of the cluster's stream), given its first
    /// id: decoded once for the index entries and the live feed, stored as it came.
    pub(super) fn replicated(first_id: u64, value: &[u8]) -> Result<EncodedRun, StoreError> {
        let run = Run::decode(&super::keys::id_key(first_id), value)?;
        let index_prefixes = run
            .device_times()
            .into_iter()
            .map(|t| super::keys::index_prefix(run.device_id(), t))
            .collect();
        Ok(EncodedRun {
            value: fjall::Slice::from(value),
            index_prefixes,
            readings: run.readings().collect(),
        })
    }
}

/// A decoded run: its first id and shared fields, expanded on demand.
pub(super) struct Run {
    pub(super) first_id: u64,
    stored: StoredRun,
}

impl Run {
    pub(super) fn decode(key: &[u8], value: &[u8]) -> Result<Run, StoreError> {
        let first_id =
            super::keys::parse_id(key).ok_or_else(|| StoreError::Corrupt("log key".into()))?;
        let stored = StoredRun::decode(value)
            .map_err(|e| StoreError::Corrupt(format!("run {first_id}: {e}")))?;
        Ok(Run { first_id, stored })
    }

    pub(super) fn len(&self) -> u64 {
        self.stored.values.len() as u64
    }

    /// Id of the last reading in the run.
    pub(super) fn last_id(&self) -> u64 {
        self.first_id + self.len().saturating_sub(1)
    }

    pub(super) fn received_time_ms(&self) -> i64 {
        self.stored.received_time_ms
    }

    pub(super) fn device_id(&self) -> &str {
        &self.stored.device_id
    }

    /// Distinct device times, for the index entries of the run.
    pub(super) fn device_times(&self) -> Vec<i64> {
        let mut times: Vec<i64> = self
            .stored
            .values
            .iter()
            .map(|v| v.device_time_ms)
            .collect();
        times.sort_unstable();
        times.dedup();
        times
    }

    /// The run's readings with their ids, in id order.
    pub(super) fn readings(self) -> impl Iterator<Item = Reading> {
        let StoredRun {
            device_id,
            tenant,
            kind,
            commune_code,
            protocol,
            received_time_ms,
            location,
            values,
        } = self.stored;
        (self.first_id..).zip(values).map(move |(id, v)| Reading {
            id,
            device_id: device_id.clone(),
            tenant: tenant.clone(),
            kind: kind.clone(),
            commune_code: commune_code.clone(),
            protocol,
            received_time_ms,
            location: v.location.or(location),
            ..v
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reading::Value;

    fn reading(device: &str, quantity: &str, t: i64, received: i64) -> Reading {
        Reading {
            device_id: device.into(),
            tenant: "hanoi".into(),
            kind: "air_quality".into(),
            commune_code: "00004".into(),
            protocol: 1,
            received_time_ms: received,
            quantity: quantity.into(),
            value: Some(Value::Number(1.5)),
            unit: "Cel".into(),
            device_time_ms: t,
            location: Some(Location {
                lat: 21.0,
                lon: 105.8,
                alt_m: None,
            }),
            device_seq: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn runs_split_on_identity_and_round_trip() {
        let mut moved = reading("a", "pm10", 2, 100);
        moved.location = Some(Location {
            lat: 1.0,
            lon: 2.0,
            alt_m: Some(3.0),
        });
        let input = vec![
            reading("a", "temperature", 1, 100),
            reading("a", "humidity", 1, 100),
            moved,
            reading("b", "noise", 5, 100),
            reading("a", "temperature", 9, 101),
        ];
        let runs = encode(input.clone());
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].readings.len(), 3);
        assert_eq!(runs[0].index_prefixes.len(), 2, "two distinct device times");
        let mut first_id = 10;
        let mut back = Vec::new();
        for run in &runs {
            let key = super::super::keys::id_key(first_id);
            let decoded = Run::decode(&key, &run.value).unwrap();
            assert_eq!(decoded.len(), run.readings.len() as u64);
            first_id += decoded.len();
            back.extend(decoded.readings());
        }
        let expected: Vec<Reading> = input
            .into_iter()
            .zip(10..)
            .map(|(r, id)| Reading { id, ..r })
            .collect();
        assert_eq!(back, expected);
    }

    #[test]
    fn shared_fields_are_stored_once() {
        let many: Vec<Reading> = (0..8)
            .map(|i| reading("device-with-a-long-id", &format!("q{i}"), 1, 100))
            .collect();
        let one_by_one: usize = many.iter().map(|r| r.encoded_len()).sum();
        let run = encode(many);
        assert!(
            run[0].value.len() * 2 < one_by_one,
            "{} vs {one_by_one}",
            run[0].value.len()
        );
    }
}
