//! `device-sim bench mqtt`: publish load and publish-to-PUBACK latency.
//!
//! Every connection has its own rumqttc `AsyncClient` + `EventLoop` on one multi-threaded
//! runtime. A producer task per connection publishes as fast as the client's flow control lets
//! it (at most `--inflight` unacknowledged QoS1 messages), or paced to `--rate`. The event loop
//! task timestamps each PUBLISH when rumqttc reports it written (`Outgoing::Publish(pkid)`) and
//! records the latency when the PUBACK for that packet id arrives.
//!
//! Honesty rules: only messages whose PUBACK arrives inside the measured window count (QoS0:
//! messages written inside it, as there is no ack); warmup is excluded; the window starts once
//! every connection has been attempted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::mqtt::{self, ConnectProgress, Connected, Session};
use crate::report::{self, LatencySummary, Window};
use crate::{credentials, payload, TargetArgs};

#[derive(Args, Debug)]
pub struct MqttBenchArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Seconds measured, after the warmup.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Seconds of load before the measurement starts (not counted).
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Publish QoS: 1 (latency = publish to PUBACK) or 0 (fire and forget; counts messages written).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Unacknowledged QoS1 publishes per connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Payload size in bytes: a JSON air-quality reading padded with whitespace.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Total messages per second across all connections; 0 = as fast as acks allow.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Add a quantity `sent_us` (this publisher's wall clock, Unix microseconds, taken when the
    /// payload is built) to every payload, for `device-sim bench fanout`'s publish-to-subscriber
    /// latency. The gateway then stores four readings per message instead of three.
    #[arg(long)]
    pub stamp: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A name for this run in the report (e.g. "bare rmqtt").
    #[arg(long)]
    pub label: Option<String>,
}

/// What one connection measured.
struct ConnStats {
    hist: Histogram<u64>,
    /// PUBACKs (QoS1) or writes (QoS0) inside the measured window.
    counted: u64,
    disconnects: u64,
    /// PUBACKs for packet ids with no recorded send (should stay 0).
    unmatched_acks: u64,
    errors: Vec<String>,
}

/// Counters read by the progress line while the run is on.
#[derive(Default)]
struct Live {
    acked: AtomicU64,
    sent: AtomicU64,
    disconnects: AtomicU64,
    /// Acked (QoS0: written) per second since the start, warmup included.
    timeline: std::sync::Mutex<Vec<u64>>,
}

#[derive(Serialize)]
pub struct MqttBenchReport {
    pub label: Option<String>,
    pub target: String,
    pub qos: u8,
    pub connections_requested: usize,
    pub connections_established: u64,
    pub connect_failures: BTreeMap<&'static str, u64>,
    pub inflight_per_connection: u16,
    pub payload_bytes: usize,
    pub rate_target_msgs_per_sec: f64,
    /// Payloads carried the `sent_us` quantity (`--stamp`).
    pub stamped: bool,
    pub warmup_secs: u64,
    pub measured_secs: f64,
    /// QoS1: messages whose PUBACK arrived in the window; QoS0: messages written in it.
    pub messages: u64,
    pub msgs_per_sec: f64,
    /// Publish-to-PUBACK (QoS1 only).
    pub latency: Option<LatencySummary>,
    pub published_total: u64,
    pub disconnects: u64,
    pub unmatched_acks: u64,
    pub error_samples: Vec<String>,
    pub client_rss_kib: Option<u64>,
    /// Acked (QoS0: written) messages in each second from the start, warmup included: shows
    /// stalls and drift that the totals hide.
    pub per_second: Vec<u64>,
}

