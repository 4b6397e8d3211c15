//! `device-sim run SCENARIO`: every device of the scenario reports on its own interval for the
//! scenario's duration, connections ramped up over `ramp_up_secs`; a progress line every second
//! (connected, sent, acknowledged, rejected, rate) and a summary at the end (with
//! publish-to-acknowledgement latency from an HDR histogram).
//!
//! With `--ack-log FILE`, every acknowledged message is written there as
//! `device_id,device_time_ms,quantity;quantity;...` — the readings the gateway promised to keep.
//! The file is written as `FILE.partial` and renamed when the run ends, so `verify` can wait for
//! it to be complete.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::drivers::{coap, lorawan, Protocol};
use crate::report::{self, LatencySummary};
use crate::scenario::{profiles, Scenario};
use crate::{credentials, drivers};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Scenario file (TOML).
    pub scenario: PathBuf,
    /// Credentials CSV written by `device-sim provision` (columns id, secret).
    #[arg(long)]
    pub credentials: PathBuf,
    /// MQTT broker host(s); a comma-separated list spreads device i over host i % n
    /// (127.0.0.1,127.0.0.2,... against a gateway on [::] or 0.0.0.0 passes the ephemeral-port
    /// limit of one address pair).
    #[arg(long, default_value = "127.0.0.1", value_delimiter = ',')]
    pub mqtt_host: Vec<String>,
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    /// Write every acknowledged message here (for `device-sim verify`).
    #[arg(long)]
    pub ack_log: Option<PathBuf>,
    /// Sensor profiles file replacing the embedded one.
    #[arg(long)]
    pub profiles: Option<PathBuf>,
    /// Override the scenario's duration (seconds).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Concurrent connection handshakes.
    #[arg(long, default_value_t = 500)]
    pub connect_concurrency: usize,
    /// Seconds to wait for each CONNACK.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// Seconds after the end to wait for outstanding acknowledgements.
    #[arg(long, default_value_t = 10)]
    pub drain: u64,
    /// Write the summary as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// LoRaWAN devices (ChirpStack and The Things Stack): the network server's MQTT broker,
    /// host:port, where their uplink events are published (citygw's bridges subscribe there).
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub lorawan_broker: String,
    #[arg(long, env = "DEVICE_SIM_LORAWAN_USERNAME")]
    pub lorawan_username: Option<String>,
    #[arg(long, env = "DEVICE_SIM_LORAWAN_PASSWORD", hide_env_values = true)]
    pub lorawan_password: Option<String>,
    /// ChirpStack application id in the event topics
    /// (`application/{id}/device/{devEUI}/event/up`).
    #[arg(long, default_value = "device-sim")]
    pub chirpstack_application_id: String,
    /// The Things Stack application id in the uplink topics
    /// (`v3/{id}/devices/{device id}/up`; `app@tenant` on The Things Stack Cloud).
    #[arg(long, default_value = "device-sim@citygw")]
    pub tts_application_id: String,
    /// CoAP devices: the gateway's plain CoAP listener, host:port.
    #[arg(long, default_value = "127.0.0.1:5683")]
    pub coap: String,
    /// CoAPS devices: the gateway's DTLS listener, host:port.
    #[arg(long, default_value = "127.0.0.1:5684")]
    pub coaps: String,
    /// Source addresses for CoAP/CoAPS/LwM2M sockets; a comma-separated list binds device i to
    /// address i % n (127.0.0.1,127.0.0.2,... passes the ephemeral-port limit of one address
    /// pair). Default: the system's choice.
    #[arg(long, value_delimiter = ',')]
    pub coap_source: Vec<std::net::IpAddr>,
    /// Lifetime (seconds) LwM2M clients register with; they update at two thirds of it.
    #[arg(long, default_value_t = 300)]
    pub lwm2m_lifetime: u64,
    /// Seconds between progress lines (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub progress_every: f64,
}

/// Loads a profile file (or the embedded default) and a scenario against it.
pub fn load_scenario(
    path: &std::path::Path,
    profiles_file: Option<&std::path::Path>,
) -> anyhow::Result<Scenario> {
    let profiles = match profiles_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading profiles {}", p.display()))?;
            profiles::parse(&p.display().to_string(), &text)?
        }
        None => profiles::default_profiles(),
    };
    Scenario::load(path, profiles)
}

/// One acknowledged message.
pub struct AckRecord {
    pub device_id: Arc<str>,
    pub device_time_ms: u64,
    /// The quantities of the message, `;`-separated.
    pub quantities: Arc<str>,
}

