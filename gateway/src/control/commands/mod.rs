//! Commands to devices with a tracked fate: one state machine for every transport.
//!
//! ```text
//!  SendCommand ──▶ QUEUED ──dispatch──▶ SENT ──▶ DELIVERED ──▶ SUCCEEDED | FAILED
//!                    │   (device reachable)        (final for one-way transports)
//!                    └──────────── TTL passes first ──────────▶ EXPIRED
//! ```
//!
//! A command is durable (the command log, [`log`]) before SendCommand answers, and so is every
//! change of state before anyone is told of it: a watcher, or a device whose result PUBACK waits
//! for it. States only move forward, so a late or repeated report (a duplicate result, an ack
//! after the TTL) changes nothing and is counted.
//!
//! Where a command goes is decided once, when it is sent ([`transport::Kind`]); the transport
//! (one file each under [`transport`]) hands it to the device when the device can be reached and
//! reports what happens. A device that cannot be reached (offline, asleep, a LoRaWAN network
//! server not connected) keeps its commands QUEUED; its transport calls [`Commands::wake`] when
//! that changes (a subscription, an LwM2M update, a bridge connection). One device's commands are
//! dispatched in creation order by one task at a time ([`Commands::wake`]), so an LwM2M client
//! sees one request at a time.

pub mod log;
pub mod transport;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::pipeline::now_ms;
use crate::proto::{
    command_payload, Command, CommandEvent, CommandPayload, CommandState, Protocol,
    SendCommandRequest,
};
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use log::{CommandLog, Entry};
use transport::{Dispatch, Kind, Transport};

/// TTL when the request gives none, and the longest allowed.
pub const DEFAULT_TTL_MS: u64 = 3_600_000;
pub const MAX_TTL_MS: u64 = 30 * 86_400_000;
/// Largest JSON params, raw payload or LwM2M value accepted.
pub const MAX_PARAMS_BYTES: usize = 16 * 1024;
/// Largest device answer kept with a command; longer ones are cut (and say so).
pub const MAX_RESULT_BYTES: usize = 4096;
/// Changes a watcher may fall behind before its stream ends.
const WATCH_CAPACITY: usize = 4096;
/// How often final commands older than the retention (by creation time) are deleted.
const RETENTION_CHECK: Duration = Duration::from_secs(3600);

/// Why a command was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("device {0:?} not found")]
    UnknownDevice(String),
    #[error("device {0:?} is disabled")]
    DisabledDevice(String),
    #[error("{0}")]
    Invalid(String),
    /// The device cannot be reached by any configured transport for this payload.
    #[error("{0}")]
    Unroutable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a transport (or the device, through it) reports about a command.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Handed to the device's connection or the network server.
    Sent(String),
    /// Receipt acknowledged; `last`: nothing more will come (one-way transports).
    Delivered {
        detail: String,
        last: bool,
    },
    Succeeded {
        result: String,
    },
    Failed {
        error: String,
    },
    /// The attempt was lost (no answer, connection gone): back to QUEUED for the next chance.
    Requeued(String),
}

/// Why a report changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgressError {
    #[error("no command {0}")]
    Unknown(String),
    /// The command is final, or already further along (a duplicate or late report).
    #[error("command already {0}")]
    Stale(&'static str),
    #[error("command {0} is not for this device")]
    WrongDevice(String),
}

/// Resolves once a change is on disk.
pub struct Durable(oneshot::Receiver<Result<(), StoreError>>);

impl Durable {
    pub async fn wait(self) -> Result<(), StoreError> {
        self.0.await.map_err(|_| StoreError::Closed)?
    }
}

#[derive(Clone)]
pub struct Commands {
    inner: Arc<Inner>,
}

struct Inner {
    log: CommandLog,
    registry: Registry,
    state: Mutex<State>,
    transports: RwLock<HashMap<Kind, Arc<dyn Transport>>>,
    writes: mpsc::UnboundedSender<Write>,
    changes: broadcast::Sender<Arc<Command>>,
    /// Wakes the expiry task when an earlier deadline appears.
    deadline_changed: Notify,
}

#[derive(Default)]
struct State {
    open: HashMap<String, Open>,
    /// Each device's open commands in creation order (UUIDv7 ids sort by time).
    by_device: HashMap<String, BTreeSet<String>>,
    deadlines: BTreeSet<(i64, String)>,
    /// Devices whose dispatch task runs; `true`: look again when this pass ends.
    pumping: HashMap<String, bool>,
}

