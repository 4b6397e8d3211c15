//! Alert rules over the readings: threshold (with duration and hysteresis), absence, rate of
//! change; alerts with ThingsBoard's lifecycle; actions that send commands, with a cool-down.
//!
//! ```text
//!  store feed (committed readings, id order) ──▶ evaluator ──▶ alerts table ──▶ watchers
//!  timer (durations, silent devices)        ──┘        └──▶ action: Commands::send (cool-down)
//! ```
//!
//! The evaluator reads committed readings after the fact, so no acknowledgement ever waits on a
//! rule, and it resumes after the last reading it evaluated (kept with its state), so a restart
//! neither skips readings nor loses a `for` duration in progress. An alert is on disk before any
//! watcher hears of it or any action runs.
//!
//! Alert states: raised ACTIVE_UNACK; acknowledging and clearing are independent (ACTIVE_ACK,
//! CLEARED_UNACK, CLEARED_ACK). The rule clears its alert when the condition ends (below the
//! `clear` level, the device reports again, the movement falls back); an operator may clear it by
//! hand, and the rule raises a new one if the condition comes back.
//!
//! Rules come from `[[rules]]` in the config file or are added at run time through the Control
//! API (`citygw rule add`); those are kept in the store (see [`log`]) and reloaded at start. A
//! rule added at run time applies from the next reading the evaluator reads, not to the history;
//! removing it clears its active alerts (by whoever removed it) and forgets its pending
//! durations and cool-downs. A config rule and a run-time rule never share a name: adding one
//! that exists is refused, and if the config file later gains a rule of the same name, the file
//! wins at the next start (the stored rule is deleted, with a warning).

pub mod config;
pub mod eval;
pub mod log;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, Mutex};
use tokio_util::sync::CancellationToken;

use crate::control::commands::Commands;
use crate::pipeline::now_ms;
use crate::proto::{
    command_payload, reading, Alert, AlertEvent, AlertState, CommandPayload, Reading,
    SendCommandRequest, Severity,
};
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use config::{compile_all, severity_label, Condition, Rule, RuleConfig};
use eval::{Event, Step, Track};
use log::{AlertLog, Batch, StoredRule, COOLDOWN, PENDING};

/// Changes a watcher may fall behind before its stream ends.
const WATCH_CAPACITY: usize = 4096;
/// Readings read from the store per page while catching up.
const CATCH_UP_PAGE: usize = 1000;
/// How often durations are checked, and the position saved when nothing else was written.
const TICK: Duration = Duration::from_secs(1);
const SAVE_POSITION_EVERY: Duration = Duration::from_secs(5);
/// How often alerts cleared longer than the retention ago are deleted.
const RETENTION_CHECK: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alert {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Largest rule definition accepted (a rule is a few hundred bytes of TOML).
pub const MAX_DEFINITION: usize = 16 * 1024;

/// A rule as written: one `[[rules]]` table in TOML (the Control API's and the console's input).
/// A key that is no rule key is refused by name.
pub fn parse_definition(text: &str) -> Result<RuleConfig, RuleError> {
    if text.len() > MAX_DEFINITION {
        return Err(RuleError::Invalid(format!(
            "rule definition: {} bytes, at most {MAX_DEFINITION}",
            text.len()
        )));
    }
    toml::from_str(text).map_err(|e| RuleError::Invalid(format!("rule definition: {e}")))
}

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The definition does not parse or does not pass the checks (the message names the key).
    #[error("{0}")]
    Invalid(String),
    #[error("a rule named {0:?} already exists ({1})")]
    Exists(String, &'static str),
    #[error("rule {0:?} comes from the config file: remove it there and restart the gateway")]
    FromConfig(String),
    #[error("rule {0:?} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a rule comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// `[[rules]]` in the config file.
    Config,
    /// Added through the Control API, kept in the store.
    Api { by: String, time_ms: i64 },
}

/// A rule in force, with its definition as written and its origin.
struct Entry {
    rule: Rule,
    definition: RuleConfig,
    origin: Origin,
}

/// The rules in force. A removed rule leaves its slot empty, so the indices the tracks hold stay
/// valid for the life of the process. A change builds a new set (changes are rare); evaluation
/// holds the current one without copying it.
#[derive(Default, Clone)]
struct RuleSet {
    slots: Vec<Option<Arc<Entry>>>,
    /// Threshold and rate rules by the quantity they watch.
    by_quantity: HashMap<String, Vec<usize>>,
    absence: Vec<usize>,
}

impl RuleSet {
    fn push(&mut self, e: Entry) {
        let i = self.slots.len();
        match e.rule.condition {
            Condition::Absence { .. } => self.absence.push(i),
            _ => self
                .by_quantity
                .entry(e.rule.quantity.clone())
                .or_default()
                .push(i),
        }
        self.slots.push(Some(Arc::new(e)));
    }

    fn remove(&mut self, i: usize) {
        self.slots[i] = None;
        self.absence.retain(|x| *x != i);
        for list in self.by_quantity.values_mut() {
            list.retain(|x| *x != i);
        }
        self.by_quantity.retain(|_, list| !list.is_empty());
    }

    fn entry(&self, i: usize) -> Option<&Arc<Entry>> {
        self.slots.get(i)?.as_ref()
    }

    fn rule(&self, i: usize) -> Option<&Rule> {
        self.entry(i).map(|e| &e.rule)
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|e| e.rule.name == name))
    }

    fn entries(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.slots.iter().flatten()
    }

    fn is_empty(&self) -> bool {
        self.entries().next().is_none()
    }

    /// How often silent devices are looked for: a tenth of the shortest silence, 1 to 30 s.
    fn absence_every(&self) -> Duration {
        let shortest = self
            .absence
            .iter()
            .filter_map(|&i| match self.rule(i)?.condition {
                Condition::Absence { silent_ms } => Some(silent_ms),
                _ => None,
            })
            .min()
            .unwrap_or(i64::MAX);
        Duration::from_millis((shortest / 10).clamp(1000, 30_000) as u64)
    }
}

