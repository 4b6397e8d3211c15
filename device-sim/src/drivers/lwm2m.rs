//! LwM2M 1.1 client over plain CoAP (`?t=<secret>` authenticates the registration).
//!
//! The device registers with the object instances its profile maps to (plus /1/0 and /3/0),
//! answers the server's Observe GETs, and every interval sends each observed resource's value as
//! a confirmable notification (SenML with `bt` = device time, so the ack log's time is the
//! stored reading's). The registration is updated before its lifetime runs out and removed at
//! the end of the run. A notification counts as acknowledged on the server's empty ACK, which
//! the gateway sends after the durable write.
//!
//! Quantities become resources the way the gateway names them back
//! ([`citygw::sources::coap::lwm2m::objects`]): a quantity with its own IPSO object
//! (temperature → /3303/0/5700, battery → /3/0/9, ...) uses it; any other goes to an instance
//! of the generic sensor 3300, which the gateway stores as `sensor_value[_n]` — the ack log
//! records that name, because it is the one the agency stream shows.
//!
//! A street light in a scenario with `commands = true` also registers IPSO Light Control
//! `/3311/0` and takes the server's Writes of 5850 (on/off) and 5851 (dimmer) ([`Lamp`]); its next
//! notifications carry the new state.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use citygw::sources::coap::lwm2m::objects::{self, Path};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::time::Instant;

use super::coap::exchange::Outcome;
use super::coap::session::Session;
use super::coap::{self, uint, Ack};
use super::lamp::{Lamp, LIGHT_CONTROL};
use super::sample::Sampler;
use crate::credentials::Credential;
use crate::run::{AckRecord, DriverContext, RunStats};
use crate::scenario::profiles::{CommandSet, Profile, Value};
use crate::scenario::{Scenario, SimDevice};

const CF_LINK_FORMAT: u32 = 40;
const CF_SENML_JSON: u32 = 110;
const CF_SENML_CBOR: u32 = 112;
/// Answers kept for the server's retransmitted requests (same message id, same answer).
const ANSWERS_KEPT: usize = 8;

/// One profile quantity as an LwM2M resource.
#[derive(Debug, PartialEq)]
struct Resource {
    path: Path,
    /// The quantity the gateway stores the resource's values under.
    stored_as: Arc<str>,
    /// Position of the value in the profile's sample.
    value: usize,
}

fn resources(profile: &Profile) -> Vec<Resource> {
    let mut generic = 0u16;
    profile
        .quantities
        .iter()
        .enumerate()
        .map(|(value, q)| {
            let own = objects::KNOWN
                .iter()
                .find(|k| k.quantity == q.name && k.object != 3300);
            let path = match own {
                Some(k) => Path {
                    object: k.object,
                    instance: 0,
                    resource: k.resource,
                },
                None => {
                    generic += 1;
                    Path {
                        object: 3300,
                        instance: generic - 1,
                        resource: 5700,
                    }
                }
            };
            Resource {
                path,
                stored_as: path.quantity().0.into(),
                value,
            }
        })
        .collect()
}

