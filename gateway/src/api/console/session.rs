//! Console sessions: who signed in, for how long, and the CSRF token their writes must carry.
//!
//! Signing in trades the admin token or an operator token for a random session id in an
//! `HttpOnly; SameSite=Strict` cookie, so the token itself is typed once and never kept by the
//! browser's scripts. Sessions live in memory only (a restart signs everyone out) and end at
//! `console.session_hours` after sign-in, after `console.idle_minutes` without a request, when the
//! operator is removed, or when `console.max_sessions` is reached (the oldest goes first). Only a
//! SHA-256 of each session id is held, so a memory dump does not hand out live sessions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest, Sha256};

use crate::config::ConsoleConfig;
use crate::registry::operators::{Operator, Operators};
use crate::registry::secret::constant_time_eq;

pub const COOKIE: &str = "citygw_session"; // not a metric
/// Failed sign-ins from one address within [`FAILURE_WINDOW`] before it must wait.
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are remembered at once (a spoofing flood cannot grow it further).
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// Who a session belongs to.
#[derive(Debug, Clone)]
pub enum Principal {
    Admin,
    Operator(Arc<Operator>),
}

impl Principal {
    pub fn role(&self) -> &'static str {
        match self {
            Principal::Admin => "admin",
            Principal::Operator(_) => "operator",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Operator(o) => &o.name,
        }
    }

    pub fn may_change(&self) -> bool {
        matches!(self, Principal::Admin)
    }
}

/// What a request learns about its session.
#[derive(Debug, Clone)]
pub struct Session {
    pub principal: Principal,
    pub csrf: String,
}

struct Entry {
    session: Session,
    created: Instant,
    last_used: Instant,
}

