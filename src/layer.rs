//! The tower middleware: [`IdempotencyLayer`] and [`Idempotency`].
//!
//! ```
//! use std::convert::Infallible;
//! use amqp_idempotency::{Config, IdempotencyLayer, OutcomeKind, store::MemoryStore};
//! use lapin::{message::Delivery, BasicProperties};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), amqp_idempotency::BoxError> {
//! let layer = IdempotencyLayer::new(MemoryStore::new(), "orders", Config::default())?;
//! let service = layer.layer(service_fn(|delivery: Delivery| async move {
//!     println!("charging for {:?}", delivery.properties.message_id());
//!     Ok::<_, Infallible>(())
//! }));
//!
//! let message = || {
//!     let mut d = Delivery::mock(1, "".into(), "orders".into(), false, b"{}".to_vec());
//!     d.properties = BasicProperties::default().with_message_id("order-7".into());
//!     d
//! };
//! assert_eq!(service.clone().oneshot(message()).await?.kind(), OutcomeKind::Processed);
//! assert_eq!(service.oneshot(message()).await?.kind(), OutcomeKind::Duplicate);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use crate::config::{Config, StoreFailurePolicy};
use crate::error::{BoxError, ConfigError, FailureKind, HandlerError};
use crate::fingerprint::{Fingerprint, MessageIdOrBodyHash};
use crate::guard::{Begin, ClaimGuard, Deduplicator, Skip};
use crate::outcome::{Disposition, Outcome, OutcomeKind};
use crate::store::Store;

/// Wraps a handler (`Service<Delivery>`) in [`Idempotency`].
pub struct IdempotencyLayer<St, F = MessageIdOrBodyHash> {
    dedup: Deduplicator<St, F>,
}

impl<St, F> Clone for IdempotencyLayer<St, F> {
    fn clone(&self) -> Self {
        Self {
            dedup: self.dedup.clone(),
        }
    }
}

impl<St, F> std::fmt::Debug for IdempotencyLayer<St, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("dedup", &self.dedup)
            .finish()
    }
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer over `store` for deliveries from `queue` (the default scope),
    /// with the default fingerprint. Fails when `config` is inconsistent.
    pub fn new(store: St, queue: &str, config: Config) -> Result<Self, ConfigError> {
        Ok(Self {
            dedup: Deduplicator::new(store, queue, config)?,
        })
    }
}

impl<St: Store + Clone, F: Fingerprint> IdempotencyLayer<St, F> {
    /// Uses `fingerprint` to identify duplicates.
    pub fn fingerprint<G: Fingerprint>(self, fingerprint: G) -> IdempotencyLayer<St, G> {
        IdempotencyLayer {
            dedup: self.dedup.with_fingerprint(fingerprint),
        }
    }
}

impl<St, F> IdempotencyLayer<St, F> {
    /// A layer around an existing deduplicator (shares its store and settings).
    pub fn from_deduplicator(dedup: Deduplicator<St, F>) -> Self {
        Self { dedup }
    }

    /// The deduplicator, e.g. to look up a key.
    pub fn deduplicator(&self) -> &Deduplicator<St, F> {
        &self.dedup
    }
}

impl<S, St, F> Layer<S> for IdempotencyLayer<St, F> {
    type Service = Idempotency<S, St, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            dedup: self.dedup.clone(),
            recovering: None,
        }
    }
}

/// Runs the inner handler at most once per fingerprint.
///
/// Its response is an [`Outcome`]; the runner turns it into ack, nack or
/// reject. While the store is unreachable (fail-closed), `poll_ready`
/// stays pending, so a runner that waits for readiness stops taking
/// deliveries until the store answers again.
pub struct Idempotency<S, St, F = MessageIdOrBodyHash> {
    inner: S,
    dedup: Deduplicator<St, F>,
    recovering: Option<BoxFuture<'static, ()>>,
}

impl<S: Clone, St, F> Clone for Idempotency<S, St, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            dedup: self.dedup.clone(),
            recovering: None,
        }
    }
}

impl<S: std::fmt::Debug, St, F> std::fmt::Debug for Idempotency<S, St, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("dedup", &self.dedup)
            .finish_non_exhaustive()
    }
}