/// Counters shared by every device and the progress line.
pub struct RunStats {
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    pub open: AtomicU64,
    pub peak_open: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub readings_acked: AtomicU64,
    pub rejected: AtomicU64,
    pub disconnects: AtomicU64,
    /// Messages written but neither acknowledged nor refused when their connection dropped or
    /// the drain ended.
    pub unconfirmed: AtomicU64,
    /// Commands devices received (scenarios with `commands = true`), carried out or refused,
    /// and answers the gateway acknowledged.
    pub commands_received: AtomicU64,
    pub commands_ok: AtomicU64,
    pub commands_error: AtomicU64,
    pub answers_acked: AtomicU64,
    reasons: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<Vec<String>>,
    latency: Mutex<Histogram<u64>>,
}

impl Default for RunStats {
    fn default() -> Self {
        Self {
            connected: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            open: AtomicU64::new(0),
            peak_open: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            readings_acked: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            unconfirmed: AtomicU64::new(0),
            commands_received: AtomicU64::new(0),
            commands_ok: AtomicU64::new(0),
            commands_error: AtomicU64::new(0),
            answers_acked: AtomicU64::new(0),
            reasons: Mutex::default(),
            errors: Mutex::default(),
            latency: Mutex::new(report::latency_histogram()),
        }
    }
}

impl RunStats {
    pub fn opened(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open.fetch_max(open, Ordering::Relaxed);
    }

    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts an outcome by reason (connect refusals, PUBACK reason codes).
    pub fn count_reason(&self, reason: String) {
        *self.reasons.lock().unwrap().entry(reason).or_default() += 1;
    }

    pub fn note_error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 10 {
            errors.push(e);
        }
    }

    pub fn record_latency(&self, d: Duration) {
        let mut h = self.latency.lock().unwrap();
        let us = (d.as_micros() as u64).clamp(1, h.high());
        let _ = h.record(us);
    }
}

/// What a driver needs besides its device.
pub struct DriverContext {
    pub scenario: Arc<Scenario>,
    pub stats: Arc<RunStats>,
    pub acks: Option<mpsc::UnboundedSender<AckRecord>>,
    /// When the first device may connect.
    pub start: Instant,
    /// When devices stop reporting, in milliseconds after `start`; moved earlier when the run is
    /// interrupted ([`DriverContext::end_now`]).
    end_ms: AtomicU64,
    pub mqtt_hosts: Vec<String>,
    pub mqtt_port: u16,
    pub connect_permits: Arc<Semaphore>,
    pub connect_timeout: Duration,
    pub drain: Duration,
    pub coap: coap::Targets,
    /// The network server's broker connection, when the scenario has LoRaWAN devices.
    pub lorawan_hub: std::sync::OnceLock<Arc<lorawan::Hub>>,
    pub chirpstack_application_id: String,
    pub tts_application_id: String,
}

impl DriverContext {
    /// When devices stop reporting.
    pub fn end(&self) -> Instant {
        self.start + Duration::from_millis(self.end_ms.load(Ordering::Relaxed))
    }

    /// Ends the run now: every device stops at its next report, then waits out the drain for
    /// its acknowledgements. Costs the devices nothing: they read the end when they wake.
    pub fn end_now(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.end_ms.fetch_min(now, Ordering::Relaxed);
    }

    /// When device `index` of `n` connects: evenly spread over the ramp-up.
    pub fn connect_at(&self, index: usize) -> Instant {
        let n = self.scenario.devices.max(1) as f64;
        self.start + self.scenario.ramp_up.mul_f64(index as f64 / n)
    }

    /// Counts a message the gateway acknowledged `latency` after it was sent, and records it
    /// in the ack log for `verify`.
    pub fn acknowledged(&self, latency: Duration, readings: u64, record: AckRecord) {
        self.stats.record_latency(latency);
        self.stats.acked.fetch_add(1, Ordering::Relaxed);
        self.stats
            .readings_acked
            .fetch_add(readings, Ordering::Relaxed);
        if let Some(acks) = &self.acks {
            let _ = acks.send(record);
        }
    }
}

