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
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{Config, StoreFailurePolicy};
use crate::error::{BoxError, ConfigError, FailureKind, HandlerError};
use crate::fingerprint::{Fingerprint, MessageIdOrBodyHash};
use crate::guard::{Begin, ClaimGuard, Deduplicator, Skip};
use crate::outbox::{Mode, Outbox, OutboxLayer, OutboxPublisher, Plain, ReplyTarget};
use crate::outcome::{Disposition, Outcome, OutcomeKind};
use crate::store::{OutboxEntry, Store, Token};

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

    /// The same layer for a handler that publishes through an outbox
    /// (a `Service<`[`OutboxDelivery`](crate::outbox::OutboxDelivery)`>`):
    /// what it stages is committed with its done mark, then published on
    /// `publisher` before the ack ([`outbox`](crate::outbox)).
    pub fn with_outbox(self, publisher: OutboxPublisher) -> OutboxLayer<St, F> {
        OutboxLayer::new(self.dedup, publisher)
    }
}

impl<S, St, F> Layer<S> for IdempotencyLayer<St, F> {
    type Service = Idempotency<S, St, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::with_mode(inner, self.dedup.clone(), Plain)
    }
}

/// Runs the inner handler at most once per fingerprint.
///
/// Its response is an [`Outcome`]; the runner turns it into ack, nack or
/// reject. While the store is unreachable (fail-closed), `poll_ready`
/// stays pending, so a runner that waits for readiness stops taking
/// deliveries until the store answers again.
///
/// `M` says what the handler receives: [`Plain`] the delivery,
/// [`WithOutbox`](crate::outbox::WithOutbox) the delivery and an outbox.
pub struct Idempotency<S, St, F = MessageIdOrBodyHash, M = Plain> {
    inner: S,
    dedup: Deduplicator<St, F>,
    mode: M,
    recovering: Option<BoxFuture<'static, ()>>,
}

impl<S: Clone, St, F, M: Clone> Clone for Idempotency<S, St, F, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            dedup: self.dedup.clone(),
            mode: self.mode.clone(),
            recovering: None,
        }
    }
}

impl<S, St, F, M> Idempotency<S, St, F, M> {
    pub(crate) fn with_mode(inner: S, dedup: Deduplicator<St, F>, mode: M) -> Self {
        Self {
            inner,
            dedup,
            mode,
            recovering: None,
        }
    }
}

impl<S: std::fmt::Debug, St, F, M> std::fmt::Debug for Idempotency<S, St, F, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("dedup", &self.dedup)
            .finish_non_exhaustive()
    }
}

