//! Bearer-token check for gRPC services.

use tonic::{Request, Status};

use crate::registry::secret::constant_time_eq;

/// Accepts calls carrying `authorization: Bearer <token>` for exactly this token.
#[derive(Clone)]
pub struct BearerToken {
    token: std::sync::Arc<str>,
}

impl BearerToken {
    pub fn new(token: String) -> Self {
        Self {
            token: token.into(),
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

/// Counts a refused call of `api` (missing, malformed or unknown token alike).
pub fn refused(api: &'static str, status: Status) -> Status {
    metrics::counter!("citygw_api_auth_failures_total", "api" => api).increment(1);
    status
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = bearer(&request).map_err(|s| refused("admin", s))?;
        if constant_time_eq(presented.as_bytes(), self.token.as_bytes()) {
            Ok(request)
        } else {
            Err(refused(
                "admin",
                Status::unauthenticated("invalid admin token"),
            ))
        }
    }
}
