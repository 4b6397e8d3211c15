//! One registered device in memory, packed for city scale, and its persisted record.
//!
//! Hà Nội plans 8.8 million connections for 2026 and 35 million for 2030, and every node keeps
//! every device in memory so that authentication and the per-reading identity lookup never wait
//! on the disk. The plain layout (a dozen `String`s, a hex hash, a mutex per device) cost about
//! 1 KiB a device; this one is a single 160-byte allocation (see
//! docs/decisions/0015-registry-memory.md for the measurements):
//!
//! - values millions of devices share (tenant, commune, codec) are interned [`Sym`]s and the kind
//!   is an index into [`KINDS`];
//! - the id is stored inline when it has at most 24 bytes (`CompactString`);
//! - a generated secret's salted SHA-256 is 48 bytes, not its 104-character text;
//! - the position is two `i32` in units of 10⁻⁷ degree (about 1 cm), as OpenStreetMap stores it;
//! - what few devices have (a name, a sealed DTLS key, an Argon2 hash of an operator-chosen
//!   secret, a pinned client certificate) lives behind one optional pointer, [`Extra`]. New rarely-set per-device fields
//!   belong there too, so the common entry keeps its size class.
//!
//! The record on disk keeps its JSON form (and old records still load).

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU8, Ordering};
use std::sync::Mutex;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use super::intern::Sym;
use super::{secret, KINDS};
use crate::proto::{Device, Protocol};

/// The persisted form of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Record {
    pub id: String,
    pub tenant: String,
    pub kind: String,
    #[serde(default)]
    pub commune_code: String,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub enabled: bool,
    pub created_time_ms: i64,
    #[serde(default)]
    pub last_seen_time_ms: i64,
    #[serde(default)]
    pub name: String,
    pub secret_hash: String,
    // Records written before LoRaWAN support have neither field.
    #[serde(default)]
    pub dev_eui: String,
    #[serde(default)]
    pub codec: String,
    /// The DTLS PSK sealed by [`super::psk::Sealer`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_sealed: Option<String>,
    /// `Protocol` of the last accepted reading (0: never seen); saved with the last-seen time.
    #[serde(default)]
    pub protocol: i32,
    /// The pinned client certificate's SHA-256 (64 hex digits), when the device is pinned.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "pin_hex")]
    pub cert_sha256: Option<Box<[u8; 32]>>,
}

/// A pinned fingerprint as 64 hex digits in the record; absent for unpinned devices.
mod pin_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Box<[u8; 32]>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(f) => s.serialize_str(&hex::encode(f.as_slice())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<[u8; 32]>>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            crate::tls::identity::parse_fingerprint(&t)
                .map(Box::new)
                .ok_or_else(|| serde::de::Error::custom("cert_sha256: 64 hex digits"))
        })
        .transpose()
    }
}

/// Live state bits.
const ENABLED: u8 = 1;
/// The last-seen time changed since it was last persisted.
const LAST_SEEN_DIRTY: u8 = 2;
/// Position sentinel: no registered position.
const NO_POSITION: i32 = i32::MIN;
/// Fixed bit: the device has a LoRaWAN DevEUI.
const HAS_DEV_EUI: u8 = 1;

/// Positions are kept in units of 10⁻⁷ degree.
pub(super) fn to_e7(degrees: f64) -> i32 {
    (degrees * 1e7).round() as i32
}

fn from_e7(e7: i32) -> f64 {
    e7 as f64 / 1e7
}

/// A coordinate as the registry will give it back (rounded to 10⁻⁷ degree).
pub(super) fn round_e7(degrees: f64) -> f64 {
    from_e7(to_e7(degrees))
}

/// One device as the hot path sees it: immutable identity plus atomically updated live state.
pub struct DeviceEntry {
    id: CompactString,
    tenant: Sym,
    commune: Sym,
    codec: Sym,
    /// A generated secret's hash ([`secret::compact`]); unused when `extra` holds a slow one.
    secret: secret::Compact,
    dev_eui: u64,
    created_ms: i64,
    last_seen_ms: AtomicI64,
    extra: Option<Box<Extra>>,
    lat_e7: i32,
    lon_e7: i32,
    sessions: AtomicU32,
    state: AtomicU8,
    /// `Protocol` of the last accepted reading.
    protocol: AtomicU8,
    kind: u8,
    fixed: u8,
}

/// What few devices have; one allocation only for those.
#[derive(Default)]
struct Extra {
    name: Box<str>,
    psk_sealed: Option<Box<str>>,
    slow_secret: Option<SlowSecret>,
    /// SHA-256 of the one client certificate the device may use (MQTT mTLS, CoAPS X.509).
    cert_sha256: Option<Box<[u8; 32]>>,
}

