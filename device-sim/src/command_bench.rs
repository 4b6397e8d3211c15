//! `device-sim bench command`: the command round trip through citygw's Control API, against the
//! street lights a `device-sim run` of a scenario with `commands = true` keeps connected.
//!
//! `--inflight` workers each send a command (`SendCommand`) to the next street light of the
//! scenario (round-robin), wait until it is final, then send the next. One `WatchCommands`
//! stream, opened before the first send, reports the final states. Two latencies per command:
//!
//! - **client clock**: from just before `SendCommand` to the arrival of the final state on the
//!   watch stream (what an operator's program sees);
//! - **gateway clock**: from the command's `created_time_ms` to the time of its final event in
//!   its history (what the gateway recorded: QUEUED → SENT → DELIVERED → SUCCEEDED).
//!
//! Commands/s is final commands over the time from the first send to the last final state.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use citygw::proto::control_client::ControlClient;
use citygw::proto::{
    command_payload, Command, CommandPayload, CommandState, SendCommandRequest,
    WatchCommandsRequest,
};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::drivers::Protocol;
use crate::provision::ScenarioAdmin;
use crate::report::{self, LatencySummary};

#[derive(Args, Debug)]
pub struct CommandBenchArgs {
    /// The scenario `device-sim run` is running (with `commands = true`): commands go to its
    /// MQTT devices whose profile takes commands. The admin token may also be an agency's with
    /// the `control` permission.
    #[command(flatten)]
    pub target: ScenarioAdmin,
    /// Commands to send.
    #[arg(long, default_value_t = 1000)]
    pub commands: usize,
    /// Commands in flight (sent and not yet final) at once.
    #[arg(long, default_value_t = 32)]
    pub inflight: usize,
    /// Command name.
    #[arg(long, default_value = "dim")]
    pub name: String,
    /// Command params (a JSON object).
    #[arg(long, default_value = r#"{"level": 60}"#)]
    pub params: String,
    /// Time to live of each command, seconds.
    #[arg(long, default_value_t = 120)]
    pub ttl: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A name for this run in the report.
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Serialize)]
pub struct CommandBenchReport {
    pub label: Option<String>,
    pub grpc: String,
    pub devices: usize,
    pub inflight: usize,
    pub command: String,
    pub sent: u64,
    /// Final states reached, by state name.
    pub outcomes: BTreeMap<String, u64>,
    /// SendCommand calls refused, and commands that did not become final before their TTL
    /// plus 30 s.
    pub send_errors: u64,
    pub unfinished: u64,
    pub elapsed_secs: f64,
    pub commands_per_sec: f64,
    /// SendCommand to the final state on the watch stream, this client's clock (SUCCEEDED only).
    pub latency_client: LatencySummary,
    /// created_time_ms to the final event's time_ms, the gateway's clock (SUCCEEDED only).
    pub latency_gateway: LatencySummary,
    pub error_samples: Vec<String>,
}

/// Final states that arrived on the watch stream, matched to the workers waiting for them.
#[derive(Default)]
struct Finals {
    waiting: HashMap<String, oneshot::Sender<(Instant, Command)>>,
    /// Final before its `SendCommand` answer reached the worker.
    early: HashMap<String, (Instant, Command)>,
}

struct Tally {
    outcomes: BTreeMap<String, u64>,
    send_errors: u64,
    unfinished: u64,
    errors: Vec<String>,
    client: Histogram<u64>,
    gateway: Histogram<u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            outcomes: BTreeMap::new(),
            send_errors: 0,
            unfinished: 0,
            errors: Vec::new(),
            client: report::latency_histogram(),
            gateway: report::latency_histogram(),
        }
    }

    fn error(&mut self, e: String) {
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }
}

fn is_final(s: CommandState) -> bool {
    matches!(
        s,
        CommandState::Succeeded | CommandState::Failed | CommandState::Expired
    )
}

