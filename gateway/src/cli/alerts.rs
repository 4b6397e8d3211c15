//! `citygw alert ...` and `citygw rule list`: the alerts rules raise, through the Control API.

use clap::Subcommand;
use serde_json::{json, Value};

use super::client::{rpc, Client};
use super::output::{table, time};
use super::Format;
use crate::control::rules::alert_state_label;
use crate::control::rules::config::{parse_severity, severity_label};
use crate::proto::*;

#[derive(Subcommand)]
pub enum AlertCommand {
    /// Alerts, newest first.
    List {
        /// Only active ones (ACTIVE_UNACK, ACTIVE_ACK).
        #[arg(long)]
        active: bool,
        /// ACTIVE_UNACK, ACTIVE_ACK, CLEARED_UNACK or CLEARED_ACK.
        #[arg(long)]
        state: Option<String>,
        /// Only this device's alerts.
        #[arg(long, default_value = "")]
        device: String,
        /// Only this rule's alerts.
        #[arg(long, default_value = "")]
        rule: String,
        /// critical, major, minor or warning.
        #[arg(long)]
        severity: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One alert with its history.
    Show {
        /// The alert's id.
        id: String,
    },
    /// Acknowledge an alert (active or cleared).
    Ack {
        /// The alert's id.
        id: String,
    },
    /// Clear an active alert by hand.
    Clear {
        /// The alert's id.
        id: String,
    },
    /// Follow alerts as they are raised, acknowledged and cleared (Ctrl-C to stop).
    Watch {
        /// Only these devices (repeat).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Only this severity and worse.
        #[arg(long)]
        min_severity: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum RuleCommand {
    /// The rules in force, with their active alerts.
    List,
}

fn severity(s: &str) -> anyhow::Result<Severity> {
    parse_severity(s)
        .filter(|_| !s.is_empty())
        .ok_or_else(|| anyhow::anyhow!("severity {s:?}: critical, major, minor or warning"))
}

pub fn parse_state(s: &str) -> anyhow::Result<AlertState> {
    AlertState::from_str_name(&format!("ALERT_STATE_{}", s.to_ascii_uppercase()))
        .filter(|s| *s != AlertState::Unspecified)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "state {s:?}: one of ACTIVE_UNACK, ACTIVE_ACK, CLEARED_UNACK, CLEARED_ACK"
            )
        })
}

fn state(a: &Alert) -> &'static str {
    alert_state_label(AlertState::try_from(a.state).unwrap_or_default())
}

fn sev(a: &Alert) -> &'static str {
    severity_label(Severity::try_from(a.severity).unwrap_or_default())
}

pub fn alert_json(a: &Alert) -> Value {
    json!({
        "id": a.id, "rule": a.rule, "device_id": a.device_id, "tenant": a.tenant,
        "kind": a.kind, "commune_code": a.commune_code, "severity": sev(a), "state": state(a),
        "quantity": a.quantity, "value": a.value, "message": a.message,
        "raised_time_ms": a.raised_time_ms, "cleared_time_ms": a.cleared_time_ms,
        "cleared_by": a.cleared_by, "acked_time_ms": a.acked_time_ms, "acked_by": a.acked_by,
        "command_ids": a.command_ids,
        "history": a.history.iter().map(|e| json!({
            "state": alert_state_label(AlertState::try_from(e.state).unwrap_or_default()),
            "time_ms": e.time_ms, "by": e.by, "detail": e.detail,
        })).collect::<Vec<_>>(),
    })
}

fn print_one(format: Format, a: &Alert) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&alert_json(a)).expect("json")
        ),
        Format::Table => {
            let when = |t: i64, by: &str| {
                if t == 0 {
                    String::new()
                } else {
                    format!("{} by {by}", time(t))
                }
            };
            for (k, v) in [
                ("id", a.id.clone()),
                ("rule", a.rule.clone()),
                ("device", a.device_id.clone()),
                ("severity", sev(a).to_string()),
                ("state", state(a).to_string()),
                ("message", a.message.clone()),
                ("raised", time(a.raised_time_ms)),
                ("acked", when(a.acked_time_ms, &a.acked_by)),
                ("cleared", when(a.cleared_time_ms, &a.cleared_by)),
                ("commands", a.command_ids.join(" ")),
            ] {
                if !v.is_empty() {
                    println!("{k:<10} {v}");
                }
            }
            println!();
            table(
                &["time", "state", "by", "detail"],
                a.history
                    .iter()
                    .map(|e| {
                        vec![
                            time(e.time_ms),
                            alert_state_label(AlertState::try_from(e.state).unwrap_or_default())
                                .to_string(),
                            e.by.clone(),
                            e.detail.clone(),
                        ]
                    })
                    .collect(),
            );
        }
    }
}

