//! The gRPC server on one port: the agency API (Telemetry), the admin API, the Control API
//! (commands to devices, alerts), standard health checking and server reflection (so grpcurl works
//! without the .proto files). Over TLS when `grpc.tls_cert_file` is set, optionally with agency
//! client certificates (mTLS); bearer tokens authorise either way.

mod admin;
mod auth;
mod control;
pub mod telemetry;

use std::net::SocketAddr;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;
use crate::proto::admin_server::AdminServer;
use crate::proto::control_server::ControlServer;
use crate::proto::telemetry_server::TelemetryServer;
use crate::registry::agencies::Agencies;
use crate::registry::Registry;

pub struct GrpcServer {
    pub listen: SocketAddr,
    pub admin_token: String,
    pub subscription_buffer: usize,
    pub registry: Registry,
    pub agencies: Agencies,
    pub operators: crate::registry::operators::Operators,
    pub pipeline: Pipeline,
    pub sinks: crate::sinks::Sinks,
    pub kpi: crate::kpi::Kpi,
    pub lwm2m: Option<std::sync::Arc<crate::sources::coap::lwm2m::Lwm2m>>,
    /// TLS, when configured (certificates reload with the others).
    pub tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    pub commands: crate::control::commands::Commands,
    pub alerts: crate::control::rules::Alerts,
}

impl GrpcServer {
    /// Binds now (so a taken port fails the start) and serves until `shutdown`.
    pub async fn start(
        self,
        shutdown: CancellationToken,
    ) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|e| anyhow::anyhow!("grpc listener {}: {e}", self.listen))?;
        tracing::info!(listen = %self.listen, tls = self.tls.is_some(), "grpc listening");
        let store = self.pipeline.store().clone();
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<AdminServer<admin::AdminService>>()
            .await;
        health_reporter
            .set_serving::<TelemetryServer<telemetry::TelemetryService>>()
            .await;
        health_reporter
            .set_serving::<ControlServer<control::ControlService>>()
            .await;
        // Both reflection versions: grpcurl speaks v1, many clients (grpcio-reflection) v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let control = ControlServer::with_interceptor(
            control::ControlService {
                commands: self.commands,
                alerts: self.alerts,
                registry: self.registry.clone(),
            },
            control::ControlAuth {
                admin_token: self.admin_token.as_str().into(),
                agencies: self.agencies.clone(),
                registry: self.registry.clone(),
            },
        );
        let admin = AdminServer::with_interceptor(
            admin::AdminService {
                registry: self.registry.clone(),
                agencies: self.agencies.clone(),
                operators: self.operators,
                store: store.clone(),
                sinks: self.sinks,
                kpi: self.kpi.clone(),
                lwm2m: self.lwm2m,
            },
            auth::BearerToken::new(self.admin_token, self.registry.clone()),
        );
        let auth = telemetry::AgencyAuth {
            agencies: self.agencies.clone(),
            registry: self.registry.clone(),
        };
        let service = std::sync::Arc::new(telemetry::TelemetryService {
            pages: std::sync::Arc::new(telemetry::PageCache::new(store.clone())),
            store,
            registry: self.registry,
            agencies: self.agencies,
            subscription_buffer: self.subscription_buffer,
            kpi: self.kpi,
        });
        let telemetry = telemetry::TelemetryRoutes {
            generated: tonic::service::interceptor::InterceptedService::new(
                TelemetryServer::from_arc(service.clone()),
                auth.clone(),
            ),
            service,
            auth,
        };
        let router = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(admin)
            .add_service(telemetry)
            .add_service(control);
        let signal = shutdown.cancelled_owned();
        Ok(match self.tls {
            Some(tls) => {
                let incoming = crate::tls::incoming::TlsIncoming::new(listener, tls, true)?;
                async move {
                    router
                        .serve_with_incoming_shutdown(incoming.into_stream(), signal)
                        .await
                        .map_err(|e| anyhow::anyhow!("grpc server: {e}"))
                }
                .boxed()
            }
            None => {
                // Nagle's algorithm held small stream messages back ~9 ms per delivery (measured
                // with bench/agency_fanout); tonic sets TCP_NODELAY only on sockets of its own
                // TcpIncoming.
                let incoming = tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(std::time::Duration::from_secs(60)));
                async move {
                    router
                        .serve_with_incoming_shutdown(incoming, signal)
                        .await
                        .map_err(|e| anyhow::anyhow!("grpc server: {e}"))
                }
                .boxed()
            }
        })
    }
}
