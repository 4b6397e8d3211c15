//! Server-sent event streams: the overview's figures every sample, a device's readings as they
//! are committed (from the store's feed: only fsync'd readings, in id order), and commands and
//! alerts as their changes become durable.
//!
//! A stream ends when its session does (sign-out, expiry, a removed operator): it is checked at
//! every event and every [`RECHECK`]. A device stream that falls behind the feed is told to
//! `resync` (the page reloads the latest readings) rather than slowing anyone else.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;

use super::alerts::console_alert_json;
use super::views::reading_json;
use super::{error, Authed, Console, StreamSlot};
use crate::cli::control::command_json;
use crate::proto::Alert;

const RECHECK: Duration = Duration::from_secs(15);

fn busy() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many live streams open; retry later",
    )
}

fn sse(stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(RECHECK))
        .into_response();
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    r
}

/// `event: overview` with the overview JSON, at once and then every sample.
pub async fn overview(State(c): State<Console>, a: Authed) -> Response {
    let Some(slot) = StreamSlot::take(&c) else {
        return busy();
    };
    let rx = c.inner.overview.subscribe();
    let first = match c.inner.overview.current().await {
        Ok(json) => json,
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "overview unavailable"),
    };
    let overview = |json: &str| Event::default().event("overview").data(json);
    let first = overview(&first);
    let samples = futures::stream::unfold(rx, move |mut rx| async move {
        rx.changed().await.ok()?;
        let json = rx.borrow_and_update().clone();
        Some((Some(overview(&json)), rx))
    });
    pump(c, a, slot, first, samples)
}

/// `event: readings` with a JSON array of the device's newly committed readings.
pub async fn device(State(c): State<Console>, a: Authed, Path(id): Path<String>) -> Response {
    if c.inner.registry.get(&id).is_none() {
        return error(StatusCode::NOT_FOUND, format!("device {id:?} not found"));
    }
    let Some(slot) = StreamSlot::take(&c) else {
        return busy();
    };
    let feed = c.inner.store.subscribe();
    let readings = futures::stream::unfold(feed, move |mut feed| {
        let id = id.clone();
        async move {
            let event = match feed.recv().await {
                Ok(batch) => {
                    let mine: Vec<_> = batch
                        .iter()
                        .filter(|f| f.reading.device_id == id)
                        .map(|f| reading_json(&f.reading))
                        .collect();
                    (!mine.is_empty()).then(|| {
                        Event::default()
                            .event("readings")
                            .data(serde_json::Value::from(mine).to_string())
                    })
                }
                Err(RecvError::Lagged(_)) => Some(Event::default().event("resync").data("{}")),
                Err(RecvError::Closed) => return None,
            };
            Some((event, feed))
        }
    });
    // `ready` tells the page the stream is open: what it loads after this, plus what follows
    // here, leaves no gap.
    pump(
        c,
        a,
        slot,
        Event::default().event("ready").data("{}"),
        readings,
    )
}

/// `event: command` with a command's JSON at every change of its state (once durable); `resync`
/// when this stream fell behind (the page lists again).
pub async fn commands(State(c): State<Console>, a: Authed) -> Response {
    let Some(slot) = StreamSlot::take(&c) else {
        return busy();
    };
    let changes = changes(c.inner.commands.watch(), "command", command_json);
    pump(
        c,
        a,
        slot,
        Event::default().event("ready").data("{}"),
        changes,
    )
}

/// `event: alert` with an alert's JSON at every change (raised, acknowledged, cleared, an action's
/// commands recorded), once durable; `resync` when this stream fell behind (the page lists again).
pub async fn alerts(State(c): State<Console>, a: Authed) -> Response {
    let Some(slot) = StreamSlot::take(&c) else {
        return busy();
    };
    let console = c.clone();
    let changes = changes(c.inner.alerts.watch(), "alert", move |alert: &Alert| {
        console_alert_json(&console, alert)
    });
    pump(
        c,
        a,
        slot,
        Event::default().event("ready").data("{}"),
        changes,
    )
}

/// An event named `name` with `json` of every change a watch channel carries; `resync` when the
/// stream fell behind (the page lists again).
fn changes<T: Send + Sync + 'static>(
    rx: broadcast::Receiver<Arc<T>>,
    name: &'static str,
    json: impl Fn(&T) -> serde_json::Value + Clone + Send + 'static,
) -> impl Stream<Item = Option<Event>> + Send + 'static {
    futures::stream::unfold(rx, move |mut rx| {
        let json = json.clone();
        async move {
            let event = match rx.recv().await {
                Ok(item) => Event::default().event(name).data(json(&item).to_string()),
                Err(RecvError::Lagged(_)) => Event::default().event("resync").data("{}"),
                Err(RecvError::Closed) => return None,
            };
            Some((Some(event), rx))
        }
    })
}

/// Sends `first`, then every event `source` yields (`None` items: nothing to send this time),
/// for as long as the client reads and the session lives (checked at every event and every
/// [`RECHECK`]).
fn pump(
    c: Console,
    a: Authed,
    slot: StreamSlot,
    first: Event,
    source: impl Stream<Item = Option<Event>> + Send + 'static,
) -> Response {
    sse(channel_stream(move |tx| async move {
        let _slot = slot;
        if tx.send(first).await.is_err() {
            return;
        }
        let mut source = std::pin::pin!(source);
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
            tokio::select! {
                item = source.next() => match item {
                    None => return,
                    Some(None) => {}
                    Some(Some(event)) => {
                        if !still_wanted(&c, &a.id, &tx).await || tx.send(event).await.is_err() {
                            return;
                        }
                    }
                },
                _ = recheck.tick() => {
                    if !still_wanted(&c, &a.id, &tx).await {
                        return;
                    }
                }
            }
        }
    }))
}

/// A stream fed by a task: `body` gets the sending half and returns when the stream should end
/// (a failed send means the client went away). The channel holds one event, so a client that
/// stops reading holds back its own task at its next send, not the gateway's memory.
fn channel_stream<F, Fut>(body: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Event>(1);
    tokio::spawn(body(tx));
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}

/// Whether a stream should go on: its client still reads and its session is alive (else the
/// client is told `signed_out`).
async fn still_wanted(c: &Console, id: &str, tx: &mpsc::Sender<Event>) -> bool {
    if tx.is_closed() {
        return false;
    }
    if c.inner.sessions.get(id).is_none() {
        let _ = tx
            .send(Event::default().event("signed_out").data("{}"))
            .await;
        return false;
    }
    true
}
