use std::collections::BTreeSet;
use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::proto::{reading, DeadLetter, Reading};

fn opts() -> StoreOptions {
    StoreOptions {
        commit_window: Duration::from_millis(1),
        max_batch: 512,
        retention: Duration::from_secs(3600),
        ..Default::default()
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, opts()).expect("open store")
}

fn reading(device: &str, device_time_ms: i64, received_time_ms: i64) -> Reading {
    Reading {
        device_id: device.into(),
        tenant: "city".into(),
        quantity: "temperature".into(),
        value: Some(reading::Value::Number(device_time_ms as f64)),
        unit: "Cel".into(),
        device_time_ms,
        received_time_ms,
        ..Default::default()
    }
}

fn dead(device: &str, received_time_ms: i64) -> DeadLetter {
    DeadLetter {
        device_id: device.into(),
        received_time_ms,
        reason: "malformed_json".into(),
        payload_head: b"{oops".to_vec(),
        payload_size: 5,
        ..Default::default()
    }
}

fn ids(readings: &[Reading]) -> Vec<u64> {
    readings.iter().map(|r| r.id).collect()
}

#[tokio::test]
async fn ids_strictly_increase_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.last_reading_id(), 0);
    let a = store
        .append(vec![reading("d1", 1, 1), reading("d1", 2, 2)])
        .await
        .unwrap();
    let b = store.append(vec![reading("d2", 3, 3)]).await.unwrap();
    assert_eq!(a, 1..3);
    assert_eq!(b, 3..4);
    assert_eq!(store.last_reading_id(), 3);
    let dl = store.dead_letter(dead("d1", 1)).await.unwrap();
    assert_eq!(dl, 1);
    store.close().await;
    assert!(matches!(
        store.append(vec![reading("d1", 9, 9)]).await,
        Err(StoreError::Closed)
    ));
    drop(store); // the directory stays locked while any handle lives

    let store = open(dir.path());
    assert_eq!(store.last_reading_id(), 3);
    let all = store.readings_after(0, 100).unwrap();
    assert_eq!(ids(&all), vec![1, 2, 3]);
    assert_eq!(all[2].device_id, "d2");
    assert_eq!(all[2].value, Some(reading::Value::Number(3.0)));
    let c = store.append(vec![reading("d1", 4, 4)]).await.unwrap();
    assert_eq!(c, 4..5);
    assert_eq!(store.dead_letter(dead("d1", 2)).await.unwrap(), 2);
    store.close().await;
}

#[tokio::test]
async fn device_readings_range_order_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Out of time order on purpose, two readings share a device time, and a device whose id
    // extends "d1" past a NUL byte must not leak into d1's results.
    store
        .append(vec![
            reading("d1", 30, 0),
            reading("d1", -10, 0),
            reading("d1", 20, 0),
            reading("d2", 20, 0),
            reading("d1\0x", 25, 0),
            reading("d1", 20, 0),
            reading("d10", 20, 0),
        ])
        .await
        .unwrap();

    let all = store
        .device_readings("d1", i64::MIN, i64::MAX, 100)
        .unwrap();
    let got: Vec<(i64, u64)> = all.iter().map(|r| (r.device_time_ms, r.id)).collect();
    assert_eq!(got, vec![(-10, 2), (20, 3), (20, 6), (30, 1)]);
    assert!(all.iter().all(|r| r.device_id == "d1"));

    let mid = store.device_readings("d1", 20, 30, 100).unwrap();
    assert_eq!(ids(&mid), vec![3, 6, 1]);
    let limited = store.device_readings("d1", i64::MIN, i64::MAX, 2).unwrap();
    assert_eq!(ids(&limited), vec![2, 3]);
    assert!(store.device_readings("d1", 21, 29, 100).unwrap().is_empty());
    assert!(store.device_readings("d1", 30, 20, 100).unwrap().is_empty());

    // The latest readings by device time, returned oldest first (what the console charts).
    let latest = store.device_latest_readings("d1", 3).unwrap();
    assert_eq!(
        latest
            .iter()
            .map(|r| (r.device_time_ms, r.id))
            .collect::<Vec<_>>(),
        vec![(20, 3), (20, 6), (30, 1)]
    );
    assert_eq!(
        ids(&store.device_latest_readings("d1", 100).unwrap()),
        vec![2, 3, 6, 1]
    );
    assert!(store.device_latest_readings("d1", 0).unwrap().is_empty());
    assert!(store
        .device_latest_readings("nobody", 5)
        .unwrap()
        .is_empty());
    assert!(store
        .device_readings("nobody", i64::MIN, i64::MAX, 100)
        .unwrap()
        .is_empty());
    assert_eq!(
        ids(&store.device_readings("d1\0x", 0, 100, 10).unwrap()),
        vec![5]
    );
    store.close().await;
}

