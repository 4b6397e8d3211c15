//! `device-sim bench fanout`: many agency subscribers on citygw's gRPC `Telemetry.Subscribe` (or,
//! with `--batched`, `Telemetry.SubscribeBatches`).
//!
//! Each subscriber has its own HTTP/2 connection (its own tonic `Channel`), as separate agencies
//! would, and one `Subscribe` stream with an empty filter (everything in the agency's scope). All
//! connections are opened first; the window then starts and every subscriber calls `Subscribe`
//! at once (live from the tail, or `--resume-after-id` to replay the store first).
//!
//! Measured per subscriber, inside the window only (warmup excluded): readings received per
//! second, and (live subscriptions only; in a replay the stamps would measure the backlog's age)
//! publish-to-subscriber latency for readings whose quantity is `sent_us` (added by
//! `device-sim bench mqtt --stamp`: the publisher's wall clock in Unix microseconds when it built
//! the payload; latency = this process's wall clock at receipt − sent_us, so both must run on one
//! host or on synchronised clocks).
//!
//! A subscriber the gateway ends with RESOURCE_EXHAUSTED (its buffer overflowed) is counted and
//! subscribes again with `resume.after_id` = the `citygw-resume-after-id` trailer, so the run
//! goes on. Correctness is checked on the way: reading ids must increase (a repeat or a step back
//! is a duplicate), a jump over ids is counted as a gap (with an all-tenants, all-kinds agency
//! every stored reading matches, so a gap is a lost reading), and the trailer must equal the id
//! of the last reading received.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use citygw::api::grpc::telemetry::RESUME_TRAILER;
use citygw::proto::reading::Value;
use citygw::proto::telemetry_client::TelemetryClient;
use citygw::proto::{resume_point, Filter, Reading, ResumePoint, SubscribeRequest};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::payload::SENT_US;
use crate::report::{self, LatencySummary, Window};

#[derive(Args, Debug)]
pub struct FanoutArgs {
    /// citygw's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub grpc: String,
    /// Agency bearer token (`citygw agency add ... --output json` prints it once).
    #[arg(long, env = "DEVICE_SIM_AGENCY_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Concurrent Subscribe streams, each on its own HTTP/2 connection.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Replay: every subscriber resumes after this reading id (0 = from the first stored
    /// reading), so it reads the store before live data. Without it: live from the tail.
    #[arg(long)]
    pub resume_after_id: Option<u64>,
    /// Seconds measured, after the warmup.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Seconds after the subscriptions start before the measurement starts (not counted).
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Replay end: a subscriber stops once it has received this id (e.g. the store's last id
    /// when the replay starts), and its rate is taken over its own time up to then, so a
    /// subscriber that drains the backlog early is not averaged with idle seconds.
    #[arg(long)]
    pub until_id: Option<u64>,
    /// HTTP/2 receive window per stream, KiB (the client's flow-control window).
    #[arg(long, default_value_t = 1024)]
    pub window_kib: u32,
    /// Concurrent connection attempts while connecting.
    #[arg(long, default_value_t = 50)]
    pub connect_concurrency: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A name for this run in the report.
    #[arg(long)]
    pub label: Option<String>,
    /// PEM CA of an https:// gateway (default: the system's roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Use `SubscribeBatches` (readings in `ReadingBatch` messages) instead of `Subscribe`.
    #[arg(long)]
    pub batched: bool,
}

/// Shared counters for the progress line.
#[derive(Default)]
struct Live {
    received: AtomicU64,
    overflows: AtomicU64,
    errors: AtomicU64,
    /// Readings received in each second since the window start, warmup included, all
    /// subscribers together.
    timeline: std::sync::Mutex<Vec<u64>>,
}

/// What one subscriber measured.
struct SubStats {
    hist: Histogram<u64>,
    /// Readings received inside the measured window.
    counted: u64,
    /// Readings received at any time (warmup included).
    received_total: u64,
    overflows: u64,
    /// Subscribe calls after the first (resumes after an overflow or an error).
    resubscribes: u64,
    /// Errors other than overflows (failed calls, streams ended with another status).
    errors: u64,
    error_samples: Vec<String>,
    id_gaps: u64,
    ids_missing: u64,
    id_regressions: u64,
    trailer_mismatches: u64,
    first_id: Option<u64>,
    last_id: Option<u64>,
    /// Stamped readings whose sent_us was after the receive time (clock trouble).
    negative_latencies: u64,
    /// When the subscriber received `--until-id` (it stops there).
    finished_at: Option<Instant>,
}

impl SubStats {
    fn new() -> Self {
        Self {
            hist: report::latency_histogram(),
            counted: 0,
            received_total: 0,
            overflows: 0,
            resubscribes: 0,
            errors: 0,
            error_samples: vec![],
            id_gaps: 0,
            ids_missing: 0,
            id_regressions: 0,
            trailer_mismatches: 0,
            first_id: None,
            last_id: None,
            negative_latencies: 0,
            finished_at: None,
        }
    }

