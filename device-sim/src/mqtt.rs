//! MQTT connections on rumqttc: options per simulated device, connect with CONNACK wait, and
//! the errors worth counting.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::credentials::Credential;
use crate::TargetArgs;

/// Per-connection settings beyond the target and the credential.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub keep_alive: Duration,
    /// Unacknowledged QoS1 publishes one connection may have outstanding.
    pub inflight: u16,
    /// Capacity of the client -> event loop request channel.
    pub request_capacity: usize,
    pub connect_timeout: Duration,
}

/// Host of connection `i`: the hosts are used round-robin.
pub fn host_for(target: &TargetArgs, i: usize) -> &str {
    &target.host[i % target.host.len()]
}

/// The TLS client configuration of every connection of this run (`--ca-file`), built once.
fn tls(target: &TargetArgs) -> Option<rumqttc::Transport> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    let ca = target.ca_file.as_deref()?;
    let config = CONFIG.get_or_init(|| {
        citygw::tls::client_config(Some(ca))
            .unwrap_or_else(|e| panic!("--ca-file {}: {e:#}", ca.display()))
    });
    Some(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
        config.clone(),
    )))
}

pub fn options(target: &TargetArgs, i: usize, cred: &Credential, session: &Session) -> MqttOptions {
    let mut opts = MqttOptions::new(cred.id.clone(), host_for(target, i), target.port);
    if let Some(transport) = tls(target) {
        opts.set_transport(transport);
    }
    opts.set_credentials(cred.id.clone(), cred.secret.clone())
        .set_keep_alive(session.keep_alive)
        .set_clean_session(true)
        .set_inflight(session.inflight)
        .set_request_channel_capacity(session.request_capacity)
        .set_max_packet_size(1 << 20, 1 << 20);
    opts
}

/// Opens the connection and waits for a successful CONNACK.
pub async fn connect(
    opts: MqttOptions,
    session: &Session,
) -> Result<(AsyncClient, EventLoop), ConnectError> {
    let (client, mut eventloop) = AsyncClient::new(opts, session.request_capacity);
    let mut net = eventloop.network_options();
    net.set_connection_timeout(session.connect_timeout.as_secs().max(1));
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    match tokio::time::timeout(session.connect_timeout, eventloop.poll()).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Err(e)) => Err(ConnectError::from(e)),
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok((client, eventloop)),
        Ok(Ok(other)) => Err(ConnectError::Protocol(format!(
            "expected CONNACK, got {other:?}"
        ))),
    }
}

/// Why a connection could not be opened, coarse enough to count by kind.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Refused(String),
    Io(std::io::Error),
    Protocol(String),
}

impl ConnectError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Timeout => "timeout",
            ConnectError::Refused(_) => "refused",
            ConnectError::Io(_) => "io",
            ConnectError::Protocol(_) => "protocol",
        }
    }
}

impl From<ConnectionError> for ConnectError {
    fn from(e: ConnectionError) -> Self {
        match e {
            ConnectionError::ConnectionRefused(code) => ConnectError::Refused(format!("{code:?}")),
            ConnectionError::NetworkTimeout => ConnectError::Timeout,
            ConnectionError::Io(e) => ConnectError::Io(e),
            other => ConnectError::Protocol(other.to_string()),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => write!(f, "connect timed out"),
            ConnectError::Refused(code) => write!(f, "connection refused: {code}"),
            ConnectError::Io(e) => write!(f, "i/o: {e}"),
            ConnectError::Protocol(e) => write!(f, "{e}"),
        }
    }
}

/// Topic a device publishes its telemetry on.
pub fn telemetry_topic(device_id: &str) -> String {
    format!("devices/{device_id}/telemetry")
}

/// One established connection, handed to the per-connection work.
pub struct Connected {
    pub index: usize,
    pub device_id: String,
    pub client: AsyncClient,
    pub eventloop: EventLoop,
}

/// Connection counters shared by the connecting tasks and the progress reporter.
#[derive(Default)]
pub struct ConnectProgress {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    /// Connections currently open (decremented by the work when a connection ends).
    pub open: AtomicU64,
    pub peak_open: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    samples: Mutex<Vec<String>>,
}

impl ConnectProgress {
    pub fn attempted(&self) -> u64 {
        self.connected.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }

    pub fn opened(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open.fetch_max(open, Ordering::Relaxed);
    }

    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn fail(&self, device_id: &str, e: &ConnectError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self.failures.lock().unwrap().entry(e.kind()).or_default() += 1;
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 5 {
            samples.push(format!("{device_id}: {e}"));
        }
    }

    pub fn failures(&self) -> BTreeMap<&'static str, u64> {
        self.failures.lock().unwrap().clone()
    }

    pub fn samples(&self) -> Vec<String> {
        self.samples.lock().unwrap().clone()
    }
}

/// Opens one connection per credential, at most `target.connect_concurrency` handshakes at a
/// time, and runs `work` on each as soon as it is connected (so connections made early are
/// already served while later ones are still connecting). Failures are counted in `progress`.
pub fn spawn_connections<F, Fut>(
    target: &TargetArgs,
    creds: Vec<Credential>,
    session: Session,
    progress: Arc<ConnectProgress>,
    work: F,
) -> Vec<JoinHandle<Option<Fut::Output>>>
where
    F: Fn(Connected) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let permits = Arc::new(Semaphore::new(target.connect_concurrency.max(1)));
    let work = Arc::new(work);
    creds
        .into_iter()
        .enumerate()
        .map(|(index, cred)| {
            let opts = options(target, index, &cred, &session);
            let (permits, progress, work) = (permits.clone(), progress.clone(), work.clone());
            tokio::spawn(async move {
                let permit = permits
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed");
                let result = connect(opts, &session).await;
                drop(permit);
                match result {
                    Ok((client, eventloop)) => {
                        progress.opened();
                        let conn = Connected {
                            index,
                            device_id: cred.id,
                            client,
                            eventloop,
                        };
                        Some(work(conn).await)
                    }
                    Err(e) => {
                        progress.fail(&cred.id, &e);
                        None
                    }
                }
            })
        })
        .collect()
}

/// Sends DISCONNECT and waits (briefly) until it is written, so the broker sees a clean close.
pub async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// The same for an MQTT 5 connection.
pub async fn disconnect_v5(
    client: &rumqttc::v5::AsyncClient,
    eventloop: &mut rumqttc::v5::EventLoop,
) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_round_robin() {
        let target = TargetArgs {
            host: vec!["127.0.0.1".into(), "127.0.0.2".into()],
            port: 1883,
            connections: 3,
            credentials: None,
            connect_concurrency: 1,
            connect_timeout: 1,
            ca_file: None,
        };
        assert_eq!(host_for(&target, 0), "127.0.0.1");
        assert_eq!(host_for(&target, 3), "127.0.0.2");
    }

    #[test]
    fn topic_shape() {
        assert_eq!(telemetry_topic("aq-1"), "devices/aq-1/telemetry");
    }
}
