//! Where claims live: the [`Store`] trait, [`RedisStore`] and [`MemoryStore`],
//! and the [`machine`] that takes a record from claimed to done.
//!
//! ```
//! use std::time::Duration;
//! use amqp_idempotency::store::{ClaimOutcome, MemoryStore, Token, machine};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), amqp_idempotency::StoreError> {
//! let store = MemoryStore::new();
//! let lease = Duration::from_secs(30);
//! let ClaimOutcome::Acquired(claim) = machine::claim(&store, "idem:orders:42", &Token::new(), "", lease).await? else {
//!     panic!("a fresh key is ours");
//! };
//! // Another consumer sees the message in progress...
//! let other = machine::claim(&store, "idem:orders:42", &Token::new(), "", lease).await?;
//! assert!(matches!(other, ClaimOutcome::InProgress { .. }));
//! // ...and done once we complete it.
//! assert!(machine::complete(&store, &claim, Duration::from_secs(3600)).await?);
//! let again = machine::claim(&store, "idem:orders:42", &Token::new(), "", lease).await?;
//! assert!(matches!(again, ClaimOutcome::Done { .. }));
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! From the top down, each file importing only what lies below it:
//!
//! - [`machine`]: the state machine (claim, renew, complete, release,
//!   discard) as free functions over any [`Store`], written once.
//! - `primitives`: the [`Store`] trait, the primitives a backend offers
//!   (insert-if-absent returning the old value, a compare-and-set
//!   transition, a read, a write probe, and the outbox's three).
//! - `redis/` ([`RedisStore`]) and `memory` ([`MemoryStore`]): the backends.
//! - `claim` ([`Claim`], [`ClaimOutcome`]), `token` ([`Token`]) and
//!   `record`: the values, and the wire format every version of this
//!   library reads, a compatibility contract described there (read it
//!   from code with [`records`](crate::records)).

mod claim;
pub mod machine;
mod memory;
mod primitives;
mod record;
mod redis;
mod token;

pub use self::claim::{Claim, ClaimOutcome};
pub(crate) use self::machine::CRASH_MEMORY;
pub use self::memory::MemoryStore;
pub use self::primitives::{Expect, OutboxEntry, Store, Stored};
pub(crate) use self::record::Record;
pub use self::redis::RedisStore;
pub(crate) use self::redis::client_for;
pub use self::token::Token;
