//! Commands to LoRaWAN devices: downlinks through the network server that bridges them.
//!
//! A LoRaWAN device is reached through its network server, over the same MQTT connection the
//! bridge (sources/lorawan) receives its uplinks on; in cluster mode that is the node holding
//! the bridge's lease, so only that node sends. Two formats, one per server type:
//!
//! - ChirpStack v4: a `DownlinkCommand` on `application/{application_id}/device/{dev_eui}/command/down`
//!   (QoS 1; JSON, or protobuf when the bridge's marshaler is `protobuf`) with `id` = the command
//!   id, which ChirpStack reports back as `queueItemId` in `txack` and `ack` events.
//! - The Things Stack v3: `{"downlinks": [...]}` on `v3/{app}@{tenant}/devices/{device_id}/down/push`
//!   (QoS 0, the only level TTS offers) with the correlation id `citygw:cmd:{id}`, which TTS
//!   repeats in `down/queued|sent|ack|nack|failed`.
//!
//! Params become the payload: raw bytes as `data` / `frm_payload` (base64), a JSON object as
//! ChirpStack's `object` / TTS `decoded_payload`, which the network server encodes with the
//! device profile's codec (payload formatter). The command's name is the operator's label and
//! is not transmitted; FPort 0 in a command means the bridge's `downlink_f_port`.
//!
//! Where to publish needs the device's application (ChirpStack application id, TTS
//! `{app}@{tenant}` and device id), which only its uplinks tell: each uplink's topic is its
//! [`Route`], kept in memory and, when it changes, in the store (`l/{device id}` in the commands
//! table) before the uplink is acknowledged, so a restart knows it. A command for a device
//! without a route, or whose bridge is not connected, stays QUEUED until either changes.
//!
//! States: SENT when the broker accepted the publish (its PUBACK; for TTS's QoS 0, when it was
//! written), DELIVERED when a gateway transmitted it (`txack`, `down/sent`; final for an
//! unconfirmed downlink), SUCCEEDED / FAILED when the device acknowledged it or not (`ack` with
//! `acknowledged`, `down/ack`, `down/nack`) or TTS gave up (`down/failed`). A report moves a
//! command only when it names one of its device's open commands: reports about other ids,
//! about another device's command, or repeated, are counted and change nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use base64::Engine;
use prost::Message as _;
use rumqttc::{AsyncClient, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Dispatch, Kind, Transport};
use crate::control::commands::{Commands, Progress, ProgressError};
use crate::proto::{command_payload, Command, CommandPayload};
use crate::sources::lorawan::chirpstack::pb::integration as ipb;
use crate::sources::lorawan::config::{LorawanConfig, Marshaler, ServerType};
use crate::sources::lorawan::event::{DownlinkEvent, DownlinkKind};
use crate::sources::lorawan::tts;
use crate::store::{Store, StoreError, Table};

/// Largest FRMPayload of any LoRaWAN data rate (the usable size at the device's data rate may be
/// smaller; the network server then reports the downlink as failed).
pub const MAX_FRM_PAYLOAD: usize = 242;

/// Longest application or device id taken from a topic.
const MAX_ID: usize = 128;

/// Key prefix of the routes in the commands table.
const ROUTE: &str = "l/";

/// Where a device's downlinks go, as its latest uplink told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The `[[lorawan]]` bridge the uplink came through.
    pub server: String,
    /// ChirpStack's application id, or TTS `{app}@{tenant}` (`{app}` on a self-hosted stack).
    pub application: String,
    /// The device as the network server names it in topics: ChirpStack's DevEUI, TTS's device id.
    pub device: String,
}

/// The LoRaWAN transport: routes of the devices and the bridges' live connections.
pub struct Lorawan {
    store: Store,
    routes: RwLock<HashMap<String, Route>>,
    links: RwLock<HashMap<String, Arc<Link>>>,
}