pub async fn run(client: &mut Client, format: Format, cmd: AlertCommand) -> anyhow::Result<()> {
    let control = &mut client.control;
    match cmd {
        AlertCommand::List {
            active,
            state: st,
            device,
            rule,
            severity: sv,
            limit,
        } => {
            let st = st.as_deref().map(parse_state).transpose()?;
            let sv = sv.as_deref().map(severity).transpose()?;
            let alerts = control
                .list_alerts(ListAlertsRequest {
                    device_id: device,
                    rule,
                    state: st.map_or(0, |s| s as i32),
                    active_only: active,
                    severity: sv.map_or(0, |s| s as i32),
                    before_id: String::new(),
                    limit,
                })
                .await
                .map_err(rpc)?
                .into_inner()
                .alerts;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&Value::Array(
                        alerts.iter().map(alert_json).collect()
                    ))
                    .expect("json")
                ),
                Format::Table => table(
                    &[
                        "id", "rule", "device", "severity", "state", "raised", "message",
                    ],
                    alerts
                        .iter()
                        .map(|a| {
                            vec![
                                a.id.clone(),
                                a.rule.clone(),
                                a.device_id.clone(),
                                sev(a).to_string(),
                                state(a).to_string(),
                                time(a.raised_time_ms),
                                a.message.clone(),
                            ]
                        })
                        .collect(),
                ),
            }
        }
        AlertCommand::Show { id } => {
            let a = control
                .get_alert(GetAlertRequest { id })
                .await
                .map_err(rpc)?
                .into_inner();
            print_one(format, &a);
        }
        AlertCommand::Ack { id } => {
            let a = control
                .ack_alert(AckAlertRequest { id })
                .await
                .map_err(rpc)?
                .into_inner();
            print_one(format, &a);
        }
        AlertCommand::Clear { id } => {
            let a = control
                .clear_alert(ClearAlertRequest { id })
                .await
                .map_err(rpc)?
                .into_inner();
            print_one(format, &a);
        }
        AlertCommand::Watch {
            devices,
            min_severity,
        } => {
            let min = min_severity.as_deref().map(severity).transpose()?;
            let mut changes = control
                .watch_alerts(WatchAlertsRequest {
                    device_ids: devices,
                    min_severity: min.map_or(0, |s| s as i32),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            while let Some(a) = changes.message().await.map_err(rpc)? {
                match format {
                    Format::Json => println!("{}", alert_json(&a)),
                    Format::Table => println!(
                        "{}  {}  {}  {}  {}  {}  {}",
                        time(a.history.last().map_or(a.raised_time_ms, |e| e.time_ms)),
                        a.id,
                        a.rule,
                        a.device_id,
                        sev(&a),
                        state(&a),
                        a.message
                    ),
                }
            }
        }
    }
    Ok(())
}

/// A rule as `citygw rule list --format json` and the console show it.
pub fn rule_json(r: &Rule) -> Value {
    json!({
        "name": r.name, "type": r.r#type, "description": r.description,
        "severity": severity_label(Severity::try_from(r.severity).unwrap_or_default()),
        "quantity": r.quantity, "tenant": r.tenant, "kind": r.kind,
        "commune": r.commune, "device": r.device,
        "action_command": r.action_command, "active": r.active,
    })
}

pub async fn run_rules(
    client: &mut Client,
    format: Format,
    cmd: RuleCommand,
) -> anyhow::Result<()> {
    let RuleCommand::List = cmd;
    let rules = client
        .control
        .list_rules(ListRulesRequest {})
        .await
        .map_err(rpc)?
        .into_inner()
        .rules;
    match format {
        Format::Json => {
            let v: Vec<Value> = rules.iter().map(rule_json).collect();
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
        Format::Table => {
            let scope = |r: &Rule| {
                [
                    ("tenant", &r.tenant),
                    ("kind", &r.kind),
                    ("commune", &r.commune),
                    ("device", &r.device),
                ]
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
            };
            table(
                &["name", "severity", "condition", "scope", "action", "active"],
                rules
                    .iter()
                    .map(|r| {
                        vec![
                            r.name.clone(),
                            severity_label(Severity::try_from(r.severity).unwrap_or_default())
                                .to_string(),
                            r.description.clone(),
                            scope(r),
                            r.action_command.clone(),
                            r.active.to_string(),
                        ]
                    })
                    .collect(),
            )
        }
    }
    Ok(())
}
