//! `ours` (and `ours_mem`, `ours_outbox`, `ours_hold`, `ours_broker`): the
//! crate's [`serve`] runner and [`IdempotencyLayer`] with default settings,
//! over a store wrapped to count calls, and a service wrapper that watches
//! each [`Outcome`]. In `ours_outbox` the layer has an outbox
//! ([`OutboxPublisher::connect`]) and the handler stages one message per
//! delivery for a downstream queue. In `ours_hold` and `ours_broker` the
//! handler fails the `--failing` ids (retryably) every time, so they are
//! parked after `IDEMPOTENCY_MAX_ATTEMPTS` (5), and the runner retries them
//! with `IDEMPOTENCY_RETRY=hold` or `broker` and a backoff of
//! `--failing-backoff-ms` doubling up to 8 times that.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use amqp_idempotency::outbox::{OutboxDelivery, OutboxPublisher};
use amqp_idempotency::store::{Expect, OutboxEntry, Store};
use amqp_idempotency::{
    BoxError, Config, Disposition, HandlerError, IdempotencyLayer, Outcome, OutcomeKind,
    ServeOptions, StoreError, serve,
};
use harness::amqp::new_channel;
use lapin::BasicProperties;
use lapin::message::Delivery;
use tokio::sync::oneshot;
use tower::{Layer, Service, service_fn};

use crate::meter::{Measured, Meter};
use crate::run::{Ctx, failing_schedule};
use crate::stats::{RunStats, latency_start, message_id};
use crate::variants::{Variant, consume};

/// A store that counts calls to the four primitives (and the three of the
/// outbox) and delegates them.
///
/// `claim`/`renew`/`complete`/`release` (and `complete_with_outbox`) are
/// the free functions of `store::machine`, built on these primitives (no
/// store can override them), and `RedisStore` does one request per
/// primitive, so the count is the number of Redis requests.
struct CountingStore<S> {
    inner: S,
    stats: Arc<RunStats>,
}

impl<S> CountingStore<S> {
    fn tick(&self) {
        RunStats::count(&self.stats.redis_roundtrips);
    }
}

impl<S: Store> Store for CountingStore<S> {
    async fn insert_or_get(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.tick();
        self.inner.insert_or_get(key, value, ttl).await
    }

    async fn transition(
        &self,
        key: &str,
        from: Expect<'_>,
        to: Option<&[u8]>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.tick();
        self.inner.transition(key, from, to, ttl).await
    }

    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Duration>)>, StoreError> {
        self.tick();
        self.inner.get(key).await
    }

    async fn probe(&self, key: &str) -> Result<(), StoreError> {
        self.tick();
        self.inner.probe(key).await
    }

    async fn commit_outbox(
        &self,
        key: &str,
        from: Expect<'_>,
        to: &[u8],
        ttl: Duration,
        outbox_key: &str,
        entries: &[OutboxEntry],
    ) -> Result<bool, StoreError> {
        self.tick();
        self.inner
            .commit_outbox(key, from, to, ttl, outbox_key, entries)
            .await
    }

    async fn outbox(&self, outbox_key: &str) -> Result<Vec<OutboxEntry>, StoreError> {
        self.tick();
        self.inner.outbox(outbox_key).await
    }

    async fn outbox_remove(&self, outbox_key: &str, fields: &[Vec<u8>]) -> Result<(), StoreError> {
        self.tick();
        self.inner.outbox_remove(outbox_key, fields).await
    }
}

/// Wraps the idempotency service to see each [`Outcome`]: counts
/// duplicates and requeues, and records the latency up to the outcome
/// (the runner acks right after it).
#[derive(Clone)]
struct Observe<S> {
    inner: S,
    stats: Arc<RunStats>,
}

impl<S> Service<Delivery> for Observe<S>
where
    S: Service<Delivery, Response = Outcome, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let start = latency_start(&delivery);
        let fails = self.stats.fails(message_id(&delivery));
        let stats = Arc::clone(&self.stats);
        let call = self.inner.call(delivery);
        Box::pin(async move {
            let result = call.await;
            match &result {
                Ok(outcome) => {
                    match outcome.kind() {
                        OutcomeKind::Processed => {}
                        OutcomeKind::Duplicate => RunStats::count(&stats.duplicates),
                        OutcomeKind::InProgressElsewhere => {}
                        // A failing id, failed: it comes back (from the
                        // consumer's hold or a delay queue).
                        OutcomeKind::Retry if fails => RunStats::count(&stats.retries),
                        // A failing id after its last attempt: parked.
                        OutcomeKind::AttemptsExhausted if fails => {
                            RunStats::count(&stats.parked);
                        }
                        other => {
                            eprintln!("bench: unexpected outcome {other} ({:?})", outcome.reason());
                            RunStats::count(&stats.errors);
                        }
                    }
                    match outcome.disposition() {
                        Disposition::Ack => {
                            stats.settle(start);
                            if !fails {
                                stats.settle_healthy();
                            }
                        }
                        Disposition::Requeue { .. } => RunStats::count(&stats.requeued),
                        // Never comes back: counted as settled so the run ends (and fails).
                        Disposition::DeadLetter => stats.settled_n(1),
                    }
                }
                Err(err) => {
                    eprintln!("bench: the service failed: {err}");
                    RunStats::count(&stats.errors);
                    RunStats::count(&stats.requeued);
                }
            }
            result
        })
    }
}

