//! MQTT 5 driver: one rumqttc v5 connection per device (client id = username = device id), one
//! message per interval on `devices/{id}/telemetry/{format}`, QoS from the scenario.
//!
//! MQTT 5 so a refusal is visible: the gateway answers a refused payload with PUBACK 0x99 (and a
//! spoofed topic with 0x87), counted here as `rejected` by reason code. A message counts as
//! acknowledged only on PUBACK success; messages in flight when a connection drops are dropped
//! from the retransmission queue and counted `unconfirmed` (the gateway may or may not have
//! stored them — `verify` reports such readings separately, never as errors).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::time::Instant;

use super::sample::Sampler;
use crate::run::{AckRecord, DriverContext};
use crate::scenario::SimDevice;

/// What a message carried, kept until its acknowledgement.
struct Sent {
    device_time_ms: u64,
    readings: u64,
}

pub async fn run_device(dev: SimDevice, secret: String, ctx: Arc<DriverContext>) {
    tokio::time::sleep_until(ctx.connect_at(dev.index)).await;
    if Instant::now() >= ctx.end {
        return;
    }
    let stats = &ctx.stats;
    let host = &ctx.mqtt_hosts[dev.index % ctx.mqtt_hosts.len()];
    let mut opts = MqttOptions::new(dev.id.clone(), host.as_str(), ctx.mqtt_port);
    opts.set_credentials(dev.id.clone(), secret)
        .set_keep_alive(Duration::from_secs(60))
        .set_clean_start(true)
        .set_request_channel_capacity(8)
        // rumqttc sizes its in-flight table by this (u16::MAX slots by default: megabytes per
        // connection); a device reporting every few seconds needs a handful.
        .set_outgoing_inflight_upper_limit(16)
        .set_connection_timeout(ctx.connect_timeout.as_secs().max(1));
    let mut net = opts.network_options();
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    let (client, mut eventloop) = AsyncClient::new(opts, 8);

    let permit = ctx.connect_permits.acquire().await;
    let first = tokio::time::timeout(ctx.connect_timeout, eventloop.poll()).await;
    drop(permit);
    match first {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code == ConnectReturnCode::Success => {
            stats.opened()
        }
        other => {
            stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            let reason = match &other {
                Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                    format!("connect refused: {code:?}")
                }
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    format!("connect refused: {:?}", ack.code)
                }
                Err(_) => "connect timeout".into(),
                Ok(Err(ConnectionError::Io(_))) => "connect i/o error".into(),
                _ => "connect error".into(),
            };
            stats.count_reason(reason);
            stats.note_error(format!("{}: {:?}", dev.id, other.err()));
            return;
        }
    }

    let profile = &ctx.scenario.profiles[&dev.profile];
    let quantities = super::ack_log_quantities(profile);
    let device_id: Arc<str> = dev.id.as_str().into();
    let topic = dev.format.topic(&dev.id);
    let qos = if ctx.scenario.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let mut sampler = Sampler::new(&dev, &ctx.scenario);
    let mut next = sampler.first_report();
    let mut seq = 0u64;
    let mut queued: VecDeque<Sent> = VecDeque::new();
    let mut inflight: HashMap<u16, (Sent, Instant)> = HashMap::new();

    loop {
        let reporting = next < ctx.end;
        let deadline = if reporting { next } else { ctx.end + ctx.drain };
        if !reporting && queued.is_empty() && inflight.is_empty() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                if !reporting {
                    break;
                }
                next += dev.interval;
                let ts_s = sampler.sample();
                let values = &sampler.values;
                let payload = dev.format.encode(&dev.id, ts_s, seq, values);
                seq += 1;
                match client.try_publish(topic.as_str(), qos, false, payload) {
                    Ok(()) => queued.push_back(Sent { device_time_ms: ts_s * 1000, readings: values.len() as u64 }),
                    Err(e) => stats.note_error(format!("{}: publish not queued: {e}", dev.id)),
                }
            }
            ev = eventloop.poll() => match ev {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    if let Some(sent) = queued.pop_front() {
                        if qos == QoS::AtMostOnce {
                            continue;
                        }
                        inflight.insert(pkid, (sent, Instant::now()));
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => match inflight.remove(&ack.pkid) {
                    Some((sent, t0)) if ack.reason == PubAckReason::Success => {
                        ctx.acknowledged(
                            t0.elapsed(),
                            sent.readings,
                            AckRecord {
                                device_id: device_id.clone(),
                                device_time_ms: sent.device_time_ms,
                                quantities: quantities.clone(),
                            },
                        );
                    }
                    Some(_) => {
                        stats.rejected.fetch_add(1, Ordering::Relaxed);
                        stats.count_reason(format!("puback {:?}", ack.reason));
                    }
                    None => stats.count_reason("puback for an unknown packet id".into()),
                },
                Ok(_) => {}
                Err(e) => {
                    on_connection_lost(&mut eventloop, &mut queued, &mut inflight, &ctx);
                    stats.note_error(format!("{}: {e}", dev.id));
                    // rumqttc reconnects on the next poll; do not spin on a gateway that is down.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    let lost = (queued.len() + inflight.len()) as u64;
    stats.unconfirmed.fetch_add(lost, Ordering::Relaxed);
    crate::mqtt::disconnect_v5(&client, &mut eventloop).await;
    stats.closed();
}

/// A dropped connection: what was in flight or queued will not be acknowledged in this session.
fn on_connection_lost(
    eventloop: &mut EventLoop,
    queued: &mut VecDeque<Sent>,
    inflight: &mut HashMap<u16, (Sent, Instant)>,
    ctx: &DriverContext,
) {
    ctx.stats.disconnects.fetch_add(1, Ordering::Relaxed);
    let lost = (queued.len() + inflight.len()) as u64;
    ctx.stats.unconfirmed.fetch_add(lost, Ordering::Relaxed);
    // Not retransmitted: each simulated message is either acknowledged in its session or
    // counted unconfirmed, never both.
    eventloop.pending.clear();
    queued.clear();
    inflight.clear();
}
