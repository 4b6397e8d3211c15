//! `citygw.v1.Telemetry`: the agency API (live subscriptions, history, devices), per-agency
//! scopes enforced on every call.

mod history;
mod pages;
mod routes;
mod scope;
mod subscribe;

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::proto::telemetry_server::Telemetry;
use crate::proto::*;
use crate::registry::agencies::{Agencies, Agency};
use crate::registry::Registry;
use crate::store::Store;
pub use pages::PageCache;
pub use routes::TelemetryRoutes;
use scope::Selection;
pub use subscribe::RESUME_TRAILER;

const DEFAULT_DEVICE_PAGE: usize = 1000;
const MAX_DEVICE_PAGE: usize = 10_000;

pub struct TelemetryService {
    pub store: Store,
    pub pages: Arc<pages::PageCache>,
    pub registry: Registry,
    pub agencies: Agencies,
    pub subscription_buffer: usize,
    pub kpi: crate::kpi::Kpi,
}

/// Resolves `authorization: Bearer <agency token>` to the agency, for the handlers.
#[derive(Clone)]
pub struct AgencyAuth {
    pub agencies: Agencies,
    /// For the back-off of failed tokens.
    pub registry: crate::registry::Registry,
}

impl AgencyAuth {
    fn agency<T>(&self, request: &Request<T>) -> Result<Arc<Agency>, Status> {
        super::auth::check_token(
            request,
            "telemetry",
            "unknown agency token",
            &self.registry,
            |token| self.agencies.authenticate(token),
        )
    }
}

impl tonic::service::Interceptor for AgencyAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let agency = self.agency(&request)?;
        request.extensions_mut().insert(agency);
        Ok(request)
    }
}

fn agency<T>(req: &Request<T>) -> Result<Arc<Agency>, Status> {
    req.extensions()
        .get::<Arc<Agency>>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no agency on this call"))
}

fn observe(method: &'static str, started: Instant) {
    metrics::histogram!("citygw_query_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
}

impl TelemetryService {
    async fn subscribe_encoded(
        &self,
        agency: Arc<Agency>,
        r: SubscribeRequest,
        framing: subscribe::Framing,
    ) -> Result<subscribe::EncodedStream, Status> {
        let selection = Selection::new(&agency, r.filter, &self.registry)?;
        tracing::info!(agency = %agency.name, resume = ?r.resume, ?framing, "subscription started");
        subscribe::Subscription {
            store: self.store.clone(),
            pages: self.pages.clone(),
            agencies: self.agencies.clone(),
            agency,
            selection,
            buffer: self.subscription_buffer,
            framing,
        }
        .start(r.resume)
        .await
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    type SubscribeStream = subscribe::ReadingStream;
    type SubscribeBatchesStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<ReadingBatch, Status>> + Send>>;
    type QueryHistoryStream = subscribe::ReadingStream;

    /// Never reached: [`TelemetryRoutes`] serves Subscribe before the generated server sees it
    /// (see routes.rs for why); the generated trait still asks for the method.
    async fn subscribe(
        &self,
        _req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::internal("Subscribe is served by TelemetryRoutes"))
    }

    /// Never reached either: served by [`TelemetryRoutes`] like Subscribe.
    async fn subscribe_batches(
        &self,
        _req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeBatchesStream>, Status> {
        Err(Status::internal(
            "SubscribeBatches is served by TelemetryRoutes",
        ))
    }

    async fn query_history(
        &self,
        req: Request<HistoryRequest>,
    ) -> Result<Response<Self::QueryHistoryStream>, Status> {
        let started = Instant::now();
        let agency = agency(&req)?;
        let r = req.into_inner();
        if r.to_ms <= r.from_ms {
            return Err(Status::invalid_argument(
                "from_ms and to_ms are required, from_ms < to_ms",
            ));
        }
        let every = AggregateWindow::try_from(r.every)
            .map_err(|_| Status::invalid_argument("unknown aggregate window"))?;
        let selection = Selection::new(&agency, r.filter, &self.registry)?;
        let device_ids = self
            .registry
            .select("", usize::MAX, |d| selection.may_have_readings(d))
            .iter()
            .map(|d| d.id().to_string())
            .collect();
        let query = history::HistoryQuery {
            selection,
            device_ids,
            from_ms: r.from_ms,
            to_ms: r.to_ms,
            every,
            limit: r.limit as usize,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            history::run(store, query, tx);
            observe("query_history", started);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_devices(
        &self,
        req: Request<AgencyListDevicesRequest>,
    ) -> Result<Response<AgencyListDevicesResponse>, Status> {
        let started = Instant::now();
        let agency = agency(&req)?;
        let r = req.into_inner();
        let selection = Selection::new(&agency, r.filter, &self.registry)?;
        let limit = match r.limit as usize {
            0 => DEFAULT_DEVICE_PAGE,
            n => n.min(MAX_DEVICE_PAGE),
        };
        let devices = self
            .registry
            .select(&r.after_id, limit, |d| selection.matches_device(d))
            .iter()
            .map(|d| d.to_proto())
            .collect();
        observe("list_devices", started);
        Ok(Response::new(AgencyListDevicesResponse { devices }))
    }

    async fn get_device(
        &self,
        req: Request<AgencyGetDeviceRequest>,
    ) -> Result<Response<Device>, Status> {
        let agency = agency(&req)?;
        let id = req.into_inner().id;
        // Unknown and out-of-scope look the same, so an agency cannot probe for device ids.
        match self.registry.get(&id) {
            Some(d) if agency.may_read_tenant(d.tenant()) && agency.may_read_kind(d.kind()) => {
                Ok(Response::new(d.to_proto()))
            }
            _ => Err(Status::permission_denied(format!(
                "device {id:?} is outside agency {:?}'s scope",
                agency.name
            ))),
        }
    }

    async fn get_connection_kpi(
        &self,
        req: Request<ConnectionKpiRequest>,
    ) -> Result<Response<ConnectionKpi>, Status> {
        let started = Instant::now();
        let agency = agency(&req)?;
        if !agency.kpi {
            metrics::counter!("citygw_api_denied_total", "api" => "telemetry").increment(1);
            return Err(Status::permission_denied(format!(
                "agency {:?} may not read the connections KPI",
                agency.name
            )));
        }
        let report = self
            .kpi
            .report_async(req.into_inner().city_code)
            .await
            .map_err(kpi_status)?;
        observe("get_connection_kpi", started);
        Ok(Response::new(report))
    }
}

pub(crate) fn kpi_status(e: crate::kpi::KpiError) -> Status {
    use crate::kpi::KpiError;
    match e {
        KpiError::UnknownCity(_) | KpiError::InvalidSnapshot(_) => {
            Status::invalid_argument(e.to_string())
        }
        KpiError::Store(e) => Status::unavailable(format!("store: {e}")),
    }
}
