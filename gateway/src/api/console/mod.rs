//! The operator console: a web page served by the gateway itself at `/console/`.
//!
//! A city operator opens it instead of reading metrics by hand: the overview (devices, ingest,
//! refusals, sinks, store), the KPI with its commune map, devices with their live readings, dead
//! letters, commands to devices (sent by the admin, followed live) and the alerts the rules raise
//! (acknowledged and cleared by the admin, followed live; rules added and removed at run time).
//! It is built to run where the city's network has no internet: every asset is embedded in the
//! binary (`web/`, through rust-embed), the JavaScript libraries are vendored with their licences,
//! and the page makes no request outside citygw (its Content-Security-Policy forbids it). Live
//! figures arrive by server-sent events, never by reloading.
//!
//! Nothing answers without a session except the sign-in itself and the static page shell (which
//! holds no data): see [`session`] for tokens, cookies and expiry. Writes (enable/disable, sign
//! out) need the admin role, the session's CSRF token in `X-CSRF-Token`, and a same-origin
//! `Origin` when the browser sends one.

mod alerts;
mod commands;
mod live;
mod overview;
mod prom;
pub mod session;
mod views;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::config::ConsoleConfig;
use crate::control::commands::Commands;
use crate::control::rules::Alerts;
use crate::kpi::Kpi;
use crate::registry::operators::Operators;
use crate::registry::secret::constant_time_eq;
use crate::registry::Registry;
use crate::sinks::Sinks;
use crate::store::Store;
use session::{Session, Sessions, SignInError};

pub use overview::{count_devices, device_protocol};

/// Server-sent event streams open at once; more are refused with 503 (each holds a feed receiver).
const MAX_LIVE_STREAMS: usize = 256;
/// Largest request body the console accepts (a sign-in or a toggle is a few dozen bytes).
const MAX_BODY: usize = 4096;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

#[derive(rust_embed::RustEmbed)]
#[folder = "src/api/console/web/"]
struct Assets;

/// Everything the console reads from.
pub struct Setup {
    pub cfg: ConsoleConfig,
    pub admin_token: String,
    pub operators: Operators,
    pub registry: Registry,
    pub store: Store,
    pub kpi: Kpi,
    pub sinks: Sinks,
    pub metrics: PrometheusHandle,
    pub commands: Commands,
    pub alerts: Alerts,
    /// The HTTP listener serves TLS: session cookies get `Secure`.
    pub tls: bool,
}

#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ConsoleConfig,
    tls: bool,
    sessions: Sessions,
    registry: Registry,
    store: Store,
    kpi: Kpi,
    commands: Commands,
    alerts: Alerts,
    overview: overview::Overview,
    live_streams: AtomicUsize,
    map: std::sync::OnceLock<Arc<str>>,
}

