//! What the handler receives ([`Mode`]): the delivery alone ([`Plain`]), or
//! the delivery and an outbox ([`WithOutbox`]), and [`OutboxLayer`], the
//! layer of the latter. The layer that turns it into an
//! [`Idempotency`](crate::Idempotency) service is implemented beside that
//! service; this side knows nothing of it.
//!
//! ```ignore
//! let layer: OutboxLayer<_> = IdempotencyLayer::new(store, "orders", config)?.with_outbox(publisher);
//! let service = layer.layer(handler); // Idempotency<_, _, _, WithOutbox>
//! ```

use std::sync::Arc;

use lapin::message::Delivery;

use super::publisher::OutboxPublisher;
use super::staging::{Outbox, OutboxDelivery};
use crate::fingerprint::MessageIdOrBodyHash;
use crate::guard::Deduplicator;

/// Wraps a handler of [`OutboxDelivery`] in [`Idempotency`](crate::Idempotency): made by
/// [`IdempotencyLayer::with_outbox`](crate::IdempotencyLayer::with_outbox).
pub struct OutboxLayer<St, F = MessageIdOrBodyHash> {
    dedup: Deduplicator<St, F>,
    mode: WithOutbox,
}

impl<St, F> Clone for OutboxLayer<St, F> {
    fn clone(&self) -> Self {
        Self {
            dedup: self.dedup.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<St, F> std::fmt::Debug for OutboxLayer<St, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxLayer")
            .field("dedup", &self.dedup)
            .field("publisher", &self.mode.publisher)
            .finish()
    }
}

impl<St, F> OutboxLayer<St, F> {
    pub(crate) fn new(dedup: Deduplicator<St, F>, publisher: OutboxPublisher) -> Self {
        Self {
            dedup,
            mode: WithOutbox {
                publisher: Arc::new(publisher),
            },
        }
    }

    /// The deduplicator, e.g. to look up a key.
    pub fn deduplicator(&self) -> &Deduplicator<St, F> {
        &self.dedup
    }

    /// The shutdown handle to give the runner that serves this layer
    /// ([`ServeOptions::stopping`](crate::ServeOptions::stopping)); see
    /// [`Stopping`](crate::Stopping).
    pub fn stopping(&self) -> crate::Stopping {
        self.dedup.stopping().clone()
    }

    /// How the services it makes call their handler.
    pub(crate) fn mode(&self) -> &WithOutbox {
        &self.mode
    }
}

/// How [`Idempotency`](crate::Idempotency) calls its handler: with the delivery alone
/// ([`Plain`]) or with an outbox ([`WithOutbox`]). Sealed: its methods are
/// the library's own.
pub trait Mode: sealed::Calls {}

impl Mode for Plain {}
impl Mode for WithOutbox {}

pub(crate) mod sealed {
    use std::sync::Arc;

    use lapin::message::Delivery;

    use super::super::publisher::OutboxPublisher;
    use super::super::staging::Outbox;

    /// What the layer asks of a [`Mode`](super::Mode); not nameable outside
    /// the crate, so no other mode can be written.
    pub trait Calls: Clone + Send + Sync + 'static {
        /// What the handler receives.
        type Request: Send + 'static;

        /// The handler's request for `delivery`, with `outbox` in outbox mode.
        fn request(delivery: Delivery, outbox: Option<Outbox>) -> Self::Request;

        /// Where staged messages go; `None` without an outbox.
        fn publisher(&self) -> Option<&Arc<OutboxPublisher>>;
    }
}

/// The handler is a `Service<Delivery>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plain;

impl sealed::Calls for Plain {
    type Request = Delivery;

    fn request(delivery: Delivery, _outbox: Option<Outbox>) -> Delivery {
        delivery
    }

    fn publisher(&self) -> Option<&Arc<OutboxPublisher>> {
        None
    }
}

/// The handler is a `Service<OutboxDelivery>`.
#[derive(Clone, Debug)]
pub struct WithOutbox {
    publisher: Arc<OutboxPublisher>,
}

impl sealed::Calls for WithOutbox {
    type Request = OutboxDelivery;

    fn request(delivery: Delivery, outbox: Option<Outbox>) -> OutboxDelivery {
        OutboxDelivery {
            delivery,
            outbox: outbox.unwrap_or_else(|| Outbox::new(0)),
        }
    }

    fn publisher(&self) -> Option<&Arc<OutboxPublisher>> {
        Some(&self.publisher)
    }
}
