//! The [`Store`] trait: the primitives a backend implements, and nothing
//! more. The state machine built on them lives in
//! [`machine`](super::machine), out of any backend's reach.
//!
//! ```
//! use std::time::Duration;
//! use amqp_idempotency::store::{Expect, MemoryStore, Store};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), amqp_idempotency::StoreError> {
//! let store = MemoryStore::new();
//! let ttl = Duration::from_secs(60);
//! assert_eq!(store.insert_or_get("k", b"a", ttl).await?, None);
//! assert!(store.transition("k", Expect::Value(b"a"), Some(b"b"), ttl).await?);
//! assert!(!store.transition("k", Expect::Value(b"a"), Some(b"c"), ttl).await?);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;

/// What a [`Store::transition`] must find at the key before it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect<'a> {
    /// Exactly this value.
    Value(&'a [u8]),
    /// This value, or no key at all: a done mark may be written where our
    /// lease expired with nobody taking the key over.
    ValueOrAbsent(&'a [u8]),
    /// This value with at most `grace` left to live: an in-progress record
    /// whose lease is over: an in-progress record is kept `grace` (a day)
    /// past its lease, so that a crashed attempt is counted. Checked in the same
    /// atomic step as the write, so a renewal that lands first wins.
    Expired {
        /// The in-progress value.
        value: &'a [u8],
        /// The time to live at or below which the lease is over.
        grace: Duration,
    },
}

impl Expect<'_> {
    /// The value expected at the key.
    pub fn value(&self) -> &[u8] {
        match self {
            Self::Value(value) | Self::ValueOrAbsent(value) | Self::Expired { value, .. } => value,
        }
    }
}

/// A stored value and its remaining time to live (`None`: no expiry).
pub type Stored = (Vec<u8>, Option<Duration>);

/// A key/value store with expiry that can hold idempotency records.
///
/// Implementors provide four primitives (and three more for an outbox);
/// the claim/renew/complete/release transitions are the free functions of
/// [`machine`](super::machine), built on these primitives, so every store
/// follows the same state machine and none can change it. Every write
/// after a claim is a [`transition`](Self::transition) that checks the
/// current value first.
///
/// Errors: a [`StoreError`] that [`is_unavailable`](StoreError::is_unavailable)
/// pauses consumption (fail-closed) until [`probe`](Self::probe) succeeds;
/// any other error is about that one key (a key of another type, say) and
/// dead-letters that one message. So a store returns unavailable for
/// anything that is not about the key: outages, timeouts, but also refused
/// credentials, missing permissions, a full or read-only server.
pub trait Store: Send + Sync + 'static {
    /// Sets `key` to `value` with a `ttl` only if it is absent, and returns
    /// the previous value (`None`: the write happened). One round trip:
    /// `SET key value NX PX ttl GET`.
    fn insert_or_get(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// If `key` holds what `from` expects, replaces it with `to` (with a
    /// `ttl`), or deletes it when `to` is `None`, and returns true. Also
    /// returns true when `key` already holds `to`, so a retried transition
    /// is safe. Otherwise changes nothing and returns false.
    fn transition(
        &self,
        key: &str,
        from: Expect<'_>,
        to: Option<&[u8]>,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The value of `key` and its remaining time to live.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Stored>, StoreError>> + Send;

    /// Proves that the store accepts a write, by writing a short-lived
    /// `key` that no record uses, with the same kind of request as
    /// [`insert_or_get`](Self::insert_or_get) (a `SET ... NX PX ms GET`
    /// on Redis). A `PING` is not enough: a Redis that is full, read-only
    /// or unable to persist answers it while refusing every write, and an
    /// ACL may allow a plain `SET` but not a claim. After a refused claim,
    /// `key` lies in the record's cluster slot. A passing probe lets a held
    /// delivery claim again; the pause ends when a claim succeeds.
    fn probe(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes `to` where `key` holds what `from` expects, like
    /// [`transition`](Self::transition), and in the same atomic step
    /// replaces the hash at `outbox_key` with `entries` (field, value),
    /// expiring with the record. True when written, and when `key` already
    /// holds `to` (a retried commit: the outbox is left as it is, since its
    /// dispatch may have begun). Both keys share a hash tag, so a cluster
    /// can run this on one node.
    ///
    /// The default refuses: a store that keeps no outbox cannot serve
    /// [`OutboxLayer`](crate::outbox::OutboxLayer).
    fn commit_outbox(
        &self,
        key: &str,
        from: Expect<'_>,
        to: &[u8],
        ttl: Duration,
        outbox_key: &str,
        entries: &[OutboxEntry],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (from, to, ttl, outbox_key, entries);
        async move { Err(no_outbox("commit", key)) }
    }

    /// The entries of the outbox hash at `outbox_key` (none when it is absent).
    fn outbox(
        &self,
        outbox_key: &str,
    ) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + Send {
        async move { Err(no_outbox("outbox", outbox_key)) }
    }

    /// Removes `fields` from the outbox hash at `outbox_key`: their
    /// messages were dispatched. Removing what is gone is no error.
    fn outbox_remove(
        &self,
        outbox_key: &str,
        fields: &[Vec<u8>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = fields;
        async move { Err(no_outbox("outbox_remove", outbox_key)) }
    }
}

/// One field of an outbox hash and its value.
pub type OutboxEntry = (Vec<u8>, Vec<u8>);

fn no_outbox(operation: &'static str, key: &str) -> StoreError {
    StoreError::new(
        operation,
        key,
        false,
        "this store keeps no outbox: implement Store::commit_outbox, outbox and outbox_remove, or use RedisStore or MemoryStore",
    )
}