#[derive(Clone)]
pub struct Alerts {
    inner: Arc<Inner>,
}

struct Inner {
    log: AlertLog,
    store: Store,
    registry: Registry,
    commands: Commands,
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Alert>>,
}

#[derive(Default)]
struct State {
    rules: Arc<RuleSet>,
    /// Stored run-time rules that a config rule of the same name replaced: deleted at start.
    shadowed: Vec<String>,
    /// Per device, the tracks of the rules that have something to remember for it.
    tracks: HashMap<String, Vec<(usize, Track)>>,
    /// Active alerts by id.
    active: HashMap<String, Alert>,
    /// `{rule}/{target}` → when its action last sent a command.
    cooldowns: HashMap<String, i64>,
    /// Active alerts whose rule is no longer configured: cleared when the evaluator starts.
    orphans: Vec<String>,
    /// Last reading evaluated, and the last one saved.
    position: u64,
    saved_position: u64,
}

/// The device an event is about.
struct Subject<'a> {
    device: &'a str,
    tenant: &'a str,
    kind: &'a str,
    commune: &'a str,
}

/// Commands an action is to send once the alert is durable.
struct Planned {
    alert_id: String,
    rule: usize,
    targets: Vec<String>,
}

/// What one evaluation pass produced: the writes, the changed alerts, the actions.
#[derive(Default)]
struct Pass {
    batch: Batch,
    changed: Vec<Alert>,
    planned: Vec<Planned>,
    evaluated: u64,
}

fn value_of(r: &Reading) -> Option<f64> {
    match r.value.as_ref()? {
        reading::Value::Number(n) => Some(*n),
        reading::Value::Boolean(b) => Some(if *b { 1.0 } else { 0.0 }),
        reading::Value::Text(_) => None,
    }
}

/// "ACTIVE_UNACK", ...: the state as operators read it.
pub fn alert_state_label(s: AlertState) -> &'static str {
    s.as_str_name()
        .strip_prefix("ALERT_STATE_")
        .unwrap_or("UNSPECIFIED")
}

fn state_of(a: &Alert) -> AlertState {
    AlertState::try_from(a.state).unwrap_or(AlertState::Unspecified)
}

pub fn is_active(a: &Alert) -> bool {
    matches!(state_of(a), AlertState::ActiveUnack | AlertState::ActiveAck)
}

fn transition(a: &mut Alert, to: AlertState, now: i64, by: &str, detail: String) {
    a.state = to as i32;
    a.history.push(AlertEvent {
        state: to as i32,
        time_ms: now,
        by: by.to_string(),
        detail,
    });
}

/// Clears `a` (if active): ACTIVE_UNACK → CLEARED_UNACK, ACTIVE_ACK → CLEARED_ACK.
fn clear_alert(a: &mut Alert, now: i64, by: &str, detail: String) -> bool {
    let to = match state_of(a) {
        AlertState::ActiveUnack => AlertState::ClearedUnack,
        AlertState::ActiveAck => AlertState::ClearedAck,
        _ => return false,
    };
    a.cleared_time_ms = now;
    a.cleared_by = by.to_string();
    transition(a, to, now, by, detail);
    true
}