pub async fn run(args: CommandBenchArgs) -> anyhow::Result<()> {
    let scenario = args.target.load()?;
    anyhow::ensure!(
        scenario.commands,
        "{}: the scenario does not have `commands = true`, so its devices would not answer",
        args.target.scenario.display()
    );
    let devices: Vec<String> = scenario
        .plan()
        .into_iter()
        .filter(|d| {
            d.protocol == Protocol::Mqtt && scenario.profiles[&d.profile].commands.is_some()
        })
        .map(|d| d.id)
        .collect();
    anyhow::ensure!(
        !devices.is_empty(),
        "the scenario has no MQTT device whose profile takes commands"
    );
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&args.params)
        .context("--params must be a JSON object")?;
    anyhow::ensure!(args.inflight > 0, "--inflight must be positive");

    let (channel, token) = args.target.connect().await?;
    let client = ControlClient::with_interceptor(channel, token);

    // Watch first: no final state can be missed.
    let stream = client
        .clone()
        .watch_commands(WatchCommandsRequest {
            device_ids: vec![],
            states: vec![
                CommandState::Succeeded as i32,
                CommandState::Failed as i32,
                CommandState::Expired as i32,
            ],
        })
        .await
        .map_err(|s| anyhow::anyhow!("WatchCommands: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let finals = Arc::new(Mutex::new(Finals::default()));
    let watcher = tokio::spawn(watch_finals(stream, finals.clone()));

    eprintln!(
        "sending {} `{}` commands to {} street lights, {} in flight",
        args.commands,
        args.name,
        devices.len(),
        args.inflight
    );
    let devices = Arc::new(devices);
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::new()));
    let started = Instant::now();
    let last_final = Arc::new(Mutex::new(started));
    let ticker = tokio::spawn(progress(tally.clone(), started, args.commands));
    let workers: Vec<_> = (0..args.inflight.min(args.commands))
        .map(|_| {
            let (mut client, devices, next, finals, tally, last_final) = (
                client.clone(),
                devices.clone(),
                next.clone(),
                finals.clone(),
                tally.clone(),
                last_final.clone(),
            );
            let (name, params, total) = (args.name.clone(), args.params.clone(), args.commands);
            let wait = Duration::from_secs(args.ttl + 30);
            let ttl_ms = args.ttl * 1000;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let device_id = devices[i % devices.len()].clone();
                    let sent_at = Instant::now();
                    let sent = client
                        .send_command(SendCommandRequest {
                            device_id: device_id.clone(),
                            name: name.clone(),
                            payload: Some(CommandPayload {
                                kind: Some(command_payload::Kind::ParamsJson(params.clone())),
                            }),
                            ttl_ms,
                            ..Default::default()
                        })
                        .await;
                    let id = match sent {
                        Ok(r) => r.into_inner().id,
                        Err(s) => {
                            let mut t = tally.lock().unwrap();
                            t.send_errors += 1;
                            t.error(format!(
                                "{device_id}: SendCommand: {:?}: {}",
                                s.code(),
                                s.message()
                            ));
                            continue;
                        }
                    };
                    let rx = {
                        let mut f = finals.lock().unwrap();
                        match f.early.remove(&id) {
                            Some(done) => Err(done),
                            None => {
                                let (tx, rx) = oneshot::channel();
                                f.waiting.insert(id.clone(), tx);
                                Ok(rx)
                            }
                        }
                    };
                    let done = match rx {
                        Err(done) => Some(done),
                        Ok(rx) => tokio::time::timeout(wait, rx)
                            .await
                            .ok()
                            .and_then(Result::ok),
                    };
                    let mut guard = tally.lock().unwrap();
                    let t = &mut *guard;
                    let Some((at, c)) = done else {
                        t.unfinished += 1;
                        t.error(format!(
                            "{device_id}: command {id} not final after {wait:?}"
                        ));
                        continue;
                    };
                    let state = CommandState::try_from(c.state).unwrap_or_default();
                    *t.outcomes
                        .entry(
                            state
                                .as_str_name()
                                .trim_start_matches("COMMAND_STATE_")
                                .to_string(),
                        )
                        .or_default() += 1;
                    {
                        let mut last = last_final.lock().unwrap();
                        *last = (*last).max(at);
                    }
                    if state != CommandState::Succeeded {
                        t.error(format!("{device_id}: command {id} {state:?}: {}", c.error));
                        continue;
                    }
                    let client_us = (at - sent_at).as_micros() as u64;
                    let final_ms = c
                        .history
                        .iter()
                        .rev()
                        .find(|e| is_final(CommandState::try_from(e.state).unwrap_or_default()))
                        .map_or(c.updated_time_ms, |e| e.time_ms);
                    let gateway_us = (final_ms - c.created_time_ms).max(0) as u64 * 1000;
                    for (h, us) in [(&mut t.client, client_us), (&mut t.gateway, gateway_us)] {
                        let _ = h.record(us.clamp(1, h.high()));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.context("worker")?;
    }
    ticker.abort();
    if watcher.is_finished() {
        if let Ok(e) = watcher.await {
            eprintln!("warning: {e}");
        }
    } else {
        watcher.abort();
    }

    let t = std::mem::replace(&mut *tally.lock().unwrap(), Tally::new());
    let elapsed = (*last_final.lock().unwrap() - started).as_secs_f64();
    let finished: u64 = t.outcomes.values().sum();
    let report = CommandBenchReport {
        label: args.label.clone(),
        grpc: args.target.grpc.clone(),
        devices: devices.len(),
        inflight: args.inflight,
        command: format!("{} {}", args.name, args.params),
        sent: args.commands as u64 - t.send_errors,
        outcomes: t.outcomes,
        send_errors: t.send_errors,
        unfinished: t.unfinished,
        elapsed_secs: elapsed,
        commands_per_sec: if elapsed > 0.0 {
            finished as f64 / elapsed
        } else {
            0.0
        },
        latency_client: LatencySummary::from_histogram(&t.client),
        latency_gateway: LatencySummary::from_histogram(&t.gateway),
        error_samples: t.errors,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    anyhow::ensure!(
        report.outcomes.get("SUCCEEDED").copied().unwrap_or(0) > 0,
        "no command succeeded (see the errors above)"
    );
    Ok(())
}

/// Hands each final state from the watch stream to the worker waiting for it; returns why the
/// stream ended.
async fn watch_finals(
    mut stream: tonic::Streaming<Command>,
    finals: Arc<Mutex<Finals>>,
) -> anyhow::Error {
    loop {
        let c = match stream.message().await {
            Ok(Some(c)) => c,
            Ok(None) => return anyhow::anyhow!("the watch stream ended"),
            Err(s) => return anyhow::anyhow!("WatchCommands: {:?}: {}", s.code(), s.message()),
        };
        let at = Instant::now();
        let mut f = finals.lock().unwrap();
        match f.waiting.remove(&c.id) {
            Some(tx) => {
                let _ = tx.send((at, c));
            }
            None => {
                f.early.insert(c.id.clone(), (at, c));
            }
        }
    }
}

async fn progress(tally: Arc<Mutex<Tally>>, started: Instant, total: usize) {
    let mut tick =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    loop {
        tick.tick().await;
        let t = tally.lock().unwrap();
        let done: u64 = t.outcomes.values().sum::<u64>() + t.send_errors + t.unfinished;
        eprintln!(
            "[{:>5.0}s] {done}/{total} commands final ({:?})",
            started.elapsed().as_secs_f64(),
            t.outcomes
        );
    }
}

fn print_report(r: &CommandBenchReport) {
    let (client, client_tail) = r.latency_client.cells();
    let (gateway, gateway_tail) = r.latency_gateway.cells();
    let rows = vec![
        ("street lights", r.devices.to_string()),
        ("command", r.command.clone()),
        ("in flight", r.inflight.to_string()),
        ("sent", format!("{} ({} refused)", r.sent, r.send_errors)),
        ("final", format!("{:?}", r.outcomes)),
        ("not final in time", r.unfinished.to_string()),
        ("commands/s", format!("{:.1}", r.commands_per_sec)),
        ("send→SUCCEEDED ms p50/p90/p99 (client)", client),
        ("  p99.9/max", client_tail),
        ("created→SUCCEEDED ms p50/p90/p99 (gateway)", gateway),
        ("  p99.9/max", gateway_tail),
    ];
    report::print_report("command", r.label.as_deref(), &rows, &r.error_samples);
}
