//! The `citygw` command line: `run` serves; every other command is a client of the running
//! gateway's admin API, so provisioning works the same against a local or a remote node.

pub mod alerts;
mod cert;
pub mod client;
pub mod control;
mod kpi;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Config;
use client::Client;
use output::Output;

#[derive(Parser)]
#[command(
    name = "citygw",
    version,
    about = "City IoT telemetry ingestion gateway"
)]
struct Cli {
    /// Config file (TOML). Without one, every key has its default; CITYGW_* variables override.
    #[arg(long, short, global = true, env = "CITYGW_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: Command,
}

/// How client commands reach the gateway.
#[derive(Args)]
struct ConnArgs {
    /// Admin API address. Default: the configured gRPC port on this host.
    #[arg(long, global = true, env = "CITYGW_SERVER")]
    server: Option<String>,
    /// Admin token. Default: admin.token from the config, or the one generated under data_dir.
    #[arg(
        long,
        global = true,
        env = "CITYGW_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// table for people, json for scripts.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(flatten)]
    tls: client::TlsArgs,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// The command tree, for the generated CLI reference page (`reference_docs`).
#[cfg(test)]
pub(crate) fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (MQTT, gRPC, HTTP) until SIGTERM.
    Run,
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Provision and inspect devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Stored readings of one device, oldest first.
    Readings(ReadingsArgs),
    /// Refused payloads and why.
    #[command(subcommand)]
    Deadletter(DeadletterCommand),
    /// Agencies of the Telemetry API and their scopes.
    #[command(subcommand)]
    Agency(AgencyCommand),
    /// Console operators: read-only sign-in tokens for the web console.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Forwarding to time-series stores.
    #[command(subcommand)]
    Sink(SinkCommand),
    /// LwM2M clients registered over CoAP/CoAPS.
    #[command(subcommand)]
    Lwm2m(Lwm2mCommand),
    /// Cluster mode: nodes, the readings stream, sink leases.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The quantity table used for normalisation.
    Quantities,
    /// A city CA for device and server certificates (files only; no gateway needed).
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// IoT connections per resident against the city plan's targets.
    #[command(subcommand)]
    Kpi(KpiCommand),
    /// Commands to devices: send, follow, inspect.
    #[command(name = "command", subcommand)]
    Commands(control::CommandCommand),
    /// Alerts raised by the rules: list, show, acknowledge, clear, follow.
    #[command(subcommand)]
    Alert(alerts::AlertCommand),
    /// Alert rules: list them, add and remove them at run time.
    #[command(subcommand)]
    Rule(alerts::RuleCommand),
}

