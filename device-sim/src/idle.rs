//! `device-sim bench idle`: how many idle device connections a broker carries at once.
//!
//! Opens `--connections` MQTT sessions (keepalive `--keep-alive`, nothing published), printing
//! progress while connecting, holds them for `--hold` seconds, then disconnects them cleanly.
//! `--ready-file` is written once every connection has been attempted, so a script can sample
//! the broker's memory while all are connected.
//!
//! Source addresses: rumqttc 0.25's `NetworkOptions` can bind a device but not a local address,
//! so the ~28k ephemeral ports of one (source, destination) pair are spread instead over
//! several destination addresses (`--host 127.0.0.1,127.0.0.2,...`, broker on 0.0.0.0 / [::]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rumqttc::Event;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::mqtt::{self, ConnectProgress, Connected, Session};
use crate::report;
use crate::{credentials, TargetArgs};

#[derive(Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// MQTT keepalive in seconds.
    #[arg(long, default_value_t = 60)]
    pub keep_alive: u64,
    /// Seconds to hold the connections once all were attempted.
    #[arg(long, default_value_t = 30)]
    pub hold: u64,
    /// Written (JSON counts) when every connection has been attempted, before the hold.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
pub struct IdleReport {
    pub target: String,
    pub connections_requested: usize,
    pub connected: u64,
    pub failed: u64,
    pub failures: BTreeMap<&'static str, u64>,
    pub error_samples: Vec<String>,
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    /// Most connections open at the same time.
    pub peak_open: u64,
    /// Connections still open at the end of the hold.
    pub open_at_end_of_hold: u64,
    pub hold_secs: u64,
    pub client_rss_kib: Option<u64>,
}

pub async fn run(args: IdleArgs) -> anyhow::Result<()> {
    let n = args.target.connections;
    anyhow::ensure!(n > 0, "--connections must be positive");
    let creds = credentials::for_connections(args.target.credentials.as_deref(), n)?;
    let session = Session {
        keep_alive: Duration::from_secs(args.keep_alive.max(5)),
        inflight: 1,
        request_capacity: 4,
        connect_timeout: Duration::from_secs(args.target.connect_timeout),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let progress = Arc::new(ConnectProgress::default());
    let handles = {
        let progress = progress.clone();
        mqtt::spawn_connections(
            &args.target,
            creds,
            session,
            progress.clone(),
            move |conn| hold(conn, stop_rx.clone(), progress.clone()),
        )
    };

    let started = Instant::now();
    let mut last = (0u64, started);
    while progress.attempted() < n as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if last.1.elapsed() >= Duration::from_secs(1) {
            let connected = progress.connected.load(Ordering::Relaxed);
            let rate = (connected - last.0) as f64 / last.1.elapsed().as_secs_f64();
            eprintln!(
                "[{:>4.0}s] connected {connected}/{n}, failed {}, open {}, {rate:.0} conn/s",
                started.elapsed().as_secs_f64(),
                progress.failed.load(Ordering::Relaxed),
                progress.open.load(Ordering::Relaxed),
            );
            last = (connected, Instant::now());
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let connected = progress.connected.load(Ordering::Relaxed);
    let failed = progress.failed.load(Ordering::Relaxed);
    eprintln!("all attempted: connected {connected}/{n}, failed {failed} in {connect_secs:.1}s");
    for s in progress.samples() {
        eprintln!("  connect error: {s}");
    }
    if let Some(path) = &args.ready_file {
        let ready = serde_json::json!({
            "connected": connected,
            "failed": failed,
            "open": progress.open.load(Ordering::Relaxed),
        });
        report::write_json(path, &ready)?;
    }

    let hold_end = Instant::now() + Duration::from_secs(args.hold);
    while Instant::now() < hold_end {
        tokio::time::sleep_until((Instant::now() + Duration::from_secs(5)).min(hold_end)).await;
        eprintln!("[hold] open {}", progress.open.load(Ordering::Relaxed));
    }
    let open_at_end = progress.open.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), futures_join(handles)).await;

    let report = IdleReport {
        target: format!("{}:{}", args.target.host.join(","), args.target.port),
        connections_requested: n,
        connected,
        failed,
        failures: progress.failures(),
        error_samples: progress.samples(),
        connect_secs,
        connects_per_sec: connected as f64 / connect_secs.max(1e-9),
        peak_open: progress.peak_open.load(Ordering::Relaxed),
        open_at_end_of_hold: open_at_end,
        hold_secs: args.hold,
        client_rss_kib: report::own_rss_kib(),
    };
    report::print_table(
        "device-sim bench idle",
        &[
            ("target", report.target.clone()),
            (
                "connected",
                format!(
                    "{} of {} ({} failed: {:?})",
                    connected, n, failed, report.failures
                ),
            ),
            (
                "connect time",
                format!(
                    "{connect_secs:.1} s ({:.0} conn/s)",
                    report.connects_per_sec
                ),
            ),
            ("peak open at once", report.peak_open.to_string()),
            (
                "open at end of hold",
                format!("{open_at_end} (held {} s)", args.hold),
            ),
            (
                "client RSS",
                format!("{} KiB", report.client_rss_kib.unwrap_or(0)),
            ),
        ],
    );
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    Ok(())
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// Serves one idle connection (pings) until told to stop or the broker drops it.
async fn hold(conn: Connected, mut stop: watch::Receiver<bool>, progress: Arc<ConnectProgress>) {
    let Connected {
        client,
        mut eventloop,
        ..
    } = conn;
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    mqtt::disconnect(&client, &mut eventloop).await;
                    break;
                }
            }
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(_)) | Ok(Event::Outgoing(_)) => {}
                // An idle device that lost its connection is counted as gone, not reconnected:
                // the point is how many stay connected at once.
                Err(_) => break,
            },
        }
    }
    progress.closed();
}