impl Alerts {
    /// Loads the rules (the config file's, then those added at run time), the active alerts and
    /// the evaluator's state; [`Alerts::run`] evaluates.
    pub fn load(
        configured: &[RuleConfig],
        store: Store,
        registry: Registry,
        commands: Commands,
    ) -> anyhow::Result<Alerts> {
        let log = AlertLog::new(store.clone());
        let mut rules = RuleSet::default();
        for (rule, definition) in compile_all(configured)?.into_iter().zip(configured) {
            rules.push(Entry {
                rule,
                definition: definition.clone(),
                origin: Origin::Config,
            });
        }
        let mut shadowed = Vec::new();
        for stored in log.load_rules()? {
            let name = stored.definition.name.clone();
            if rules.index(&name).is_some() {
                tracing::warn!(rule = %name, added_by = %stored.by,
                    "the config file now has a rule of this name: it replaces the one added at run time");
                shadowed.push(name);
                continue;
            }
            match stored.definition.compile() {
                Ok(rule) => rules.push(Entry {
                    rule,
                    definition: stored.definition,
                    origin: Origin::Api {
                        by: stored.by,
                        time_ms: stored.time_ms,
                    },
                }),
                Err(e) => tracing::error!(rule = %name, error = %e,
                    "a rule added at run time no longer passes the checks: not evaluated (remove it with `citygw rule remove`)"),
            }
        }
        let index = |name: &str| rules.index(name);
        let mut st = State {
            shadowed,
            ..State::default()
        };
        for alert in log.load_active()? {
            match index(&alert.rule) {
                Some(r) => {
                    let track = track_mut(&mut st.tracks, &alert.device_id, r);
                    track.active = Some((alert.id.clone(), alert.raised_time_ms));
                }
                None => st.orphans.push(alert.id.clone()),
            }
            st.active.insert(alert.id.clone(), alert);
        }
        for (rule, device, since, value) in log.load_pending()? {
            if let Some(r) = index(&rule) {
                track_mut(&mut st.tracks, &device, r).pending = Some((since, value));
            }
        }
        st.cooldowns = log.load_cooldowns()?.into_iter().collect();
        st.position = match log.position()? {
            Some(p) => p,
            // First start: rules apply from now on, not to the history.
            None => store.last_reading_id(),
        };
        st.saved_position = st.position;
        tracing::info!(
            rules = rules.slots.len(),
            active = st.active.len(),
            position = st.position,
            "alert rules loaded"
        );
        st.rules = Arc::new(rules);
        let alerts = Alerts {
            inner: Arc::new(Inner {
                log,
                store,
                registry,
                commands,
                state: Mutex::new(st),
                changes: broadcast::channel(WATCH_CAPACITY).0,
            }),
        };
        alerts.set_gauges(&alerts.inner.state.try_lock().expect("not shared yet"));
        Ok(alerts)
    }

    /// The rules in force as the Control API lists them, with their active alerts.
    pub async fn rule_list(&self) -> Vec<crate::proto::Rule> {
        let mut active: HashMap<&str, u64> = HashMap::new();
        let st = self.inner.state.lock().await;
        for a in st.active.values() {
            *active.entry(a.rule.as_str()).or_default() += 1;
        }
        st.rules
            .entries()
            .map(|e| rule_info(e, active.get(e.rule.name.as_str()).copied().unwrap_or(0)))
            .collect()
    }

    /// Adds a rule at run time: checked like a config rule, durable before it is in force, then
    /// evaluated from the next reading on.
    pub async fn add_rule(
        &self,
        definition: RuleConfig,
        by: &str,
    ) -> Result<crate::proto::Rule, RuleError> {
        let rule = definition
            .compile()
            .map_err(|e| RuleError::Invalid(format!("{e:#}")))?;
        let mut st = self.inner.state.lock().await;
        if let Some(e) = st.rules.index(&rule.name).and_then(|i| st.rules.entry(i)) {
            let origin = match e.origin {
                Origin::Config => "in the config file",
                Origin::Api { .. } => "added at run time",
            };
            return Err(RuleError::Exists(rule.name, origin));
        }
        let stored = StoredRule {
            definition,
            by: by.to_string(),
            time_ms: now_ms(),
        };
        let mut batch = Batch::default();
        batch.rule(&rule.name, Some(&stored));
        batch.position(st.position);
        self.inner.log.save(batch).await?;
        st.saved_position = st.position;
        let entry = Entry {
            rule,
            definition: stored.definition,
            origin: Origin::Api {
                by: stored.by,
                time_ms: stored.time_ms,
            },
        };
        let info = rule_info(&entry, 0);
        tracing::info!(rule = %entry.rule.name, by, condition = %entry.rule.describe(), "rule added");
        metrics::counter!("citygw_rule_changes_total", "change" => "added").increment(1);
        let mut rules = (*st.rules).clone();
        rules.push(entry);
        st.rules = Arc::new(rules);
        self.set_gauges(&st);
        Ok(info)
    }

