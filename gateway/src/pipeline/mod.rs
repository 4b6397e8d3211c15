//! identity check -> decode -> normalise -> durable store.
//!
//! Every source hands the pipeline an authenticated device and raw bytes; whatever the protocol,
//! the same rules decide what is stored and what is refused, and a refusal always leaves a
//! dead-letter record and a counter behind.

pub mod clock;
pub mod normalise;

use std::sync::Arc;
use std::time::Instant;

use crate::codec::{self, Format};
use crate::proto::{DeadLetter, Protocol, Reading};
use crate::reason::{self, Reason};
use crate::registry::DeviceEntry;
use crate::store::{Store, StoreError};

/// Bytes of a refused payload kept in its dead-letter record.
const DEAD_LETTER_HEAD: usize = 1024;
/// Characters of a dead letter's address (the topic or path the sender chose) and detail kept.
const DEAD_LETTER_TEXT: usize = 256;

/// Refused messages logged per minute; the rest is counted (and dead-lettered).
static REJECT_LOG: crate::observability::LogLimiter =
    crate::observability::LogLimiter::new(120, std::time::Duration::from_secs(60));

/// Whether the sender waits for the reading to be on disk (MQTT QoS 1, CoAP CON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Durable,
    BestEffort,
}

/// A refused message: `reason` is a stable code from [`crate::reason`] (metrics, dead letters, docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The message itself is at fault; the device should not retry it unchanged.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The gateway could not make the data durable; the device should retry.
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
}

/// One message from an authenticated device.
pub struct Inbound<'a> {
    pub device: &'a DeviceEntry,
    pub protocol: Protocol,
    /// `Err(name)` when the message named a format the gateway does not know.
    pub format: Result<Format, &'a str>,
    /// Where it arrived (topic, path), for the dead-letter record.
    pub address: &'a str,
    pub payload: &'a [u8],
    pub delivery: Delivery,
    /// What identifies this message across retries, where its content does (a CoAP exchange);
    /// in cluster mode a retry on another node is then stored once (see
    /// [`Store::append_identified`]). None for MQTT, whose packet ids are per connection.
    pub content_id: Option<String>,
}

#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    max_payload_bytes: usize,
    clock: clock::DeviceClock,
}

impl Pipeline {
    pub fn new(store: Store, max_payload_bytes: usize) -> Self {
        Self::with_device_clock(store, max_payload_bytes, clock::DeviceClock::default())
    }

