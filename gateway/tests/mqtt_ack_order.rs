//! The pipelined PUBLISH path of the broker citygw embeds (rmqtt, patched in vendor/, decision
//! 0012) under a publish hook that finishes messages in a scrambled order and refuses some of
//! them: PUBACKs must still follow the PUBLISH order of their connection, each carrying its own
//! message's reason code, and no more than the window may be in the hooks at once, also for a
//! client that keeps more in flight than the window.
//!
//! The hook stands in for citygw's store, whose commit order a test cannot choose (it is named
//! here as the one stand-in); the broker, its session loop and the clients (rumqttc, MQTT 3.1.1
//! and 5) are the real ones, over loopback TCP.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rmqtt::codec::v5::PublishAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, PublishAclResult, PublishResult};

const WINDOW: u16 = 16;
const MESSAGES: u64 = 400;

/// Message `i` is refused (PUBACK 0x99 on MQTT 5) when this holds.
fn refused(i: u64) -> bool {
    i % 13 == 7
}

/// A scrambled delay per message: later messages often finish before earlier ones.
fn delay(seed: u64, i: u64) -> Duration {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    Duration::from_micros(x % 3_000)
}

/// Per client id: messages in the hook now, and the most seen at once.
#[derive(Default)]
struct InHooks(Mutex<HashMap<String, (usize, usize)>>);

impl InHooks {
    fn enter(&self, client: &str) {
        let mut map = self.0.lock().unwrap();
        let (now, most) = map.entry(client.to_string()).or_default();
        *now += 1;
        *most = (*most).max(*now);
    }

    fn leave(&self, client: &str) {
        self.0.lock().unwrap().get_mut(client).expect("entered").0 -= 1;
    }

    fn most(&self, client: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .get(client)
            .map_or(0, |(_, most)| *most)
    }
}

struct ScramblingHook {
    seed: u64,
    in_hooks: Arc<InHooks>,
}

#[async_trait]
impl Handler for ScramblingHook {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(_) => (
                false,
                Some(HookResult::AuthResult(AuthResult::Allow(false, None))),
            ),
            Parameter::MessagePublishCheckAcl(s, p) => {
                let i: u64 = std::str::from_utf8(&p.payload)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .expect("payloads are message numbers");
                let client = &s.id.client_id;
                self.in_hooks.enter(client);
                let seed = self.seed ^ client.as_bytes()[client.len() - 1] as u64;
                tokio::time::sleep(delay(seed, i)).await;
                self.in_hooks.leave(client);
                let result = if refused(i) {
                    PublishAclResult(PublishResult::reason_code(
                        PublishAckReason::PayloadFormatInvalid,
                        Some("refused by the test".into()),
                        false,
                    ))
                } else {
                    PublishAclResult::allow()
                };
                (false, Some(HookResult::PublishAclResult(result)))
            }
            _ => (true, acc),
        }
    }
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().expect("local addr")
}

async fn start_broker(seed: u64) -> (SocketAddr, Arc<InHooks>) {
    let addr = free_port();
    let listener = Builder::new()
        .name("mqtt")
        .laddr(addr)
        .max_inflight(NonZeroU16::new(WINDOW).unwrap())
        .pipelined_publishes(true)
        .bind()
        .expect("bind")
        .tcp()
        .expect("tcp listener");
    let scx = ServerContext::new().busy_check_enable(false).build().await;
    let in_hooks = Arc::new(InHooks::default());
    let register = scx.extends.hook_mgr().register();
    for typ in [Type::ClientAuthenticate, Type::MessagePublishCheckAcl] {
        let hook = ScramblingHook {
            seed,
            in_hooks: in_hooks.clone(),
        };
        register.add(typ, Box::new(hook)).await;
    }
    register.start().await;
    tokio::spawn(async move {
        let _ = MqttServer::new(scx).listener(listener).build().run().await;
    });
    (addr, in_hooks)
}

/// What one client saw: packet ids in the order its PUBLISH packets were written, and its
/// PUBACKs in arrival order with their reason code (None on MQTT 3.1.1).
#[derive(Debug, Default)]
struct Seen {
    published: Vec<u16>,
    acked: Vec<(u16, Option<u8>)>,
}

impl Seen {
    fn check(&self, who: &str) {
        assert_eq!(self.published.len() as u64, MESSAGES, "{who}");
        let acked: Vec<u16> = self.acked.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            acked, self.published,
            "{who}: PUBACKs in the order the PUBLISH packets were written"
        );
        for (i, (_, code)) in self.acked.iter().enumerate() {
            if let Some(code) = code {
                let want = if refused(i as u64) { 0x99 } else { 0 };
                assert_eq!(*code, want, "{who}: reason code of message {i}");
            }
        }
    }
}

async fn publish_v5(addr: SocketAddr, id: &str) -> Seen {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    // More than the broker's window: rumqttc keeps to the Receive Maximum of the CONNACK.
    opts.set_outgoing_inflight_upper_limit(WINDOW * 4);
    let (client, mut events) = AsyncClient::new(opts, MESSAGES as usize);
    for i in 0..MESSAGES {
        client
            .publish("t/a", QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    let mut seen = Seen::default();
    while (seen.acked.len() as u64) < MESSAGES {
        match events.poll().await.expect("connection stays up") {
            Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => seen.published.push(pkid),
            Event::Incoming(Packet::PubAck(ack)) => {
                seen.acked.push((ack.pkid, Some(v5_code(&ack.reason))))
            }
            _ => {}
        }
    }
    seen
}

fn v5_code(r: &rumqttc::v5::mqttbytes::v5::PubAckReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    match r {
        R::Success => 0,
        R::PayloadFormatInvalid => 0x99,
        other => panic!("unexpected PUBACK reason {other:?}"),
    }
}

async fn publish_v311(addr: SocketAddr, id: &str) -> Seen {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    // MQTT 3.1.1 has no Receive Maximum: the broker stops reading instead.
    opts.set_inflight(WINDOW * 4);
    let (client, mut events) = AsyncClient::new(opts, MESSAGES as usize);
    for i in 0..MESSAGES {
        client
            .publish("t/b", QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    let mut seen = Seen::default();
    while (seen.acked.len() as u64) < MESSAGES {
        match events.poll().await.expect("connection stays up") {
            Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => seen.published.push(pkid),
            Event::Incoming(Packet::PubAck(ack)) => seen.acked.push((ack.pkid, None)),
            _ => {}
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_keep_publish_order_whatever_order_the_hooks_finish_in() {
    for seed in [1, 0xC17, 0xBEEF] {
        let (addr, in_hooks) = start_broker(seed).await;
        let clients = ["v5-a", "v311-b", "v5-c", "v311-d"].map(|id| {
            tokio::spawn(async move {
                let seen = if id.starts_with("v5") {
                    publish_v5(addr, id).await
                } else {
                    publish_v311(addr, id).await
                };
                (id, seen)
            })
        });
        for client in clients {
            let (id, seen) = tokio::time::timeout(Duration::from_secs(60), client)
                .await
                .expect("clients finish")
                .expect("client task");
            seen.check(&format!("seed {seed}, client {id}"));
            let most = in_hooks.most(id);
            assert!(
                most > 1 && most <= WINDOW as usize,
                "seed {seed}, client {id}: {most} messages in the hooks at once, window {WINDOW}"
            );
        }
    }
}