    /// Readings per second over the window, or over this subscriber's own part of it when it
    /// finished early (from its start when it finished during the warmup).
    fn rate(&self, w: &Window) -> f64 {
        match self.finished_at {
            Some(t) if t > w.measure_from => {
                self.counted as f64 / (t - w.measure_from).as_secs_f64()
            }
            Some(t) => self.received_total as f64 / (t - w.start).as_secs_f64().max(1e-3),
            None => self.counted as f64 / (w.end - w.measure_from).as_secs_f64(),
        }
    }

    fn error(&mut self, live: &Live, e: String) {
        self.errors += 1;
        live.errors.fetch_add(1, Ordering::Relaxed);
        if self.error_samples.len() < 3 && !self.error_samples.contains(&e) {
            self.error_samples.push(e);
        }
    }
}

#[derive(Serialize)]
pub struct Spread {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub max: f64,
}

#[derive(Serialize)]
pub struct FanoutReport {
    pub label: Option<String>,
    pub target: String,
    pub subscribers_requested: usize,
    pub subscribers_connected: usize,
    pub resume_after_id: Option<u64>,
    pub warmup_secs: u64,
    pub measured_secs: f64,
    pub until_id: Option<u64>,
    /// Subscribers that received `until_id` (and stopped) before the window ended.
    pub finished_early: usize,
    pub http2_stream_window_kib: u32,
    /// Readings received in the window, all subscribers together.
    pub readings: u64,
    /// Sum of the per-subscriber rates (= readings / window unless some finished early).
    pub readings_per_sec_total: f64,
    /// Readings per second of each subscriber in the window (min/mean/p50/max).
    pub readings_per_sec_per_subscriber: Spread,
    /// Publish-to-subscriber latency of `sent_us` readings received in the window, all
    /// subscribers merged; null when none arrived.
    pub latency: Option<LatencySummary>,
    pub negative_latencies: u64,
    /// Streams ended with RESOURCE_EXHAUSTED (buffer overflow), resumed from the trailer.
    pub overflows: u64,
    pub resubscribes: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Jumps over reading ids inside one subscriber's stream, and the ids jumped over.
    pub id_gaps: u64,
    pub ids_missing: u64,
    /// Readings whose id was not above the previous one (duplicates or reordering).
    pub id_regressions: u64,
    /// Overflow trailers not equal to the last id received.
    pub trailer_mismatches: u64,
    pub first_id_min: Option<u64>,
    pub last_id_max: Option<u64>,
    /// Readings received per subscriber over the whole run (warmup included), min and max.
    pub received_total_min: u64,
    pub received_total_max: u64,
    pub client_rss_kib: Option<u64>,
    pub client_cpu_secs: Option<f64>,
    /// Readings received in each second from the window start, warmup included.
    pub per_second: Vec<u64>,
    /// Each subscriber's readings/s in the window, in subscriber order.
    pub per_subscriber: Vec<f64>,
}

pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    let n = args.subscribers;
    anyhow::ensure!(n > 0, "--subscribers must be positive");
    anyhow::ensure!(args.duration > 0, "--duration must be positive");
    let auth: MetadataValue<_> = format!("Bearer {}", args.token)
        .parse()
        .map_err(|_| anyhow::anyhow!("--token is not a valid header value"))?;
    let tls = citygw::cli::client::TlsArgs {
        ca_file: args.ca_file.clone(),
        ..Default::default()
    };
    let endpoint = tls
        .endpoint(&args.grpc)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .initial_stream_window_size(args.window_kib * 1024)
        .initial_connection_window_size(args.window_kib * 1024 * 2);

