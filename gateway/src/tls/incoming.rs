//! TLS on a TCP listener for the gRPC and HTTP servers: connections are accepted in one task and
//! each handshake runs in its own, so a client that never finishes its handshake holds one task
//! until the handshake timeout, never the accept loop. Finished handshakes are handed over as a
//! stream (tonic) or through axum's `Listener`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::ServerTls;

/// Handshakes in progress at once; accepting waits beyond it.
const MAX_HANDSHAKING: usize = 1024;
/// A client has this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that finished their TLS handshake.
pub struct TlsIncoming {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TlsIncoming {
    /// Starts accepting on `listener` with `tls`; `nodelay` sets TCP_NODELAY on every connection.
    pub fn new(listener: TcpListener, tls: Arc<ServerTls>, nodelay: bool) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let name = tls.name;
        let acceptor = TlsAcceptor::from(tls.config());
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKING));
        let accept = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: wait rather than spin.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(nodelay);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let result =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(permit);
                    match result {
                        Ok(Ok(stream)) => {
                            handshake(name, "ok");
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            handshake(name, "failed");
                            tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => handshake(name, "timeout"),
                    }
                });
            }
        });
        Ok(TlsIncoming { rx, local, accept })
    }

    /// The connections as a stream, for tonic's `serve_with_incoming`.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = io::Result<TlsStream<TcpStream>>> + Send + 'static {
        futures::stream::unfold(self, |mut this| async move {
            let (stream, _) = this.rx.recv().await?;
            Some((Ok(stream), this))
        })
    }
}

fn handshake(listener: &'static str, result: &'static str) {
    metrics::counter!("citygw_tls_handshakes_total", "listener" => listener, "result" => result)
        .increment(1);
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task ended (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