    /// With a policy for device timestamps other than the default (see [`clock`]).
    pub fn with_device_clock(
        store: Store,
        max_payload_bytes: usize,
        clock: clock::DeviceClock,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                max_payload_bytes,
                clock,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Decodes, normalises and stores one message. With [`Delivery::Durable`] it returns only
    /// once the readings are fsync'd; refusals are dead-lettered (durably) before returning.
    pub async fn ingest(&self, msg: Inbound<'_>) -> Result<usize, IngestError> {
        let started = Instant::now();
        let protocol = protocol_label(msg.protocol);
        count_received(protocol, msg.payload.len());
        let now_ms = now_ms();
        let readings = match self.readings(&msg, now_ms) {
            Ok(r) => r,
            Err(rejection) => {
                self.dead_letter(
                    msg.device.id(),
                    msg.protocol,
                    msg.address,
                    Some(msg.payload),
                    &rejection,
                )
                .await;
                return Err(rejection.into());
            }
        };
        self.store_readings(
            msg.device,
            msg.protocol,
            readings,
            (msg.delivery, msg.content_id.as_deref()),
            now_ms,
            started,
        )
        .await
    }

    /// Stores values a source decoded itself (a bridge whose events carry several kinds of
    /// values, e.g. a LoRaWAN uplink's payload and its radio metadata), with the same identity,
    /// normalisation and durability as [`Pipeline::ingest`]. Counted as one received message of
    /// `size` bytes; refusals before this point go through [`Pipeline::refuse`].
    pub async fn ingest_decoded(
        &self,
        device: &DeviceEntry,
        protocol: Protocol,
        size: usize,
        decoded: Vec<codec::Decoded>,
        delivery: Delivery,
        content_id: Option<&str>,
    ) -> Result<usize, IngestError> {
        let started = Instant::now();
        count_received(protocol_label(protocol), size);
        let now_ms = now_ms();
        let readings = to_readings(device, protocol, decoded, now_ms, &self.inner.clock);
        self.store_readings(
            device,
            protocol,
            readings,
            (delivery, content_id),
            now_ms,
            started,
        )
        .await
    }

    async fn store_readings(
        &self,
        device: &DeviceEntry,
        protocol: Protocol,
        readings: Vec<Reading>,
        (delivery, content_id): (Delivery, Option<&str>),
        now_ms: i64,
        started: Instant,
    ) -> Result<usize, IngestError> {
        let n = readings.len();
        match delivery {
            Delivery::Durable => {
                self.inner
                    .store
                    .append_identified(readings, content_id)
                    .await?;
            }
            Delivery::BestEffort => self.inner.store.append_best_effort(readings),
        }
        device.touch(now_ms);
        device.reported_over(protocol);
        metrics::histogram!("citygw_ingest_seconds", "protocol" => protocol_label(protocol))
            .record(started.elapsed().as_secs_f64());
        Ok(n)
    }

    fn readings(&self, msg: &Inbound<'_>, now_ms: i64) -> Result<Vec<Reading>, Rejection> {
        if msg.payload.len() > self.inner.max_payload_bytes {
            return Err(Rejection::new(
                reason::PAYLOAD_TOO_LARGE,
                format!(
                    "{} bytes, limit {}",
                    msg.payload.len(),
                    self.inner.max_payload_bytes
                ),
            ));
        }
        let format = msg.format.map_err(|name| {
            Rejection::new(
                reason::UNKNOWN_FORMAT,
                format!("unknown payload format {name:?}"),
            )
        })?;
        let decoded = codec::decoder(format)
            .decode(msg.payload, now_ms)
            .map_err(|e| Rejection {
                reason: e.reason,
                detail: e.detail,
            })?;
        Ok(to_readings(
            msg.device,
            msg.protocol,
            decoded,
            now_ms,
            &self.inner.clock,
        ))
    }

    /// Refuses a message before decoding (wrong topic, spoofed identity): counted as received,
    /// then dead-lettered. `payload` is None where keeping the bytes would itself be wrong.
    pub async fn refuse(
        &self,
        device_id: &str,
        protocol: Protocol,
        address: &str,
        payload: Option<&[u8]>,
        size: usize,
        rejection: &Rejection,
    ) {
        count_received(protocol_label(protocol), size);
        self.dead_letter(device_id, protocol, address, payload, rejection)
            .await;
    }

    /// Dead-letters a stored reading that a downstream system refused (a forwarder's sink);
    /// the record carries the reading itself, protobuf-encoded.
    pub async fn dead_letter_reading(
        &self,
        r: &Reading,
        protocol: Protocol,
        rejection: &Rejection,
    ) {
        let payload = prost::Message::encode_to_vec(r);
        let address = format!("reading {}", r.id);
        self.dead_letter(&r.device_id, protocol, &address, Some(&payload), rejection)
            .await;
    }

    /// Records a refusal: counter, log line and a durable dead-letter record.
    async fn dead_letter(
        &self,
        device_id: &str,
        protocol: Protocol,
        address: &str,
        payload: Option<&[u8]>,
        rejection: &Rejection,
    ) {
        use crate::observability::{clip, clip_at};
        let label = protocol_label(protocol);
        metrics::counter!("citygw_messages_rejected_total", "protocol" => label, "reason" => rejection.reason.as_str())
            .increment(1);
        if let Some(suppressed) = REJECT_LOG.allow() {
            tracing::warn!(device = device_id, protocol = label, address = %clip(address), reason = rejection.reason.as_str(), detail = %clip_at(&rejection.detail, DEAD_LETTER_TEXT), suppressed, "message rejected");
        }
        let dl = DeadLetter {
            id: 0,
            received_time_ms: now_ms(),
            device_id: device_id.to_string(),
            protocol: protocol as i32,
            reason: rejection.reason.to_string(),
            detail: clip_at(&rejection.detail, DEAD_LETTER_TEXT).to_string(),
            address: clip_at(address, DEAD_LETTER_TEXT).to_string(),
            payload_head: payload
                .map(|p| p[..p.len().min(DEAD_LETTER_HEAD)].to_vec())
                .unwrap_or_default(),
            payload_size: payload.map_or(0, |p| p.len() as u64),
        };
        match self.inner.store.dead_letter(dl).await {
            Err(e) if !e.is_refusal() => {
                tracing::error!(error = %e, device = device_id, "could not store dead letter")
            }
            _ => {}
        }
    }
}

/// Decoded values become readings: identity from the registry, names through the quantity table.
fn to_readings(
    device: &DeviceEntry,
    protocol: Protocol,
    decoded: Vec<codec::Decoded>,
    now_ms: i64,
    clock: &clock::DeviceClock,
) -> Vec<Reading> {
    let device_location = device.location();
    let label = protocol_label(protocol);
    decoded
        .into_iter()
        .map(|d| {
            let (quantity, unit) = normalise::canonical(&d.quantity, &d.unit);
            Reading {
                id: 0,
                device_id: device.id().to_string(),
                tenant: device.tenant().to_string(),
                quantity: quantity.into_owned(),
                value: Some(d.value),
                unit: unit.into_owned(),
                device_time_ms: clock.device_time(d.time_ms, now_ms, label),
                received_time_ms: now_ms,
                protocol: protocol as i32,
                location: d.location.or(device_location),
                commune_code: device.commune_code().to_string(),
                device_seq: d.seq,
                kind: device.kind().to_string(),
                aggregate: None,
            }
        })
        .collect()
}

fn count_received(protocol: &'static str, bytes: usize) {
    metrics::counter!("citygw_messages_received_total", "protocol" => protocol).increment(1);
    metrics::counter!("citygw_bytes_received_total", "protocol" => protocol)
        .increment(bytes as u64);
}

pub fn protocol_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Mqtt => "mqtt",
        Protocol::Coap => "coap",
        Protocol::Lwm2m => "lwm2m",
        Protocol::Lorawan => "lorawan",
        Protocol::Unspecified => "unspecified",
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
