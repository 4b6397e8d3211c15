//! The overview page's figures, and the sampler that pushes them to open pages.
//!
//! Devices are counted in one registry pass with the KPI's rule for "active"; ingest rates,
//! refusals, active alerts by severity and commit latency come from the gateway's own Prometheus
//! metrics (read back from the exporter, so the console and a scrape agree); sink lag from the
//! forwarders' cursors. One
//! task samples every `console.live_interval_ms`, keeps the last [`HISTORY`] rate points for the
//! chart, and, only while a page is open, computes the whole overview once and shares the same
//! JSON text with every open page.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::prom::{self, Histogram, Sample};
use crate::kpi::Kpi;
use crate::pipeline::{now_ms, protocol_label};
use crate::proto::Protocol;
use crate::registry::Registry;
use crate::sinks::Sinks;
use crate::store::Store;

/// Rate points kept for the ingest chart (5 minutes at the default 2 s).
pub const HISTORY: usize = 150;

const PREFIXES: &[&str] = &[
    "citygw_messages_received_total",
    "citygw_readings_stored_total",
    "citygw_messages_rejected_total",
    "citygw_auth_failures_total",
    "citygw_store_commit_seconds",
    "citygw_store_commit_errors_total",
    "citygw_store_queue_depth",
    "citygw_connected_devices",
    "citygw_alerts_active",
];

/// What the overview is computed from.
#[derive(Clone)]
pub struct Sources {
    pub registry: Registry,
    pub kpi: Kpi,
    pub sinks: Sinks,
    pub store: Store,
    pub metrics: PrometheusHandle,
}

#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Enabled devices (as in the KPI: disabled ones are counted apart).
    pub registered: u64,
    pub active: u64,
    pub silent: u64,
    pub disabled: u64,
    /// With a live connection now.
    pub online: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub name: String,
    #[serde(flatten)]
    pub counts: DeviceCounts,
}

#[derive(Debug, Clone, Serialize)]
pub struct Devices {
    #[serde(flatten)]
    pub total: DeviceCounts,
    pub by_protocol: Vec<Group>,
    pub by_kind: Vec<Group>,
}

/// The protocol a device last reported over, as the console names it.
pub fn device_protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Unspecified => "none",
        p => protocol_label(p),
    }
}

/// One pass over the registry.
pub fn count_devices(registry: &Registry, kpi: &Kpi, now_ms: i64) -> Devices {
    let mut total = DeviceCounts::default();
    let mut by_protocol: BTreeMap<&'static str, DeviceCounts> = BTreeMap::new();
    let mut by_kind: BTreeMap<String, DeviceCounts> = BTreeMap::new();
    registry.for_each(|d| {
        let mut c = DeviceCounts::default();
        if d.enabled() {
            c.registered = 1;
            if kpi.is_active(d, now_ms) {
                c.active = 1;
            } else {
                c.silent = 1;
            }
        } else {
            c.disabled = 1;
        }
        c.online = d.online() as u64;
        for counts in [
            &mut total,
            by_protocol
                .entry(device_protocol(d.protocol()))
                .or_default(),
        ] {
            add(counts, c);
        }
        match by_kind.get_mut(d.kind()) {
            Some(counts) => add(counts, c),
            None => {
                by_kind.insert(d.kind().to_string(), c);
            }
        }
    });
    let groups = |m: BTreeMap<String, DeviceCounts>| {
        m.into_iter()
            .map(|(name, counts)| Group { name, counts })
            .collect()
    };
    Devices {
        total,
        by_protocol: groups(
            by_protocol
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        ),
        by_kind: groups(by_kind),
    }
}

fn add(to: &mut DeviceCounts, c: DeviceCounts) {
    to.registered += c.registered;
    to.active += c.active;
    to.silent += c.silent;
    to.disabled += c.disabled;
    to.online += c.online;
}

/// Counter totals of one sample.
#[derive(Clone)]
struct Totals {
    at: Instant,
    messages: f64,
    readings: f64,
    commits: Histogram,
}

impl Totals {
    fn read(samples: &[Sample]) -> Totals {
        Totals {
            at: Instant::now(),
            messages: sum(samples, "citygw_messages_received_total"),
            readings: sum(samples, "citygw_readings_stored_total"),
            commits: Histogram::from_samples(samples, "citygw_store_commit_seconds"),
        }
    }
}

