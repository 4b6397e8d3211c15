//! MQTT 5 driver: one connection per device (client id = username = device id), one message per
//! interval on `devices/{id}/telemetry/{format}`, QoS from the scenario.
//!
//! MQTT 5 so a refusal is visible: the gateway answers a refused payload with PUBACK 0x99 (and a
//! spoofed topic with 0x87), counted here as `rejected` by reason code. A message counts as
//! acknowledged only on PUBACK success; messages in flight when a connection drops are counted
//! `unconfirmed` and not sent again (the gateway may or may not have stored them — `verify`
//! reports such readings separately, never as errors).
//!
//! Each device speaks MQTT through [`Link`]: rumqttc's packet codec over a plain `TcpStream`, not
//! rumqttc's `EventLoop`. The event loop is made for a busy client (100-slot event and request
//! queues, a packet-id bitset of 64 Ki entries, 10 KiB buffers): ~74 KiB per connection, so one
//! load host could not drive 100,000 devices. A device here sends one small message every few
//! seconds and has at most a handful in flight; its session is a few hundred bytes of buffers
//! and a small in-flight table (docs/decisions/0016-device-sim-mqtt-sessions.md).
//!
//! In a scenario with `commands = true`, a device whose profile has a command set (street
//! lights) also subscribes to `devices/{id}/commands/+` after every connect, acknowledges each
//! command, carries it out ([`Lamp`]) and answers on `devices/{id}/commands/{command_id}/result`
//! at QoS 1. Devices that take no commands carry nothing for it but an empty `Option`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, Login, Packet, PingReq,
    PubAck, PubAckReason, Publish, SubAck, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::lamp::Lamp;
use super::sample::Sampler;
use crate::run::{AckRecord, DriverContext, RunStats};
use crate::scenario::profiles::CommandSet;
use crate::scenario::SimDevice;

const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Largest packet accepted from the gateway (CONNACK, PUBACK, PINGRESP, DISCONNECT; SUBACK
/// and commands to devices that take them).
const MAX_INCOMING: u32 = 64 * 1024;
/// Unacknowledged QoS 1 messages one device may have; a device reporting every few seconds
/// needs one.
const MAX_INFLIGHT: usize = 16;

/// What a message carried, kept until its acknowledgement.
struct Sent {
    pkid: u16,
    device_time_ms: u64,
    readings: u64,
    at: Instant,
}

pub async fn run_device(dev: SimDevice, secret: String, ctx: Arc<DriverContext>) {
    tokio::time::sleep_until(ctx.connect_at(dev.index)).await;
    if Instant::now() >= ctx.end() {
        return;
    }
    let stats = &ctx.stats;
    let host = &ctx.mqtt_hosts[dev.index % ctx.mqtt_hosts.len()];

    let permit = ctx.connect_permits.acquire().await;
    let first = Link::connect(host, ctx.mqtt_port, &dev.id, &secret, ctx.connect_timeout).await;
    drop(permit);
    let mut link = match first {
        Ok(link) => link,
        Err(e) => {
            stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            stats.count_reason(e.reason());
            stats.note_error(format!("{}: {e}", dev.id));
            return;
        }
    };

    let profile = &ctx.scenario.profiles[&dev.profile];
    let mut lamp = (ctx.scenario.commands && profile.commands == Some(CommandSet::Lamp))
        .then(|| Box::new(Lamp::new(profile)));
    if lamp.is_some() {
        if let Err(e) = link.subscribe_commands(&dev.id).await {
            stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            stats.note_error(format!("{}: subscribe: {e}", dev.id));
            return;
        }
    }
    stats.opened();
    let quantities = super::ack_log_quantities(profile);
    let device_id: Arc<str> = dev.id.as_str().into();
    let topic = Bytes::from(dev.format.topic(&dev.id));
    let qos = if ctx.scenario.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let mut sampler = Sampler::new(&dev, &ctx.scenario);
    let mut next = sampler.first_report();
    let mut seq = 0u64;
    // Oldest first: PUBACKs come in publish order (MQTT 5 §4.6).
    let mut inflight: Vec<Sent> = Vec::new();
    let mut connected = true;

    loop {
        let reporting = next < ctx.end();
        let deadline = if reporting {
            next
        } else {
            ctx.end() + ctx.drain
        };
        if !reporting && inflight.is_empty() {
            break;
        }
        let ping_at = link.last_sent + KEEP_ALIVE;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                if !reporting {
                    break;
                }
                next += dev.interval;
                let ts_s = sampler.sample();
                if let Some(lamp) = &lamp {
                    lamp.apply(&mut sampler.values);
                }
                let values = &sampler.values;
                let payload = dev.format.encode(&dev.id, ts_s, seq, values);
                seq += 1;
                if !connected {
                    // Down and not back yet: the message is never sent.
                    stats.unconfirmed.fetch_add(1, Ordering::Relaxed);
                    connected = reconnect(&mut link, host, &dev.id, &secret, lamp.as_deref_mut(), &ctx).await;
                    continue;
                }
                if inflight.len() >= MAX_INFLIGHT {
                    stats.note_error(format!("{}: publish not queued: {MAX_INFLIGHT} in flight", dev.id));
                    continue;
                }
                let mut publish = Publish::new("", qos, payload, None);
                publish.topic = topic.clone();
                let pkid = if qos == QoS::AtLeastOnce { link.next_pkid() } else { 0 };
                publish.pkid = pkid;
                match link.send(&Packet::Publish(publish)).await {
                    Ok(()) => {
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                        if qos == QoS::AtLeastOnce {
                            inflight.push(Sent {
                                pkid,
                                device_time_ms: ts_s * 1000,
                                readings: values.len() as u64,
                                at: Instant::now(),
                            });
                        }
                    }
                    Err(e) => {
                        stats.unconfirmed.fetch_add(1, Ordering::Relaxed);
                        lost(&mut inflight, &ctx, format!("{}: {e}", dev.id));
                        connected = false;
                    }
                }
            }
            packet = link.receive(), if connected => match packet {
                Ok(Packet::PubAck(ack)) => match inflight.iter().position(|s| s.pkid == ack.pkid) {
                    Some(i) => {
                        let sent = inflight.remove(i);
                        if ack.reason == PubAckReason::Success {
                            ctx.acknowledged(
                                sent.at.elapsed(),
                                sent.readings,
                                AckRecord {
                                    device_id: device_id.clone(),
                                    device_time_ms: sent.device_time_ms,
                                    quantities: quantities.clone(),
                                },
                            );
                        } else {
                            stats.rejected.fetch_add(1, Ordering::Relaxed);
                            stats.count_reason(format!("puback {:?}", ack.reason));
                        }
                    }
                    None => match lamp.as_mut().and_then(|l| take_answer(l, ack.pkid)) {
                        Some(()) => answer_acked(stats, ack.reason),
                        None => stats.count_reason("puback for an unknown packet id".into()),
                    },
                },
                Ok(Packet::Publish(command)) => {
                    if let Some(lamp) = lamp.as_mut() {
                        if let Err(e) = answer(&mut link, lamp, command, stats).await {
                            lost(&mut inflight, &ctx, format!("{}: {e}", dev.id));
                            connected = false;
                        }
                    }
                }
                Ok(Packet::SubAck(ack)) => count_refused_subscription(stats, &ack),
                Ok(_) => {}
                Err(e) => {
                    lost(&mut inflight, &ctx, format!("{}: {e}", dev.id));
                    connected = false;
                }
            },
            _ = tokio::time::sleep_until(ping_at), if connected => {
                if let Err(e) = link.send(&Packet::PingReq(PingReq)).await {
                    lost(&mut inflight, &ctx, format!("{}: {e}", dev.id));
                    connected = false;
                }
            }
        }
    }
    stats
        .unconfirmed
        .fetch_add(inflight.len() as u64, Ordering::Relaxed);
    if connected {
        link.disconnect().await;
    }
    stats.closed();
}