/// ours: the crate's runner and layer, default settings, over `store`.
/// With `downstream` (ours_outbox), the layer has an outbox on a connection
/// of its own to the broker, and the handler stages one message (the
/// incoming body, transient) for `downstream` through the default exchange.
#[allow(clippy::too_many_arguments)]
pub async fn drain_ours<S: Store>(
    ctx: &Ctx,
    variant: Variant,
    store: S,
    queue: &str,
    key_prefix: &str,
    downstream: Option<&str>,
    stats: &Arc<RunStats>,
    ready: oneshot::Sender<()>,
) -> Result<Measured, String> {
    let mut config = Config::default()
        .with_prefetch(ctx.options.prefetch)
        .with_key_prefix(key_prefix)
        .with_amqp_url(ctx.options.amqp_url.as_str());
    if let Some(mode) = variant.retry() {
        let (backoff, max) = failing_schedule(&ctx.options);
        config = config
            .with_retry(mode)
            .with_retry_backoff(backoff)
            .with_retry_backoff_max(max);
    }
    let store = CountingStore {
        inner: store,
        stats: Arc::clone(stats),
    };
    let layer = IdempotencyLayer::new(store, queue, config.clone())
        .map_err(|err| format!("cannot build the idempotency layer: {err}"))?;
    let handler_stats = Arc::clone(stats);
    match downstream {
        None => {
            if variant.retry().is_some() {
                // Fails the failing ids, every time.
                let handler = service_fn(move |delivery: Delivery| {
                    let stats = Arc::clone(&handler_stats);
                    let id = message_id(&delivery);
                    async move {
                        stats.handle(id).await;
                        if stats.fails(id) {
                            return Err(HandlerError::retryable("--failing: this id always fails"));
                        }
                        Ok(())
                    }
                });
                return serve_observed(ctx, layer.layer(handler), queue, &config, stats, ready)
                    .await;
            }
            let handler = service_fn(move |delivery: Delivery| {
                let stats = Arc::clone(&handler_stats);
                let id = message_id(&delivery);
                async move {
                    stats.handle(id).await;
                    Ok::<_, Infallible>(())
                }
            });
            serve_observed(ctx, layer.layer(handler), queue, &config, stats, ready).await
        }
        Some(downstream) => {
            let downstream: Arc<str> = downstream.into();
            let handler = service_fn(move |incoming: OutboxDelivery| {
                let stats = Arc::clone(&handler_stats);
                let downstream = Arc::clone(&downstream);
                async move {
                    let OutboxDelivery { delivery, outbox } = incoming;
                    stats.handle(message_id(&delivery)).await;
                    outbox.publish(
                        "",
                        &downstream,
                        BasicProperties::default().with_delivery_mode(1),
                        delivery.data,
                    )?;
                    Ok::<_, HandlerError>(())
                }
            });
            let idempotent = layer
                .with_outbox(OutboxPublisher::connect(&config))
                .layer(handler);
            serve_observed(ctx, idempotent, queue, &config, stats, ready).await
        }
    }
}

/// Runs `idempotent` (the layer around the handler) under the crate's
/// runner on `queue`, watching each outcome, until every message is settled.
async fn serve_observed<Svc>(
    ctx: &Ctx,
    idempotent: Svc,
    queue: &str,
    config: &Config,
    stats: &Arc<RunStats>,
    ready: oneshot::Sender<()>,
) -> Result<Measured, String>
where
    Svc: Service<Delivery, Response = Outcome, Error = BoxError> + Send + 'static,
    Svc::Future: Send + 'static,
{
    let service = Observe {
        inner: idempotent,
        stats: Arc::clone(stats),
    };
    let waiter = Arc::clone(stats);
    let stalled = Arc::new(Mutex::new(None));
    let stalled_in = Arc::clone(&stalled);
    let shutdown = async move {
        if let Err(err) = waiter.wait_done().await {
            *stalled_in
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(err);
        }
    };
    let channel = new_channel(&ctx.consume_conn).await?;
    // The runner parks dead letters (the failing ids, else none) in
    // `{queue}.dead`, and retries through the delay queues
    // `{queue}.retry.<delay>` (unless `hold`), which it declares on this
    // channel: the library's defaults, measured as they are.
    let options = ServeOptions::from_config(config)
        .concurrency(usize::from(ctx.options.prefetch))
        .shutdown_on(shutdown)
        .channel(channel.clone());
    let meter = Meter::start();
    let consumer = consume(&channel, queue, ctx.options.prefetch).await?;
    let _ = ready.send(());
    let served = serve(consumer, service, options).await;
    let measured = meter.stop();
    let parking = format!("{queue}.dead");
    let _ = channel
        .queue_delete(parking.as_str().into(), Default::default())
        .await;
    let _ = channel.close(200, "OK".into()).await;
    let report = served.map_err(|err| format!("serve failed: {err}"))?;
    // The runner counts the ack/nack/reject frames it sent (consecutive
    // acks share one `multiple` frame).
    stats.ack_calls.store(report.frames, Ordering::Relaxed);
    stats
        .retried_via_broker
        .store(report.retried, Ordering::Relaxed);
    if report.unsettled + report.abandoned > 0 {
        stats
            .errors
            .fetch_add(report.unsettled + report.abandoned, Ordering::Relaxed);
    }
    if let Some(err) = stalled
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
    {
        return Err(err);
    }
    Ok(measured)
}
