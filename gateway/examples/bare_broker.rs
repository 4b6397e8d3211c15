//! The MQTT ingest benchmark's baseline: rmqtt with an *empty* hook.
//!
//! The same rmqtt version and listener settings as citygw (see src/sources/mqtt/mod.rs), with a
//! handler registered for `ClientAuthenticate` (allows everyone) and `MessagePublishCheckAcl`
//! (allows every publish), so the hook machinery costs what it costs in citygw but no work is
//! done: no authentication lookup, no decode, no store, no fsync. Nothing subscribes, so
//! messages are acknowledged and dropped.
//!
//!     cargo run --release -p citygw --example bare_broker -- --listen 127.0.0.1:21883
//!
//! Used by bench/mqtt_ingest; not part of the product.

use async_trait::async_trait;

// The same allocator as citygw, so the ratio compares the work done, not the allocators.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, PublishAclResult};

struct EmptyHook;

#[async_trait]
impl Handler for EmptyHook {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(_) => (
                false,
                Some(HookResult::AuthResult(AuthResult::Allow(false, None))),
            ),
            Parameter::MessagePublishCheckAcl(_, _) => (
                false,
                Some(HookResult::PublishAclResult(PublishAclResult::allow())),
            ),
            _ => (true, acc),
        }
    }
}

fn listen_arg() -> anyhow::Result<std::net::SocketAddr> {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:1883".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--listen needs ADDR"))?
            }
            "-h" | "--help" => {
                println!(
                    "bare_broker [--listen ADDR]   rmqtt with an empty hook (benchmark baseline)"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}; usage: bare_broker [--listen ADDR]"),
        }
    }
    Ok(listen.parse()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = listen_arg()?;
    // Mirrors citygw's defaults in config.rs / sources/mqtt/mod.rs.
    let listener = Builder::new()
        .name("mqtt")
        .laddr(listen)
        .allow_anonymous(false)
        .max_packet_size(16 * 1024 * 1024)
        .max_connections(1_000_000)
        .max_handshaking_limit(1_000)
        .handshake_timeout(std::time::Duration::from_secs(30))
        .max_inflight(std::num::NonZeroU16::new(64).expect("non-zero"))
        .pipelined_publishes(true)
        .nodelay(true)
        .reuseaddr(Some(true))
        .bind()
        .map_err(|e| anyhow::anyhow!("listener {listen}: {e}"))?
        .tcp()
        .map_err(|e| anyhow::anyhow!("listener {listen}: {e}"))?;
    // As in citygw: no load-average based refusal of CONNECTs on a shared host.
    let scx = ServerContext::new().busy_check_enable(false).build().await;
    let register = scx.extends.hook_mgr().register();
    for typ in [Type::ClientAuthenticate, Type::MessagePublishCheckAcl] {
        register.add(typ, Box::new(EmptyHook)).await;
    }
    register.start().await;
    eprintln!("bare_broker listening on {listen}");
    tokio::select! {
        r = MqttServer::new(scx).listener(listener).build().run() => r.map_err(|e| anyhow::anyhow!("mqtt server: {e}"))?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
