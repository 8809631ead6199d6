//! How a delivery the layer holds learns that the runner stops: the runner
//! runs each call of the service within [`scope`], and a hold (a store
//! outage, an undispatched outbox) ends early on [`runner_stopping`].
//!
//! ```ignore
//! let (stop, stopping) = tokio::sync::watch::channel(false);
//! let call = stopping::scope(stopping, service.call(delivery));
//! ```
//!
//! A task-local, not an argument: the runner serves any
//! `tower::Service<Delivery>`, and the user's own layers between the
//! runner and ours could not pass a signal through. Outside a runner (the
//! guard API, a test calling the service) a hold simply never ends early.

use std::future::Future;

use tokio::sync::watch;

tokio::task_local! {
    /// Set by the runner around each delivery: true once it stops.
    static STOPPING: watch::Receiver<bool>;
}

/// Runs `call` so that [`runner_stopping`] within it follows `stopping`.
pub(crate) fn scope<F: Future>(
    stopping: watch::Receiver<bool>,
    call: F,
) -> impl Future<Output = F::Output> {
    STOPPING.scope(stopping, call)
}

/// Completes once the runner that called the layer stops; never when the
/// layer was called by something else.
pub(crate) async fn runner_stopping() {
    match STOPPING.try_with(watch::Receiver::clone) {
        Ok(mut stopping) => {
            if stopping.wait_for(|stopping| *stopping).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        Err(_) => std::future::pending().await,
    }
}