impl<S, St, F> Idempotency<S, St, F> {
    /// The wrapped handler.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped handler, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the handler.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, St, F> Service<Delivery> for Idempotency<S, St, F>
where
    S: Service<Delivery> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    St: Store,
    F: Fingerprint,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let fail_closed = self.dedup.config().on_store_error == StoreFailurePolicy::FailClosed;
        if fail_closed && self.dedup.store_is_down() {
            let dedup = self.dedup.clone();
            let recovering = self
                .recovering
                .get_or_insert_with(|| Box::pin(async move { dedup.wait_for_store().await }));
            ready!(recovering.as_mut().poll(cx));
            self.recovering = None;
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        // Use the service that was driven to readiness, leave a clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let dedup = self.dedup.clone();
        let span = tracing::info_span!(
            "delivery",
            delivery_tag = delivery.delivery_tag,
            redelivered = delivery.redelivered,
            fingerprint = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        Box::pin(
            async move {
                let outcome = process(&dedup, inner, delivery).await;
                crate::metrics::outcome(outcome.kind());
                tracing::Span::current().record("outcome", outcome.kind().as_str());
                tracing::debug!(
                    attempt = outcome.attempt(),
                    reason = outcome.reason(),
                    "settled"
                );
                Ok(outcome)
            }
            .instrument(span),
        )
    }
}

async fn process<S, St, F>(dedup: &Deduplicator<St, F>, inner: S, delivery: Delivery) -> Outcome
where
    S: Service<Delivery> + Send,
    S::Error: Into<BoxError> + Send,
    S::Response: Send,
    S::Future: Send,
    St: Store,
    F: Fingerprint,
{
    let config = dedup.config();
    if let Some(limit) = config.max_body_bytes
        && delivery.data.len() > limit
    {
        tracing::error!(
            bytes = delivery.data.len(),
            limit,
            "body too large: dead-lettered"
        );
        return Outcome::new(OutcomeKind::BodyTooLarge, 0).because(format!(
            "body of {} bytes exceeds IDEMPOTENCY_MAX_BODY_BYTES={limit}",
            delivery.data.len()
        ));
    }
    let fingerprint = dedup.fingerprint(&delivery);
    if let Some(fingerprint) = &fingerprint {
        tracing::Span::current().record("fingerprint", fingerprint.as_str());
    }
    let guard = match dedup.begin_with(&delivery, fingerprint).await {
        Ok(Begin::Process(guard)) => guard,
        Ok(Begin::Unprotected) => return run_unprotected(config, inner, delivery).await,
        Ok(Begin::Skip(skip)) => return skipped(config, skip),
        Err(err)
            if err.is_unavailable() && config.on_store_error == StoreFailurePolicy::FailOpen =>
        {
            tracing::warn!(error = %err, "store unreachable; processing unprotected (fail-open)");
            return run_unprotected(config, inner, delivery).await;
        }
        Err(err) if err.is_unavailable() => {
            tracing::error!(error = %err, "store unreachable: handler not run, message requeued");
            return Outcome::requeue(OutcomeKind::StoreUnavailable, 0, config.retry_backoff)
                .because(err.to_string());
        }
        Err(err) => {
            tracing::error!(error = %err, "store refused the claim: handler not run, message dead-lettered");
            return Outcome::new(OutcomeKind::StoreRefused, 0).because(err.to_string());
        }
    };
    let attempt = guard.attempt();
    let (result, lease_lost) = run_claimed(config, &guard, inner, delivery).await;
    match result {
        Ok(()) => match complete_until_answered(guard).await {
            Ok(true) if !lease_lost => Outcome::new(OutcomeKind::Processed, attempt),
            Err(err) => {
                tracing::error!(error = %err, "handler succeeded but the store refused the done mark: acking (the effect happened); a later duplicate may run again");
                Outcome::new(OutcomeKind::Unrecorded, attempt).because(err.to_string())
            }
            Ok(_) => {
                tracing::warn!(
                    "lease lost while the handler ran: the effect happened, acking; make the effect fenced by the claim token if another consumer may have run it too"
                );
                Outcome::new(OutcomeKind::LeaseLost, attempt)
            }
        },
        Err(failure) => {
            let outcome = failed(config, attempt, failure);
            // A dead-lettered message leaves no record behind, so that a
            // replay from the dead-letter queue is processed afresh; a
            // requeued one keeps its attempt count.
            let dead_lettered = outcome.disposition() == Disposition::DeadLetter;
            let released = if dead_lettered {
                guard.discard().await
            } else {
                guard.release().await
            };
            match released {
                Ok(true) => {
                    crate::metrics::released();
                    tracing::info!(
                        outcome = outcome.kind().as_str(),
                        reason = outcome.reason(),
                        "handler failed: claim released"
                    );
                }
                Ok(false) => {
                    tracing::warn!(
                        reason = outcome.reason(),
                        "handler failed after its claim was lost: nothing to release"
                    );
                }
                Err(err) => {
                    tracing::warn!(error = %err, reason = outcome.reason(), "handler failed and the claim could not be released; it frees itself when the lease expires");
                }
            }
            outcome
        }
    }
}

/// Writes the done mark, retrying while the store does not answer: the
/// effect happened, so the message is held (not acked, not requeued) until
/// the store says whether the claim was still ours. `Ok(ours)` is that
/// answer; `Err` is a refusal no retry can fix (the key was changed to
/// another type, say): the caller acks, since the effect happened, and logs it.
async fn complete_until_answered<St: Store>(
    mut guard: ClaimGuard<St>,
) -> Result<bool, crate::error::StoreError> {
    let mut delay = Duration::from_millis(50);
    loop {
        match guard.try_complete().await {
            Ok(ours) => return Ok(ours),
            Err(err) if err.is_unavailable() => {
                tracing::error!(error = %err, retry_in = ?delay, "handler succeeded but the done mark could not be written yet: holding the message until the store answers");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Runs the handler under the claim: renewed every third of the lease
/// (alongside the handler, which keeps running while a renewal waits for
/// Redis), bounded by the handler timeout. Returns the handler's result
/// and whether the lease was lost meanwhile.
async fn run_claimed<S, St>(
    config: &Config,
    guard: &ClaimGuard<St>,
    inner: S,
    delivery: Delivery,
) -> (Result<(), HandlerError>, bool)
where
    S: Service<Delivery>,
    S::Error: Into<BoxError> + Send,
    S::Response: Send,
    S::Future: Send,
    St: Store,
{
    let lease_lost = AtomicBool::new(false);
    let period = config.lease_ttl / 3;
    let renewing = async {
        loop {
            tokio::time::sleep(period).await;
            match guard.renew().await {
                Ok(true) => {}
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
    };
    let handler = run_handler(config, inner, delivery);
    tokio::select! {
        result = handler => (result, lease_lost.load(Ordering::Relaxed)),
        () = renewing => unreachable_renewal(),
    }
}

/// `renewing` never completes; this keeps the select exhaustive without a panic path.
fn unreachable_renewal() -> (Result<(), HandlerError>, bool) {
    (
        Err(HandlerError::retryable(
            "lease renewal stopped unexpectedly",
        )),
        true,
    )
}

/// Runs the handler once: bounded by the handler timeout, a panic caught
/// and counted as a retryable failure (so it backs off and is dead-lettered
/// after the last attempt instead of looping).
async fn run_handler<S>(config: &Config, inner: S, delivery: Delivery) -> Result<(), HandlerError>
where
    S: Service<Delivery>,
    S::Error: Into<BoxError>,
{
    let call = AssertUnwindSafe(inner.oneshot(delivery)).catch_unwind();
    match tokio::time::timeout(config.handler_timeout, call).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(err))) => Err(HandlerError::classify(err.into())),
        Ok(Err(panic)) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".to_owned());
            tracing::error!(panic = %message, "handler panicked");
            Err(HandlerError::retryable(format!(
                "handler panicked: {message}"
            )))
        }
        Err(_) => Err(HandlerError::retryable(format!(
            "handler timed out after {:?} (IDEMPOTENCY_HANDLER_TIMEOUT)",
            config.handler_timeout
        ))),
    }
}

async fn run_unprotected<S>(config: &Config, inner: S, delivery: Delivery) -> Outcome
where
    S: Service<Delivery>,
    S::Error: Into<BoxError>,
{
    let attempt = crate::guard::broker_attempt(&delivery);
    match run_handler(config, inner, delivery).await {
        Ok(()) => Outcome::new(OutcomeKind::Unprotected, attempt),
        Err(failure) => failed(config, attempt, failure),
    }
}

fn failed(config: &Config, attempt: u32, failure: HandlerError) -> Outcome {
    match failure.kind() {
        FailureKind::Permanent => {
            Outcome::new(OutcomeKind::Failed, attempt).because(failure.to_string())
        }
        FailureKind::Retryable if attempt >= config.max_attempts => {
            tracing::error!(attempt, error = %failure, "attempts exhausted (IDEMPOTENCY_MAX_ATTEMPTS): dead-lettering");
            Outcome::new(OutcomeKind::AttemptsExhausted, attempt).because(format!(
                "failed {attempt} times (IDEMPOTENCY_MAX_ATTEMPTS={}): {failure}",
                config.max_attempts
            ))
        }
        FailureKind::Retryable => {
            Outcome::requeue(OutcomeKind::Retry, attempt, config.backoff(attempt))
                .because(failure.to_string())
        }
    }
}

fn skipped(config: &Config, skip: Skip) -> Outcome {
    match skip {
        Skip::Done => {
            tracing::info!("duplicate of a processed message: acked, handler not run");
            Outcome::new(OutcomeKind::Duplicate, 0)
        }
        Skip::InProgress { remaining } => {
            tracing::info!(
                ?remaining,
                "duplicate in progress elsewhere: requeued, not acked"
            );
            Outcome::requeue(OutcomeKind::InProgressElsewhere, 0, config.retry_backoff)
        }
        Skip::NoFingerprint => {
            tracing::warn!(
                "no usable fingerprint: dead-lettered (IDEMPOTENCY_ON_MISSING_FINGERPRINT=dead-letter)"
            );
            Outcome::new(OutcomeKind::NoFingerprint, 0)
                .because("no usable fingerprint (message_id, header or body)")
        }
        Skip::PayloadMismatch { fingerprint } => Outcome::new(OutcomeKind::PayloadMismatch, 0)
            .because(format!(
                "fingerprint `{fingerprint}` was already used for a different payload"
            )),
        Skip::Unrecognized { key } => Outcome::new(OutcomeKind::UnrecognizedRecord, 0).because(
            format!("key `{key}` holds a value amqp-idempotency did not write"),
        ),
    }
}