/// The registration payload (CoRE link format): the server and device objects, then ours.
fn links(resources: &[Resource], lamp: bool) -> String {
    let mut instances = vec![(1, 0), (3, 0)];
    if lamp {
        instances.push((LIGHT_CONTROL, 0));
    }
    for r in resources {
        let i = (r.path.object, r.path.instance);
        if !instances.contains(&i) {
            instances.push(i);
        }
    }
    instances
        .iter()
        .map(|(o, i)| format!("</{o}/{i}>"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One resource value as a SenML pack: base name = the instance path, so the gateway names
/// the reading from `bn` + `n`; `bt` is the device time.
fn senml(path: Path, ts_s: u64, value: Value, cbor: bool) -> Vec<u8> {
    let bn = format!("/{}/{}/", path.object, path.instance);
    let n = path.resource.to_string();
    if cbor {
        use ciborium::Value as C;
        let label = |l: i64| C::Integer(l.into());
        let v = match value {
            Value::Number(x) => (label(2), C::Float(x)),
            Value::Boolean(b) => (label(4), C::Bool(b)),
        };
        let pack = C::Array(vec![C::Map(vec![
            (label(-2), C::Text(bn)),
            (label(-3), C::Integer(ts_s.into())),
            (label(0), C::Text(n)),
            v,
        ])]);
        let mut out = Vec::new();
        ciborium::into_writer(&pack, &mut out).expect("CBOR encodes");
        out
    } else {
        let mut r = serde_json::json!({"bn": bn, "bt": ts_s, "n": n});
        match value {
            Value::Number(x) => r["v"] = x.into(),
            Value::Boolean(b) => r["vb"] = b.into(),
        }
        serde_json::to_vec(&[r]).expect("JSON encodes")
    }
}

/// An observation the server established: its token and the last Observe sequence number.
struct Observation {
    token: Vec<u8>,
    seq: u32,
}

/// The client's state the server's requests act on.
struct Device<'a> {
    resources: Vec<Resource>,
    observed: Vec<Option<Observation>>,
    /// The sample answered to Observe GETs: device time and values.
    current: (u64, Vec<(String, Value)>),
    cbor: bool,
    answers: VecDeque<(u16, Packet)>,
    sampler: Sampler<'a>,
    /// A street light that takes Writes (scenario `commands = true`), and where they are counted.
    lamp: Option<(Box<Lamp>, Arc<RunStats>)>,
}

impl<'a> Device<'a> {
    fn new(dev: &SimDevice, scenario: &'a Scenario, stats: &Arc<RunStats>) -> Self {
        let profile = &scenario.profiles[&dev.profile];
        let resources = resources(profile);
        let lamp = (scenario.commands && profile.commands == Some(CommandSet::Lamp))
            .then(|| (Box::new(Lamp::new(profile)), stats.clone()));
        Self {
            lamp,
            observed: resources.iter().map(|_| None).collect(),
            resources,
            current: (0, Vec::new()),
            cbor: dev.format != crate::format::Format::SenmlJson,
            answers: VecDeque::new(),
            sampler: Sampler::new(dev, scenario),
        }
    }

    fn content_format(&self) -> u32 {
        if self.cbor {
            CF_SENML_CBOR
        } else {
            CF_SENML_JSON
        }
    }

    /// Samples the profile (with a lamp's commanded state); the device time.
    fn sample(&mut self) -> u64 {
        let ts_s = self.sampler.sample();
        if let Some((lamp, _)) = &self.lamp {
            lamp.apply(&mut self.sampler.values);
        }
        ts_s
    }

    /// A Write of the lamp's Light Control object: 2.04, or 4.00 with the reason.
    fn write_lamp(&mut self, resource: u16, req: &Packet) -> Option<Packet> {
        let (lamp, stats) = self.lamp.as_mut()?;
        stats.commands_received.fetch_add(1, Ordering::Relaxed);
        let text = String::from_utf8_lossy(&req.payload);
        let mut p = Packet::new();
        match lamp.write(resource, &text) {
            Ok(()) => {
                stats.commands_ok.fetch_add(1, Ordering::Relaxed);
                p.header.code = MessageClass::Response(ResponseType::Changed);
            }
            Err(e) => {
                stats.commands_error.fetch_add(1, Ordering::Relaxed);
                p.header.code = MessageClass::Response(ResponseType::BadRequest);
                p.payload = e.into_bytes();
            }
        }
        Some(p)
    }

    /// A value of resource `i` at `ts_s`, framed as a 2.05 Content.
    fn content(&self, i: usize, ts_s: u64, values: &[(String, Value)]) -> Packet {
        let r = &self.resources[i];
        let mut p = Packet::new();
        p.header.code = MessageClass::Response(ResponseType::Content);
        p.add_option(CoapOption::ContentFormat, uint(self.content_format()));
        p.payload = senml(r.path, ts_s, values[r.value].1, self.cbor);
        p
    }

    /// Answers a server request: Observe GETs of our resources; anything else is refused.
    fn on_request(&mut self, req: &Packet) -> Option<Packet> {
        if req.header.get_type() != MessageType::Confirmable {
            return None;
        }
        let mid = req.header.message_id;
        if let Some((_, a)) = self.answers.iter().find(|(m, _)| *m == mid) {
            return Some(a.clone());
        }
        let mut answer = self.answer(req);
        answer.header.set_type(MessageType::Acknowledgement);
        answer.header.message_id = mid;
        answer.set_token(req.get_token().to_vec());
        if self.answers.len() == ANSWERS_KEPT {
            self.answers.pop_front();
        }
        self.answers.push_back((mid, answer.clone()));
        Some(answer)
    }

    fn answer(&mut self, req: &Packet) -> Packet {
        let path = req
            .get_option(CoapOption::UriPath)
            .map(|segs| {
                segs.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .and_then(|p| Path::parse(&p));
        if let Some(p) = path.filter(|p| p.object == LIGHT_CONTROL && p.instance == 0) {
            if req.header.code == MessageClass::Request(RequestType::Put) {
                if let Some(answer) = self.write_lamp(p.resource, req) {
                    return answer;
                }
            }
        }
        let found = path.and_then(|p| self.resources.iter().position(|r| r.path == p));
        let code = match (req.header.code, found) {
            (MessageClass::Request(RequestType::Get), Some(i)) => {
                let (ts_s, values) = &self.current;
                let mut p = self.content(i, *ts_s, values);
                match req.get_observe_value() {
                    Some(Ok(0)) => {
                        p.set_observe_value(0);
                        self.observed[i] = Some(Observation {
                            token: req.get_token().to_vec(),
                            seq: 0,
                        });
                    }
                    Some(Ok(1)) => self.observed[i] = None,
                    _ => {}
                }
                return p;
            }
            // Resources the profile does not have (a mains-powered device's battery level).
            (MessageClass::Request(RequestType::Get), None) => ResponseType::NotFound,
            _ => ResponseType::MethodNotAllowed,
        };
        let mut p = Packet::new();
        p.header.code = MessageClass::Response(code);
        p
    }

    /// Registers (again): observations of an earlier registration are gone with it, and the
    /// server's new Observe GETs are answered with a fresh sample, so no stored reading repeats.
    /// Returns the registration's location, or the reason it failed.
    async fn register(
        &mut self,
        session: &mut Session,
        request: Packet,
        give_up_at: Instant,
    ) -> Result<Vec<Vec<u8>>, String> {
        self.observed.iter_mut().for_each(|o| *o = None);
        self.current = (self.sample(), self.sampler.values.clone());
        match session
            .exchange(request, give_up_at, &mut |r| self.on_request(r))
            .await
        {
            Outcome::Answer(p)
                if p.header.code == MessageClass::Response(ResponseType::Created) =>
            {
                Ok(p.get_option(CoapOption::LocationPath)
                    .map(|l| l.iter().cloned().collect())
                    .unwrap_or_default())
            }
            Outcome::Answer(p) => Err(format!("lwm2m register {}", p.header.code)),
            _ => Err("lwm2m register timeout".into()),
        }
    }

    /// The next notification of observation `i` at `ts_s`.
    fn notification(&mut self, i: usize, ts_s: u64) -> Option<Packet> {
        let obs = self.observed[i].as_mut()?;
        obs.seq = (obs.seq + 1) & 0xff_ffff;
        let (token, seq) = (obs.token.clone(), obs.seq);
        let mut p = self.content(i, ts_s, &self.sampler.values);
        p.set_token(token);
        p.set_observe_value(seq);
        Some(p)
    }
}

fn registration_request(dev: &SimDevice, secret: &str, lifetime_s: u64, links: String) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(RequestType::Post);
    p.add_option(CoapOption::UriPath, b"rd".to_vec());
    p.add_option(CoapOption::ContentFormat, uint(CF_LINK_FORMAT));
    for q in [
        format!("ep={}", dev.id),
        format!("lt={lifetime_s}"),
        "lwm2m=1.1".into(),
        "b=U".into(),
        format!("t={secret}"),
    ] {
        p.add_option(CoapOption::UriQuery, q.into_bytes());
    }
    p.payload = links.into_bytes();
    p
}

/// An update (POST) or de-registration (DELETE) of the registration at `location`.
fn registration_change(method: RequestType, location: &[Vec<u8>], secret: &str) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(method);
    for seg in location {
        p.add_option(CoapOption::UriPath, seg.clone());
    }
    p.add_option(CoapOption::UriQuery, format!("t={secret}").into_bytes());
    p
}

/// Runs one LwM2M client until the run ends.
pub async fn run_device(dev: SimDevice, cred: Credential, ctx: Arc<DriverContext>) {
    tokio::time::sleep_until(ctx.connect_at(dev.index)).await;
    if Instant::now() >= ctx.end() {
        return;
    }
    let Some(mut session) = coap::open(&dev, &cred, false, &ctx).await else {
        return;
    };
    let stats = &ctx.stats;
    let give_up_at = ctx.end() + ctx.drain;
    let mut device = Device::new(&dev, &ctx.scenario, &ctx.stats);
    let links = links(&device.resources, device.lamp.is_some());
    let mut next = device.sampler.first_report();
    let lifetime = ctx.coap.lwm2m_lifetime;
    let register = registration_request(&dev, &cred.secret, lifetime.as_secs(), links);
    let permit = ctx.connect_permits.acquire().await;
    let registered = device
        .register(&mut session, register.clone(), give_up_at)
        .await;
    drop(permit);
    let mut location = match registered {
        Ok(l) => l,
        Err(reason) => {
            stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            stats.count_reason(reason.clone());
            stats.note_error(format!("{}: {reason}", dev.id));
            return;
        }
    };
    stats.opened();
    // Updated at two thirds of the lifetime, well before the server expires the registration.
    let mut update_at = Instant::now() + lifetime.mul_f64(2.0 / 3.0);
    let device_id: Arc<str> = dev.id.as_str().into();
    while next < ctx.end() {
        session
            .serve_until(next, &mut |r| device.on_request(r))
            .await;
        if Instant::now() >= update_at {
            let update = registration_change(RequestType::Post, &location, &cred.secret);
            let outcome = session
                .exchange(update, give_up_at, &mut |r| device.on_request(r))
                .await;
            match outcome {
                Outcome::Answer(p)
                    if p.header.code == MessageClass::Response(ResponseType::Changed) => {}
                // The server no longer has the registration (restart, expiry): register again.
                Outcome::Answer(p)
                    if p.header.code == MessageClass::Response(ResponseType::NotFound) =>
                {
                    stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    match device
                        .register(&mut session, register.clone(), give_up_at)
                        .await
                    {
                        Ok(l) => location = l,
                        Err(reason) => {
                            stats.count_reason(reason.clone());
                            stats.note_error(format!("{}: {reason}", dev.id));
                        }
                    }
                }
                other => {
                    stats.count_reason("lwm2m update failed".into());
                    stats.note_error(format!("{}: registration update: {other:?}", dev.id));
                }
            }
            update_at = Instant::now() + lifetime.mul_f64(2.0 / 3.0);
        }
        let ts_s = device.sample();
        for i in 0..device.resources.len() {
            let Some(n) = device.notification(i, ts_s) else {
                continue;
            };
            stats.sent.fetch_add(1, Ordering::Relaxed);
            let sent_at = Instant::now();
            let outcome = session
                .exchange(n, give_up_at, &mut |r| device.on_request(r))
                .await;
            if outcome == Outcome::Reset {
                // The server no longer knows the observation (RFC 7641 section 3.6).
                device.observed[i] = None;
            }
            let ack = Ack {
                record: AckRecord {
                    device_id: device_id.clone(),
                    device_time_ms: ts_s * 1000,
                    quantities: device.resources[i].stored_as.clone(),
                },
                readings: 1,
            };
            coap::record(&ctx, outcome, sent_at, ack);
        }
        next = coap::next_report(next, dev.interval, Instant::now());
    }
    let bye = registration_change(RequestType::Delete, &location, &cred.secret);
    let outcome = session
        .exchange(bye, give_up_at, &mut |r| device.on_request(r))
        .await;
    if !matches!(&outcome, Outcome::Answer(p) if p.header.code == MessageClass::Response(ResponseType::Deleted))
    {
        stats.note_error(format!("{}: de-registration: {outcome:?}", dev.id));
    }
    session.close().await;
    stats.closed();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::profiles::default_profiles;

    #[test]
    fn quantities_map_to_the_objects_the_gateway_names_back() {
        let p = default_profiles();
        let weather = resources(&p["weather"]);
        let stored: Vec<&str> = weather.iter().map(|r| &*r.stored_as).collect();
        assert_eq!(
            stored,
            [
                "temperature",
                "humidity",
                "pressure",
                "sensor_value",
                "sensor_value_1",
                "sensor_value_2",
                "lux"
            ]
        );
        assert_eq!(weather[0].path, Path::parse("/3303/0/5700").unwrap());
        let flood = resources(&p["flood_gauge"]);
        assert_eq!(flood[1].path, Path::parse("/3/0/9").unwrap());
        assert_eq!(&*flood[1].stored_as, "battery");
        assert_eq!(links(&flood, false), "</1/0>,</3/0>,</3300/0>");
    }

    fn weather_station() -> Scenario {
        let text = "name = \"t\"\ntenant = \"x\"\nprovince = \"01\"\ndevices = 1\n\
                    duration_secs = 5\n[profiles]\nweather = 1\n[protocols]\nlwm2m = 1\n\
                    [formats]\nsenml-json = 1\n";
        Scenario::parse("s.toml", text, default_profiles()).unwrap()
    }

    fn get(path: &str, mid: u16, observe: Option<u32>) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Get);
        p.header.message_id = mid;
        p.set_token(b"tk".to_vec());
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        if let Some(o) = observe {
            p.set_observe_value(o);
        }
        p
    }

    #[test]
    fn observe_gets_are_answered_once_per_message_id_and_notified_after() {
        let scenario = weather_station();
        let dev = &scenario.plan()[0];
        let mut d = Device::new(dev, &scenario, &Arc::default());
        d.current = (1_700_000_000, {
            d.sampler.sample();
            d.sampler.values.clone()
        });
        let a = d.on_request(&get("/3303/0/5700", 7, Some(0))).unwrap();
        assert_eq!(a.header.get_type(), MessageType::Acknowledgement);
        assert_eq!((a.header.message_id, a.get_token()), (7, &b"tk"[..]));
        assert_eq!(a.header.code, MessageClass::Response(ResponseType::Content));
        assert_eq!(a.get_observe_value().unwrap().unwrap(), 0);
        let v: serde_json::Value = serde_json::from_slice(&a.payload).unwrap();
        assert_eq!(v[0]["bt"], 1_700_000_000u64);
        // The server's retransmission gets the same answer.
        assert_eq!(d.on_request(&get("/3303/0/5700", 7, Some(0))), Some(a));

        let ts = d.sampler.sample();
        let n = d.notification(0, ts).unwrap();
        assert_eq!(n.get_token(), b"tk");
        assert_eq!(n.get_observe_value().unwrap().unwrap(), 1);
        assert_eq!(
            d.notification(0, ts)
                .unwrap()
                .get_observe_value()
                .unwrap()
                .unwrap(),
            2
        );
        assert!(d.notification(1, ts).is_none(), "humidity is not observed");

        // No battery on a weather station; nothing but GET is served.
        let none = d.on_request(&get("/3/0/9", 8, Some(0))).unwrap();
        assert_eq!(
            none.header.code,
            MessageClass::Response(ResponseType::NotFound)
        );
        let mut put = get("/3303/0/5700", 9, None);
        put.header.code = MessageClass::Request(RequestType::Put);
        let refused = d.on_request(&put).unwrap();
        assert_eq!(
            refused.header.code,
            MessageClass::Response(ResponseType::MethodNotAllowed)
        );
    }

    #[test]
    fn a_street_light_takes_writes_of_its_light_control_object() {
        let text = "name = \"t\"\ntenant = \"x\"\nprovince = \"01\"\ndevices = 1\n\
                    duration_secs = 5\ncommands = true\n[profiles]\nstreet_light = 1\n\
                    [protocols]\nlwm2m = 1\n";
        let scenario = Scenario::parse("s.toml", text, default_profiles()).unwrap();
        let dev = &scenario.plan()[0];
        let stats = Arc::new(RunStats::default());
        let mut d = Device::new(dev, &scenario, &stats);
        assert!(links(&d.resources, d.lamp.is_some()).contains("</3311/0>"));
        let write = |path: &str, mid: u16, value: &str| {
            let mut p = get(path, mid, None);
            p.header.code = MessageClass::Request(RequestType::Put);
            p.payload = value.as_bytes().to_vec();
            p
        };
        let ok = d.on_request(&write("/3311/0/5851", 1, "40")).unwrap();
        assert_eq!(
            ok.header.code,
            MessageClass::Response(ResponseType::Changed)
        );
        d.on_request(&write("/3311/0/5850", 2, "1")).unwrap();
        let bad = d.on_request(&write("/3311/0/5850", 3, "on")).unwrap();
        assert_eq!(
            bad.header.code,
            MessageClass::Response(ResponseType::BadRequest)
        );
        assert!(String::from_utf8_lossy(&bad.payload).contains("5850"));
        // An Execute of the lamp is not allowed.
        let mut exec = write("/3311/0/5850", 4, "");
        exec.header.code = MessageClass::Request(RequestType::Post);
        let refused = d.on_request(&exec).unwrap();
        assert_eq!(
            refused.header.code,
            MessageClass::Response(ResponseType::MethodNotAllowed)
        );
        assert_eq!(stats.commands_ok.load(Ordering::Relaxed), 2);
        assert_eq!(stats.commands_error.load(Ordering::Relaxed), 1);
        // The next sample shows it: on, 40 % of 110 W.
        d.sample();
        let v = |name: &str| d.sampler.values.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(v("lamp_state"), Value::Boolean(true));
        assert_eq!(v("power"), Value::Number(44.0));
    }

    #[test]
    fn senml_values_name_their_resource_and_carry_device_time() {
        let p = Path::parse("/3303/0/5700").unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&senml(p, 1_700_000_000, Value::Number(21.5), false)).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"bn": "/3303/0/", "bt": 1_700_000_000u64, "n": "5700", "v": 21.5}])
        );
        let cbor = senml(p, 5, Value::Boolean(true), true);
        let v: ciborium::Value = ciborium::from_reader(cbor.as_slice()).unwrap();
        let rec = v.as_array().unwrap()[0].as_map().unwrap();
        assert!(rec
            .iter()
            .any(|(k, v)| k.as_integer() == Some(4.into()) && v.as_bool() == Some(true)));
    }
}
