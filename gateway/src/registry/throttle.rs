//! Back-off of failed authentication, so guessing a secret or a token is slow and cheap to refuse,
//! without locking the real device out.
//!
//! Three tallies of failures, each forgotten `backoff_max` after its last failure:
//!
//! - **source and device** (an address trying one device's secret): after `max_failures` the
//!   pair waits `backoff_initial · 2^k` (up to `backoff_max`) between attempts. An attacker
//!   guessing device X from address A is slowed; device X itself, from its own address B, is not.
//! - **source** (an address, IPv6 by /64, failing for any device or token): after
//!   `source_max_failures` the whole address backs off. Set well above `max_failures`: a carrier
//!   NAT puts many honest devices behind one address.
//! - **device** (failures for one device from any address, a spread-out attack): after
//!   `device_max_failures` the device is *guarded*: the address it last authenticated from is
//!   always heard; any other address gets one try per back-off step.
//!
//! Refused attempts are not verified (no Argon2 run, no store read) and do not count as failures.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `[auth]`: back-off of failed authentication.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Failures of one address against one device (or token) before it backs off; 0 disables
    /// the whole throttle.
    pub max_failures: u32,
    /// Failures of one address against anything before the address backs off.
    pub source_max_failures: u32,
    /// Failures against one device from any address before the device is guarded.
    pub device_max_failures: u32,
    /// First wait after the limit; doubles with every further failure.
    pub backoff_initial_ms: u64,
    /// Longest wait; a tally is forgotten this long after its last failure.
    pub backoff_max_secs: u64,
    /// Log lines about refused authentication per minute and protocol; the rest is counted
    /// and summarised.
    pub log_lines_per_minute: u32,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            max_failures: 5,
            source_max_failures: 100,
            device_max_failures: 20,
            backoff_initial_ms: 1000,
            backoff_max_secs: 900,
            log_lines_per_minute: 60,
        }
    }
}

/// Entries kept per tally; beyond, the stalest are dropped first.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    /// The /64 prefix: one subscriber's network.
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Tally {
    failures: u32,
    last: Instant,
    /// No attempt before this (zero while under the limit).
    wait_until: Option<Instant>,
}

impl Tally {
    fn new(now: Instant) -> Self {
        Tally {
            failures: 0,
            last: now,
            wait_until: None,
        }
    }
}

#[derive(Debug, Default)]
struct DeviceState {
    tally: Option<Tally>,
    /// Where the device last authenticated from.
    known_source: Option<Source>,
    /// While guarded: the next time an unknown address may try.
    next_stranger: Option<Instant>,
}

/// Why an attempt was refused without being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub retry_after: Duration,
    /// "pair", "source" or "device": which tally refused it.
    pub scope: &'static str,
}

#[derive(Default)]
struct State {
    pairs: HashMap<(Source, String), Tally>,
    sources: HashMap<Source, Tally>,
    devices: HashMap<String, DeviceState>,
}

pub struct AuthThrottle {
    cfg: ThrottleConfig,
    state: Mutex<State>,
}

impl AuthThrottle {
    pub fn new(cfg: ThrottleConfig) -> Self {
        Self {
            cfg,
            state: Mutex::default(),
        }
    }

    pub fn config(&self) -> &ThrottleConfig {
        &self.cfg
    }

    fn enabled(&self) -> bool {
        self.cfg.max_failures > 0
    }

    fn backoff(&self, failures: u32, limit: u32) -> Duration {
        let steps = failures.saturating_sub(limit).min(30);
        let wait = Duration::from_millis(self.cfg.backoff_initial_ms).saturating_mul(1 << steps);
        wait.min(self.max())
    }

    fn max(&self) -> Duration {
        Duration::from_secs(self.cfg.backoff_max_secs)
    }

    /// Whether an attempt from `source` (for `device`, a registered device id; None for a
    /// token) may be checked now.
    pub fn check(&self, source: IpAddr, device: Option<&str>) -> Result<(), Throttled> {
        self.check_at(source, device, Instant::now())
    }