impl Console {
    pub fn new(p: Setup) -> Console {
        let overview = overview::Overview::new(
            overview::Sources {
                registry: p.registry.clone(),
                kpi: p.kpi.clone(),
                sinks: p.sinks,
                store: p.store.clone(),
                metrics: p.metrics,
            },
            std::time::Duration::from_millis(p.cfg.live_interval_ms),
        );
        Console {
            inner: Arc::new(Inner {
                sessions: Sessions::new(&p.cfg, p.admin_token, p.operators),
                cfg: p.cfg,
                tls: p.tls,
                registry: p.registry,
                store: p.store,
                kpi: p.kpi,
                commands: p.commands,
                alerts: p.alerts,
                overview,
                live_streams: AtomicUsize::new(0),
                map: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The overview sampler; runs until `shutdown`.
    pub fn run(&self, shutdown: CancellationToken) -> impl std::future::Future<Output = ()> {
        self.inner.overview.clone().run(shutdown)
    }

    /// The console's routes, under `/console`.
    pub fn router(self) -> Router {
        let api = Router::new()
            .route("/session", get(session_info).post(sign_in).delete(sign_out))
            .route("/overview", get(views::overview))
            .route("/devices", get(views::devices))
            .route("/devices/{id}", get(views::device))
            .route("/devices/{id}/readings", get(views::readings))
            .route("/devices/{id}/enabled", post(views::set_enabled))
            .route("/deadletters", get(views::dead_letters))
            .route("/kpi", get(views::kpi))
            .route("/kpi.csv", get(views::kpi_csv))
            .route("/kpi/map", get(views::kpi_map))
            .route("/live/overview", get(live::overview))
            .route("/commands", get(commands::list).post(commands::send))
            .route("/commands/{id}", get(commands::one))
            .route("/alerts", get(alerts::list))
            .route("/alerts/{id}", get(alerts::one))
            .route("/alerts/{id}/ack", post(alerts::ack))
            .route("/alerts/{id}/clear", post(alerts::clear))
            .route("/rules", get(alerts::rules).post(alerts::add_rule))
            .route("/rules/{name}/remove", post(alerts::remove_rule))
            .route("/live/devices/{id}", get(live::device))
            .route("/live/commands", get(live::commands))
            .route("/live/alerts", get(live::alerts))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "no such console API") })
            .layer(DefaultBodyLimit::max(MAX_BODY));
        Router::new()
            .route(
                "/console",
                get(|| async { Redirect::permanent("/console/") }),
            )
            .route(
                "/console/",
                get(|s: State<Console>, h: HeaderMap| asset(s, h, "index.html")),
            )
            .route("/console/{*path}", get(static_asset))
            .nest("/console/api", api)
            .layer(axum::middleware::map_response(security_headers))
            .with_state(self)
    }
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cross-origin-opener-policy", "same-origin"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

/// A JSON error body `{"error": ...}`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = (status, Json(serde_json::json!({"error": message.into()}))).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// JSON that must not be cached (every API answer).
pub(crate) fn fresh(body: impl IntoResponse) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn static_asset(s: State<Console>, h: HeaderMap, Path(path): Path<String>) -> Response {
    asset(s, h, &path).await
}

async fn asset(_: State<Console>, headers: HeaderMap, path: &str) -> Response {
    let Some(file) = Assets::get(path) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let mime = match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "text/plain; charset=utf-8",
    };
    (
        [
            (header::CONTENT_TYPE, mime.to_string()),
            (header::ETAG, etag),
            // Revalidate every time: an upgraded gateway serves its new page at once.
            (header::CACHE_CONTROL, "no-cache".to_string()),
        ],
        file.data,
    )
        .into_response()
}

/// A request with a live session. Reads with any role; see [`Writer`] for changes.
pub(crate) struct Authed {
    pub session: Session,
    /// The cookie value, to re-check the session during long streams.
    pub id: String,
}

impl FromRequestParts<Console> for Authed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, c: &Console) -> Result<Self, Response> {
        let id = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session::cookie_value)
            .map(str::to_string);
        let session = id.as_deref().and_then(|id| c.inner.sessions.get(id));
        match (id, session) {
            (Some(id), Some(session)) => Ok(Authed { session, id }),
            _ => {
                metrics::counter!("citygw_console_requests_refused_total", "reason" => "no_session")
                    .increment(1);
                Err(error(StatusCode::UNAUTHORIZED, "sign in first"))
            }
        }
    }
}

/// A session allowed to change something: admin role, CSRF token and a same-origin request.
pub(crate) struct Writer(pub Authed);

impl FromRequestParts<Console> for Writer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, c: &Console) -> Result<Self, Response> {
        let authed = Authed::from_request_parts(parts, c).await?;
        let refuse = |status, reason: &'static str, message: &str| {
            metrics::counter!("citygw_console_requests_refused_total", "reason" => reason)
                .increment(1);
            error(status, message)
        };
        if !same_origin(&parts.headers) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "cross-origin request",
            ));
        }
        let csrf = parts
            .headers
            .get("x-csrf-token")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !constant_time_eq(csrf, authed.session.csrf.as_bytes()) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "csrf",
                "missing or wrong X-CSRF-Token",
            ));
        }
        if parts.method != Method::DELETE && !authed.session.principal.may_change() {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "read_only",
                "operators have read-only access; sign in with the admin token to change this",
            ));
        }
        Ok(Writer(authed))
    }
}

/// A browser's `Origin` (and `Sec-Fetch-Site`) must name this very host; clients that send
/// neither (curl, scripts) pass, as they cannot be tricked into a cross-site request.
fn same_origin(headers: &HeaderMap) -> bool {
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site" || v.as_bytes() == b"same-site")
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).map(|h| h.as_bytes());
    let origin = origin.as_bytes();
    let origin_host = origin
        .strip_prefix(b"https://")
        .or_else(|| origin.strip_prefix(b"http://"));
    origin_host.is_some() && origin_host == host
}