struct Open {
    command: Command,
    /// Handed to the transport and not to be dispatched again unless the device reconnects.
    handed: bool,
}

/// One pending write of the command log.
struct Write {
    command: Command,
    open: bool,
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// Ordering of states: a change must move up (except a requeue).
fn rank(s: CommandState) -> u8 {
    match s {
        CommandState::Unspecified => 0,
        CommandState::Queued => 1,
        CommandState::Sent => 2,
        CommandState::Delivered => 3,
        CommandState::Succeeded | CommandState::Failed | CommandState::Expired => 4,
    }
}

/// "QUEUED", "SENT", ...: the state as operators read it.
pub fn state_label(s: CommandState) -> &'static str {
    s.as_str_name()
        .strip_prefix("COMMAND_STATE_")
        .unwrap_or("UNSPECIFIED")
}

fn state_of(c: &Command) -> CommandState {
    CommandState::try_from(c.state).unwrap_or(CommandState::Unspecified)
}

/// Cuts text to `max` bytes at a character boundary, saying so.
pub fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("…(cut)");
    }
    s
}

impl Commands {
    /// Loads the open commands of the log; [`Commands::run`] must be spawned for writes,
    /// expiry and retention to happen.
    pub fn load(store: Store, registry: Registry) -> anyhow::Result<(Commands, Runner)> {
        let log = CommandLog::new(store);
        let mut state = State::default();
        for command in log.load_open()? {
            let deadline = (command.expires_time_ms, command.id.clone());
            // A LoRaWAN command SENT is in the network server's queue: not sent again. Any other
            // SENT command may have been lost with the previous process: dispatched again.
            let handed = command.transport == Kind::Lorawan.label()
                && rank(state_of(&command)) >= rank(CommandState::Sent);
            state
                .by_device
                .entry(command.device_id.clone())
                .or_default()
                .insert(command.id.clone());
            state.deadlines.insert(deadline);
            state
                .open
                .insert(command.id.clone(), Open { command, handed });
        }
        tracing::info!(open = state.open.len(), "command log loaded");
        metrics::gauge!("citygw_commands_open").set(state.open.len() as f64);
        let (writes, rx) = mpsc::unbounded_channel();
        let commands = Commands {
            inner: Arc::new(Inner {
                log,
                registry,
                state: Mutex::new(state),
                transports: RwLock::default(),
                writes,
                changes: broadcast::channel(WATCH_CAPACITY).0,
                deadline_changed: Notify::new(),
            }),
        };
        Ok((
            commands.clone(),
            Runner {
                commands,
                writes: rx,
            },
        ))
    }

    /// Makes a transport available; devices with commands for it are tried at once.
    pub fn attach(&self, transport: Arc<dyn Transport>) {
        let kind = transport.kind();
        self.inner
            .transports
            .write()
            .expect("transports lock")
            .insert(kind, transport);
        let devices: Vec<String> = {
            let st = self.inner.state.lock().expect("commands lock");
            st.open
                .values()
                .filter(|o| o.command.transport == kind.label())
                .map(|o| o.command.device_id.clone())
                .collect()
        };
        for d in devices {
            self.wake(&d, false);
        }
    }

    /// Devices with open commands for a transport (a LoRaWAN bridge that reconnected wakes them).
    pub fn devices_waiting(&self, kind: Kind) -> Vec<String> {
        let st = self.inner.state.lock().expect("commands lock");
        let mut devices: Vec<String> = st
            .open
            .values()
            .filter(|o| o.command.transport == kind.label() && !o.handed)
            .map(|o| o.command.device_id.clone())
            .collect();
        devices.sort();
        devices.dedup();
        devices
    }

