//! `coap-load bare LISTEN`: the baseline, a bare coap-lite responder that answers every CON
//! request with a piggybacked 2.04 and does nothing else.
//!
//! `coap-load load TARGET SECRETS_CSV ENDPOINTS DURATION_S WARMUP_S`: one UDP socket per device
//! (an NB-IoT module), each sending CON `POST /t/{id}?t={secret}` with ~100 bytes of SenML JSON
//! and waiting for the ACK before the next (one exchange in flight per endpoint, as RFC 7252's
//! NSTART=1 asks). Prints one JSON object: requests answered 2.04 in the measured window, rate,
//! latency percentiles (request sent to ACK received), other codes and timeouts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::net::UdpSocket;

const ACK_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("bare") => bare(args[2].parse().expect("LISTEN address")).await,
        Some("load") => {
            let target: SocketAddr = args[2].parse().expect("TARGET address");
            let devices = read_secrets(&args[3]);
            let endpoints: usize = args[4].parse().expect("ENDPOINTS");
            let duration = Duration::from_secs_f64(args[5].parse().expect("DURATION_S"));
            let warmup = Duration::from_secs_f64(args[6].parse().expect("WARMUP_S"));
            load(target, devices, endpoints, duration, warmup).await
        }
        _ => {
            eprintln!("usage: coap-load bare LISTEN | coap-load load TARGET SECRETS_CSV ENDPOINTS DURATION_S WARMUP_S");
            std::process::exit(2);
        }
    }
}

async fn bare(listen: SocketAddr) {
    let socket = UdpSocket::bind(listen).await.expect("bind");
    let mut buf = vec![0u8; 65_535];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(req) = Packet::from_bytes(&buf[..n]) else {
            continue;
        };
        let mut resp = Packet::new();
        resp.header.set_type(MessageType::Acknowledgement);
        resp.header.message_id = req.header.message_id;
        resp.header.code = MessageClass::Response(ResponseType::Changed);
        resp.set_token(req.get_token().to_vec());
        if let Ok(bytes) = resp.to_bytes() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

fn read_secrets(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .expect("secrets csv")
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (id, secret) = l.split_once(',')?;
            Some((id.trim().to_string(), secret.trim().to_string()))
        })
        .collect()
}

/// ~100 bytes of SenML JSON, like an air-quality station's reading.
fn payload(seq: u64) -> Vec<u8> {
    format!(
        r#"[{{"n":"temperature","u":"Cel","v":{:.2}}},{{"n":"humidity","u":"%RH","v":{}}},{{"n":"pm2_5","v":12}}]"#,
        20.0 + (seq % 100) as f64 / 10.0,
        50 + seq % 40
    )
    .into_bytes()
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    ok: u64,
    other_codes: u64,
    timeouts: u64,
}

async fn load(
    target: SocketAddr,
    devices: Vec<(String, String)>,
    endpoints: usize,
    duration: Duration,
    warmup: Duration,
) {
    assert!(!devices.is_empty(), "no devices in the secrets file");
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for e in 0..endpoints {
        let (id, secret) = devices[e % devices.len()].clone();
        tasks.push(tokio::spawn(endpoint(
            target,
            id,
            secret,
            e as u16,
            start,
            measure_from,
            end,
        )));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.expect("endpoint task");
        all.latencies_us.extend(t.latencies_us);
        all.ok += t.ok;
        all.other_codes += t.other_codes;
        all.timeouts += t.timeouts;
    }
    all.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((all.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(all.latencies_us[i]) / 1000.0
    };
    let out = serde_json::json!({
        "endpoints": endpoints,
        "duration_s": duration.as_secs_f64(),
        "requests_ok": all.ok,
        "requests_per_s": all.ok as f64 / duration.as_secs_f64(),
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999), "max": pct(1.0)},
        "other_codes": all.other_codes,
        "timeouts": all.timeouts,
        "payload_bytes": payload(0).len(),
    });
    println!("{out}");
}

async fn endpoint(
    target: SocketAddr,
    id: String,
    secret: String,
    salt: u16,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    socket.connect(target).await.expect("connect");
    tokio::time::sleep_until(start.into()).await;
    let mut tally = Tally::default();
    let mut mid = salt.wrapping_mul(1000);
    let mut seq = 0u64;
    let mut buf = vec![0u8; 2048];
    while Instant::now() < end {
        mid = mid.wrapping_add(1);
        seq += 1;
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = mid;
        p.set_token(seq.to_be_bytes()[4..].to_vec());
        p.add_option(CoapOption::UriPath, b"t".to_vec());
        p.add_option(CoapOption::UriPath, id.as_bytes().to_vec());
        p.add_option(CoapOption::ContentFormat, vec![110]);
        p.add_option(CoapOption::UriQuery, format!("t={secret}").into_bytes());
        p.payload = payload(seq);
        let bytes = p.to_bytes().expect("request encodes");
        let sent = Instant::now();
        if socket.send(&bytes).await.is_err() {
            continue;
        }
        let answer = tokio::time::timeout(ACK_TIMEOUT, async {
            loop {
                let n = socket.recv(&mut buf).await.ok()?;
                match Packet::from_bytes(&buf[..n]) {
                    Ok(r) if r.header.message_id == mid => return Some(r.header.code),
                    _ => continue,
                }
            }
        })
        .await;
        let done = Instant::now();
        let measured = sent >= measure_from && done <= end;
        match answer {
            Ok(Some(MessageClass::Response(ResponseType::Changed))) => {
                if measured {
                    tally.ok += 1;
                    tally
                        .latencies_us
                        .push((done - sent).as_micros().min(u32::MAX as u128) as u32);
                }
            }
            Ok(_) => tally.other_codes += u64::from(measured),
            Err(_) => tally.timeouts += u64::from(measured),
        }
    }
    tally
}
