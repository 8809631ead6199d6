//! One delivery's end in the runner: the layer's outcome turned into an
//! ack, a requeue, a confirmed retry copy in a delay queue, or a
//! confirmed dead letter.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::Acker;
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::DEAD_LETTER_RETRY;
use super::copy::MessageCopy;
use super::dead_letter::DeadLetters;
use super::retry::Retries;
use super::settle::Settler;
use crate::error::BoxError;
use crate::outcome::{Disposition, Outcome, OutcomeKind};

/// Where the runner republishes deliveries, each `None` when it does not.
pub(super) struct Copies {
    /// Dead letters with their reason (not with the broker's own dead-lettering).
    pub(super) dead_letters: Option<Arc<DeadLetters>>,
    /// Retries through delay queues (not with `IDEMPOTENCY_RETRY=hold`).
    pub(super) retries: Option<Arc<Retries>>,
}

impl Copies {
    /// Whether a delivery's copy must be kept while it is processed.
    pub(super) fn wanted(&self) -> bool {
        self.dead_letters.is_some() || self.retries.is_some()
    }
}

/// What a delivery's task needs besides the service call.
pub(super) struct Settling {
    pub(super) tag: u64,
    pub(super) acker: Acker,
    /// The delivery's copy, kept when [`Copies::wanted`].
    pub(super) copy: Option<MessageCopy>,
    pub(super) copies: Arc<Copies>,
    pub(super) settler: Settler,
    pub(super) stopping: watch::Receiver<bool>,
    /// The concurrency slot, freed once the delivery is settled.
    pub(super) slot: OwnedSemaphorePermit,
}

/// Awaits the service's `call` and settles the delivery with the broker.
pub(super) async fn settle<F, E>(call: F, settling: Settling)
where
    F: std::future::Future<Output = Result<Outcome, E>>,
    E: Into<BoxError>,
{
    let Settling {
        tag,
        acker,
        copy,
        copies,
        settler,
        mut stopping,
        slot,
    } = settling;
    let outcome = match AssertUnwindSafe(call).catch_unwind().await {
        Ok(Ok(outcome)) => Some(outcome),
        Ok(Err(err)) => {
            tracing::error!(delivery_tag = tag, error = %err.into(), "service failed: requeueing");
            None
        }
        Err(_) => {
            tracing::error!(delivery_tag = tag, "handler panicked: requeueing");
            None
        }
    };
    let Some(outcome) = outcome else {
        let requeue = Disposition::Requeue {
            after: Duration::ZERO,
        };
        settler.settle(tag, acker, requeue, requeue, None);
        drop(slot);
        return;
    };
    let kind = Some(outcome.kind());
    let disposition = outcome.disposition();
    let (copy, retry_copy) = match (&copies.retries, copy) {
        (Some(_), Some(copy)) if outcome.kind() == OutcomeKind::Retry => (None, Some(copy)),
        (_, copy) => (copy, None),
    };
    if let Disposition::Requeue { after } = disposition
        && let (Some(retries), Some(copy)) = (&copies.retries, retry_copy)
    {
        // Its claim is released with its attempt count: the copy waits out
        // the backoff in a delay queue, and the original goes once the
        // broker has the copy.
        if retries.publish(copy, &outcome, after).await {
            crate::metrics::retried("broker");
            settler.settle(tag, acker, Disposition::Ack, Disposition::Ack, kind);
            drop(slot);
            return;
        }
        // Not confirmed: held and requeued, as `hold` does.
    }
    if disposition == Disposition::DeadLetter
        && let (Some(dead_letters), Some(copy)) = (&copies.dead_letters, copy)
    {
        if dead_letters.publish(copy, &outcome).await {
            // The copy is confirmed: the original is finished, and
            // its record goes, so that a replay runs afresh.
            give_up_record(&outcome, true).await;
            settler.settle(tag, acker, Disposition::Ack, disposition, kind);
        } else {
            // Never dropped: the original goes back to its queue,
            // and its claim is released with its attempt count.
            give_up_record(&outcome, false).await;
            let requeue = Disposition::Requeue {
                after: DEAD_LETTER_RETRY,
            };
            tokio::select! {
                () = tokio::time::sleep(DEAD_LETTER_RETRY) => {}
                _ = stopping.wait_for(|stopping| *stopping) => {}
            }
            settler.settle(tag, acker, requeue, requeue, kind);
        }
        drop(slot);
        return;
    }
    if disposition == Disposition::DeadLetter {
        // The broker's own dead-lettering: nothing to confirm.
        give_up_record(&outcome, true).await;
    }
    if outcome.kind() == OutcomeKind::Retry {
        crate::metrics::retried("hold");
    }
    if let Disposition::Requeue { after } = disposition
        && !after.is_zero()
    {
        // Hold the message during the backoff, but not past shutdown.
        tokio::select! {
            () = tokio::time::sleep(after) => {}
            _ = stopping.wait_for(|stopping| *stopping) => {}
        }
    }
    settler.settle(tag, acker, disposition, disposition, kind);
    drop(slot);
}

/// Gives up the claim a dead-lettered outcome holds: its record is
/// discarded once the copy is `parked` (confirmed), and released with its
/// attempt count otherwise, so that the requeued original is the next
/// attempt rather than the first again.
async fn give_up_record(outcome: &Outcome, parked: bool) {
    let given_up = if parked {
        outcome.discard_record().await
    } else {
        outcome.release_record().await
    };
    match given_up {
        Ok(true) if !parked => crate::metrics::released(),
        Ok(_) => {}
        Err(err) if parked => {
            tracing::warn!(error = %err, "the parked message's record could not be discarded: it expires on its own; a replay before then counts as its next attempt");
        }
        Err(err) => {
            tracing::warn!(error = %err, "the claim of the message whose dead-letter copy was not confirmed could not be released; it frees itself when the lease expires");
        }
    }
}