    // Connections first, so that the window starts with every subscriber ready.
    let cpu0 = report::own_cpu_secs();
    let connect_started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut connecting = Vec::with_capacity(n);
    for _ in 0..n {
        let (endpoint, gate) = (endpoint.clone(), gate.clone());
        connecting.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            endpoint.connect().await
        }));
    }
    let mut channels = Vec::with_capacity(n);
    let mut connect_errors = Vec::new();
    for c in connecting {
        match c.await? {
            Ok(ch) => channels.push(ch),
            Err(e) => {
                if connect_errors.len() < 3 {
                    connect_errors.push(format!("{e:?}"));
                }
            }
        }
    }
    eprintln!(
        "connected {}/{n} in {:.1}s",
        channels.len(),
        connect_started.elapsed().as_secs_f64()
    );
    for e in &connect_errors {
        eprintln!("  connect error: {e}");
    }
    anyhow::ensure!(!channels.is_empty(), "no connection to {}", args.grpc);

    let start = Instant::now();
    let window = Window {
        start,
        measure_from: start + Duration::from_secs(args.warmup),
        end: start + Duration::from_secs(args.warmup + args.duration),
    };
    let live = Arc::new(Live::default());
    let (fatal_tx, mut fatal_rx) = watch::channel::<Option<String>>(None);
    let fatal_tx = Arc::new(fatal_tx);
    let connected = channels.len();
    let handles: Vec<_> = channels
        .into_iter()
        .map(|ch| {
            let sub = Subscriber {
                client: TelemetryClient::new(ch)
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(16 << 20),
                auth: auth.clone(),
                window,
                live: live.clone(),
                fatal: fatal_tx.clone(),
                record_latency: args.resume_after_id.is_none(),
                until_id: args.until_id,
                batched: args.batched,
            };
            tokio::spawn(sub.run(args.resume_after_id))
        })
        .collect();
    let ticker = tokio::spawn(progress_line(live.clone(), window));

    let mut stats = Vec::with_capacity(connected);
    for h in handles {
        stats.push(h.await?);
    }
    ticker.abort();
    let cpu1 = report::own_cpu_secs();
    if let Some(fatal) = fatal_rx.borrow_and_update().clone() {
        anyhow::bail!("subscribe refused: {fatal}");
    }

    let measured = (window.end - window.measure_from).as_secs_f64();
    let mut hist = report::latency_histogram();
    let mut rates: Vec<f64> = Vec::with_capacity(stats.len());
    let mut errors_seen: Vec<String> = connect_errors;
    let sum = |f: fn(&SubStats) -> u64| stats.iter().map(f).sum::<u64>();
    for s in &stats {
        hist.add(&s.hist).expect("same histogram bounds");
        rates.push(s.rate(&window));
        for e in &s.error_samples {
            if errors_seen.len() < 10 && !errors_seen.contains(e) {
                errors_seen.push(e.clone());
            }
        }
    }
    // Subscribers that could not connect count as 0 readings/s.
    let mut all_rates = rates.clone();
    all_rates.resize(n, 0.0);
    let report = FanoutReport {
        label: args.label.clone(),
        target: args.grpc.clone(),
        subscribers_requested: n,
        subscribers_connected: connected,
        resume_after_id: args.resume_after_id,
        warmup_secs: args.warmup,
        measured_secs: measured,
        until_id: args.until_id,
        finished_early: stats.iter().filter(|s| s.finished_at.is_some()).count(),
        http2_stream_window_kib: args.window_kib,
        readings: sum(|s| s.counted),
        readings_per_sec_total: rates.iter().sum(),
        readings_per_sec_per_subscriber: spread(&all_rates),
        latency: (!hist.is_empty()).then(|| LatencySummary::from_histogram(&hist)),
        negative_latencies: sum(|s| s.negative_latencies),
        overflows: sum(|s| s.overflows),
        resubscribes: sum(|s| s.resubscribes),
        errors: sum(|s| s.errors) + (n - connected) as u64,
        error_samples: errors_seen,
        id_gaps: sum(|s| s.id_gaps),
        ids_missing: sum(|s| s.ids_missing),
        id_regressions: sum(|s| s.id_regressions),
        trailer_mismatches: sum(|s| s.trailer_mismatches),
        first_id_min: stats.iter().filter_map(|s| s.first_id).min(),
        last_id_max: stats.iter().filter_map(|s| s.last_id).max(),
        received_total_min: stats.iter().map(|s| s.received_total).min().unwrap_or(0),
        received_total_max: stats.iter().map(|s| s.received_total).max().unwrap_or(0),
        client_rss_kib: report::own_rss_kib(),
        client_cpu_secs: cpu0.zip(cpu1).map(|(a, b)| b - a),
        per_second: live.timeline.lock().unwrap().clone(),
        per_subscriber: rates,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    Ok(())
}

fn spread(rates: &[f64]) -> Spread {
    let mut sorted = rates.to_vec();
    sorted.sort_by(f64::total_cmp);
    let len = sorted.len().max(1);
    Spread {
        min: sorted.first().copied().unwrap_or(0.0),
        mean: sorted.iter().sum::<f64>() / len as f64,
        p50: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        max: sorted.last().copied().unwrap_or(0.0),
    }
}

