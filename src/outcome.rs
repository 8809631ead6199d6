//! What happened to a delivery, and what the broker must be told.
//!
//! ```
//! use amqp_idempotency::{Disposition, OutcomeKind};
//!
//! // A duplicate that is in progress elsewhere is never acked.
//! assert_ne!(OutcomeKind::InProgressElsewhere.default_disposition(), Some(Disposition::Ack));
//! assert_eq!(OutcomeKind::Duplicate.default_disposition(), Some(Disposition::Ack));
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::error::StoreError;
use crate::trace::TraceContext;

/// The broker action for a delivery, applied after the store write returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// `basic.ack`: the message is finished.
    Ack,
    /// Try again after `after`. For a retry ([`OutcomeKind::Retry`]) with
    /// [`RetryMode::Broker`](crate::RetryMode::Broker), [`serve`](crate::serve)
    /// publishes a copy to the delay queue of `after` and acks the
    /// original once the copy is confirmed; otherwise it waits `after`,
    /// then sends `basic.nack` with requeue.
    Requeue {
        /// Delay before the nack, so that a failing message cannot spin.
        after: Duration,
    },
    /// `basic.reject` without requeue: the queue's dead-letter exchange gets it.
    DeadLetter,
}

/// What the middleware did with a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OutcomeKind {
    /// The handler ran and the done mark was written.
    Processed,
    /// The handler ran, but the claim had been lost (lease expired and maybe
    /// taken over): acked because the effect happened; counted and logged.
    LeaseLost,
    /// The handler ran but the store refused the done mark with an error
    /// no retry fixes (a key of another type, say): acked because the
    /// effect happened; logged; a later duplicate may run again.
    Unrecorded,
    /// The handler ran without protection (no fingerprint with the
    /// pass-through policy, or the store down with fail-open).
    Unprotected,
    /// Already processed: acked without running the handler.
    Duplicate,
    /// Being processed elsewhere and not finished within the wait: requeued.
    InProgressElsewhere,
    /// The handler failed and may succeed later: released and requeued.
    Retry,
    /// The handler failed permanently: released and dead-lettered.
    Failed,
    /// The handler kept failing: dead-lettered after the last attempt.
    AttemptsExhausted,
    /// The message's earlier attempts never reached an outcome (their
    /// consumers died or hung past the lease) as many times as
    /// `IDEMPOTENCY_MAX_ATTEMPTS` allows: dead-lettered without running the
    /// handler again. The crash loop of a poison message.
    Crashed,
    /// No usable fingerprint: dead-lettered (the default policy).
    NoFingerprint,
    /// Same fingerprint, different payload: dead-lettered.
    PayloadMismatch,
    /// The key holds a value this library did not write: dead-lettered.
    UnrecognizedRecord,
    /// The body is larger than `IDEMPOTENCY_MAX_BODY_BYTES`: dead-lettered
    /// without running the handler or touching the store.
    BodyTooLarge,
    /// The store could not be used (unreachable, or refusing writes) for
    /// longer than a delivery may be held: the handler did not run; requeued.
    StoreUnavailable,
    /// The handler's done mark and outbox are committed, but the broker did
    /// not confirm every outgoing message (a lost connection, a missing
    /// binding) while the delivery was held, for up to half the consumer
    /// timeout: requeued, and the redelivered copy sends what was not
    /// confirmed (never what was), then is acked.
    Undispatched,
    /// The store refused the claim with an error about this one key (it
    /// holds a value of another type): the handler did not run;
    /// dead-lettered with the error. Errors that are not about the key
    /// (credentials, permissions, a full or read-only Redis) pause
    /// consumption instead.
    StoreRefused,
}

impl OutcomeKind {
    /// A short snake_case name, used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::LeaseLost => "lease_lost",
            Self::Unrecorded => "unrecorded",
            Self::Unprotected => "unprotected",
            Self::Duplicate => "duplicate",
            Self::InProgressElsewhere => "in_progress_elsewhere",
            Self::Retry => "retry",
            Self::Failed => "failed",
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::Crashed => "crashed",
            Self::NoFingerprint => "no_fingerprint",
            Self::PayloadMismatch => "payload_mismatch",
            Self::UnrecognizedRecord => "unrecognized_record",
            Self::BodyTooLarge => "body_too_large",
            Self::StoreUnavailable => "store_unavailable",
            Self::StoreRefused => "store_refused",
            Self::Undispatched => "undispatched",
        }
    }

    /// The disposition this kind always gets, or `None` for the kinds
    /// whose disposition carries a delay (requeues).
    pub fn default_disposition(self) -> Option<Disposition> {
        match self {
            Self::Processed
            | Self::LeaseLost
            | Self::Unrecorded
            | Self::Unprotected
            | Self::Duplicate => Some(Disposition::Ack),
            Self::Failed
            | Self::AttemptsExhausted
            | Self::Crashed
            | Self::NoFingerprint
            | Self::PayloadMismatch
            | Self::UnrecognizedRecord
            | Self::BodyTooLarge
            | Self::StoreRefused => Some(Disposition::DeadLetter),
            Self::InProgressElsewhere
            | Self::Retry
            | Self::StoreUnavailable
            | Self::Undispatched => None,
        }
    }
}

