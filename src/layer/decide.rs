//! The per-delivery decision: claim (holding the delivery while the store
//! is unusable), then run the handler, skip a duplicate, or refuse; after
//! the run, the done mark (with the outbox's commit and dispatch in outbox
//! mode) or the failure's disposition.
//!
//! ```ignore
//! let outcome = decide(&dedup, &Plain, handler, delivery, trace).await;
//! // Processed, Duplicate, Retry (requeue after a backoff), dead-letter, ...
//! ```

use std::time::Duration;

use lapin::message::Delivery;
use tokio::time::Instant;

use super::run::{Handler, HandlerRun, run_claimed, timed_out};
use crate::backoff::Backoff;
use crate::config::{Config, StoreFailurePolicy};
use crate::error::{FailureKind, HandlerError};
use crate::fingerprint::Fingerprint;
use crate::finish::{already_done, complete_until_answered, lease_lost, settle_failed_claim};
use crate::guard::{Begin, Deduplicator, Skip};
use crate::outbox::{self, Mode, Outbox, ReplyTarget};
use crate::outcome::{Outcome, OutcomeKind};
use crate::store::{OutboxEntry, Store, Token};
use crate::trace::TraceContext;

/// What becomes of one delivery, from the body-size check to the outcome the
/// runner settles it by. Rare paths are boxed where they are awaited, so
/// that every delivery's future stays the size of the common one; the
/// delivery comes boxed, so that the futures it passes through do not
/// each hold a copy.
pub(super) async fn decide<S, St, F, M>(
    dedup: &Deduplicator<St, F>,
    mode: &M,
    inner: S,
    delivery: Box<Delivery>,
    trace: TraceContext,
) -> Outcome
where
    M: Mode,
    S: Handler<M::Request>,
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
                    () = dedup.stopping().stopped() => false,
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
    let target = mode
        .publisher()
        .map(|_| ReplyTarget::of(&delivery, trace.clone()));
    let mut guard = match begun {
        Ok(Begin::Process(guard)) => guard,
        Ok(Begin::Unprotected) => {
            return Box::pin(run_unprotected(
                dedup,
                mode,
                inner,
                *delivery,
                fingerprint,
                trace,
            ))
            .await;
        }
        Ok(Begin::Skip(Skip::Done)) => {
            return match (mode.publisher(), &fingerprint, &target) {
                (Some(publisher), Some(fingerprint), Some(target)) => {
                    Box::pin(outbox::finish_duplicate(
                        dedup,
                        publisher,
                        fingerprint,
                        target,
                    ))
                    .await
                }
                _ => skipped(config, Skip::Done),
            };
        }
        Ok(Begin::Skip(skip)) => return skipped(config, skip),
        Err(err) if err.is_unavailable() => {
            tracing::warn!(error = %err, "store unusable; processing unprotected (fail-open)");
            return Box::pin(run_unprotected(
                dedup,
                mode,
                inner,
                *delivery,
                fingerprint,
                trace,
            ))
            .await;
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
    let (request, outbox) = request::<M>(config, mode, *delivery);
    let run = run_claimed(config, &guard, HandlerRun::start(inner, request)).await;
    // What the handler staged, sealed: staging after it returned fails.
    match (sealed(run.result, outbox), mode.publisher()) {
        // With an outbox, even an empty one commits through the outbox
        // script, which also clears what an earlier, forgotten run left.
        (Ok(entries), Some(publisher)) => {
            // Boxed, like the other rare paths, so that every delivery's
            // future stays small.
            Box::pin(outbox::commit_and_dispatch(
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

/// The handler's request, and the outbox it stages in (outbox mode only).
fn request<M: Mode>(config: &Config, mode: &M, delivery: Delivery) -> (M::Request, Option<Outbox>) {
    let outbox = mode.publisher().map(|_| outbox::staging(config));
    (M::request(delivery, outbox.clone()), outbox)
}

/// Past the lease's end as we measured it, to cover the time the renewal
/// took to reach Redis.
const LEASE_MARGIN: Duration = Duration::from_millis(100);
async fn run_unprotected<S, St, F, M>(
    dedup: &Deduplicator<St, F>,
    mode: &M,
    inner: S,
    delivery: Delivery,
    fingerprint: Option<String>,
    trace: TraceContext,
) -> Outcome
where
    M: Mode,
    S: Handler<M::Request>,
    St: Store,
    F: Fingerprint,
{
    let config = dedup.config();
    let attempt = crate::guard::broker_attempt(&delivery);
    let target = ReplyTarget::of(&delivery, trace);
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
            outbox::dispatch_unrecorded(dedup.scope(), publisher, entries, fingerprint, &target)
                .await
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
        Skip::Done => already_done(),
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
