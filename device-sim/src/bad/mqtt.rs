//! The bad-input modes over MQTT 5, where every refusal is visible as a reason code.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use tokio::sync::Barrier;
use tokio::time::Instant;

use super::{oversize_json, wait_for, Attacks, BadArgs, Mode, Roles, CONTROL_READING};
use crate::credentials::Credential;

/// Sends `args.count` attempts of the mode's bad input; the answers by name.
pub async fn attack(args: &BadArgs, roles: &Roles) -> anyhow::Result<Attacks> {
    let target = Target::new(args);
    let n = args.count;
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut storm_peak = None;
    match args.mode {
        Mode::WrongCredentials | Mode::UnknownDevice => {
            for i in 0..n {
                let mut c = roles.attacker(i);
                if args.mode == Mode::UnknownDevice {
                    c.id = format!("no-such-device-{i}");
                } else {
                    c.secret = format!("wrong-{}", c.secret.len() + i);
                }
                let answer = connack_answer(target.connect(&c).await).await;
                *answers.entry(answer).or_default() += 1;
            }
        }
        Mode::SpoofedTopic | Mode::Malformed | Mode::Oversize => {
            for i in 0..n {
                let c = roles.attacker(i);
                let (topic, payload) = match args.mode {
                    Mode::SpoofedTopic => (
                        format!("devices/{}/telemetry", roles.victim.id),
                        br#"{"temperature": 99}"#.to_vec(),
                    ),
                    Mode::Malformed => (
                        format!("devices/{}/telemetry/json", c.id),
                        super::MALFORMED_JSON.to_vec(),
                    ),
                    _ => (
                        format!("devices/{}/telemetry/json", c.id),
                        oversize_json(args.max_payload_bytes() + 1),
                    ),
                };
                let answer = match target.connect(&c).await {
                    Ok((client, mut el)) => {
                        let a =
                            publish_answer(&client, &mut el, &topic, payload, target.timeout).await;
                        crate::mqtt::disconnect_v5(&client, &mut el).await;
                        a
                    }
                    Err(a) => format!("attacker could not connect: {a}"),
                };
                *answers.entry(answer).or_default() += 1;
            }
        }
        Mode::Storm => {
            let barrier = Arc::new(Barrier::new(n + 1));
            let release = Arc::new(Barrier::new(n + 1));
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let (c, target) = (roles.attacker(i), target.clone());
                    let (barrier, release) = (barrier.clone(), release.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        let r = target.connect(&c).await;
                        // Hold the connection until every storm connection has been answered.
                        release.wait().await;
                        connack_answer(r).await
                    })
                })
                .collect();
            barrier.wait().await;
            let started = Instant::now();
            // All answered when the gateway shows them connected at once (or the wait ends).
            let peak = wait_for(
                &args.metrics,
                "citygw_connected_devices",
                &[],
                target.timeout,
                |v| v >= n as f64,
            )
            .await?;
            release.wait().await;
            for t in tasks {
                *answers.entry(t.await?).or_default() += 1;
            }
            eprintln!(
                "storm: the gateway showed {peak} connections {:.1} s after the storm started",
                started.elapsed().as_secs_f64()
            );
            storm_peak = Some(peak);
        }
    }
    Ok(Attacks {
        answers,
        storm_peak,
    })
}

/// A good device publishes once after the bad input; true when it is acknowledged.
pub async fn control(args: &BadArgs, control: &Credential) -> bool {
    let target = Target::new(args);
    match target.connect(control).await {
        Ok((client, mut el)) => {
            let a = publish_answer(
                &client,
                &mut el,
                &format!("devices/{}/telemetry/json", control.id),
                CONTROL_READING.to_vec(),
                target.timeout,
            )
            .await;
            crate::mqtt::disconnect_v5(&client, &mut el).await;
            a == "puback Success"
        }
        Err(_) => false,
    }
}

#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    timeout: Duration,
}

impl Target {
    fn new(args: &BadArgs) -> Self {
        Self {
            host: args.mqtt_host.clone(),
            port: args.mqtt_port,
            timeout: Duration::from_secs(args.timeout),
        }
    }

    /// Connects as `c`; an error is the answer's name (e.g. "connack BadUserNamePassword").
    async fn connect(&self, c: &Credential) -> Result<(AsyncClient, EventLoop), String> {
        let mut opts = MqttOptions::new(c.id.clone(), self.host.as_str(), self.port);
        opts.set_credentials(c.id.clone(), c.secret.clone())
            .set_keep_alive(Duration::from_secs(60))
            .set_connection_timeout(self.timeout.as_secs().max(1))
            .set_max_packet_size(Some(32 << 20))
            .set_outgoing_inflight_upper_limit(4);
        let (client, mut el) = AsyncClient::new(opts, 4);
        match tokio::time::timeout(self.timeout, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) if a.code == ConnectReturnCode::Success => {
                Ok((client, el))
            }
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => Err(format!("connack {:?}", a.code)),
            Ok(Err(ConnectionError::ConnectionRefused(code))) => Err(format!("connack {code:?}")),
            Ok(Err(e)) => Err(format!("connect error: {e}")),
            Ok(Ok(other)) => Err(format!("unexpected {other:?}")),
            Err(_) => Err("connect timeout".into()),
        }
    }
}

/// Names a connection attempt's answer, disconnecting a session that was accepted.
async fn connack_answer(r: Result<(AsyncClient, EventLoop), String>) -> String {
    match r {
        Ok((client, mut el)) => {
            crate::mqtt::disconnect_v5(&client, &mut el).await;
            "connack Success".to_string()
        }
        Err(a) => a,
    }
}

/// Publishes at QoS 1 and names the answer ("puback Success", "puback NotAuthorized", ...).
async fn publish_answer(
    client: &AsyncClient,
    el: &mut EventLoop,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> String {
    if let Err(e) = client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
    {
        return format!("publish not queued: {e}");
    }
    let answer = tokio::time::timeout(timeout, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    return format!("puback {:?}", ack.reason)
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    return format!("disconnect {:?}", d.reason_code)
                }
                Ok(_) => {}
                Err(e) => return format!("connection lost: {e}"),
            }
        }
    })
    .await;
    answer.unwrap_or_else(|_| "no answer".into())
}