#[derive(Subcommand)]
enum KpiCommand {
    /// City, communes and kinds: active and registered devices, per resident, target,
    /// attainment, trend and projected dates.
    Report {
        /// Province-level code (default: kpi.city).
        #[arg(long, default_value = "")]
        city: String,
        /// Default: table, or json with --output json.
        #[arg(long, value_enum)]
        format: Option<kpi::ReportFormat>,
    },
    /// Store daily snapshots from a CSV file with header city_code,date,active,registered (history
    /// kept before citygw); a day already stored is replaced.
    Backfill {
        /// The CSV file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (defaults, file, environment) as TOML.
    Print,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device; prints its secret once.
    Add(Box<AddArgs>),
    /// List devices.
    List {
        /// Only devices of this tenant.
        #[arg(long, default_value = "")]
        tenant: String,
        /// Only devices of this kind.
        #[arg(long, default_value = "")]
        kind: String,
        /// Most devices to list; 0 = all.
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Show one device.
    Show {
        /// The device id.
        id: String,
    },
    /// Disable a device: its live sessions are closed and it is refused from now on.
    Disable {
        /// The device id.
        id: String,
    },
    /// Enable a device again.
    Enable {
        /// The device id.
        id: String,
    },
    /// Pin a device to one client certificate (MQTT mTLS, CoAPS X.509), or unpin it.
    Pin {
        /// The device id.
        id: String,
        #[command(flatten)]
        cert: CertPin,
        /// Accept any certificate from the client CA that names the device.
        #[arg(long, conflicts_with_all = ["cert_sha256", "cert_file"])]
        none: bool,
    },
    /// Register devices from a CSV file with header id,tenant,kind[,commune_code,lat,lon,name,secret,dev_eui,codec,psk,cert_sha256].
    Import {
        /// The CSV file.
        file: PathBuf,
        /// Write id,secret of every registered device here (mode 0600).
        #[arg(long)]
        secrets_out: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct AddArgs {
    /// The device id: 1-128 characters of A-Z a-z 0-9 - _ . : (MQTT client id and username).
    pub id: String,
    /// The tenant it belongs to (a-z 0-9 - _).
    #[arg(long)]
    pub tenant: String,
    /// Its kind: air_quality, noise, water_level, flood, rain, weather, traffic, parking,
    /// street_light, energy_meter, water_meter, fire_alarm, waste_bin, soil_moisture, generic.
    #[arg(long)]
    pub kind: String,
    /// Five-digit commune code (2025 units).
    #[arg(long, default_value = "")]
    pub commune: String,
    /// Registered latitude (WGS 84), with --lon.
    #[arg(long, requires = "lon", allow_hyphen_values = true)]
    pub lat: Option<f64>,
    /// Registered longitude (WGS 84), with --lat.
    #[arg(long, requires = "lat", allow_hyphen_values = true)]
    pub lon: Option<f64>,
    /// A name for people (free text).
    #[arg(long, default_value = "")]
    pub name: String,
    /// Choose the secret instead of letting the gateway generate one (hashed with Argon2id).
    #[arg(long)]
    pub secret: Option<String>,
    /// LoRaWAN DevEUI (16 hex digits; case, '-' and ':' ignored): uplinks from the network servers
    /// with this DevEUI become this device's readings.
    #[arg(long, default_value = "")]
    pub dev_eui: String,
    /// Decoder of the raw LoRaWAN payload: lpp (Cayenne LPP), raw, json, senml+json, senml+cbor,
    /// proto; empty: the network server's decoded object, else raw.
    #[arg(long, default_value = "")]
    pub codec: String,
    /// DTLS pre-shared key for CoAPS (16-64 printable characters); identity = the device id.
    #[arg(long, conflicts_with = "generate_psk")]
    pub psk: Option<String>,
    /// Let the gateway generate a DTLS pre-shared key; printed once.
    #[arg(long)]
    pub generate_psk: bool,
    #[command(flatten)]
    pub cert: CertPin,
}

/// The client certificate a device is pinned to.
#[derive(Args)]
pub struct CertPin {
    /// Its SHA-256 fingerprint (64 hex digits, ':' allowed), as `citygw cert issue` prints it.
    #[arg(long, conflicts_with = "cert_file")]
    pub cert_sha256: Option<String>,
    /// The certificate itself (PEM); its SHA-256 is pinned.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
}

impl CertPin {
    /// The fingerprint as the admin API takes it ("" when none was given).
    pub fn fingerprint(&self) -> anyhow::Result<String> {
        if let Some(f) = &self.cert_file {
            let certs = crate::tls::read_certs(f)?;
            return Ok(hex::encode(crate::tls::identity::fingerprint(&certs[0])));
        }
        Ok(self.cert_sha256.clone().unwrap_or_default())
    }
}

#[derive(Args)]
struct ReadingsArgs {
    /// The device id.
    device: String,
    /// Device time from (inclusive): Unix milliseconds or RFC 3339.
    #[arg(long)]
    from: Option<String>,
    /// Device time to: Unix milliseconds or RFC 3339.
    #[arg(long)]
    to: Option<String>,
    /// Most readings to print.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

#[derive(Subcommand)]
enum AgencyCommand {
    /// Create an agency; prints its token once.
    Add {
        /// The agency's name (a-z 0-9 - _).
        name: String,
        /// Tenant it may read (repeat; "*" for all).
        #[arg(long = "tenant", required = true)]
        tenants: Vec<String>,
        /// Device kind it may read (repeat; "*" for all).
        #[arg(long = "kind", required = true)]
        kinds: Vec<String>,
        /// May read the connections-per-resident KPI.
        #[arg(long)]
        kpi: bool,
        /// May send commands to the devices in its scope and acknowledge or clear their alerts.
        #[arg(long)]
        control: bool,
    },
    /// Agencies, their scopes and where they were defined (config file or API).
    List,
    /// Revoke an agency's token (API-created agencies only).
    Remove {
        /// The agency's name.
        name: String,
    },
    /// Print the SHA-256 of a token, for `token_sha256` of an agency in the config file.
    HashToken {
        /// The agency's bearer token.
        token: String,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Create an operator (read-only console sign-in); prints the token once.
    Add {
        /// The operator's name (a-z 0-9 - _).
        name: String,
    },
    /// Operators and where they were defined (config file or API).
    List,
    /// Revoke an operator's token (API-created operators only); their sessions end.
    Remove {
        /// The operator's name.
        name: String,
    },
    /// Print the SHA-256 of a token, for `token_sha256` of an operator in the config file.
    HashToken {
        /// The operator's sign-in token.
        token: String,
    },
}

#[derive(Subcommand)]
enum Lwm2mCommand {
    /// Live registrations: endpoint, address, lifetime, objects, last observation error.
    List {
        /// Only this device.
        #[arg(long, default_value = "")]
        device: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The citygw nodes (materialisation lag, health), the readings stream (replicas, leader)
    /// and which node forwards each sink, as the answering node sees them.
    Status,
}

#[derive(Subcommand)]
enum SinkCommand {
    /// Per sink: delivered up to which reading, lag in readings and seconds, last success.
    Status,
}

#[derive(Subcommand)]
enum DeadletterCommand {
    /// Refused payloads with their reason, detail and payload head, newest last.
    List {
        /// Only this device's.
        #[arg(long, default_value = "")]
        device: String,
        /// Most records to print.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

pub fn main() -> ExitCode {
    crate::tls::install_provider();
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("citygw: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run => {
            crate::observability::init_logging(&cfg.log);
            runtime().and_then(|rt| rt.block_on(crate::app::run(cfg)))
        }
        Command::Config(ConfigCommand::Print) => {
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Command::Quantities => {
            Output::new(cli.conn.output).quantities();
            Ok(())
        }
        Command::Cert(cmd) => cert::run(cmd),
        Command::Agency(AgencyCommand::HashToken { token })
        | Command::Operator(OperatorCommand::HashToken { token }) => {
            println!(
                "{}",
                hex::encode(crate::registry::agencies::token_hash(&token))
            );
            Ok(())
        }
        command => runtime().and_then(|rt| rt.block_on(client_command(&cfg, cli.conn, command))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("citygw: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn client_command(cfg: &Config, conn: ConnArgs, command: Command) -> anyhow::Result<()> {
    let out = Output::new(conn.output);
    let mut client = Client::connect(cfg, conn.server, conn.token, &conn.tls).await?;
    match command {
        Command::Device(DeviceCommand::Add(args)) => {
            let (device, secret, psk) = client.add_device(*args).await?;
            out.added(&device, &secret, &psk);
        }
        Command::Device(DeviceCommand::List {
            tenant,
            kind,
            limit,
        }) => {
            out.devices(&client.list_devices(&tenant, &kind, limit).await?);
        }
        Command::Device(DeviceCommand::Show { id }) => out.device(&client.get_device(&id).await?),
        Command::Device(DeviceCommand::Disable { id }) => {
            out.device(&client.set_enabled(&id, false).await?)
        }
        Command::Device(DeviceCommand::Enable { id }) => {
            out.device(&client.set_enabled(&id, true).await?)
        }
        Command::Device(DeviceCommand::Pin { id, cert, none }) => {
            let fingerprint = cert.fingerprint()?;
            anyhow::ensure!(
                none || !fingerprint.is_empty(),
                "give --cert-file, --cert-sha256 or --none"
            );
            out.device(&client.set_certificate(&id, &fingerprint).await?)
        }
        Command::Device(DeviceCommand::Import { file, secrets_out }) => {
            let results = client.import(&file).await?;
            if let Some(path) = secrets_out {
                output::write_secrets(&path, &results)?;
            }
            let failed = results.iter().filter(|r| !r.ok).count();
            out.import_results(&results);
            anyhow::ensure!(
                failed == 0,
                "{failed} of {} devices were not imported",
                results.len()
            );
        }
        Command::Readings(args) => {
            let from = args
                .from
                .as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or(0);
            let to = args.to.as_deref().map(parse_time).transpose()?.unwrap_or(0);
            out.readings(&client.readings(&args.device, from, to, args.limit).await?);
        }
        Command::Deadletter(DeadletterCommand::List { device, limit }) => {
            out.dead_letters(&client.dead_letters(&device, limit).await?);
        }
        Command::Agency(AgencyCommand::Add {
            name,
            tenants,
            kinds,
            kpi,
            control,
        }) => {
            let (agency, token) = client
                .add_agency(name, tenants, kinds, kpi, control)
                .await?;
            out.agency_added(&agency, &token);
        }
        Command::Agency(AgencyCommand::List) => out.agencies(&client.list_agencies().await?),
        Command::Sink(SinkCommand::Status) => out.sinks(&client.sink_status().await?),
        Command::Cluster(ClusterCommand::Status) => out.cluster(&client.cluster_status().await?),
        Command::Kpi(KpiCommand::Report { city, format }) => {
            let format = format.unwrap_or(match conn.output {
                Format::Table => kpi::ReportFormat::Table,
                Format::Json => kpi::ReportFormat::Json,
            });
            kpi::print(&client.connection_kpi(&city).await?, format)?;
        }
        Command::Kpi(KpiCommand::Backfill { file }) => {
            let stored = client
                .put_kpi_snapshots(kpi::read_snapshots(&file)?)
                .await?;
            match conn.output {
                Format::Json => println!("{}", serde_json::json!({"stored": stored})),
                Format::Table => println!("{stored} snapshots stored"),
            }
        }
        Command::Lwm2m(Lwm2mCommand::List { device }) => {
            out.lwm2m_registrations(&client.lwm2m_registrations(&device).await?)
        }
        Command::Commands(cmd) => control::run(&mut client, conn.output, cmd).await?,
        Command::Alert(cmd) => alerts::run(&mut client, conn.output, cmd).await?,
        Command::Rule(cmd) => alerts::run_rules(&mut client, conn.output, cmd).await?,
        Command::Agency(AgencyCommand::Remove { name }) => {
            client.remove_agency(&name).await?;
            println!("agency {name} removed; its token no longer works");
        }
        Command::Operator(OperatorCommand::Add { name }) => {
            let (operator, token) = client.add_operator(name).await?;
            out.operator_added(&operator, &token);
        }
        Command::Operator(OperatorCommand::List) => out.operators(&client.list_operators().await?),
        Command::Operator(OperatorCommand::Remove { name }) => {
            client.remove_operator(&name).await?;
            println!("operator {name} removed; their console sessions have ended");
        }
        Command::Run
        | Command::Config(_)
        | Command::Cert(_)
        | Command::Quantities
        | Command::Agency(AgencyCommand::HashToken { .. })
        | Command::Operator(OperatorCommand::HashToken { .. }) => {
            unreachable!("handled without a client")
        }
    }
    Ok(())
}

/// Unix milliseconds or RFC 3339.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| anyhow::anyhow!("time {s:?}: Unix milliseconds or RFC 3339 ({e})"))
}