    /// Removes a rule added at run time: its active alerts are cleared (by `by`), its pending
    /// durations and cool-downs forgotten; the rule is gone from the store before the answer.
    /// Returns the rule as it was and how many alerts were cleared.
    pub async fn remove_rule(
        &self,
        name: &str,
        by: &str,
    ) -> Result<(crate::proto::Rule, u64), RuleError> {
        let mut st = self.inner.state.lock().await;
        let Some(i) = st.rules.index(name) else {
            // A stored rule that no longer passes the checks is not in force, but removable.
            if self.inner.log.has_rule(name)? {
                let mut batch = Batch::default();
                batch.rule(name, None);
                self.inner.log.save(batch).await?;
                let info = crate::proto::Rule {
                    name: name.to_string(),
                    origin: "api".into(),
                    ..Default::default()
                };
                return Ok((info, 0));
            }
            return Err(RuleError::NotFound(name.to_string()));
        };
        let entry = st.rules.entry(i).expect("indexed").clone();
        if entry.origin == Origin::Config {
            return Err(RuleError::FromConfig(name.to_string()));
        }
        let now = now_ms();
        let detail = format!("rule {name:?} removed");
        let mut batch = Batch::default();
        let mut cleared = Vec::new();
        for a in st.active.values().filter(|a| a.rule == name) {
            let mut a = a.clone();
            clear_alert(&mut a, now, by, detail.clone());
            batch.alert(&a, false);
            cleared.push(a);
        }
        for prefix in [format!("{PENDING}{name}/"), format!("{COOLDOWN}{name}/")] {
            for key in self.inner.log.keys(&prefix)? {
                batch.forget(key);
            }
        }
        batch.rule(name, None);
        self.inner.log.save(batch).await?;
        // Durable: now the memory follows.
        for a in &cleared {
            st.active.remove(&a.id);
            metrics::counter!("citygw_alerts_cleared_total", "rule" => a.rule.clone(),
                "severity" => severity_label(entry.rule.severity), "by" => "rule_removed")
            .increment(1);
        }
        for list in st.tracks.values_mut() {
            list.retain(|(r, _)| *r != i);
        }
        st.tracks.retain(|_, list| !list.is_empty());
        let own = format!("{name}/");
        st.cooldowns.retain(|k, _| !k.starts_with(&own));
        let mut rules = (*st.rules).clone();
        rules.remove(i);
        st.rules = Arc::new(rules);
        self.set_gauges(&st);
        drop(st);
        let n = cleared.len() as u64;
        tracing::info!(rule = name, by, alerts_cleared = n, "rule removed");
        metrics::counter!("citygw_rule_changes_total", "change" => "removed").increment(1);
        self.tell(cleared);
        Ok((rule_info(&entry, 0), n))
    }

    /// Evaluates committed readings and the timers until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        // Subscribe first, then catch up from the store: nothing committed in between is missed.
        let mut feed = self.inner.store.subscribe();
        self.clear_orphans().await;
        if self.catch_up().await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_absence = tokio::time::Instant::now();
        let mut last_save = tokio::time::Instant::now();
        loop {
            tokio::select! {
                got = feed.recv() => match got {
                    Ok(batch) => {
                        let mut st = self.inner.state.lock().await;
                        let mut pass = Pass::default();
                        for fr in batch.iter() {
                            if fr.reading.id > st.position {
                                self.evaluate(&mut st, &mut pass, &fr.reading);
                                st.position = fr.reading.id;
                            }
                        }
                        self.finish(st, pass, false).await;
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        metrics::counter!("citygw_rules_feed_lagged_total").increment(1);
                        tracing::warn!(commits = n, "rule evaluation fell behind the feed; catching up from the store");
                        if self.catch_up().await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    let every = self.inner.state.lock().await.rules.absence_every();
                    let absence = last_absence.elapsed() >= every;
                    if absence {
                        last_absence = tokio::time::Instant::now();
                    }
                    let save = last_save.elapsed() >= SAVE_POSITION_EVERY;
                    if save {
                        last_save = tokio::time::Instant::now();
                    }
                    self.on_tick(absence, save).await;
                }
                _ = shutdown.cancelled() => {
                    self.on_tick(false, true).await;
                    return;
                }
            }
        }
    }

