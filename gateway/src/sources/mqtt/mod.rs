//! MQTT 3.1.1 and 5 on the embedded rmqtt broker.
//!
//! rmqtt runs inside our tokio runtime; citygw plugs in through its hooks (see [`hooks`]):
//! authentication with proper CONNACK codes, identity from the authenticated session, the durable
//! write before the PUBACK. Why rmqtt and not rumqttd is measured in ../shared/DESIGN.md.
//!
//! Up to three listeners share one broker: plain MQTT (`listen`), MQTT over TLS with the device
//! secret (`tls_listen`), and MQTT over TLS where the client certificate names the device
//! (`mtls_listen`). rmqtt-net terminates TLS with our rustls configuration ([`crate::tls`]), so
//! certificates reload without a restart.

mod hooks;
mod limit;
pub mod topic;

use std::num::NonZeroU16;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use rmqtt::codec::cert::CertInfo;
use rmqtt::context::ServerContext;
use rmqtt::hook::Type;
use rmqtt::net::{Builder, CertInfoFn, Listener};
use rmqtt::server::MqttServer;
use rmqtt::types::Id;
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::control::commands::{transport::mqtt::Mqtt, Commands};
use crate::pipeline::Pipeline;
use crate::registry::{Registry, RegistryEvent};
use crate::tls::identity::{self, IdentityField};
use crate::tls::{CertCheck, Reloader, ServerTls};

/// Device ids are at most 128 characters, so longer client ids are refused by rmqtt before any
/// hook runs (CONNACK "identifier rejected").
const MAX_CLIENT_ID: usize = 128;

pub struct MqttSource {
    pub config: MqttConfig,
    pub registry: Registry,
    pub pipeline: Pipeline,
    pub commands: Commands,
    /// Where a device certificate names the device (mTLS listener).
    pub identity_field: IdentityField,
    pub reloader: Reloader,
}

/// The checks a device certificate passes at the handshake, beyond its chain and CRL: it names
/// a device, and that device is not pinned to another certificate.
fn device_cert_check(registry: Registry, field: IdentityField) -> CertCheck {
    Arc::new(move |der| {
        let id = identity::identity(der, field).map_err(|_| "no_identity")?;
        match registry.get(&id.device_id) {
            Some(d) if d.cert_pin().is_some_and(|pin| *pin != id.fingerprint) => {
                Err("pin_mismatch")
            }
            _ => Ok(()),
        }
    })
}

/// What the hooks see of a device certificate: the device it names as the CN field.
fn device_cert_info(field: IdentityField) -> CertInfoFn {
    CertInfoFn(Arc::new(move |chain| {
        let id = identity::identity(chain.first()?, field).ok()?;
        Some(CertInfo {
            common_name: Some(id.device_id),
            subject: id.subject,
            serial: Some(id.serial),
            organization: None,
        })
    }))
}