/// A stored secret hash kept as text (Argon2id for operator-chosen secrets), and the
/// fingerprint of the last secret that verified against it (docs/decisions/0002).
struct SlowSecret {
    stored: Box<str>,
    verified: Mutex<Option<[u8; 32]>>,
}

/// How to check a device's secret.
pub(super) enum Credential<'a> {
    /// Salted SHA-256 of a generated secret: cheap, checked in place.
    Fast(&'a secret::Compact),
    /// Argon2id: checked on a blocking thread once, then by fingerprint.
    Slow {
        stored: &'a str,
        verified: &'a Mutex<Option<[u8; 32]>>,
    },
}

impl std::fmt::Debug for DeviceEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEntry")
            .field("id", &self.id())
            .field("tenant", &self.tenant())
            .field("kind", &self.kind())
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

impl DeviceEntry {
    /// The in-memory form of a stored (or just validated) record.
    pub(super) fn new(r: Record) -> Result<DeviceEntry, String> {
        let kind = KINDS
            .iter()
            .position(|k| *k == r.kind)
            .ok_or_else(|| format!("unknown kind {:?}", r.kind))? as u8;
        let dev_eui = match r.dev_eui.as_str() {
            "" => None,
            eui => Some(
                u64::from_str_radix(eui, 16)
                    .ok()
                    .filter(|_| eui.len() == 16)
                    .ok_or_else(|| format!("bad dev_eui {eui:?}"))?,
            ),
        };
        let (lat_e7, lon_e7) = match (r.lat, r.lon) {
            (Some(lat), Some(lon)) => (to_e7(lat), to_e7(lon)),
            _ => (NO_POSITION, NO_POSITION),
        };
        let compact = secret::compact(&r.secret_hash);
        let slow_secret = compact.is_none().then(|| SlowSecret {
            stored: r.secret_hash.into_boxed_str(),
            verified: Mutex::new(None),
        });
        let extra = (!r.name.is_empty()
            || r.psk_sealed.is_some()
            || slow_secret.is_some()
            || r.cert_sha256.is_some())
        .then(|| {
            Box::new(Extra {
                name: r.name.into_boxed_str(),
                psk_sealed: r.psk_sealed.map(String::into_boxed_str),
                slow_secret,
                cert_sha256: r.cert_sha256,
            })
        });
        Ok(DeviceEntry {
            id: CompactString::from(r.id),
            tenant: Sym::new(&r.tenant),
            commune: Sym::new(&r.commune_code),
            codec: Sym::new(&r.codec),
            secret: compact.unwrap_or([0; 48]),
            dev_eui: dev_eui.unwrap_or(0),
            created_ms: r.created_time_ms,
            last_seen_ms: AtomicI64::new(r.last_seen_time_ms),
            extra,
            lat_e7,
            lon_e7,
            sessions: AtomicU32::new(0),
            state: AtomicU8::new(if r.enabled { ENABLED } else { 0 }),
            protocol: AtomicU8::new(u8::try_from(r.protocol).unwrap_or(0)),
            kind,
            fixed: if dev_eui.is_some() { HAS_DEV_EUI } else { 0 },
        })
    }

    /// The record to persist, with the live state as it is now.
    pub(super) fn record(&self) -> Record {
        let extra = self.extra.as_deref();
        let (lat, lon) = self.position().unzip();
        Record {
            id: self.id.to_string(),
            tenant: self.tenant().to_string(),
            kind: self.kind().to_string(),
            commune_code: self.commune_code().to_string(),
            lat,
            lon,
            enabled: self.enabled(),
            created_time_ms: self.created_ms,
            last_seen_time_ms: self.last_seen_ms(),
            name: self.name().to_string(),
            secret_hash: match self.credential() {
                Credential::Fast(c) => secret::expand(c),
                Credential::Slow { stored, .. } => stored.to_string(),
            },
            dev_eui: self.dev_eui(),
            codec: self.codec().to_string(),
            psk_sealed: extra.and_then(|e| e.psk_sealed.as_deref().map(str::to_string)),
            protocol: self.protocol.load(Ordering::Relaxed).into(),
            cert_sha256: self.cert_pin().map(|f| Box::new(*f)),
        }
    }