impl Lorawan {
    /// Loads the routes learnt before.
    pub fn load(store: Store) -> Result<Arc<Lorawan>, StoreError> {
        let mut routes = HashMap::new();
        store.for_each_record(Table::Commands, ROUTE, |key, bytes| {
            match serde_json::from_slice::<Route>(&bytes) {
                Ok(route) => {
                    routes.insert(key[ROUTE.len()..].to_string(), route);
                }
                Err(e) => tracing::warn!(key, error = %e, "unreadable LoRaWAN route skipped"),
            }
            Ok(())
        })?;
        tracing::info!(routes = routes.len(), "lorawan downlink routes loaded");
        Ok(Arc::new(Lorawan {
            store,
            routes: RwLock::new(routes),
            links: RwLock::default(),
        }))
    }

    /// The route of a device, if one of its uplinks was seen.
    pub fn route(&self, device_id: &str) -> Option<Route> {
        self.routes
            .read()
            .expect("routes lock")
            .get(device_id)
            .cloned()
    }

    /// A device's uplink came through `route`: remembered (durably, when it changed) and, when it
    /// is new, the device's waiting commands are tried.
    pub async fn learn(
        &self,
        commands: &Commands,
        device_id: &str,
        route: Route,
    ) -> Result<(), StoreError> {
        if self.route(device_id).as_ref() == Some(&route) {
            return Ok(());
        }
        // Network servers' ids are short (a UUID, TTS ids of at most 36 characters); a topic
        // level longer than this, or one no topic may hold, is no route to publish on.
        let usable = |level: &str| {
            !level.is_empty() && level.len() <= MAX_ID && !level.contains(['/', '+', '#'])
        };
        if !usable(&route.application) || !usable(&route.device) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&route).expect("a route serialises");
        self.store
            .put_local_records(
                Table::Commands,
                vec![(format!("{ROUTE}{device_id}"), Some(bytes))],
                None,
            )
            .await?;
        tracing::info!(device = device_id, server = %route.server,
            application = %route.application, "lorawan downlink route learnt");
        self.routes
            .write()
            .expect("routes lock")
            .insert(device_id.to_string(), route);
        commands.wake(device_id, false);
        Ok(())
    }

    /// A bridge connected to its broker: downlinks may go out through it.
    pub fn link(&self, commands: &Commands, link: Arc<Link>) {
        link.connected.store(true, Ordering::Release);
        self.links
            .write()
            .expect("links lock")
            .insert(link.server.clone(), link);
        for device in commands.devices_waiting(Kind::Lorawan) {
            commands.wake(&device, false);
        }
    }

    /// A bridge's connection is over (lease lost, shutdown): what waited on it is given up and
    /// goes out through the next one.
    pub fn unlink(&self, link: &Arc<Link>) {
        link.connected.store(false, Ordering::Release);
        let mut links = self.links.write().expect("links lock");
        if links
            .get(&link.server)
            .is_some_and(|l| Arc::ptr_eq(l, link))
        {
            links.remove(&link.server);
        }
        drop(links);
        link.tracker.lock().expect("tracker lock").close();
    }

    /// A network server's report on a downlink, from the bridge `server`, about the registered
    /// device `device_id` (found by the DevEUI or TTS device id of the report's topic). Returns
    /// the outcome label once any change is durable.
    pub async fn report(
        &self,
        commands: &Commands,
        server: &str,
        device_id: &str,
        event: &DownlinkEvent,
    ) -> Result<&'static str, StoreError> {
        let Some(id) = event.command_id.as_deref() else {
            return Ok("no_command_id");
        };
        let command = match commands.open_for(device_id, id) {
            Ok(c) if c.transport == Kind::Lorawan.label() => c,
            Ok(_) | Err(ProgressError::WrongDevice(_)) => return Ok("wrong_device"),
            Err(_) => {
                return Ok(match commands.get(id)? {
                    Some(c) if c.device_id == device_id => late(),
                    _ => "unknown_command",
                })
            }
        };
        let progress = match &event.kind {
            DownlinkKind::Queued => return Ok("matched"),
            DownlinkKind::Transmitted => Progress::Delivered {
                detail: format!("transmitted by a gateway of {server}"),
                last: !command.confirmed,
            },
            DownlinkKind::Acknowledged => Progress::Succeeded {
                result: "\"acknowledged by the device\"".into(),
            },
            DownlinkKind::NotAcknowledged => Progress::Failed {
                error: "the device did not acknowledge the confirmed downlink".into(),
            },
            DownlinkKind::Failed(e) => Progress::Failed { error: e.clone() },
        };
        match commands.progress(id, progress, &format!("lorawan:{server}")) {
            Ok(durable) => {
                durable.wait().await?;
                Ok("matched")
            }
            Err(ProgressError::Stale(_)) => Ok(late()),
            Err(ProgressError::WrongDevice(_)) => Ok("wrong_device"),
            Err(ProgressError::Unknown(_)) => Ok("unknown_command"),
        }
    }
}