impl super::Source for MqttSource {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn start(
        self: Box<Self>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>> {
        let cfg = &self.config;
        // Accepted sockets wait in rmqtt's handshake queue holding a descriptor each; bounding
        // the queue bounds them (beyond it a new socket is closed and the device retries).
        let pending_handshakes = cfg.max_handshaking.saturating_mul(2);
        let open_files = limit::raise_open_files_limit();
        let sessions =
            limit::SessionLimit::new(cfg.max_connections, open_files, pending_handshakes);
        if sessions.cap() < cfg.max_connections {
            tracing::warn!(
                open_files,
                max_connections = cfg.max_connections,
                cap = sessions.cap(),
                "mqtt sessions capped by the open-files limit; raise LimitNOFILE to hold more"
            );
        }
        metrics::gauge!("citygw_mqtt_session_limit").set(sessions.cap() as f64);
        let builder = |name: &str, addr| {
            Builder::new()
                .name(name)
                .laddr(addr)
                .allow_anonymous(false)
                .max_clientid_len(MAX_CLIENT_ID)
                .max_packet_size(cfg.max_packet_bytes)
                .max_connections(pending_handshakes)
                .max_handshaking_limit(cfg.max_handshaking)
                .handshake_timeout(std::time::Duration::from_secs(cfg.handshake_timeout_secs))
                // Up to `max_inflight` messages of a connection are decoded and stored side by
                // side; rmqtt (vendor/, decision 0012) sends their PUBACKs in arrival order.
                .max_inflight(NonZeroU16::new(cfg.max_inflight).unwrap_or(NonZeroU16::MIN))
                .pipelined_publishes(true)
                .nodelay(true)
                .reuseaddr(Some(true))
        };
        let bound = |b: Builder, addr| {
            b.bind()
                .map_err(|e| anyhow::anyhow!("mqtt listener {addr}: {e}"))
        };
        let mut listeners: Vec<Listener> = vec![bound(builder("mqtt", cfg.listen), cfg.listen)?
            .tcp()
            .map_err(|e| anyhow::anyhow!("mqtt listener {}: {e}", cfg.listen))?];
        tracing::info!(listen = %cfg.listen, "mqtt listening");
        for mtls in [false, true] {
            let Some(files) = cfg.tls_files(mtls)? else {
                continue;
            };
            let (name, addr) = if mtls {
                ("mqtt_mtls", cfg.mtls_listen)
            } else {
                ("mqtt_tls", cfg.tls_listen)
            };
            let check = mtls.then(|| device_cert_check(self.registry.clone(), self.identity_field));
            let tls = ServerTls::new(name, files, &[], check)
                .map_err(|e| anyhow::anyhow!("{name}: {e:#}"))?;
            self.reloader.add(tls.clone());
            let mut b = builder(name, addr).tls_server_config(tls.config());
            if mtls {
                b = b
                    .collect_cert_info(true)
                    .cert_info_fn(device_cert_info(self.identity_field));
            }
            listeners.push(
                bound(b, addr)?
                    .tls()
                    .map_err(|e| anyhow::anyhow!("{name} listener {addr}: {e}"))?,
            );
            tracing::info!(listen = %addr, client_certificates = mtls, "mqtt over TLS listening");
        }
        Ok(async move {
            // rmqtt's busy check refuses CONNECTs when the host's load average is high; on a
            // shared 2-core host that would turn noise into refused devices. Handshake
            // concurrency is bounded by `max_handshaking` instead.
            let scx = ServerContext::new().busy_check_enable(false).build().await;
            let hooks = hooks::Hooks {
                registry: self.registry.clone(),
                pipeline: self.pipeline,
                sessions,
                commands: self.commands.clone(),
            };
            let register = scx.extends.hook_mgr().register();
            for typ in [
                Type::ClientAuthenticate,
                Type::ClientConnected,
                Type::ClientDisconnected,
                Type::ClientSubscribeCheckAcl,
                Type::MessagePublishCheckAcl,
                Type::MessagePublish,
                Type::SessionSubscribed,
                Type::MessageDelivered,
                Type::MessageAcked,
            ] {
                register.add(typ, Box::new(hooks.clone())).await;
            }
            register.start().await;
            self.commands
                .attach(std::sync::Arc::new(Mqtt::new(scx.clone())));
            let kicker = tokio::spawn(kick_disabled(scx.clone(), self.registry));
            // Listener ids are explicit: ports may be 0 (chosen by the system) in tests.
            let server = listeners
                .into_iter()
                .zip(1u16..)
                .fold(MqttServer::new(scx), |s, (l, id)| s.listener_by_id(l, id))
                .build();
            let result = tokio::select! {
                r = server.run() => r.map_err(|e| anyhow::anyhow!("mqtt server: {e}")),
                _ = shutdown.cancelled() => Ok(()),
            };
            kicker.abort();
            result
        }
        .boxed())
    }
}

/// Disconnects the live session of every device the registry disables.
async fn kick_disabled(scx: ServerContext, registry: Registry) {
    let mut events = registry.events();
    loop {
        match events.recv().await {
            Ok(RegistryEvent::Disabled(device_id)) => {
                let id = Id::from(scx.node.id(), device_id.as_str().into());
                let mut entry = scx.extends.shared().await.entry(id);
                if entry.session().is_some() {
                    match entry.kick(true, true, true).await {
                        Ok(_) => {
                            tracing::info!(device = %device_id, "disabled device disconnected")
                        }
                        Err(e) => {
                            tracing::warn!(device = %device_id, error = %e, "could not disconnect disabled device")
                        }
                    }
                }
            }
            // Missed events only delay a kick: the publish hook refuses disabled devices anyway.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "registry events lagged");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
