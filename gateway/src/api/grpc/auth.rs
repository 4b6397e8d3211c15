//! Bearer-token check for gRPC services, under the back-off of failed attempts per address.

use tonic::{Request, Status};

use crate::registry::secret::constant_time_eq;
use crate::registry::Registry;

/// Accepts calls carrying `authorization: Bearer <token>` for exactly this token.
#[derive(Clone)]
pub struct BearerToken {
    token: std::sync::Arc<str>,
    registry: Registry,
}

impl BearerToken {
    pub fn new(token: String, registry: Registry) -> Self {
        Self {
            token: token.into(),
            registry,
        }
    }
}

/// The token of `authorization: Bearer <token>`.
pub fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))
}

/// Counts a refused call of `api` (missing, malformed or unknown token, or throttled).
pub fn refused(api: &'static str, reason: &'static str, status: Status) -> Status {
    metrics::counter!("citygw_api_auth_failures_total", "api" => api, "reason" => reason)
        .increment(1);
    status
}

/// The caller's token, checked by `verify`: refused unchecked while the caller's address backs
/// off after too many failures (RESOURCE_EXHAUSTED), and every failure counted against it.
pub fn check_token<T, R>(
    request: &Request<T>,
    api: &'static str,
    unknown: &'static str,
    registry: &Registry,
    verify: impl FnOnce(&str) -> Option<R>,
) -> Result<R, Status> {
    let throttle = registry.throttle();
    let source = request.remote_addr().map(|a| a.ip());
    if let Some(ip) = source {
        if let Err(t) = throttle.check(ip, None) {
            return Err(refused(
                api,
                "throttled",
                Status::resource_exhausted(format!(
                    "too many failed authentications from this address; retry in {} s",
                    t.retry_after.as_secs().max(1)
                )),
            ));
        }
    }
    let failed = |reason, status| {
        if let Some(ip) = source {
            throttle.failed(ip, None);
        }
        refused(api, reason, status)
    };
    let token = bearer(request).map_err(|s| failed("missing", s))?;
    verify(token).ok_or_else(|| failed("invalid", Status::unauthenticated(unknown)))
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let token = self.token.clone();
        check_token(
            &request,
            "admin",
            "invalid admin token",
            &self.registry,
            |presented| constant_time_eq(presented.as_bytes(), token.as_bytes()).then_some(()),
        )?;
        Ok(request)
    }
}
