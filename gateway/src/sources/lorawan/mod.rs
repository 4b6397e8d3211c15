//! LoRaWAN backhaul: bridges to the MQTT brokers of LoRaWAN network servers.
//!
//! A network server (ChirpStack v4, The Things Stack v3) handles radio, keys and its own
//! de-duplication across gateways, then publishes each device event on its broker. For every
//! `[[lorawan]]` entry the gateway connects to that broker as an MQTT client (rumqttc) with a
//! fixed client id and a persistent session (clean_session = false), subscribes at QoS 1, and
//! turns each event into readings of the registered device with that DevEUI:
//!
//! ```text
//!  broker --PUBLISH--> chirpstack.rs / tts.rs --Event--> registry (DevEUI -> device)
//!         <--PUBACK--  (after the readings are fsync'd)   event.rs: payload codec + radio metadata
//!                                                         dedup.rs: stored once -> pipeline
//! ```
//!
//! Acknowledgements are manual: the PUBACK goes out only after the readings (or the dead letter)
//! are durable, so a crash never loses an uplink the broker handed over; the broker redelivers
//! what was not acknowledged, and [`dedup`] stores each event once. Up to `max_inflight` uplinks
//! are decoded and stored side by side (they share group commits), and their PUBACKs leave in
//! the order the broker delivered them (MQTT 3.1.1 and 5 section 4.6), released by one acker
//! task as each uplink and every one before it is done ([`Acks`]).
//!
//! In cluster mode one node at a time bridges each network server, the holder of its lease, with
//! the same client id on every node: when the holder dies, the next holder resumes the broker
//! session and gets what was queued or unacknowledged (stored once by the stream's content id).
//!
//! The same connection carries commands to the devices the other way: the command transport
//! (control/commands/transport/lorawan.rs) publishes downlinks through it while it is connected,
//! learns each device's application from its events' topics, and takes the network server's
//! downlink reports (`txack`/`ack`, `down/*`), which this bridge parses and hands over.

pub mod chirpstack;
pub mod config;
pub mod dedup;
pub mod event;
pub mod tts;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::control::commands::transport::lorawan::{Link, Lorawan, Route};
use crate::control::commands::Commands;
use crate::pipeline::{now_ms, Delivery, IngestError, Pipeline, Rejection};
use crate::proto::Protocol;
use crate::registry::{DeviceEntry, Registry};

use crate::reason;
use config::{LorawanConfig, ServerType};
use dedup::{Dedup, Key, Stored};
use event::{DeviceRef, DownlinkEvent, Event, Malformed, Parsed};

/// How long in-flight uplinks get to become durable and be acknowledged at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest event read: a LoRaWAN payload is at most 242 bytes, an event with its metadata a few
/// KiB. Anything larger is dead-lettered as `payload_too_large`.
const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Largest packet the MQTT client accepts. Far above [`MAX_EVENT_BYTES`] on purpose: a packet
/// over the client's limit drops the connection, the broker redelivers it on reconnect, and the
/// bridge would be stuck; below this limit an oversized event is dead-lettered and acknowledged.
const MAX_PACKET_BYTES: usize = 256 * 1024 * 1024;

/// One network server bridge.
pub struct LorawanSource {
    pub config: LorawanConfig,
    pub registry: Registry,
    pub pipeline: Pipeline,
    /// Cluster mode: bridge only while this node holds the server's lease. Every node uses the
    /// same client id, so the successor of a dead node resumes its broker session and receives
    /// what the broker still held for it (queued, or delivered but never acknowledged).
    pub lease: Option<watch::Receiver<bool>>,
    /// Commands to this server's devices (None: `downlinks = false`, a read-only bridge).
    pub downlinks: Option<Downlinks>,
}

/// The command transport a bridge sends downlinks for and reports to.
#[derive(Clone)]
pub struct Downlinks {
    pub transport: Arc<Lorawan>,
    pub commands: Commands,
}

