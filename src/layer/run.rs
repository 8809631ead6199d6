//! The handler run under a claim: the handler in a task of its own (inline
//! on a current-thread runtime), the lease renewed every third of its TTL
//! while it waits, the handler timeout, and a panic turned into a
//! retryable failure.
//!
//! ```ignore
//! let run = run_claimed(config, &guard, HandlerRun::start(inner, request)).await;
//! if run.timed_out {
//!     tokio::time::sleep_until(run.lease_ends).await; // its work may go on
//! }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::config::Config;
use crate::error::{BoxError, HandlerError};
use crate::guard::ClaimGuard;
use crate::store::Store;

/// What the layer asks of a handler, in one name: a service it can move
/// into a task of its own, whose failures it can box. Every handler that
/// `Idempotency`'s `Service` impl accepts is one.
pub(super) trait Handler<R>:
    Service<R, Error: Into<BoxError> + Send, Response: Send + 'static, Future: Send + 'static>
    + Send
    + 'static
{
}

impl<S, R> Handler<R> for S
where
    S: Service<R> + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
}

/// How a claimed handler run ended.
pub(super) struct Run {
    pub(super) result: Result<(), HandlerError>,
    /// A renewal found the claim taken over.
    pub(super) lease_lost: bool,
    /// The handler timed out; its work may go on.
    pub(super) timed_out: bool,
    /// When the lease ends, counted from the last renewal sent.
    pub(super) lease_ends: Instant,
}

/// Runs the handler under the claim. The handler runs in a task of its
/// own, so that one that blocks its thread stops neither the renewals
/// (every third of the lease) nor the handler timeout, both kept here.
///
/// `handler` is the run, just started ([`HandlerRun::start`]): the request
/// and the handler live in its box or task, not in every delivery's future.
pub(super) async fn run_claimed<St: Store>(
    config: &Config,
    guard: &ClaimGuard<St>,
    mut handler: HandlerRun,
) -> Run {
    let lease_lost = AtomicBool::new(false);
    let started = Instant::now();
    let lease_ends_at_start = started + config.lease_ttl;
    let lease_ends = std::sync::Mutex::new(lease_ends_at_start);
    if let HandlerRun::Inline(run) = &mut handler {
        // A handler that finishes without waiting needs neither the
        // timeout's timer nor the renewals': most deliveries' work is done
        // here, on the first poll (with this task's own waker, so a pending
        // handler is woken as usual and driven below).
        let first = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
        if let Poll::Ready(result) = first {
            return Run {
                result,
                lease_lost: false,
                timed_out: false,
                lease_ends: lease_ends_at_start,
            };
        }
    }
    let period = config.lease_ttl / 3;
    // Boxed: only a handler that waits needs it, and inline it would
    // make every delivery's future larger.
    let renewing = Box::pin(async {
        loop {
            tokio::time::sleep(period).await;
            let sent = Instant::now();
            match guard.renew().await {
                Ok(true) => {
                    if let Ok(mut ends) = lease_ends.lock() {
                        *ends = sent + config.lease_ttl;
                    }
                }
                Ok(false) => {
                    lease_lost.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        key = guard.key(),
                        "lease lost while the handler runs: another consumer may take the message over"
                    );
                    // Nothing left to renew; the handler runs on.
                    std::future::pending::<()>().await;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "lease renewal failed; retrying at the next tick");
                }
            }
        }
    });
    if matches!(handler, HandlerRun::Spawned(_)) {
        // The handler sits in this worker's LIFO slot, which no other
        // worker may steal from: if it blocks the thread while every other
        // worker is parked, nothing drives the timers. Yielding once puts
        // this task in the stealable queue and wakes an idle worker, which
        // then keeps the renewals and the timeout running.
        YieldOnce(false).await;
    }
    let (result, timed_out) = tokio::select! {
        joined = tokio::time::timeout_at(started + config.handler_timeout, &mut handler) => match joined {
            Ok(result) => (result, false),
            Err(_) => {
                // Cancels at its next await; work it started may go on.
                handler.abort();
                (Err(timed_out(config)), true)
            }
        },
        () = renewing => (Err(HandlerError::retryable("lease renewal stopped unexpectedly")), false),
    };
    let lease_ends = lease_ends
        .lock()
        .map_or_else(|poisoned| *poisoned.into_inner(), |ends| *ends);
    Run {
        result,
        lease_lost: lease_lost.load(Ordering::Relaxed),
        timed_out,
        lease_ends,
    }
}

/// Returns `Pending` once after waking itself: the task is scheduled again
/// as a yield, at the back of the worker's queue, and an idle worker is
/// woken (unlike `tokio::task::yield_now`, which defers the wake until the
/// worker has nothing else to run).
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// One run of the handler. On a multi-thread runtime it runs in a task of
/// its own, so that a handler that blocks its thread stops neither the
/// renewals nor the timeout; on a current-thread runtime, where one
/// blocked thread stops everything anyway, it runs inline and saves the
/// spawn.
pub(super) enum HandlerRun {
    Spawned(tokio::task::JoinHandle<Result<(), BoxError>>),
    Inline(BoxFuture<'static, Result<(), HandlerError>>),
}

impl HandlerRun {
    pub(super) fn start<S, R>(inner: S, request: R) -> Self
    where
        R: Send + 'static,
        S: Handler<R>,
    {
        let work = async move { inner.oneshot(request).await.map(drop).map_err(Into::into) };
        let one_thread = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
            runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
        });
        if one_thread {
            let caught = std::panic::AssertUnwindSafe(work).catch_unwind();
            return Self::Inline(Box::pin(async move {
                match caught.await {
                    Ok(result) => result.map_err(HandlerError::classify),
                    Err(panic) => Err(panicked(panic.as_ref())),
                }
            }));
        }
        // The delivery's span goes along; task-locals set around the
        // layer's call do not.
        Self::Spawned(tokio::spawn(work.instrument(tracing::Span::current())))
    }

    /// Stops the handler at its next await; work it started may go on.
    pub(super) fn abort(&self) {
        if let Self::Spawned(task) = self {
            task.abort();
        }
    }
}

impl Future for HandlerRun {
    type Output = Result<(), HandlerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Self::Spawned(task) => Pin::new(task).poll(cx).map(handler_result),
            Self::Inline(run) => run.as_mut().poll(cx),
        }
    }
}

/// A panic, as a retryable failure (so it backs off and is dead-lettered
/// after the last attempt instead of looping).
fn panicked(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    tracing::error!(panic = %message, "handler panicked");
    HandlerError::retryable(format!("handler panicked: {message}"))
}

/// A handler task's end as a handler result: a panic counts as a retryable
/// failure (so it backs off and is dead-lettered after the last attempt
/// instead of looping).
fn handler_result(
    joined: Result<Result<(), BoxError>, tokio::task::JoinError>,
) -> Result<(), HandlerError> {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(HandlerError::classify(err)),
        Err(err) if err.is_panic() => Err(panicked(err.into_panic().as_ref())),
        Err(_) => Err(HandlerError::retryable(
            "the handler task was cancelled (is the runtime shutting down?)",
        )),
    }
}

pub(super) fn timed_out(config: &Config) -> HandlerError {
    HandlerError::retryable(format!(
        "handler timed out after {:?} (IDEMPOTENCY_HANDLER_TIMEOUT)",
        config.handler_timeout
    ))
}