fn sum(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// Rates over the last interval.
#[derive(Debug, Default, Clone, Serialize)]
struct Rates {
    time_ms: i64,
    messages_per_s: f64,
    readings_per_s: f64,
    /// Group commits of the interval: mean and the p99 bucket bound, milliseconds.
    commit_mean_ms: Option<f64>,
    commit_p99_ms: Option<f64>,
}

#[derive(Default)]
struct State {
    previous: Option<Totals>,
    latest: Rates,
    history: VecDeque<Rates>,
}

#[derive(Clone)]
pub struct Overview {
    inner: Arc<Inner>,
}

struct Inner {
    sources: Sources,
    interval: Duration,
    state: Mutex<State>,
    tx: watch::Sender<Arc<str>>,
}

#[derive(Serialize)]
struct Refusal {
    protocol: String,
    reason: String,
    count: u64,
}

fn refusals(samples: &[Sample], name: &str) -> Vec<Refusal> {
    let mut out: Vec<Refusal> = samples
        .iter()
        .filter(|s| s.name == name && s.value > 0.0)
        .map(|s| Refusal {
            protocol: s.label("protocol").to_string(),
            reason: s.label("reason").to_string(),
            count: s.value as u64,
        })
        .collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then(a.reason.cmp(&b.reason)));
    out
}

/// `citygw cluster status` as the overview shows it.
fn cluster_json(c: &crate::proto::ClusterStatusResponse) -> serde_json::Value {
    let nodes: Vec<_> = c
        .nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "name": n.name, "version": n.version, "started_time_ms": n.started_time_ms,
                "seen_time_ms": n.seen_time_ms, "applied_sequence": n.applied_sequence,
                "lag_messages": n.lag_messages, "healthy": n.healthy, "problem": n.problem,
                "this_node": n.this_node,
            })
        })
        .collect();
    // Leases are named "sink/<name>" (sinks::forwarder); the console names the sink.
    let leases: Vec<_> = c
        .sink_leases
        .iter()
        .filter_map(|l| Some((l.sink.strip_prefix("sink/")?, &l.node)))
        .map(|(sink, node)| serde_json::json!({"sink": sink, "node": node}))
        .collect();
    serde_json::json!({
        "backend": c.backend, "node": c.node, "stream": c.stream, "healthy": c.healthy,
        "problem": c.problem, "replicas": c.replicas, "leader": c.leader,
        "last_sequence": c.last_sequence, "messages": c.messages, "nats_server": c.nats_server,
        "nodes": nodes, "sink_leases": leases,
    })
}

/// How long the overview waits for the cluster's view (each NATS call inside has its own 2 s
/// bound; a lost quorum must not stall the overview of the node's own figures).
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(3);

impl Overview {
    pub fn new(sources: Sources, interval: Duration) -> Overview {
        Overview {
            inner: Arc::new(Inner {
                sources,
                interval,
                state: Mutex::new(State::default()),
                tx: watch::channel(Arc::from("{}")).0,
            }),
        }
    }

    /// Live overview JSON texts, one per sample, while the receiver is held.
    pub fn subscribe(&self) -> watch::Receiver<Arc<str>> {
        self.inner.tx.subscribe()
    }