#[derive(Serialize)]
pub struct RunSummary {
    pub scenario: String,
    pub devices: usize,
    pub duration_secs: f64,
    pub connected: u64,
    pub connect_failed: u64,
    pub peak_open: u64,
    pub sent: u64,
    pub acked: u64,
    pub readings_acked: u64,
    pub rejected: u64,
    pub unconfirmed: u64,
    pub disconnects: u64,
    /// Commands received / carried out / refused / answers acknowledged (all 0 unless the
    /// scenario has `commands = true`).
    pub commands_received: u64,
    pub commands_ok: u64,
    pub commands_error: u64,
    pub answers_acked: u64,
    pub outcomes: BTreeMap<String, u64>,
    pub acked_per_sec: f64,
    pub latency: LatencySummary,
    pub error_samples: Vec<String>,
    pub client_rss_kib: Option<u64>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut scenario = load_scenario(&args.scenario, args.profiles.as_deref())?;
    if let Some(d) = args.duration {
        scenario.duration = Duration::from_secs_f64(d);
    }
    let plan = scenario.plan();
    let mut secrets: BTreeMap<String, credentials::Credential> =
        credentials::load(&args.credentials)?
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect();
    let missing = plan.iter().filter(|d| !secrets.contains_key(&d.id)).count();
    anyhow::ensure!(
        missing == 0,
        "{} has no secret for {missing} of the scenario's {} devices: run `device-sim provision` first",
        args.credentials.display(),
        plan.len()
    );

