//! Events from LoRaWAN network servers' brokers: ChirpStack v4 (JSON and protobuf) and The Things
//! Stack v3, parsed and turned into readings for devices with each payload codec.

use std::sync::Arc;

use super::codecs::{check_decoded, NOW_MS};
use super::{run, MAX_DETAIL};
use crate::registry::{DeviceEntry, NewDevice, Registry};
use crate::sources::lorawan::config::Marshaler;
use crate::sources::lorawan::event::{self, Malformed, Parsed};
use crate::sources::lorawan::{chirpstack, tts};
use crate::store::Store;

/// Devices with every kind of payload codec: the network server's object, raw, LPP, JSON.
fn devices() -> (tempfile::TempDir, Vec<Arc<DeviceEntry>>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let entries = rt.block_on(async {
        let store = Store::open(dir.path(), Default::default()).expect("store");
        let registry = Registry::load(store.clone()).expect("registry");
        let mut entries = Vec::new();
        for (i, codec) in ["", "raw", "lpp", "json"].into_iter().enumerate() {
            let id = format!("lw-{i}");
            let device = NewDevice {
                id: id.clone(),
                tenant: "hanoi".into(),
                kind: "weather".into(),
                dev_eui: format!("70b3d57ed000000{i}"),
                codec: codec.into(),
                ..Default::default()
            };
            registry.add(device, NOW_MS).await.expect("device");
            entries.push(registry.get(&id).expect("added"));
        }
        store.close().await;
        entries
    });
    (dir, entries)
}

fn check(parsed: Result<Parsed, Malformed>, devices: &[Arc<DeviceEntry>]) {
    match parsed {
        Ok(Parsed::Event(ev)) => {
            for device in devices {
                match event::readings(device, &ev, NOW_MS) {
                    Ok(values) => check_decoded(&values),
                    Err((rejection, _)) => {
                        assert!(rejection.detail.len() <= MAX_DETAIL, "{rejection:?}")
                    }
                }
            }
        }
        Ok(Parsed::Ignored(_) | Parsed::Downlink(_)) => {}
        Err(m) => assert!(m.rejection.detail.len() <= MAX_DETAIL, "{:?}", m.rejection),
    }
}

#[test]
fn chirpstack_event() {
    let (_dir, devices) = devices();
    run("chirpstack_event", |payload| {
        for event in ["up", "join", "status", "log", "txack", "ack"] {
            let topic = format!("application/app-1/device/70b3d57ed0000002/event/{event}");
            for marshaler in [Marshaler::Json, Marshaler::Protobuf, Marshaler::Auto] {
                check(chirpstack::parse(&topic, payload, marshaler), &devices);
            }
        }
    });
}

#[test]
fn tts_event() {
    let (_dir, devices) = devices();
    run("tts_event", |payload| {
        for event in ["up", "join", "down/sent", "down/failed"] {
            let topic = format!("v3/city-app@ttn/devices/lw-2/{event}");
            check(tts::parse(&topic, payload), &devices);
        }
    });
}