impl std::fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of the idempotency layer for one delivery.
///
/// A dead-lettered outcome of a claimed message still holds its claim:
/// the record is discarded only once the dead-letter copy is confirmed
/// ([`discard_record`](Self::discard_record)), and released otherwise
/// ([`release_record`](Self::release_record)); [`serve`](crate::serve)
/// does this. Clones share that claim; equality and `Debug` ignore it,
/// and the trace context its copies carry.
#[derive(Clone)]
pub struct Outcome {
    kind: OutcomeKind,
    disposition: Disposition,
    attempt: u32,
    reason: Option<String>,
    record: Option<Arc<HeldRecord>>,
    /// The delivery's trace context, for the copies the runner publishes
    /// (parked, retried): made outside the delivery's span, they get it here.
    trace: TraceContext,
}

impl PartialEq for Outcome {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.disposition == other.disposition
            && self.attempt == other.attempt
            && self.reason == other.reason
    }
}

impl Eq for Outcome {}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field("kind", &self.kind)
            .field("disposition", &self.disposition)
            .field("attempt", &self.attempt)
            .field("reason", &self.reason)
            .finish()
    }
}

/// The claim of a dead-lettered message, given up once the runner knows
/// whether the broker took the dead-letter copy. Implemented by
/// [`ClaimGuard`](crate::ClaimGuard).
pub(crate) trait HeldClaim: Send {
    /// Deletes the record: the copy is parked, a replay starts afresh.
    fn discard(self: Box<Self>) -> BoxFuture<'static, Result<bool, StoreError>>;
    /// Releases the claim with its attempt count: the copy was not taken,
    /// the original goes back to its queue.
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<bool, StoreError>>;
    /// Dropped unsettled: released in the background.
    fn abandon(self: Box<Self>);
}

/// Where an outcome keeps its claim until one of its clones settles it.
struct HeldRecord(Mutex<Option<Box<dyn HeldClaim>>>);

impl HeldRecord {
    fn take(&self) -> Option<Box<dyn HeldClaim>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl Drop for HeldRecord {
    fn drop(&mut self) {
        // Nobody said the copy was confirmed: keep the attempt count (a
        // discarded record would let the original run again from attempt 1).
        if let Some(claim) = self.take() {
            claim.abandon();
        }
    }
}

impl Outcome {
    /// An outcome whose disposition follows from its kind; requeues need
    /// [`Outcome::requeue`].
    pub(crate) fn new(kind: OutcomeKind, attempt: u32) -> Self {
        let disposition = kind.default_disposition().unwrap_or(Disposition::Requeue {
            after: Duration::ZERO,
        });
        Self {
            kind,
            disposition,
            attempt,
            reason: None,
            record: None,
            trace: TraceContext::default(),
        }
    }

    /// An outcome that requeues after `after`.
    pub(crate) fn requeue(kind: OutcomeKind, attempt: u32, after: Duration) -> Self {
        Self {
            kind,
            disposition: Disposition::Requeue { after },
            attempt,
            reason: None,
            record: None,
            trace: TraceContext::default(),
        }
    }

    pub(crate) fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Carries `trace`, the delivery's trace context, to the copies the
    /// runner publishes.
    pub(crate) fn traced(mut self, trace: TraceContext) -> Self {
        self.trace = trace;
        self
    }

    /// The trace context every copy of the delivery carries: write it into
    /// the copy's headers with [`TraceContext::write`].
    pub(crate) fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// Keeps the claim of a dead-lettered message until the copy is
    /// confirmed or not.
    pub(crate) fn holding(mut self, claim: Box<dyn HeldClaim>) -> Self {
        self.record = Some(Arc::new(HeldRecord(Mutex::new(Some(claim)))));
        self
    }

    /// For a dead-lettered outcome whose claim it holds: the broker
    /// confirmed the dead-letter copy (or the message was rejected to the
    /// queue's own dead-letter exchange), so the message's record is
    /// deleted, and a copy replayed from the parking queue later runs
    /// afresh from attempt 1. [`serve`](crate::serve) calls it; call it
    /// yourself when you settle outcomes in a loop of your own, and only
    /// once the copy is confirmed.
    ///
    /// `Ok(false)` when there was nothing to delete: not a dead-lettered
    /// claim, already settled (by this outcome or a clone), or the claim
    /// was lost. An error leaves the record to expire.
    pub async fn discard_record(&self) -> Result<bool, StoreError> {
        match self.record.as_ref().and_then(|record| record.take()) {
            Some(claim) => claim.discard().await,
            None => Ok(false),
        }
    }

    /// For a dead-lettered outcome whose claim it holds: the dead-letter
    /// copy was not confirmed and the original goes back to its queue, so
    /// the claim is released with its attempt count: the redelivered copy
    /// is the next attempt (bounded by `IDEMPOTENCY_MAX_ATTEMPTS`), never
    /// attempt 1 again. [`serve`](crate::serve) calls it. An outcome
    /// dropped without [`discard_record`](Self::discard_record) or this is
    /// released the same way, in the background.
    ///
    /// `Ok(false)` when there was nothing to release (see
    /// [`discard_record`](Self::discard_record)).
    pub async fn release_record(&self) -> Result<bool, StoreError> {
        match self.record.as_ref().and_then(|record| record.take()) {
            Some(claim) => claim.release().await,
            None => Ok(false),
        }
    }

    /// What happened.
    pub fn kind(&self) -> OutcomeKind {
        self.kind
    }

    /// What to tell the broker.
    pub fn disposition(&self) -> Disposition {
        self.disposition
    }

    /// The attempt this delivery was (1 for the first; 0 when the handler did not run).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Why the message was requeued or dead-lettered, when there is more to say.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }
}
