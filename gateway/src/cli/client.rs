//! The admin API client behind the CLI's commands.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::AddArgs;
use crate::config::Config;
use crate::proto::admin_client::AdminClient;
use crate::proto::control_client::ControlClient;
use crate::proto::*;

/// Rows per ImportDevices call: bounded messages, visible progress on large files.
const IMPORT_CHUNK: usize = 5000;
/// Page size when listing everything.
const LIST_PAGE: u32 = 5000;

/// A gRPC interceptor that sends `authorization: Bearer <token>` (admin or agency token) with
/// every call; device-sim's clients use it too.
pub fn bearer(
    token: &str,
) -> anyhow::Result<impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + 'static>
{
    let header: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("token is not a valid header value")?;
    Ok(move |mut req: Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    })
}

/// How a gRPC client (the CLI, device-sim) trusts a gateway on `https://` and, for agencies
/// whose gateway asks for client certificates, which certificate it shows.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM CA certificate(s) the gateway's certificate must chain to (https:// servers);
    /// default: the system's roots.
    #[arg(long, global = true, env = "CITYGW_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for a gateway that requires one (gRPC mTLS).
    #[arg(
        long,
        global = true,
        env = "CITYGW_CLIENT_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    #[arg(
        long,
        global = true,
        env = "CITYGW_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
}

impl TlsArgs {
    /// An endpoint for `server` (`http://` or `https://host:port`), with TLS for `https://`.
    pub fn endpoint(&self, server: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Channel::from_shared(server.to_string())
            .with_context(|| format!("server address {server:?}"))?;
        if !server.starts_with("https://") {
            anyhow::ensure!(
                self.ca_file.is_none() && self.client_cert.is_none(),
                "--ca-file and --client-cert need an https:// server address"
            );
            return Ok(endpoint);
        }
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_file {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint
            .tls_config(tls)
            .with_context(|| format!("TLS for {server}"))
    }
}

type AddToken = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Authed = InterceptedService<Channel, AddToken>;

pub struct Client {
    inner: AdminClient<Authed>,
    /// The Control API (commands, alerts) on the same connection, with the same token.
    pub control: ControlClient<Authed>,
}

/// gRPC errors say "status: Unauthenticated, message: ..."; operators want the code and message.
pub fn rpc(e: Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message()).context(match e.code() {
        tonic::Code::Unauthenticated => "unauthenticated: check --token / CITYGW_ADMIN_TOKEN",
        tonic::Code::Unavailable => "gateway unavailable",
        _ => "request refused",
    })
}

impl Client {
    pub async fn connect(
        cfg: &Config,
        server: Option<String>,
        token: Option<String>,
        tls: &TlsArgs,
    ) -> anyhow::Result<Client> {
        let server = server.unwrap_or_else(|| {
            let listen = cfg.grpc.listen;
            let scheme = if cfg.grpc.tls_cert_file.is_some() {
                "https"
            } else {
                "http"
            };
            if listen.ip().is_unspecified() {
                format!("{scheme}://localhost:{}", listen.port())
            } else {
                format!("{scheme}://{listen}")
            }
        });
        let token = match token {
            Some(t) => t,
            None => admin_token(cfg)?,
        };
        let channel = tls
            .endpoint(&server)?
            .connect()
            .await
            .with_context(|| format!("cannot reach the gateway at {server}"))?;
        let auth: AddToken = Box::new(bearer(&token)?);
        let control_auth: AddToken = Box::new(bearer(&token)?);
        Ok(Client {
            inner: AdminClient::with_interceptor(channel.clone(), auth)
                .max_decoding_message_size(64 << 20),
            control: ControlClient::with_interceptor(channel, control_auth)
                .max_decoding_message_size(64 << 20),
        })
    }

    /// The device, its secret and its PSK (empty when none).
    pub async fn add_device(&mut self, a: AddArgs) -> anyhow::Result<(Device, String, String)> {
        let req = AddDeviceRequest {
            device: Some(Device {
                id: a.id,
                tenant: a.tenant,
                kind: a.kind,
                commune_code: a.commune,
                lat: a.lat,
                lon: a.lon,
                name: a.name,
                dev_eui: a.dev_eui,
                codec: a.codec,
                cert_sha256: a.cert.fingerprint()?,
                ..Default::default()
            }),
            secret: a.secret.unwrap_or_default(),
            psk: a.psk.unwrap_or_default(),
            generate_psk: a.generate_psk,
        };
        let resp = self.inner.add_device(req).await.map_err(rpc)?.into_inner();
        Ok((resp.device.unwrap_or_default(), resp.secret, resp.psk))
    }

