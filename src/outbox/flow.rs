//! The outbox's part of a delivery, after the handler: commit the done mark
//! with what the handler staged, dispatch it, mark what the broker
//! confirmed; for a copy of a message already done, send what its outbox
//! still holds; for a run with no record, send at once.
//!
//! ```ignore
//! let outcome = commit_and_dispatch(&dedup, &publisher, guard, entries, target, false).await;
//! let outcome = finish_duplicate(&dedup, &publisher, &fingerprint, &target).await;
//! ```

use std::time::Duration;

use tokio::time::Instant;

use super::ids::outbox_key;
use super::publisher::{Checkpoint, OutboxPublisher};
use super::ready::{Ready, ReplyTarget, ready};
use super::staging::{since_commit, undispatched};
use crate::backoff::Backoff;
use crate::error::HandlerError;
use crate::fingerprint::Fingerprint;
use crate::finish::{already_done, complete_until_answered, lease_lost, settle_failed_claim};
use crate::guard::{ClaimGuard, Deduplicator};
use crate::outcome::{Outcome, OutcomeKind};
use crate::store::{OutboxEntry, Store, Token};

/// Commits the done mark with the staged messages, publishes them, marks
/// the confirmed ones dispatched, and says whether the message may be acked.
pub(crate) async fn commit_and_dispatch<St: Store, F: Fingerprint>(
    dedup: &Deduplicator<St, F>,
    publisher: &OutboxPublisher,
    mut guard: ClaimGuard<St>,
    entries: Vec<OutboxEntry>,
    target: ReplyTarget,
    lease_was_lost: bool,
) -> Outcome {
    let attempt = guard.attempt();
    let outbox_key = outbox_key(guard.key());
    let fingerprint = guard.fingerprint().to_owned();
    publisher.checkpoint(Checkpoint::BeforeCommit).await;
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
    publisher.checkpoint(Checkpoint::Committed).await;
    // Our own entries, just encoded: they always read back.
    let ready = ready(entries, dedup.scope(), &fingerprint, &target).unwrap_or_default();
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
    mut ready: Vec<Ready>,
    again: bool,
) -> Result<(), String> {
    let hold_until = Instant::now() + dedup.config().consumer_timeout / 2;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let dispatched = publisher.dispatch(&ready).await;
        let sent = dispatched.confirmed.len();
        crate::metrics::outbox_dispatched(sent, if again { sent } else { 0 });
        publisher.checkpoint(Checkpoint::Published).await;
        if !dispatched.confirmed.is_empty()
            && let Err(err) = dedup
                .store()
                .outbox_remove(outbox_key, &dispatched.confirmed)
                .await
        {
            // Harmless: a duplicate sends them again, with the same message_id.
            tracing::warn!(error = %err, "could not mark outbox messages dispatched; a duplicate would send them again");
        }
        publisher.checkpoint(Checkpoint::Marked).await;
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
        let delay = backoff.next_delay();
        if Instant::now() + delay >= hold_until {
            tracing::error!(%problem, "outbox messages still not confirmed: requeueing; the redelivered copy sends them");
            return Err(problem);
        }
        tracing::warn!(%problem, left = ready.len(), retry_in = ?delay, "not every outbox message was confirmed: holding the message and trying again");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = dedup.stopping().stopped() => return Err(problem),
        }
    }
}

/// A duplicate of a done message, in outbox mode: sends what its outbox
/// still holds, and the stored reply to this copy's `reply_to`, then acks.
pub(crate) async fn finish_duplicate<St: Store, F: Fingerprint>(
    dedup: &Deduplicator<St, F>,
    publisher: &OutboxPublisher,
    fingerprint: &str,
    target: &ReplyTarget,
) -> Outcome {
    let config = dedup.config();
    let outbox_key = outbox_key(&dedup.key(fingerprint));
    // A copy that arrives while the first run is still dispatching (a
    // double click) waits for it, up to IDEMPOTENCY_IN_PROGRESS_WAIT after
    // the commit (and never longer than that from now), instead of sending
    // everything a second time; past that, the first run is taken to have
    // died, and what is left is sent.
    let wait_until = Instant::now() + config.in_progress_wait;
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
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
            since_commit(&entries).is_some_and(|age| age < config.in_progress_wait);
        if !(undispatched(&entries) && committed_recently && now < wait_until) {
            break entries;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay().min(wait_until - now)) => {}
            () = dedup.stopping().stopped() => {
                // The first run may still be sending: let the broker
                // deliver this copy again rather than send it all twice.
                return Outcome::requeue(OutcomeKind::InProgressElsewhere, 0, Duration::ZERO);
            }
        }
    };
    let ready = match ready(entries, dedup.scope(), fingerprint, target) {
        Ok(ready) => ready,
        Err(problem) => {
            tracing::error!(%problem, "duplicate of a processed message whose outbox this version cannot read: dead-lettered, so that nothing it holds is lost");
            return Outcome::new(OutcomeKind::UnrecognizedRecord, 0).because(problem);
        }
    };
    if ready.is_empty() {
        return already_done();
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

/// Sends what a run without a record staged (fail-open, or no fingerprint
/// under the pass-through policy): there is no done mark to commit it
/// with, so it goes at once, with ids from the fingerprint when there is
/// one (a fresh token otherwise). `Err` when not all of it was confirmed.
pub(crate) async fn dispatch_unrecorded(
    scope: &str,
    publisher: &OutboxPublisher,
    entries: Vec<OutboxEntry>,
    fingerprint: Option<String>,
    target: &ReplyTarget,
) -> Result<(), HandlerError> {
    let base = fingerprint.unwrap_or_else(|| Token::new().to_string());
    let ready = ready(entries, scope, &base, target).unwrap_or_default();
    let dispatched = publisher.dispatch(&ready).await;
    crate::metrics::outbox_dispatched(dispatched.confirmed.len(), 0);
    match dispatched.problem {
        Some(problem) => Err(HandlerError::retryable(format!(
            "the outgoing messages of an unprotected run were not all confirmed: {problem}"
        ))),
        None => Ok(()),
    }
}
