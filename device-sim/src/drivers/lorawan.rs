//! LoRaWAN through a network server: devices do not reach citygw themselves; their uplinks arrive
//! as integration events on the network server's MQTT broker, which citygw's `[[lorawan]]`
//! bridges subscribe to. This driver plays the network server: one MQTT connection to that
//! broker (`run --lorawan-broker`) for all LoRaWAN devices of the scenario, and per uplink one
//! event in the server's own shape:
//!
//! - ChirpStack v4 ([`Server::ChirpStack`]): `application/{application_id}/device/{dev_eui}/event/up`
//!   with ChirpStack's v4 JSON marshaling (`deduplicationId`, `time`, `deviceInfo`, `devAddr`,
//!   `fCnt`, `fPort`, `data`, `object`, `rxInfo`, `txInfo`);
//! - The Things Stack v3 ([`Server::Tts`]): `v3/{application_id}/devices/{device_id}/up` with
//!   TTS's snake_case JSON (`end_device_ids`, `received_at`, `uplink_message` with `f_cnt`,
//!   `frm_payload`, `decoded_payload`, `rx_metadata`, `settings`).
//!
//! The device's DevEUI is derived from its id ([`dev_eui`]) and registered by `device-sim
//! provision`, so the bridge finds the device by DevEUI as it would in production; the decoded
//! values travel as the server's decoded object (as a payload codec on the network server would
//! produce) and the same JSON as the raw frame; the event time is the device time in whole
//! seconds and the frame counter counts the device's uplinks.
//!
//! An uplink counts as acknowledged when the broker acknowledges it (PUBACK success): the ack log
//! then means "accepted by the network server's broker", and `verify` checks the bridge end to end.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use serde_json::{json, Map, Value as Json};
use tokio::time::Instant;

use super::sample::Sampler;
use crate::run::{AckRecord, DriverContext};
use crate::scenario::profiles::Value;
use crate::scenario::SimDevice;

/// The network server's broker and how to log in to it.
#[derive(Debug, Clone)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A devEUI for a device id: 8 bytes of FNV-1a over the id, as 16 hex digits.
pub fn dev_eui(device_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The network server whose events a device's uplinks imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    ChirpStack,
    Tts,
}

impl Server {
    /// The event topic of `dev`'s uplinks in application `app_id`.
    pub fn topic(self, app_id: &str, dev: &SimDevice) -> String {
        match self {
            Server::ChirpStack => {
                format!("application/{app_id}/device/{}/event/up", dev_eui(&dev.id))
            }
            Server::Tts => format!("v3/{app_id}/devices/{}/up", dev.id),
        }
    }

    /// One uplink event of `dev` carrying `values`.
    pub fn uplink(
        self,
        app_id: &str,
        dev: &SimDevice,
        ts_s: u64,
        f_cnt: u64,
        values: &[(String, Value)],
    ) -> Json {
        match self {
            Server::ChirpStack => chirpstack_uplink(app_id, dev, ts_s, f_cnt, values),
            Server::Tts => tts_uplink(app_id, dev, ts_s, f_cnt, values),
        }
    }
}

/// The decoded object of an uplink and the raw frame carrying it (the same JSON).
fn object_and_frame(values: &[(String, Value)]) -> (Map<String, Json>, Vec<u8>) {
    let mut object = Map::new();
    for (name, v) in values {
        object.insert(
            name.clone(),
            match v {
                Value::Number(x) => json!(x),
                Value::Boolean(b) => json!(b),
            },
        );
    }
    let raw = serde_json::to_vec(&object).expect("JSON encodes");
    (object, raw)
}

/// One ChirpStack v4 uplink event.
fn chirpstack_uplink(
    app_id: &str,
    dev: &SimDevice,
    ts_s: u64,
    f_cnt: u64,
    values: &[(String, Value)],
) -> Json {
    let (object, raw) = object_and_frame(values);
    let eui = dev_eui(&dev.id);
    let time = rfc3339(ts_s);
    json!({
        "deduplicationId": format!("{}-{f_cnt:08x}", &eui[..8]),
        "time": time,
        "deviceInfo": {
            "tenantId": "device-sim",
            "tenantName": "device-sim",
            "applicationId": app_id,
            "applicationName": "device-sim",
            "deviceProfileId": dev.profile,
            "deviceProfileName": dev.profile,
            "deviceName": dev.id,
            "devEui": eui,
            "tags": {"kind": dev.kind, "commune": dev.commune_code},
        },
        "devAddr": &eui[8..],
        "adr": true,
        "dr": 5,
        "fCnt": f_cnt,
        "fPort": 1,
        "confirmed": false,
        "data": base64(&raw),
        "object": object,
        "rxInfo": [{
            "gatewayId": "0016c001f1500000",
            "uplinkId": f_cnt,
            "time": time,
            "rssi": -97,
            "snr": 7.5,
            "location": {"latitude": dev.lat, "longitude": dev.lon},
        }],
        "txInfo": {
            "frequency": 923_200_000,
            "modulation": {"lora": {"bandwidth": 125_000, "spreadingFactor": 7, "codeRate": "CR_4_5"}},
        },
    })
}

