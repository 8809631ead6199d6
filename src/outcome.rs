//! What happened to a delivery, and what the broker must be told.
//!
//! ```
//! use amqp_idempotency::{Disposition, OutcomeKind};
//!
//! // A duplicate that is in progress elsewhere is never acked.
//! assert_ne!(OutcomeKind::InProgressElsewhere.default_disposition(), Some(Disposition::Ack));
//! assert_eq!(OutcomeKind::Duplicate.default_disposition(), Some(Disposition::Ack));
//! ```

use std::time::Duration;

/// The broker action for a delivery, applied after the store write returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// `basic.ack`: the message is finished.
    Ack,
    /// Wait `after`, then `basic.nack` with requeue.
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    kind: OutcomeKind,
    disposition: Disposition,
    attempt: u32,
    reason: Option<String>,
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
        }
    }

    /// An outcome that requeues after `after`.
    pub(crate) fn requeue(kind: OutcomeKind, attempt: u32, after: Duration) -> Self {
        Self {
            kind,
            disposition: Disposition::Requeue { after },
            attempt,
            reason: None,
        }
    }

    pub(crate) fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
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
