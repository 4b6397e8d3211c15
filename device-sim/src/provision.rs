//! `device-sim provision SCENARIO`: registers every device of the scenario in citygw through the
//! admin API's bulk `ImportDevices` (kind, tenant, commune, position), and writes the secrets
//! the gateway generated to a credentials CSV (`id,secret,kind,commune_code,protocol,format,psk`,
//! the PSK in hex and only for CoAPS devices) that `device-sim run` reads. Secrets are shown
//! once by the gateway, so the file is created with mode 0600.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use citygw::cli::client::bearer;
use citygw::proto::admin_client::AdminClient;
use citygw::proto::{AddDeviceRequest, Device, ImportDevicesRequest};
use clap::Args;
use tonic::transport::Channel;

use crate::drivers;
use crate::run::load_scenario;
use crate::scenario::Scenario;

/// A scenario and the gateway's gRPC API with the admin token: what `provision` and
/// `bench command` share.
#[derive(Args, Debug)]
pub struct ScenarioAdmin {
    /// Scenario file (TOML).
    pub scenario: PathBuf,
    /// citygw's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub grpc: String,
    /// Admin bearer token (citygw's `admin.token`, or the generated data/admin.token).
    #[arg(long, env = "DEVICE_SIM_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Sensor profiles file replacing the embedded one.
    #[arg(long)]
    pub profiles: Option<PathBuf>,
    /// PEM CA of an https:// gateway (default: the system's roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

impl ScenarioAdmin {
    pub fn load(&self) -> anyhow::Result<Scenario> {
        load_scenario(&self.scenario, self.profiles.as_deref())
    }

    /// A channel to the gRPC API and the interceptor that adds the token.
    pub async fn connect(
        &self,
    ) -> anyhow::Result<(
        Channel,
        impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
    )> {
        let tls = citygw::cli::client::TlsArgs {
            ca_file: self.ca_file.clone(),
            ..Default::default()
        };
        let channel = tls
            .endpoint(&self.grpc)?
            .connect()
            .await
            .with_context(|| format!("cannot reach citygw at {}", self.grpc))?;
        Ok((channel, bearer(&self.token)?))
    }
}

#[derive(Args, Debug)]
pub struct ProvisionArgs {
    #[command(flatten)]
    pub target: ScenarioAdmin,
    /// Where to write the credentials CSV.
    #[arg(long)]
    pub out: PathBuf,
    /// Devices per ImportDevices call.
    #[arg(long, default_value_t = 1000)]
    pub chunk: usize,
}

pub async fn run(args: ProvisionArgs) -> anyhow::Result<()> {
    let scenario = args.target.load()?;
    let plan = scenario.plan();
    let (channel, token) = args.target.connect().await?;
    let mut admin = AdminClient::with_interceptor(channel, token);

    let mut out = csv_file(&args.out)?;
    writeln!(out, "id,secret,kind,commune_code,protocol,format,psk")?;
    let (mut ok, mut failed) = (0usize, Vec::new());
    for chunk in plan.chunks(args.chunk.max(1)) {
        let devices = chunk
            .iter()
            .map(|d| AddDeviceRequest {
                device: Some(Device {
                    id: d.id.clone(),
                    tenant: scenario.tenant.clone(),
                    kind: d.kind.clone(),
                    commune_code: d.commune_code.clone(),
                    lat: Some(d.lat),
                    lon: Some(d.lon),
                    enabled: true,
                    name: format!("{} {}, {}", scenario.name, d.profile, d.commune_name),
                    // The bridges find LoRaWAN devices by DevEUI, as the network server names them.
                    dev_eui: if d.protocol.is_lorawan() {
                        drivers::lorawan::dev_eui(&d.id)
                    } else {
                        String::new()
                    },
                    ..Default::default()
                }),
                generate_psk: d.protocol == drivers::Protocol::Coaps,
                ..Default::default()
            })
            .collect();
        let results = admin
            .import_devices(ImportDevicesRequest { devices })
            .await
            .map_err(|s| anyhow::anyhow!("ImportDevices: {:?}: {}", s.code(), s.message()))?
            .into_inner()
            .results;
        for (d, r) in chunk.iter().zip(results) {
            if r.ok {
                ok += 1;
                writeln!(
                    out,
                    "{},{},{},{},{},{},{}",
                    d.id,
                    r.secret,
                    d.kind,
                    d.commune_code,
                    d.protocol.name(),
                    d.format.name(),
                    hex::encode(&r.psk)
                )?;
            } else {
                failed.push(format!("{}: {}", d.id, r.error));
            }
        }
        if plan.len() > args.chunk {
            eprintln!("provisioned {}/{}", ok + failed.len(), plan.len());
        }
    }
    out.flush()?;
    println!(
        "provisioned {ok} of {} devices of scenario {} (tenant {}) -> {}",
        plan.len(),
        scenario.name,
        scenario.tenant,
        args.out.display()
    );
    if !failed.is_empty() {
        for f in failed.iter().take(5) {
            eprintln!("  refused: {f}");
        }
        anyhow::bail!(
            "{} devices were refused (already registered ones keep their old secret: remove them \
             or change the scenario's id_prefix)",
            failed.len()
        );
    }
    Ok(())
}

fn csv_file(path: &PathBuf) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(std::io::BufWriter::new(file))
}