    /// Accepts a command: validated, routed, on disk, then dispatched in the background.
    pub async fn send(&self, req: SendCommandRequest, by: &str) -> Result<Command, SendError> {
        let device = self
            .inner
            .registry
            .get(&req.device_id)
            .ok_or_else(|| SendError::UnknownDevice(req.device_id.clone()))?;
        if !device.enabled() {
            return Err(SendError::DisabledDevice(req.device_id));
        }
        validate_name(&req.name)?;
        let payload = validate_payload(req.payload)?;
        let ttl_ms = match req.ttl_ms {
            0 => DEFAULT_TTL_MS,
            t if t > MAX_TTL_MS => {
                return Err(SendError::Invalid(format!(
                    "ttl {t} ms is above the maximum of 30 days"
                )))
            }
            t => t,
        };
        let f_port = match req.f_port {
            // 0: the default port of the network server bridge that sends it.
            p @ 0..=223 => p,
            p => {
                return Err(SendError::Invalid(format!(
                    "f_port {p}: LoRaWAN application ports are 1-223"
                )))
            }
        };
        let kind = self.route(&device, &payload)?;
        if let Some(t) = self
            .inner
            .transports
            .read()
            .expect("transports lock")
            .get(&kind)
        {
            t.accepts(&payload).map_err(SendError::Invalid)?;
        }
        let now = now_ms();
        let command = Command {
            id: uuid::Uuid::now_v7().to_string(),
            device_id: device.id().to_string(),
            tenant: device.tenant().to_string(),
            kind: device.kind().to_string(),
            name: req.name,
            payload: Some(payload),
            state: CommandState::Queued as i32,
            transport: kind.label().to_string(),
            confirmed: req.confirmed,
            f_port,
            created_time_ms: now,
            expires_time_ms: now.saturating_add(ttl_ms as i64),
            updated_time_ms: now,
            created_by: by.to_string(),
            result: String::new(),
            error: String::new(),
            history: vec![CommandEvent {
                state: CommandState::Queued as i32,
                time_ms: now,
                by: by.to_string(),
                detail: format!("via {}", kind.label()),
            }],
        };
        let durable = {
            let mut st = self.inner.state.lock().expect("commands lock");
            st.by_device
                .entry(command.device_id.clone())
                .or_default()
                .insert(command.id.clone());
            let first = st.deadlines.first().map(|d| d.0);
            st.deadlines
                .insert((command.expires_time_ms, command.id.clone()));
            if first.is_none_or(|f| command.expires_time_ms < f) {
                self.inner.deadline_changed.notify_one();
            }
            st.open.insert(
                command.id.clone(),
                Open {
                    command: command.clone(),
                    handed: false,
                },
            );
            metrics::gauge!("citygw_commands_open").set(st.open.len() as f64);
            self.write(command.clone(), true, true)
        };
        count_state(kind.label(), CommandState::Queued);
        if let Some(d) = durable {
            d.wait().await?;
        }
        tracing::info!(command = %command.id, device = %command.device_id, name = %command.name,
            transport = kind.label(), by, "command queued");
        self.wake(&command.device_id, false);
        Ok(command)
    }

    /// Which transport a payload for this device takes.
    fn route(
        &self,
        device: &crate::registry::DeviceEntry,
        payload: &CommandPayload,
    ) -> Result<Kind, SendError> {
        let lwm2m = matches!(payload.kind, Some(command_payload::Kind::Lwm2m(_)));
        let transports = self.inner.transports.read().expect("transports lock");
        let registered_lwm2m = transports
            .get(&Kind::Lwm2m)
            .is_some_and(|t| t.reaches(device.id()));
        if lwm2m {
            let Some(t) = transports.get(&Kind::Lwm2m) else {
                return Err(SendError::Unroutable(
                    "lwm2m write/execute: no LwM2M server in this gateway (coap.lwm2m_enabled)"
                        .into(),
                ));
            };
            // Only to a device that is (or may become) an LwM2M client: one that reports over
            // another protocol and has no registration would only see its command expire.
            let elsewhere = match device.protocol() {
                _ if registered_lwm2m => None,
                _ if !device.dev_eui().is_empty() => Some("a LoRaWAN device"),
                Protocol::Mqtt => Some("an MQTT device"),
                Protocol::Coap => Some("a CoAP telemetry device"),
                Protocol::Lorawan => Some("a LoRaWAN device"),
                Protocol::Lwm2m | Protocol::Unspecified => None,
            };
            if let Some(what) = elsewhere {
                return Err(SendError::Unroutable(format!(
                    "device {} is {what}, not a registered LwM2M client: no LwM2M write/execute",
                    device.id()
                )));
            }
            if let Some(why) = t.refusal(device.id()) {
                return Err(SendError::Unroutable(why));
            }
            return Ok(Kind::Lwm2m);
        }
        if !device.dev_eui().is_empty() {
            if !transports.contains_key(&Kind::Lorawan) {
                return Err(SendError::Unroutable(format!(
                    "device {} is a LoRaWAN device: no LoRaWAN downlink transport in this gateway",
                    device.id()
                )));
            }
            return Ok(Kind::Lorawan);
        }
        if registered_lwm2m {
            return Err(SendError::Invalid(format!(
                "device {} is an LwM2M client: send an lwm2m write or execute",
                device.id()
            )));
        }
        Ok(Kind::Mqtt)
    }

