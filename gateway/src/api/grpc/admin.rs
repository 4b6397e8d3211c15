//! `citygw.v1.Admin`: provisioning, dead letters and read-back for operators.

use tonic::{Request, Response, Status};

use crate::pipeline::now_ms;
use crate::proto::admin_server::Admin;
use crate::proto::*;
use crate::registry::agencies::{Agencies, Agency};
use crate::registry::operators::{Operator, Operators};
use crate::registry::{NewDevice, Registry, RegistryError};
use crate::store::{Store, StoreError};

/// Page size when a request leaves `limit` at 0, and the most any page returns.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 100_000;
/// Devices in one import call; larger files are sent in several calls by the CLI.
const MAX_IMPORT: usize = 50_000;

pub struct AdminService {
    pub registry: Registry,
    pub agencies: Agencies,
    pub operators: Operators,
    pub store: Store,
    pub sinks: crate::sinks::Sinks,
    pub kpi: crate::kpi::Kpi,
    /// None when LwM2M is disabled.
    pub lwm2m: Option<std::sync::Arc<crate::sources::coap::lwm2m::Lwm2m>>,
}

fn agency_info(a: &Agency) -> AgencyInfo {
    AgencyInfo {
        name: a.name.clone(),
        tenants: a.tenants.clone(),
        kinds: a.kinds.clone(),
        kpi: a.kpi,
        control: a.control,
        from_config: a.from_config,
    }
}

fn operator_info(o: &Operator) -> OperatorInfo {
    OperatorInfo {
        name: o.name.clone(),
        created_time_ms: o.created_time_ms,
        from_config: o.from_config,
    }
}

fn limit(requested: u32) -> usize {
    match requested as usize {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    }
}

fn new_device(req: AddDeviceRequest) -> Result<NewDevice, Status> {
    let d = req
        .device
        .ok_or_else(|| Status::invalid_argument("device is required"))?;
    Ok(NewDevice {
        id: d.id,
        tenant: d.tenant,
        kind: d.kind,
        commune_code: d.commune_code,
        lat: d.lat,
        lon: d.lon,
        name: d.name,
        dev_eui: d.dev_eui,
        codec: d.codec,
        secret: Some(req.secret).filter(|s| !s.is_empty()),
        psk: if req.generate_psk {
            Some(crate::registry::psk::generate())
        } else {
            Some(req.psk).filter(|s| !s.is_empty())
        },
        cert_sha256: fingerprint(&d.cert_sha256)?,
    })
}

/// An optional certificate fingerprint: empty, or 64 hex digits.
fn fingerprint(text: &str) -> Result<Option<[u8; 32]>, Status> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    crate::tls::identity::parse_fingerprint(text)
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument("cert_sha256: 64 hex digits (':' separators allowed)")
        })
}

fn status(e: RegistryError) -> Status {
    match e {
        RegistryError::Exists(_) => Status::already_exists(e.to_string()),
        RegistryError::NotFound(_) => Status::not_found(e.to_string()),
        RegistryError::Invalid(_) => Status::invalid_argument(e.to_string()),
        RegistryError::Store(e) => store_status(e),
    }
}

fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "store error in admin api");
    Status::unavailable(format!("store: {e}"))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_device(
        &self,
        req: Request<AddDeviceRequest>,
    ) -> Result<Response<AddDeviceResponse>, Status> {
        let new = new_device(req.into_inner())?;
        let psk = new.psk.clone().unwrap_or_default();
        let (device, secret) = self.registry.add(new, now_ms()).await.map_err(status)?;
        tracing::info!(device = %device.id, tenant = %device.tenant, kind = %device.kind, "device added");
        Ok(Response::new(AddDeviceResponse {
            device: Some(device),
            secret,
            psk,
        }))
    }

    async fn import_devices(
        &self,
        req: Request<ImportDevicesRequest>,
    ) -> Result<Response<ImportDevicesResponse>, Status> {
        let rows = req.into_inner().devices;
        if rows.len() > MAX_IMPORT {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_IMPORT} devices per call"
            )));
        }
        let ids: Vec<String> = rows
            .iter()
            .map(|r| r.device.as_ref().map(|d| d.id.clone()).unwrap_or_default())
            .collect();
        let news = rows
            .into_iter()
            .map(new_device)
            .collect::<Result<Vec<_>, _>>()?;
        let psks: Vec<String> = news
            .iter()
            .map(|n| n.psk.clone().unwrap_or_default())
            .collect();
        let results = self.registry.import(news, now_ms()).await.map_err(status)?;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        tracing::info!(ok, failed = results.len() - ok, "devices imported");
        let results = ids
            .into_iter()
            .zip(psks)
            .zip(results)
            .map(|((device_id, psk), r)| match r {
                Ok((_, secret)) => ImportResult {
                    device_id,
                    ok: true,
                    error: String::new(),
                    secret,
                    psk,
                },
                Err(e) => ImportResult {
                    device_id,
                    ok: false,
                    error: e.to_string(),
                    secret: String::new(),
                    psk: String::new(),
                },
            })
            .collect();
        Ok(Response::new(ImportDevicesResponse { results }))
    }

    async fn list_devices(
        &self,
        req: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let r = req.into_inner();
        let devices = self
            .registry
            .list(&r.tenant, &r.kind, &r.after_id, limit(r.limit));
        Ok(Response::new(ListDevicesResponse { devices }))
    }

    async fn get_device(&self, req: Request<GetDeviceRequest>) -> Result<Response<Device>, Status> {
        let id = req.into_inner().id;
        let device = self
            .registry
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("device {id:?} not found")))?;
        Ok(Response::new(device.to_proto()))
    }

    async fn set_device_enabled(
        &self,
        req: Request<SetDeviceEnabledRequest>,
    ) -> Result<Response<Device>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.registry
                .set_enabled(&r.id, r.enabled)
                .await
                .map_err(status)?,
        ))
    }

    async fn set_device_certificate(
        &self,
        req: Request<SetDeviceCertificateRequest>,
    ) -> Result<Response<Device>, Status> {
        let r = req.into_inner();
        let pin = fingerprint(&r.cert_sha256)?;
        Ok(Response::new(
            self.registry
                .set_cert_pin(&r.id, pin)
                .await
                .map_err(status)?,
        ))
    }

    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let r = req.into_inner();
        let device = Some(r.device_id).filter(|d| !d.is_empty());
        let store = self.store.clone();
        let dead_letters = tokio::task::spawn_blocking(move || {
            store.dead_letters(device.as_deref(), r.after_id, limit(r.limit))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)?;
        Ok(Response::new(ListDeadLettersResponse { dead_letters }))
    }

    async fn query_readings(
        &self,
        req: Request<QueryReadingsRequest>,
    ) -> Result<Response<QueryReadingsResponse>, Status> {
        let r = req.into_inner();
        if r.device_id.is_empty() {
            return Err(Status::invalid_argument("device_id is required"));
        }
        let from = if r.from_ms == 0 { i64::MIN } else { r.from_ms };
        let to = if r.to_ms == 0 { i64::MAX } else { r.to_ms };
        let store = self.store.clone();
        let readings = tokio::task::spawn_blocking(move || {
            store.device_readings(&r.device_id, from, to, limit(r.limit))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)?;
        Ok(Response::new(QueryReadingsResponse { readings }))
    }

    async fn add_agency(
        &self,
        req: Request<AddAgencyRequest>,
    ) -> Result<Response<AddAgencyResponse>, Status> {
        let r = req.into_inner();
        let (agency, token) = self
            .agencies
            .add(&r.name, r.tenants, r.kinds, r.kpi, r.control)
            .await
            .map_err(status)?;
        Ok(Response::new(AddAgencyResponse {
            agency: Some(agency_info(&agency)),
            token,
        }))
    }

    async fn list_agencies(
        &self,
        _req: Request<ListAgenciesRequest>,
    ) -> Result<Response<ListAgenciesResponse>, Status> {
        let agencies = self
            .agencies
            .list()
            .iter()
            .map(|a| agency_info(a))
            .collect();
        Ok(Response::new(ListAgenciesResponse { agencies }))
    }

    async fn remove_agency(
        &self,
        req: Request<RemoveAgencyRequest>,
    ) -> Result<Response<RemoveAgencyResponse>, Status> {
        self.agencies
            .remove(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(RemoveAgencyResponse {}))
    }

    async fn add_operator(
        &self,
        req: Request<AddOperatorRequest>,
    ) -> Result<Response<AddOperatorResponse>, Status> {
        let (operator, token) = self
            .operators
            .add(&req.into_inner().name, now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(AddOperatorResponse {
            operator: Some(operator_info(&operator)),
            token,
        }))
    }

    async fn list_operators(
        &self,
        _req: Request<ListOperatorsRequest>,
    ) -> Result<Response<ListOperatorsResponse>, Status> {
        let operators = self
            .operators
            .list()
            .iter()
            .map(|o| operator_info(o))
            .collect();
        Ok(Response::new(ListOperatorsResponse { operators }))
    }

    async fn remove_operator(
        &self,
        req: Request<RemoveOperatorRequest>,
    ) -> Result<Response<RemoveOperatorResponse>, Status> {
        self.operators
            .remove(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(RemoveOperatorResponse {}))
    }

    async fn sink_status(
        &self,
        _req: Request<SinkStatusRequest>,
    ) -> Result<Response<SinkStatusResponse>, Status> {
        let (sinks, store) = (self.sinks.clone(), self.store.clone());
        let sinks = tokio::task::spawn_blocking(move || sinks.status(&store))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_status)?;
        Ok(Response::new(SinkStatusResponse { sinks }))
    }

    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(match self.store.cluster() {
            Some(cluster) => cluster.status(&self.store).await,
            None => ClusterStatusResponse {
                backend: "embedded".into(),
                healthy: true,
                ..Default::default()
            },
        }))
    }

    async fn get_connection_kpi(
        &self,
        req: Request<ConnectionKpiRequest>,
    ) -> Result<Response<ConnectionKpi>, Status> {
        let report = self
            .kpi
            .report_async(req.into_inner().city_code)
            .await
            .map_err(super::telemetry::kpi_status)?;
        Ok(Response::new(report))
    }

    async fn put_kpi_snapshots(
        &self,
        req: Request<PutKpiSnapshotsRequest>,
    ) -> Result<Response<PutKpiSnapshotsResponse>, Status> {
        let snapshots = req.into_inner().snapshots;
        let stored = self
            .kpi
            .put_snapshots(snapshots)
            .await
            .map_err(super::telemetry::kpi_status)?;
        tracing::info!(stored, "kpi snapshots stored");
        Ok(Response::new(PutKpiSnapshotsResponse {
            stored: stored as u32,
        }))
    }

    async fn list_lwm2m_registrations(
        &self,
        req: Request<ListLwm2mRegistrationsRequest>,
    ) -> Result<Response<ListLwm2mRegistrationsResponse>, Status> {
        let device_id = req.into_inner().device_id;
        let registrations = self
            .lwm2m
            .as_ref()
            .map(|l| l.registrations())
            .unwrap_or_default()
            .into_iter()
            .filter(|r| device_id.is_empty() || r.device_id == device_id)
            .map(|r| Lwm2mRegistration {
                id: format!("/rd/{}", r.id),
                device_id: r.device_id,
                address: r.peer.to_string(),
                lifetime_s: r.lifetime_secs,
                lwm2m_version: r.version,
                objects: r.objects.iter().map(|(o, i)| format!("/{o}/{i}")).collect(),
                registered_time_ms: r.registered_ms,
                updated_time_ms: r.updated_ms,
                last_error: r.last_error,
                secure: r.secure,
                binding: r.binding,
                queue_mode: r.queue,
            })
            .collect();
        Ok(Response::new(ListLwm2mRegistrationsResponse {
            registrations,
        }))
    }
}