/// One The Things Stack v3 uplink message. Protobuf's JSON mapping leaves zero values out, so
/// frame 0 has no `f_cnt`, and 64-bit numbers (`frequency`) are strings.
fn tts_uplink(
    app_id: &str,
    dev: &SimDevice,
    ts_s: u64,
    f_cnt: u64,
    values: &[(String, Value)],
) -> Json {
    let (object, raw) = object_and_frame(values);
    let eui = dev_eui(&dev.id).to_uppercase();
    let time = rfc3339(ts_s);
    let application_id = app_id.split('@').next().unwrap_or(app_id);
    let mut up = json!({
        "f_port": 1,
        "frm_payload": base64(&raw),
        "decoded_payload": object,
        "rx_metadata": [{
            "gateway_ids": {"gateway_id": "device-sim-gw", "eui": "0016C001F1500000"},
            "time": time,
            "rssi": -97,
            "channel_rssi": -97,
            "snr": 7.5,
            "location": {"latitude": dev.lat, "longitude": dev.lon},
        }],
        "settings": {
            "data_rate": {"lora": {"bandwidth": 125_000, "spreading_factor": 7, "coding_rate": "4/5"}},
            "frequency": "923200000",
        },
        "received_at": time,
        "consumed_airtime": "0.061696s",
    });
    if f_cnt > 0 {
        up["f_cnt"] = json!(f_cnt);
    }
    json!({
        "end_device_ids": {
            "device_id": dev.id,
            "application_ids": {"application_id": application_id},
            "dev_eui": eui,
            "dev_addr": &eui[8..],
        },
        "correlation_ids": [format!("as:up:{}-{f_cnt:08x}", &eui[..8])],
        "received_at": time,
        "uplink_message": up,
    })
}