    /// Every hour until `shutdown`, deletes alerts cleared longer than `retention` ago (the
    /// store's `retention_days`, like the command log); active alerts stay. Runs with or
    /// without rules: alerts of a rule taken out of the config age out too.
    pub async fn retain(self, retention: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(RETENTION_CHECK);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let cutoff = now_ms().saturating_sub(retention.as_millis() as i64);
            match self.expire(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "old cleared alerts deleted (retention)"),
                Err(e) => tracing::warn!(error = %e, "alert retention failed"),
            }
        }
    }

    /// Deletes alerts cleared before `cutoff_ms`; how many went. Under the state lock, so an
    /// operator's acknowledgement cannot write back an alert being deleted.
    pub async fn expire(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let _st = self.inner.state.lock().await;
        let n = self.inner.log.expire(cutoff_ms).await?;
        metrics::counter!("citygw_retention_deleted_total", "kind" => "alert").increment(n as u64);
        Ok(n)
    }

    /// Evaluates what the store committed after the position, a page at a time.
    async fn catch_up(&self) -> Result<(), StoreError> {
        loop {
            let position = {
                let mut st = self.inner.state.lock().await;
                if st.rules.is_empty() {
                    // Nothing to evaluate: a rule added later starts from here.
                    st.position = st.position.max(self.inner.store.last_reading_id());
                    return Ok(());
                }
                st.position
            };
            let readings = match self.inner.store.readings_after(position, CATCH_UP_PAGE) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "rule evaluation cannot read the store");
                    return Err(e);
                }
            };
            let Some(last) = readings.last().map(|r| r.id) else {
                return Ok(());
            };
            let mut st = self.inner.state.lock().await;
            let mut pass = Pass::default();
            for r in &readings {
                self.evaluate(&mut st, &mut pass, r);
            }
            st.position = last;
            self.finish(st, pass, true).await;
        }
    }

    /// One reading against the rules that watch its quantity (and the absence rules).
    fn evaluate(&self, st: &mut State, pass: &mut Pass, r: &Reading) {
        pass.evaluated += 1;
        let subject = Subject {
            device: &r.device_id,
            tenant: &r.tenant,
            kind: &r.kind,
            commune: &r.commune_code,
        };
        let t = r.received_time_ms;
        let value = value_of(r);
        let rules = Arc::clone(&st.rules);
        let absence = rules.absence.iter();
        let watching = value
            .and_then(|_| rules.by_quantity.get(&r.quantity))
            .into_iter()
            .flatten();
        for &i in absence.chain(watching) {
            let Some(rule) = rules.rule(i) else {
                continue;
            };
            if !rule.covers(
                subject.device,
                subject.tenant,
                subject.kind,
                subject.commune,
            ) {
                continue;
            }
            let v = value.unwrap_or_default();
            let step = match find_track(&mut st.tracks, subject.device, i) {
                Some(track) => eval::on_reading(rule, track, v, t),
                None => {
                    let mut fresh = Track::default();
                    let step = eval::on_reading(rule, &mut fresh, v, t);
                    if fresh.idle() && step.event.is_none() {
                        continue;
                    }
                    *track_mut(&mut st.tracks, subject.device, i) = fresh;
                    step
                }
            };
            self.apply(st, pass, i, &subject, step, t);
        }
    }

    /// Time passing: thresholds held long enough; silent devices (`absence`); saving the position.
    async fn on_tick(&self, absence: bool, save: bool) {
        let now = now_ms();
        let mut st = self.inner.state.lock().await;
        let mut pass = Pass::default();
        let rules = Arc::clone(&st.rules);
        // Pending durations.
        let due: Vec<(String, usize)> = st
            .tracks
            .iter()
            .flat_map(|(d, ts)| {
                ts.iter()
                    .filter(|(_, t)| t.pending.is_some() && t.active.is_none())
                    .map(move |(i, _)| (d.clone(), *i))
            })
            .collect();
        for (device, i) in due {
            let Some(entry) = self.inner.registry.get(&device) else {
                // Deleted: nothing to alert about any more.
                drop_track(&mut st.tracks, &device, i);
                continue;
            };
            let (Some(rule), Some(track)) = (rules.rule(i), find_track(&mut st.tracks, &device, i))
            else {
                continue;
            };
            let step = eval::on_tick(rule, track, now, entry.last_seen_ms());
            let subject = Subject {
                device: entry.id(),
                tenant: entry.tenant(),
                kind: entry.kind(),
                commune: entry.commune_code(),
            };
            self.apply(&mut st, &mut pass, i, &subject, step, now);
        }
        if absence && !rules.absence.is_empty() {
            let mut silent: Vec<(Arc<crate::registry::DeviceEntry>, usize, Step)> = Vec::new();
            let tracks = &mut st.tracks;
            let devices = self
                .inner
                .registry
                .select("", usize::MAX, |e| e.enabled() && e.last_seen_ms() > 0);
            for entry in devices {
                for &i in &rules.absence {
                    let Some(rule) = rules.rule(i) else {
                        continue;
                    };
                    if !rule.covers(
                        entry.id(),
                        entry.tenant(),
                        entry.kind(),
                        entry.commune_code(),
                    ) {
                        continue;
                    }
                    let mut scratch = Track::default();
                    let track = find_track(tracks, entry.id(), i).unwrap_or(&mut scratch);
                    let step = eval::on_tick(rule, track, now, entry.last_seen_ms());
                    if step.event.is_some() {
                        silent.push((entry.clone(), i, step));
                    }
                }
            }
            for (entry, i, step) in silent {
                let subject = Subject {
                    device: entry.id(),
                    tenant: entry.tenant(),
                    kind: entry.kind(),
                    commune: entry.commune_code(),
                };
                self.apply(&mut st, &mut pass, i, &subject, step, now);
            }
        }
        self.finish(st, pass, save).await;
    }

    /// Turns a step into writes, alert changes and planned actions.
    fn apply(
        &self,
        st: &mut State,
        pass: &mut Pass,
        i: usize,
        s: &Subject<'_>,
        step: Step,
        t: i64,
    ) {
        let rules = Arc::clone(&st.rules);
        let Some(rule) = rules.rule(i) else {
            return;
        };
        let State {
            tracks,
            active,
            cooldowns,
            ..
        } = st;
        let track = track_mut(tracks, s.device, i);
        if step.pending_changed {
            pass.batch.pending(&rule.name, s.device, track.pending);
        }
        let by = format!("rule:{}", rule.name);
        match step.event {
            Some(Event::Raise { value, message }) => {
                let id = uuid::Uuid::now_v7().to_string();
                track.active = Some((id.clone(), t));
                let alert = Alert {
                    id: id.clone(),
                    rule: rule.name.clone(),
                    device_id: s.device.to_string(),
                    tenant: s.tenant.to_string(),
                    kind: s.kind.to_string(),
                    commune_code: s.commune.to_string(),
                    severity: rule.severity as i32,
                    state: AlertState::ActiveUnack as i32,
                    quantity: rule.quantity.clone(),
                    value,
                    message: message.clone(),
                    raised_time_ms: t,
                    history: vec![AlertEvent {
                        state: AlertState::ActiveUnack as i32,
                        time_ms: t,
                        by,
                        detail: message.clone(),
                    }],
                    ..Default::default()
                };
                tracing::warn!(alert = %id, rule = %rule.name, device = s.device,
                    severity = severity_label(rule.severity), %message, "alert raised");
                metrics::counter!("citygw_alerts_raised_total", "rule" => rule.name.clone(),
                    "severity" => severity_label(rule.severity))
                .increment(1);
                pass.batch.alert(&alert, true);
                pass.changed.push(alert.clone());
                active.insert(id.clone(), alert);
                if let Some(action) = &rule.action {
                    self.plan(pass, cooldowns, i, rule, action, s, id, t);
                }
            }
            Some(Event::Clear { value: _, message }) => {
                if let Some((id, _)) = track.active.take() {
                    if let Some(mut alert) = active.remove(&id) {
                        clear_alert(&mut alert, t, &by, message.clone());
                        tracing::info!(alert = %id, rule = %rule.name, device = s.device,
                            %message, "alert cleared");
                        metrics::counter!("citygw_alerts_cleared_total", "rule" => rule.name.clone(),
                            "severity" => severity_label(rule.severity), "by" => "rule")
                        .increment(1);
                        pass.batch.alert(&alert, false);
                        pass.changed.push(alert);
                    }
                }
            }
            None => {}
        }
        if track.idle() {
            drop_track(tracks, s.device, i);
        }
    }

    /// Decides an action's targets, unless its cool-down for them is still running.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        pass: &mut Pass,
        cooldowns: &mut HashMap<String, i64>,
        i: usize,
        rule: &Rule,
        action: &config::Action,
        s: &Subject<'_>,
        alert_id: String,
        t: i64,
    ) {
        let key = if action.target_kind.is_empty() {
            format!("{}/{}", rule.name, s.device)
        } else {
            format!("{}/commune:{}", rule.name, s.commune)
        };
        let now = now_ms().max(t);
        if cooldowns
            .get(&key)
            .is_some_and(|last| now - last < action.cooldown_ms)
        {
            metrics::counter!("citygw_rule_actions_total", "rule" => rule.name.clone(), "outcome" => "cooldown")
                .increment(1);
            tracing::info!(rule = %rule.name, target = %key, "action skipped: cool-down");
            return;
        }
        let targets = if action.target_kind.is_empty() {
            vec![s.device.to_string()]
        } else {
            self.inner
                .registry
                .select("", usize::MAX, |e| {
                    e.enabled()
                        && e.kind() == action.target_kind
                        && e.commune_code() == s.commune
                        && (rule.tenant.is_empty() || e.tenant() == rule.tenant)
                })
                .iter()
                .map(|e| e.id().to_string())
                .collect()
        };
        cooldowns.insert(key.clone(), now);
        pass.batch.cooldown(&key, now);
        pass.planned.push(Planned {
            alert_id,
            rule: i,
            targets,
        });
    }

    /// Writes a pass (with the position), then tells the watchers and runs the actions.
    /// `save_position`: write the position even if nothing else changed.
    async fn finish(
        &self,
        mut st: tokio::sync::MutexGuard<'_, State>,
        pass: Pass,
        save_position: bool,
    ) {
        if pass.evaluated > 0 {
            metrics::counter!("citygw_rules_readings_evaluated_total").increment(pass.evaluated);
        }
        if self
            .write(&mut st, pass.batch, save_position)
            .await
            .is_err()
        {
            return;
        }
        drop(st);
        self.tell(pass.changed);
        for p in pass.planned {
            self.act(p).await;
        }
    }

    /// One durable commit of `batch` and the position, retried while the store fails (not once
    /// it is closed).
    async fn write(
        &self,
        st: &mut State,
        mut batch: Batch,
        save_position: bool,
    ) -> Result<(), StoreError> {
        let moved = st.position != st.saved_position;
        // Without rules nothing is written: the position only matters to a rule added later,
        // which starts from the evaluator's position in memory (or, after a restart, the end).
        if batch.is_empty() && (!(save_position && moved) || st.rules.is_empty()) {
            return Ok(());
        }
        batch.position(st.position);
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.inner.log.save(batch.clone()).await {
                Ok(()) => break,
                Err(StoreError::Closed) => return Err(StoreError::Closed),
                Err(e) => {
                    metrics::counter!("citygw_alert_log_errors_total").increment(1);
                    tracing::warn!(error = %e, "alert state not written; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        st.saved_position = st.position;
        self.set_gauges(st);
        Ok(())
    }

    fn tell(&self, changed: Vec<Alert>) {
        for a in changed {
            let _ = self.inner.changes.send(Arc::new(a));
        }
    }

    /// Sends an action's commands and records their ids on the alert.
    async fn act(&self, p: Planned) {
        let rules = Arc::clone(&self.inner.state.lock().await.rules);
        // Removed meanwhile: nothing to send.
        let Some(rule) = rules.rule(p.rule) else {
            return;
        };
        let Some(action) = &rule.action else {
            return;
        };
        let by = format!("rule:{}", rule.name);
        let mut ids = Vec::new();
        for device in &p.targets {
            let req = SendCommandRequest {
                device_id: device.clone(),
                name: action.command.clone(),
                payload: Some(CommandPayload {
                    kind: Some(command_payload::Kind::ParamsJson(action.params.clone())),
                }),
                ttl_ms: action.ttl_ms,
                confirmed: false,
                f_port: 0,
            };
            match self.inner.commands.send(req, &by).await {
                Ok(c) => {
                    metrics::counter!("citygw_rule_actions_total", "rule" => rule.name.clone(), "outcome" => "sent")
                        .increment(1);
                    ids.push(c.id);
                }
                Err(e) => {
                    metrics::counter!("citygw_rule_actions_total", "rule" => rule.name.clone(), "outcome" => "failed")
                        .increment(1);
                    tracing::warn!(rule = %rule.name, device, error = %e, "action command not sent");
                }
            }
        }
        if ids.is_empty() {
            return;
        }
        let mut st = self.inner.state.lock().await;
        let alert = match st.active.get_mut(&p.alert_id) {
            Some(a) => {
                a.command_ids.extend(ids);
                Some((a.clone(), true))
            }
            None => match self.inner.log.get(&p.alert_id) {
                Ok(Some(mut a)) => {
                    a.command_ids.extend(ids);
                    Some((a, false))
                }
                _ => None,
            },
        };
        if let Some((alert, active)) = alert {
            let mut batch = Batch::default();
            batch.alert(&alert, active);
            if self.write(&mut st, batch, false).await.is_ok() {
                drop(st);
                self.tell(vec![alert]);
            }
        }
    }

    /// Clears the active alerts of rules no longer configured, and deletes the stored run-time
    /// rules a config rule replaced.
    async fn clear_orphans(&self) {
        let mut st = self.inner.state.lock().await;
        let now = now_ms();
        let mut pass = Pass::default();
        for name in std::mem::take(&mut st.shadowed) {
            pass.batch.rule(&name, None);
        }
        for id in std::mem::take(&mut st.orphans) {
            if let Some(mut a) = st.active.remove(&id) {
                let detail = format!("rule {:?} is no longer configured", a.rule);
                clear_alert(&mut a, now, "gateway", detail);
                pass.batch.alert(&a, false);
                pass.changed.push(a);
            }
        }
        self.finish(st, pass, false).await;
    }

    fn set_gauges(&self, st: &State) {
        let (mut config, mut api) = (0, 0);
        for e in st.rules.entries() {
            match e.origin {
                Origin::Config => config += 1,
                Origin::Api { .. } => api += 1,
            }
        }
        metrics::gauge!("citygw_rules", "origin" => "config").set(config as f64);
        metrics::gauge!("citygw_rules", "origin" => "api").set(api as f64);
        let mut counts: HashMap<i32, u64> = HashMap::new();
        for a in st.active.values() {
            *counts.entry(a.severity).or_default() += 1;
        }
        for s in [
            Severity::Critical,
            Severity::Major,
            Severity::Minor,
            Severity::Warning,
        ] {
            metrics::gauge!("citygw_alerts_active", "severity" => severity_label(s))
                .set(counts.get(&(s as i32)).copied().unwrap_or(0) as f64);
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<Alert>, StoreError> {
        if let Some(a) = self.inner.state.lock().await.active.get(id) {
            return Ok(Some(a.clone()));
        }
        self.inner.log.get(id)
    }

    /// Alerts newest first (see [`AlertLog::list`]).
    pub fn list(
        &self,
        before_id: &str,
        limit: usize,
        keep: impl FnMut(&Alert) -> bool,
    ) -> Result<Vec<Alert>, StoreError> {
        self.inner.log.list(before_id, limit, 1_000_000, keep)
    }

    /// Every change from now on, once it is durable.
    pub fn watch(&self) -> broadcast::Receiver<Arc<Alert>> {
        self.inner.changes.subscribe()
    }

    /// Acknowledges an alert (active or cleared); acknowledging twice changes nothing.
    pub async fn ack(&self, id: &str, by: &str) -> Result<Alert, AlertError> {
        self.change(id, by, |a, now| {
            let to = match state_of(a) {
                AlertState::ActiveUnack => AlertState::ActiveAck,
                AlertState::ClearedUnack => AlertState::ClearedAck,
                _ => return false,
            };
            a.acked_time_ms = now;
            a.acked_by = by.to_string();
            transition(a, to, now, by, "acknowledged".into());
            true
        })
        .await
    }

    /// Clears an active alert by hand; clearing a cleared alert changes nothing.
    pub async fn clear(&self, id: &str, by: &str) -> Result<Alert, AlertError> {
        self.change(id, by, |a, now| {
            clear_alert(a, now, by, "cleared by hand".into())
        })
        .await
    }

    /// Applies an operator's change to an alert, durably, and tells the watchers.
    async fn change(
        &self,
        id: &str,
        by: &str,
        f: impl FnOnce(&mut Alert, i64) -> bool,
    ) -> Result<Alert, AlertError> {
        let mut st = self.inner.state.lock().await;
        let now = now_ms();
        let mut alert = match st.active.get(id) {
            Some(a) => a.clone(),
            None => self
                .inner
                .log
                .get(id)?
                .ok_or_else(|| AlertError::NotFound(id.to_string()))?,
        };
        let was_active = is_active(&alert);
        if !f(&mut alert, now) {
            return Ok(alert);
        }
        let active = is_active(&alert);
        let mut batch = Batch::default();
        batch.alert(&alert, active);
        if was_active && !active {
            // Cleared by hand: the rule may raise a new alert if the condition comes back.
            if let Some(i) = st.rules.index(&alert.rule) {
                if let Some(track) = find_track(&mut st.tracks, &alert.device_id, i) {
                    track.active = None;
                    if track.idle() {
                        drop_track(&mut st.tracks, &alert.device_id, i);
                    }
                }
            }
            metrics::counter!("citygw_alerts_cleared_total", "rule" => alert.rule.clone(),
                "severity" => severity_label(Severity::try_from(alert.severity).unwrap_or_default()),
                "by" => "operator")
            .increment(1);
        }
        self.inner.log.save(batch).await?;
        if active {
            st.active.insert(alert.id.clone(), alert.clone());
        } else {
            st.active.remove(&alert.id);
        }
        self.set_gauges(&st);
        drop(st);
        tracing::info!(
            alert = id,
            by,
            state = alert_state_label(state_of(&alert)),
            "alert changed"
        );
        let _ = self.inner.changes.send(Arc::new(alert.clone()));
        Ok(alert)
    }
}

fn find_track<'a>(
    tracks: &'a mut HashMap<String, Vec<(usize, Track)>>,
    device: &str,
    rule: usize,
) -> Option<&'a mut Track> {
    tracks
        .get_mut(device)?
        .iter_mut()
        .find(|(i, _)| *i == rule)
        .map(|(_, t)| t)
}

fn track_mut<'a>(
    tracks: &'a mut HashMap<String, Vec<(usize, Track)>>,
    device: &str,
    rule: usize,
) -> &'a mut Track {
    if !tracks.contains_key(device) {
        tracks.insert(device.to_string(), Vec::new());
    }
    let list = tracks.get_mut(device).expect("just inserted");
    let at = match list.iter().position(|(i, _)| *i == rule) {
        Some(at) => at,
        None => {
            list.push((rule, Track::default()));
            list.len() - 1
        }
    };
    &mut list[at].1
}

