//! Key layouts of the store's keyspaces.
//!
//! Every integer in a key is big-endian so that the LSM's byte order is the numeric order, which is
//! what makes id-ordered and time-ordered range scans free.
//!
//! Ids live in the keys only: `log` and `dead_letters` values are encoded with `id = 0`, and the
//! readers put the id back from the key. That lets callers encode on their own tasks before the id
//! exists, keeping the single writer thread down to key building and the commit itself.

/// Name of the keyspace holding the global reading log.
pub(super) const LOG: &str = "log";
/// Name of the keyspace holding the per-device time index.
pub(super) const BY_DEVICE: &str = "by_device";
/// Name of the keyspace holding dead letters.
pub(super) const DEAD_LETTERS: &str = "dead_letters";
/// Name of the keyspace holding registry records.
pub(super) const DEVICES: &str = "devices";
/// Name of the keyspace holding agency records.
pub(super) const AGENCIES: &str = "agencies";
/// Name of the keyspace holding operator (console) token records.
pub(super) const OPERATORS: &str = "operators";
/// Name of the keyspace holding forwarder cursors.
pub(super) const CURSORS: &str = "cursors";
/// Name of the keyspace holding daily KPI snapshots.
pub(super) const KPI_SNAPSHOTS: &str = "kpi_snapshots";
/// Name of the keyspace holding the command log.
pub(super) const COMMANDS: &str = "commands";
/// Name of the keyspace holding alerts and alert rules.
pub(super) const ALERTS: &str = "alerts";
/// Name of the keyspace holding small store-wide values.
pub(super) const META: &str = "meta";

/// `meta` key: the next reading id. Written with every commit that assigns reading ids, so ids
/// are never reused even when retention has emptied `log`.
pub(super) const META_NEXT_READING_ID: &[u8] = b"next_reading_id";
/// `meta` key: the next dead-letter id (same reason as [`META_NEXT_READING_ID`]).
pub(super) const META_NEXT_DEAD_LETTER_ID: &[u8] = b"next_dead_letter_id";

/// `meta` key, cluster mode: the last stream sequence materialised into this store. Written in
/// the same commit as the readings it covers, so a restart resumes exactly after them.
pub(crate) const META_STREAM_SEQ: &[u8] = b"cluster_stream_seq";
/// `meta` key, cluster mode: the last records-bucket revision applied to this store.
pub(crate) const META_RECORDS_REVISION: &[u8] = b"cluster_records_revision";

/// Big-endian id key of `log` and `dead_letters`.
pub(super) fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// Parses an id key (or the last 8 bytes of an index key).
pub(super) fn parse_id(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8).map(|start| &key[start..])?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

/// Maps an i64 onto a u64 whose big-endian bytes sort like the signed value.
pub(super) fn ordered_time(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

/// Length of a `by_device` key for a device id of `device_len` bytes.
pub(super) fn index_key_len(device_len: usize) -> usize {
    device_len + 1 + 8 + 8
}

/// `by_device` key without its trailing id: `device_id 0x00 ordered(device_time)`. Allocated with
/// room for the id so the writer appends it without reallocating.
pub(super) fn index_prefix(device_id: &str, device_time_ms: i64) -> Vec<u8> {
    let mut key = Vec::with_capacity(index_key_len(device_id.len()));
    key.extend_from_slice(device_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&ordered_time(device_time_ms));
    key
}

/// Device time of a `by_device` key (the 8 bytes before the trailing id).
pub(super) fn parse_index_time(key: &[u8]) -> Option<i64> {
    let end = key.len().checked_sub(8)?;
    let bytes: [u8; 8] = key.get(end.checked_sub(8)?..end)?.try_into().ok()?;
    Some((u64::from_be_bytes(bytes) ^ (1 << 63)) as i64)
}

/// Full `by_device` key.
pub(super) fn index_key(device_id: &str, device_time_ms: i64, id: u64) -> Vec<u8> {
    let mut key = index_prefix(device_id, device_time_ms);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Inclusive `by_device` key range covering one device's readings with device time in
/// `[from_ms, to_ms]`.
///
/// A device id containing NUL could make another device's keys fall inside this range; callers
/// keep only keys of exactly [`index_key_len`], which pins the device id.
#[cfg(test)]
pub(super) fn index_range(
    device_id: &str,
    from_ms: i64,
    to_ms: i64,
) -> std::ops::RangeInclusive<Vec<u8>> {
    index_key(device_id, from_ms, 0)..=index_key(device_id, to_ms, u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_time_sorts_like_i64() {
        let times = [i64::MIN, -1_000, -1, 0, 1, 1_700_000_000_000, i64::MAX];
        for w in times.windows(2) {
            assert!(ordered_time(w[0]) < ordered_time(w[1]), "{w:?}");
        }
    }

    #[test]
    fn index_key_roundtrips_id() {
        let k = index_key("dev-1", -5, 42);
        assert_eq!(k.len(), index_key_len("dev-1".len()));
        assert_eq!(parse_id(&k), Some(42));
        assert_eq!(parse_index_time(&k), Some(-5));
        assert!(index_range("dev-1", -5, -5).contains(&k));
        assert!(!index_range("dev-1", -4, 10).contains(&k));
    }
}