impl super::Source for LorawanSource {
    fn name(&self) -> &'static str {
        "lorawan"
    }

    fn start(
        self: Box<Self>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>> {
        let cfg = &self.config;
        cfg.validate()?;
        let mut opts = MqttOptions::new(cfg.client_id(), cfg.host.clone(), cfg.port());
        opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.max(5)))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        if !cfg.username.is_empty() {
            opts.set_credentials(cfg.username.clone(), cfg.password()?);
        }
        if cfg.tls {
            opts.set_transport(tls::transport(cfg)?);
        }
        // Room for every in-flight ack plus the subscriptions, so acking never waits on the loop.
        let capacity = cfg.max_inflight + 64;
        let bridge = Arc::new(Bridge {
            name: cfg.name.clone(),
            server_type: cfg.server_type,
            marshaler: cfg.marshaler,
            tenant: cfg.tenant.clone(),
            registry: self.registry.clone(),
            pipeline: self.pipeline.clone(),
            dedup: Dedup::new(Duration::from_secs(cfg.dedup_window_secs)),
            downlinks: self.downlinks.clone().filter(|_| cfg.downlinks),
        });
        tracing::info!(server = %cfg.name, host = %cfg.host, port = cfg.port(), tls = cfg.tls,
            client_id = %cfg.client_id(), "lorawan bridge starting");
        let (config, lease) = (self.config, self.lease);
        Ok(Box::pin(async move {
            let Some(lease) = lease else {
                let (client, eventloop) = AsyncClient::new(opts, capacity);
                return run(bridge, client, eventloop, config, shutdown).await;
            };
            run_while_leased(bridge, opts, capacity, config, lease, shutdown).await
        }))
    }
}

/// Cluster mode: waits for the lease, bridges while it is held, hands over when it is lost.
async fn run_while_leased(
    bridge: Arc<Bridge>,
    opts: MqttOptions,
    capacity: usize,
    config: LorawanConfig,
    mut lease: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = config.name.clone();
    loop {
        while !*lease.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changed = lease.changed() => if changed.is_err() { return Ok(()) },
            }
        }
        tracing::info!(server = %server, "lorawan bridge active on this node (lease held)");
        let stop = shutdown.child_token();
        let lost = {
            let (stop, mut lease) = (stop.clone(), lease.clone());
            tokio::spawn(async move {
                while *lease.borrow_and_update() {
                    if lease.changed().await.is_err() {
                        break;
                    }
                }
                stop.cancel();
            })
        };
        let (client, eventloop) = AsyncClient::new(opts.clone(), capacity);
        let result = run(bridge.clone(), client, eventloop, config.clone(), stop).await;
        lost.abort();
        if result.is_err() || shutdown.is_cancelled() {
            return result;
        }
        tracing::warn!(server = %server, "lorawan bridge handed over (lease lost)");
    }
}

struct Bridge {
    name: String,
    server_type: ServerType,
    marshaler: config::Marshaler,
    tenant: String,
    registry: Registry,
    pipeline: Pipeline,
    dedup: Dedup,
    downlinks: Option<Downlinks>,
}

