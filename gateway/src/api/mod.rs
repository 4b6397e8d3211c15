//! Ways out: gRPC (admin now, agencies next) and HTTP (metrics, health).

pub mod grpc;
pub mod http;
