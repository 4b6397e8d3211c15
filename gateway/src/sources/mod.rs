//! Ways in. Each source authenticates its devices by its protocol's means, then hands every
//! message to the [`Pipeline`](crate::pipeline::Pipeline) with the authenticated identity.

pub mod coap;
pub mod lorawan;
pub mod mqtt;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// One listener or bridge feeding the pipeline.
pub trait Source: Send {
    /// Short name for logs and metrics, e.g. "mqtt".
    fn name(&self) -> &'static str;

    /// Serves until `shutdown` is cancelled. Binding errors surface before the future is
    /// returned, so a misconfigured port fails the start, not a background task.
    fn start(
        self: Box<Self>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>>;
}
