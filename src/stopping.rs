//! [`Stopping`]: what the runner and the layer share about a shutdown, as
//! an explicit handle. The runner says when it stops; the layer's holds
//! (a delivery kept while the store is down, an outbox waiting for its
//! confirms) end then instead of at the shutdown deadline; and claims that
//! guards release in the background once dropped are counted in it, so
//! that the runner waits for them before it returns.
//!
//! ```no_run
//! use std::convert::Infallible;
//! use amqp_idempotency::{serve, Config, IdempotencyLayer, ServeOptions, store::RedisStore};
//! use tower::{Layer, service_fn};
//!
//! # async fn run(consumer: lapin::Consumer, channel: lapin::Channel) -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_env()?;
//! let layer = IdempotencyLayer::new(RedisStore::connect(&config).await?, "orders", config.clone())?;
//! // The layer's handle, given to the runner that serves it.
//! let options = ServeOptions::from_config(&config)
//!     .stopping(layer.stopping())
//!     .close_channel(channel);
//! let service = layer.layer(service_fn(|_delivery| async { Ok::<_, Infallible>(()) }));
//! serve(consumer, service, options).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Without it the runner still stops and loses nothing: a held delivery
//! keeps its hold until the shutdown deadline, and is then given back to
//! the queue with the channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// A shutdown shared by a runner and the layers it serves: give the
/// layer's handle ([`IdempotencyLayer::stopping`](crate::IdempotencyLayer::stopping))
/// to the runner ([`ServeOptions::stopping`](crate::ServeOptions::stopping)),
/// and the deliveries the layer holds (the store down, an outbox waiting
/// for its confirms) are given back as soon as the runner stops, instead of
/// at the shutdown deadline. Clones share it; [`Default`] is a new one.
#[derive(Clone, Debug, Default)]
pub struct Stopping {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    stopped: watch::Sender<bool>,
    /// Releases of dropped guards still on their way to the store.
    pending: AtomicUsize,
    settled: Notify,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            stopped: watch::Sender::new(false),
            pending: AtomicUsize::new(0),
            settled: Notify::new(),
        }
    }
}

impl Stopping {
    /// A handle that has not stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the runner holding this handle has stopped.
    pub fn is_stopped(&self) -> bool {
        *self.shared.stopped.borrow()
    }

    /// Says that the runner stops: every hold waiting on [`stopped`](Self::stopped) ends.
    pub(crate) fn stop(&self) {
        self.shared.stopped.send_replace(true);
    }

    /// Completes once [`stop`](Self::stop) was called.
    pub(crate) async fn stopped(&self) {
        let mut stopped = self.shared.stopped.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }

    /// Counts one background release until the returned value is dropped.
    pub(crate) fn release_started(&self) -> PendingRelease {
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        PendingRelease {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Waits, up to `deadline`, for the background releases to reach the
    /// store; false when some were still on their way.
    pub(crate) async fn releases_settled(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.shared.settled.notified();
                if self.shared.pending.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

/// One background release in flight; counts itself down when dropped,
/// even if the runtime drops its task before it ran.
pub(crate) struct PendingRelease {
    shared: Arc<Shared>,
}

impl Drop for PendingRelease {
    fn drop(&mut self) {
        self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        self.shared.settled.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_end_once_stopped_and_releases_are_waited_for() {
        let stopping = Stopping::new();
        assert!(!stopping.is_stopped());
        let waiter = tokio::spawn({
            let stopping = stopping.clone();
            async move { stopping.stopped().await }
        });
        stopping.stop();
        waiter.await.unwrap();
        assert!(stopping.is_stopped());

        let pending = stopping.release_started();
        assert!(
            !stopping.releases_settled(Duration::from_millis(10)).await,
            "one release still on its way"
        );
        drop(pending);
        assert!(stopping.releases_settled(Duration::from_millis(10)).await);
    }
}