/// A report about a command already final (or further along): counted like the other
/// transports' late reports.
fn late() -> &'static str {
    metrics::counter!("citygw_command_reports_late_total", "transport" => Kind::Lorawan.label())
        .increment(1);
    "late"
}

#[async_trait]
impl Transport for Lorawan {
    fn kind(&self) -> Kind {
        Kind::Lorawan
    }

    fn accepts(&self, payload: &CommandPayload) -> Result<(), String> {
        match &payload.kind {
            Some(command_payload::Kind::Raw(b)) if b.len() > MAX_FRM_PAYLOAD => Err(format!(
                "raw: {} bytes; a LoRaWAN downlink carries at most {MAX_FRM_PAYLOAD}",
                b.len()
            )),
            _ => Ok(()),
        }
    }

    async fn dispatch(&self, commands: &Commands, c: &Command) -> Dispatch {
        // Until an uplink tells the device's application, or while its bridge is away, it waits.
        let Some(route) = self.route(&c.device_id) else {
            return Dispatch::Waiting;
        };
        let link = self
            .links
            .read()
            .expect("links lock")
            .get(&route.server)
            .cloned();
        let Some(link) = link.filter(|l| l.connected.load(Ordering::Acquire)) else {
            return Dispatch::Waiting;
        };
        let (topic, body, f_port) = link.downlink(&route, c);
        let mut tries = 0;
        let accepted = loop {
            match link.publish(&topic, body.clone()) {
                Ok(accepted) => break accepted,
                // The client's request queue is full (a burst of uplink acks): a moment later,
                // for a while; then it waits for the next connection like any other.
                Err(Refused::Busy) if tries < BUSY_TRIES => {
                    tries += 1;
                    tokio::time::sleep(BUSY_RETRY).await
                }
                Err(_) => return Dispatch::Waiting,
            }
        };
        // One device's commands go out in order: the next waits for this one's PUBACK.
        if accepted.await.is_err() {
            return Dispatch::Waiting;
        }
        metrics::counter!("citygw_lorawan_downlinks_total", "server" => route.server.clone())
            .increment(1);
        let detail = format!(
            "published to {topic}: FPort {f_port}, {}",
            if c.confirmed {
                "confirmed"
            } else {
                "unconfirmed"
            }
        );
        let _ = commands.progress(&c.id, Progress::Sent(detail), "gateway");
        Dispatch::Reported
    }
}

/// One live broker connection of a bridge that downlinks go out through.
pub struct Link {
    server: String,
    server_type: ServerType,
    marshaler: Marshaler,
    f_port: u32,
    client: AsyncClient,
    connected: AtomicBool,
    tracker: Mutex<Tracker>,
}

/// Why a link did not take a publish.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// The client's request queue is full.
    Busy,
    /// The connection is gone or not up.
    Closed,
}

/// How long a dispatch waits before trying a full request queue again, and how often.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(50);
const BUSY_TRIES: u32 = 100;

/// Which of our publishes the broker has accepted, from the client's event loop. rumqttc numbers
/// a publish when its event loop takes it, in the order it was requested, and says so with
/// `Outgoing::Publish(pkid)`; a publish resent after a reconnect reuses its number.
#[derive(Default)]
struct Tracker {
    /// Requested, not yet numbered.
    requested: VecDeque<oneshot::Sender<()>>,
    /// Numbered, waiting for the broker's PUBACK.
    by_pkid: HashMap<u16, oneshot::Sender<()>>,
    /// Numbered with an id still in use: rumqttc sends it once that id's PUBACK came.
    collided: Option<(u16, oneshot::Sender<()>)>,
    closed: bool,
}

