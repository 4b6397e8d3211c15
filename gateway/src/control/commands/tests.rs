//! The state machine on a real store: states only move forward, every change is durable and
//! survives a reopen, TTLs expire open commands, one device's commands are dispatched in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::transport::{Dispatch, Kind, Transport};
use super::*;
use crate::registry::NewDevice;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    registry: Registry,
    commands: Commands,
    shutdown: CancellationToken,
    runner: tokio::task::JoinHandle<()>,
}

async fn open(dir: tempfile::TempDir, add_device: bool) -> Fixture {
    let store = Store::open(dir.path(), Default::default()).unwrap();
    let registry = Registry::load(store.clone()).unwrap();
    if add_device {
        let device = NewDevice {
            id: "sl-1".into(),
            tenant: "hanoi".into(),
            kind: "street_light".into(),
            ..Default::default()
        };
        registry.add(device, 1).await.unwrap();
    }
    let (commands, runner) = Commands::load(store.clone(), registry.clone()).unwrap();
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(runner.run(Duration::from_secs(86_400), shutdown.clone()));
    Fixture {
        _dir: dir,
        store,
        registry,
        commands,
        shutdown,
        runner,
    }
}

impl Fixture {
    async fn reopen(self) -> Fixture {
        self.shutdown.cancel();
        self.runner.await.unwrap();
        drop(self.commands);
        drop(self.registry);
        self.store.close().await;
        drop(self.store);
        open(self._dir, false).await
    }
}

fn request(name: &str, ttl_ms: u64) -> SendCommandRequest {
    SendCommandRequest {
        device_id: "sl-1".into(),
        name: name.into(),
        payload: None,
        ttl_ms,
        confirmed: false,
        f_port: 0,
    }
}

fn state(c: &Command) -> &'static str {
    state_label(state_of(c))
}

#[tokio::test]
async fn states_move_forward_durably_and_survive_a_reopen() {
    let f = open(tempfile::tempdir().unwrap(), true).await;
    let c = f.commands.send(request("light", 0), "admin").await.unwrap();
    assert_eq!(state(&c), "QUEUED");
    assert_eq!(c.expires_time_ms - c.created_time_ms, DEFAULT_TTL_MS as i64);
    assert_eq!(c.transport, "mqtt");

    let p = |p| f.commands.progress(&c.id, p, "device:sl-1");
    p(Progress::Sent("s".into())).unwrap().wait().await.unwrap();
    p(Progress::Delivered {
        detail: "d".into(),
        last: false,
    })
    .unwrap()
    .wait()
    .await
    .unwrap();
    // A late SENT is stale, and changes nothing.
    assert_eq!(
        p(Progress::Sent("again".into())).err(),
        Some(ProgressError::Stale("DELIVERED"))
    );
    p(Progress::Succeeded {
        result: "42".into(),
    })
    .unwrap()
    .wait()
    .await
    .unwrap();
    assert_eq!(
        p(Progress::Failed { error: "x".into() }).err(),
        Some(ProgressError::Stale("SUCCEEDED"))
    );
    let open_one = f
        .commands
        .send(request("dim", 0), "rule:dark")
        .await
        .unwrap();

    let f = f.reopen().await;
    let done = f.commands.get(&c.id).unwrap().unwrap();
    assert_eq!(state(&done), "SUCCEEDED");
    assert_eq!(done.result, "42");
    let history: Vec<_> = done
        .history
        .iter()
        .map(|e| {
            (
                state_label(CommandState::try_from(e.state).unwrap()),
                e.by.as_str(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            ("QUEUED", "admin"),
            ("SENT", "device:sl-1"),
            ("DELIVERED", "device:sl-1"),
            ("SUCCEEDED", "device:sl-1")
        ]
    );
    // Only the open command is reloaded as open; both are listed, newest first.
    assert!(f.commands.open_for("sl-1", &open_one.id).is_ok());
    assert!(f.commands.open_for("sl-1", &c.id).is_err());
    let listed: Vec<_> = f
        .commands
        .list("", 10, |_| true)
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(listed, [open_one.id.clone(), c.id.clone()]);
    let older = f.commands.list(&open_one.id, 10, |_| true).unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].id, c.id);
}

