//! Devices, their credentials and their live state.
//!
//! The whole registry is held in memory and written through to the store on every change, so
//! authentication and the per-reading identity lookup never touch the disk. A device costs
//! about 0.2 KiB resident ([`entry`] says how; docs/decisions/0015-registry-memory.md has the
//! measurements and the disk-backed alternative it was weighed against). Last-seen times change
//! on every reading and are persisted in the background instead (see
//! [`Registry::persist_last_seen`]).

pub mod agencies;
mod entry;
mod intern;
pub mod operators;
pub mod psk;
pub mod secret;
pub mod throttle;

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock, RwLock};

use tokio::sync::broadcast;

pub use entry::DeviceEntry;
use entry::{Credential, Record};

use crate::proto::Device;
use crate::store::{Store, StoreError, Table};

/// Device kinds the platform knows; KPI and agency scopes are expressed in them.
pub const KINDS: &[&str] = &[
    "air_quality",
    "noise",
    "water_level",
    "flood",
    "rain",
    "weather",
    "traffic",
    "parking",
    "street_light",
    "energy_meter",
    "water_meter",
    "fire_alarm",
    "waste_bin",
    "soil_moisture",
    "generic",
];

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0:?} already exists")]
    Exists(String),
    #[error("device {0:?} not found")]
    NotFound(String),
    #[error("invalid device: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an operator supplies to register a device.
#[derive(Debug, Clone, Default)]
pub struct NewDevice {
    pub id: String,
    pub tenant: String,
    pub kind: String,
    pub commune_code: String,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub name: String,
    /// None: the gateway generates one.
    pub secret: Option<String>,
    /// LoRaWAN DevEUI, any case, '-' or ':' separators allowed; "" when none.
    pub dev_eui: String,
    /// LoRaWAN payload codec (see [`CODECS`]); "" for the network server's decoding.
    pub codec: String,
    /// DTLS pre-shared key (CoAPS), stored sealed; None: the device has none.
    pub psk: Option<String>,
    /// SHA-256 of the one client certificate the device may use; None: any certificate from the
    /// client CA that names it.
    pub cert_sha256: Option<[u8; 32]>,
}

/// Codecs a device's raw LoRaWAN payload can be decoded with, besides the payload formats of
/// [`crate::codec::Format`]: "" takes the network server's decoded object (else raw), "raw" keeps
/// the bytes as they came.
pub const CODEC_RAW: &str = "raw";

/// Why a CONNECT (or any credentialed request) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Anonymous,
    UnknownDevice,
    DisabledDevice,
    BadCredentials,
    /// Too many failures from this address (or for this device): refused without a check,
    /// retry after this long (see [`throttle`]).
    Throttled(std::time::Duration),
}

impl AuthError {
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Anonymous => "anonymous",
            AuthError::UnknownDevice => "unknown_device",
            AuthError::DisabledDevice => "disabled_device",
            AuthError::BadCredentials => "bad_credentials",
            AuthError::Throttled(_) => "throttled",
        }
    }
}

/// Changes that live sessions must react to.
#[derive(Debug, Clone)]
pub enum RegistryEvent {
    Disabled(String),
}

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    index: RwLock<Index>,
    events: broadcast::Sender<RegistryEvent>,
    psk_sealer: OnceLock<psk::Sealer>,
    throttle: OnceLock<throttle::AuthThrottle>,
}

/// The registry's lookups: an entry is in every index it belongs to from its insertion to its
/// removal (only the cluster removes or replaces devices; disabling keeps them).
#[derive(Default)]
struct Index {
    /// Authentication and the per-reading lookup: one hash probe.
    by_id: HashSet<ById>,
    /// Listing in id order and paging by `after_id`.
    ordered: BTreeSet<ById>,
    /// DevEUI -> device, for LoRaWAN uplinks.
    by_dev_eui: HashMap<u64, Arc<DeviceEntry>>,
}

impl Index {
    fn insert(&mut self, entry: Arc<DeviceEntry>) {
        if let Some(eui) = entry.dev_eui_u64() {
            self.by_dev_eui.insert(eui, entry.clone());
        }
        self.ordered.insert(ById(entry.clone()));
        self.by_id.insert(ById(entry));
    }

    fn get(&self, id: &str) -> Option<&Arc<DeviceEntry>> {
        self.by_id.get(id).map(|e| &e.0)
    }

