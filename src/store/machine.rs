//! The state machine: claim, renew, complete, release and discard, written
//! once over the primitives of any [`Store`].
//!
//! These are free functions, not methods of the trait, so that no backend
//! can change them: a store decides how a compare-and-set reaches its
//! server, never what the records go through (see DESIGN.md, "States and
//! transitions"). Every write after a claim compares the whole stored
//! value with the claim's, and an unanswered request is retried with the
//! same value, so a retry finds its own earlier write.
//!
//! ```
//! use std::time::Duration;
//! use amqp_idempotency::store::{ClaimOutcome, MemoryStore, Token, machine};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), amqp_idempotency::StoreError> {
//! let store = MemoryStore::new();
//! let (lease, retention) = (Duration::from_secs(30), Duration::from_secs(3600));
//! let ClaimOutcome::Acquired(claim) = machine::claim(&store, "idem:q:1", &Token::new(), "", lease).await? else {
//!     panic!("a fresh key is ours");
//! };
//! assert!(machine::renew(&store, &claim, lease).await?);
//! // A failed attempt gives the key up, keeping the count...
//! assert!(machine::release(&store, &claim, retention).await?);
//! let ClaimOutcome::Acquired(next) = machine::claim(&store, "idem:q:1", &Token::new(), "", lease).await? else {
//!     panic!("a released key is taken over");
//! };
//! assert_eq!(next.attempt(), 2);
//! // ...and the next one marks it done.
//! assert!(machine::complete(&store, &next, retention).await?);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use super::record::{Record, same_payload};
use super::{Claim, ClaimOutcome, Expect, OutboxEntry, Store, Token};
use crate::error::StoreError;

/// How often an unanswered insert is retried with the same token.
const AMBIGUOUS_RETRIES: usize = 2;
/// How often a takeover of a released record is retried when raced.
const TAKEOVER_RETRIES: usize = 3;

/// How long an in-progress record is kept after its lease ended, so that the
/// next claim can tell that the previous attempt never finished (its
/// consumer crashed) and count it. The same for every consumer: the lease
/// left is the record's time to live minus this.
pub(crate) const CRASH_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// Claims `key` for `token` with a `lease`.
///
/// `payload_hash` is compared with the hash stored in an existing
/// record; pass `""` to skip that check. An unanswered request is
/// retried with the same token, and finding our own token counts as
/// acquired, never as a duplicate. A record whose lease ran out without
/// an outcome is taken over, as the next attempt
/// ([`Claim::after_crash`]).
pub async fn claim<S: Store>(
    store: &S,
    key: &str,
    token: &Token,
    payload_hash: &str,
    lease: Duration,
) -> Result<ClaimOutcome, StoreError> {
    let ttl = lease.saturating_add(CRASH_MEMORY);
    let fresh = Claim::new(key, token.as_str(), 1, payload_hash);
    for _ in 0..TAKEOVER_RETRIES {
        let previous = retry_ambiguous(|| store.insert_or_get(key, fresh.value(), ttl)).await?;
        let Some(previous) = previous else {
            return Ok(ClaimOutcome::Acquired(fresh));
        };
        let Some(record) = Record::parse(&previous) else {
            let value = String::from_utf8_lossy(&previous).into_owned();
            return Ok(ClaimOutcome::Unrecognized { value });
        };
        let stored = record.payload_hash();
        if !same_payload(stored, payload_hash) {
            return Ok(ClaimOutcome::PayloadMismatch {
                stored: stored.to_owned(),
            });
        }
        let (from, next) = match record {
            Record::InProgress {
                token: owner,
                attempt,
                ..
            } if owner == token.as_str() => {
                let mut ours = Claim::new(key, token.as_str(), attempt, payload_hash);
                // Our own earlier claim, whose reply was lost: the
                // stored value is the one every later write checks.
                // Renewed now, so that the claim is written on this
                // connection (a WAIT for replicas then covers it).
                let renewed = retry_ambiguous(|| {
                    store.transition(key, Expect::Value(&previous), Some(&previous[..]), ttl)
                })
                .await?;
                if !renewed {
                    continue;
                }
                ours.value = previous;
                return Ok(ClaimOutcome::Acquired(ours));
            }
            Record::InProgress {
                attempt, lingers, ..
            } => {
                // The lease left tells waiting from taking over; a
                // failure to read it must not fail the claim.
                let ttl_left = match store.get(key).await {
                    Ok(Some((value, ttl))) if value == previous => ttl,
                    Ok(_) => continue,
                    Err(_) => None,
                };
                let remaining = match (lingers, ttl_left) {
                    (true, Some(left)) => left.saturating_sub(CRASH_MEMORY),
                    (false, Some(left)) => left,
                    (_, None) => return Ok(ClaimOutcome::InProgress { remaining: None }),
                };
                if !lingers || !remaining.is_zero() {
                    return Ok(ClaimOutcome::InProgress {
                        remaining: Some(remaining),
                    });
                }
                let mut next =
                    Claim::new(key, token.as_str(), attempt.saturating_add(1), payload_hash);
                next.after_crash = true;
                let from = Expect::Expired {
                    value: &previous,
                    grace: CRASH_MEMORY,
                };
                (from, next)
            }
            Record::Done { .. } => return Ok(ClaimOutcome::Done),
            Record::Released { attempts, .. } => {
                let next = Claim::new(
                    key,
                    token.as_str(),
                    attempts.saturating_add(1),
                    payload_hash,
                );
                (Expect::Value(&previous), next)
            }
        };
        let taken =
            retry_ambiguous(|| store.transition(key, from, Some(next.value()), ttl)).await?;
        if taken {
            return Ok(ClaimOutcome::Acquired(next));
        }
        // Someone else changed the record meanwhile: look again.
    }
    Ok(ClaimOutcome::InProgress { remaining: None })
}

