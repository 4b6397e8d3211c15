//! `citygw command ...`: commands to devices through the Control API.

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::client::{rpc, Client};
use super::output::{table, time};
use super::Format;
use crate::control::commands::state_label;
use crate::proto::*;

#[derive(Subcommand)]
pub enum CommandCommand {
    /// Queue a command for a device; prints its id.
    Send(SendArgs),
    /// One command with its history.
    Show {
        /// The command's id (printed by `command send`).
        id: String,
    },
    /// Commands, newest first.
    List {
        /// Only this device's commands.
        #[arg(long, default_value = "")]
        device: String,
        /// QUEUED, SENT, DELIVERED, SUCCEEDED, FAILED or EXPIRED.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Follow changes of commands as they happen (Ctrl-C to stop).
    Watch {
        /// Only these devices (repeat).
        #[arg(long = "device")]
        devices: Vec<String>,
    },
}

#[derive(Args)]
pub struct SendArgs {
    /// The device's id.
    pub device: String,
    /// What the command does, e.g. light, reboot.
    pub name: String,
    /// Parameters, a JSON object (MQTT "params"; LoRaWAN: encoded by the network server's codec).
    #[arg(long, conflicts_with_all = ["raw_hex", "lwm2m_write", "lwm2m_execute"])]
    pub params: Option<String>,
    /// Raw payload bytes in hex (LoRaWAN FRMPayload; MQTT devices get them base64 as "raw").
    #[arg(long, conflicts_with_all = ["lwm2m_write", "lwm2m_execute"])]
    pub raw_hex: Option<String>,
    /// LwM2M Write: PATH=VALUE, e.g. /3311/0/5850=1.
    #[arg(long, conflicts_with = "lwm2m_execute")]
    pub lwm2m_write: Option<String>,
    /// LwM2M Execute: PATH[=ARGUMENTS], e.g. /3/0/4.
    #[arg(long)]
    pub lwm2m_execute: Option<String>,
    /// Time to live: 30s, 10m, 2h, 1d (default 1h).
    #[arg(long)]
    pub ttl: Option<String>,
    /// LoRaWAN: confirmed downlink (the device acknowledges it).
    #[arg(long)]
    pub confirmed: bool,
    /// LoRaWAN FPort (1-223; default: the bridge's `downlink_f_port`, 1 unless configured).
    #[arg(long, default_value_t = 0)]
    pub f_port: u32,
    /// Wait until the command is final (or its TTL passes); exit non-zero unless it SUCCEEDED
    /// (or was DELIVERED over a one-way transport).
    #[arg(long)]
    pub wait: bool,
}

fn payload(a: &SendArgs) -> anyhow::Result<Option<CommandPayload>> {
    use command_payload::Kind;
    let lwm2m = |kind: lwm2m_operation::Kind, spec: &str| {
        let (path, value) = spec.split_once('=').unwrap_or((spec, ""));
        Kind::Lwm2m(Lwm2mOperation {
            kind: kind as i32,
            path: path.to_string(),
            value: value.to_string(),
        })
    };
    let kind = if let Some(p) = &a.params {
        Kind::ParamsJson(p.clone())
    } else if let Some(h) = &a.raw_hex {
        Kind::Raw(hex::decode(h).map_err(|e| anyhow::anyhow!("--raw-hex: {e}"))?)
    } else if let Some(w) = &a.lwm2m_write {
        lwm2m(lwm2m_operation::Kind::Write, w)
    } else if let Some(x) = &a.lwm2m_execute {
        lwm2m(lwm2m_operation::Kind::Execute, x)
    } else {
        return Ok(None);
    };
    Ok(Some(CommandPayload { kind: Some(kind) }))
}

pub fn parse_state(s: &str) -> anyhow::Result<CommandState> {
    let upper = s.to_ascii_uppercase();
    CommandState::from_str_name(&format!("COMMAND_STATE_{upper}"))
        .filter(|s| *s != CommandState::Unspecified)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "state {s:?}: one of QUEUED, SENT, DELIVERED, SUCCEEDED, FAILED, EXPIRED"
            )
        })
}

fn state(c: &Command) -> &'static str {
    state_label(CommandState::try_from(c.state).unwrap_or_default())
}

/// Final for the CLI's `--wait`: nothing more will happen to it.
fn is_final(c: &Command) -> bool {
    let one_way_done =
        c.state == CommandState::Delivered as i32 && c.transport == "lorawan" && !c.confirmed;
    one_way_done
        || matches!(
            CommandState::try_from(c.state),
            Ok(CommandState::Succeeded | CommandState::Failed | CommandState::Expired)
        )
}

fn payload_json(p: &Option<CommandPayload>) -> Value {
    match p.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(command_payload::Kind::ParamsJson(j)) => {
            json!({"params": serde_json::from_str::<Value>(j).unwrap_or(Value::String(j.clone()))})
        }
        Some(command_payload::Kind::Raw(b)) => json!({"raw_hex": hex::encode(b)}),
        Some(command_payload::Kind::Lwm2m(op)) => json!({"lwm2m": {
            "kind": lwm2m_operation::Kind::try_from(op.kind).unwrap_or_default().as_str_name(),
            "path": op.path, "value": op.value,
        }}),
        None => Value::Null,
    }
}

