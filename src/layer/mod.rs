//! The tower middleware: [`IdempotencyLayer`] and [`Idempotency`].
//!
//! ```
//! use std::convert::Infallible;
//! use amqp_idempotency::{Config, IdempotencyLayer, OutcomeKind, store::MemoryStore};
//! use lapin::{message::Delivery, BasicProperties};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), amqp_idempotency::BoxError> {
//! let layer = IdempotencyLayer::new(MemoryStore::new(), "orders", Config::default())?;
//! let service = layer.layer(service_fn(|delivery: Delivery| async move {
//!     println!("charging for {:?}", delivery.properties.message_id());
//!     Ok::<_, Infallible>(())
//! }));
//!
//! let message = || {
//!     let mut d = Delivery::mock(1, "".into(), "orders".into(), false, b"{}".to_vec());
//!     d.properties = BasicProperties::default().with_message_id("order-7".into());
//!     d
//! };
//! assert_eq!(service.clone().oneshot(message()).await?.kind(), OutcomeKind::Processed);
//! assert_eq!(service.oneshot(message()).await?.kind(), OutcomeKind::Duplicate);
//! # Ok(())
//! # }
//! ```

mod decide;
mod run;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::config::{Config, StoreFailurePolicy};
use crate::error::{BoxError, ConfigError};
use crate::fingerprint::{Fingerprint, MessageIdOrBodyHash};
use crate::guard::Deduplicator;
use crate::outbox::{Mode, OutboxLayer, OutboxPublisher, Plain, WithOutbox};
use crate::outcome::Outcome;
use crate::store::Store;
use crate::trace::TraceContext;
use run::Handler;

/// Wraps a handler (`Service<Delivery>`) in [`Idempotency`].
pub struct IdempotencyLayer<St, F = MessageIdOrBodyHash> {
    dedup: Deduplicator<St, F>,
}

impl<St, F> Clone for IdempotencyLayer<St, F> {
    fn clone(&self) -> Self {
        Self {
            dedup: self.dedup.clone(),
        }
    }
}

impl<St, F> std::fmt::Debug for IdempotencyLayer<St, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("dedup", &self.dedup)
            .finish()
    }
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer over `store` for deliveries from `queue` (the default scope),
    /// with the default fingerprint. Fails when `config` is inconsistent.
    pub fn new(store: St, queue: &str, config: Config) -> Result<Self, ConfigError> {
        Ok(Self {
            dedup: Deduplicator::new(store, queue, config)?,
        })
    }
}

impl<St: Store + Clone, F: Fingerprint> IdempotencyLayer<St, F> {
    /// Uses `fingerprint` to identify duplicates.
    pub fn fingerprint<G: Fingerprint>(self, fingerprint: G) -> IdempotencyLayer<St, G> {
        IdempotencyLayer {
            dedup: self.dedup.with_fingerprint(fingerprint),
        }
    }
}

impl<St, F> IdempotencyLayer<St, F> {
    /// A layer around an existing deduplicator (shares its store and settings).
    pub fn from_deduplicator(dedup: Deduplicator<St, F>) -> Self {
        Self { dedup }
    }

    /// The deduplicator, e.g. to look up a key.
    pub fn deduplicator(&self) -> &Deduplicator<St, F> {
        &self.dedup
    }

    /// Shares `stopping` with the runner that serves this layer (and with
    /// other layers it serves) instead of a handle of its own; see
    /// [`Stopping`](crate::Stopping).
    pub fn with_stopping(self, stopping: crate::Stopping) -> Self
    where
        St: crate::store::Store + Clone,
        F: crate::fingerprint::Fingerprint + Clone,
    {
        Self {
            dedup: self.dedup.with_stopping(stopping),
        }
    }

    /// The shutdown handle to give the runner that serves this layer
    /// ([`ServeOptions::stopping`](crate::ServeOptions::stopping)); see
    /// [`Stopping`](crate::Stopping).
    pub fn stopping(&self) -> crate::Stopping {
        self.dedup.stopping().clone()
    }

    /// The same layer for a handler that publishes through an outbox
    /// (a `Service<`[`OutboxDelivery`](crate::outbox::OutboxDelivery)`>`):
    /// what it stages is committed with its done mark, then published on
    /// `publisher` before the ack ([`outbox`](crate::outbox)).
    pub fn with_outbox(self, publisher: OutboxPublisher) -> OutboxLayer<St, F> {
        OutboxLayer::new(self.dedup, publisher)
    }
}

impl<S, St, F> Layer<S> for IdempotencyLayer<St, F> {
    type Service = Idempotency<S, St, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::with_mode(inner, self.dedup.clone(), Plain)
    }
}

// Here rather than beside `OutboxLayer`: what builds the service lives with
// the service, so that the outbox never reaches up into the layer.
impl<S, St, F> Layer<S> for OutboxLayer<St, F> {
    type Service = Idempotency<S, St, F, WithOutbox>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::with_mode(inner, self.deduplicator().clone(), self.mode().clone())
    }
}

