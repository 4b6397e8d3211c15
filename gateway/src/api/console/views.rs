//! The console's read API (overview, devices, readings, dead letters, KPI) and its one write
//! (enable/disable a device). Every handler takes an [`Authed`] or [`Writer`] session first.

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{device_protocol, error, fresh, Authed, Console, Writer};
use crate::pipeline::now_ms;
use crate::proto::{reading, DeadLetter, Protocol, Reading};
use crate::registry::DeviceEntry;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

fn page(limit: Option<usize>) -> usize {
    limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE)
}

/// Runs registry or store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store: {e}"),
        )),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

pub async fn overview(State(c): State<Console>, _: Authed) -> Response {
    match c.inner.overview.current().await {
        Ok(json) => fresh((
            [(header::CONTENT_TYPE, "application/json")],
            json.to_string(),
        )),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("overview: {e}")),
    }
}

/// A device as the console shows it.
fn device_json(d: &DeviceEntry, c: &Console, now: i64) -> Value {
    let state = if !d.enabled() {
        "disabled"
    } else if c.inner.kpi.is_active(d, now) {
        "active"
    } else {
        "silent"
    };
    let p = d.to_proto();
    json!({
        "id": p.id, "name": p.name, "tenant": p.tenant, "kind": p.kind,
        "commune_code": p.commune_code, "lat": p.lat, "lon": p.lon,
        "enabled": p.enabled, "state": state, "online": p.online,
        "protocol": device_protocol(d.protocol()),
        "created_time_ms": p.created_time_ms, "last_seen_time_ms": p.last_seen_time_ms,
        "dev_eui": p.dev_eui, "codec": p.codec, "has_psk": p.has_psk,
    })
}

#[derive(Deserialize)]
pub struct DeviceQuery {
    /// Part of the id or name, any case.
    #[serde(default)]
    q: String,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    kind: String,
    /// mqtt, coap, lwm2m, lorawan, or none (never reported).
    #[serde(default)]
    protocol: String,
    /// active, silent, disabled or online.
    #[serde(default)]
    state: String,
    #[serde(default)]
    after: String,
    limit: Option<usize>,
}

pub async fn devices(State(c): State<Console>, _: Authed, q: Query<DeviceQuery>) -> Response {
    let q = q.0;
    let limit = page(q.limit);
    let needle = q.q.trim().to_lowercase();
    let now = now_ms();
    let kpi = c.inner.kpi.clone();
    let registry = c.inner.registry.clone();
    let matches = move |d: &DeviceEntry| {
        (needle.is_empty()
            || d.id().to_lowercase().contains(&needle)
            || d.name().to_lowercase().contains(&needle))
            && (q.tenant.is_empty() || d.tenant() == q.tenant)
            && (q.kind.is_empty() || d.kind() == q.kind)
            && (q.protocol.is_empty() || device_protocol(d.protocol()) == q.protocol)
            && match q.state.as_str() {
                "" => true,
                "disabled" => !d.enabled(),
                "active" => d.enabled() && kpi.is_active(d, now),
                "silent" => d.enabled() && !kpi.is_active(d, now),
                "online" => d.online(),
                _ => false,
            }
    };
    let after = q.after.clone();
    let found = match blocking(move || Ok(registry.select(&after, limit, matches))).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let next_after = (found.len() == limit).then(|| found.last().map(|d| d.id().to_string()));
    fresh(Json(json!({
        "devices": found.iter().map(|d| device_json(d, &c, now)).collect::<Vec<_>>(),
        "next_after": next_after.flatten(),
    })))
}

pub async fn device(State(c): State<Console>, _: Authed, Path(id): Path<String>) -> Response {
    match c.inner.registry.get(&id) {
        Some(d) => fresh(Json(device_json(&d, &c, now_ms()))),
        None => error(StatusCode::NOT_FOUND, format!("device {id:?} not found")),
    }
}

/// A reading as the console shows it.
pub fn reading_json(r: &Reading) -> Value {
    let value = match &r.value {
        Some(reading::Value::Number(n)) if n.is_finite() => json!(n),
        Some(reading::Value::Boolean(b)) => json!(b),
        Some(reading::Value::Text(s)) => json!(s),
        _ => Value::Null,
    };
    json!({
        "id": r.id, "device_id": r.device_id, "quantity": r.quantity, "value": value,
        "unit": r.unit, "device_time_ms": r.device_time_ms,
        "received_time_ms": r.received_time_ms,
        "protocol": device_protocol(Protocol::try_from(r.protocol).unwrap_or_default()),
        "seq": r.device_seq,
    })
}

#[derive(Deserialize)]
pub struct Limit {
    limit: Option<usize>,
}

