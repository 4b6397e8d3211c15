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

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = bearer(&request)?;
        if constant_time_eq(presented.as_bytes(), self.token.as_bytes()) {
            Ok(request)
        } else {
            metrics::counter!("citygw_api_auth_failures_total", "api" => "admin").increment(1);
            Err(Status::unauthenticated("invalid admin token"))
        }
    }
}