    /// Cluster mode only: a device removed (or replaced) by the cluster.
    fn remove(&mut self, id: &str) {
        if let Some(ById(entry)) = self.by_id.take(id) {
            self.ordered.remove(id);
            if let Some(eui) = entry.dev_eui_u64() {
                self.by_dev_eui.remove(&eui);
            }
        }
    }
}

/// A device keyed by its id, so the indexes need no second copy of the id.
#[derive(Clone)]
struct ById(Arc<DeviceEntry>);

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        self.0.id()
    }
}
impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id().hash(state)
    }
}
impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}
impl Eq for ById {}
impl PartialOrd for ById {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ById {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id().cmp(other.0.id())
    }
}

impl Registry {
    /// Loads every device from the store, one record at a time (a city's registry never exists
    /// twice in memory, not even while it loads).
    pub fn load(store: Store) -> anyhow::Result<Registry> {
        let mut index = Index::default();
        store.for_each_record(Table::Devices, "", |id, bytes| {
            let entry = serde_json::from_slice::<Record>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(DeviceEntry::new)
                .map_err(|e| StoreError::Corrupt(format!("device record {id:?}: {e}")))?;
            index.insert(Arc::new(entry));
            Ok(())
        })?;
        index.by_id.shrink_to_fit();
        tracing::info!(devices = index.by_id.len(), "registry loaded");
        let (events, _) = broadcast::channel(1024);
        Ok(Registry {
            inner: Arc::new(Inner {
                store,
                index: RwLock::new(index),
                events,
                psk_sealer: OnceLock::new(),
                throttle: OnceLock::new(),
            }),
        })
    }

    /// Enables DTLS PSKs: they are sealed with this key when added and opened for handshakes.
    pub fn set_psk_sealer(&self, sealer: psk::Sealer) {
        let _ = self.inner.psk_sealer.set(sealer);
    }

    /// Sets the back-off of failed authentication (before the listeners start; the defaults
    /// apply otherwise).
    pub fn set_auth_throttle(&self, throttle: throttle::AuthThrottle) {
        let _ = self.inner.throttle.set(throttle);
    }

    /// The back-off of failed authentication, shared by every way in (device secrets, PSKs,
    /// client certificates, API tokens).
    pub fn throttle(&self) -> &throttle::AuthThrottle {
        self.inner
            .throttle
            .get_or_init(|| throttle::AuthThrottle::new(Default::default()))
    }

    /// The DTLS PSK of an enabled device, for the handshake.
    pub fn psk(&self, id: &str) -> Result<Vec<u8>, AuthError> {
        let entry = self.enabled_device(id)?;
        let sealed = entry.psk_sealed().ok_or(AuthError::BadCredentials)?;
        self.inner
            .psk_sealer
            .get()
            .and_then(|s| s.open(id, sealed))
            .ok_or(AuthError::BadCredentials)
    }