#[derive(serde::Deserialize)]
struct SignIn {
    token: String,
}

fn session_json(c: &Console, s: &Session) -> serde_json::Value {
    serde_json::json!({
        "role": s.principal.role(),
        "name": s.principal.name(),
        "csrf": s.csrf,
        "time_zone": c.inner.cfg.time_zone,
        "city": c.inner.kpi.city(),
        "live_interval_ms": c.inner.cfg.live_interval_ms,
        "version": env!("CARGO_PKG_VERSION"),
    })
}

async fn session_info(State(c): State<Console>, a: Authed) -> Response {
    fresh(Json(session_json(&c, &a.session)))
}

async fn sign_in(
    State(c): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<SignIn>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !same_origin(&headers) {
        metrics::counter!("citygw_console_requests_refused_total", "reason" => "cross_origin")
            .increment(1);
        return error(StatusCode::FORBIDDEN, "cross-origin sign-in");
    }
    let Ok(Json(body)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"token\": \"...\"} as application/json",
        );
    };
    match c.inner.sessions.sign_in(&body.token, peer.ip()) {
        Ok((id, session)) => {
            metrics::counter!("citygw_console_sign_ins_total", "role" => session.principal.role())
                .increment(1);
            tracing::info!(who = session.principal.name(), role = session.principal.role(), peer = %peer.ip(), "console sign-in");
            let cookie = session::set_cookie(&id, c.inner.sessions.lifetime(), c.inner.tls);
            let mut r = fresh(Json(session_json(&c, &session)));
            r.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&cookie).expect("cookie is ASCII"),
            );
            r
        }
        Err(e) => {
            metrics::counter!("citygw_api_auth_failures_total", "api" => "console").increment(1);
            log_failure(peer);
            match e {
                SignInError::WrongToken => error(StatusCode::UNAUTHORIZED, "unknown token"),
                SignInError::Throttled(wait) => {
                    let mut r = error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many failed sign-ins from this address; wait and retry",
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, (wait.as_secs() + 1).into());
                    r
                }
            }
        }
    }
}

/// One warning per second at most, however many sign-ins fail (a guessing flood must not flood
/// the log); the counter has every one.
fn log_failure(peer: SocketAddr) {
    static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let second = crate::pipeline::now_ms() / 1000;
    if LAST.swap(second, Ordering::Relaxed) != second {
        tracing::warn!(peer = %peer.ip(), "console sign-in refused (wrong token)");
    }
}

async fn sign_out(State(c): State<Console>, Writer(a): Writer) -> Response {
    c.inner.sessions.sign_out(&a.id);
    tracing::info!(who = a.session.principal.name(), "console sign-out");
    let mut r = fresh(StatusCode::NO_CONTENT);
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&session::clear_cookie(c.inner.tls)).expect("ASCII"),
    );
    r
}

/// Holds one of the [`MAX_LIVE_STREAMS`] places while a stream is open.
pub(crate) struct StreamSlot(Console);

impl StreamSlot {
    pub fn take(c: &Console) -> Option<StreamSlot> {
        let n = c.inner.live_streams.fetch_add(1, Ordering::AcqRel);
        if n >= MAX_LIVE_STREAMS {
            c.inner.live_streams.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics::gauge!("citygw_console_live_streams").set((n + 1) as f64);
        Some(StreamSlot(c.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let n = self.0.inner.live_streams.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("citygw_console_live_streams").set((n - 1) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn origin_must_be_this_host() {
        assert!(same_origin(&headers(&[("host", "gw:8080")])));
        assert!(same_origin(&headers(&[
            ("host", "gw:8080"),
            ("origin", "http://gw:8080")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "gw:8080"),
            ("origin", "http://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "gw:8080"),
            ("origin", "null")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "gw:8080"),
            ("sec-fetch-site", "cross-site")
        ])));
    }

    #[test]
    fn every_page_asset_is_embedded_and_referenced_files_exist() {
        let index = Assets::get("index.html").expect("index.html embedded");
        let html = std::str::from_utf8(&index.data).unwrap();
        for part in html.split(['"', '\'']) {
            if let Some(path) = part.strip_prefix("/console/") {
                if !path.is_empty() && !path.starts_with("api/") {
                    assert!(
                        Assets::get(path).is_some(),
                        "{path} is referenced but missing"
                    );
                }
            }
        }
        assert!(Assets::get("vendor/uplot/LICENSE").is_some());
    }
}