struct Subscriber {
    client: TelemetryClient<Channel>,
    auth: MetadataValue<tonic::metadata::Ascii>,
    window: Window,
    live: Arc<Live>,
    fatal: Arc<watch::Sender<Option<String>>>,
    /// Live subscriptions only: in a replay the stamps measure the backlog's age.
    record_latency: bool,
    until_id: Option<u64>,
    batched: bool,
}

/// One Subscribe or SubscribeBatches call's messages.
enum Messages {
    Each(tonic::Streaming<Reading>),
    Batches(tonic::Streaming<citygw::proto::ReadingBatch>),
}

/// How one stream ended.
enum Ended {
    WindowOver,
    /// Subscribe again after this id (None: from the tail).
    Resume(Option<u64>),
    Fatal,
}

impl Subscriber {
    async fn run(mut self, resume_after_id: Option<u64>) -> SubStats {
        let mut stats = SubStats::new();
        let mut resume = resume_after_id;
        let mut first = true;
        while Instant::now() < self.window.end {
            if !first {
                stats.resubscribes += 1;
            }
            first = false;
            if stats.finished_at.is_some() {
                break;
            }
            match self.stream(resume, &mut stats).await {
                Ended::WindowOver | Ended::Fatal => break,
                Ended::Resume(after) => resume = after,
            }
        }
        stats
    }

    /// One Subscribe call, read until the window ends or the stream does.
    async fn stream(&mut self, resume: Option<u64>, stats: &mut SubStats) -> Ended {
        let mut req = Request::new(SubscribeRequest {
            filter: Some(Filter::default()),
            resume: resume.map(|id| ResumePoint {
                point: Some(resume_point::Point::AfterId(id)),
            }),
        });
        req.metadata_mut()
            .insert("authorization", self.auth.clone());
        let mut stream = if self.batched {
            match tokio::time::timeout_at(self.window.end, self.client.subscribe_batches(req)).await
            {
                Err(_) => return Ended::WindowOver,
                Ok(Ok(resp)) => Messages::Batches(resp.into_inner()),
                Ok(Err(status)) => return self.on_status(status, resume, stats).await,
            }
        } else {
            match tokio::time::timeout_at(self.window.end, self.client.subscribe(req)).await {
                Err(_) => return Ended::WindowOver,
                Ok(Ok(resp)) => Messages::Each(resp.into_inner()),
                Ok(Err(status)) => return self.on_status(status, resume, stats).await,
            }
        };
        loop {
            // Ok(true): the replay reached `until_id`.
            let next = match &mut stream {
                Messages::Each(s) => tokio::time::timeout_at(self.window.end, s.message())
                    .await
                    .map(|m| m.map(|m| m.map(|r| self.take(&r, stats)))),
                Messages::Batches(s) => tokio::time::timeout_at(self.window.end, s.message())
                    .await
                    .map(|m| m.map(|m| m.map(|b| b.readings.iter().any(|r| self.take(r, stats))))),
            };
            match next {
                Err(_) | Ok(Ok(Some(true))) => return Ended::WindowOver,
                Ok(Ok(Some(false))) => {}
                Ok(Ok(None)) => {
                    // The server ended the stream without a status: not in the contract.
                    stats.error(&self.live, "stream ended without a status".into());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return Ended::Resume(stats.last_id.or(resume));
                }
                Ok(Err(status)) => return self.on_status(status, resume, stats).await,
            }
        }
    }

    /// Counts a reading; whether the replay is over (`until_id` reached).
    fn take(&self, r: &Reading, stats: &mut SubStats) -> bool {
        self.on_reading(r, stats);
        if self.until_id.is_some_and(|until| r.id >= until) {
            stats.finished_at = Some(Instant::now());
            return true;
        }
        false
    }

