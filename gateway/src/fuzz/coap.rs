//! CoAP datagrams through the real server (dedup, Block1 reassembly, the telemetry handler, LwM2M
//! registration and updates) into a real store, and LwM2M resource values in every content
//! format.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use coap_lite::{MessageClass, MessageType, Packet};

use super::codecs::{check_decoded, NOW_MS};
use super::{run, MAX_DETAIL};
use crate::config::CoapConfig;
use crate::pipeline::Pipeline;
use crate::registry::{NewDevice, Registry};
use crate::sources::coap::handler::Identity;
use crate::sources::coap::lwm2m::objects::Path;
use crate::sources::coap::lwm2m::{values, Lwm2m};
use crate::sources::coap::Server;
use crate::store::Store;

thread_local! {
    /// Set by the panic hook when a task of this thread's runtime panics.
    static PANICKED: Cell<bool> = const { Cell::new(false) };
}

/// Tokio catches a panic inside a spawned task; the hook still sees it, on the runtime's thread.
fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.with(|p| p.set(true));
            previous(info);
        }));
    });
}

/// One datagram after another from a fresh port each, to the server of a gateway with one
/// registered device. A confirmable request is always answered, with a well-formed message that
/// echoes its id and token; a reply's diagnostic stays short; nothing panics.
#[test]
fn coap_datagram() {
    watch_panics();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), Default::default()).expect("store");
    let (server, lwm2m) = rt.block_on(async {
        let registry = Registry::load(store.clone()).expect("registry");
        let device = NewDevice {
            id: "fz-1".into(),
            tenant: "hanoi".into(),
            kind: "weather".into(),
            secret: Some("fuzz-secret-1".into()),
            ..Default::default()
        };
        registry.add(device, NOW_MS).await.expect("device");
        let cfg = CoapConfig {
            max_payload_bytes: 4096,
            ..Default::default()
        };
        let pipeline = Pipeline::new(store.clone(), cfg.max_payload_bytes);
        let lwm2m = Arc::new(Lwm2m::new(registry.clone(), pipeline.clone(), &cfg));
        let server = Server::new(&cfg, registry, pipeline, Some(lwm2m.clone()));
        (server, lwm2m)
    });
    let port = Mutex::new(10_000u16);
    run("coap_datagram", |datagram| {
        let peer = {
            let mut p = port.lock().expect("port");
            *p = p.wrapping_add(1).max(10_000);
            SocketAddr::from(([127, 0, 0, 2], *p))
        };
        let identity = match datagram.first() {
            Some(b) if b & 1 == 1 => Identity::Token,
            _ => Identity::Session("fz-1".into()),
        };
        let replies = Arc::new(Mutex::new(Vec::new()));
        PANICKED.with(|p| p.set(false));
        rt.block_on(async {
            let sink = replies.clone();
            server.on_datagram(peer, identity, datagram, move |bytes| async move {
                sink.lock().expect("replies").push(bytes);
            });
            // Until every task it spawned (the handler, a store commit) is done.
            for _ in 0..2000 {
                if rt.metrics().num_alive_tasks() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        assert!(!PANICKED.with(Cell::get), "a task panicked");
        let replies = replies.lock().expect("replies");
        let Ok(request) = Packet::from_bytes(datagram) else {
            return;
        };
        if request.header.get_type() == MessageType::Confirmable
            && datagram[0] >> 6 == 1
            && matches!(request.header.code, MessageClass::Request(_))
        {
            assert_eq!(replies.len(), 1, "a confirmable request gets one answer");
        }
        for reply in replies.iter() {
            let reply = Packet::from_bytes(reply).expect("the reply parses");
            if reply.header.get_type() == MessageType::Acknowledgement {
                assert_eq!(reply.header.message_id, request.header.message_id);
                assert_eq!(reply.get_token(), request.get_token());
            }
            assert!(
                reply.payload.len() <= MAX_DETAIL,
                "{} byte reply",
                reply.payload.len()
            );
        }
    });
    drop(lwm2m);
    rt.block_on(store.close());
}

/// LwM2M values in every content format a client may use, for a resource path and without one.
#[test]
fn lwm2m_values() {
    let formats = [
        None,
        Some(values::CF_TEXT),
        Some(values::CF_TEXT_OLD),
        Some(values::CF_TLV),
        Some(values::CF_TLV_OLD),
        Some(values::CF_SENML_JSON),
        Some(values::CF_SENML_CBOR),
        Some(60),
    ];
    let paths = [Path::parse("/3303/0/5700"), Path::parse("/3/0/9"), None];
    run("lwm2m_values", |payload| {
        for cf in formats {
            for path in paths {
                match values::decode(cf, payload, path, NOW_MS) {
                    Ok(decoded) => check_decoded(&decoded),
                    Err(e) => assert!(e.len() <= MAX_DETAIL, "{} byte error", e.len()),
                }
            }
        }
    });
}