async fn run(
    bridge: Arc<Bridge>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    cfg: LorawanConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = cfg.name.clone();
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight));
    let mut tasks = JoinSet::new();
    let mut acks = Acks::start(client.clone());
    let backoff_min = Duration::from_millis(cfg.backoff_min_ms.max(1));
    let backoff_max = Duration::from_millis(cfg.backoff_max_ms).max(backoff_min);
    let mut backoff = backoff_min;
    let topics = cfg.topics();
    let connected = metrics::gauge!("citygw_lorawan_connected", "server" => server.clone());
    // Downlinks go out through this client while it is connected (and not after this run,
    // however it ends).
    let link = bridge.downlinks.as_ref().map(|d| Linked {
        downlinks: d.clone(),
        link: Link::new(&cfg, client.clone()),
    });
    loop {
        // Finished tasks are only reaped here; their results are their own metrics.
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = inflight.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let polled = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match polled {
            Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                let bridge = bridge.clone();
                let done = acks.next();
                tasks.spawn(async move {
                    let ack = bridge.handle(&publish).await;
                    // The slot frees when the uplink is handled, not when its ack has gone out:
                    // acks leave only while this loop polls the event loop, which takes a slot.
                    drop(permit);
                    let _ = done.send(ack.then(|| ack_of(&publish)));
                });
            }
            Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                backoff = backoff_min;
                connected.set(1.0);
                metrics::counter!("citygw_lorawan_connects_total", "server" => server.clone())
                    .increment(1);
                tracing::info!(server = %server, session_present = ack.session_present, "lorawan broker connected");
                // Subscribing again on a kept session only refreshes it; a lost session (broker
                // restarted without persistence) needs it.
                for topic in &topics {
                    client
                        .subscribe(topic.clone(), QoS::AtLeastOnce)
                        .await
                        .map_err(|e| anyhow::anyhow!("lorawan {server}: subscribe: {e}"))?;
                }
                if let Some(l) = &link {
                    l.downlinks
                        .transport
                        .link(&l.downlinks.commands, l.link.clone());
                }
            }
            // Our downlinks: numbered by the client, then acknowledged by the broker.
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                if let Some(l) = &link {
                    l.link.outgoing_publish(pkid);
                }
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::AwaitAck(pkid))) => {
                if let Some(l) = &link {
                    l.link.collided(pkid);
                }
            }
            Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                if let Some(l) = &link {
                    l.link.puback(ack.pkid);
                }
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!(server = %server, "lorawan broker refused a subscription (check the topic filters and ACLs)");
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected.set(0.0);
                if let Some(l) = &link {
                    l.link.disconnected();
                }
                metrics::counter!("citygw_lorawan_connection_errors_total", "server" => server.clone())
                    .increment(1);
                tracing::warn!(server = %server, error = %e, retry_in_ms = backoff.as_millis() as u64, "lorawan broker connection failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(backoff_max);
            }
        }
    }
    // Let in-flight uplinks become durable and their acks go out; publishes that arrive now are
    // left unacknowledged for the broker to redeliver to the next run.
    let acker = acks.close();
    tokio::pin!(acker);
    let drain = async {
        loop {
            tokio::select! {
                _ = &mut acker => break,
                e = eventloop.poll() => if e.is_err() { break },
            }
        }
        let _ = client.disconnect().await;
        while let Ok(e) = eventloop.poll().await {
            if matches!(e, MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    };
    drop(link);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    tasks.abort_all();
    acker.abort();
    connected.set(0.0);
    tracing::info!(server = %server, "lorawan bridge stopped");
    Ok(())
}

/// A run's downlink connection, taken back from the transport when the run ends.
struct Linked {
    downlinks: Downlinks,
    link: Arc<Link>,
}

impl Drop for Linked {
    fn drop(&mut self) {
        self.downlinks.transport.unlink(&self.link);
    }
}

/// The bridge's PUBACKs, in the order the broker delivered the uplinks.
///
/// Each uplink is handled on its own task; [`Acks::next`] (called in delivery order) hands it a
/// channel for its outcome. One acker task takes those outcomes in the same order and acks each
/// uplink once it and all before it are done, so an uplink that finishes early (an ignored event,
/// a dead letter) waits for the ones before it. rumqttc sends acks in the order
/// `AsyncClient::ack` is called. What waits for its turn is the packet id, not the payload.
struct Acks {
    order: mpsc::UnboundedSender<oneshot::Receiver<Option<Publish>>>,
    acker: JoinHandle<()>,
}

impl Acks {
    fn start(client: AsyncClient) -> Self {
        let (order, mut rx) = mpsc::unbounded_channel::<oneshot::Receiver<Option<Publish>>>();
        let acker = tokio::spawn(async move {
            while let Some(outcome) = rx.recv().await {
                // A task aborted at shutdown drops its sender: nothing to ack.
                if let Ok(Some(publish)) = outcome.await {
                    // Fails only when the event loop is gone (shutdown); the broker then
                    // redelivers, and dedup stores nothing twice.
                    let _ = client.ack(&publish).await;
                }
            }
        });
        Acks { order, acker }
    }

    /// Takes the next uplink in delivery order; its task sends the outcome on the returned
    /// channel: what to acknowledge, or None to leave the uplink for redelivery.
    fn next(&mut self) -> oneshot::Sender<Option<Publish>> {
        let (tx, rx) = oneshot::channel();
        // The acker only ends after `close`, so the send cannot fail before it.
        let _ = self.order.send(rx);
        tx
    }

    /// No more uplinks: the returned task ends once every uplink taken has been acked or left.
    fn close(self) -> JoinHandle<()> {
        self.acker
    }
}

/// What acknowledging an uplink needs: its packet id and QoS.
fn ack_of(publish: &Publish) -> Publish {
    let mut ack = Publish::new("", publish.qos, Vec::new());
    ack.pkid = publish.pkid;
    ack
}

/// What became of one message, for `citygw_lorawan_messages_total`.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Stored,
    Duplicate,
    DeadLetter,
    Ignored,
    /// A downlink report, handed to the command transport.
    Report,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLetter => "dead_letter",
            Outcome::Ignored => "ignored",
            Outcome::Report => "report",
        }
    }
}