    /// The same device pinned to another client certificate (or unpinned), with the live state
    /// (enabled, last seen, open sessions) it has now.
    pub(super) fn with_cert_pin(&self, pin: Option<[u8; 32]>) -> Result<DeviceEntry, String> {
        let mut record = self.record();
        record.cert_sha256 = pin.map(Box::new);
        let entry = DeviceEntry::new(record)?;
        entry
            .sessions
            .store(self.sessions.load(Ordering::Relaxed), Ordering::Relaxed);
        entry
            .state
            .store(self.state.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok(entry)
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn tenant(&self) -> &str {
        self.tenant.as_str()
    }
    pub fn kind(&self) -> &str {
        KINDS[self.kind as usize]
    }
    /// The kind as its index in [`KINDS`].
    pub fn kind_index(&self) -> usize {
        self.kind as usize
    }
    pub fn commune_code(&self) -> &str {
        self.commune.as_str()
    }
    pub fn name(&self) -> &str {
        self.extra.as_deref().map_or("", |e| &e.name)
    }
    pub fn location(&self) -> Option<crate::proto::Location> {
        let (lat, lon) = self.position()?;
        Some(crate::proto::Location {
            lat,
            lon,
            alt_m: None,
        })
    }
    /// LoRaWAN DevEUI, 16 lower-case hex digits, "" when none.
    pub fn dev_eui(&self) -> String {
        self.dev_eui_u64()
            .map(|e| format!("{e:016x}"))
            .unwrap_or_default()
    }
    pub(super) fn dev_eui_u64(&self) -> Option<u64> {
        (self.fixed & HAS_DEV_EUI != 0).then_some(self.dev_eui)
    }
    /// LoRaWAN payload codec, "" for the network server's decoding.
    pub fn codec(&self) -> &str {
        self.codec.as_str()
    }
    /// The client certificate the device is pinned to (SHA-256), if any.
    pub fn cert_pin(&self) -> Option<&[u8; 32]> {
        self.extra.as_deref()?.cert_sha256.as_deref()
    }
    pub(super) fn psk_sealed(&self) -> Option<&str> {
        self.extra.as_deref()?.psk_sealed.as_deref()
    }
    pub(super) fn credential(&self) -> Credential<'_> {
        match self.extra.as_deref().and_then(|e| e.slow_secret.as_ref()) {
            Some(s) => Credential::Slow {
                stored: &s.stored,
                verified: &s.verified,
            },
            None => Credential::Fast(&self.secret),
        }
    }
    pub fn enabled(&self) -> bool {
        self.state.load(Ordering::Acquire) & ENABLED != 0
    }
    pub(super) fn set_enabled(&self, enabled: bool) {
        if enabled {
            self.state.fetch_or(ENABLED, Ordering::AcqRel);
        } else {
            self.state.fetch_and(!ENABLED, Ordering::AcqRel);
        }
    }
    /// Registered position as (lat, lon).
    pub fn position(&self) -> Option<(f64, f64)> {
        (self.lat_e7 != NO_POSITION).then(|| (from_e7(self.lat_e7), from_e7(self.lon_e7)))
    }
    /// Receive time of the last accepted reading, Unix milliseconds; 0 when never seen.
    pub fn last_seen_ms(&self) -> i64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    /// Records that the device delivered an accepted reading.
    pub fn touch(&self, now_ms: i64) {
        if self.last_seen_ms.fetch_max(now_ms, Ordering::Relaxed) < now_ms
            && self.state.load(Ordering::Relaxed) & LAST_SEEN_DIRTY == 0
        {
            self.state.fetch_or(LAST_SEEN_DIRTY, Ordering::Relaxed);
        }
    }

    /// Whether the last-seen time changed since the previous call.
    pub(super) fn take_last_seen_dirty(&self) -> bool {
        self.state.load(Ordering::Relaxed) & LAST_SEEN_DIRTY != 0
            && self.state.fetch_and(!LAST_SEEN_DIRTY, Ordering::Relaxed) & LAST_SEEN_DIRTY != 0
    }

    /// Records the protocol an accepted reading came over (saved with the next last-seen write).
    pub fn reported_over(&self, protocol: Protocol) {
        self.protocol.store(protocol as u8, Ordering::Relaxed);
    }

    /// The protocol of the last accepted reading; `Unspecified` when the device never reported.
    pub fn protocol(&self) -> Protocol {
        Protocol::try_from(i32::from(self.protocol.load(Ordering::Relaxed))).unwrap_or_default()
    }

    /// Whether a live connection (MQTT session) is open now.
    pub fn online(&self) -> bool {
        self.sessions.load(Ordering::Relaxed) > 0
    }

    pub fn session_opened(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_closed(&self) {
        // Saturating: a close without an open (gateway restart races) must not wrap.
        let _ = self
            .sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub fn to_proto(&self) -> Device {
        let (lat, lon) = self.position().unzip();
        Device {
            id: self.id.to_string(),
            tenant: self.tenant().to_string(),
            kind: self.kind().to_string(),
            commune_code: self.commune_code().to_string(),
            lat,
            lon,
            enabled: self.enabled(),
            created_time_ms: self.created_ms,
            last_seen_time_ms: self.last_seen_ms(),
            name: self.name().to_string(),
            online: self.online(),
            dev_eui: self.dev_eui(),
            codec: self.codec().to_string(),
            has_psk: self.psk_sealed().is_some(),
            protocol: self.protocol.load(Ordering::Relaxed).into(),
            cert_sha256: self
                .cert_pin()
                .map(|f| hex::encode(f.as_slice()))
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            id: "hn-aq-000001".into(),
            tenant: "hanoi".into(),
            kind: "air_quality".into(),
            commune_code: "00070".into(),
            lat: Some(21.028511),
            lon: Some(105.804817),
            enabled: true,
            created_time_ms: 1_700_000_000_000,
            last_seen_time_ms: 1_700_000_100_000,
            name: String::new(),
            secret_hash: secret::hash(&secret::generate(), true),
            dev_eui: String::new(),
            codec: String::new(),
            psk_sealed: None,
            protocol: 0,
            cert_sha256: None,
        }
    }

    #[test]
    fn a_common_device_is_one_160_byte_allocation() {
        // The Arc's two counters plus the entry: mimalloc's 160-byte size class. Growing the
        // entry moves every device to the 192-byte class (+20 % registry memory).
        assert!(std::mem::size_of::<DeviceEntry>() + 16 <= 160);
        let e = DeviceEntry::new(record()).unwrap();
        assert!(e.extra.is_none() && !e.id.is_heap_allocated());
    }

    #[test]
    fn records_round_trip_exactly() {
        let plain = record();
        let mut full = record();
        full.id = "a-device-id-longer-than-twenty-four-bytes".into();
        full.name = "Trạm Hoàn Kiếm 01".into();
        full.secret_hash = secret::hash("chosen secret", false);
        full.dev_eui = "70b3d57ed0000001".into();
        full.codec = "lpp".into();
        full.psk_sealed = Some("aes256gcm$AAAA".into());
        full.enabled = false;
        full.protocol = Protocol::Lorawan as i32;
        full.cert_sha256 = Some(Box::new([0xab; 32]));
        full.lat = None;
        full.lon = None;
        for r in [plain, full] {
            let json = serde_json::to_string(&r).unwrap();
            let back = DeviceEntry::new(r).unwrap().record();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
    }

    #[test]
    fn a_pin_is_kept_only_for_pinned_devices_and_keeps_the_live_state() {
        let e = DeviceEntry::new(record()).unwrap();
        e.session_opened();
        e.touch(1_800_000_000_000);
        let pinned = e.with_cert_pin(Some([7; 32])).unwrap();
        assert_eq!(pinned.cert_pin(), Some(&[7; 32]));
        assert!(pinned.online() && pinned.last_seen_ms() == 1_800_000_000_000);
        assert!(
            pinned.take_last_seen_dirty(),
            "the unsaved last-seen time stays unsaved"
        );
        let unpinned = pinned.with_cert_pin(None).unwrap();
        assert!(unpinned.cert_pin().is_none() && unpinned.extra.is_none());
        assert!(!serde_json::to_string(&unpinned.record())
            .unwrap()
            .contains("cert_sha256"));
    }

    #[test]
    fn positions_keep_seven_decimals() {
        let e = DeviceEntry::new(record()).unwrap();
        assert_eq!(e.position(), Some((21.028511, 105.804817)));
        assert_eq!(round_e7(-33.123456789), -33.1234568);
        assert_eq!(round_e7(180.0), 180.0);
        assert_eq!(round_e7(-90.0), -90.0);
    }

    #[test]
    fn unknown_kinds_and_bad_dev_euis_do_not_load() {
        let mut r = record();
        r.kind = "teapot".into();
        assert!(DeviceEntry::new(r).is_err());
        let mut r = record();
        r.dev_eui = "70b3".into();
        assert!(DeviceEntry::new(r).is_err());
    }

    #[test]
    fn last_seen_is_dirty_once_per_change() {
        let e = DeviceEntry::new(record()).unwrap();
        assert!(!e.take_last_seen_dirty());
        e.touch(1);
        assert!(!e.take_last_seen_dirty(), "older than the stored time");
        e.touch(1_800_000_000_000);
        e.touch(1_800_000_000_001);
        assert!(e.take_last_seen_dirty());
        assert!(!e.take_last_seen_dirty());
        e.set_enabled(false);
        assert!(!e.enabled());
        e.touch(1_800_000_000_002);
        assert!(!e.enabled() && e.take_last_seen_dirty());
    }
}
