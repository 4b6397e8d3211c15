//! `citygw alert ...` and `citygw rule list|add|remove`: the alerts rules raise and the rules
//! themselves, through the Control API.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{json, Value};

use super::client::{rpc, Client};
use super::output::{table, time};
use super::Format;
use crate::control::rules::config::{parse_severity, severity_label, ActionConfig, RuleConfig};
use crate::control::rules::{alert_state_label, definition_text};
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
    /// The rules in force (from the config file and added at run time), with their active
    /// alerts.
    List,
    /// Add a rule at run time (kept in the store, evaluated from the next reading on).
    ///
    /// Checked like `[[rules]]` in the config file, with the same keys as options
    /// (`citygw rule add water-high --quantity water_level --above 2.5 --for 5m --clear-below 2.3
    /// --severity major --kind water_level`), or rules from a TOML file (`--file`).
    Add(Box<RuleAdd>),
    /// Remove a rule added at run time; its active alerts are cleared.
    ///
    /// Rules from the config file are removed by editing the file and restarting.
    Remove {
        /// The rule's name.
        name: String,
    },
}

/// `citygw rule add`: one rule from options, or rules from a file.
#[derive(clap::Args)]
pub struct RuleAdd {
    /// The rule's name: 1-64 of a-z 0-9 - _ (not with --file).
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    name: Option<String>,
    /// Rules in TOML as in the config file: `[[rules]]` tables, or one rule's keys; `-` reads
    /// standard input.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// The reading quantity watched (threshold and rate rules), e.g. water_level.
    #[arg(long, default_value = "")]
    quantity: String,
    /// Threshold: raise while the value is above this.
    #[arg(long, allow_hyphen_values = true)]
    above: Option<f64>,
    /// Threshold: raise while the value is below this.
    #[arg(long, allow_hyphen_values = true)]
    below: Option<f64>,
    /// The condition must hold this long (e.g. 5m; default: at once).
    #[arg(long = "for", value_name = "DURATION", default_value = "")]
    for_: String,
    /// Hysteresis of an --above rule: its alert clears only below this (default: the threshold).
    #[arg(long, requires = "above", allow_hyphen_values = true)]
    clear_below: Option<f64>,
    /// Hysteresis of a --below rule: its alert clears only above this.
    #[arg(long, requires = "below", allow_hyphen_values = true)]
    clear_above: Option<f64>,
    /// Absence: raise when a device sent nothing for this long (e.g. 30m).
    #[arg(long, value_name = "DURATION")]
    silent_for: Option<String>,
    /// Rate of change: raise when the value rose by this much within --within.
    #[arg(long)]
    rises: Option<f64>,
    /// Rate of change: raise when the value fell by this much within --within.
    #[arg(long)]
    falls: Option<f64>,
    /// The window of --rises / --falls (e.g. 15m).
    #[arg(long, value_name = "DURATION")]
    within: Option<String>,
    /// critical, major (default), minor or warning.
    #[arg(long, default_value = "")]
    severity: String,
    /// Scope: only devices of this tenant.
    #[arg(long, default_value = "")]
    tenant: String,
    /// Scope: only devices of this kind.
    #[arg(long, default_value = "")]
    kind: String,
    /// Scope: only devices in this commune (code).
    #[arg(long, default_value = "")]
    commune: String,
    /// Scope: only this device.
    #[arg(long, default_value = "")]
    device: String,
    /// Action: the command sent when the rule raises an alert.
    #[arg(long, value_name = "COMMAND")]
    action: Option<String>,
    /// Action: the command's params, a JSON object.
    #[arg(long, requires = "action", value_name = "JSON")]
    action_params: Option<String>,
    /// Action: send to the enabled devices of this kind in the alert's commune (default: the
    /// device that raised it).
    #[arg(long, requires = "action", default_value = "")]
    action_target_kind: String,
    /// Action: no second command for the same target within this time (default 10m).
    #[arg(long, requires = "action", default_value = "")]
    action_cooldown: String,
    /// Action: the commands' time to live (default 1h).
    #[arg(long, requires = "action", default_value = "")]
    action_ttl: String,
}