#[tokio::test]
async fn readings_after_pages_through_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for chunk in 0..5 {
        let batch = (0..7).map(|i| reading("d", chunk * 7 + i, 0)).collect();
        store.append(batch).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store.readings_after(after, 10).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 10);
        after = page.last().unwrap().id;
        seen.extend(ids(&page));
    }
    assert_eq!(seen, (1..=35).collect::<Vec<_>>());
    assert!(store.readings_after(35, 10).unwrap().is_empty());
    assert!(store.readings_after(u64::MAX, 10).unwrap().is_empty());
    assert!(store.readings_after(0, 0).unwrap().is_empty());
    store.close().await;
}

#[tokio::test]
async fn dead_letters_filter_and_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for i in 0..10 {
        let device = if i % 3 == 0 { "bad" } else { "ok" };
        store.dead_letter(dead(device, i)).await.unwrap();
    }
    let all = store.dead_letters(None, 0, 100).unwrap();
    assert_eq!(
        all.iter().map(|d| d.id).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(all[0].reason, "malformed_json");
    assert_eq!(all[0].payload_head, b"{oops");

    let bad = store.dead_letters(Some("bad"), 0, 2).unwrap();
    assert_eq!(bad.iter().map(|d| d.id).collect::<Vec<_>>(), vec![1, 4]);
    let bad = store.dead_letters(Some("bad"), 4, 10).unwrap();
    assert_eq!(bad.iter().map(|d| d.id).collect::<Vec<_>>(), vec![7, 10]);
    let page = store.dead_letters(None, 8, 10).unwrap();
    assert_eq!(page.iter().map(|d| d.id).collect::<Vec<_>>(), vec![9, 10]);
    assert!(store
        .dead_letters(Some("nobody"), 0, 10)
        .unwrap()
        .is_empty());

    // Newest first, paging on with the smallest id seen.
    let newest = store.dead_letters_newest(None, 0, 3).unwrap();
    assert_eq!(
        newest.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![10, 9, 8]
    );
    let next = store.dead_letters_newest(None, 8, 3).unwrap();
    assert_eq!(next.iter().map(|d| d.id).collect::<Vec<_>>(), vec![7, 6, 5]);
    let bad = store.dead_letters_newest(Some("bad"), 10, 10).unwrap();
    assert_eq!(bad.iter().map(|d| d.id).collect::<Vec<_>>(), vec![7, 4, 1]);
    assert!(store.dead_letters_newest(None, 1, 10).unwrap().is_empty());
    store.close().await;
}

#[tokio::test]
async fn retention_deletes_only_old_records_and_never_reuses_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()); // retention 1 h
    let now = 10_000_000_000;
    let old = now - 3_600_001;
    let fresh = now - 3_599_000;
    // Receive times slightly out of id order, as concurrent ingest produces.
    store
        .append(vec![
            reading("d1", 1, old),
            reading("d1", 2, fresh),
            reading("d2", 3, old),
            reading("d1", 4, fresh),
        ])
        .await
        .unwrap();
    store.dead_letter(dead("d1", old)).await.unwrap();
    store.dead_letter(dead("d1", fresh)).await.unwrap();

    let report = store.enforce_retention(now, u64::MAX).unwrap();
    assert_eq!(
        report,
        RetentionReport {
            readings: 2,
            dead_letters: 1
        }
    );
    assert_eq!(ids(&store.readings_after(0, 10).unwrap()), vec![2, 4]);
    assert_eq!(
        ids(&store.device_readings("d1", i64::MIN, i64::MAX, 10).unwrap()),
        vec![2, 4]
    );
    assert!(store
        .device_readings("d2", i64::MIN, i64::MAX, 10)
        .unwrap()
        .is_empty());
    let dls = store.dead_letters(None, 0, 10).unwrap();
    assert_eq!(dls.iter().map(|d| d.id).collect::<Vec<_>>(), vec![2]);
    assert_eq!(
        store.enforce_retention(now, u64::MAX).unwrap(),
        RetentionReport::default()
    );

    // Everything expires; ids must still continue after a restart.
    let report = store.enforce_retention(now + 3_600_000, u64::MAX).unwrap();
    assert_eq!(
        report,
        RetentionReport {
            readings: 2,
            dead_letters: 1
        }
    );
    assert!(store.readings_after(0, 10).unwrap().is_empty());
    store.close().await;
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.append(vec![reading("d1", 5, now)]).await.unwrap(),
        5..6
    );
    assert_eq!(store.dead_letter(dead("d1", now)).await.unwrap(), 3);
    store.close().await;
}