pub fn command_json(c: &Command) -> Value {
    json!({
        "id": c.id, "device_id": c.device_id, "tenant": c.tenant, "kind": c.kind, "name": c.name,
        "payload": payload_json(&c.payload), "state": state(c), "transport": c.transport,
        "confirmed": c.confirmed, "f_port": c.f_port, "created_time_ms": c.created_time_ms,
        "expires_time_ms": c.expires_time_ms, "updated_time_ms": c.updated_time_ms,
        "created_by": c.created_by, "result": c.result, "error": c.error,
        "history": c.history.iter().map(|e| json!({
            "state": state_label(CommandState::try_from(e.state).unwrap_or_default()),
            "time_ms": e.time_ms, "by": e.by, "detail": e.detail,
        })).collect::<Vec<_>>(),
    })
}

fn print_one(format: Format, c: &Command) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&command_json(c)).expect("json")
        ),
        Format::Table => {
            let payload = payload_json(&c.payload);
            for (k, v) in [
                ("id", c.id.clone()),
                ("device", c.device_id.clone()),
                ("name", c.name.clone()),
                ("payload", payload.to_string()),
                ("state", state(c).to_string()),
                ("transport", c.transport.clone()),
                (
                    "created",
                    format!("{} by {}", time(c.created_time_ms), c.created_by),
                ),
                ("expires", time(c.expires_time_ms)),
                ("result", c.result.clone()),
                ("error", c.error.clone()),
            ] {
                if !v.is_empty() {
                    println!("{k:<10} {v}");
                }
            }
            println!();
            table(
                &["time", "state", "by", "detail"],
                c.history
                    .iter()
                    .map(|e| {
                        vec![
                            time(e.time_ms),
                            state_label(CommandState::try_from(e.state).unwrap_or_default())
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

fn print_list(format: Format, commands: &[Command]) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(
                commands.iter().map(command_json).collect()
            ))
            .expect("json")
        ),
        Format::Table => table(
            &[
                "id",
                "device",
                "name",
                "state",
                "transport",
                "created",
                "by",
            ],
            commands
                .iter()
                .map(|c| {
                    vec![
                        c.id.clone(),
                        c.device_id.clone(),
                        c.name.clone(),
                        state(c).to_string(),
                        c.transport.clone(),
                        time(c.created_time_ms),
                        c.created_by.clone(),
                    ]
                })
                .collect(),
        ),
    }
}

pub async fn run(client: &mut Client, format: Format, cmd: CommandCommand) -> anyhow::Result<()> {
    let control = &mut client.control;
    match cmd {
        CommandCommand::Send(a) => {
            let ttl_ms = match &a.ttl {
                Some(t) => crate::config::parse_duration(t)
                    .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?
                    .as_millis() as u64,
                None => 0,
            };
            let req = SendCommandRequest {
                device_id: a.device.clone(),
                name: a.name.clone(),
                payload: payload(&a)?,
                ttl_ms,
                confirmed: a.confirmed,
                f_port: a.f_port,
            };
            let watch = if a.wait {
                // Watching before sending: no change can slip between the two.
                Some(
                    control
                        .watch_commands(WatchCommandsRequest {
                            device_ids: vec![a.device.clone()],
                            states: Vec::new(),
                        })
                        .await
                        .map_err(rpc)?
                        .into_inner(),
                )
            } else {
                None
            };
            let sent = control.send_command(req).await.map_err(rpc)?.into_inner();
            let Some(mut changes) = watch else {
                match format {
                    Format::Json => print_one(format, &sent),
                    Format::Table => println!("{}", sent.id),
                }
                return Ok(());
            };
            let mut last = sent.clone();
            while !is_final(&last) {
                match changes.message().await.map_err(rpc)? {
                    Some(c) if c.id == sent.id => last = c,
                    Some(_) => {}
                    None => {
                        anyhow::bail!("the gateway ended the watch before the command was final")
                    }
                }
            }
            print_one(format, &last);
            let ok = last.state == CommandState::Succeeded as i32
                || last.state == CommandState::Delivered as i32;
            anyhow::ensure!(ok, "command {} ended {}", last.id, state(&last));
        }
        CommandCommand::Show { id } => {
            let c = control
                .get_command(GetCommandRequest { id })
                .await
                .map_err(rpc)?
                .into_inner();
            print_one(format, &c);
        }
        CommandCommand::List {
            device,
            state,
            limit,
        } => {
            let state = state.as_deref().map(parse_state).transpose()?;
            let list = control
                .list_commands(ListCommandsRequest {
                    device_id: device,
                    state: state.map_or(0, |s| s as i32),
                    before_id: String::new(),
                    limit,
                })
                .await
                .map_err(rpc)?
                .into_inner()
                .commands;
            print_list(format, &list);
        }
        CommandCommand::Watch { devices } => {
            let mut changes = control
                .watch_commands(WatchCommandsRequest {
                    device_ids: devices,
                    states: Vec::new(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            while let Some(c) = changes.message().await.map_err(rpc)? {
                match format {
                    Format::Json => println!("{}", command_json(&c)),
                    Format::Table => println!(
                        "{}  {}  {}  {}  {}",
                        time(c.updated_time_ms),
                        c.id,
                        c.device_id,
                        c.name,
                        state(&c)
                    ),
                }
            }
        }
    }
    Ok(())
}