impl RuleAdd {
    /// The rule definitions to send, as TOML tables.
    fn definitions(self) -> anyhow::Result<Vec<String>> {
        let Some(path) = &self.file else {
            return Ok(vec![definition_text(&self.into_config()?)]);
        };
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        };
        let doc: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        match doc.get("rules") {
            Some(toml::Value::Array(rules)) => rules
                .iter()
                .map(|r| match r {
                    toml::Value::Table(t) => Ok(toml::to_string(t)?),
                    _ => anyhow::bail!("{}: rules: [[rules]] tables", path.display()),
                })
                .collect(),
            Some(_) => anyhow::bail!("{}: rules: [[rules]] tables", path.display()),
            None => Ok(vec![text]),
        }
    }

    fn into_config(self) -> anyhow::Result<RuleConfig> {
        let params = self
            .action_params
            .as_deref()
            .map(serde_json::from_str::<Value>)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--action-params: {e}"))?;
        Ok(RuleConfig {
            name: self.name.unwrap_or_default(),
            severity: self.severity,
            tenant: self.tenant,
            kind: self.kind,
            commune: self.commune,
            device: self.device,
            quantity: self.quantity,
            above: self.above,
            below: self.below,
            clear: self.clear_below.or(self.clear_above),
            for_: self.for_,
            silent_for: self.silent_for,
            rises: self.rises,
            falls: self.falls,
            within: self.within,
            action: self.action.map(|command| ActionConfig {
                command,
                params,
                target_kind: self.action_target_kind,
                cooldown: self.action_cooldown,
                ttl: self.action_ttl,
            }),
        })
    }
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
        "action_command": r.action_command, "active": r.active, "origin": r.origin,
        "added_by": r.added_by, "added_time_ms": r.added_time_ms, "definition": r.definition,
    })
}

pub async fn run_rules(
    client: &mut Client,
    format: Format,
    cmd: RuleCommand,
) -> anyhow::Result<()> {
    let control = &mut client.control;
    match cmd {
        RuleCommand::List => {
            let rules = control
                .list_rules(ListRulesRequest {})
                .await
                .map_err(rpc)?
                .into_inner()
                .rules;
            print_rules(format, &rules);
        }
        RuleCommand::Add(add) => {
            let mut added = Vec::new();
            for definition in add.definitions()? {
                let rule = control
                    .add_rule(AddRuleRequest { definition })
                    .await
                    .map_err(|e| {
                        let done = added
                            .iter()
                            .map(|r: &Rule| r.name.as_str())
                            .collect::<Vec<_>>();
                        if done.is_empty() {
                            rpc(e)
                        } else {
                            anyhow::anyhow!("{} (added before it: {})", rpc(e), done.join(", "))
                        }
                    })?
                    .into_inner();
                added.push(rule);
            }
            print_rules(format, &added);
        }
        RuleCommand::Remove { name } => {
            let r = control
                .remove_rule(RemoveRuleRequest { name })
                .await
                .map_err(rpc)?
                .into_inner();
            let name = r.rule.map(|r| r.name).unwrap_or_default();
            match format {
                Format::Json => println!(
                    "{}",
                    json!({"removed": name, "alerts_cleared": r.alerts_cleared})
                ),
                Format::Table => println!(
                    "rule {name} removed; {} active alert(s) cleared",
                    r.alerts_cleared
                ),
            }
        }
    }
    Ok(())
}

fn print_rules(format: Format, rules: &[Rule]) {
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
                &[
                    "name",
                    "severity",
                    "condition",
                    "scope",
                    "action",
                    "active",
                    "origin",
                ],
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
                            match r.origin.as_str() {
                                "api" => format!("api ({}, {})", r.added_by, time(r.added_time_ms)),
                                o => o.to_string(),
                            },
                        ]
                    })
                    .collect(),
            )
        }
    }
}
