//! device-sim: the city device simulator and citygw's benchmark client.
//!
//! City scenarios (`provision`, `run`, `verify`: scenario/, drivers/), bad-input modes
//! (`bad`), and the benchmarks: MQTT ingest (`bench mqtt`, `bench idle`), agency fan-out
//! (`bench fanout`) and the command round trip (`bench command`).

mod bad;
mod bench;
mod command_bench;
mod credentials;
mod drivers;
mod fanout;
mod format;
mod idle;
mod mqtt;
mod payload;
mod provision;
mod report;
mod run;
mod scenario;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "device-sim",
    version,
    about = "City device simulator and benchmark client for citygw"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register a scenario's devices in citygw (admin API, bulk) and write their credentials.
    Provision(provision::ProvisionArgs),
    /// Run a scenario: every device reports on its interval; live progress, then a summary.
    Run(Box<run::RunArgs>),
    /// Prove that every reading a run had acknowledged reached the agency API exactly once.
    Verify(verify::VerifyArgs),
    /// Send bad input (wrong credentials, spoofed topics, malformed or oversize payloads, a
    /// connection storm) and check the gateway refuses and counts exactly that.
    Bad(bad::BadArgs),
    /// Benchmarks: throughput and latency, idle connection capacity.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Publish as fast as acknowledgements allow (or at a fixed rate); report acked msgs/s and
    /// publish-to-PUBACK latency percentiles.
    Mqtt(bench::MqttBenchArgs),
    /// Open many idle connections, hold them, report how many were connected at once.
    Idle(idle::IdleArgs),
    /// Open many agency gRPC Subscribe streams; report readings/s per subscriber and
    /// publish-to-subscriber latency (with `bench mqtt --stamp` publishing).
    Fanout(fanout::FanoutArgs),
    /// Send commands through the Control API to the street lights of a running scenario
    /// (`commands = true`); report send-to-SUCCEEDED latency percentiles and commands/s.
    Command(command_bench::CommandBenchArgs),
}

/// Where the broker is and who the connections log in as; shared by the MQTT benchmarks.
#[derive(Args, Clone, Debug)]
pub struct TargetArgs {
    /// Broker host(s). A comma-separated list spreads connection i over host i % n, e.g.
    /// `127.0.0.1,127.0.0.2,...` against a broker bound to 0.0.0.0 / [::], to go past the
    /// ~28k ephemeral ports one destination address allows.
    #[arg(long, default_value = "127.0.0.1", value_delimiter = ',')]
    pub host: Vec<String>,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Number of MQTT connections.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// CSV with columns `id,secret` (as written by `citygw device import --secrets-out`);
    /// connection i logs in as row i. Without it connections are `bench-{i}` with an empty
    /// password (for a bare broker).
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Concurrent connection attempts while connecting.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Seconds to wait for each CONNACK.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// MQTT over TLS: PEM CA the gateway's certificate must chain to (its host name is checked
    /// against `--host`); plain MQTT without it.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    citygw::tls::install_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("device-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Provision(args) => provision::run(args).await,
            Command::Run(args) => run::run(*args).await,
            Command::Verify(args) => verify::run(args).await,
            Command::Bad(args) => bad::run(args).await,
            Command::Bench(BenchCommand::Mqtt(args)) => bench::run(args).await,
            Command::Bench(BenchCommand::Idle(args)) => idle::run(args).await,
            Command::Bench(BenchCommand::Fanout(args)) => fanout::run(args).await,
            Command::Bench(BenchCommand::Command(args)) => command_bench::run(args).await,
        }
    });
    // Connection tasks may still be parked on sockets; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
