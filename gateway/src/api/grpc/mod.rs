//! The gRPC server on one port: the admin service and standard health checking.

mod admin;
mod auth;

use std::net::SocketAddr;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;
use crate::proto::admin_server::AdminServer;
use crate::registry::Registry;

pub struct GrpcServer {
    pub listen: SocketAddr,
    pub admin_token: String,
    pub registry: Registry,
    pub pipeline: Pipeline,
}

impl GrpcServer {
    /// Binds now (so a taken port fails the start) and serves until `shutdown`.
    pub async fn start(self, shutdown: CancellationToken) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|e| anyhow::anyhow!("grpc listener {}: {e}", self.listen))?;
        tracing::info!(listen = %self.listen, "grpc listening");
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<AdminServer<admin::AdminService>>().await;
        let admin = AdminServer::with_interceptor(
            admin::AdminService { registry: self.registry, store: self.pipeline.store().clone() },
            auth::BearerToken::new(self.admin_token),
        );
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        Ok(async move {
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(admin)
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
                .map_err(|e| anyhow::anyhow!("grpc server: {e}"))
        }
        .boxed())
    }
}