#[tokio::test]
async fn retention_walks_many_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let n = 3 * retention::tests_chunk() + 17;
    for start in (0..n).step_by(500) {
        let batch = (start..(start + 500).min(n))
            .map(|i| reading("d", i as i64, 0))
            .collect();
        store.append(batch).await.unwrap();
    }
    store
        .append(vec![reading("d", -1, 10_000_000_000)])
        .await
        .unwrap();
    let report = store.enforce_retention(10_000_000_000, u64::MAX).unwrap();
    assert_eq!(report.readings, n as u64);
    assert_eq!(store.readings_after(0, 10).unwrap().len(), 1);
    assert_eq!(
        store
            .device_readings("d", i64::MIN, i64::MAX, 10)
            .unwrap()
            .len(),
        1
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_all_acked_and_readable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tasks = 64;
    let per_task = 50;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let device = format!("dev-{t}");
            let mut acked = Vec::new();
            for i in 0..per_task {
                let ids = store.append(vec![reading(&device, i, 0)]).await.unwrap();
                acked.extend(ids);
            }
            acked
        }));
    }
    let mut all = BTreeSet::new();
    for h in handles {
        for id in h.await.unwrap() {
            assert!(all.insert(id), "id {id} handed out twice");
        }
    }
    let total = (tasks * per_task) as u64;
    assert_eq!(all.len() as u64, total);
    assert_eq!(store.last_reading_id(), total);
    assert_eq!(
        store.readings_after(0, usize::MAX).unwrap().len() as u64,
        total
    );
    for t in 0..tasks {
        let got = store
            .device_readings(&format!("dev-{t}"), i64::MIN, i64::MAX, 1000)
            .unwrap();
        let times: Vec<i64> = got.iter().map(|r| r.device_time_ms).collect();
        assert_eq!(times, (0..per_task).collect::<Vec<_>>());
        // One task appends sequentially, so its ids follow its order.
        assert!(got.windows(2).all(|w| w[0].id < w[1].id));
    }
    store.close().await;
}

#[tokio::test]
async fn best_effort_readings_ride_along() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.append_best_effort(vec![reading("qos0", 1, 0), reading("qos0", 2, 0)]);
    // A durable append queued after them commits in the same or a later batch.
    store.append(vec![reading("qos1", 3, 0)]).await.unwrap();
    assert_eq!(
        store
            .device_readings("qos0", i64::MIN, i64::MAX, 10)
            .unwrap()
            .len(),
        2
    );
    store.close().await;
    store.append_best_effort(vec![reading("qos0", 4, 0)]); // closed: dropped, no panic
}

#[tokio::test]
async fn records_roundtrip_per_table() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let put = |table, id: &str, v: Option<&[u8]>| {
        store.put_records(table, vec![(id.to_string(), v.map(<[u8]>::to_vec))])
    };
    put(Table::Devices, "b", Some(b"rec-b")).await.unwrap();
    store
        .put_records(
            Table::Devices,
            vec![
                ("a".into(), Some(b"rec-a".to_vec())),
                ("c".into(), Some(vec![])),
            ],
        )
        .await
        .unwrap();
    put(Table::Devices, "b", Some(b"rec-b2")).await.unwrap();
    put(Table::Agencies, "env", Some(b"agency")).await.unwrap();
    put(Table::Agencies, "gone", Some(b"x")).await.unwrap();
    put(Table::Agencies, "gone", None).await.unwrap();
    store.close().await;
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.load_records(Table::Devices).unwrap(),
        vec![
            ("a".to_string(), b"rec-a".to_vec()),
            ("b".to_string(), b"rec-b2".to_vec()),
            ("c".to_string(), vec![]),
        ]
    );
    assert_eq!(
        store.load_records(Table::Agencies).unwrap(),
        vec![("env".to_string(), b"agency".to_vec())]
    );
    store.close().await;
}