/// Runs the inner handler at most once per fingerprint.
///
/// Its response is an [`Outcome`]; the runner turns it into ack, nack or
/// reject. While the store is unreachable (fail-closed), `poll_ready`
/// stays pending, so a runner that waits for readiness stops taking
/// deliveries until the store answers again.
///
/// `M` says what the handler receives: [`Plain`] the delivery,
/// [`WithOutbox`] the delivery and an outbox.
pub struct Idempotency<S, St, F = MessageIdOrBodyHash, M = Plain> {
    inner: S,
    dedup: Deduplicator<St, F>,
    mode: M,
    recovering: Option<BoxFuture<'static, ()>>,
}

impl<S: Clone, St, F, M: Clone> Clone for Idempotency<S, St, F, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            dedup: self.dedup.clone(),
            mode: self.mode.clone(),
            recovering: None,
        }
    }
}

impl<S, St, F, M> Idempotency<S, St, F, M> {
    fn with_mode(inner: S, dedup: Deduplicator<St, F>, mode: M) -> Self {
        Self {
            inner,
            dedup,
            mode,
            recovering: None,
        }
    }
}

impl<S: std::fmt::Debug, St, F, M> std::fmt::Debug for Idempotency<S, St, F, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("dedup", &self.dedup)
            .finish_non_exhaustive()
    }
}

impl<S, St, F, M> Idempotency<S, St, F, M> {
    /// The wrapped handler.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped handler, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the handler.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, St, F, M> Service<Delivery> for Idempotency<S, St, F, M>
where
    M: Mode,
    S: Service<M::Request> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    St: Store,
    F: Fingerprint,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let fail_closed = self.dedup.config().on_store_error == StoreFailurePolicy::FailClosed;
        if fail_closed && self.dedup.store_is_down() {
            let dedup = self.dedup.clone();
            let recovering = self
                .recovering
                .get_or_insert_with(|| Box::pin(async move { dedup.wait_for_store().await }));
            ready!(recovering.as_mut().poll(cx));
            self.recovering = None;
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        // Use the service that was driven to readiness, leave a clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let dedup = self.dedup.clone();
        let mode = self.mode.clone();
        let span = delivery_span(&delivery);
        let trace = TraceContext::join(&span, &delivery.properties);
        // Boxed once here rather than copied into each future it passes
        // through on its way to the handler.
        let delivery = Box::new(delivery);
        Box::pin(
            async move {
                let outcome = process(&dedup, &mode, inner, delivery, trace.clone())
                    .await
                    .traced(trace);
                crate::metrics::outcome(outcome.kind());
                tracing::Span::current().record("outcome", outcome.kind().as_str());
                tracing::debug!(
                    attempt = outcome.attempt(),
                    reason = outcome.reason(),
                    "settled"
                );
                Ok(outcome)
            }
            .instrument(span),
        )
    }
}

/// The span of one delivery. Under the `opentelemetry` feature it also
/// carries the OpenTelemetry messaging attributes (a consumer span that
/// processes the message); its parent is set by [`TraceContext::join`].
fn delivery_span(delivery: &Delivery) -> tracing::Span {
    #[cfg(feature = "opentelemetry")]
    let span = tracing::info_span!(
        "delivery",
        delivery_tag = delivery.delivery_tag,
        redelivered = delivery.redelivered,
        fingerprint = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = delivery.exchange.as_str(),
        messaging.rabbitmq.destination.routing_key = delivery.routing_key.as_str(),
        messaging.message.id = delivery.properties.message_id().as_ref().map(|id| id.as_str()),
    );
    #[cfg(not(feature = "opentelemetry"))]
    let span = tracing::info_span!(
        "delivery",
        delivery_tag = delivery.delivery_tag,
        redelivered = delivery.redelivered,
        fingerprint = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    span
}

async fn process<S, St, F, M>(
    dedup: &Deduplicator<St, F>,
    mode: &M,
    inner: S,
    mut delivery: Box<Delivery>,
    trace: TraceContext,
) -> Outcome
where
    M: Mode,
    S: Handler<M::Request>,
    St: Store,
    F: Fingerprint,
{
    // The handler gets a delivery it cannot settle: the runner acks only
    // after the done mark, and its coalesced `multiple` acks count on
    // every delivery passing through it.
    let inert = Delivery::mock(
        delivery.delivery_tag,
        "".into(),
        "".into(),
        false,
        Vec::new(),
    )
    .acker;
    delivery.acker = inert.clone();
    let outcome = decide::decide(dedup, mode, inner, delivery, trace).await;
    if !inert.usable() {
        crate::metrics::handler_settled();
        tracing::error!(
            "the handler acked, nacked or rejected its delivery itself: ignored; the runner settles it after the store write (remove the ack from the handler)"
        );
    }
    outcome
}
