//! Alerts in the console: what the rules raised, newest first (filtered by state, severity, rule,
//! device), one alert with its history (who acknowledged or cleared it, when), acknowledging and
//! clearing (admin only, like every console write), and every change as it becomes durable, by
//! server-sent events; the rules in force, and for the admin adding and removing rules at run
//! time. The same [`Alerts`](crate::control::rules::Alerts) the Control API serves: an alert
//! acknowledged here is acknowledged for `citygw alert list` and the agencies' watchers, a rule
//! added here is the one `citygw rule list` shows.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error, fresh, Authed, Console, Writer};
use crate::cli::alerts::{alert_json, parse_state, rule_json};
use crate::control::rules::config::parse_severity;
use crate::control::rules::{is_active, parse_definition, AlertError, RuleError};
use crate::proto::Alert;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// An alert as the CLI prints it, with the commune's name when the KPI city knows it.
pub fn console_alert_json(c: &Console, a: &Alert) -> Value {
    let mut v = alert_json(a);
    let geo = c.inner.kpi.geo();
    if let Some(i) = geo.by_code(&a.commune_code) {
        v["commune_name"] = geo.commune(i).name.clone().into();
    }
    v
}

#[derive(Deserialize)]
pub struct ListQuery {
    /// "active", or one of ACTIVE_UNACK, ACTIVE_ACK, CLEARED_UNACK, CLEARED_ACK (any case);
    /// empty: every state.
    #[serde(default)]
    state: String,
    /// critical, major, minor, warning; empty: any.
    #[serde(default)]
    severity: String,
    #[serde(default)]
    rule: String,
    #[serde(default)]
    device: String,
    /// Page on with the last (oldest) id seen.
    #[serde(default)]
    before: String,
    limit: Option<usize>,
}

pub async fn list(State(c): State<Console>, _: Authed, Query(q): Query<ListQuery>) -> Response {
    let active_only = q.state.eq_ignore_ascii_case("active");
    let state = match q.state.as_str() {
        "" => None,
        _ if active_only => None,
        s => match parse_state(s) {
            Ok(s) => Some(s as i32),
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        },
    };
    let severity = match q.severity.as_str() {
        "" => None,
        s => match parse_severity(s) {
            Some(s) => Some(s as i32),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("severity {s:?}: critical, major, minor or warning"),
                )
            }
        },
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let alerts = c.inner.alerts.clone();
    // The log is read from disk: off the async threads.
    let listed = tokio::task::spawn_blocking(move || {
        alerts.list(&q.before, limit, |a| {
            (q.device.is_empty() || a.device_id == q.device)
                && (q.rule.is_empty() || a.rule == q.rule)
                && state.is_none_or(|s| a.state == s)
                && severity.is_none_or(|s| a.severity == s)
                && (!active_only || is_active(a))
        })
    })
    .await;
    match listed {
        Ok(Ok(list)) => fresh(Json(json!({
            "alerts": list.iter().map(|a| console_alert_json(&c, a)).collect::<Vec<_>>(),
        }))),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub async fn one(State(c): State<Console>, _: Authed, Path(id): Path<String>) -> Response {
    match c.inner.alerts.get(&id).await {
        Ok(Some(a)) => fresh(Json(console_alert_json(&c, &a))),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("alert {id:?} not found")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    }
}

pub async fn ack(State(c): State<Console>, Writer(a): Writer, Path(id): Path<String>) -> Response {
    let who = a.session.principal.name().to_string();
    changed(&c, c.inner.alerts.ack(&id, &who).await)
}

pub async fn clear(
    State(c): State<Console>,
    Writer(a): Writer,
    Path(id): Path<String>,
) -> Response {
    let who = a.session.principal.name().to_string();
    changed(&c, c.inner.alerts.clear(&id, &who).await)
}

fn changed(c: &Console, r: Result<Alert, AlertError>) -> Response {
    match r {
        Ok(a) => fresh(Json(console_alert_json(c, &a))),
        Err(e @ AlertError::NotFound(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(AlertError::Store(e)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    }
}

/// The rules in force, with their active alerts (the filter's choices, the rules section).
pub async fn rules(State(c): State<Console>, _: Authed) -> Response {
    let rules = c.inner.alerts.rule_list().await;
    fresh(Json(json!({
        "rules": rules.iter().map(rule_json).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRule {
    /// One rule as a `[[rules]]` table in TOML.
    definition: String,
}

/// Adds a rule at run time (admin only), checked like the config file's.
pub async fn add_rule(
    State(c): State<Console>,
    Writer(a): Writer,
    body: Result<Json<AddRule>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"definition\": \"name = ...\"} (one [[rules]] table in TOML)",
        );
    };
    let who = a.session.principal.name().to_string();
    let added = match parse_definition(&body.definition) {
        Ok(definition) => c.inner.alerts.add_rule(definition, &who).await,
        Err(e) => Err(e),
    };
    match added {
        Ok(rule) => fresh(Json(rule_json(&rule))),
        Err(e) => rule_error(e),
    }
}

/// Removes a rule added at run time (admin only); its active alerts are cleared.
pub async fn remove_rule(
    State(c): State<Console>,
    Writer(a): Writer,
    Path(name): Path<String>,
) -> Response {
    let who = a.session.principal.name().to_string();
    match c.inner.alerts.remove_rule(&name, &who).await {
        Ok((rule, cleared)) => fresh(Json(json!({
            "removed": rule.name, "alerts_cleared": cleared,
        }))),
        Err(e) => rule_error(e),
    }
}

fn rule_error(e: RuleError) -> Response {
    let status = match &e {
        RuleError::Invalid(_) => StatusCode::BAD_REQUEST,
        RuleError::Exists(..) | RuleError::FromConfig(_) => StatusCode::CONFLICT,
        RuleError::NotFound(_) => StatusCode::NOT_FOUND,
        RuleError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}