    pub fn get(&self, id: &str) -> Result<Option<Command>, StoreError> {
        if let Some(o) = self.inner.state.lock().expect("commands lock").open.get(id) {
            return Ok(Some(o.command.clone()));
        }
        self.inner.log.get(id)
    }

    /// Commands newest first (see [`CommandLog::list`]).
    pub fn list(
        &self,
        before_id: &str,
        limit: usize,
        keep: impl FnMut(&Command) -> bool,
    ) -> Result<Vec<Command>, StoreError> {
        self.inner.log.list(before_id, limit, 1_000_000, keep)
    }

    /// Every change from now on, once it is durable.
    pub fn watch(&self) -> broadcast::Receiver<Arc<Command>> {
        self.inner.changes.subscribe()
    }

    /// The command if it is open and for `device_id`.
    pub fn open_for(&self, device_id: &str, id: &str) -> Result<Command, ProgressError> {
        let st = self.inner.state.lock().expect("commands lock");
        match st.open.get(id) {
            Some(o) if o.command.device_id == device_id => Ok(o.command.clone()),
            Some(_) => Err(ProgressError::WrongDevice(id.to_string())),
            None => Err(ProgressError::Unknown(id.to_string())),
        }
    }

    /// Records what happened to a command. Returns when the change will be durable (await it
    /// before acknowledging anything to the reporter).
    pub fn progress(&self, id: &str, p: Progress, by: &str) -> Result<Durable, ProgressError> {
        let now = now_ms();
        let mut st = self.inner.state.lock().expect("commands lock");
        let Some(open) = st.open.get_mut(id) else {
            drop(st);
            // A final command is in the log: say what it became.
            return Err(match self.inner.log.get(id) {
                Ok(Some(c)) => ProgressError::Stale(state_label(state_of(&c))),
                _ => ProgressError::Unknown(id.to_string()),
            });
        };
        let current = state_of(&open.command);
        let (to, detail, last) = match &p {
            Progress::Sent(d) => (CommandState::Sent, d.clone(), false),
            Progress::Delivered { detail, last } => {
                (CommandState::Delivered, detail.clone(), *last)
            }
            Progress::Succeeded { .. } => (CommandState::Succeeded, String::new(), true),
            Progress::Failed { error } => (CommandState::Failed, error.clone(), true),
            Progress::Requeued(d) => (CommandState::Queued, d.clone(), false),
        };
        if let Progress::Requeued(_) = p {
            if current != CommandState::Sent {
                return Err(ProgressError::Stale(state_label(current)));
            }
            open.handed = false;
        } else if rank(to) <= rank(current) {
            return Err(ProgressError::Stale(state_label(current)));
        } else if to == CommandState::Sent {
            open.handed = true;
        }
        match p {
            Progress::Succeeded { result } => {
                open.command.result = bounded(result, MAX_RESULT_BYTES)
            }
            Progress::Failed { error } => open.command.error = bounded(error, MAX_RESULT_BYTES),
            _ => {}
        }
        let transport = open.command.transport.clone();
        transition(
            &mut open.command,
            to,
            now,
            by,
            bounded(detail, MAX_RESULT_BYTES),
        );
        let command = open.command.clone();
        if last {
            self.close(&mut st, &command);
            let outcome = state_label(to);
            metrics::histogram!("citygw_command_seconds", "transport" => transport.clone(), "outcome" => outcome)
                .record((now - command.created_time_ms).max(0) as f64 / 1000.0);
        }
        count_state(&transport, to);
        drop(st);
        tracing::debug!(
            command = id,
            state = state_label(to),
            by,
            "command progressed"
        );
        Ok(self
            .write(command, !last, true)
            .expect("a durable write has a receiver"))
    }

    /// Removes a final command from the open set.
    fn close(&self, st: &mut State, command: &Command) {
        st.open.remove(&command.id);
        st.deadlines
            .remove(&(command.expires_time_ms, command.id.clone()));
        if let Some(ids) = st.by_device.get_mut(&command.device_id) {
            ids.remove(&command.id);
            if ids.is_empty() {
                st.by_device.remove(&command.device_id);
            }
        }
        metrics::gauge!("citygw_commands_open").set(st.open.len() as f64);
    }

