//! Ways out: gRPC (admin now, agencies next), HTTP (metrics, health) and the operator console
//! served on the HTTP listener.

pub mod console;
pub mod grpc;
pub mod http;
