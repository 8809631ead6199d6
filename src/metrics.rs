//! The numbers operators watch, through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! Install any recorder (for example `metrics-exporter-prometheus`) and
//! these series appear; without a recorder they cost nothing.
//!
//! ```
//! use amqp_idempotency::metrics::{PROCESSED, DUPLICATES};
//! assert_eq!(PROCESSED, "idempotency_processed_total");
//! assert_eq!(DUPLICATES, "idempotency_duplicates_total");
//! ```
//!
//! | name | kind | labels | counts |
//! |---|---|---|---|
//! | `idempotency_processed_total` | counter | | handlers that ran and were recorded done |
//! | `idempotency_duplicates_total` | counter | `state` = `done` / `in_progress` | duplicates acked without running / requeued while in progress elsewhere |
//! | `idempotency_released_total` | counter | | claims released after a handler failure, for a retry, or because a dead-letter copy was not confirmed (a dead-lettered message's record is discarded once its copy is confirmed, not counted here) |
//! | `idempotency_retried_total` | counter | `via` = `broker` / `hold` | retryable failures sent to a delay queue (copy confirmed, original acked) / held in the consumer, then requeued |
//! | `idempotency_dead_lettered_total` | counter | `outcome` | messages dead-lettered, by why |
//! | `idempotency_store_errors_total` | counter | `operation` | store operations that failed |
//! | `idempotency_lease_lost_total` | counter | | handlers that finished after losing their claim |
//! | `idempotency_unprotected_total` | counter | | handlers run without a claim (pass-through or fail-open) |
//! | `idempotency_unsettled_total` | counter | | acks/nacks/rejects that did not reach the broker |
//! | `idempotency_unrecorded_total` | counter | | handlers that ran but whose done mark the store refused (a later duplicate may run again) |
//! | `idempotency_store_refused_total` | counter | | claims refused with an error about the key: dead-lettered, handler not run |
//! | `idempotency_handler_settled_total` | counter | | handlers that tried to ack/nack/reject their delivery themselves (ignored) |
//! | `idempotency_outbox_dispatched_total` | counter | | outbox messages the broker confirmed (re-sent ones counted again) |
//! | `idempotency_outbox_redispatched_total` | counter | | outbox messages a duplicate sent because the first run had not (or not provably) sent them |
//! | `idempotency_replies_resent_total` | counter | | stored replies sent again to a duplicate request |
//! | `idempotency_outbox_unroutable_total` | counter | | outbox messages or replies the broker returned as unroutable |
//! | `idempotency_outbox_undispatched_total` | counter | | deliveries requeued because their committed outbox messages were still not confirmed after the hold |
//! | `idempotency_store_seconds` | histogram | `operation` = `claim` / `renew` / `complete` / `release` | store latency |
//! | `idempotency_store_paused` | gauge | `scope` | 1 while the store of that scope (consumer group) is unusable, which pauses its consumption (fail-closed); 0 once a write succeeds again |
//! | `idempotency_unreplicated_writes_total` | counter | | writes fewer replicas confirmed than `IDEMPOTENCY_MIN_REPLICAS` asks for |
//!
//! [`SERIES`] lists every name, for dashboards and alert rules to be
//! checked against.

use std::time::Instant;

use crate::outcome::OutcomeKind;

/// Handlers that ran and were recorded done.
pub const PROCESSED: &str = "idempotency_processed_total";
/// Duplicates, labelled `state` = `done` or `in_progress`.
pub const DUPLICATES: &str = "idempotency_duplicates_total";
/// Claims released after a handler failure.
pub const RELEASED: &str = "idempotency_released_total";
/// Retryable failures retried, labelled `via` = `broker` (a confirmed copy
/// in a delay queue) or `hold` (held, then requeued).
pub const RETRIED: &str = "idempotency_retried_total";
/// Messages dead-lettered, labelled by `outcome`.
pub const DEAD_LETTERED: &str = "idempotency_dead_lettered_total";
/// Failed store operations, labelled by `operation`.
pub const STORE_ERRORS: &str = "idempotency_store_errors_total";
/// Handlers that finished after losing their claim.
pub const LEASE_LOST: &str = "idempotency_lease_lost_total";
/// Handlers run without a claim.
pub const UNPROTECTED: &str = "idempotency_unprotected_total";
/// Broker settlements that failed (the broker redelivers those messages).
pub const UNSETTLED: &str = "idempotency_unsettled_total";
/// Handlers that ran but whose done mark the store refused.
pub const UNRECORDED: &str = "idempotency_unrecorded_total";
/// Claims refused with an error about the key (dead-lettered).
pub const STORE_REFUSED: &str = "idempotency_store_refused_total";
/// Handlers that tried to settle their delivery themselves.
pub const HANDLER_SETTLED: &str = "idempotency_handler_settled_total";
/// Store latency in seconds, labelled by `operation`.
pub const STORE_SECONDS: &str = "idempotency_store_seconds";
/// Writes that fewer replicas confirmed than `IDEMPOTENCY_MIN_REPLICAS`
/// asks for (each is retried; its message is held meanwhile).
pub const UNREPLICATED: &str = "idempotency_unreplicated_writes_total";