impl Bridge {
    /// Handles one message; returns whether to acknowledge it (false: the store is unavailable,
    /// so the broker keeps it for a redelivery).
    async fn handle(&self, publish: &Publish) -> bool {
        let parsed = if publish.payload.len() > MAX_EVENT_BYTES {
            Err(Malformed {
                device: Default::default(),
                rejection: Rejection::new(
                    reason::PAYLOAD_TOO_LARGE,
                    format!("{} bytes, limit {MAX_EVENT_BYTES}", publish.payload.len()),
                ),
            })
        } else {
            match self.server_type {
                ServerType::ChirpstackV4 => {
                    chirpstack::parse(&publish.topic, &publish.payload, self.marshaler)
                }
                ServerType::TtnV3 => tts::parse(&publish.topic, &publish.payload),
            }
        };
        let (event_label, result) = match parsed {
            Ok(Parsed::Ignored(kind)) => (kind, Ok(Outcome::Ignored)),
            Ok(Parsed::Event(event)) => (event.kind.label(), self.record(publish, &event).await),
            Ok(Parsed::Downlink(report)) => ("downlink", self.report(&report).await),
            Err(Malformed { device, rejection }) => {
                self.dead_letter(device.claimed(), publish, &publish.payload, &rejection)
                    .await;
                ("malformed", Ok(Outcome::DeadLetter))
            }
        };
        match result {
            Ok(outcome) => {
                metrics::counter!("citygw_lorawan_messages_total", "server" => self.name.clone(),
                    "event" => event_label, "outcome" => outcome.label())
                .increment(1);
                true
            }
            Err(e) => {
                if !matches!(&e, IngestError::Store(e) if e.is_refusal()) {
                    tracing::error!(server = %self.name, topic = %crate::observability::clip(&publish.topic), error = %e,
                        "lorawan event not stored; left unacknowledged for redelivery");
                }
                false
            }
        }
    }

    async fn record(&self, publish: &Publish, event: &Event) -> Result<Outcome, IngestError> {
        let device = match self.device(&event.device) {
            Ok(d) => d,
            Err((device_id, rejection)) => {
                if rejection.reason == reason::UNKNOWN_DEVICE {
                    metrics::counter!("citygw_lorawan_unknown_devices_total", "server" => self.name.clone())
                        .increment(1);
                }
                self.dead_letter(&device_id, publish, &publish.payload, &rejection)
                    .await;
                return Ok(Outcome::DeadLetter);
            }
        };
        self.learn_route(&device, &event.device).await?;
        let now = now_ms();
        let decoded = match event::readings(&device, event, now) {
            Ok(d) => d,
            Err((rejection, bytes)) => {
                self.dead_letter(device.id(), publish, &bytes, &rejection)
                    .await;
                return Ok(Outcome::DeadLetter);
            }
        };
        let (marker, seq) = event.kind.marker();
        let key = Key {
            device_id: device.id().to_string(),
            marker,
            // Without the server's time a redelivery cannot be told from a new event by the
            // store; memory still catches it within the window.
            time_ms: event.time_ms.unwrap_or(i64::MIN),
            seq,
        };
        let size = publish.payload.len();
        // In cluster mode the same event taken by another node (a redelivery after a node
        // died) is stored once by JetStream as well.
        let content_id = format!(
            "lorawan/{}/{}/{}/{}",
            key.device_id,
            key.marker,
            key.time_ms,
            key.seq.map_or_else(String::new, |s| s.to_string())
        );
        let stored = self
            .dedup
            .once(self.pipeline.store(), key, || async {
                self.pipeline
                    .ingest_decoded(
                        &device,
                        Protocol::Lorawan,
                        size,
                        decoded,
                        Delivery::Durable,
                        Some(&content_id),
                    )
                    .await
                    .map(|_| ())
            })
            .await?;
        Ok(match stored {
            Stored::Now => Outcome::Stored,
            Stored::Before => Outcome::Duplicate,
        })
    }

