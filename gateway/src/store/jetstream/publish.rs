//! Appending readings: publish to the stream, resolve on JetStream's acknowledgement.
//!
//! Every call sends its messages and only then waits, and many calls (one per device message in
//! flight) share one connection, so publishes are pipelined: thousands wait for their acks at once
//! instead of one round trip each. The ack comes once the stream leader has the message on a
//! quorum of replicas (on disk when the servers run with `sync_interval: always`).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;

use super::{escape_token, ids, Cluster};
use crate::proto::Reading;
use crate::store::{runs, StoreError};

/// How long to wait before asking again about a message whose twin is being stored.
const REPEAT_PAUSE: Duration = Duration::from_millis(20);

/// QoS 0 messages waiting for JetStream at once; beyond it they are dropped and counted.
const BEST_EFFORT_IN_FLIGHT: usize = 10_000;

static BEST_EFFORT: AtomicUsize = AtomicUsize::new(0);

impl Cluster {
    /// Publishes readings and returns their ids once JetStream acknowledged every message.
    /// `content_id` names the device message where its content identifies it (LoRaWAN DevEUI +
    /// FCnt, CoAP endpoint + message id): JetStream stores a repeat within the duplicate window
    /// once and answers it with the original sequence, so the device gets the same ids again.
    /// The range spans the first to the last id; in cluster mode it has gaps (see [`ids`]).
    pub(crate) async fn append(
        &self,
        readings: Vec<Reading>,
        content_id: Option<&str>,
    ) -> Result<Range<u64>, StoreError> {
        let started = Instant::now();
        let mut chunks = Vec::new();
        let mut rest = readings;
        while rest.len() > ids::MAX_RUN {
            let tail = rest.split_off(ids::MAX_RUN);
            chunks.push(std::mem::replace(&mut rest, tail));
        }
        chunks.push(rest);
        let runs: Vec<runs::EncodedRun> = chunks.into_iter().flat_map(runs::encode).collect();
        let many = runs.len() > 1;
        let mut acks = Vec::with_capacity(runs.len());
        for (i, run) in runs.iter().enumerate() {
            let device = run.readings.first().map_or("", |r| r.device_id.as_str());
            let subject = format!("{}.{}", self.cfg.subject_prefix, escape_token(device));
            let mut message = PublishMessage::build().payload(Bytes::copy_from_slice(&run.value));
            if let Some(id) = content_id {
                message = message.message_id(if many {
                    format!("{id}#{i}")
                } else {
                    id.to_string()
                });
            }
            let ack = self
                .js
                .send_publish(subject.clone(), message.clone())
                .await
                .map_err(|e| unavailable("publish", &e))?;
            acks.push((ack, run.readings.len() as u64, subject, message));
        }
        let mut span: Option<Range<u64>> = None;
        for (ack, n, subject, message) in acks {
            let ack = match ack.await {
                Err(e) if in_process(&e) => self.settle_repeat(subject, message).await?,
                ack => ack.map_err(|e| unavailable("ack", &e))?,
            };
            if ack.duplicate {
                metrics::counter!("citygw_cluster_duplicates_total").increment(1);
            }
            let first = ids::first_id(ack.sequence);
            let ids = first..first + n;
            span = Some(match span {
                None => ids,
                Some(s) => s.start..ids.end,
            });
        }
        metrics::histogram!("citygw_cluster_publish_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(span.unwrap_or(0..0))
    }

    /// A message with the same content id is being stored at this moment (a network server's
    /// copy that reached another node, a CoAP retransmission): JetStream answers "in process"
    /// instead of waiting for the first. Asks again until the first is settled: the answer is
    /// then the original's sequence (a duplicate, stored once), or this copy is stored if the
    /// first failed.
    async fn settle_repeat(
        &self,
        subject: String,
        message: PublishMessage,
    ) -> Result<async_nats::jetstream::publish::PublishAck, StoreError> {
        let deadline = Instant::now() + self.cfg.ack_timeout();
        loop {
            tokio::time::sleep(REPEAT_PAUSE).await;
            let ack = self
                .js
                .send_publish(subject.clone(), message.clone())
                .await
                .map_err(|e| unavailable("publish", &e))?
                .await;
            match ack {
                Err(e) if in_process(&e) && Instant::now() < deadline => continue,
                ack => return ack.map_err(|e| unavailable("ack", &e)),
            }
        }
    }

    /// QoS 0: published without anyone waiting; dropped and counted when too many are pending.
    pub(crate) fn append_best_effort(self: &Arc<Self>, readings: Vec<Reading>) {
        if BEST_EFFORT.fetch_add(1, Ordering::AcqRel) >= BEST_EFFORT_IN_FLIGHT {
            BEST_EFFORT.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("citygw_store_best_effort_dropped_total")
                .increment(readings.len() as u64);
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            let n = readings.len() as u64;
            if cluster.append(readings, None).await.is_err() {
                metrics::counter!("citygw_store_best_effort_dropped_total").increment(n);
            }
            BEST_EFFORT.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Whether JetStream refused a publish because a message with its id is being stored now.
fn in_process(e: &async_nats::jetstream::context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|je| {
            je.error_code() == async_nats::jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT
        })
}

fn unavailable(stage: &'static str, e: &dyn std::fmt::Display) -> StoreError {
    metrics::counter!("citygw_cluster_publish_errors_total", "stage" => stage).increment(1);
    StoreError::Unavailable(format!("jetstream {stage}: {e}"))
}