pub async fn readings(
    State(c): State<Console>,
    _: Authed,
    Path(id): Path<String>,
    q: Query<Limit>,
) -> Response {
    if c.inner.registry.get(&id).is_none() {
        return error(StatusCode::NOT_FOUND, format!("device {id:?} not found"));
    }
    let limit = page(q.limit.or(Some(500)));
    let store = c.inner.store.clone();
    match blocking(move || store.device_latest_readings(&id, limit)).await {
        Ok(rs) => fresh(Json(json!({
            "readings": rs.iter().map(reading_json).collect::<Vec<_>>(),
        }))),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
pub struct Enabled {
    enabled: bool,
}

pub async fn set_enabled(
    State(c): State<Console>,
    Writer(a): Writer,
    Path(id): Path<String>,
    body: Result<Json<Enabled>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return error(StatusCode::BAD_REQUEST, "send {\"enabled\": true|false}");
    };
    match c.inner.registry.set_enabled(&id, body.enabled).await {
        Ok(_) => {
            tracing::info!(device = %id, enabled = body.enabled, who = a.session.principal.name(), "device enabled state changed from the console");
            let d = c.inner.registry.get(&id).expect("just changed");
            fresh(Json(device_json(&d, &c, now_ms())))
        }
        Err(crate::registry::RegistryError::NotFound(_)) => {
            error(StatusCode::NOT_FOUND, format!("device {id:?} not found"))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn dead_letter_json(d: &DeadLetter) -> Value {
    // The payload head as text when it is UTF-8 (JSON, SenML), else as hex.
    let (payload, encoding) = match std::str::from_utf8(&d.payload_head) {
        Ok(s) => (s.to_string(), "text"),
        Err(_) => (hex::encode(&d.payload_head), "hex"),
    };
    json!({
        "id": d.id, "received_time_ms": d.received_time_ms, "device_id": d.device_id,
        "protocol": device_protocol(Protocol::try_from(d.protocol).unwrap_or_default()),
        "reason": d.reason, "detail": d.detail, "address": d.address,
        "payload": payload, "payload_encoding": encoding, "payload_size": d.payload_size,
    })
}

#[derive(Deserialize)]
pub struct DeadLetterQuery {
    #[serde(default)]
    device: String,
    /// Page on with the smallest id seen (newest first).
    #[serde(default)]
    before: u64,
    limit: Option<usize>,
}

pub async fn dead_letters(
    State(c): State<Console>,
    _: Authed,
    q: Query<DeadLetterQuery>,
) -> Response {
    let q = q.0;
    let limit = page(q.limit);
    let store = c.inner.store.clone();
    let device = Some(q.device).filter(|d| !d.is_empty());
    match blocking(move || store.dead_letters_newest(device.as_deref(), q.before, limit)).await {
        Ok(dls) => fresh(Json(json!({
            "dead_letters": dls.iter().map(dead_letter_json).collect::<Vec<_>>(),
            "next_before": (dls.len() == limit).then(|| dls.last().map(|d| d.id)).flatten(),
        }))),
        Err(r) => r,
    }
}

async fn report(c: &Console) -> Result<crate::proto::ConnectionKpi, Response> {
    c.inner
        .kpi
        .report_async(String::new())
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

pub async fn kpi(State(c): State<Console>, _: Authed) -> Response {
    match report(&c).await {
        Ok(r) => fresh(Json(r)),
        Err(r) => r,
    }
}

/// The communes of the KPI city as CSV, one row each (what the KPI page's table shows).
pub async fn kpi_csv(State(c): State<Console>, _: Authed) -> Response {
    let r = match report(&c).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let mut w = csv::Writer::from_writer(Vec::new());
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let _ = w.write_record([
        "commune_code",
        "commune_name",
        "population",
        "area_km2",
        "registered",
        "active",
        "silent",
        "disabled",
        "connections_per_resident",
        "target_per_resident",
        "attainment_percent",
        "devices_needed",
        "active_per_km2",
        "approximated_devices",
    ]);
    for commune in &r.communes {
        let f = commune.figures.unwrap_or_default();
        let _ = w.write_record([
            commune.code.clone(),
            commune.name.clone(),
            f.population.map(|p| p.to_string()).unwrap_or_default(),
            f.area_km2.to_string(),
            f.registered.to_string(),
            f.active.to_string(),
            f.silent.to_string(),
            f.disabled.to_string(),
            opt(f.connections_per_resident),
            opt(f.target_per_resident),
            opt(f.attainment_percent),
            f.devices_needed.map(|n| n.to_string()).unwrap_or_default(),
            f.active_per_km2.to_string(),
            commune.approximated_devices.to_string(),
        ]);
    }
    let body = w.into_inner().unwrap_or_default();
    let name = format!(
        "attachment; filename=\"citygw-kpi-{}-{}.csv\"",
        r.city_code, r.date
    );
    fresh((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (header::CONTENT_DISPOSITION, name),
        ],
        body,
    ))
}

/// The KPI city's communes for the map: centroid and area always, boundary rings (lon, lat)
/// when `kpi.boundaries_file` is configured. Computed once.
pub async fn kpi_map(State(c): State<Console>, _: Authed) -> Response {
    let json = c
        .inner
        .map
        .get_or_init(|| {
            let geo = c.inner.kpi.geo();
            let city = c.inner.kpi.city();
            let communes: Vec<Value> = geo
                .communes()
                .iter()
                .enumerate()
                .filter(|(_, x)| x.province == city)
                .map(|(i, x)| {
                    let rings: Vec<Vec<[f64; 2]>> = geo
                        .boundary_rings(i as u32)
                        .iter()
                        .map(|r| r.iter().map(|&(lon, lat)| [lon, lat]).collect())
                        .collect();
                    json!({"code": x.code, "name": x.name, "lat": x.lat, "lon": x.lon,
                           "area_km2": x.area_km2, "rings": rings})
                })
                .collect();
            let attribution = if geo.has_boundaries() {
                "boundaries"
            } else {
                "centroids"
            };
            std::sync::Arc::from(
                json!({"city": city, "attribution": attribution, "communes": communes}).to_string(),
            )
        })
        .clone();
    fresh((
        [(header::CONTENT_TYPE, "application/json")],
        json.to_string(),
    ))
    .into_response()
}