fn drop_track(tracks: &mut HashMap<String, Vec<(usize, Track)>>, device: &str, rule: usize) {
    if let Some(list) = tracks.get_mut(device) {
        list.retain(|(i, _)| *i != rule);
        if list.is_empty() {
            tracks.remove(device);
        }
    }
}

/// A rule as the Control API shows it.
fn rule_info(e: &Entry, active: u64) -> crate::proto::Rule {
    let r = &e.rule;
    let (origin, added_by, added_time_ms) = match &e.origin {
        Origin::Config => ("config", String::new(), 0),
        Origin::Api { by, time_ms } => ("api", by.clone(), *time_ms),
    };
    crate::proto::Rule {
        name: r.name.clone(),
        r#type: r.type_label().to_string(),
        description: r.describe(),
        severity: r.severity as i32,
        quantity: r.quantity.clone(),
        tenant: r.tenant.clone(),
        kind: r.kind.clone(),
        commune: r.commune.clone(),
        device: r.device.clone(),
        action_command: r
            .action
            .as_ref()
            .map(|a| a.command.clone())
            .unwrap_or_default(),
        active,
        origin: origin.to_string(),
        added_by,
        added_time_ms,
        definition: definition_text(&e.definition),
    }
}

/// A rule as a `[[rules]]` table in TOML, without the keys left empty: what `ListRules` shows
/// and what `citygw rule add` sends.
pub fn definition_text(d: &RuleConfig) -> String {
    let set = |v: &toml::Value| v.as_str() != Some("");
    let Ok(toml::Value::Table(table)) = toml::Value::try_from(d) else {
        return String::new();
    };
    let table: toml::Table = table
        .into_iter()
        .filter(|(_, v)| set(v))
        .map(|(k, v)| match v {
            toml::Value::Table(a) => (
                k,
                toml::Value::Table(a.into_iter().filter(|(_, v)| set(v)).collect()),
            ),
            v => (k, v),
        })
        .collect();
    toml::to_string(&table).unwrap_or_default()
}