/// RFC 3339 in UTC for Unix seconds.
fn rfc3339(ts_s: u64) -> String {
    chrono::DateTime::from_timestamp(ts_s as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What an uplink carried, until the broker acknowledges it.
struct Pending {
    device_id: Arc<str>,
    quantities: Arc<str>,
    device_time_ms: u64,
    readings: u64,
}

/// The network server's one connection, shared by every LoRaWAN device of the run.
pub struct Hub {
    client: AsyncClient,
    /// Uplinks queued on the client, in queue order (the event loop writes them in that order).
    queued: Mutex<VecDeque<Pending>>,
}

impl Hub {
    /// Connects to the broker and serves the connection until the run's drain ends.
    pub async fn start(broker: &Broker, ctx: Arc<DriverContext>) -> anyhow::Result<Arc<Hub>> {
        let mut opts = MqttOptions::new(
            format!("device-sim-chirpstack-{}", std::process::id()),
            broker.host.as_str(),
            broker.port,
        );
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_start(true)
            .set_request_channel_capacity(4096)
            .set_outgoing_inflight_upper_limit(256);
        if let Some(user) = &broker.username {
            opts.set_credentials(user.clone(), broker.password.clone().unwrap_or_default());
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 4096);
        match tokio::time::timeout(ctx.connect_timeout, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {}
            other => anyhow::bail!(
                "LoRaWAN broker {}:{}: no CONNACK ({other:?})",
                broker.host,
                broker.port
            ),
        }
        let hub = Arc::new(Hub {
            client,
            queued: Mutex::new(VecDeque::new()),
        });
        tokio::spawn(serve(hub.clone(), eventloop, ctx));
        Ok(hub)
    }
}

async fn serve(hub: Arc<Hub>, mut eventloop: EventLoop, ctx: Arc<DriverContext>) {
    let stats = &ctx.stats;
    let mut inflight: HashMap<u16, (Pending, Instant)> = HashMap::new();
    let until = ctx.end() + ctx.drain;
    loop {
        let ev = match tokio::time::timeout_at(until, eventloop.poll()).await {
            Err(_) => break,
            Ok(ev) => ev,
        };
        match ev {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = hub.queued.lock().unwrap().pop_front() {
                    inflight.insert(pkid, (p, Instant::now()));
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => match inflight.remove(&ack.pkid) {
                Some((p, t0)) if ack.reason == PubAckReason::Success => {
                    ctx.acknowledged(
                        t0.elapsed(),
                        p.readings,
                        AckRecord {
                            device_id: p.device_id,
                            device_time_ms: p.device_time_ms,
                            quantities: p.quantities,
                        },
                    );
                }
                Some(_) => {
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                    stats.count_reason(format!("lorawan broker puback {:?}", ack.reason));
                }
                None => stats.count_reason("lorawan broker puback for an unknown id".into()),
            },
            Ok(_) => {}
            Err(e) => {
                stats.disconnects.fetch_add(1, Ordering::Relaxed);
                {
                    let mut queued = hub.queued.lock().unwrap();
                    let lost = (queued.len() + inflight.len()) as u64;
                    stats.unconfirmed.fetch_add(lost, Ordering::Relaxed);
                    eventloop.pending.clear();
                    queued.clear();
                    inflight.clear();
                }
                stats.note_error(format!("LoRaWAN broker: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if Instant::now() >= ctx.end()
            && inflight.is_empty()
            && hub.queued.lock().unwrap().is_empty()
        {
            break;
        }
    }
    let lost = (inflight.len() + hub.queued.lock().unwrap().len()) as u64;
    stats.unconfirmed.fetch_add(lost, Ordering::Relaxed);
    crate::mqtt::disconnect_v5(&hub.client, &mut eventloop).await;
}

/// One LoRaWAN device: samples on its interval and hands each uplink to the hub.
pub async fn run_device(
    dev: SimDevice,
    server: Server,
    hub: Arc<Hub>,
    app_id: String,
    ctx: Arc<DriverContext>,
) {
    tokio::time::sleep_until(ctx.connect_at(dev.index)).await;
    let profile = &ctx.scenario.profiles[&dev.profile];
    let quantities = super::ack_log_quantities(profile);
    let device_id: Arc<str> = dev.id.as_str().into();
    let topic = server.topic(&app_id, &dev);
    ctx.stats.opened();
    let mut sampler = Sampler::new(&dev, &ctx.scenario);
    let mut next = sampler.first_report();
    let mut f_cnt = 0u64;
    while next < ctx.end() {
        tokio::time::sleep_until(next).await;
        next += dev.interval;
        let ts_s = sampler.sample();
        let values = &sampler.values;
        let event = server.uplink(&app_id, &dev, ts_s, f_cnt, values);
        f_cnt += 1;
        let payload = serde_json::to_vec(&event).expect("JSON encodes");
        // Queue order and client order must agree: both under the one lock.
        let mut queued = hub.queued.lock().unwrap();
        match hub
            .client
            .try_publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => queued.push_back(Pending {
                device_id: device_id.clone(),
                quantities: quantities.clone(),
                device_time_ms: ts_s * 1000,
                readings: values.len() as u64,
            }),
            Err(e) => ctx
                .stats
                .note_error(format!("{}: uplink not queued: {e}", dev.id)),
        }
    }
    ctx.stats.closed();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::Protocol;
    use crate::format::Format;

    fn device() -> SimDevice {
        SimDevice {
            index: 0,
            id: "lw-000001".into(),
            profile: "water_meter".into(),
            kind: "water_meter".into(),
            commune_code: "00004".into(),
            commune_name: "Phường Ba Đình".into(),
            lat: 21.0386,
            lon: 105.838,
            protocol: Protocol::LorawanChirpstack,
            format: Format::Json,
            interval: Duration::from_secs(60),
            seed: 1,
        }
    }

    #[test]
    fn uplink_has_chirpstack_v4_shape() {
        let values = vec![("water_volume".to_string(), Value::Number(12.5))];
        let e = Server::ChirpStack.uplink("app-1", &device(), 1_700_000_000, 7, &values);
        assert_eq!(e["deviceInfo"]["deviceName"], "lw-000001");
        assert_eq!(e["deviceInfo"]["devEui"], dev_eui("lw-000001"));
        assert_eq!(e["deviceInfo"]["applicationId"], "app-1");
        assert_eq!(e["time"], "2023-11-14T22:13:20Z");
        assert_eq!(e["fCnt"], 7);
        assert_eq!(e["object"]["water_volume"], 12.5);
        assert_eq!(e["data"], base64(br#"{"water_volume":12.5}"#));
    }

    #[test]
    fn uplink_has_tts_v3_shape() {
        let values = vec![
            ("water_volume".to_string(), Value::Number(12.5)),
            ("leak".to_string(), Value::Boolean(false)),
        ];
        let dev = device();
        assert_eq!(
            Server::Tts.topic("water@city", &dev),
            "v3/water@city/devices/lw-000001/up"
        );
        let e = Server::Tts.uplink("water@city", &dev, 1_700_000_000, 7, &values);
        let ids = &e["end_device_ids"];
        assert_eq!(ids["device_id"], "lw-000001");
        assert_eq!(ids["application_ids"]["application_id"], "water");
        assert_eq!(ids["dev_eui"], dev_eui("lw-000001").to_uppercase());
        let up = &e["uplink_message"];
        assert_eq!(up["received_at"], "2023-11-14T22:13:20Z");
        assert_eq!(up["f_cnt"], 7);
        assert_eq!(up["decoded_payload"]["leak"], false);
        use base64::Engine;
        let frame = base64::engine::general_purpose::STANDARD
            .decode(up["frm_payload"].as_str().unwrap())
            .unwrap();
        let frame: Json = serde_json::from_slice(&frame).unwrap();
        assert_eq!(frame, up["decoded_payload"]);
        // protobuf's JSON mapping: no zero frame counter
        let first = Server::Tts.uplink("water@city", &dev, 1_700_000_000, 0, &values);
        assert!(first["uplink_message"].get("f_cnt").is_none());
    }

    #[test]
    fn base64_dates_and_euis() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(dev_eui("a").len(), 16);
    }
}