    pub async fn list_devices(
        &mut self,
        tenant: &str,
        kind: &str,
        limit: usize,
    ) -> anyhow::Result<Vec<Device>> {
        let mut all = Vec::new();
        let mut after_id = String::new();
        loop {
            let want = if limit == 0 {
                LIST_PAGE
            } else {
                (limit - all.len()).min(LIST_PAGE as usize) as u32
            };
            let req = ListDevicesRequest {
                tenant: tenant.into(),
                kind: kind.into(),
                after_id,
                limit: want,
            };
            let page = self
                .inner
                .list_devices(req)
                .await
                .map_err(rpc)?
                .into_inner()
                .devices;
            let done = (page.len() as u32) < want;
            after_id = page.last().map(|d| d.id.clone()).unwrap_or_default();
            all.extend(page);
            if done || (limit != 0 && all.len() >= limit) {
                return Ok(all);
            }
        }
    }

    pub async fn get_device(&mut self, id: &str) -> anyhow::Result<Device> {
        Ok(self
            .inner
            .get_device(GetDeviceRequest { id: id.into() })
            .await
            .map_err(rpc)?
            .into_inner())
    }

    pub async fn set_certificate(&mut self, id: &str, cert_sha256: &str) -> anyhow::Result<Device> {
        let req = SetDeviceCertificateRequest {
            id: id.into(),
            cert_sha256: cert_sha256.into(),
        };
        Ok(self
            .inner
            .set_device_certificate(req)
            .await
            .map_err(rpc)?
            .into_inner())
    }

    pub async fn set_enabled(&mut self, id: &str, enabled: bool) -> anyhow::Result<Device> {
        let req = SetDeviceEnabledRequest {
            id: id.into(),
            enabled,
        };
        Ok(self
            .inner
            .set_device_enabled(req)
            .await
            .map_err(rpc)?
            .into_inner())
    }

    pub async fn import(&mut self, file: &Path) -> anyhow::Result<Vec<ImportResult>> {
        let rows = read_devices_csv(file)?;
        let total = rows.len();
        let mut results = Vec::with_capacity(total);
        for chunk in rows.chunks(IMPORT_CHUNK) {
            let req = ImportDevicesRequest {
                devices: chunk.to_vec(),
            };
            results.extend(
                self.inner
                    .import_devices(req)
                    .await
                    .map_err(rpc)?
                    .into_inner()
                    .results,
            );
            if total > IMPORT_CHUNK {
                eprintln!("imported {}/{total}", results.len());
            }
        }
        Ok(results)
    }

    pub async fn readings(
        &mut self,
        device: &str,
        from_ms: i64,
        to_ms: i64,
        limit: u32,
    ) -> anyhow::Result<Vec<Reading>> {
        let req = QueryReadingsRequest {
            device_id: device.into(),
            from_ms,
            to_ms,
            limit,
        };
        Ok(self
            .inner
            .query_readings(req)
            .await
            .map_err(rpc)?
            .into_inner()
            .readings)
    }

    pub async fn dead_letters(
        &mut self,
        device: &str,
        limit: u32,
    ) -> anyhow::Result<Vec<DeadLetter>> {
        // Newest last: page through from the start and keep the tail.
        let mut kept: std::collections::VecDeque<DeadLetter> = Default::default();
        let mut after_id = 0;
        loop {
            let req = ListDeadLettersRequest {
                device_id: device.into(),
                after_id,
                limit: LIST_PAGE,
            };
            let page = self
                .inner
                .list_dead_letters(req)
                .await
                .map_err(rpc)?
                .into_inner()
                .dead_letters;
            let done = (page.len() as u32) < LIST_PAGE;
            after_id = page.last().map_or(after_id, |d| d.id);
            kept.extend(page);
            while kept.len() > limit as usize {
                kept.pop_front();
            }
            if done {
                return Ok(kept.into());
            }
        }
    }

    pub async fn add_agency(
        &mut self,
        name: String,
        tenants: Vec<String>,
        kinds: Vec<String>,
        kpi: bool,
        control: bool,
    ) -> anyhow::Result<(AgencyInfo, String)> {
        let resp = self
            .inner
            .add_agency(AddAgencyRequest {
                name,
                tenants,
                kinds,
                kpi,
                control,
            })
            .await
            .map_err(rpc)?
            .into_inner();
        Ok((resp.agency.unwrap_or_default(), resp.token))
    }

