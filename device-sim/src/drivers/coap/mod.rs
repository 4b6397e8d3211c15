//! CoAP (RFC 7252) and CoAPS (DTLS 1.2 PSK) drivers: one UDP socket per device, one
//! confirmable `POST /t/{id}` per interval in the device's payload format.
//!
//! A message counts as acknowledged only on 2.04, which the gateway sends after the durable
//! write; any other answer (4.xx/5.xx) is `rejected` (counted by code), no answer after the last
//! retransmission is `unconfirmed`. Plain CoAP authenticates with `?t=<secret>`, CoAPS with the
//! DTLS session (PSK identity = device id).

pub mod dtls;
pub mod exchange;
pub mod session;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use tokio::time::Instant;

use super::sample::Sampler;
use crate::credentials::Credential;
use crate::format::Format;
use crate::run::{AckRecord, DriverContext};
use crate::scenario::SimDevice;
use exchange::Outcome;
use session::{Link, Session};

/// Where CoAP devices connect from and to.
pub struct Targets {
    pub plain: SocketAddr,
    pub secure: SocketAddr,
    /// Source addresses, device i binding `sources[i % n]` (empty: the kernel's choice). More
    /// than one passes the ephemeral-port limit of one address pair.
    pub sources: Vec<IpAddr>,
    /// Built when the scenario has CoAPS devices.
    pub dtls: Option<dtls::DtlsClient>,
    /// The lifetime LwM2M clients register with.
    pub lwm2m_lifetime: Duration,
}

/// The first address of `host:port`, named by its command-line `flag` when it has none.
pub async fn resolve(flag: &str, target: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(target)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("{flag} {target:?}: not a reachable host:port"))
}

/// Opens the device's endpoint (a DTLS handshake for CoAPS); counts a failure and returns None.
/// The caller counts the device connected when its protocol says so.
pub async fn open(
    dev: &SimDevice,
    cred: &Credential,
    secure: bool,
    ctx: &DriverContext,
) -> Option<Session> {
    let t = &ctx.coap;
    let source = (!t.sources.is_empty()).then(|| t.sources[dev.index % t.sources.len()]);
    let gateway = if secure { t.secure } else { t.plain };
    let stats = &ctx.stats;
    let fail = |reason: &str, detail: String| {
        stats.connect_failed.fetch_add(1, Ordering::Relaxed);
        stats.count_reason(reason.to_string());
        stats.note_error(format!("{}: {detail}", dev.id));
    };
    let socket = match session::udp_socket(source, gateway).await {
        Ok(s) => s,
        Err(e) => {
            fail("udp socket error", format!("udp socket to {gateway}: {e}"));
            return None;
        }
    };
    let link = if secure {
        let (Some(client), Some(psk)) = (&t.dtls, &cred.psk) else {
            fail(
                "no psk",
                "no PSK in the credentials file (provision again)".into(),
            );
            return None;
        };
        let permit = ctx.connect_permits.acquire().await;
        let r = client
            .connect(socket, &dev.id, psk, ctx.connect_timeout)
            .await;
        drop(permit);
        match r {
            Ok(l) => Link::Dtls(Box::new(l)),
            Err(e) => {
                fail(e.reason(), e.to_string());
                return None;
            }
        }
    } else {
        Link::udp(socket)
    };
    Some(Session::new(link, dev.seed))
}

/// Counts how a confirmable message ended; `ack` is written to the ack log on success.
pub fn record(ctx: &DriverContext, outcome: Outcome, sent_at: Instant, ack: Ack) {
    let stats = &ctx.stats;
    match outcome {
        Outcome::Answer(p) if is_success(p.header.code) => {
            ctx.acknowledged(sent_at.elapsed(), ack.readings, ack.record)
        }
        Outcome::Answer(p) => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            stats.count_reason(format!("coap {}", p.header.code));
            let detail = String::from_utf8_lossy(&p.payload);
            stats.note_error(format!(
                "{}: {} {detail}",
                ack.record.device_id, p.header.code
            ));
        }
        Outcome::Reset => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            stats.count_reason("coap reset".into());
        }
        Outcome::TimedOut | Outcome::Abandoned => {
            stats.unconfirmed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What an acknowledgement confirms.
pub struct Ack {
    pub record: AckRecord,
    pub readings: u64,
}

/// 2.04 Changed (telemetry stored), or the empty ACK of a notification (stored).
fn is_success(code: MessageClass) -> bool {
    matches!(
        code,
        MessageClass::Empty | MessageClass::Response(ResponseType::Changed)
    )
}

/// `POST /t/{id}` with the payload's Content-Format; proto has no CoAP content format, so it
/// goes as octet-stream with the format in the path, as the gateway asks.
pub fn telemetry_request(
    device_id: &str,
    format: Format,
    secret: Option<&str>,
    payload: Vec<u8>,
) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::Request(RequestType::Post);
    p.add_option(CoapOption::UriPath, b"t".to_vec());
    p.add_option(CoapOption::UriPath, device_id.as_bytes().to_vec());
    let content_format: u16 = match format {
        Format::Json => 50,
        Format::SenmlJson => 110,
        Format::SenmlCbor => 112,
        Format::Proto => {
            p.add_option(CoapOption::UriPath, b"proto".to_vec());
            42
        }
    };
    p.add_option(CoapOption::ContentFormat, uint(content_format.into()));
    if let Some(s) = secret {
        p.add_option(CoapOption::UriQuery, format!("t={s}").into_bytes());
    }
    p.payload = payload;
    p
}