pub async fn run(args: MqttBenchArgs) -> anyhow::Result<()> {
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let n = args.target.connections;
    anyhow::ensure!(n > 0, "--connections must be positive");
    anyhow::ensure!(args.duration > 0, "--duration must be positive");
    let creds = credentials::for_connections(args.target.credentials.as_deref(), n)?;
    let session = Session {
        keep_alive: Duration::from_secs(60),
        inflight: args.inflight,
        request_capacity: 16,
        connect_timeout: Duration::from_secs(args.target.connect_timeout),
    };
    // The window is set once every connection has been attempted; until then, connected
    // clients wait.
    let (start_tx, start_rx) = watch::channel::<Option<Window>>(None);
    let progress = Arc::new(ConnectProgress::default());
    let live = Arc::new(Live::default());
    let load = Load {
        qos,
        payload_bytes: args.payload_bytes,
        per_conn_interval: (args.rate > 0.0).then(|| Duration::from_secs_f64(n as f64 / args.rate)),
        connections: n,
        stamp: args.stamp,
    };
    let handles = {
        let (live, progress) = (live.clone(), progress.clone());
        mqtt::spawn_connections(
            &args.target,
            creds,
            session,
            progress.clone(),
            move |conn| drive(conn, start_rx.clone(), load, live.clone(), progress.clone()),
        )
    };

    let connect_started = Instant::now();
    while progress.attempted() < n as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected = progress.connected.load(Ordering::Relaxed);
    eprintln!(
        "connected {connected}/{n} in {:.1}s ({} failed)",
        connect_started.elapsed().as_secs_f64(),
        progress.failed.load(Ordering::Relaxed)
    );
    for s in progress.samples() {
        eprintln!("  connect error: {s}");
    }
    anyhow::ensure!(connected > 0, "no connection could be established");

    let start = Instant::now();
    let window = Window {
        start,
        measure_from: start + Duration::from_secs(args.warmup),
        end: start + Duration::from_secs(args.warmup + args.duration),
    };
    let _ = start_tx.send(Some(window));
    let ticker = tokio::spawn(progress_line(live.clone(), window, qos));

    let mut hist = report::latency_histogram();
    let (mut counted, mut disconnects, mut unmatched) = (0, 0, 0);
    let mut errors: Vec<String> = Vec::new();
    for h in handles {
        if let Ok(Some(stats)) = h.await {
            hist.add(&stats.hist).expect("same histogram bounds");
            counted += stats.counted;
            disconnects += stats.disconnects;
            unmatched += stats.unmatched_acks;
            for e in stats.errors {
                if errors.len() < 10 && !errors.contains(&e) {
                    errors.push(e);
                }
            }
        }
    }
    ticker.abort();

    let measured = (window.end - window.measure_from).as_secs_f64();
    let report = MqttBenchReport {
        label: args.label.clone(),
        target: format!("{}:{}", args.target.host.join(","), args.target.port),
        qos: args.qos,
        connections_requested: n,
        connections_established: connected,
        connect_failures: progress.failures(),
        inflight_per_connection: args.inflight,
        payload_bytes: args.payload_bytes,
        rate_target_msgs_per_sec: args.rate,
        stamped: args.stamp,
        warmup_secs: args.warmup,
        measured_secs: measured,
        messages: counted,
        msgs_per_sec: counted as f64 / measured,
        latency: (qos != QoS::AtMostOnce).then(|| LatencySummary::from_histogram(&hist)),
        published_total: live.sent.load(Ordering::Relaxed),
        disconnects,
        unmatched_acks: unmatched,
        error_samples: errors,
        client_rss_kib: report::own_rss_kib(),
        per_second: live.timeline.lock().unwrap().clone(),
    };
    print_report(&report);
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Load {
    qos: QoS,
    payload_bytes: usize,
    per_conn_interval: Option<Duration>,
    connections: usize,
    stamp: bool,
}

/// Runs one connection: waits for the window, publishes until it ends, measures acks.
async fn drive(
    conn: Connected,
    mut start_rx: watch::Receiver<Option<Window>>,
    load: Load,
    live: Arc<Live>,
    progress: Arc<ConnectProgress>,
) -> ConnStats {
    let Connected {
        index,
        device_id,
        client,
        mut eventloop,
    } = conn;
    let mut stats = ConnStats {
        hist: report::latency_histogram(),
        counted: 0,
        disconnects: 0,
        unmatched_acks: 0,
        errors: vec![],
    };
    // Keep the connection served (pings) while the others connect.
    let window = loop {
        if let Some(w) = *start_rx.borrow_and_update() {
            break w;
        }
        tokio::select! {
            changed = start_rx.changed() => if changed.is_err() { progress.closed(); return stats; },
            ev = eventloop.poll() => if let Err(e) = ev {
                stats.disconnects += 1;
                stats.errors.push(format!("before start: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            },
        }
    };

    let queued = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(produce(
        client.clone(),
        mqtt::telemetry_topic(&device_id),
        index,
        load,
        window,
        queued.clone(),
    ));
    let mut tracker = Tracker::new(load.qos, window, live);
    loop {
        match tokio::time::timeout_at(window.end, eventloop.poll()).await {
            Err(_) => break,
            Ok(Ok(ev)) => tracker.on_event(ev, &mut stats),
            Ok(Err(e)) => {
                // rumqttc reconnects on the next poll; the unacked messages of this session
                // are lost to the count (clean session), never counted twice.
                tracker.on_error(e, &mut stats);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    producer.abort();
    let _ = producer.await;
    // Drain: let what is queued or in flight be written and acknowledged (not counted) before
    // DISCONNECT, so the broker is not left writing PUBACKs to a closed socket.
    let drain_until = Instant::now() + Duration::from_secs(5);
    while !tracker.drained(queued.load(Ordering::Relaxed)) {
        match tokio::time::timeout_at(drain_until, eventloop.poll()).await {
            Ok(Ok(ev)) => tracker.on_event(ev, &mut stats),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    mqtt::disconnect(&client, &mut eventloop).await;
    progress.closed();
    stats
}

/// Matches PUBACKs to the instants their PUBLISH was written, for one connection.
struct Tracker {
    qos: QoS,
    window: Window,
    live: Arc<Live>,
    /// Send instants by packet id (rumqttc uses ids 1..=inflight, but any u16 is accepted).
    sent_at: Vec<Option<Instant>>,
    /// PUBLISH packets written (each request the producer queued is written once per session).
    written: u64,
    /// QoS1 publishes written and not yet acknowledged.
    outstanding: u64,
}

impl Tracker {
    fn new(qos: QoS, window: Window, live: Arc<Live>) -> Self {
        Self {
            qos,
            window,
            live,
            sent_at: vec![None; usize::from(u16::MAX) + 1],
            written: 0,
            outstanding: 0,
        }
    }

    fn on_event(&mut self, ev: Event, stats: &mut ConnStats) {
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let now = Instant::now();
                self.written += 1;
                self.live.sent.fetch_add(1, Ordering::Relaxed);
                if self.qos == QoS::AtMostOnce {
                    if self.window.measuring(now) {
                        stats.counted += 1;
                    }
                } else if self.sent_at[usize::from(pkid)].replace(now).is_none() {
                    self.outstanding += 1;
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let now = Instant::now();
                self.live.acked.fetch_add(1, Ordering::Relaxed);
                match self.sent_at[usize::from(ack.pkid)].take() {
                    Some(t0) => {
                        self.outstanding -= 1;
                        if self.window.measuring(now) {
                            let us = (now - t0).as_micros().max(1) as u64;
                            let _ = stats.hist.record(us.min(stats.hist.high()));
                            stats.counted += 1;
                        }
                    }
                    None => stats.unmatched_acks += 1,
                }
            }
            _ => {}
        }
    }

    fn on_error(&mut self, e: rumqttc::ConnectionError, stats: &mut ConnStats) {
        stats.disconnects += 1;
        self.live.disconnects.fetch_add(1, Ordering::Relaxed);
        if stats.errors.len() < 3 {
            stats.errors.push(e.to_string());
        }
        self.sent_at.iter_mut().for_each(|s| *s = None);
        self.outstanding = 0;
    }

    /// Everything the producer queued has been written and acknowledged.
    fn drained(&self, queued: u64) -> bool {
        self.outstanding == 0 && self.written >= queued
    }
}

/// Publishes telemetry on one connection until the window ends.
async fn produce(
    client: AsyncClient,
    topic: String,
    index: usize,
    load: Load,
    window: Window,
    queued: Arc<AtomicU64>,
) {
    let mut ticker = load.per_conn_interval.map(|period| {
        // Stagger the connections across one period so a fixed rate is smooth.
        let offset = period.mul_f64(index as f64 / load.connections as f64);
        tokio::time::interval_at(window.start + offset, period)
    });
    let mut buf = String::with_capacity(load.payload_bytes + 16);
    let mut seq = 0u64;
    while Instant::now() < window.end {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let sent_us = load.stamp.then_some(now.as_micros() as u64);
        payload::reading(
            &mut buf,
            seq,
            now.as_millis() as u64,
            sent_us,
            load.payload_bytes,
        );
        seq += 1;
        if client
            .publish(topic.as_str(), load.qos, false, buf.as_bytes().to_vec())
            .await
            .is_err()
        {
            return;
        }
        queued.fetch_add(1, Ordering::Relaxed);
    }
}

async fn progress_line(live: Arc<Live>, window: Window, qos: QoS) {
    let mut last = 0;
    let mut tick = tokio::time::interval_at(
        window.start + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        let t = tick.tick().await;
        let done = if qos == QoS::AtMostOnce {
            live.sent.load(Ordering::Relaxed)
        } else {
            live.acked.load(Ordering::Relaxed)
        };
        let phase = if t < window.measure_from {
            "warmup"
        } else {
            "measure"
        };
        eprintln!(
            "[{phase} {:>3}s] {} {done} ({}/s), disconnects {}",
            (t - window.start).as_secs(),
            if qos == QoS::AtMostOnce {
                "sent"
            } else {
                "acked"
            },
            done - last,
            live.disconnects.load(Ordering::Relaxed)
        );
        live.timeline.lock().unwrap().push(done - last);
        last = done;
    }
}

fn print_report(r: &MqttBenchReport) {
    let mut rows = vec![
        ("target", r.target.clone()),
        (
            "qos / inflight / payload",
            format!(
                "{} / {} / {} B",
                r.qos, r.inflight_per_connection, r.payload_bytes
            ),
        ),
        (
            "connections",
            format!(
                "{} of {} established",
                r.connections_established, r.connections_requested
            ),
        ),
        (
            "window",
            format!("{:.1} s after {} s warmup", r.measured_secs, r.warmup_secs),
        ),
        (
            if r.qos == 0 {
                "messages written"
            } else {
                "messages acked"
            },
            r.messages.to_string(),
        ),
        ("throughput", format!("{:.0} msgs/s", r.msgs_per_sec)),
    ];
    if let Some((percentiles, tail)) = r.latency.as_ref().map(LatencySummary::cells) {
        rows.push(("latency ms p50/p90/p99", percentiles));
        rows.push(("latency ms p99.9/max", tail));
    }
    rows.push(("connect failures", format!("{:?}", r.connect_failures)));
    rows.push(("disconnects", r.disconnects.to_string()));
    if r.unmatched_acks > 0 {
        rows.push(("unmatched PUBACKs", r.unmatched_acks.to_string()));
    }
    report::print_report("mqtt", r.label.as_deref(), &rows, &r.error_samples);
}
