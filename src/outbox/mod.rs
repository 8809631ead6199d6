//! The outbox: messages a handler publishes, committed with its done mark,
//! dispatched after the commit, and finished by duplicates.
//!
//! ```no_run
//! use amqp_idempotency::{Config, HandlerError, IdempotencyLayer};
//! use amqp_idempotency::outbox::{OutboxDelivery, OutboxPublisher};
//! use amqp_idempotency::store::RedisStore;
//! use lapin::BasicProperties;
//! use tower::{Layer, service_fn};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_env()?;
//! let store = RedisStore::connect(&config).await?;
//! let service = IdempotencyLayer::new(store, "orders", config.clone())?
//!     .with_outbox(OutboxPublisher::connect(&config))
//!     .layer(service_fn(|incoming: OutboxDelivery| async move {
//!         // Staged, not sent: published once the done mark is written.
//!         incoming.outbox.publish(
//!             "payments",
//!             "charge",
//!             BasicProperties::default(),
//!             incoming.delivery.data.clone(),
//!         )?;
//!         Ok::<_, HandlerError>(())
//!     }));
//! # let _ = service;
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//!
//! The handler gets an [`OutboxDelivery`]: the delivery and an [`Outbox`]
//! on which it stages outgoing messages ([`Outbox::publish`]) and, for a
//! request, its reply ([`Outbox::reply`]). Nothing is sent while it runs.
//!
//! 1. **Commit.** When the handler succeeded, its done mark and the staged
//!    messages are written in one atomic step (a script over the record's
//!    key and its companion outbox key, `{<record key>}:\0outbox`, which share a hash tag,
//!    so it holds on a Redis Cluster too). A handler that failed or timed
//!    out commits nothing, and nothing it staged is ever published.
//! 2. **Dispatch.** The messages are published on a confirm-mode channel,
//!    each with a deterministic `message_id`: `{scope}:{fingerprint}:{n}`
//!    for the n-th message (from 0) and `{scope}:{fingerprint}:reply:{h}`
//!    for the reply, where `{h}` is 16 hex digits of a SHA-256 of the
//!    request's `correlation_id` (`{scope}:{fingerprint}:reply` for a
//!    request without one); an id longer than AMQP's 255 bytes is hashed.
//!    As the broker confirms them, they are marked dispatched (their
//!    bodies are dropped from the outbox).
//! 3. **Ack.** Only then is the incoming message acked. When a message was
//!    not confirmed, the incoming one is held and what is left sent again,
//!    for up to half of `IDEMPOTENCY_CONSUMER_TIMEOUT`, then requeued
//!    ([`OutcomeKind::Undispatched`](crate::OutcomeKind::Undispatched)).
//!
//! A duplicate of a done message dispatches what its outbox still holds
//! (never what was marked dispatched) before it is acked, and a duplicate
//! request whose reply is stored gets that reply again, at its own
//! `reply_to` with its own `correlation_id`, without running the handler.
//!
//! So a crash anywhere sends each outgoing message at least once, always
//! with the same `message_id`: a consumer that deduplicates by it (every
//! consumer of this crate does, by default) handles it once. The reply is
//! kept for the done mark's retention; dispatched messages' bodies are
//! dropped at once. An outbox consumer's done marks (and outboxes) are kept
//! at least half of `IDEMPOTENCY_CONSUMER_TIMEOUT` plus
//! `IDEMPOTENCY_RETRY_BACKOFF_MAX` and `IDEMPOTENCY_LEASE_TTL`, even when
//! `IDEMPOTENCY_DONE_TTL` is shorter: a delivery whose messages are not
//! confirmed is held that long, then requeued, and its copy must find them.
//!
//! # What a requester can deduplicate on
//!
//! A reply's `message_id` is one per request *attempt*: the same for
//! every copy of the reply to one `correlation_id` (a crash may send it
//! twice), different for a retried request that carries a new
//! `correlation_id`, so a requester that deduplicates replies by
//! `message_id` drops the extra copies and still gets the answer to its
//! retry. Match a reply to its request by `correlation_id`, as usual. A
//! requester that retries with the same `correlation_id` gets replies
//! with the same `message_id`, which its deduplication treats as one.
//!
//! A handler that writes to a database is not made atomic with the done
//! mark by this: only what goes through the outbox is.

// Staging collects what the handler hands over; the codec is the stored
// form of each message; ids name them and the outbox key; ready turns
// committed entries into messages to send; the publisher sends them with
// confirms; flow is the outbox's part of a delivery once the handler
// returned; mode is what the handler receives. The layer drives all of it,
// and nothing here calls back into the layer, so the two stay one-way.

mod codec;
mod flow;
mod ids;
mod mode;
mod publisher;
mod ready;
mod staging;

#[cfg(feature = "testing")]
pub use ids::outbox_key;
#[cfg(not(feature = "testing"))]
pub(crate) use ids::outbox_key;
pub use mode::{Mode, OutboxLayer, Plain, WithOutbox};
#[cfg(feature = "testing")]
pub use publisher::Checkpoint;
pub use publisher::OutboxPublisher;
pub use staging::{Outbox, OutboxDelivery};

pub(crate) use flow::{commit_and_dispatch, dispatch_unrecorded, finish_duplicate};
pub(crate) use ready::ReplyTarget;
pub(crate) use staging::staging;