    /// Queues a write of the log; with `durable`, returns what resolves once it is on disk.
    fn write(&self, command: Command, open: bool, durable: bool) -> Option<Durable> {
        let (done, rx) = if durable {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(Durable(rx)))
        } else {
            (None, None)
        };
        // The runner owns the receiver until shutdown; a write after it is lost with the process,
        // like any change the store did not confirm (the waiter sees Closed).
        let _ = self.inner.writes.send(Write {
            command,
            open,
            done,
        });
        rx
    }

    /// The device may be reachable: dispatch its commands waiting for it. `reconnected`: its
    /// connection is new, so commands handed to the old one are sent again.
    pub fn wake(&self, device_id: &str, reconnected: bool) {
        {
            let mut st = self.inner.state.lock().expect("commands lock");
            let Some(ids) = st.by_device.get(device_id).cloned() else {
                return;
            };
            if reconnected {
                for id in &ids {
                    if let Some(o) = st.open.get_mut(id) {
                        if rank(state_of(&o.command)) <= rank(CommandState::Sent) {
                            o.handed = false;
                        }
                    }
                }
            }
            match st.pumping.get_mut(device_id) {
                Some(again) => {
                    *again = true;
                    return;
                }
                None => {
                    st.pumping.insert(device_id.to_string(), false);
                }
            }
        }
        let this = self.clone();
        let device_id = device_id.to_string();
        tokio::spawn(async move { this.pump(device_id).await });
    }

    /// Dispatches a device's commands in order until none is left to try, then again if woken
    /// meanwhile.
    async fn pump(self, device_id: String) {
        loop {
            let ids: Vec<String> = {
                let st = self.inner.state.lock().expect("commands lock");
                st.by_device
                    .get(&device_id)
                    .map(|ids| ids.iter().cloned().collect())
                    .unwrap_or_default()
            };
            let mut waiting: Vec<String> = Vec::new();
            for id in ids {
                let command = {
                    let st = self.inner.state.lock().expect("commands lock");
                    match st.open.get(&id) {
                        Some(o)
                            if !o.handed
                                && rank(state_of(&o.command)) <= rank(CommandState::Sent)
                                && !waiting.contains(&o.command.transport) =>
                        {
                            o.command.clone()
                        }
                        _ => continue,
                    }
                };
                let transport = Kind::from_label(&command.transport).and_then(|k| {
                    self.inner
                        .transports
                        .read()
                        .expect("transports lock")
                        .get(&k)
                        .cloned()
                });
                let Some(transport) = transport else {
                    waiting.push(command.transport.clone());
                    continue;
                };
                match transport.dispatch(&self, &command).await {
                    Dispatch::Handed => {
                        if let Some(o) = self
                            .inner
                            .state
                            .lock()
                            .expect("commands lock")
                            .open
                            .get_mut(&id)
                        {
                            o.handed = true;
                        }
                    }
                    Dispatch::Waiting => waiting.push(command.transport.clone()),
                    Dispatch::Reported => {}
                }
            }
            let mut st = self.inner.state.lock().expect("commands lock");
            match st.pumping.get_mut(&device_id) {
                Some(again) if *again => *again = false,
                _ => {
                    st.pumping.remove(&device_id);
                    return;
                }
            }
        }
    }

    /// Expires the open commands whose TTL passed; returns the next deadline.
    fn expire_due(&self, now: i64) -> Option<i64> {
        loop {
            let mut st = self.inner.state.lock().expect("commands lock");
            let (deadline, id) = st.deadlines.first().cloned()?;
            if deadline > now {
                return Some(deadline);
            }
            let Some(open) = st.open.get_mut(&id) else {
                st.deadlines.remove(&(deadline, id));
                continue;
            };
            let was = state_label(state_of(&open.command));
            let transport = open.command.transport.clone();
            open.command.error = format!("ttl passed while {was}");
            transition(
                &mut open.command,
                CommandState::Expired,
                now,
                "gateway",
                format!("ttl passed while {was}"),
            );
            let command = open.command.clone();
            self.close(&mut st, &command);
            drop(st);
            count_state(&transport, CommandState::Expired);
            metrics::histogram!("citygw_command_seconds", "transport" => transport, "outcome" => "EXPIRED")
                .record((now - command.created_time_ms).max(0) as f64 / 1000.0);
            tracing::info!(command = %command.id, device = %command.device_id, was, "command expired");
            self.write(command, false, false);
        }
    }
}

/// Applies a change of state and records it in the history.
fn transition(c: &mut Command, to: CommandState, now: i64, by: &str, detail: String) {
    c.state = to as i32;
    c.updated_time_ms = now;
    c.history.push(CommandEvent {
        state: to as i32,
        time_ms: now,
        by: by.to_string(),
        detail,
    });
}