/// A CoAP uint option value: big-endian, no leading zero bytes.
pub fn uint(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b[skip..].to_vec()
}

/// Runs one CoAP or CoAPS telemetry device until the run ends.
pub async fn run_device(dev: SimDevice, cred: Credential, ctx: Arc<DriverContext>) {
    tokio::time::sleep_until(ctx.connect_at(dev.index)).await;
    if Instant::now() >= ctx.end() {
        return;
    }
    let secure = dev.protocol == super::Protocol::Coaps;
    let Some(session) = open(&dev, &cred, secure, &ctx).await else {
        return;
    };
    let mut session = Some(session);
    let stats = &ctx.stats;
    stats.opened();
    let quantities = super::ack_log_quantities(&ctx.scenario.profiles[&dev.profile]);
    let device_id: Arc<str> = dev.id.as_str().into();
    let secret = (!secure).then_some(cred.secret.as_str());
    let mut sampler = Sampler::new(&dev, &ctx.scenario);
    let mut next = sampler.first_report();
    let give_up_at = ctx.end() + ctx.drain;
    // Nothing is served to the gateway on the telemetry path: its requests go unanswered.
    let mut ignore = |_: &Packet| None;
    let mut seq = 0;
    while next < ctx.end() {
        match &mut session {
            Some(s) => s.serve_until(next, &mut ignore).await,
            None => tokio::time::sleep_until(next).await,
        }
        // A lost DTLS session is handshaken again; a failed handshake is retried next report.
        if session.as_ref().is_none_or(Session::is_broken) {
            if session.take().is_some() {
                stats.disconnects.fetch_add(1, Ordering::Relaxed);
            }
            session = open(&dev, &cred, secure, &ctx).await;
        }
        let Some(s) = &mut session else {
            next = next_report(next, dev.interval, Instant::now());
            continue;
        };
        let ts_s = sampler.sample();
        let payload = dev.format.encode(&dev.id, ts_s, seq, &sampler.values);
        seq += 1;
        let req = telemetry_request(&dev.id, dev.format, secret, payload);
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let sent_at = Instant::now();
        let outcome = s.exchange(req, give_up_at, &mut ignore).await;
        let ack = Ack {
            record: AckRecord {
                device_id: device_id.clone(),
                device_time_ms: ts_s * 1000,
                quantities: quantities.clone(),
            },
            readings: sampler.values.len() as u64,
        };
        record(&ctx, outcome, sent_at, ack);
        next = next_report(next, dev.interval, Instant::now());
    }
    if let Some(s) = session {
        s.close().await;
    }
    stats.closed();
}

/// The next report time after `last`: intervals that passed while an exchange was still
/// retransmitting (NSTART = 1) are skipped, as a device busy sending would skip them.
pub fn next_report(last: Instant, interval: Duration, now: Instant) -> Instant {
    let mut next = last + interval;
    while next <= now {
        next += interval;
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_requests_name_their_format() {
        let p = telemetry_request("d1", Format::SenmlCbor, Some("s3"), vec![1]);
        let p = Packet::from_bytes(&p.to_bytes().unwrap()).unwrap();
        let path: Vec<_> = p.get_option(CoapOption::UriPath).unwrap().iter().collect();
        assert_eq!(path, [b"t".as_slice(), b"d1"]);
        assert_eq!(
            p.get_first_option(CoapOption::ContentFormat),
            Some(&vec![112])
        );
        assert_eq!(
            p.get_first_option(CoapOption::UriQuery),
            Some(&b"t=s3".to_vec())
        );

        let p = telemetry_request("d1", Format::Proto, None, vec![]);
        assert_eq!(p.get_option(CoapOption::UriPath).unwrap().len(), 3);
        assert_eq!(
            p.get_first_option(CoapOption::ContentFormat),
            Some(&vec![42])
        );
        assert!(p.get_option(CoapOption::UriQuery).is_none());
        assert_eq!(uint(0), Vec::<u8>::new());
        assert_eq!(uint(11542), vec![0x2d, 0x16]);
    }

    #[test]
    fn success_is_changed_or_an_empty_ack() {
        use coap_lite::ResponseType as R;
        assert!(is_success(MessageClass::Response(R::Changed)));
        assert!(!is_success(MessageClass::Response(R::Content)));
        assert!(is_success(MessageClass::Empty));
        assert!(!is_success(MessageClass::Response(R::Unauthorized)));
        assert!(!is_success(MessageClass::Response(R::ServiceUnavailable)));
    }

    #[test]
    fn busy_intervals_are_skipped() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(next_report(t0, s, t0), t0 + s);
        assert_eq!(next_report(t0, s, t0 + s * 3), t0 + s * 4);
    }
}