    fn check_at(&self, ip: IpAddr, device: Option<&str>, now: Instant) -> Result<(), Throttled> {
        if !self.enabled() {
            return Ok(());
        }
        let source = Source::from(ip);
        let mut st = self.state.lock().expect("throttle lock");
        let waiting = |t: Option<&Tally>| t.and_then(|t| t.wait_until).filter(|w| *w > now);
        if let Some(w) = waiting(st.sources.get(&source)) {
            return Err(Throttled {
                retry_after: w - now,
                scope: "source",
            });
        }
        let Some(device) = device else {
            return Ok(());
        };
        if let Some(w) = waiting(st.pairs.get(&(source, device.to_string()))) {
            return Err(Throttled {
                retry_after: w - now,
                scope: "pair",
            });
        }
        let guard_limit = self.cfg.device_max_failures;
        let step = self.backoff(guard_limit + 1, guard_limit);
        if let Some(d) = st.devices.get_mut(device) {
            let guarded = d
                .tally
                .is_some_and(|t| t.failures >= guard_limit && now - t.last < self.max());
            if guarded && d.known_source != Some(source) {
                match d.next_stranger {
                    Some(next) if next > now => {
                        return Err(Throttled {
                            retry_after: next - now,
                            scope: "device",
                        })
                    }
                    _ => d.next_stranger = Some(now + step),
                }
            }
        }
        Ok(())
    }

    /// Records a failed attempt; `device` is a registered device id (unknown ids are counted by
    /// address only, so invented ids cannot grow the tables).
    pub fn failed(&self, ip: IpAddr, device: Option<&str>) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let source = Source::from(ip);
        let mut st = self.state.lock().expect("throttle lock");
        self.sweep(&mut st, now);
        let max = self.max();
        let bump = |t: &mut Tally, limit: u32| {
            if now - t.last >= max {
                *t = Tally::new(now);
            }
            t.failures += 1;
            t.last = now;
            if t.failures >= limit {
                t.wait_until = Some(now + self.backoff(t.failures, limit));
            }
        };
        bump(
            st.sources.entry(source).or_insert_with(|| Tally::new(now)),
            self.cfg.source_max_failures.max(1),
        );
        if let Some(device) = device {
            bump(
                st.pairs
                    .entry((source, device.to_string()))
                    .or_insert_with(|| Tally::new(now)),
                self.cfg.max_failures,
            );
            let d = st.devices.entry(device.to_string()).or_default();
            // The device tally only guards; its own waits are per address (`next_stranger`).
            let t = d.tally.get_or_insert_with(|| Tally::new(now));
            if now - t.last >= max {
                *t = Tally::new(now);
            }
            t.failures += 1;
            t.last = now;
        }
    }

    /// Records a successful authentication: the address becomes the device's known one, and
    /// the pair's tally is cleared (the secret was right).
    pub fn succeeded(&self, ip: IpAddr, device: &str) {
        if !self.enabled() {
            return;
        }
        let source = Source::from(ip);
        let mut st = self.state.lock().expect("throttle lock");
        st.pairs.remove(&(source, device.to_string()));
        if let Some(d) = st.devices.get_mut(device) {
            d.known_source = Some(source);
        } else if st.devices.len() < MAX_ENTRIES {
            // Remembered only while there is room: the known address matters under attack,
            // when the device has an entry anyway.
            st.devices.insert(
                device.to_string(),
                DeviceState {
                    known_source: Some(source),
                    ..Default::default()
                },
            );
        }
    }

    /// Forgets stale tallies; when a table is still full, drops its stalest entries.
    fn sweep(&self, st: &mut State, now: Instant) {
        let max = self.max();
        let full = st.pairs.len() >= MAX_ENTRIES
            || st.sources.len() >= MAX_ENTRIES
            || st.devices.len() >= MAX_ENTRIES;
        if !full {
            return;
        }
        st.pairs.retain(|_, t| now - t.last < max);
        st.sources.retain(|_, t| now - t.last < max);
        st.devices
            .retain(|_, d| d.tally.is_some_and(|t| now - t.last < max));
        for_each_oldest(&mut st.pairs, |t| t.last);
        for_each_oldest(&mut st.sources, |t| t.last);
    }
}