#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    lifetime: Duration,
    idle: Duration,
    max: usize,
    admin_token: String,
    operators: Operators,
    by_id: Mutex<HashMap<[u8; 32], Entry>>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Why a sign-in was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SignInError {
    WrongToken,
    /// Too many failures from this address; retry after this long.
    Throttled(Duration),
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn id_hash(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    pub fn new(cfg: &ConsoleConfig, admin_token: String, operators: Operators) -> Sessions {
        Sessions {
            inner: Arc::new(Inner {
                lifetime: Duration::from_secs(cfg.session_hours * 3600),
                idle: Duration::from_secs(cfg.idle_minutes * 60),
                max: cfg.max_sessions,
                admin_token,
                operators,
                by_id: Mutex::new(HashMap::new()),
                failures: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.inner.lifetime
    }

    /// Trades a token for a new session id (the cookie value) and its session.
    pub fn sign_in(&self, token: &str, from: IpAddr) -> Result<(String, Session), SignInError> {
        let now = Instant::now();
        if let Some(wait) = self.throttled(from, now) {
            return Err(SignInError::Throttled(wait));
        }
        let token = token.trim();
        let principal = if !token.is_empty()
            && constant_time_eq(token.as_bytes(), self.inner.admin_token.as_bytes())
        {
            Principal::Admin
        } else if let Some(op) = self.inner.operators.authenticate(token) {
            Principal::Operator(op)
        } else {
            self.failed(from, now);
            return Err(SignInError::WrongToken);
        };
        let id = random_token();
        let session = Session {
            principal,
            csrf: random_token(),
        };
        let mut sessions = self.inner.by_id.lock().expect("sessions lock");
        self.expire(&mut sessions, now);
        if sessions.len() >= self.inner.max {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, e)| e.created)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                sessions.remove(&k);
            }
        }
        sessions.insert(
            id_hash(&id),
            Entry {
                session: session.clone(),
                created: now,
                last_used: now,
            },
        );
        Ok((id, session))
    }

    /// The live session of a cookie value, marked as used now.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let key = id_hash(id);
        let mut sessions = self.inner.by_id.lock().expect("sessions lock");
        let entry = sessions.get_mut(&key)?;
        let revoked = match &entry.session.principal {
            Principal::Admin => false,
            Principal::Operator(op) => !self.inner.operators.is_current(op),
        };
        if revoked || !self.alive(entry, now) {
            sessions.remove(&key);
            return None;
        }
        entry.last_used = now;
        Some(entry.session.clone())
    }

    pub fn sign_out(&self, id: &str) {
        self.inner
            .by_id
            .lock()
            .expect("sessions lock")
            .remove(&id_hash(id));
    }

    /// Sessions held now (expired ones dropped first).
    pub fn count(&self) -> usize {
        let mut sessions = self.inner.by_id.lock().expect("sessions lock");
        self.expire(&mut sessions, Instant::now());
        sessions.len()
    }

    fn alive(&self, e: &Entry, now: Instant) -> bool {
        now.duration_since(e.created) < self.inner.lifetime
            && now.duration_since(e.last_used) < self.inner.idle
    }

    fn expire(&self, sessions: &mut HashMap<[u8; 32], Entry>, now: Instant) {
        sessions.retain(|_, e| self.alive(e, now));
    }

    fn throttled(&self, from: IpAddr, now: Instant) -> Option<Duration> {
        let failures = self.inner.failures.lock().expect("failures lock");
        let &(since, n) = failures.get(&from)?;
        let elapsed = now.duration_since(since);
        (n >= MAX_FAILURES && elapsed < FAILURE_WINDOW).then(|| FAILURE_WINDOW - elapsed)
    }

    fn failed(&self, from: IpAddr, now: Instant) {
        let mut failures = self.inner.failures.lock().expect("failures lock");
        if failures.len() >= MAX_TRACKED_ADDRESSES {
            failures.retain(|_, (since, _)| now.duration_since(*since) < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED_ADDRESSES {
                failures.clear();
            }
        }
        let entry = failures.entry(from).or_insert((now, 0));
        if now.duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// The session id in a `Cookie` header, if any.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` for a new session; `Secure` when the console is served over TLS.
pub fn set_cookie(id: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    set_cookie("", Duration::ZERO, secure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn sessions(cfg: ConsoleConfig) -> (Sessions, Operators, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        let ops = Operators::load(store, &[]).unwrap();
        (
            Sessions::new(&cfg, "admin-token".into(), ops.clone()),
            ops,
            dir,
        )
    }

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn tokens_sign_in_with_their_role_and_revocation_ends_sessions() {
        let (s, ops, _dir) = sessions(ConsoleConfig::default());
        let (id, admin) = s.sign_in(" admin-token\n", HOME).unwrap();
        assert!(admin.principal.may_change());
        assert_eq!(s.get(&id).unwrap().csrf, admin.csrf);
        assert_eq!(s.sign_in("", HOME).unwrap_err(), SignInError::WrongToken);
        assert_eq!(
            s.sign_in("admin-token2", HOME).unwrap_err(),
            SignInError::WrongToken
        );

        let (_, token) = ops.add("lan", 0).await.unwrap();
        let (op_id, op) = s.sign_in(&token, HOME).unwrap();
        assert_eq!(
            (op.principal.role(), op.principal.name()),
            ("operator", "lan")
        );
        assert!(!op.principal.may_change());
        ops.remove("lan").await.unwrap();
        assert!(s.get(&op_id).is_none(), "revoked operator's session ends");
        s.sign_out(&id);
        assert!(s.get(&id).is_none());
        assert!(s.get("forged").is_none());
    }

    #[test]
    fn sessions_expire_and_the_oldest_makes_room() {
        let cfg = ConsoleConfig {
            max_sessions: 2,
            ..Default::default()
        };
        let (s, _ops, _dir) = sessions(cfg);
        let (a, _) = s.sign_in("admin-token", HOME).unwrap();
        let (b, _) = s.sign_in("admin-token", HOME).unwrap();
        let (c, _) = s.sign_in("admin-token", HOME).unwrap();
        assert!(s.get(&a).is_none() && s.get(&b).is_some() && s.get(&c).is_some());
        assert_eq!(s.count(), 2);

        let (s, _ops, _dir) = sessions(ConsoleConfig::default());
        let (a, _) = s.sign_in("admin-token", HOME).unwrap();
        // Age the session past its idle limit.
        for e in s.inner.by_id.lock().unwrap().values_mut() {
            e.last_used -= Duration::from_secs(3601);
        }
        assert!(s.get(&a).is_none());
    }

    #[test]
    fn repeated_failures_from_one_address_are_throttled_not_others() {
        let (s, _ops, _dir) = sessions(ConsoleConfig::default());
        let attacker: IpAddr = "127.0.0.9".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert_eq!(
                s.sign_in("guess", attacker).unwrap_err(),
                SignInError::WrongToken
            );
        }
        assert!(matches!(
            s.sign_in("admin-token", attacker),
            Err(SignInError::Throttled(_))
        ));
        assert!(s.sign_in("admin-token", HOME).is_ok());
    }

    #[test]
    fn cookies() {
        assert_eq!(cookie_value("a=1; citygw_session=xyz; b=2"), Some("xyz"));
        assert_eq!(cookie_value("citygw_session="), None);
        assert_eq!(cookie_value("other=1"), None);
        let c = set_cookie("xyz", Duration::from_secs(60), true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.ends_with("Secure"));
        assert!(!clear_cookie(false).contains("Secure"));
    }
}