    /// Samples until `shutdown`; computes and publishes the overview only while a page listens.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.sample()).await;
            if self.inner.tx.receiver_count() > 0 {
                if let Ok(json) = self.current().await {
                    self.inner.tx.send_replace(json);
                }
            }
        }
    }

    /// Reads the counters and appends a rate point.
    fn sample(&self) {
        let samples = prom::parse(&self.inner.sources.metrics.render(), PREFIXES);
        let now = Totals::read(&samples);
        let mut state = self.inner.state.lock().expect("overview lock");
        if let Some(prev) = state.previous.take() {
            let secs = now.at.duration_since(prev.at).as_secs_f64().max(1e-3);
            let rate = |a: f64, b: f64| ((a - b).max(0.0) / secs * 10.0).round() / 10.0;
            let commits = now.commits.since(&prev.commits);
            let ms = |s: f64| (s * 1e5).round() / 100.0;
            let rates = Rates {
                time_ms: now_ms(),
                messages_per_s: rate(now.messages, prev.messages),
                readings_per_s: rate(now.readings, prev.readings),
                commit_mean_ms: commits.mean().map(ms),
                commit_p99_ms: commits
                    .quantile_upper(0.99)
                    .filter(|v| v.is_finite())
                    .map(ms),
            };
            state.history.push_back(rates.clone());
            while state.history.len() > HISTORY {
                state.history.pop_front();
            }
            state.latest = rates;
        }
        state.previous = Some(now);
    }

    /// The whole overview as JSON, now: the cluster's view (when clustered), then a registry
    /// pass and a metrics read on a blocking thread.
    pub async fn current(&self) -> anyhow::Result<Arc<str>> {
        let store = &self.inner.sources.store;
        let cluster = match store.cluster() {
            Some(c) => match tokio::time::timeout(CLUSTER_TIMEOUT, c.status(store)).await {
                Ok(status) => cluster_json(&status),
                Err(_) => serde_json::json!({
                    "backend": "jetstream", "healthy": false, "nodes": [], "sink_leases": [],
                    "problem": format!(
                        "cluster status: no answer within {} s",
                        CLUSTER_TIMEOUT.as_secs()
                    ),
                }),
            },
            None => serde_json::json!({"backend": "embedded"}),
        };
        let me = self.clone();
        Ok(tokio::task::spawn_blocking(move || me.json(cluster)).await??)
    }

    fn json(&self, cluster: serde_json::Value) -> Result<Arc<str>, crate::store::StoreError> {
        let s = &self.inner.sources;
        let now = now_ms();
        let samples = prom::parse(&s.metrics.render(), PREFIXES);
        let devices = count_devices(&s.registry, &s.kpi, now);
        let sinks: Vec<_> = s
            .sinks
            .status(&s.store)?
            .into_iter()
            .map(|x| {
                serde_json::json!({
                    "name": x.name, "kind": x.kind, "cursor": x.cursor,
                    "lag_readings": x.lag_readings, "lag_seconds": x.lag_seconds,
                    "last_success_ms": x.last_success_ms,
                })
            })
            .collect();
        let connected: BTreeMap<&str, u64> = samples
            .iter()
            .filter(|x| x.name == "citygw_connected_devices")
            .map(|x| (x.label("protocol"), x.value as u64))
            .collect();
        let commits = Histogram::from_samples(&samples, "citygw_store_commit_seconds");
        let state = self.inner.state.lock().expect("overview lock");
        let history = &state.history;
        let value = serde_json::json!({
            "time_ms": now,
            "interval_ms": self.inner.interval.as_millis() as u64,
            "devices": devices,
            "connected": connected,
            "ingest": {
                "messages_total": sum(&samples, "citygw_messages_received_total") as u64,
                "readings_total": sum(&samples, "citygw_readings_stored_total") as u64,
                "messages_per_s": state.latest.messages_per_s,
                "readings_per_s": state.latest.readings_per_s,
                "history": {
                    "time_ms": history.iter().map(|r| r.time_ms).collect::<Vec<_>>(),
                    "readings_per_s": history.iter().map(|r| r.readings_per_s).collect::<Vec<_>>(),
                    "messages_per_s": history.iter().map(|r| r.messages_per_s).collect::<Vec<_>>(),
                },
            },
            // Set by the rules after each durable change, before anyone hears of it.
            "alerts_active": samples
                .iter()
                .filter(|x| x.name == "citygw_alerts_active")
                .map(|x| (x.label("severity"), x.value as u64))
                .collect::<BTreeMap<&str, u64>>(),
            "refused": refusals(&samples, "citygw_messages_rejected_total"),
            "auth_failures": refusals(&samples, "citygw_auth_failures_total"),
            "sinks": sinks,
            "cluster": cluster,
            "store": {
                "last_reading_id": s.store.last_reading_id(),
                "commits_total": commits.count as u64,
                "commit_mean_ms": state.latest.commit_mean_ms,
                "commit_p99_ms": state.latest.commit_p99_ms,
                "commit_errors_total": sum(&samples, "citygw_store_commit_errors_total") as u64,
                "queue_depth": sum(&samples, "citygw_store_queue_depth") as u64,
            },
        });
        Ok(Arc::from(value.to_string()))
    }
}