    let (ack_tx, ack_writer) = match &args.ack_log {
        Some(path) => {
            let (tx, rx) = mpsc::unbounded_channel();
            (
                Some(tx),
                Some(tokio::spawn(write_ack_log(path.clone(), rx))),
            )
        }
        None => (None, None),
    };
    let stats = Arc::new(RunStats::default());
    let start = Instant::now();
    let planned = scenario.ramp_up + scenario.duration;
    let devices = plan.len();
    let ctx = Arc::new(DriverContext {
        scenario: Arc::new(scenario.clone()),
        stats: stats.clone(),
        acks: ack_tx,
        start,
        end_ms: AtomicU64::new(planned.as_millis() as u64),
        mqtt_hosts: args.mqtt_host.clone(),
        mqtt_port: args.mqtt_port,
        connect_permits: Arc::new(Semaphore::new(args.connect_concurrency.max(1))),
        connect_timeout: Duration::from_secs(args.connect_timeout),
        drain: Duration::from_secs(args.drain),
        coap: coap::Targets {
            plain: coap::resolve("--coap", &args.coap).await?,
            secure: coap::resolve("--coaps", &args.coaps).await?,
            sources: args.coap_source.clone(),
            dtls: match plan.iter().any(|d| d.protocol == Protocol::Coaps) {
                true => Some(coap::dtls::DtlsClient::new().context("DTLS client context")?),
                false => None,
            },
            lwm2m_lifetime: Duration::from_secs(args.lwm2m_lifetime.max(1)),
        },
        lorawan_hub: std::sync::OnceLock::new(),
        chirpstack_application_id: args.chirpstack_application_id.clone(),
        tts_application_id: args.tts_application_id.clone(),
    });
    if plan.iter().any(|d| d.protocol.is_lorawan()) {
        let (host, port) = args
            .lorawan_broker
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_string(), p.parse().ok()?)))
            .with_context(|| format!("--lorawan-broker {:?}: host:port", args.lorawan_broker))?;
        let broker = lorawan::Broker {
            host,
            port,
            username: args.lorawan_username.clone(),
            password: args.lorawan_password.clone(),
        };
        let hub = lorawan::Hub::start(&broker, ctx.clone()).await?;
        let _ = ctx.lorawan_hub.set(hub);
    }
    eprintln!(
        "scenario {} ({}): {devices} devices in {} ({}), ramp-up {:.0} s, {:.0} s of reporting",
        scenario.name,
        scenario.source,
        scenario.province_name,
        scenario.province,
        scenario.ramp_up.as_secs_f64(),
        scenario.duration.as_secs_f64()
    );
    let tasks: Vec<_> = plan
        .into_iter()
        .map(|dev| {
            let cred = secrets.remove(&dev.id).expect("checked above");
            tokio::spawn(drivers::run_device(dev, cred, ctx.clone()))
        })
        .collect();
    // SIGINT or SIGTERM ends the run early, with the summary of what happened until then.
    let interrupt = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            interrupted().await;
            eprintln!("interrupted: devices stop at their next report, then drain");
            ctx.end_now();
        })
    };
    let ticker = (args.progress_every > 0.0).then(|| {
        tokio::spawn(progress(
            stats.clone(),
            devices,
            start,
            Duration::from_secs_f64(args.progress_every),
        ))
    });
    for t in tasks {
        let _ = t.await;
    }
    if let Some(t) = ticker {
        t.abort();
    }
    interrupt.abort();
    let _ = interrupt.await;
    let reporting = ctx.end() - start;
    drop(ctx);
    if let Some(w) = ack_writer {
        w.await.context("ack log writer")??;
    }

    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let summary = RunSummary {
        scenario: scenario.name.clone(),
        devices,
        duration_secs: reporting.saturating_sub(scenario.ramp_up).as_secs_f64(),
        connected: load(&stats.connected),
        connect_failed: load(&stats.connect_failed),
        peak_open: load(&stats.peak_open),
        sent: load(&stats.sent),
        acked: load(&stats.acked),
        readings_acked: load(&stats.readings_acked),
        rejected: load(&stats.rejected),
        unconfirmed: load(&stats.unconfirmed),
        disconnects: load(&stats.disconnects),
        commands_received: load(&stats.commands_received),
        commands_ok: load(&stats.commands_ok),
        commands_error: load(&stats.commands_error),
        answers_acked: load(&stats.answers_acked),
        outcomes: stats.reasons.lock().unwrap().clone(),
        acked_per_sec: load(&stats.acked) as f64 / reporting.as_secs_f64().max(0.001),
        latency: LatencySummary::from_histogram(&stats.latency.lock().unwrap()),
        error_samples: stats.errors.lock().unwrap().clone(),
        client_rss_kib: report::own_rss_kib(),
    };
    print_summary(&summary, scenario.commands);
    if let Some(path) = &args.json {
        report::write_json(path, &summary)?;
    }
    anyhow::ensure!(
        summary.connected > 0,
        "no device could connect (see the errors above)"
    );
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn write_ack_log(
    path: PathBuf,
    mut rx: mpsc::UnboundedReceiver<AckRecord>,
) -> anyhow::Result<()> {
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let _ = std::fs::remove_file(&path);
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut out = std::io::BufWriter::new(file);
    while let Some(r) = rx.recv().await {
        writeln!(out, "{},{},{}", r.device_id, r.device_time_ms, r.quantities)?;
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&partial, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

async fn progress(stats: Arc<RunStats>, devices: usize, start: Instant, every: Duration) {
    let mut tick = tokio::time::interval_at(start + every, every);
    let mut last = 0;
    loop {
        let t = tick.tick().await;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let acked = load(&stats.acked);
        let commands = match load(&stats.commands_received) {
            0 => String::new(),
            n => format!(
                ", commands {n} (answers acked {})",
                load(&stats.answers_acked)
            ),
        };
        eprintln!(
            "[{:>5.0}s] connected {}/{devices} (open {}, failed {}), sent {}, acked {} ({:.0}/s), rejected {}, disconnects {}{commands}",
            (t - start).as_secs_f64(),
            load(&stats.connected),
            load(&stats.open),
            load(&stats.connect_failed),
            load(&stats.sent),
            acked,
            (acked - last) as f64 / every.as_secs_f64(),
            load(&stats.rejected),
            load(&stats.disconnects),
        );
        last = acked;
    }
}

fn print_summary(s: &RunSummary, commands: bool) {
    let (percentiles, tail) = s.latency.cells();
    let mut rows = vec![
        ("devices", s.devices.to_string()),
        (
            "connected",
            format!(
                "{} ({} failed, peak open {})",
                s.connected, s.connect_failed, s.peak_open
            ),
        ),
        ("messages sent", s.sent.to_string()),
        (
            "acknowledged",
            format!("{} ({} readings)", s.acked, s.readings_acked),
        ),
        ("rejected", s.rejected.to_string()),
        ("unconfirmed", s.unconfirmed.to_string()),
        ("disconnects", s.disconnects.to_string()),
        ("outcomes", format!("{:?}", s.outcomes)),
        ("acked msgs/s", format!("{:.1}", s.acked_per_sec)),
        ("ack latency ms p50/p90/p99", percentiles),
        ("ack latency ms p99.9/max", tail),
    ];
    if commands {
        rows.push((
            "commands",
            format!(
                "{} received, {} carried out, {} refused, {} answers acknowledged",
                s.commands_received, s.commands_ok, s.commands_error, s.answers_acked
            ),
        ));
    }
    report::print_table(&format!("device-sim run — {}", s.scenario), &rows);
    for e in &s.error_samples {
        println!("  error: {e}");
    }
}
