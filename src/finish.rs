//! How a claim ends, shared by the layer's plain path and the outbox's:
//! the done mark written (held until the store answers), a failed claim
//! given up or handed to its outcome, and the outcomes of a run whose
//! lease was lost and of a copy of a message already done.
//!
//! ```ignore
//! match complete_until_answered(&mut guard, Some((&outbox_key, &entries))).await {
//!     Ok(true) => { /* dispatch, then ack */ }
//!     Ok(false) => return lease_lost(attempt),
//!     Err(err) => return settle_failed_claim(guard, Outcome::new(OutcomeKind::Failed, attempt)).await,
//! }
//! ```

use std::time::Duration;

use crate::backoff::Backoff;
use crate::error::StoreError;
use crate::guard::ClaimGuard;
use crate::outcome::{Disposition, Outcome, OutcomeKind};
use crate::store::{OutboxEntry, Store};

/// A copy of a message already processed: acked, its handler not run.
pub(crate) fn already_done() -> Outcome {
    tracing::info!("duplicate of a processed message: acked, handler not run");
    Outcome::new(OutcomeKind::Duplicate, 0)
}

/// A run whose claim another consumer took over while it ran: acked, since
/// its effect happened.
pub(crate) fn lease_lost(attempt: u32) -> Outcome {
    tracing::warn!(
        "lease lost while the handler ran: the effect happened, acking; make the effect fenced by the claim token if another consumer may have run it too"
    );
    Outcome::new(OutcomeKind::LeaseLost, attempt)
}

/// After a failure: releases the claim for the retry; for a message that
/// is dead-lettered, hands the claim to the outcome instead, whose record
/// the runner discards once the dead-letter copy is confirmed (so that a
/// replay from the parking queue is processed afresh) and releases
/// otherwise ([`Outcome::discard_record`], [`Outcome::release_record`]).
pub(crate) async fn settle_failed_claim<St: Store>(
    guard: ClaimGuard<St>,
    outcome: Outcome,
) -> Outcome {
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
pub(crate) async fn complete_until_answered<St: Store>(
    guard: &mut ClaimGuard<St>,
    outbox: Option<(&str, &[OutboxEntry])>,
) -> Result<bool, StoreError> {
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