impl Tracker {
    fn close(&mut self) {
        // Dropping the senders tells each waiting dispatch that its publish was given up.
        *self = Tracker {
            closed: true,
            ..Default::default()
        };
    }
}

impl Link {
    pub fn new(cfg: &LorawanConfig, client: AsyncClient) -> Arc<Link> {
        Arc::new(Link {
            server: cfg.name.clone(),
            server_type: cfg.server_type,
            marshaler: cfg.marshaler,
            f_port: cfg.downlink_f_port,
            client,
            connected: AtomicBool::new(false),
            tracker: Mutex::default(),
        })
    }

    /// The connection was lost; rumqttc resends what the broker did not acknowledge once it is
    /// back, and new downlinks wait for that.
    pub fn disconnected(&self) {
        self.connected.store(false, Ordering::Release);
    }

    fn qos(&self) -> QoS {
        match self.server_type {
            ServerType::ChirpstackV4 => QoS::AtLeastOnce,
            ServerType::TtnV3 => QoS::AtMostOnce,
        }
    }

    /// Hands a downlink to the client; the receiver resolves when the broker has it.
    fn publish(&self, topic: &str, body: Vec<u8>) -> Result<oneshot::Receiver<()>, Refused> {
        let mut t = self.tracker.lock().expect("tracker lock");
        if t.closed || !self.connected.load(Ordering::Acquire) {
            return Err(Refused::Closed);
        }
        // Under the lock, so the order of `requested` is the order of the client's requests.
        self.client
            .try_publish(topic, self.qos(), false, body)
            .map_err(|e| match e {
                rumqttc::ClientError::TryRequest(_) if !t.closed => Refused::Busy,
                _ => Refused::Closed,
            })?;
        let (tx, rx) = oneshot::channel();
        t.requested.push_back(tx);
        Ok(rx)
    }

    /// The event loop took a publish (`Outgoing::Publish`).
    pub fn outgoing_publish(&self, pkid: u16) {
        let mut t = self.tracker.lock().expect("tracker lock");
        if pkid != 0 && t.by_pkid.contains_key(&pkid) {
            return; // resent after a reconnect
        }
        let Some(done) = t.requested.pop_front() else {
            return;
        };
        if pkid == 0 {
            let _ = done.send(()); // QoS 0: written is all there is
        } else {
            t.by_pkid.insert(pkid, done);
        }
    }

    /// The event loop holds a publish back until `pkid` is free (`Outgoing::AwaitAck`).
    pub fn collided(&self, pkid: u16) {
        let mut t = self.tracker.lock().expect("tracker lock");
        if let Some(done) = t.requested.pop_front() {
            t.collided = Some((pkid, done));
        }
    }

    /// The broker acknowledged publish `pkid`.
    pub fn puback(&self, pkid: u16) {
        let mut t = self.tracker.lock().expect("tracker lock");
        if let Some(done) = t.by_pkid.remove(&pkid) {
            let _ = done.send(());
        }
        if t.collided.as_ref().is_some_and(|(p, _)| *p == pkid) {
            let (p, done) = t.collided.take().expect("checked");
            t.by_pkid.insert(p, done);
        }
    }

