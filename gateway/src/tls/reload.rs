//! Reloads certificates, keys, client CAs and CRLs without a restart: on SIGHUP, and when one of
//! a listener's files changes (checked every `tls.watch_secs`). New handshakes get the new
//! material; connections already established keep theirs. A set of files that does not load
//! (a key that does not match its certificate, a file half written) leaves the listener on what
//! it had, and is retried when the files change again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// Something holding TLS material loaded from files.
pub trait Reloadable: Send + Sync {
    /// The listener, for metrics and logs.
    fn name(&self) -> &str;
    fn files(&self) -> Vec<PathBuf>;
    /// Loads the files again and swaps them in, or changes nothing and says why.
    fn reload(&self) -> anyhow::Result<()>;
}

/// What a file looked like at the last check: changed contents change one of these.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Every TLS listener of the process, reloaded together on SIGHUP and one by one on change.
/// Listeners register as they start; clones share the list.
#[derive(Clone, Default)]
pub struct Reloader {
    items: Arc<Mutex<Vec<Arc<dyn Reloadable>>>>,
}

impl Reloader {
    pub fn add(&self, item: Arc<dyn Reloadable>) {
        self.items.lock().expect("reloader lock").push(item);
    }

    /// Serves reloads of the listeners registered so far until `shutdown`; `watch` zero checks
    /// files only on SIGHUP.
    pub async fn run(self, watch: Duration, shutdown: CancellationToken) {
        // Runs (and holds SIGHUP, whose default action ends the process) even with no TLS
        // listener: a reload signal is then a no-op.
        let items = self.items.lock().expect("reloader lock").clone();
        let mut stamps: HashMap<usize, Stamp> = items
            .iter()
            .enumerate()
            .map(|(i, item)| (i, stamp(&item.files())))
            .collect();
        #[cfg(unix)]
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: certificates reload on file change only");
                None
            }
        };
        let mut tick = tokio::time::interval(if watch.is_zero() {
            Duration::from_secs(3600 * 24 * 365)
        } else {
            watch
        });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hangup => {
                    tracing::info!(listeners = items.len(), "SIGHUP: reloading TLS certificates");
                    for (i, item) in items.iter().enumerate() {
                        stamps.insert(i, stamp(&item.files()));
                        reload(item.as_ref(), "sighup");
                    }
                }
                _ = tick.tick(), if !watch.is_zero() => {
                    for (i, item) in items.iter().enumerate() {
                        let now = stamp(&item.files());
                        if stamps.get(&i) != Some(&now) {
                            stamps.insert(i, now);
                            reload(item.as_ref(), "file_change");
                        }
                    }
                }
            }
        }
    }
}

fn reload(item: &dyn Reloadable, trigger: &'static str) {
    let name = item.name().to_string();
    match item.reload() {
        Ok(()) => {
            metrics::counter!("citygw_tls_reloads_total", "listener" => name.clone(), "result" => "ok")
                .increment(1);
            tracing::info!(listener = %name, trigger, "TLS certificates reloaded");
        }
        Err(e) => {
            metrics::counter!("citygw_tls_reloads_total", "listener" => name.clone(), "result" => "failed")
                .increment(1);
            tracing::error!(listener = %name, trigger, error = %e, "TLS reload failed; still serving the previous certificates");
        }
    }
}