impl<S, St, F, M> Idempotency<S, St, F, M> {
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

impl<S, St, F, M> Service<Delivery> for Idempotency<S, St, F, M>
where
    M: Mode,
    S: Service<M::Request> + Clone + Send + 'static,
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
        let mode = self.mode.clone();
        let span = tracing::info_span!(
            "delivery",
            delivery_tag = delivery.delivery_tag,
            redelivered = delivery.redelivered,
            fingerprint = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        Box::pin(
            async move {
                let outcome = process(&dedup, &mode, inner, delivery).await;
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

async fn process<S, St, F, M>(
    dedup: &Deduplicator<St, F>,
    mode: &M,
    inner: S,
    mut delivery: Delivery,
) -> Outcome
where
    M: Mode,
    S: Service<M::Request> + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
    St: Store,
    F: Fingerprint,
{
    // The handler gets a delivery it cannot settle: the runner acks only
    // after the done mark, and its coalesced `multiple` acks count on
    // every delivery passing through it.
    let inert = Delivery::mock(
        delivery.delivery_tag,
        "".into(),
        "".into(),
        false,
        Vec::new(),
    )
    .acker;
    delivery.acker = inert.clone();
    let outcome = decide(dedup, mode, inner, delivery).await;
    if !inert.usable() {
        crate::metrics::handler_settled();
        tracing::error!(
            "the handler acked, nacked or rejected its delivery itself: ignored; the runner settles it after the store write (remove the ack from the handler)"
        );
    }
    outcome
}

async fn decide<S, St, F, M>(
    dedup: &Deduplicator<St, F>,
    mode: &M,
    inner: S,
    delivery: Delivery,
) -> Outcome
where
    M: Mode,
    S: Service<M::Request> + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
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
    // While the store cannot be used, the delivery is held (not requeued:
    // a requeue would count against a quorum queue's delivery limit) until
    // a claim succeeds, at most half the broker's consumer timeout. Its
    // claims back off, and keep one token: a claim that was written but
    // answered as unavailable is found as ours by the next one.
    let hold_until = Instant::now() + config.consumer_timeout / 2;
    let token = Token::new();
    let mut backoff = Backoff::store_pause();
    let begun = loop {
        match dedup
            .begin_with(&delivery, fingerprint.clone(), &token)
            .await
        {
            Err(err)
                if err.is_unavailable()
                    && config.on_store_error == StoreFailurePolicy::FailClosed =>
            {
                // The pause's start and end are logged once each (with the
                // refusals between) by the deduplicator, not per refusal.
                tracing::debug!(error = %err, "store unusable: handler not run, delivery held until a claim succeeds");
                let again = dedup.wait_to_claim_again(fingerprint.as_deref(), &mut backoff);
                let recovered = tokio::select! {
                    recovered = tokio::time::timeout_at(hold_until, again) => recovered.is_ok(),
                    () = crate::runner::runner_stopping() => false,
                };
                if !recovered {
                    return Outcome::requeue(
                        OutcomeKind::StoreUnavailable,
                        0,
                        config.retry_backoff,
                    )
                    .because(err.to_string());
                }
            }
            other => break other,
        }
    };
    let target = mode.publisher().map(|_| ReplyTarget::of(&delivery));
    let mut guard = match begun {
        Ok(Begin::Process(guard)) => guard,
        Ok(Begin::Unprotected) => {
            return Box::pin(run_unprotected(dedup, mode, inner, delivery, fingerprint)).await;
        }
        Ok(Begin::Skip(Skip::Done)) => {
            return match (mode.publisher(), &fingerprint, &target) {
                (Some(publisher), Some(fingerprint), Some(target)) => {
                    Box::pin(finish_duplicate(dedup, publisher, fingerprint, target)).await
                }
                _ => skipped(config, Skip::Done),
            };
        }
        Ok(Begin::Skip(skip)) => return skipped(config, skip),
        Err(err) if err.is_unavailable() => {
            tracing::warn!(error = %err, "store unusable; processing unprotected (fail-open)");
            return Box::pin(run_unprotected(dedup, mode, inner, delivery, fingerprint)).await;
        }
        Err(err) => {
            tracing::error!(error = %err, "store refused the claim with an error about this key: handler not run, message dead-lettered");
            return Outcome::new(OutcomeKind::StoreRefused, 0).because(err.to_string());
        }
    };
    let attempt = guard.attempt();
    if attempt > config.max_attempts {
        // Only a takeover of a record whose attempts never finished (or a
        // lowered IDEMPOTENCY_MAX_ATTEMPTS) gets here: no more runs.
        let outcome = if guard.after_crash() {
            tracing::error!(
                attempt,
                "the previous attempts never finished (their consumers died or hung past the lease): dead-lettering without running the handler"
            );
            Outcome::new(OutcomeKind::Crashed, attempt - 1).because(format!(
                "{} attempts never reached an outcome (IDEMPOTENCY_MAX_ATTEMPTS={}): the consumer crashed, was killed or hung while handling it",
                attempt - 1,
                config.max_attempts
            ))
        } else {
            Outcome::new(OutcomeKind::AttemptsExhausted, attempt - 1).because(format!(
                "already ran {} times (IDEMPOTENCY_MAX_ATTEMPTS={})",
                attempt - 1,
                config.max_attempts
            ))
        };
        return Box::pin(settle_failed_claim(guard, outcome)).await;
    }
    guard.mark_started();
    let (request, outbox) = request::<M>(config, mode, delivery);
    let run = run_claimed(config, &guard, inner, request).await;
    // What the handler staged, sealed: staging after it returned fails.
    match (sealed(run.result, outbox), mode.publisher()) {
        // With an outbox, even an empty one commits through the outbox
        // script, which also clears what an earlier, forgotten run left.
        (Ok(entries), Some(publisher)) => {
            // Boxed, like the other rare paths, so that every delivery's
            // future stays small.
            Box::pin(commit_and_dispatch(
                dedup,
                publisher,
                guard,
                entries,
                target.unwrap_or_default(),
                run.lease_lost,
            ))
            .await
        }
        (Ok(_), None) => match complete_until_answered(&mut guard, None).await {
            Ok(true) if !run.lease_lost => Outcome::new(OutcomeKind::Processed, attempt),
            Err(err) => {
                tracing::error!(error = %err, "handler succeeded but the store refused the done mark: acking (the effect happened); a later duplicate may run again");
                Outcome::new(OutcomeKind::Unrecorded, attempt).because(err.to_string())
            }
            Ok(_) => lease_lost(attempt),
        },
        (Err(failure), _) => {
            if run.timed_out {
                // Its work may still run (a spawned task, a request already
                // sent): keep the claim, unrenewed, until its lease ends, so
                // the redelivered copy cannot run beside it.
                tracing::warn!(
                    until_lease_end = ?run.lease_ends.saturating_duration_since(Instant::now()),
                    "handler timed out: keeping its claim until the lease ends before retrying"
                );
                tokio::time::sleep_until(run.lease_ends + LEASE_MARGIN).await;
            }
            let outcome = failed(config, attempt, failure);
            // Boxed, like the other paths off the common one, so that every
            // delivery's future stays small.
            Box::pin(settle_failed_claim(guard, outcome)).await
        }
    }
}

/// Ends staging once the handler returned (staging later fails): the
/// entries to commit when it succeeded and kept to the size limit (none
/// without an outbox), else why the run failed.
fn sealed(
    result: Result<(), HandlerError>,
    outbox: Option<Outbox>,
) -> Result<Vec<OutboxEntry>, HandlerError> {
    let staged = outbox.map(|outbox| outbox.seal()).transpose();
    result.and(staged).map(Option::unwrap_or_default)
}

fn lease_lost(attempt: u32) -> Outcome {
    tracing::warn!(
        "lease lost while the handler ran: the effect happened, acking; make the effect fenced by the claim token if another consumer may have run it too"
    );
    Outcome::new(OutcomeKind::LeaseLost, attempt)
}

/// The handler's request, and the outbox it stages in (outbox mode only).
fn request<M: Mode>(config: &Config, mode: &M, delivery: Delivery) -> (M::Request, Option<Outbox>) {
    let outbox = mode.publisher().map(|_| crate::outbox::staging(config));
    (M::request(delivery, outbox.clone()), outbox)
}

/// Commits the done mark with the staged messages, publishes them, marks
/// the confirmed ones dispatched, and says whether the message may be acked.
async fn commit_and_dispatch<St: Store, F: Fingerprint>(
    dedup: &Deduplicator<St, F>,
    publisher: &OutboxPublisher,
    mut guard: ClaimGuard<St>,
    entries: Vec<OutboxEntry>,
    target: ReplyTarget,
    lease_was_lost: bool,
) -> Outcome {
    let attempt = guard.attempt();
    let outbox_key = crate::outbox::outbox_key(guard.key());
    let fingerprint = guard.fingerprint().to_owned();
    publisher
        .checkpoint(crate::outbox::Checkpoint::BeforeCommit)
        .await;
    match complete_until_answered(&mut guard, Some((&outbox_key, &entries))).await {
        Ok(true) => {}
        Ok(false) => {
            // Another consumer holds the record: its run commits its own
            // outbox; publishing ours too would send the effect twice.
            if !entries.is_empty() {
                tracing::warn!(
                    "lease lost while the handler ran: its outbox is not committed and nothing it staged is published; the consumer that took the message over publishes its own"
                );
            }
            return Outcome::new(OutcomeKind::LeaseLost, attempt);
        }
        Err(err) => {
            tracing::error!(error = %err, "the store refused the outbox commit: nothing published, message dead-lettered");
            let outcome = Outcome::new(OutcomeKind::Failed, attempt)
                .because(format!("the outbox could not be committed: {err}"));
            return settle_failed_claim(guard, outcome).await;
        }
    }
    drop(guard);
    publisher
        .checkpoint(crate::outbox::Checkpoint::Committed)
        .await;
    // Our own entries, just encoded: they always read back.
    let ready =
        crate::outbox::ready(entries, dedup.scope(), &fingerprint, &target).unwrap_or_default();
    match dispatch_until_sent(dedup, publisher, &outbox_key, ready, false).await {
        Err(problem) => Outcome::requeue(
            OutcomeKind::Undispatched,
            attempt,
            dedup.config().retry_backoff,
        )
        .because(problem),
        Ok(()) if lease_was_lost => lease_lost(attempt),
        Ok(()) => Outcome::new(OutcomeKind::Processed, attempt),
    }
}

/// Publishes `ready`, marks what the broker confirmed dispatched, and
/// tries again what it did not confirm, holding the delivery (as a store
/// outage does: a requeue would count against a quorum queue's delivery
/// limit) for up to half of RabbitMQ's consumer timeout. `Err` says why
/// something is still not confirmed then, or when the runner stops.
async fn dispatch_until_sent<St: Store, F: Fingerprint>(
    dedup: &Deduplicator<St, F>,
    publisher: &OutboxPublisher,
    outbox_key: &str,
    mut ready: Vec<crate::outbox::Ready>,
    again: bool,
) -> Result<(), String> {
    let hold_until = Instant::now() + dedup.config().consumer_timeout / 2;
    let mut delay = Duration::from_millis(100);
    loop {
        let dispatched = publisher.dispatch(&ready).await;
        let sent = dispatched.confirmed.len();
        crate::metrics::outbox_dispatched(sent, if again { sent } else { 0 });
        publisher
            .checkpoint(crate::outbox::Checkpoint::Published)
            .await;
        if !dispatched.confirmed.is_empty()
            && let Err(err) = dedup
                .store()
                .outbox_remove(outbox_key, &dispatched.confirmed)
                .await
        {
            // Harmless: a duplicate sends them again, with the same message_id.
            tracing::warn!(error = %err, "could not mark outbox messages dispatched; a duplicate would send them again");
        }
        publisher
            .checkpoint(crate::outbox::Checkpoint::Marked)
            .await;
        let Some(problem) = dispatched.problem else {
            return Ok(());
        };
        ready.retain(|ready| {
            if ready.is_reply() {
                !dispatched.reply_sent
            } else {
                !dispatched
                    .confirmed
                    .iter()
                    .any(|field| field == ready.field())
            }
        });
        if Instant::now() + delay >= hold_until {
            tracing::error!(%problem, "outbox messages still not confirmed: requeueing; the redelivered copy sends them");
            return Err(problem);
        }
        tracing::warn!(%problem, left = ready.len(), retry_in = ?delay, "not every outbox message was confirmed: holding the message and trying again");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = crate::runner::runner_stopping() => return Err(problem),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A duplicate of a done message, in outbox mode: sends what its outbox
/// still holds, and the stored reply to this copy's `reply_to`, then acks.
async fn finish_duplicate<St: Store, F: Fingerprint>(
    dedup: &Deduplicator<St, F>,
    publisher: &OutboxPublisher,
    fingerprint: &str,
    target: &ReplyTarget,
) -> Outcome {
    let config = dedup.config();
    let outbox_key = crate::outbox::outbox_key(&dedup.key(fingerprint));
    // A copy that arrives while the first run is still dispatching (a
    // double click) waits for it, up to IDEMPOTENCY_IN_PROGRESS_WAIT after
    // the commit (and never longer than that from now), instead of sending
    // everything a second time; past that, the first run is taken to have
    // died, and what is left is sent.
    let wait_until = Instant::now() + config.in_progress_wait;
    let mut delay = Duration::from_millis(10);
    let entries = loop {
        let entries = match dedup.store().outbox(&outbox_key).await {
            Ok(entries) => entries,
            Err(err) if err.is_unavailable() => {
                tracing::warn!(error = %err, "duplicate of a processed message, but its outbox cannot be read: requeued");
                return Outcome::requeue(OutcomeKind::StoreUnavailable, 0, config.retry_backoff)
                    .because(err.to_string());
            }
            Err(err) => {
                tracing::error!(error = %err, "duplicate of a processed message whose outbox the store refuses to read: dead-lettered, so that nothing it holds is lost");
                return Outcome::new(OutcomeKind::StoreRefused, 0)
                    .because(format!("its outbox cannot be read: {err}"));
            }
        };
        let now = Instant::now();
        let committed_recently =
            crate::outbox::since_commit(&entries).is_some_and(|age| age < config.in_progress_wait);
        if !(crate::outbox::undispatched(&entries) && committed_recently && now < wait_until) {
            break entries;
        }
        tokio::select! {
            () = tokio::time::sleep(delay.min(wait_until - now)) => {}
            () = crate::runner::runner_stopping() => {
                // The first run may still be sending: let the broker
                // deliver this copy again rather than send it all twice.
                return Outcome::requeue(OutcomeKind::InProgressElsewhere, 0, Duration::ZERO);
            }
        }
        delay = (delay * 2).min(Duration::from_millis(200));
    };
    let ready = match crate::outbox::ready(entries, dedup.scope(), fingerprint, target) {
        Ok(ready) => ready,
        Err(problem) => {
            tracing::error!(%problem, "duplicate of a processed message whose outbox this version cannot read: dead-lettered, so that nothing it holds is lost");
            return Outcome::new(OutcomeKind::UnrecognizedRecord, 0).because(problem);
        }
    };
    if ready.is_empty() {
        return skipped(config, Skip::Done);
    }
    let replies = ready.iter().filter(|ready| ready.is_reply()).count();
    tracing::info!(
        messages = ready.len() - replies,
        replies,
        "duplicate of a processed message: sending what its outbox still holds"
    );
    match dispatch_until_sent(dedup, publisher, &outbox_key, ready, true).await {
        Ok(()) => {
            for _ in 0..replies {
                crate::metrics::reply_resent();
            }
            Outcome::new(OutcomeKind::Duplicate, 0)
        }
        Err(problem) => {
            Outcome::requeue(OutcomeKind::Undispatched, 0, config.retry_backoff).because(problem)
        }
    }
}

/// Past the lease's end as we measured it, to cover the time the renewal
/// took to reach Redis.
const LEASE_MARGIN: Duration = Duration::from_millis(100);

/// After a failure: releases the claim for the retry; for a message that
/// is dead-lettered, hands the claim to the outcome instead, whose record
/// the runner discards once the dead-letter copy is confirmed (so that a
/// replay from the parking queue is processed afresh) and releases
/// otherwise ([`Outcome::discard_record`], [`Outcome::release_record`]).
async fn settle_failed_claim<St: Store>(guard: ClaimGuard<St>, outcome: Outcome) -> Outcome {
    if outcome.disposition() == Disposition::DeadLetter {
        return outcome.holding(Box::new(guard));
    }
    match guard.release().await {
        Ok(true) => {
            crate::metrics::released();
            tracing::info!(
                outcome = outcome.kind().as_str(),
                reason = outcome.reason(),
                "claim given up"
            );
        }
        Ok(false) => {
            tracing::warn!(
                reason = outcome.reason(),
                "the claim was lost before it could be given up: nothing to release"
            );
        }
        Err(err) => {
            tracing::warn!(error = %err, reason = outcome.reason(), "the claim could not be given up; it frees itself when the lease expires");
        }
    }
    outcome
}

/// Writes the done mark, retrying while the store does not answer: the
/// effect happened, so the message is held (not acked, not requeued) until
/// the store says whether the claim was still ours. `Ok(ours)` is that
/// answer; `Err` is a refusal about this key (it was changed to another
/// type, say): the caller acks, since the effect happened, and logs it.
async fn complete_until_answered<St: Store>(
    guard: &mut ClaimGuard<St>,
    outbox: Option<(&str, &[OutboxEntry])>,
) -> Result<bool, crate::error::StoreError> {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut refused = 0u32;
    loop {
        match guard.try_complete(outbox).await {
            Ok(ours) => return Ok(ours),
            Err(err) if err.is_unavailable() => {
                let retry_in = backoff.next_delay();
                if refused == 0 {
                    tracing::warn!(error = %err, ?retry_in, "handler succeeded but the done mark could not be written yet: holding the message until the store takes it");
                } else {
                    tracing::debug!(error = %err, ?retry_in, refused, "the done mark is still not written");
                }
                refused += 1;
                tokio::time::sleep(retry_in).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// How a claimed handler run ended.
struct Run {
    result: Result<(), HandlerError>,
    /// A renewal found the claim taken over.
    lease_lost: bool,
    /// The handler timed out; its work may go on.
    timed_out: bool,
    /// When the lease ends, counted from the last renewal sent.
    lease_ends: Instant,
}

/// Runs the handler under the claim. The handler runs in a task of its
/// own, so that one that blocks its thread stops neither the renewals
/// (every third of the lease) nor the handler timeout, both kept here.
async fn run_claimed<S, St, R>(config: &Config, guard: &ClaimGuard<St>, inner: S, request: R) -> Run
where
    R: Send + 'static,
    S: Service<R> + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
    St: Store,
{
    let lease_lost = AtomicBool::new(false);
    let started = Instant::now();
    let lease_ends_at_start = started + config.lease_ttl;
    let lease_ends = std::sync::Mutex::new(lease_ends_at_start);
    let mut handler = HandlerRun::start(inner, request);
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
enum HandlerRun {
    Spawned(tokio::task::JoinHandle<Result<(), BoxError>>),
    Inline(BoxFuture<'static, Result<(), HandlerError>>),
}

impl HandlerRun {
    fn start<S, R>(inner: S, request: R) -> Self
    where
        R: Send + 'static,
        S: Service<R> + Send + 'static,
        S::Error: Into<BoxError> + Send,
        S::Response: Send + 'static,
        S::Future: Send + 'static,
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
    fn abort(&self) {
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

fn timed_out(config: &Config) -> HandlerError {
    HandlerError::retryable(format!(
        "handler timed out after {:?} (IDEMPOTENCY_HANDLER_TIMEOUT)",
        config.handler_timeout
    ))
}

async fn run_unprotected<S, St, F, M>(
    dedup: &Deduplicator<St, F>,
    mode: &M,
    inner: S,
    delivery: Delivery,
    fingerprint: Option<String>,
) -> Outcome
where
    M: Mode,
    S: Service<M::Request> + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
    St: Store,
    F: Fingerprint,
{
    let config = dedup.config();
    let attempt = crate::guard::broker_attempt(&delivery);
    let target = ReplyTarget::of(&delivery);
    let (request, outbox) = request::<M>(config, mode, delivery);
    let mut handler = HandlerRun::start(inner, request);
    let result = match tokio::time::timeout(config.handler_timeout, &mut handler).await {
        Ok(result) => result,
        Err(_) => {
            handler.abort();
            Err(timed_out(config))
        }
    };
    let result = match sealed(result, outbox) {
        Ok(entries) if !entries.is_empty() => {
            // No record to commit with: sent at once, with ids from the
            // fingerprint when there is one.
            let Some(publisher) = mode.publisher() else {
                return Outcome::new(OutcomeKind::Unprotected, attempt);
            };
            let base = fingerprint.unwrap_or_else(|| crate::store::Token::new().to_string());
            let ready =
                crate::outbox::ready(entries, dedup.scope(), &base, &target).unwrap_or_default();
            let dispatched = publisher.dispatch(&ready).await;
            crate::metrics::outbox_dispatched(dispatched.confirmed.len(), 0);
            match dispatched.problem {
                Some(problem) => Err(HandlerError::retryable(format!(
                    "the outgoing messages of an unprotected run were not all confirmed: {problem}"
                ))),
                None => Ok(()),
            }
        }
        staged => staged.map(drop),
    };
    match result {
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
            // Held until the other consumer's lease can have ended, so that
            // the copy does not bounce through the broker meanwhile.
            let hold = remaining
                .unwrap_or(config.retry_backoff)
                .clamp(config.retry_backoff, config.lease_ttl);
            tracing::info!(
                ?remaining,
                ?hold,
                "duplicate in progress elsewhere: requeued after the hold, not acked"
            );
            Outcome::requeue(OutcomeKind::InProgressElsewhere, 0, hold)
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