    /// Where the device's downlinks go, from the topic of its event: durable before the event
    /// is acknowledged (once per change).
    async fn learn_route(&self, device: &DeviceEntry, r: &DeviceRef) -> Result<(), IngestError> {
        let Some(d) = &self.downlinks else {
            return Ok(());
        };
        let route = Route {
            server: self.name.clone(),
            application: r.application.clone(),
            device: match self.server_type {
                ServerType::ChirpstackV4 => r.dev_eui.clone(),
                ServerType::TtnV3 => r.device_id.clone(),
            },
        };
        Ok(d.transport.learn(&d.commands, device.id(), route).await?)
    }

    /// A network server's report on a downlink: to the command transport, for the registered
    /// device its topic names; counted by outcome whatever it is.
    async fn report(&self, report: &DownlinkEvent) -> Result<Outcome, IngestError> {
        let outcome = match (&self.downlinks, self.device(&report.device)) {
            (None, _) => "no_downlinks",
            (_, Err((_, r))) if r.reason == reason::UNKNOWN_DEVICE => "unknown_device",
            (_, Err(_)) => "wrong_device",
            (Some(d), Ok(device)) => {
                d.transport
                    .report(&d.commands, &self.name, device.id(), report)
                    .await?
            }
        };
        metrics::counter!("citygw_lorawan_downlink_reports_total", "server" => self.name.clone(),
            "report" => report.kind.label(), "outcome" => outcome)
        .increment(1);
        Ok(Outcome::Report)
    }

    /// The registered device an event names, or the id to file the dead letter under (the
    /// device's own when it is registered, else the DevEUI or TTS id it was named by) and why.
    fn device(&self, r: &DeviceRef) -> Result<Arc<DeviceEntry>, (String, Rejection)> {
        let found = if r.dev_eui.is_empty() {
            // TTS without a DevEUI (ABP devices may have none): the TTS device id.
            self.registry.get(&r.device_id)
        } else {
            self.registry.by_dev_eui(&r.dev_eui)
        };
        let device = found.ok_or_else(|| {
            let rejection = Rejection::new(
                reason::UNKNOWN_DEVICE,
                format!(
                    "no device registered with {} {}",
                    if r.dev_eui.is_empty() {
                        "id"
                    } else {
                        "dev_eui"
                    },
                    r.claimed()
                ),
            );
            (r.claimed().to_string(), rejection)
        })?;
        let refuse = |rejection| Err((device.id().to_string(), rejection));
        if !device.enabled() {
            return refuse(Rejection::new(
                reason::DISABLED_DEVICE,
                format!("device {} is disabled", device.id()),
            ));
        }
        if !self.tenant.is_empty() && device.tenant() != self.tenant {
            return refuse(Rejection::new(
                reason::TENANT_MISMATCH,
                format!(
                    "device {} belongs to tenant {}, this network server to {}",
                    device.id(),
                    device.tenant(),
                    self.tenant
                ),
            ));
        }
        Ok(device)
    }

    async fn dead_letter(
        &self,
        device_id: &str,
        publish: &Publish,
        bytes: &[u8],
        rejection: &Rejection,
    ) {
        metrics::counter!("citygw_lorawan_dead_letters_total", "server" => self.name.clone(),
            "reason" => rejection.reason.as_str())
        .increment(1);
        let address = format!("{}: {}", self.name, publish.topic);
        self.pipeline
            .refuse(
                device_id,
                Protocol::Lorawan,
                &address,
                Some(bytes),
                publish.payload.len(),
                rejection,
            )
            .await;
    }
}

mod tls {
    use anyhow::Context as _;

    use super::LorawanConfig;

    /// rustls on ring (already in the gateway's dependency tree, no C toolchain needed),
    /// verifying the broker's certificate and host name against the configured CA file, or the
    /// system's roots when there is none.
    pub fn transport(cfg: &LorawanConfig) -> anyhow::Result<rumqttc::Transport> {
        let config = crate::tls::client_config(cfg.ca_file.as_deref())
            .with_context(|| format!("lorawan {}: ca_file", cfg.name))?;
        Ok(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            config,
        )))
    }
}