/// A dropped connection: what was in flight will not be acknowledged in this session. Not
/// retransmitted: each simulated message is either acknowledged in its session or counted
/// unconfirmed, never both.
fn lost(inflight: &mut Vec<Sent>, ctx: &DriverContext, error: String) {
    ctx.stats.disconnects.fetch_add(1, Ordering::Relaxed);
    ctx.stats
        .unconfirmed
        .fetch_add(inflight.len() as u64, Ordering::Relaxed);
    inflight.clear();
    ctx.stats.note_error(error);
}

/// One attempt to connect again (at the device's next report, so a gateway that is down is
/// not hammered), subscribing to its commands again if it takes them; whether it worked. The
/// gateway sends again every command the device had not acknowledged.
async fn reconnect(
    link: &mut Link,
    host: &str,
    device_id: &str,
    secret: &str,
    lamp: Option<&mut Lamp>,
    ctx: &DriverContext,
) -> bool {
    let result =
        match Link::connect(host, ctx.mqtt_port, device_id, secret, ctx.connect_timeout).await {
            Ok(mut new) => match lamp {
                Some(lamp) => {
                    // Answers of the old session will not be acknowledged.
                    lamp.answers.clear();
                    new.subscribe_commands(device_id).await.map(|()| new)
                }
                None => Ok(new),
            },
            Err(e) => Err(e),
        };
    match result {
        Ok(new) => {
            *link = new;
            true
        }
        Err(e) => {
            ctx.stats.note_error(format!("{device_id}: reconnect: {e}"));
            false
        }
    }
}