/// Extends our lease; false if the key is no longer ours.
pub async fn renew<S: Store>(
    store: &S,
    claim: &Claim,
    lease: Duration,
) -> Result<bool, StoreError> {
    let ttl = lease.saturating_add(CRASH_MEMORY);
    let from = Expect::Value(claim.value());
    retry_ambiguous(|| store.transition(claim.key(), from, Some(claim.value()), ttl)).await
}

/// Marks the message done for `retention`; false if the key is no
/// longer ours. Also writes the mark where the key is gone (our lease
/// expired and nobody took over), so the effect that happened is
/// recorded and a later duplicate is recognised.
pub async fn complete<S: Store>(
    store: &S,
    claim: &Claim,
    retention: Duration,
) -> Result<bool, StoreError> {
    let done = claim.done_value();
    let from = Expect::ValueOrAbsent(claim.value());
    retry_ambiguous(|| store.transition(claim.key(), from, Some(&done[..]), retention)).await
}

/// Like [`complete`], and commits the staged outgoing
/// messages at `outbox_key` in the same atomic step
/// ([`Store::commit_outbox`]).
pub async fn complete_with_outbox<S: Store>(
    store: &S,
    claim: &Claim,
    retention: Duration,
    outbox_key: &str,
    entries: &[OutboxEntry],
) -> Result<bool, StoreError> {
    let done = claim.done_value();
    let from = Expect::ValueOrAbsent(claim.value());
    retry_ambiguous(|| {
        store.commit_outbox(claim.key(), from, &done, retention, outbox_key, entries)
    })
    .await
}

/// Gives the key up after a failure so that a redelivery can claim it.
/// The record keeps the attempt count for `retention`, which bounds
/// retries on queues that do not count deliveries. False if the key is
/// no longer ours.
pub async fn release<S: Store>(
    store: &S,
    claim: &Claim,
    retention: Duration,
) -> Result<bool, StoreError> {
    let released = claim.released_value();
    let from = Expect::Value(claim.value());
    retry_ambiguous(|| store.transition(claim.key(), from, Some(&released[..]), retention)).await
}

/// Deletes our record after the message was dead-lettered, so that a later
/// copy (say, replayed from the dead-letter queue) starts from attempt 1.
/// False if the key is no longer ours.
pub async fn discard<S: Store>(store: &S, claim: &Claim) -> Result<bool, StoreError> {
    let from = Expect::Value(claim.value());
    retry_ambiguous(|| store.transition(claim.key(), from, None, Duration::ZERO)).await
}

/// Retries an operation whose outcome is unknown (timeout, dropped
/// connection). Only for operations that are safe to repeat.
async fn retry_ambiguous<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut tries = 0;
    loop {
        match op().await {
            Err(err) if err.is_unavailable() && tries < AMBIGUOUS_RETRIES => {
                tries += 1;
                tracing::debug!(error = %err, tries, "retrying an unanswered store request");
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer spawns these futures: they must be `Send` for any store,
    /// which the compiler checks here, once, for a generic one.
    #[allow(dead_code)]
    fn futures_are_send<S: Store>(store: &S, claim: &Claim, token: &Token) {
        fn send<T: Send>(_: T) {}
        let d = Duration::ZERO;
        send(super::claim(store, "k", token, "", d));
        send(renew(store, claim, d));
        send(complete(store, claim, d));
        send(complete_with_outbox(store, claim, d, "o", &[]));
        send(release(store, claim, d));
        send(discard(store, claim));
    }
}