    pub fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.inner.events.subscribe()
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.inner.index.read().expect("registry lock")
    }

    pub fn get(&self, id: &str) -> Option<Arc<DeviceEntry>> {
        self.index().get(id).cloned()
    }

    /// The device registered with this DevEUI (16 lower-case hex digits).
    pub fn by_dev_eui(&self, dev_eui: &str) -> Option<Arc<DeviceEntry>> {
        let eui = u64::from_str_radix(dev_eui, 16).ok()?;
        self.index().by_dev_eui.get(&eui).cloned()
    }

    pub fn len(&self) -> usize {
        self.index().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A page of devices in id order, filtered by tenant and kind (empty = any).
    pub fn list(&self, tenant: &str, kind: &str, after_id: &str, limit: usize) -> Vec<Device> {
        self.select(after_id, limit, |e| {
            (tenant.is_empty() || e.tenant() == tenant) && (kind.is_empty() || e.kind() == kind)
        })
        .iter()
        .map(|e| e.to_proto())
        .collect()
    }

    /// Up to `limit` devices after `after_id` (empty: from the start) for which `pred` holds,
    /// in id order.
    pub fn select(
        &self,
        after_id: &str,
        limit: usize,
        mut pred: impl FnMut(&DeviceEntry) -> bool,
    ) -> Vec<Arc<DeviceEntry>> {
        use std::ops::Bound;
        let index = self.index();
        let start = if after_id.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(after_id)
        };
        index
            .ordered
            .range::<str, _>((start, Bound::Unbounded))
            .map(|e| &e.0)
            .filter(|e| pred(e))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Calls `f` for every device, in id order, under the read lock (so keep `f` short: it
    /// holds back registrations, not authentication or ingest).
    pub fn for_each(&self, mut f: impl FnMut(&DeviceEntry)) {
        self.index().ordered.iter().for_each(|e| f(&e.0));
    }

    /// Registers one device; returns it with its secret (shown once, stored hashed).
    pub async fn add(
        &self,
        new: NewDevice,
        now_ms: i64,
    ) -> Result<(Device, String), RegistryError> {
        let mut results = self.import(vec![new], now_ms).await?;
        results.pop().expect("one result per device")
    }

    /// Registers many devices with one durable commit; each succeeds or fails on its own.
    pub async fn import(
        &self,
        news: Vec<NewDevice>,
        now_ms: i64,
    ) -> Result<Vec<Result<(Device, String), RegistryError>>, RegistryError> {
        let sealer = self.inner.psk_sealer.get().cloned();
        // Hashing (Argon2 for chosen secrets) is CPU work: keep it off the async threads.
        let prepared = tokio::task::spawn_blocking(move || {
            news.into_iter()
                .map(|mut new| {
                    validate(&mut new)?;
                    let (secret, generated) = match new.secret {
                        Some(s) => (s, false),
                        None => (secret::generate(), true),
                    };
                    let psk_sealed = match (&new.psk, &sealer) {
                        (None, _) => None,
                        (Some(p), Some(sealer)) => Some(sealer.seal(&new.id, p.as_bytes())),
                        (Some(_), None) => {
                            return Err(RegistryError::Invalid(
                                "psk: DTLS keys are not enabled on this gateway".into(),
                            ))
                        }
                    };
                    let record = Record {
                        psk_sealed,
                        secret_hash: secret::hash(&secret, generated),
                        id: new.id,
                        tenant: new.tenant,
                        kind: new.kind,
                        commune_code: new.commune_code,
                        lat: new.lat,
                        lon: new.lon,
                        enabled: true,
                        created_time_ms: now_ms,
                        last_seen_time_ms: 0,
                        name: new.name,
                        dev_eui: new.dev_eui,
                        codec: new.codec,
                        protocol: 0,
                        cert_sha256: new.cert_sha256.map(Box::new),
                    };
                    let row = serde_json::to_vec(&record).expect("record serialises");
                    let entry = DeviceEntry::new(record).map_err(RegistryError::Invalid)?;
                    Ok((entry, row, secret))
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| RegistryError::Invalid(format!("hashing task failed: {e}")))?;

        let mut results = Vec::with_capacity(prepared.len());
        let mut rows = Vec::new();
        {
            let index = self.index();
            let mut seen = HashSet::new();
            let mut seen_euis = HashSet::new();
            for item in prepared {
                results.push(match item {
                    Ok((entry, _, _))
                        if index.get(entry.id()).is_some()
                            || !seen.insert(entry.id().to_owned()) =>
                    {
                        Err(RegistryError::Exists(entry.id().to_owned()))
                    }
                    Ok((entry, _, _))
                        if entry.dev_eui_u64().is_some_and(|eui| {
                            index.by_dev_eui.contains_key(&eui) || !seen_euis.insert(eui)
                        }) =>
                    {
                        Err(RegistryError::Invalid(format!(
                            "dev_eui {} is already registered to another device",
                            entry.dev_eui()
                        )))
                    }
                    Ok((entry, row, secret)) => {
                        rows.push((entry.id().to_owned(), Some(row)));
                        Ok((entry, secret))
                    }
                    Err(e) => Err(e),
                });
            }
        }
        if !rows.is_empty() {
            self.inner.store.put_records(Table::Devices, rows).await?;
        }
        let mut index = self.inner.index.write().expect("registry lock");
        Ok(results
            .into_iter()
            .map(|r| {
                r.map(|(entry, secret)| {
                    let proto = entry.to_proto();
                    index.insert(Arc::new(entry));
                    (proto, secret)
                })
            })
            .collect())
    }

    /// Enables or disables a device; disabling tells every source to drop its live sessions.
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<Device, RegistryError> {
        let entry = self
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        entry.set_enabled(enabled);
        self.persist(id, &entry).await?;
        if !enabled {
            let _ = self
                .inner
                .events
                .send(RegistryEvent::Disabled(id.to_string()));
            tracing::info!(device = id, "device disabled");
        }
        Ok(entry.to_proto())
    }

    /// Writes a device's record (from its entry) to the store.
    async fn persist(&self, id: &str, entry: &DeviceEntry) -> Result<(), RegistryError> {
        let row = (
            id.to_string(),
            Some(serde_json::to_vec(&entry.record()).expect("record serialises")),
        );
        self.inner
            .store
            .put_records(Table::Devices, vec![row])
            .await?;
        Ok(())
    }

    /// Pins a device to one client certificate (its SHA-256), or unpins it (None). A certificate
    /// renewal is a new pin; the device's live sessions keep running.
    pub async fn set_cert_pin(
        &self,
        id: &str,
        pin: Option<[u8; 32]>,
    ) -> Result<Device, RegistryError> {
        let old = self
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        let entry = old.with_cert_pin(pin).map_err(RegistryError::Invalid)?;
        self.persist(id, &entry).await?;
        let proto = entry.to_proto();
        let mut index = self.inner.index.write().expect("registry lock");
        index.remove(id);
        index.insert(Arc::new(entry));
        drop(index);
        tracing::info!(
            device = id,
            pinned = pin.is_some(),
            "device certificate pin changed"
        );
        Ok(proto)
    }

    /// The device behind an identity a transport already proved (a DTLS PSK session, a client
    /// certificate), if it may still report.
    pub fn enabled_device(&self, id: &str) -> Result<Arc<DeviceEntry>, AuthError> {
        match self.get(id) {
            Some(d) if d.enabled() => Ok(d),
            Some(_) => Err(AuthError::DisabledDevice),
            None => Err(AuthError::UnknownDevice),
        }
    }

    /// [`Registry::authenticate`] for a client at `source`, under the back-off of failed
    /// attempts: a throttled attempt is refused unchecked, failures and successes are recorded.
    pub async fn authenticate_from(
        &self,
        source: IpAddr,
        id: &str,
        secret: Option<&[u8]>,
    ) -> Result<Arc<DeviceEntry>, AuthError> {
        // Only registered ids get a tally of their own: invented ones cannot grow the tables.
        let known = self.get(id).is_some().then_some(id);
        self.throttle()
            .check(source, known)
            .map_err(|t| AuthError::Throttled(t.retry_after))?;
        let result = self.authenticate(id, secret).await;
        match &result {
            Ok(_) => self.throttle().succeeded(source, id),
            Err(AuthError::BadCredentials | AuthError::UnknownDevice | AuthError::Anonymous) => {
                self.throttle().failed(source, known)
            }
            Err(_) => {}
        }
        result
    }

    /// Checks a device's credentials. Argon2-hashed secrets are verified on a blocking thread
    /// once, then by fingerprint, so reconnect storms cost a SHA-256 each.
    pub async fn authenticate(
        &self,
        id: &str,
        secret: Option<&[u8]>,
    ) -> Result<Arc<DeviceEntry>, AuthError> {
        let entry = self.enabled_device(id)?;
        let Some(secret) = secret.and_then(|s| std::str::from_utf8(s).ok()) else {
            return Err(AuthError::BadCredentials);
        };
        let fingerprint = match entry.credential() {
            Credential::Fast(hash) if secret::verify_compact(hash, secret) => return Ok(entry),
            Credential::Fast(_) => return Err(AuthError::BadCredentials),
            Credential::Slow { stored, verified } => {
                let fingerprint = secret::fingerprint(stored, secret);
                if verified
                    .lock()
                    .expect("verified lock")
                    .is_some_and(|f| secret::constant_time_eq(&f, &fingerprint))
                {
                    return Ok(entry);
                }
                fingerprint
            }
        };
        let (checked, secret_owned) = (entry.clone(), secret.to_string());
        let ok = tokio::task::spawn_blocking(move || match checked.credential() {
            Credential::Slow { stored, .. } => secret::verify(stored, &secret_owned),
            Credential::Fast(_) => false,
        })
        .await
        .unwrap_or(false);
        match (ok, entry.credential()) {
            (true, Credential::Slow { verified, .. }) => {
                *verified.lock().expect("verified lock") = Some(fingerprint);
                Ok(entry)
            }
            _ => Err(AuthError::BadCredentials),
        }
    }

    /// Writes last-seen times that changed since the previous call; returns how many.
    pub async fn persist_last_seen(&self) -> Result<usize, RegistryError> {
        let rows: Vec<(String, Option<Vec<u8>>)> = {
            let index = self.index();
            index
                .by_id
                .iter()
                .filter(|e| e.0.take_last_seen_dirty())
                .map(|e| {
                    (
                        e.0.id().to_string(),
                        Some(serde_json::to_vec(&e.0.record()).expect("record serialises")),
                    )
                })
                .collect()
        };
        let n = rows.len();
        if n > 0 {
            // Local only: in cluster mode every node derives last-seen times from the readings
            // it materialises, so they need no replication.
            self.inner
                .store
                .put_local_records(Table::Devices, rows, None)
                .await?;
        }
        Ok(n)
    }

    /// Cluster mode: applies a device record as the cluster agreed on it (written by any node,
    /// this one included); `None` removes the device. Disabling closes its live sessions here.
    pub fn apply_record(&self, id: &str, bytes: Option<&[u8]>) {
        let record = match bytes.map(serde_json::from_slice::<Record>) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                tracing::error!(device = id, error = %e, "replicated device record is corrupt; ignored");
                return;
            }
        };
        let mut index = self.inner.index.write().expect("registry lock");
        let existing = index.get(id).cloned();
        let was_enabled = existing.as_ref().is_some_and(|e| e.enabled());
        let now_enabled = record.as_ref().is_some_and(|r| r.enabled);
        match (existing, record) {
            (Some(entry), Some(record)) if same_identity(&entry.record(), &record) => {
                // Only live state changed (enabled); last-seen never goes back.
                entry.set_enabled(record.enabled);
                entry.touch(record.last_seen_time_ms);
            }
            (existing, record) => {
                if existing.is_some() {
                    index.remove(id);
                }
                if let Some(record) = record {
                    let entry = match DeviceEntry::new(record) {
                        Ok(entry) => entry,
                        Err(e) => {
                            tracing::error!(device = id, error = %e, "replicated device record is invalid; ignored");
                            return;
                        }
                    };
                    if let Some(old) = existing {
                        entry.touch(old.last_seen_ms());
                    }
                    index.insert(Arc::new(entry));
                }
            }
        }
        drop(index);
        if was_enabled && !now_enabled {
            let _ = self
                .inner
                .events
                .send(RegistryEvent::Disabled(id.to_string()));
            tracing::info!(device = id, "device disabled by the cluster");
        }
    }

    /// Cluster mode: re-applies every stored device record (after missing changes), one record
    /// at a time.
    pub fn resync(&self) -> Result<(), StoreError> {
        self.inner
            .store
            .for_each_record(Table::Devices, "", |id, bytes| {
                self.apply_record(id, Some(&bytes));
                Ok(())
            })
    }

    /// Cluster mode: marks devices seen as the node materialises their readings from the
    /// stream, so last-seen times (and the KPI) are the same on every node, whichever node the
    /// device reported to.
    pub async fn touch_from_feed(self, mut feed: broadcast::Receiver<crate::store::Committed>) {
        loop {
            match feed.recv().await {
                Ok(commit) => {
                    let mut last: Option<(&str, i64)> = None;
                    for r in commit.iter().map(|f| &f.reading) {
                        if last == Some((r.device_id.as_str(), r.received_time_ms)) {
                            continue;
                        }
                        last = Some((&r.device_id, r.received_time_ms));
                        if let Some(d) = self.get(&r.device_id) {
                            d.touch(r.received_time_ms);
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// Two records of the same device that differ at most in live state (enabled, last seen, the
/// protocol of the last reading). `a` comes from the registry, so `b`'s position is compared as
/// the registry keeps it (10⁻⁷ degree).
fn same_identity(a: &Record, b: &Record) -> bool {
    let mut b = b.clone();
    b.enabled = a.enabled;
    b.last_seen_time_ms = a.last_seen_time_ms;
    b.protocol = a.protocol;
    b.lat = b.lat.map(entry::round_e7);
    b.lon = b.lon.map(entry::round_e7);
    *a == b
}

/// Cluster mode: applies record changes from the cluster to the registry, the agencies and the
/// operators until the store closes.
pub async fn follow_changes(
    store: Store,
    registry: Registry,
    agencies: agencies::Agencies,
    operators: operators::Operators,
) {
    let resync = || {
        registry
            .resync()
            .and_then(|()| agencies.resync())
            .and_then(|()| operators.resync())
    };
    let mut changes = store.record_changes();
    // Whatever changed between loading and subscribing.
    if let Err(e) = resync() {
        tracing::error!(error = %e, "registry reload failed");
    }
    loop {
        match changes.recv().await {
            Ok(change) => {
                let value = change.value.as_deref();
                match change.table {
                    Table::Devices => registry.apply_record(&change.key, value),
                    Table::Agencies => agencies.apply_record(&change.key, value),
                    Table::Operators => operators.apply_record(&change.key, value),
                    Table::Cursors | Table::KpiSnapshots | Table::Commands | Table::Alerts => {}
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "registry changes lagged; reloading");
                if let Err(e) = resync() {
                    tracing::error!(error = %e, "registry reload failed");
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// A DevEUI as stored: 16 lower-case hex digits. Accepts any case and the '-' / ':' separators
/// consoles print.
pub fn normalise_dev_eui(s: &str) -> Option<String> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Checks a device and puts its DevEUI and codec into their stored spelling.
fn validate(d: &mut NewDevice) -> Result<(), RegistryError> {
    let invalid = |m: String| Err(RegistryError::Invalid(m));
    // The id is an MQTT topic level and a CoAP path segment, so it must not contain separators
    // or wildcards.
    if d.id.is_empty()
        || d.id.len() > 128
        || !d
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return invalid(format!(
            "id {:?}: 1-128 characters of A-Z a-z 0-9 - _ . :",
            d.id
        ));
    }
    if !crate::config::is_slug(&d.tenant) {
        return invalid(format!(
            "tenant {:?}: 1-64 characters of a-z 0-9 - _",
            d.tenant
        ));
    }
    if !KINDS.contains(&d.kind.as_str()) {
        return invalid(format!("kind {:?}: one of {}", d.kind, KINDS.join(", ")));
    }
    let commune_ok = d.commune_code.is_empty()
        || (d.commune_code.len() == 5 && d.commune_code.bytes().all(|b| b.is_ascii_digit()));
    if !commune_ok {
        return invalid(format!(
            "commune code {:?}: five digits (2025 national statistics code)",
            d.commune_code
        ));
    }
    match (d.lat, d.lon) {
        (None, None) => {}
        (Some(lat), Some(lon))
            if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) =>
        {
            // Kept to 10⁻⁷ degree (about 1 cm), so the device reads back as it is stored.
            d.lat = Some(entry::round_e7(lat));
            d.lon = Some(entry::round_e7(lon));
        }
        _ => {
            return invalid(
                "lat and lon must be given together, within -90..90 and -180..180".into(),
            )
        }
    }
    if let Some(p) = &d.psk {
        psk::validate(p).map_err(RegistryError::Invalid)?;
    }
    if let Some(s) = &d.secret {
        if s.len() < 8 || s.len() > 256 {
            return invalid("secret: 8 to 256 characters".into());
        }
    }
    if !d.dev_eui.is_empty() {
        match normalise_dev_eui(&d.dev_eui) {
            Some(eui) => d.dev_eui = eui,
            None => return invalid(format!("dev_eui {:?}: 16 hex digits", d.dev_eui)),
        }
    }
    let codec = d.codec.trim();
    if codec.is_empty() || codec.eq_ignore_ascii_case(CODEC_RAW) {
        d.codec = codec.to_ascii_lowercase();
    } else {
        match crate::codec::Format::from_name(codec) {
            Some(f) => d.codec = f.name().to_string(),
            None => {
                return invalid(format!(
                "codec {codec:?}: one of lpp, raw, json, senml+json, senml+cbor, proto (or empty)"
            ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(id: &str) -> NewDevice {
        NewDevice {
            id: id.into(),
            tenant: "hanoi".into(),
            kind: "air_quality".into(),
            ..Default::default()
        }
    }

    async fn registry(dir: &std::path::Path) -> Registry {
        let opts = crate::store::StoreOptions {
            commit_window: std::time::Duration::ZERO,
            max_batch: 1024,
            retention: std::time::Duration::from_secs(86_400),
            ..Default::default()
        };
        let store = Store::open(dir, opts).unwrap();
        Registry::load(store).unwrap()
    }

    #[tokio::test]
    async fn add_authenticate_disable_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let (dev, secret) = reg.add(new("aq-1"), 1000).await.unwrap();
        assert_eq!(dev.id, "aq-1");
        assert!(reg
            .authenticate("aq-1", Some(secret.as_bytes()))
            .await
            .is_ok());
        assert_eq!(
            reg.authenticate("aq-1", Some(b"nope")).await.unwrap_err(),
            AuthError::BadCredentials
        );
        assert_eq!(
            reg.authenticate("aq-1", None).await.unwrap_err(),
            AuthError::BadCredentials
        );
        assert_eq!(
            reg.authenticate("zz", Some(b"x")).await.unwrap_err(),
            AuthError::UnknownDevice
        );
        assert!(matches!(
            reg.add(new("aq-1"), 1).await,
            Err(RegistryError::Exists(_))
        ));

        let mut events = reg.events();
        reg.set_enabled("aq-1", false).await.unwrap();
        assert!(
            matches!(events.recv().await.unwrap(), RegistryEvent::Disabled(id) if id == "aq-1")
        );
        assert_eq!(
            reg.authenticate("aq-1", Some(secret.as_bytes()))
                .await
                .unwrap_err(),
            AuthError::DisabledDevice
        );

        reg.get("aq-1").unwrap().touch(5000);
        assert_eq!(reg.persist_last_seen().await.unwrap(), 1);
        assert_eq!(reg.persist_last_seen().await.unwrap(), 0);
        drop(reg);
        let reg = registry(dir.path()).await;
        let dev = reg.get("aq-1").unwrap().to_proto();
        assert!(!dev.enabled);
        assert_eq!(dev.last_seen_time_ms, 5000);
    }

    #[tokio::test]
    async fn chosen_secret_and_import_results_are_per_row() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut chosen = new("wl-1");
        chosen.secret = Some("correct horse".into());
        let mut bad_kind = new("x-1");
        bad_kind.kind = "teapot".into();
        let results = reg
            .import(vec![chosen, bad_kind, new("wl-1")], 0)
            .await
            .unwrap();
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(RegistryError::Invalid(_))));
        assert!(matches!(results[2], Err(RegistryError::Exists(_))));
        assert!(reg
            .authenticate("wl-1", Some(b"correct horse"))
            .await
            .is_ok());
        // Second time through the fingerprint cache.
        assert!(reg
            .authenticate("wl-1", Some(b"correct horse"))
            .await
            .is_ok());
        assert!(reg
            .authenticate("wl-1", Some(b"correct horsf"))
            .await
            .is_err());
        assert_eq!(reg.list("", "", "", 10).len(), 1);
        assert_eq!(reg.list("other", "", "", 10).len(), 0);
    }

    #[tokio::test]
    async fn psks_are_sealed_and_given_only_for_enabled_devices() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut with_psk = new("nb-1");
        with_psk.psk = Some("a-psk-of-twenty-chars".into());
        // Without a sealing key, PSKs are refused rather than stored in clear.
        assert!(matches!(
            reg.add(with_psk.clone(), 0).await,
            Err(RegistryError::Invalid(_))
        ));
        reg.set_psk_sealer(psk::Sealer::new([3; 32]));
        let (dev, _) = reg.add(with_psk, 0).await.unwrap();
        assert!(dev.has_psk);
        assert_eq!(reg.psk("nb-1").unwrap(), b"a-psk-of-twenty-chars");
        reg.add(new("nb-2"), 0).await.unwrap();
        assert_eq!(reg.psk("nb-2").unwrap_err(), AuthError::BadCredentials);
        assert_eq!(reg.psk("nb-3").unwrap_err(), AuthError::UnknownDevice);
        reg.set_enabled("nb-1", false).await.unwrap();
        assert_eq!(reg.psk("nb-1").unwrap_err(), AuthError::DisabledDevice);
        let mut short = new("nb-4");
        short.psk = Some("short".into());
        assert!(reg.add(short, 0).await.is_err());
    }

    #[tokio::test]
    async fn lists_page_in_id_order_and_credentials_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut chosen = new("b-2");
        chosen.secret = Some("a chosen secret".into());
        chosen.lat = Some(21.0285114999);
        chosen.lon = Some(105.8048);
        let results = reg
            .import(vec![new("c-3"), chosen, new("a-1")], 7)
            .await
            .unwrap();
        let generated = results[0].as_ref().unwrap().1.clone();
        assert_eq!(results[1].as_ref().unwrap().0.lat, Some(21.0285115));
        let ids = |devices: Vec<Device>| devices.into_iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(ids(reg.list("", "", "", 2)), ["a-1", "b-2"]);
        assert_eq!(ids(reg.list("", "", "b-2", 2)), ["c-3"]);
        drop(reg);

        let reg = registry(dir.path()).await;
        assert_eq!(ids(reg.list("", "", "", 10)), ["a-1", "b-2", "c-3"]);
        let mut order = Vec::new();
        reg.for_each(|d| order.push(d.id().to_string()));
        assert_eq!(order, ["a-1", "b-2", "c-3"]);
        assert!(reg
            .authenticate("c-3", Some(generated.as_bytes()))
            .await
            .is_ok());
        assert!(reg
            .authenticate("b-2", Some(b"a chosen secret"))
            .await
            .is_ok());
        assert_eq!(
            reg.authenticate("b-2", Some(generated.as_bytes()))
                .await
                .unwrap_err(),
            AuthError::BadCredentials
        );
        let b = reg.get("b-2").unwrap().to_proto();
        assert_eq!(
            (b.lat, b.lon, b.created_time_ms),
            (Some(21.0285115), Some(105.8048), 7)
        );
    }

    #[tokio::test]
    async fn replicated_records_replace_and_remove_devices_in_every_index() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut lw = new("lw-1");
        lw.dev_eui = "70b3d57ed0000001".into();
        let (dev, secret) = reg.add(lw, 1).await.unwrap();
        reg.get("lw-1").unwrap().touch(5_000);
        let mut events = reg.events();

        // Another node moved the device to another DevEUI and disabled it.
        let mut record = reg.get("lw-1").unwrap().record();
        record.dev_eui = "70b3d57ed0000002".into();
        record.enabled = false;
        record.last_seen_time_ms = 10;
        reg.apply_record(&dev.id, Some(&serde_json::to_vec(&record).unwrap()));
        assert!(reg.by_dev_eui("70b3d57ed0000001").is_none());
        let moved = reg.by_dev_eui("70b3d57ed0000002").unwrap();
        assert_eq!(moved.last_seen_ms(), 5_000, "last seen never goes back");
        assert!(!moved.enabled());
        assert!(
            matches!(events.recv().await.unwrap(), RegistryEvent::Disabled(id) if id == "lw-1")
        );
        assert_eq!(
            reg.authenticate("lw-1", Some(secret.as_bytes()))
                .await
                .unwrap_err(),
            AuthError::DisabledDevice
        );
        // Live state only: the same entry, enabled again.
        record.enabled = true;
        reg.apply_record(&dev.id, Some(&serde_json::to_vec(&record).unwrap()));
        assert!(Arc::ptr_eq(&moved, &reg.get("lw-1").unwrap()));
        assert!(reg
            .authenticate("lw-1", Some(secret.as_bytes()))
            .await
            .is_ok());

        reg.apply_record(&dev.id, None);
        assert!(reg.get("lw-1").is_none() && reg.by_dev_eui("70b3d57ed0000002").is_none());
        assert!(reg.list("", "", "", 10).is_empty() && reg.is_empty());
        reg.apply_record("x", Some(b"not json"));
        assert!(reg.is_empty());
    }

    #[test]
    fn ids_must_be_safe_topic_levels() {
        for bad in ["", "a/b", "a+b", "a#", "a b", "ä"] {
            assert!(validate(&mut new(bad)).is_err(), "{bad:?}");
        }
        assert!(validate(&mut new("HN-aq_01.x:1")).is_ok());
    }

    #[tokio::test]
    async fn dev_eui_is_normalised_unique_and_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut a = new("lw-1");
        a.dev_eui = "70-B3-D5-7E-D0-00-00-01".into();
        a.codec = "LPP".into();
        let mut dup = new("lw-2");
        dup.dev_eui = "70b3d57ed0000001".into();
        let mut bad = new("lw-3");
        bad.dev_eui = "70b3d57ed00000".into();
        let mut bad_codec = new("lw-4");
        bad_codec.codec = "xml".into();
        let results = reg.import(vec![a, dup, bad, bad_codec], 0).await.unwrap();
        let dev = &results[0].as_ref().unwrap().0;
        assert_eq!(
            (dev.dev_eui.as_str(), dev.codec.as_str()),
            ("70b3d57ed0000001", "lpp")
        );
        for r in &results[1..] {
            assert!(matches!(r, Err(RegistryError::Invalid(_))), "{r:?}");
        }
        assert_eq!(reg.by_dev_eui("70b3d57ed0000001").unwrap().id(), "lw-1");
        drop(reg);
        let reg = registry(dir.path()).await;
        assert_eq!(reg.by_dev_eui("70b3d57ed0000001").unwrap().codec(), "lpp");
    }

    #[test]
    fn records_without_lorawan_fields_still_load() {
        let old = r#"{"id":"aq-0","tenant":"hanoi","kind":"air_quality","lat":null,"lon":null,
            "enabled":true,"created_time_ms":1,"secret_hash":"x"}"#;
        let r: Record = serde_json::from_str(old).unwrap();
        assert_eq!((r.dev_eui.as_str(), r.codec.as_str()), ("", ""));
    }
}