    fn on_reading(&self, r: &Reading, stats: &mut SubStats) {
        let now = Instant::now();
        stats.received_total += 1;
        self.live.received.fetch_add(1, Ordering::Relaxed);
        match stats.last_id {
            Some(last) if r.id <= last => stats.id_regressions += 1,
            Some(last) if r.id > last + 1 => {
                stats.id_gaps += 1;
                stats.ids_missing += r.id - last - 1;
            }
            _ => {}
        }
        if stats.last_id.is_none_or(|last| r.id > last) {
            stats.last_id = Some(r.id);
        }
        stats.first_id.get_or_insert(r.id);
        if !self.window.measuring(now) {
            return;
        }
        stats.counted += 1;
        if self.record_latency && r.quantity == SENT_US {
            if let Some(Value::Number(sent)) = r.value {
                let now_us = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros() as f64)
                    .unwrap_or(0.0);
                let us = now_us - sent;
                if us < 0.0 {
                    stats.negative_latencies += 1;
                }
                let us = (us.max(1.0) as u64).min(stats.hist.high());
                let _ = stats.hist.record(us);
            }
        }
    }

    async fn on_status(&self, status: Status, resume: Option<u64>, stats: &mut SubStats) -> Ended {
        let trailer = status
            .metadata()
            .get(RESUME_TRAILER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match status.code() {
            Code::ResourceExhausted => {
                stats.overflows += 1;
                self.live.overflows.fetch_add(1, Ordering::Relaxed);
                match trailer {
                    Some(id) => {
                        if stats.last_id.is_some_and(|last| last != id) {
                            stats.trailer_mismatches += 1;
                        }
                        Ended::Resume(Some(id))
                    }
                    None => {
                        stats.error(
                            &self.live,
                            format!("RESOURCE_EXHAUSTED without {RESUME_TRAILER}"),
                        );
                        Ended::Resume(stats.last_id.or(resume))
                    }
                }
            }
            Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument => {
                let msg = format!("{:?}: {}", status.code(), status.message());
                stats.error(&self.live, msg.clone());
                self.fatal.send_if_modified(|f| {
                    let first = f.is_none();
                    if first {
                        *f = Some(msg);
                    }
                    first
                });
                Ended::Fatal
            }
            code => {
                stats.error(&self.live, format!("{code:?}: {}", status.message()));
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ended::Resume(trailer.or(stats.last_id).or(resume))
            }
        }
    }
}

async fn progress_line(live: Arc<Live>, window: Window) {
    let mut last = 0;
    let mut tick = tokio::time::interval_at(
        window.start + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        let t = tick.tick().await;
        let done = live.received.load(Ordering::Relaxed);
        let phase = if t < window.measure_from {
            "warmup"
        } else {
            "measure"
        };
        eprintln!(
            "[{phase} {:>3}s] received {done} ({}/s), overflows {}, errors {}",
            (t - window.start).as_secs(),
            done - last,
            live.overflows.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
        );
        live.timeline.lock().unwrap().push(done - last);
        last = done;
    }
}

fn print_report(r: &FanoutReport) {
    let p = &r.readings_per_sec_per_subscriber;
    let mut rows = vec![
        ("target", r.target.clone()),
        (
            "subscribers",
            format!(
                "{} of {} connected{}",
                r.subscribers_connected,
                r.subscribers_requested,
                r.resume_after_id
                    .map(|id| format!(", replay after id {id}"))
                    .unwrap_or_else(|| ", live".into())
            ),
        ),
        (
            "window",
            format!("{:.1} s after {} s warmup", r.measured_secs, r.warmup_secs),
        ),
        ("readings received", r.readings.to_string()),
        (
            "total",
            format!("{:.0} readings/s", r.readings_per_sec_total),
        ),
        (
            "per subscriber min/mean/p50/max",
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0} readings/s",
                p.min, p.mean, p.p50, p.max
            ),
        ),
    ];
    if let Some((percentiles, tail)) = r.latency.as_ref().map(LatencySummary::cells) {
        rows.push(("publish->subscriber ms p50/p90/p99", percentiles));
        rows.push(("publish->subscriber ms p99.9/max", tail));
    }
    rows.push((
        "overflows (RESOURCE_EXHAUSTED)",
        format!("{} (resubscribes {})", r.overflows, r.resubscribes),
    ));
    rows.push(("other errors", r.errors.to_string()));
    rows.push((
        "id gaps / duplicates / bad trailers",
        format!(
            "{} ({} ids) / {} / {}",
            r.id_gaps, r.ids_missing, r.id_regressions, r.trailer_mismatches
        ),
    ));
    if let Some(until) = r.until_id {
        rows.push((
            "reached --until-id",
            format!(
                "{} of {} subscribers (id {until})",
                r.finished_early, r.subscribers_connected
            ),
        ));
    }
    if let Some(cpu) = r.client_cpu_secs {
        rows.push(("client CPU", format!("{cpu:.1} s")));
    }
    report::print_report("fanout", r.label.as_deref(), &rows, &r.error_samples);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_rates() {
        let s = spread(&[3.0, 1.0, 2.0, 6.0]);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 6.0);
        assert_eq!(s.mean, 3.0);
        assert_eq!(s.p50, 3.0);
        let empty = spread(&[]);
        assert_eq!(empty.mean, 0.0);
    }
}