#[tokio::test]
async fn ttl_expires_open_commands_also_after_a_reopen() {
    let f = open(tempfile::tempdir().unwrap(), true).await;
    let short = f.commands.send(request("a", 300), "admin").await.unwrap();
    let later = f.commands.send(request("b", 1500), "admin").await.unwrap();
    let mut changes = f.commands.watch();
    loop {
        let c = tokio::time::timeout(Duration::from_secs(10), changes.recv())
            .await
            .expect("expiry within 10 s")
            .unwrap();
        if c.id == short.id && state(&c) == "EXPIRED" {
            assert_eq!(c.error, "ttl passed while QUEUED");
            break;
        }
    }
    let f = f.reopen().await;
    assert!(f.commands.open_for("sl-1", &later.id).is_ok());
    let mut changes = f.commands.watch();
    let c = tokio::time::timeout(Duration::from_secs(10), changes.recv())
        .await
        .expect("the reloaded deadline fires")
        .unwrap();
    assert_eq!((c.id.as_str(), state(&c)), (later.id.as_str(), "EXPIRED"));
}

#[tokio::test]
async fn refusals() {
    let f = open(tempfile::tempdir().unwrap(), true).await;
    let send = |r| f.commands.send(r, "admin");
    assert!(matches!(
        send(SendCommandRequest {
            device_id: "nope".into(),
            ..request("a", 0)
        })
        .await,
        Err(SendError::UnknownDevice(_))
    ));
    for bad in [
        request("", 0),
        request("has space", 0),
        request("a", MAX_TTL_MS + 1),
        SendCommandRequest {
            f_port: 224,
            ..request("a", 0)
        },
        SendCommandRequest {
            payload: Some(CommandPayload {
                kind: Some(command_payload::Kind::ParamsJson("[1]".into())),
            }),
            ..request("a", 0)
        },
    ] {
        assert!(matches!(send(bad).await, Err(SendError::Invalid(_))));
    }
}

/// A test double of a transport (no device behind it): records what it was asked to dispatch.
struct Recording {
    seen: Mutex<Vec<String>>,
    reachable: bool,
}

#[async_trait]
impl Transport for Recording {
    fn kind(&self) -> Kind {
        Kind::Mqtt
    }

    async fn dispatch(&self, _: &Commands, c: &Command) -> Dispatch {
        self.seen.lock().unwrap().push(c.name.clone());
        if self.reachable {
            Dispatch::Handed
        } else {
            Dispatch::Waiting
        }
    }
}

#[tokio::test]
async fn dispatch_in_order_once_and_again_after_a_reconnect() {
    let f = open(tempfile::tempdir().unwrap(), true).await;
    let offline = Arc::new(Recording {
        seen: Mutex::default(),
        reachable: false,
    });
    f.commands.attach(offline.clone());
    for name in ["a", "b", "c"] {
        f.commands.send(request(name, 0), "admin").await.unwrap();
    }
    // An unreachable device is tried with its oldest command only, each time it is woken.
    let wait = |r: Arc<Recording>, n: usize| async move {
        for _ in 0..500 {
            if r.seen.lock().unwrap().len() >= n {
                return r.seen.lock().unwrap().clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("dispatched {:?}", r.seen.lock().unwrap());
    };
    assert!(wait(offline.clone(), 1).await.iter().all(|n| n == "a"));

    let online = Arc::new(Recording {
        seen: Mutex::default(),
        reachable: true,
    });
    f.commands.attach(online.clone());
    assert_eq!(wait(online.clone(), 3).await, ["a", "b", "c"]);
    // Handed commands are not handed again by a plain wake, only after a reconnect.
    f.commands.wake("sl-1", false);
    f.commands.wake("sl-1", true);
    assert_eq!(
        wait(online.clone(), 6).await,
        ["a", "b", "c", "a", "b", "c"]
    );
}

#[tokio::test]
async fn retention_deletes_old_final_commands_and_keeps_open_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Default::default()).unwrap();
    let log = CommandLog::new(store.clone());
    let entry = |id: &str, created_time_ms: i64, open: bool| Entry {
        command: Command {
            id: id.into(),
            created_time_ms,
            ..Default::default()
        },
        open,
    };
    log.save(&[
        entry("01-old-final", 1_000, false),
        entry("02-old-open", 2_000, true),
        entry("03-new-final", 9_000, false),
    ])
    .await
    .unwrap();
    assert_eq!(log.expire(5_000).await.unwrap(), 1);
    assert!(log.get("01-old-final").unwrap().is_none());
    assert!(log.get("02-old-open").unwrap().is_some());
    assert!(log.get("03-new-final").unwrap().is_some());
    assert_eq!(
        log.expire(5_000).await.unwrap(),
        0,
        "a second pass deletes nothing"
    );
}