/// Halves a still-full table, oldest first.
fn for_each_oldest<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    last: impl Fn(&V) -> Instant,
) {
    if map.len() < MAX_ENTRIES {
        return;
    }
    let mut times: Vec<Instant> = map.values().map(&last).collect();
    times.sort_unstable();
    let cut = times[times.len() / 2];
    map.retain(|_, v| last(v) > cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> AuthThrottle {
        AuthThrottle::new(ThrottleConfig {
            max_failures: 3,
            source_max_failures: 10,
            device_max_failures: 6,
            backoff_initial_ms: 1000,
            backoff_max_secs: 60,
            log_lines_per_minute: 60,
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn an_attacker_backs_off_and_the_device_elsewhere_does_not() {
        let t = throttle();
        for _ in 0..3 {
            assert!(t.check(A, Some("x")).is_ok());
            t.failed(A, Some("x"));
        }
        let refused = t.check(A, Some("x")).unwrap_err();
        assert_eq!(refused.scope, "pair");
        assert!(refused.retry_after > Duration::from_millis(900));
        // The same address may still try other devices, and the device other addresses.
        assert!(t.check(A, Some("y")).is_ok());
        assert!(t.check(B, Some("x")).is_ok());
    }

    #[test]
    fn waits_double_up_to_the_maximum() {
        let t = throttle();
        assert_eq!(t.backoff(3, 3), Duration::from_secs(1));
        assert_eq!(t.backoff(5, 3), Duration::from_secs(4));
        assert_eq!(t.backoff(40, 3), Duration::from_secs(60));
    }

    #[test]
    fn a_noisy_address_backs_off_for_everything() {
        let t = throttle();
        for i in 0..10 {
            t.failed(A, Some(&format!("d{i}")));
        }
        assert_eq!(t.check(A, Some("fresh")).unwrap_err().scope, "source");
        assert_eq!(t.check(A, None).unwrap_err().scope, "source");
        assert!(t.check(B, None).is_ok());
    }

    #[test]
    fn a_guarded_device_hears_its_known_address_and_rations_strangers() {
        let t = throttle();
        t.succeeded(B, "x");
        // A spread-out attack: many addresses, two failures each.
        for i in 0..3u8 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, i));
            t.failed(ip, Some("x"));
            t.failed(ip, Some("x"));
        }
        assert!(t.check(B, Some("x")).is_ok(), "the device's own address");
        let stranger = IpAddr::V4(std::net::Ipv4Addr::new(10, 2, 0, 1));
        assert!(
            t.check(stranger, Some("x")).is_ok(),
            "one stranger per step"
        );
        let other = IpAddr::V4(std::net::Ipv4Addr::new(10, 2, 0, 2));
        assert_eq!(t.check(other, Some("x")).unwrap_err().scope, "device");
    }

    #[test]
    fn success_clears_the_pair_and_ipv6_counts_by_prefix() {
        let t = throttle();
        for _ in 0..3 {
            t.failed(A, Some("x"));
        }
        t.succeeded(A, "x");
        assert!(t.check(A, Some("x")).is_ok());
        let a: IpAddr = "2001:db8:1:2::10".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::20".parse().unwrap();
        assert_eq!(Source::from(a), Source::from(b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::from(mapped), Source::from(A));
    }

    #[test]
    fn zero_disables() {
        let t = AuthThrottle::new(ThrottleConfig {
            max_failures: 0,
            ..Default::default()
        });
        for _ in 0..1000 {
            t.failed(A, Some("x"));
        }
        assert!(t.check(A, Some("x")).is_ok());
    }
}