#[tokio::test]
async fn dropped_without_close_keeps_acked_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let clone = store.clone();
    let ids = store
        .append(vec![reading("d", 1, 0), reading("d", 2, 0)])
        .await
        .unwrap();
    store.append_best_effort(vec![reading("d", 3, 0)]);
    drop(store);
    drop(clone);
    let store = open(dir.path());
    let got = store.readings_after(0, 10).unwrap();
    assert!(ids.clone().all(|id| got.iter().any(|r| r.id == id)));
    assert_eq!(
        store.append(vec![reading("d", 4, 0)]).await.unwrap().start,
        got.last().unwrap().id + 1
    );
    store.close().await;
}

const CRASH_DIR_ENV: &str = "CITYGW_STORE_CRASH_CHILD_DIR";

/// A real crash: a child process appends until SIGKILL; every range it reported as acked must be
/// there after reopening, with ids continuing past everything it may have written.
#[test]
fn killed_process_keeps_acked_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut acked = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("acked ") {
            let (a, b) = rest.split_once(' ').unwrap();
            acked.push(a.parse::<u64>().unwrap()..b.parse::<u64>().unwrap());
            if acked.len() == 200 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no close, mid-commit most likely
    child.wait().unwrap();
    assert_eq!(acked.len(), 200, "child stopped early");

    let store = open(dir.path());
    let stored: BTreeSet<u64> = store
        .readings_after(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    for range in &acked {
        for id in range.clone() {
            assert!(stored.contains(&id), "acked id {id} lost");
        }
    }
    let max_seen = stored.last().copied().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let next = rt
        .block_on(store.append(vec![reading("after", 0, 0)]))
        .unwrap();
    assert!(next.start > max_seen);
    rt.block_on(store.close());
}

/// Child half of [`killed_process_keeps_acked_data`]; does nothing when run on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by killed_process_keeps_acked_data"]
async fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let store = open(Path::new(&dir));
    // Several concurrent appenders so the kill lands between and inside group commits.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for t in 0..4 {
        let store = store.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            for i in 0..1_000_000i64 {
                let batch = (0..5)
                    .map(|k| reading(&format!("c{t}"), i * 5 + k, 0))
                    .collect();
                let Ok(ids) = store.append(batch).await else {
                    return;
                };
                if tx.send(ids).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut out = std::io::stdout();
    while let Ok(Some(ids)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        writeln!(out, "acked {} {}", ids.start, ids.end).unwrap();
        out.flush().unwrap();
    }
}

#[tokio::test]
async fn retention_keeps_what_a_forwarder_has_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let old = 1_000;
    store
        .append((1..=6).map(|t| reading("d1", t, old)).collect())
        .await
        .unwrap();
    // Readings 1..=6 are one run (same identity); deliver-up-to inside it keeps the whole run.
    assert_eq!(
        store.enforce_retention(10_000_000_000, 3).unwrap().readings,
        0
    );
    store.append(vec![reading("d2", 7, old)]).await.unwrap();
    let report = store.enforce_retention(10_000_000_000, 6).unwrap();
    assert_eq!(report.readings, 6);
    assert_eq!(ids(&store.readings_after(0, 10).unwrap()), vec![7]);
    store.close().await;
}

/// Below the low-space watermark new readings and (below half of it) dead letters are refused
/// without being written, registry records still go in, and the store says why.
#[tokio::test]
async fn below_the_watermark_only_records_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            min_free_bytes: u64::MAX,
            ..opts()
        },
    )
    .unwrap();
    let refused = store.append(vec![reading("d1", 1, 1)]).await.unwrap_err();
    assert!(refused.is_refusal(), "{refused}");
    assert!(store
        .dead_letter(dead("d1", 1))
        .await
        .unwrap_err()
        .is_refusal());
    store
        .put_records(Table::Devices, vec![("d1".into(), Some(b"{}".to_vec()))])
        .await
        .unwrap();
    let why = store.unwritable().expect("unwritable");
    assert!(why.contains("min_free_mb"), "{why}");
    assert_eq!(store.readings_after(0, 10).unwrap(), Vec::<Reading>::new());
    assert_eq!(store.last_reading_id(), 0);
    store.close().await;
    drop(store);

    // With room, the next id is the first: nothing was handed out for the refused reading.
    let store = open(dir.path());
    assert!(store.unwritable().is_none());
    assert_eq!(store.append(vec![reading("d1", 1, 1)]).await.unwrap(), 1..2);
    assert_eq!(store.load_records(Table::Devices).unwrap().len(), 1);
    store.close().await;
}
