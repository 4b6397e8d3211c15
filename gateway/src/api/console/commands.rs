//! Commands in the console: the command log newest first (by device and state), one command with
//! its history, sending one (admin only, like every console write), and every change as it
//! becomes durable, by server-sent events. The same [`Commands`] the Control API serves: a command
//! sent here is the one `citygw command list` and the agencies' watchers see.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{error, fresh, Authed, Console, Writer};
use crate::cli::control::{command_json, parse_state};
use crate::control::commands::SendError;
use crate::proto::{command_payload, CommandPayload, SendCommandRequest};

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    device: String,
    /// "queued", "sent", ... (any case); empty: every state.
    #[serde(default)]
    state: String,
    /// Page on with the last (oldest) id seen.
    #[serde(default)]
    before: String,
    limit: Option<usize>,
}

pub async fn list(State(c): State<Console>, _: Authed, Query(q): Query<ListQuery>) -> Response {
    let state = match q.state.as_str() {
        "" => None,
        s => match parse_state(s) {
            Ok(s) => Some(s as i32),
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        },
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let commands = c.inner.commands.clone();
    // The log is read from disk: off the async threads.
    let listed = tokio::task::spawn_blocking(move || {
        commands.list(&q.before, limit, |cmd| {
            (q.device.is_empty() || cmd.device_id == q.device)
                && state.is_none_or(|s| cmd.state == s)
        })
    })
    .await;
    match listed {
        Ok(Ok(list)) => fresh(Json(json!({
            "commands": list.iter().map(command_json).collect::<Vec<_>>(),
        }))),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub async fn one(State(c): State<Console>, _: Authed, Path(id): Path<String>) -> Response {
    match c.inner.commands.get(&id) {
        Ok(Some(cmd)) => fresh(Json(command_json(&cmd))),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("command {id:?} not found")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Send {
    device_id: String,
    name: String,
    /// A JSON object (the MQTT device's "params"); absent: `{}`.
    #[serde(default)]
    params: Option<serde_json::Map<String, serde_json::Value>>,
    /// Time to live; 0 or absent: the gateway's default (one hour).
    #[serde(default)]
    ttl_s: u64,
}

pub async fn send(
    State(c): State<Console>,
    Writer(a): Writer,
    body: Result<Json<Send>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"device_id\": ..., \"name\": ..., \"params\": {...}, \"ttl_s\": ...}",
        );
    };
    let req = SendCommandRequest {
        device_id: body.device_id,
        name: body.name,
        payload: body.params.map(|p| CommandPayload {
            kind: Some(command_payload::Kind::ParamsJson(
                serde_json::Value::Object(p).to_string(),
            )),
        }),
        ttl_ms: body.ttl_s.saturating_mul(1000),
        ..Default::default()
    };
    let who = a.session.principal.name().to_string();
    match c.inner.commands.send(req, &who).await {
        Ok(cmd) => {
            tracing::info!(command = %cmd.id, device = %cmd.device_id, name = %cmd.name, who = %who, "command sent from the console");
            fresh(Json(command_json(&cmd)))
        }
        Err(e @ SendError::UnknownDevice(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ (SendError::DisabledDevice(_) | SendError::Unroutable(_))) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e @ SendError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(SendError::Store(e)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    }
}