    /// The topic, body and FPort of a command's downlink.
    fn downlink(&self, route: &Route, c: &Command) -> (String, Vec<u8>, u32) {
        let f_port = if c.f_port == 0 { self.f_port } else { c.f_port };
        let payload = c.payload.as_ref().and_then(|p| p.kind.as_ref());
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let object = |p: Option<&command_payload::Kind>| match p {
            Some(command_payload::Kind::ParamsJson(j)) => {
                serde_json::from_str::<serde_json::Value>(j).unwrap_or_default()
            }
            _ => serde_json::json!({}),
        };
        match self.server_type {
            ServerType::ChirpstackV4 => {
                let topic = format!(
                    "application/{}/device/{}/command/down",
                    route.application, route.device
                );
                let body = if self.marshaler == Marshaler::Protobuf {
                    let mut d = ipb::DownlinkCommand {
                        id: c.id.clone(),
                        dev_eui: route.device.clone(),
                        confirmed: c.confirmed,
                        f_port,
                        expires_at: Some(prost_types::Timestamp {
                            seconds: c.expires_time_ms.div_euclid(1000),
                            nanos: (c.expires_time_ms.rem_euclid(1000) * 1_000_000) as i32,
                        }),
                        ..Default::default()
                    };
                    match payload {
                        Some(command_payload::Kind::Raw(b)) => d.data = b.clone(),
                        p => d.object = Some(json_to_struct(&object(p))),
                    }
                    d.encode_to_vec()
                } else {
                    let mut d = serde_json::json!({
                        "id": c.id,
                        "devEui": route.device,
                        "confirmed": c.confirmed,
                        "fPort": f_port,
                    });
                    if let Some(t) = chrono::DateTime::from_timestamp_millis(c.expires_time_ms) {
                        d["expiresAt"] = t
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                            .into();
                    }
                    match payload {
                        Some(command_payload::Kind::Raw(b)) => d["data"] = b64(b).into(),
                        p => d["object"] = object(p),
                    }
                    serde_json::to_vec(&d).expect("a JSON value serialises")
                };
                (topic, body, f_port)
            }
            ServerType::TtnV3 => {
                let topic = format!(
                    "v3/{}/devices/{}/down/push",
                    route.application, route.device
                );
                let mut d = serde_json::json!({
                    "f_port": f_port,
                    "confirmed": c.confirmed,
                    "priority": "NORMAL",
                    "correlation_ids": [tts::correlation_id(&c.id)],
                });
                match payload {
                    Some(command_payload::Kind::Raw(b)) => d["frm_payload"] = b64(b).into(),
                    p => d["decoded_payload"] = object(p),
                }
                let body = serde_json::json!({ "downlinks": [d] });
                (
                    topic,
                    serde_json::to_vec(&body).expect("a JSON value serialises"),
                    f_port,
                )
            }
        }
    }
}

/// A JSON object as protobuf's `Struct` (ChirpStack's `object` in the protobuf marshaling).
fn json_to_struct(v: &serde_json::Value) -> prost_types::Struct {
    let fields = match v {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
        _ => Default::default(),
    };
    prost_types::Struct { fields }
}

fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind as K;
    let kind = match v {
        serde_json::Value::Null => K::NullValue(0),
        serde_json::Value::Bool(b) => K::BoolValue(*b),
        serde_json::Value::Number(n) => K::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => K::StringValue(s.clone()),
        serde_json::Value::Array(a) => K::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(_) => K::StructValue(json_to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(server_type: ServerType, marshaler: Marshaler) -> (Arc<Link>, rumqttc::EventLoop) {
        let cfg: LorawanConfig = toml::from_str(&format!(
            "name = \"ns1\"\ntype = \"{}\"\nhost = \"h\"\ndownlink_f_port = 10",
            match server_type {
                ServerType::ChirpstackV4 => "chirpstack_v4",
                ServerType::TtnV3 => "ttn_v3",
            }
        ))
        .unwrap();
        let mut cfg = cfg;
        cfg.marshaler = marshaler;
        let (client, eventloop) = AsyncClient::new(rumqttc::MqttOptions::new("t", "h", 1), 8);
        (Link::new(&cfg, client), eventloop)
    }

    fn command(payload: command_payload::Kind, f_port: u32, confirmed: bool) -> Command {
        Command {
            id: "0192f0c4-7d1e-7000-8000-000000000001".into(),
            device_id: "lamp-1".into(),
            payload: Some(CommandPayload {
                kind: Some(payload),
            }),
            f_port,
            confirmed,
            expires_time_ms: 1_700_000_000_123,
            ..Default::default()
        }
    }

    #[test]
    fn chirpstack_downlink() {
        let route = Route {
            server: "ns1".into(),
            application: "app-1".into(),
            device: "0101010101010101".into(),
        };
        let (l, _) = link(ServerType::ChirpstackV4, Marshaler::Auto);
        let raw = command(command_payload::Kind::Raw(vec![1, 2, 255]), 0, true);
        let (topic, body, f_port) = l.downlink(&route, &raw);
        assert_eq!(
            topic,
            "application/app-1/device/0101010101010101/command/down"
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": raw.id, "devEui": "0101010101010101", "confirmed": true,
                "fPort": 10, "data": "AQL/", "expiresAt": "2023-11-14T22:13:20.123Z"})
        );
        assert_eq!(f_port, 10);
        let obj = command(
            command_payload::Kind::ParamsJson(r#"{"on":true,"level":[1,2.5]}"#.into()),
            7,
            false,
        );
        let (_, body, _) = l.downlink(&route, &obj);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (v["fPort"].as_u64(), v["confirmed"].as_bool()),
            (Some(7), Some(false))
        );
        assert_eq!(
            v["object"],
            serde_json::json!({"on": true, "level": [1, 2.5]})
        );
        // the protobuf marshaler: ChirpStack's own message
        let (l, _) = link(ServerType::ChirpstackV4, Marshaler::Protobuf);
        let (_, body, _) = l.downlink(&route, &obj);
        let d = ipb::DownlinkCommand::decode(body.as_slice()).unwrap();
        assert_eq!(
            (d.id.as_str(), d.f_port, d.data.len()),
            (obj.id.as_str(), 7, 0)
        );
        let on = &d.object.unwrap().fields["on"];
        assert_eq!(on.kind, Some(prost_types::value::Kind::BoolValue(true)));
    }

    #[test]
    fn tts_downlink() {
        let route = Route {
            server: "ns1".into(),
            application: "lights@city".into(),
            device: "lamp-eui-1".into(),
        };
        let (l, _) = link(ServerType::TtnV3, Marshaler::Auto);
        let c = command(command_payload::Kind::Raw(vec![0xbe, 0xef]), 15, true);
        let (topic, body, _) = l.downlink(&route, &c);
        assert_eq!(topic, "v3/lights@city/devices/lamp-eui-1/down/push");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"downlinks": [{"f_port": 15, "confirmed": true, "priority": "NORMAL",
                "frm_payload": "vu8=", "correlation_ids": [format!("citygw:cmd:{}", c.id)]}]})
        );
        assert_eq!(l.qos(), QoS::AtMostOnce);
    }

    #[tokio::test]
    async fn publishes_are_matched_to_their_pubacks() {
        // the event loop's request queue stays open while it exists
        let (l, _eventloop) = link(ServerType::ChirpstackV4, Marshaler::Auto);
        assert_eq!(
            l.publish("t/a", vec![]).unwrap_err(),
            Refused::Closed,
            "not connected"
        );
        l.connected.store(true, Ordering::Release);
        let mut a = l.publish("t/a", vec![]).unwrap();
        let mut b = l.publish("t/b", vec![]).unwrap();
        let mut c = l.publish("t/c", vec![]).unwrap();
        l.outgoing_publish(1);
        l.outgoing_publish(2);
        l.collided(1); // c waits for id 1
        l.outgoing_publish(1); // a resent after a reconnect: still a
        assert!(a.try_recv().is_err() && b.try_recv().is_err());
        l.puback(2);
        assert!(b.try_recv().is_ok());
        l.puback(1);
        assert!(a.try_recv().is_ok());
        assert!(c.try_recv().is_err(), "c is now in flight under id 1");
        l.outgoing_publish(1); // rumqttc sends c
        l.puback(1);
        assert!(c.try_recv().is_ok());
        // a closed link gives up what waits on it
        let mut d = l.publish("t/d", vec![]).unwrap();
        l.tracker.lock().unwrap().close();
        assert!(matches!(
            d.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(l.publish("t/e", vec![]).is_err());
    }
}