    pub async fn list_agencies(&mut self) -> anyhow::Result<Vec<AgencyInfo>> {
        Ok(self
            .inner
            .list_agencies(ListAgenciesRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .agencies)
    }

    pub async fn lwm2m_registrations(
        &mut self,
        device_id: &str,
    ) -> anyhow::Result<Vec<Lwm2mRegistration>> {
        Ok(self
            .inner
            .list_lwm2m_registrations(ListLwm2mRegistrationsRequest {
                device_id: device_id.to_string(),
            })
            .await
            .map_err(rpc)?
            .into_inner()
            .registrations)
    }

    pub async fn sink_status(&mut self) -> anyhow::Result<Vec<SinkState>> {
        Ok(self
            .inner
            .sink_status(SinkStatusRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .sinks)
    }

    pub async fn cluster_status(&mut self) -> anyhow::Result<ClusterStatusResponse> {
        Ok(self
            .inner
            .cluster_status(ClusterStatusRequest {})
            .await
            .map_err(rpc)?
            .into_inner())
    }

    pub async fn connection_kpi(&mut self, city: &str) -> anyhow::Result<ConnectionKpi> {
        Ok(self
            .inner
            .get_connection_kpi(ConnectionKpiRequest {
                city_code: city.into(),
            })
            .await
            .map_err(rpc)?
            .into_inner())
    }

    pub async fn put_kpi_snapshots(&mut self, snapshots: Vec<KpiSnapshot>) -> anyhow::Result<u32> {
        Ok(self
            .inner
            .put_kpi_snapshots(PutKpiSnapshotsRequest { snapshots })
            .await
            .map_err(rpc)?
            .into_inner()
            .stored)
    }

    pub async fn add_operator(&mut self, name: String) -> anyhow::Result<(OperatorInfo, String)> {
        let resp = self
            .inner
            .add_operator(AddOperatorRequest { name })
            .await
            .map_err(rpc)?
            .into_inner();
        Ok((resp.operator.unwrap_or_default(), resp.token))
    }

    pub async fn list_operators(&mut self) -> anyhow::Result<Vec<OperatorInfo>> {
        Ok(self
            .inner
            .list_operators(ListOperatorsRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .operators)
    }

    pub async fn remove_operator(&mut self, name: &str) -> anyhow::Result<()> {
        self.inner
            .remove_operator(RemoveOperatorRequest { name: name.into() })
            .await
            .map_err(rpc)?;
        Ok(())
    }

    pub async fn remove_agency(&mut self, name: &str) -> anyhow::Result<()> {
        self.inner
            .remove_agency(RemoveAgencyRequest { name: name.into() })
            .await
            .map_err(rpc)?;
        Ok(())
    }
}

fn admin_token(cfg: &Config) -> anyhow::Result<String> {
    if !cfg.admin.token.is_empty() || cfg.admin.token_file.is_some() {
        return cfg.admin_token();
    }
    let path = cfg.generated_token_path();
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .with_context(|| {
            format!(
                "no admin token: pass --token, set CITYGW_ADMIN_TOKEN, or run where {} is readable",
                path.display()
            )
        })
}

/// Columns: id,tenant,kind (required), commune_code,lat,lon,name,secret,dev_eui,codec,psk,
/// cert_sha256 (optional, any order; psk: the device's DTLS pre-shared key for CoAPS;
/// cert_sha256: the client certificate the device is pinned to).
fn read_devices_csv(file: &Path) -> anyhow::Result<Vec<AddDeviceRequest>> {
    #[derive(serde::Deserialize)]
    struct Row {
        id: String,
        tenant: String,
        kind: String,
        #[serde(default)]
        commune_code: String,
        #[serde(default)]
        lat: Option<f64>,
        #[serde(default)]
        lon: Option<f64>,
        #[serde(default)]
        name: String,
        #[serde(default)]
        secret: String,
        #[serde(default)]
        dev_eui: String,
        #[serde(default)]
        codec: String,
        #[serde(default)]
        psk: String,
        #[serde(default)]
        cert_sha256: String,
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    reader
        .deserialize::<Row>()
        .enumerate()
        .map(|(i, row)| {
            // Header is line 1.
            let r = row.with_context(|| format!("{}: line {}", file.display(), i + 2))?;
            Ok(AddDeviceRequest {
                device: Some(Device {
                    id: r.id,
                    tenant: r.tenant,
                    kind: r.kind,
                    commune_code: r.commune_code,
                    lat: r.lat,
                    lon: r.lon,
                    name: r.name,
                    dev_eui: r.dev_eui,
                    codec: r.codec,
                    cert_sha256: r.cert_sha256,
                    ..Default::default()
                }),
                secret: r.secret,
                psk: r.psk,
                ..Default::default()
            })
        })
        .collect()
}
