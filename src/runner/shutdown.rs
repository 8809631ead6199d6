//! Stopping: the signal that asks for it, and what is left to finish once
//! no delivery is taken.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinSet;

use super::consume::log_join;
use super::settle::Settler;
use crate::report::Tally;
use crate::stopping::Stopping;

/// What is left of a runner once it stopped taking deliveries.
pub(super) struct Finish {
    pub(super) tasks: JoinSet<()>,
    pub(super) settler: Settler,
    pub(super) settlings: Vec<tokio::task::JoinHandle<()>>,
    pub(super) tally: Arc<Tally>,
    pub(super) shutdown_deadline: Duration,
    /// Counts the releases of the guards dropped when tasks are abandoned.
    pub(super) stopping: Stopping,
}

impl Finish {
    /// Waits for the handlers in flight, up to the deadline, then abandons
    /// the rest (their claims are kept until their leases end), and lets
    /// the settlers send what is left.
    pub(super) async fn run(self) {
        let Self {
            mut tasks,
            settler,
            settlings,
            tally,
            shutdown_deadline,
            stopping,
        } = self;
        let drained = tokio::time::timeout(shutdown_deadline, async {
            while let Some(joined) = tasks.join_next().await {
                log_join(joined);
            }
        })
        .await;
        if drained.is_err() {
            let abandoned = tasks.len() as u64;
            tracing::warn!(abandoned, deadline = ?shutdown_deadline, "handlers still running at the shutdown deadline: abandoning them; their claims are kept until their leases end");
            tasks.shutdown().await;
            tally.add(|r| r.abandoned += abandoned);
            if !stopping.releases_settled(Duration::from_secs(5)).await {
                tracing::warn!(
                    "some claims could not be released in time; they expire with their lease"
                );
            }
        }
        // Every delivery task is gone: the settlers send what is left and end.
        drop(settler);
        for settling in settlings {
            let abort = settling.abort_handle();
            match tokio::time::timeout(shutdown_deadline, settling).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => tracing::error!(
                    "the settler task failed; unsettled deliveries return when the channel closes"
                ),
                Err(_) => {
                    abort.abort();
                    tracing::warn!(
                        "the broker did not take the last acks in time; those deliveries return when the channel closes"
                    );
                }
            }
        }
    }
}

/// The future that asks the runner to stop: the one given, else SIGINT or
/// SIGTERM when signals are on, else never.
pub(super) fn stop_signal(
    given: Option<BoxFuture<'static, ()>>,
    signals: bool,
) -> BoxFuture<'static, ()> {
    match given {
        Some(signal) => signal,
        None if signals => Box::pin(termination_signal()),
        None => Box::pin(std::future::pending()),
    }
}

/// Completes on SIGINT or SIGTERM.
async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("termination signal received: stopping");
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