/// Acknowledges a command, carries it out and publishes the answer (QoS 1).
async fn answer(
    link: &mut Link,
    lamp: &mut Lamp,
    command: Publish,
    stats: &RunStats,
) -> Result<(), LinkError> {
    stats.commands_received.fetch_add(1, Ordering::Relaxed);
    if command.qos != QoS::AtMostOnce {
        link.send(&Packet::PubAck(PubAck::new(command.pkid, None)))
            .await?;
    }
    let done = lamp.handle(&command.payload);
    let counter = if done.ok {
        &stats.commands_ok
    } else {
        &stats.commands_error
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let mut topic = BytesMut::with_capacity(command.topic.len() + 7);
    topic.extend_from_slice(&command.topic);
    topic.extend_from_slice(b"/result");
    let mut result = Publish::new("", QoS::AtLeastOnce, done.payload, None);
    result.topic = topic.freeze();
    let pkid = link.next_pkid();
    result.pkid = pkid;
    link.send(&Packet::Publish(result)).await?;
    lamp.answers.push(pkid);
    Ok(())
}

/// Removes an answer's packet id once its PUBACK came.
fn take_answer(lamp: &mut Lamp, pkid: u16) -> Option<()> {
    let i = lamp.answers.iter().position(|&p| p == pkid)?;
    lamp.answers.remove(i);
    Some(())
}

fn answer_acked(stats: &RunStats, reason: PubAckReason) {
    if reason == PubAckReason::Success {
        stats.answers_acked.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.count_reason(format!("answer puback {reason:?}"));
    }
}

fn count_refused_subscription(stats: &RunStats, ack: &SubAck) {
    for code in &ack.return_codes {
        if !matches!(code, SubscribeReasonCode::Success(_)) {
            stats.count_reason(format!("suback {code:?}"));
        }
    }
}

/// Why a connection could not be opened.
#[derive(Debug)]
enum LinkError {
    Timeout,
    Refused(ConnectReturnCode),
    Io(std::io::Error),
    Protocol(String),
}

impl LinkError {
    fn reason(&self) -> String {
        match self {
            LinkError::Timeout => "connect timeout".into(),
            LinkError::Refused(code) => format!("connect refused: {code:?}"),
            LinkError::Io(_) => "connect i/o error".into(),
            LinkError::Protocol(_) => "connect error".into(),
        }
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Timeout => write!(f, "timed out"),
            LinkError::Refused(code) => write!(f, "refused: {code:?}"),
            LinkError::Io(e) => write!(f, "i/o: {e}"),
            LinkError::Protocol(e) => write!(f, "protocol: {e}"),
        }
    }
}

impl From<std::io::Error> for LinkError {
    fn from(e: std::io::Error) -> Self {
        LinkError::Io(e)
    }
}

impl From<mqttbytes::Error> for LinkError {
    fn from(e: mqttbytes::Error) -> Self {
        LinkError::Protocol(e.to_string())
    }
}

/// One device's MQTT 5 connection: the socket, a read buffer that grows only as packets need,
/// and the next packet id.
struct Link {
    stream: TcpStream,
    read: BytesMut,
    next_pkid: u16,
    last_sent: Instant,
}

impl Link {
    /// Connects, logs in (clean start) and waits for a successful CONNACK.
    async fn connect(
        host: &str,
        port: u16,
        device_id: &str,
        secret: &str,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        let open = async {
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            let mut link = Link {
                stream,
                read: BytesMut::new(),
                next_pkid: 0,
                last_sent: Instant::now(),
            };
            let connect = Connect {
                keep_alive: KEEP_ALIVE.as_secs() as u16,
                client_id: device_id.to_string(),
                clean_start: true,
                properties: None,
            };
            link.send(&Packet::Connect(
                connect,
                None,
                Some(Login::new(device_id, secret)),
            ))
            .await?;
            match link.receive().await? {
                Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(link),
                Packet::ConnAck(ack) => Err(LinkError::Refused(ack.code)),
                other => Err(LinkError::Protocol(format!(
                    "expected CONNACK, got {other:?}"
                ))),
            }
        };
        tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| LinkError::Timeout)?
    }

    /// Subscribes to the device's commands (QoS 1); the SUBACK is read by the device's loop.
    async fn subscribe_commands(&mut self, device_id: &str) -> Result<(), LinkError> {
        let filter = Filter::new(format!("devices/{device_id}/commands/+"), QoS::AtLeastOnce);
        let mut subscribe = Subscribe::new(filter, None);
        subscribe.pkid = self.next_pkid();
        self.send(&Packet::Subscribe(subscribe)).await
    }

    fn next_pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid % u16::MAX + 1;
        self.next_pkid
    }

    async fn send(&mut self, packet: &Packet) -> Result<(), LinkError> {
        let mut out = BytesMut::new();
        packet.write(&mut out, None)?;
        self.stream.write_all(&out).await?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// The next packet from the gateway. Cancel-safe: bytes read stay in the buffer.
    async fn receive(&mut self) -> Result<Packet, LinkError> {
        loop {
            match Packet::read(&mut self.read, Some(MAX_INCOMING)) {
                Ok(packet) => {
                    if self.read.is_empty() {
                        // Give the buffer back between packets: an idle device holds none.
                        self.read = BytesMut::new();
                    }
                    return Ok(packet);
                }
                Err(mqttbytes::Error::InsufficientBytes(n)) => self.read.reserve(n.max(64)),
                Err(e) => return Err(e.into()),
            }
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Err(LinkError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    async fn disconnect(mut self) {
        let bye = Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection));
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.send(&bye).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}
