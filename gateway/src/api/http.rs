//! HTTP for operators and orchestrators: `/metrics` (Prometheus), `/healthz`, `/readyz`, the
//! connections KPI as JSON at `/api/v1/kpi`, and the operator console under `/console/`. HTTPS
//! when `http.tls_cert_file` is set; `/metrics` asks for a bearer token when
//! `http.metrics_token` is set. Failed tokens back off per address like every other credential.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use futures::FutureExt;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::kpi::{Kpi, KpiError};
use crate::registry::agencies::Agencies;
use crate::registry::secret::constant_time_eq;
use crate::store::Store;

/// Set once every listener is up; cleared when shutdown begins so load balancers drain us. In
/// cluster mode also not ready while JetStream has no quorum (writes cannot be acknowledged).
#[derive(Clone, Default)]
pub struct Readiness {
    started: Arc<AtomicBool>,
    cluster: Arc<std::sync::OnceLock<Arc<crate::store::jetstream::Cluster>>>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.started.store(ready, Ordering::Release);
    }

    pub fn depend_on(&self, cluster: Arc<crate::store::jetstream::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Ready, or why not.
    pub fn check(&self) -> Result<(), String> {
        if !self.started.load(Ordering::Acquire) {
            return Err("not ready".into());
        }
        match self.cluster.get() {
            Some(cluster) => cluster.health(),
            None => Ok(()),
        }
    }
}

/// What the HTTP routes serve from.
#[derive(Clone)]
pub struct Api {
    pub metrics: PrometheusHandle,
    pub ready: Readiness,
    /// Not ready while the store refuses new data (disk full, a failed engine being reopened).
    pub store: Store,
    /// `/api/v1/kpi` accepts an agency token with the KPI scope...
    pub agencies: Agencies,
    /// ...or the operator's admin token.
    pub admin_token: String,
    pub kpi: Kpi,
    /// The bearer token `/metrics` requires, if any.
    pub metrics_token: Option<String>,
    /// For the back-off of failed tokens.
    pub registry: crate::registry::Registry,
    /// The operator console's routes, when `console.enabled`.
    pub console: Option<crate::api::console::Console>,
}

pub async fn start(
    listen: SocketAddr,
    api: Api,
    tls: Option<Arc<crate::tls::ServerTls>>,
    shutdown: CancellationToken,
) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("http listener {listen}: {e}"))?;
    tracing::info!(%listen, tls = tls.is_some(), metrics_token = api.metrics_token.is_some(), "http listening");
    let console = api.console.clone();
    let mut app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/kpi", get(kpi))
        .with_state(api);
    if let Some(console) = console {
        app = app.merge(console.router());
    }
    // The peer address reaches handlers (failed tokens and sign-ins back off per address).
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let signal = shutdown.cancelled_owned();
    Ok(match tls {
        Some(tls) => {
            use axum::serve::ListenerExt;
            // tap_io: axum gives the peer address to handlers of a wrapped listener only.
            let incoming =
                crate::tls::incoming::TlsIncoming::new(listener, tls, true)?.tap_io(|_| {});
            async move {
                axum::serve(incoming, app)
                    .with_graceful_shutdown(signal)
                    .await
                    .map_err(|e| anyhow::anyhow!("http server: {e}"))
            }
            .boxed()
        }
        None => async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
                .map_err(|e| anyhow::anyhow!("http server: {e}"))
        }
        .boxed(),
    })
}

/// The bearer token of a request, checked by `verify` under the back-off of failed attempts
/// from `peer`. The error is the response to send (401, or 429 with Retry-After), boxed: it is
/// the rare path.
fn check_token<R>(
    state: &Api,
    peer: SocketAddr,
    headers: &HeaderMap,
    verify: impl FnOnce(&str) -> Option<R>,
) -> Result<R, Box<Response>> {
    let throttle = state.registry.throttle();
    if let Err(t) = throttle.check(peer.ip(), None) {
        metrics::counter!("citygw_api_auth_failures_total", "api" => "http", "reason" => "throttled")
            .increment(1);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed authentications from this address",
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            t.retry_after
                .as_secs()
                .max(1)
                .to_string()
                .parse()
                .expect("digits"),
        );
        return Err(Box::new(r));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim);
    let (reason, message) = match token {
        None => ("missing", "missing Authorization: Bearer <token>"),
        Some(token) => match verify(token) {
            Some(r) => return Ok(r),
            None => ("invalid", "unknown token"),
        },
    };
    throttle.failed(peer.ip(), None);
    metrics::counter!("citygw_api_auth_failures_total", "api" => "http", "reason" => reason)
        .increment(1);
    Err(Box::new(error(StatusCode::UNAUTHORIZED, message)))
}

async fn render_metrics(
    State(state): State<Api>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(expected) = &state.metrics_token {
        if let Err(r) = check_token(&state, peer, &headers, |t| {
            constant_time_eq(t.as_bytes(), expected.as_bytes()).then_some(())
        }) {
            return *r;
        }
    }
    state.metrics.render().into_response()
}

async fn readyz(State(state): State<Api>) -> (StatusCode, String) {
    let store = || match state.store.unwritable() {
        None => Ok(()),
        Some(why) => Err(format!("not ready: store: {why}")),
    };
    match state.ready.check().and_then(|()| store()) {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

#[derive(serde::Deserialize)]
struct KpiQuery {
    #[serde(default)]
    city: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = (status, Json(serde_json::json!({"error": message.into()}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
    }
    r
}

/// `GET /api/v1/kpi[?city=01]` with `Authorization: Bearer <token>`: 401 without a known token,
/// 403 for an agency without the KPI scope.
async fn kpi(
    State(state): State<Api>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Query<KpiQuery>,
) -> Response {
    // None: the admin token; Some: an agency.
    let caller = check_token(&state, peer, &headers, |token| {
        if constant_time_eq(token.as_bytes(), state.admin_token.as_bytes()) {
            Some(None)
        } else {
            state.agencies.authenticate(token).map(Some)
        }
    });
    match caller {
        Err(r) => return *r,
        Ok(Some(agency)) if !agency.kpi => {
            metrics::counter!("citygw_api_denied_total", "api" => "http").increment(1);
            return error(
                StatusCode::FORBIDDEN,
                format!("agency {:?} may not read the connections KPI", agency.name),
            );
        }
        Ok(_) => {}
    }
    match state.kpi.report_async(query.0.city).await {
        Ok(report) => Json(report).into_response(),
        Err(e @ KpiError::UnknownCity(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