fn count_state(transport: &str, state: CommandState) {
    metrics::counter!("citygw_commands_total", "transport" => transport.to_string(), "state" => state_label(state))
        .increment(1);
}

fn validate_name(name: &str) -> Result<(), SendError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(SendError::Invalid(format!(
            "command name {name:?}: 1-64 characters of A-Z a-z 0-9 _ - ."
        )))
    }
}

fn validate_payload(payload: Option<CommandPayload>) -> Result<CommandPayload, SendError> {
    use command_payload::Kind as P;
    let kind = payload
        .and_then(|p| p.kind)
        .unwrap_or_else(|| P::ParamsJson("{}".into()));
    let invalid = |m: String| Err(SendError::Invalid(m));
    match &kind {
        P::ParamsJson(j) => {
            if j.len() > MAX_PARAMS_BYTES {
                return invalid(format!(
                    "params: {} bytes, limit {MAX_PARAMS_BYTES}",
                    j.len()
                ));
            }
            match serde_json::from_str::<serde_json::Value>(j) {
                Ok(serde_json::Value::Object(_)) => {}
                Ok(_) => return invalid("params must be a JSON object".into()),
                Err(e) => return invalid(format!("params are not JSON: {e}")),
            }
        }
        P::Raw(b) if b.len() > MAX_PARAMS_BYTES => {
            return invalid(format!("raw: {} bytes, limit {MAX_PARAMS_BYTES}", b.len()))
        }
        P::Raw(_) => {}
        P::Lwm2m(op) => transport::lwm2m::validate(op).map_err(SendError::Invalid)?,
    }
    Ok(CommandPayload { kind: Some(kind) })
}

/// The background work of [`Commands`]: the log writer, expiry and retention.
pub struct Runner {
    commands: Commands,
    writes: mpsc::UnboundedReceiver<Write>,
}

impl Runner {
    /// Runs until `shutdown`, then writes what is still queued.
    pub async fn run(mut self, retention: Duration, shutdown: CancellationToken) {
        let commands = self.commands.clone();
        let expiry = tokio::spawn(expire(commands.clone(), shutdown.clone()));
        let retention_task = tokio::spawn(retain(commands.clone(), retention, shutdown.clone()));
        loop {
            let first = tokio::select! {
                w = self.writes.recv() => match w {
                    Some(w) => w,
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            };
            self.commit(first).await;
        }
        // Whatever is queued now (expiries, reports that raced the shutdown) is written too.
        while let Ok(w) = self.writes.try_recv() {
            self.commit(w).await;
        }
        expiry.abort();
        retention_task.abort();
    }

    /// Writes `first` and whatever else is queued in one commit (the last version of each
    /// command wins), retrying while the store fails; then tells the waiters and the watchers.
    async fn commit(&mut self, first: Write) {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match self.writes.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let mut latest: HashMap<&str, usize> = HashMap::new();
        for (i, w) in batch.iter().enumerate() {
            latest.insert(&w.command.id, i);
        }
        let mut keep: Vec<usize> = latest.into_values().collect();
        keep.sort_unstable();
        let entries: Vec<Entry> = keep
            .iter()
            .map(|&i| Entry {
                command: batch[i].command.clone(),
                open: batch[i].open,
            })
            .collect();
        let mut backoff = Duration::from_millis(100);
        let result = loop {
            match self.commands.inner.log.save(&entries).await {
                Ok(()) => break Ok(()),
                Err(StoreError::Closed) => break Err(StoreError::Closed),
                Err(e) => {
                    metrics::counter!("citygw_command_log_errors_total").increment(1);
                    tracing::warn!(error = %e, commands = entries.len(), "command log not written; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        for w in batch {
            if result.is_ok() {
                let _ = self.commands.inner.changes.send(Arc::new(w.command));
            }
            if let Some(done) = w.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

async fn expire(commands: Commands, shutdown: CancellationToken) {
    loop {
        let next = commands.expire_due(now_ms());
        let wait = next.map_or(Duration::from_secs(3600), |d| {
            Duration::from_millis((d - now_ms()).clamp(1, 3_600_000) as u64)
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = commands.inner.deadline_changed.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn retain(commands: Commands, retention: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RETENTION_CHECK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let cutoff = now_ms() - retention.as_millis() as i64;
        match commands.inner.log.expire(cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("citygw_retention_deleted_total", "kind" => "command")
                    .increment(n as u64);
                tracing::info!(deleted = n, "old commands deleted (retention)");
            }
            Err(e) => tracing::warn!(error = %e, "command retention failed"),
        }
    }
}