/// 1 while the store is unusable, which pauses consumption (fail-closed),
/// 0 once a write succeeds again; labelled by `scope`.
pub const STORE_PAUSED: &str = "idempotency_store_paused";

/// Outbox messages the broker confirmed.
pub const OUTBOX_DISPATCHED: &str = "idempotency_outbox_dispatched_total";
/// Outbox messages sent by a duplicate.
pub const OUTBOX_REDISPATCHED: &str = "idempotency_outbox_redispatched_total";
/// Stored replies sent again to a duplicate request.
pub const REPLIES_RESENT: &str = "idempotency_replies_resent_total";
/// Outbox messages or replies returned as unroutable.
pub const OUTBOX_UNROUTABLE: &str = "idempotency_outbox_unroutable_total";
/// Deliveries requeued because their committed outbox messages were still
/// not confirmed after the hold (the redelivered copy sends them).
pub const OUTBOX_UNDISPATCHED: &str = "idempotency_outbox_undispatched_total";

/// Every series the library emits (a histogram's name as given, before a
/// recorder adds `_bucket`, `_sum` and `_count` or quantiles).
pub const SERIES: [&str; 20] = [
    PROCESSED,
    DUPLICATES,
    RELEASED,
    RETRIED,
    DEAD_LETTERED,
    STORE_ERRORS,
    LEASE_LOST,
    UNPROTECTED,
    UNSETTLED,
    UNRECORDED,
    STORE_REFUSED,
    HANDLER_SETTLED,
    STORE_SECONDS,
    UNREPLICATED,
    STORE_PAUSED,
    OUTBOX_DISPATCHED,
    OUTBOX_REDISPATCHED,
    REPLIES_RESENT,
    OUTBOX_UNROUTABLE,
    OUTBOX_UNDISPATCHED,
];

/// Counts the layer's outcome.
pub(crate) fn outcome(kind: OutcomeKind) {
    match kind {
        OutcomeKind::Processed => metrics::counter!(PROCESSED).increment(1),
        OutcomeKind::Duplicate => metrics::counter!(DUPLICATES, "state" => "done").increment(1),
        OutcomeKind::InProgressElsewhere => {
            metrics::counter!(DUPLICATES, "state" => "in_progress").increment(1);
        }
        OutcomeKind::LeaseLost => metrics::counter!(LEASE_LOST).increment(1),
        OutcomeKind::Unprotected => metrics::counter!(UNPROTECTED).increment(1),
        OutcomeKind::Unrecorded => metrics::counter!(UNRECORDED).increment(1),
        OutcomeKind::StoreRefused => metrics::counter!(STORE_REFUSED).increment(1),
        OutcomeKind::Undispatched => metrics::counter!(OUTBOX_UNDISPATCHED).increment(1),
        _ => {}
    }
}

pub(crate) fn released() {
    metrics::counter!(RELEASED).increment(1);
}

pub(crate) fn retried(via: &'static str) {
    metrics::counter!(RETRIED, "via" => via).increment(1);
}

pub(crate) fn handler_settled() {
    metrics::counter!(HANDLER_SETTLED).increment(1);
}

pub(crate) fn dead_lettered(kind: OutcomeKind) {
    metrics::counter!(DEAD_LETTERED, "outcome" => kind.as_str()).increment(1);
}

pub(crate) fn unsettled() {
    metrics::counter!(UNSETTLED).increment(1);
}

pub(crate) fn store_error(operation: &'static str) {
    metrics::counter!(STORE_ERRORS, "operation" => operation).increment(1);
}

pub(crate) fn store_latency(operation: &'static str, started: Instant) {
    metrics::histogram!(STORE_SECONDS, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
}

/// A write that fewer replicas confirmed than asked for.
pub(crate) fn unreplicated() {
    metrics::counter!(UNREPLICATED).increment(1);
}

/// The store of `scope` became unusable (`true`: consumption pauses) or
/// answers again (`false`).
pub(crate) fn store_paused(scope: &str, paused: bool) {
    metrics::gauge!(STORE_PAUSED, "scope" => scope.to_owned()).set(f64::from(u8::from(paused)));
}

/// Outbox messages confirmed: `sent` in all, `again` of them by a duplicate.
pub(crate) fn outbox_dispatched(sent: usize, again: usize) {
    metrics::counter!(OUTBOX_DISPATCHED).increment(sent as u64);
    if again > 0 {
        metrics::counter!(OUTBOX_REDISPATCHED).increment(again as u64);
    }
}

/// A stored reply sent again.
pub(crate) fn reply_resent() {
    metrics::counter!(REPLIES_RESENT).increment(1);
}

/// An outbox message or reply the broker could not route.
pub(crate) fn outbox_unroutable() {
    metrics::counter!(OUTBOX_UNROUTABLE).increment(1);
}
