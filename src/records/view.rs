//! What a record says, read-only: [`Record`], its [`State`], and the
//! per-state counts of [`Stats`].

use std::time::Duration;

use crate::store::{CRASH_MEMORY, Record as WireRecord, Stored};

/// At most this much of an unrecognized value is kept in a [`State::Unrecognized`].
pub(super) const KEPT_VALUE_BYTES: usize = 4096;

/// One message's record, as read from the store: a snapshot, changed by
/// nothing but the consumers that own the key.
///
/// ```
/// use std::time::Duration;
/// use amqp_idempotency::records::{Record, State};
/// use amqp_idempotency::store::{MemoryStore, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), amqp_idempotency::StoreError> {
/// let store = MemoryStore::new();
/// store.insert_or_get("idem:orders:42", b"hello", Duration::from_secs(60)).await?;
/// let stored = store.get("idem:orders:42").await?.expect("just written");
/// let record = Record::decode("idem:orders:42", stored);
/// assert!(matches!(record.state(), State::Unrecognized { .. }));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    key: String,
    state: State,
    ttl: Option<Duration>,
    outbox_messages: usize,
}

/// Where a message stands.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// A consumer claimed the message and has not finished it.
    InProgress {
        /// The owner's claim token (the handler's fencing value).
        token: String,
        /// Which attempt this is, from 1: handler runs, not deliveries.
        attempt: u32,
        /// The payload hash being processed ("" when not checked).
        payload_hash: String,
        /// How long the owner's lease has left. `Some(Duration::ZERO)`
        /// when it is over: the attempt never finished (its consumer
        /// died or hung), and the next copy of the message takes the
        /// record over as the next attempt. `None` when the record
        /// cannot tell (a key without an expiry).
        lease_left: Option<Duration>,
    },
    /// The handler failed and the claim was given back; the next copy of
    /// the message takes it over.
    Released {
        /// Attempts that failed so far.
        attempts: u32,
        /// The token of the claim that released it ("" if unknown).
        token: String,
        /// The payload hash that failed ("" when not checked).
        payload_hash: String,
    },
    /// Processed: further copies are acknowledged without running the handler.
    Done {
        /// The first hexadecimal digits of the token that completed it
        /// ("" if unknown).
        token: String,
        /// The first hexadecimal digits of the payload hash ("" when not
        /// checked).
        payload_hash: String,
    },
    /// The key holds something this library did not write; consumers
    /// dead-letter the messages that map to it.
    Unrecognized {
        /// The Redis type of the key: `string`, `hash`, `list`...
        kind: String,
        /// The start of a string value (at most 4 KiB; empty for other types).
        value: Vec<u8>,
        /// The full length of a string value, in bytes.
        len: usize,
    },
}

impl Record {
    /// The record a store holds at `key`, from what [`Store::get`](crate::store::Store::get)
    /// returned: any value this library ever wrote, or
    /// [`State::Unrecognized`] for anything else.
    pub fn decode(key: &str, stored: Stored) -> Self {
        let (value, ttl) = stored;
        let len = value.len();
        Self::from_parts(key, "string", value, len, ttl, 0)
    }

    /// A record from what a lookup saw: the key's Redis type, the start
    /// of its value, the value's full length and its time to live.
    pub(super) fn from_parts(
        key: &str,
        kind: &str,
        mut value: Vec<u8>,
        len: usize,
        ttl: Option<Duration>,
        outbox_messages: usize,
    ) -> Self {
        let wire = (kind == "string" && len == value.len())
            .then(|| WireRecord::parse(&value))
            .flatten();
        let state = match wire {
            Some(WireRecord::InProgress {
                token,
                attempt,
                payload_hash,
                lingers,
            }) => {
                // A record outlives its lease by CRASH_MEMORY; 0.1.0's
                // records expire with it.
                let lease_left = match ttl {
                    Some(ttl) if lingers => Some(ttl.saturating_sub(CRASH_MEMORY)),
                    ttl => ttl,
                };
                State::InProgress {
                    token,
                    attempt,
                    payload_hash,
                    lease_left,
                }
            }
            Some(WireRecord::Released {
                attempts,
                payload_hash,
                token,
            }) => State::Released {
                attempts,
                token,
                payload_hash,
            },
            Some(WireRecord::Done {
                payload_hash,
                token,
            }) => State::Done {
                token,
                payload_hash,
            },
            None => {
                value.truncate(KEPT_VALUE_BYTES);
                State::Unrecognized {
                    kind: kind.to_owned(),
                    value,
                    len,
                }
            }
        };
        Self {
            key: key.to_owned(),
            state,
            ttl,
            outbox_messages,
        }
    }

    /// The Redis key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Where the message stands.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// How long the key has left to live; `None` when it never expires
    /// (no record of this library's does).
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// Messages of the record's outbox not yet confirmed by the broker
    /// (0 without an outbox, and for records not read by
    /// [`Records`](super::Records)). A done record with a non-empty outbox
    /// is dispatched again by the next copy of its message.
    pub fn outbox_messages(&self) -> usize {
        self.outbox_messages
    }
}

/// How many records a [`Records::stats`](super::Records::stats) found in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Claimed and not finished (lease running or over).
    pub in_progress: u64,
    /// Processed.
    pub done: u64,
    /// Failed and given back.
    pub released: u64,
    /// Keys under the prefix this library did not write.
    pub unrecognized: u64,
}

impl Stats {
    /// Every key counted.
    pub fn total(&self) -> u64 {
        self.in_progress + self.done + self.released + self.unrecognized
    }

    pub(super) fn count(&mut self, state: &State) {
        match state {
            State::InProgress { .. } => self.in_progress += 1,
            State::Done { .. } => self.done += 1,
            State::Released { .. } => self.released += 1,
            State::Unrecognized { .. } => self.unrecognized += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lingering_claim_counts_its_lease_apart_from_the_crash_memory() {
        let value = b"p:0123456789abcdef+:2:c0ffee".to_vec();
        let running = Record::decode(
            "k",
            (value.clone(), Some(CRASH_MEMORY + Duration::from_secs(7))),
        );
        assert_eq!(
            running.state(),
            &State::InProgress {
                token: "0123456789abcdef".into(),
                attempt: 2,
                payload_hash: "c0ffee".into(),
                lease_left: Some(Duration::from_secs(7)),
            }
        );
        let over = Record::decode("k", (value, Some(Duration::from_secs(3))));
        assert!(
            matches!(over.state(), State::InProgress { lease_left: Some(left), .. } if left.is_zero())
        );
        // 0.1.0's claims expire with their lease.
        let old = Record::decode("k", (b"p:tok:1:".to_vec(), Some(Duration::from_secs(9))));
        assert!(
            matches!(old.state(), State::InProgress { lease_left: Some(left), .. } if *left == Duration::from_secs(9))
        );
    }

    #[test]
    fn foreign_values_are_unrecognized_and_counted_apart() {
        let record = Record::decode("k", (b"hello".to_vec(), None));
        assert_eq!(
            record.state(),
            &State::Unrecognized {
                kind: "string".into(),
                value: b"hello".to_vec(),
                len: 5
            }
        );
        let mut stats = Stats::default();
        stats.count(record.state());
        stats.count(Record::decode("k", (b"d:ab:cd".to_vec(), None)).state());
        assert_eq!((stats.unrecognized, stats.done, stats.total()), (1, 1, 2));
    }
}
