//! The bad-input modes over CoAP (`?t=` access token) and CoAPS (DTLS 1.2 PSK session), with
//! the drivers' exchange and DTLS client. Every attempt is a confirmable request from a socket of
//! its own, up to [`PARALLEL`] at a time, so a refusal that takes the gateway's whole handshake
//! timeout does not make the run that many times longer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use coap_lite::{CoapOption, Packet};
use tokio::sync::{Barrier, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Attacks, BadArgs, Mode, Roles, Via, CONTROL_READING, MALFORMED_JSON};
use crate::credentials::Credential;
use crate::drivers::coap::dtls::DtlsClient;
use crate::drivers::coap::exchange::Outcome;
use crate::drivers::coap::session::{self, Link, Session};
use crate::drivers::coap::{resolve, telemetry_request, uint};
use crate::format::Format;

/// Attempts in flight at once (the storm sends all of them together instead).
const PARALLEL: usize = 64;
/// Block1 SZX 6: 1,024-byte blocks.
const BLOCK_SZX: u32 = 6;
const BLOCK_BYTES: usize = 1024;

/// Sends `args.count` attempts of the mode's bad input; the answers by name.
pub async fn attack(args: &BadArgs, roles: &Roles) -> anyhow::Result<Attacks> {
    let target = Arc::new(Target::new(args).await?);
    let n = args.count;
    let storm = args.mode == Mode::Storm;
    let permits = Arc::new(Semaphore::new(if storm { n.max(1) } else { PARALLEL }));
    // The storm's attempts start together, once every task is ready.
    let barrier = Arc::new(Barrier::new(if storm { n + 1 } else { 1 }));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let attempt = attempt(args.mode, i, roles, args.max_payload_bytes());
        let (target, permits, barrier) = (target.clone(), permits.clone(), barrier.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            if storm {
                barrier.wait().await;
            }
            target.post(&attempt, i as u64).await
        });
    }
    if storm {
        barrier.wait().await;
    }
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(answer) = tasks.join_next().await {
        *answers.entry(answer?).or_default() += 1;
    }
    Ok(Attacks {
        answers,
        storm_peak: None,
    })
}

/// A good device posts once after the bad input; true when it is acknowledged (2.04).
pub async fn control(args: &BadArgs, control: &Credential) -> bool {
    let Ok(target) = Target::new(args).await else {
        return false;
    };
    let attempt = Attempt {
        session_as: control.clone(),
        path_device: control.id.clone(),
        payload: CONTROL_READING.to_vec(),
        declared_size: None,
    };
    target.post(&attempt, u64::MAX).await == "coap 2.04"
}

/// One request: who opens the session (token or PSK), which device's path it posts to, what.
struct Attempt {
    session_as: Credential,
    path_device: String,
    payload: Vec<u8>,
    /// Size1 of a Block1 transfer's first block (the oversize mode).
    declared_size: Option<usize>,
}

fn attempt(mode: Mode, i: usize, roles: &Roles, max_payload: usize) -> Attempt {
    let mut c = roles.attacker(i);
    let mut a = Attempt {
        session_as: c.clone(),
        path_device: c.id.clone(),
        payload: CONTROL_READING.to_vec(),
        declared_size: None,
    };
    match mode {
        Mode::WrongCredentials => {
            c.secret = format!("wrong-{}", c.secret.len() + i);
            c.psk = c.psk.map(|k| k.iter().map(|b| b ^ 0x5a).collect());
            a.session_as = c;
        }
        Mode::UnknownDevice => {
            c.id = format!("no-such-device-{i}");
            c.secret = "x".into();
            c.psk = Some(vec![7u8; 16]);
            a.path_device = c.id.clone();
            a.session_as = c;
        }
        Mode::SpoofedTopic => a.path_device = roles.victim.id.clone(),
        Mode::Malformed => a.payload = MALFORMED_JSON.to_vec(),
        Mode::Oversize => {
            a.payload = vec![b' '; BLOCK_BYTES];
            a.declared_size = Some(max_payload + 1);
        }
        Mode::Storm => {}
    }
    a
}

struct Target {
    gateway: SocketAddr,
    /// Set for CoAPS.
    dtls: Option<DtlsClient>,
    timeout: Duration,
}

impl Target {
    async fn new(args: &BadArgs) -> anyhow::Result<Self> {
        let (flag, addr) = match args.protocol {
            Via::Coaps => ("--coaps", &args.coaps),
            _ => ("--coap", &args.coap),
        };
        let gateway = resolve(flag, addr).await?;
        let dtls = match args.protocol {
            Via::Coaps => Some(DtlsClient::new().context("DTLS client context")?),
            _ => None,
        };
        Ok(Self {
            gateway,
            dtls,
            timeout: Duration::from_secs(args.timeout),
        })
    }

    /// Opens a session as `a.session_as`, posts, and names the answer ("coap 4.01", "dtls
    /// handshake failed", ...).
    async fn post(&self, a: &Attempt, seed: u64) -> String {
        let socket = match session::udp_socket(None, self.gateway).await {
            Ok(s) => s,
            Err(e) => return format!("udp socket error: {e}"),
        };
        let c = &a.session_as;
        let (link, secret) = match &self.dtls {
            None => (Link::udp(socket), Some(c.secret.as_str())),
            Some(client) => {
                let Some(psk) = &c.psk else {
                    return "no psk in the credentials".into();
                };
                match client.connect(socket, &c.id, psk, self.timeout).await {
                    Ok(l) => (Link::Dtls(Box::new(l)), None),
                    Err(e) => return e.reason().to_string(),
                }
            }
        };
        let mut session = Session::new(link, seed);
        let mut req = telemetry_request(&a.path_device, Format::Json, secret, a.payload.clone());
        if let Some(size) = a.declared_size {
            // Block 0 of a transfer announced as one byte over the limit.
            req.add_option(CoapOption::Block1, uint((1 << 3) | BLOCK_SZX));
            req.add_option(CoapOption::Size1, uint(size as u32));
        }
        let outcome = session
            .exchange(req, Instant::now() + self.timeout, &mut |_: &Packet| None)
            .await;
        session.close().await;
        match outcome {
            Outcome::Answer(p) => format!("coap {}", p.header.code),
            Outcome::Reset => "coap reset".into(),
            Outcome::TimedOut | Outcome::Abandoned => "no answer".into(),
        }
    }
}
