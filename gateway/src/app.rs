//! `citygw run`: opens the store, starts every listener, serves until SIGTERM, shuts down cleanly.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::api::console::{self, Console};
use crate::api::{grpc::GrpcServer, http};
use crate::config::Config;
use crate::control::commands::{transport::lorawan::Lorawan, Commands};
use crate::control::rules::Alerts;
use crate::kpi::Kpi;
use crate::pipeline::{now_ms, Pipeline};
use crate::registry::agencies::Agencies;
use crate::registry::operators::Operators;
use crate::registry::Registry;
use crate::sinks::Sinks;
use crate::sources::lorawan::{Downlinks, LorawanSource};
use crate::sources::{coap::CoapSource, mqtt::MqttSource, Source};
use crate::store::jetstream::Cluster;
use crate::store::{Store, StoreOptions};

/// How often last-seen times are written back and gauges refreshed, and retention runs.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Longest a listener may take to drain at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = crate::observability::install_metrics()?;
    crate::config::private_data_dir(&cfg.data_dir)?;
    let store = Store::open(
        &cfg.data_dir.join("store"),
        StoreOptions {
            commit_window: cfg.store.commit_window(),
            max_batch: cfg.store.max_batch,
            retention: cfg.store.retention(),
            min_free_bytes: cfg.store.min_free_bytes(),
        },
    )?;
    let shutdown = CancellationToken::new();
    let cluster = match cfg.cluster.enabled() {
        true => {
            let cluster = Cluster::connect(&cfg.cluster, cfg.store.retention()).await?;
            cluster.start(&store, &shutdown).await?;
            Some(cluster)
        }
        false => None,
    };
    let registry = Registry::load(store.clone())?;
    registry.set_auth_throttle(crate::registry::throttle::AuthThrottle::new(
        cfg.auth.clone(),
    ));
    registry.set_psk_sealer(crate::registry::psk::Sealer::load_or_create(
        &cfg.coap.psk_key_path(&cfg.data_dir),
    )?);
    let agencies = Agencies::load(store.clone(), &cfg.agencies)?;
    let operators = Operators::load(store.clone(), &cfg.operators)?;
    let pipeline = Pipeline::with_device_clock(
        store.clone(),
        cfg.mqtt.max_payload_bytes,
        cfg.ingest.device_clock(),
    );
    let kpi = Kpi::new(&cfg.kpi, registry.clone(), store.clone())?;
    let admin_token = cfg.admin_token()?;
    let (commands, command_log) = Commands::load(store.clone(), registry.clone())?;
    let command_log = tokio::spawn(command_log.run(cfg.store.retention(), shutdown.clone()));
    let alerts = Alerts::load(
        &cfg.rules,
        store.clone(),
        registry.clone(),
        commands.clone(),
    )?;
    let rules = tokio::spawn(alerts.clone().run(shutdown.clone()));
    tokio::spawn(
        alerts
            .clone()
            .retain(cfg.store.retention(), shutdown.clone()),
    );
    if cluster.is_some() {
        tokio::spawn(crate::registry::follow_changes(
            store.clone(),
            registry.clone(),
            agencies.clone(),
            operators.clone(),
        ));
        tokio::spawn(registry.clone().touch_from_feed(store.subscribe()));
    }
    let sinks = Sinks::start(&cfg.sinks, &pipeline, &shutdown)?;
    let lwm2m = cfg.coap.lwm2m_enabled.then(|| {
        std::sync::Arc::new(crate::sources::coap::lwm2m::Lwm2m::new(
            registry.clone(),
            pipeline.clone(),
            &cfg.coap,
        ))
    });
    if let Some(l) = &lwm2m {
        l.set_commands(commands.clone());
        commands.attach(std::sync::Arc::new(
            crate::control::commands::transport::lwm2m::Lwm2mTransport::new(l.clone()),
        ));
    }
    let ready = http::Readiness::default();
    let reloader = crate::tls::Reloader::default();
    let server_tls = |name: &'static str, files: Option<crate::tls::TlsFiles>, alpn: &[&[u8]]| {
        files
            .map(|f| {
                let tls = crate::tls::ServerTls::new(name, f, alpn, None)
                    .map_err(|e| anyhow::anyhow!("{name} TLS: {e:#}"))?;
                reloader.add(tls.clone());
                anyhow::Ok(tls)
            })
            .transpose()
    };
    let http_tls = server_tls("http", cfg.http.tls_files()?, &[b"http/1.1"])?;
    let grpc_tls = server_tls("grpc", cfg.grpc.tls_files()?, &[b"h2"])?;
    if let Some(cluster) = &cluster {
        ready.depend_on(cluster.clone());
    }
    let console = cfg.console.enabled.then(|| {
        Console::new(console::Setup {
            cfg: cfg.console.clone(),
            admin_token: admin_token.clone(),
            operators: operators.clone(),
            registry: registry.clone(),
            store: store.clone(),
            kpi: kpi.clone(),
            sinks: sinks.clone(),
            metrics: metrics.clone(),
            commands: commands.clone(),
            alerts: alerts.clone(),
            tls: http_tls.is_some(),
        })
    });
    let console_sampler = console
        .as_ref()
        .map(|c| tokio::spawn(c.run(shutdown.clone())));
    let mut servers: Vec<(&'static str, BoxFuture<'static, anyhow::Result<()>>)> = vec![
        (
            "http",
            http::start(
                cfg.http.listen,
                http::Api {
                    metrics: metrics.clone(),
                    ready: ready.clone(),
                    store: store.clone(),
                    agencies: agencies.clone(),
                    admin_token: admin_token.clone(),
                    kpi: kpi.clone(),
                    metrics_token: cfg.http.metrics_token()?,
                    registry: registry.clone(),
                    console,
                },
                http_tls,
                shutdown.clone(),
            )
            .await?,
        ),
        (
            "grpc",
            GrpcServer {
                listen: cfg.grpc.listen,
                admin_token,
                subscription_buffer: cfg.grpc.subscription_buffer,
                registry: registry.clone(),
                agencies,
                operators,
                pipeline: pipeline.clone(),
                sinks: sinks.clone(),
                kpi: kpi.clone(),
                lwm2m: lwm2m.clone(),
                tls: grpc_tls,
                commands: commands.clone(),
                alerts,
            }
            .start(shutdown.clone())
            .await?,
        ),
    ];
    let mut sources: Vec<Box<dyn Source>> = vec![
        Box::new(MqttSource {
            config: cfg.mqtt.clone(),
            registry: registry.clone(),
            pipeline: pipeline.clone(),
            identity_field: cfg.tls.device_identity,
            reloader: reloader.clone(),
            commands: commands.clone(),
        }),
        Box::new(CoapSource {
            config: cfg.coap.clone(),
            registry: registry.clone(),
            pipeline: pipeline.clone(),
            lwm2m,
            identity_field: cfg.tls.device_identity,
            reloader: reloader.clone(),
        }),
    ];
    // Commands to LoRaWAN devices go out as downlinks through the bridges that allow them.
    let downlinks = match cfg.lorawan.iter().any(|s| s.downlinks) {
        true => {
            let transport = Lorawan::load(store.clone())?;
            commands.attach(transport.clone());
            Some(Downlinks {
                transport,
                commands: commands.clone(),
            })
        }
        false => None,
    };
    for server in &cfg.lorawan {
        sources.push(Box::new(LorawanSource {
            config: server.clone(),
            registry: registry.clone(),
            pipeline: pipeline.clone(),
            // Cluster mode: one node bridges each network server at a time.
            lease: cluster
                .as_ref()
                .map(|c| c.lease(&format!("lorawan/{}", server.name), shutdown.clone())),
            downlinks: downlinks.clone(),
        }));
    }
    for source in sources {
        let name = source.name();
        servers.push((name, source.start(shutdown.clone())?));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (name, server) in servers {
        tasks.spawn(async move { (name, server.await) });
    }
    let kpi_refresh = tokio::spawn(kpi.run(shutdown.clone()));
    let reloads =
        tokio::spawn(reloader.run(Duration::from_secs(cfg.tls.watch_secs), shutdown.clone()));
    let housekeeping = tokio::spawn(housekeeping(
        registry.clone(),
        store.clone(),
        sinks,
        metrics,
    ));
    ready.set(true);
    tracing::info!(data_dir = %cfg.data_dir.display(), devices = registry.len(), "citygw ready");

    let failure = tokio::select! {
        _ = shutdown_signal() => None,
        Some(done) = tasks.join_next() => Some(match done {
            Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
            Ok((name, Err(e))) => e.context(format!("{name} failed")),
            Err(e) => anyhow::anyhow!("server task panicked: {e}"),
        }),
    };
    tracing::info!("shutting down: refusing new work, flushing the store");
    ready.set(false);
    shutdown.cancel();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    // The command log's last changes (expiries, answers that raced the shutdown) go to disk.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, command_log).await;
    // The rule evaluator saves where it is.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, rules).await;
    housekeeping.abort();
    kpi_refresh.abort();
    reloads.abort();
    if let Some(sampler) = console_sampler {
        sampler.abort();
    }
    if let Err(e) = registry.persist_last_seen().await {
        tracing::warn!(error = %e, "last-seen times not saved");
    }
    store.close().await;
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

async fn housekeeping(
    registry: Registry,
    store: Store,
    sinks: Sinks,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) {
    // The standard process_* series (resident memory, open and maximum descriptors, CPU):
    // what an operator sizes a node by, beside the session cap they bound.
    let process = metrics_process::Collector::default();
    process.describe();
    let mut last_seen = tokio::time::interval(HOUSEKEEPING_EVERY);
    let mut retention = tokio::time::interval(RETENTION_EVERY);
    loop {
        tokio::select! {
            _ = last_seen.tick() => {
                metrics.run_upkeep();
                process.collect();
                store.export_memory_metrics();
                metrics::gauge!("citygw_registered_devices").set(registry.len() as f64);
                let (s, st) = (sinks.clone(), store.clone());
                let _ = tokio::task::spawn_blocking(move || s.export_metrics(&st)).await;
                if let Err(e) = registry.persist_last_seen().await {
                    tracing::warn!(error = %e, "last-seen times not saved");
                }
            }
            _ = retention.tick() => {
                let (store, keep_after) = (store.clone(), sinks.forwarded_up_to());
                match tokio::task::spawn_blocking(move || store.enforce_retention(now_ms(), keep_after)).await {
                    Ok(Ok(report)) => tracing::debug!(?report, "retention done"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "retention failed"),
                    Err(e) => tracing::warn!(error = %e, "retention task failed"),
                }
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
