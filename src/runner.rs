//! The consumer runner: [`serve`] drives a lapin [`Consumer`] through a service.
//!
//! ```no_run
//! use std::convert::Infallible;
//! use amqp_idempotency::{serve, Config, IdempotencyLayer, ServeOptions, store::RedisStore};
//! use lapin::{options::{BasicConsumeOptions, BasicQosOptions}, types::FieldTable, ConnectionProperties};
//! use tower::{Layer, service_fn};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_env()?;
//! // amqps:// with AMQP_TLS_* works too.
//! let connection = amqp_idempotency::amqp::connect(&config, ConnectionProperties::default()).await?;
//! let channel = connection.create_channel().await?;
//! channel.basic_qos(config.prefetch_count(), BasicQosOptions::default()).await?;
//! let consumer = channel
//!     .basic_consume("orders".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
//!     .await?;
//! let store = RedisStore::connect(&config).await?;
//! let service = IdempotencyLayer::new(store, "orders", config.clone())?
//!     .layer(service_fn(|_delivery| async { Ok::<_, Infallible>(()) }));
//! let options = ServeOptions::from_config(&config)
//!     // Dead-letter copies go out on this connection: they must fit its frame_max.
//!     .frame_max(connection.configuration().frame_max())
//!     .close_channel(channel);
//! let report = serve(consumer, service, options).await?;
//! println!("acked {}", report.acked);
//! # Ok(())
//! # }
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};

use crate::config::{Config, DeadLetterTarget};
use crate::dead_letter::{DeadLetterCopy, DeadLetters};
use crate::error::{BoxError, ServeError};
use crate::outcome::{Disposition, Outcome};
use crate::report::{ServeReport, Tally};
use crate::settle::Settler;

/// How long a message whose dead-letter copy was not confirmed is held
/// before it is requeued.
pub const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// How long closing a channel or connection may take (a dead one may never answer).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How [`serve`] runs and stops.
pub struct ServeOptions {
    concurrency: usize,
    shutdown: Option<BoxFuture<'static, ()>>,
    signals: bool,
    shutdown_deadline: Duration,
    dead_letters: DeadLetterTarget,
    channel: Option<Channel>,
    close_channel: bool,
    frame_max: Option<u32>,
}

/// The `frame_max` assumed when none is given: the smallest lapin
/// negotiates, so a copy that fits it fits every connection.
const FRAME_MAX_FLOOR: u32 = lapin::protocol::constants::FRAME_MIN_SIZE;

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("concurrency", &self.concurrency)
            .field("signals", &self.signals)
            .field("shutdown_deadline", &self.shutdown_deadline)
            .field("frame_max", &self.frame_max)
            .finish_non_exhaustive()
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            concurrency: 64,
            shutdown: None,
            signals: true,
            // The default lease (30s) plus a margin: longer than the default
            // handler timeout (25s), so a handler that keeps to its timeout
            // always finishes before the deadline.
            shutdown_deadline: Duration::from_secs(35),
            dead_letters: DeadLetterTarget::default(),
            channel: None,
            close_channel: false,
            frame_max: None,
        }
    }
}

impl ServeOptions {
    /// Defaults: 64 deliveries in flight, stop on SIGINT/SIGTERM, 35s to finish.
    pub fn new() -> Self {
        Self::default()
    }

    /// Concurrency equal to the configured prefetch, and a shutdown
    /// deadline of the lease plus 5s: above the handler timeout, so that
    /// handlers that keep to it finish before the deadline.
    pub fn from_config(config: &Config) -> Self {
        Self::default()
            .dead_letters(config.dead_letters.clone())
            .concurrency(usize::from(config.prefetch))
            .shutdown_deadline(config.lease_ttl.saturating_add(Duration::from_secs(5)))
    }

    /// How many deliveries are processed at once; match the channel's prefetch.
    pub fn concurrency(mut self, limit: usize) -> Self {
        self.concurrency = limit.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// Stops when `signal` completes, instead of on SIGINT/SIGTERM.
    pub fn shutdown_on(
        mut self,
        signal: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self {
        self.shutdown = Some(Box::pin(signal));
        self.signals = false;
        self
    }

    /// How long in-flight handlers may take to finish once stopping; the
    /// ones still running then are abandoned: their claims are kept until
    /// their leases end (their work may still be running), and their
    /// messages return to the queue when the channel closes
    /// ([`close_channel`](Self::close_channel) closes it for you). Keep it
    /// above the handler timeout ([`from_config`](Self::from_config) does).
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.shutdown_deadline = deadline;
        self
    }

    /// The consumer's channel, left open: on stop the consumer is
    /// cancelled on it, and deliveries that arrive until the broker
    /// confirms the cancel are given back to the queue at once. Without
    /// it, those return only when you close the channel.
    pub fn channel(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self.close_channel = false;
        self
    }

    /// Like [`channel`](Self::channel), and closes the channel once stopped.
    pub fn close_channel(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self.close_channel = true;
        self
    }

    /// Where dead letters go ([`DeadLetterTarget`]; default: the parking
    /// queue `{queue}.dead`, declared by the runner). A copy with
    /// `x-idempotency-outcome`, `x-idempotency-reason`,
    /// `x-idempotency-attempts` and `x-idempotency-queue` headers (each at
    /// most 1 KiB, a longer reason cut with a `…[truncated N bytes]`
    /// marker; the copy fits [`frame_max`](Self::frame_max)) is published
    /// on the consumer's channel in confirm mode; the original is acked
    /// once the broker confirmed the copy, and the message's record is
    /// discarded then (so that a replay runs afresh); when the broker did
    /// not confirm it, the claim is released with its attempt count and
    /// the original requeued (after [`DEAD_LETTER_RETRY`]), so nothing is
    /// dropped and nothing starts again from attempt 1. Needs
    /// the channel given to [`channel`](Self::channel) or
    /// [`close_channel`](Self::close_channel), except for
    /// [`DeadLetterTarget::Broker`]; [`serve_reconnecting`] uses each
    /// session's channel.
    pub fn dead_letters(mut self, target: DeadLetterTarget) -> Self {
        self.dead_letters = target;
        self
    }

    /// The `frame_max` the consumer's connection negotiated
    /// (`connection.configuration().frame_max()`): every copy the runner
    /// publishes on it (a dead letter with its reason headers) is made to
    /// fit, because RabbitMQ closes the whole connection on a larger
    /// content header frame. A copy that cannot fit with all the
    /// original's headers goes without the largest, named in its
    /// `x-idempotency-headers-dropped` header. Without it, the runner
    /// assumes the smallest `frame_max` lapin negotiates (8192 bytes), which
    /// fits every connection but drops such headers sooner.
    /// [`serve_reconnecting`] reads it from each session's connection.
    pub fn frame_max(mut self, frame_max: u32) -> Self {
        self.frame_max = Some(frame_max);
        self
    }

    /// Dead-letters to `exchange`, with the message's own routing key:
    /// short for [`dead_letters`](Self::dead_letters) with
    /// [`DeadLetterTarget::Exchange`].
    pub fn dead_letter_exchange(self, exchange: impl Into<String>) -> Self {
        self.dead_letters(DeadLetterTarget::Exchange {
            exchange: exchange.into(),
            routing_key: None,
        })
    }
}

/// Consumes `consumer` with `service` until the consumer is cancelled, it
/// fails, or shutdown is asked for.
///
/// At most `concurrency` deliveries are in flight. Each one's [`Outcome`]
/// is turned into ack / nack(requeue) / reject only after the service
/// returned, that is after its store write; the `bool` lapin answers is
/// checked and a delivery that could not be settled is counted as
/// unsettled (the broker redelivers it). A handler that panics is treated
/// as a retryable failure. Acks of consecutive finished deliveries share
/// one `multiple=true` frame; give `serve` a channel of its own (one
/// consumer per channel), otherwise it notices the foreign delivery tags
/// and acks one by one. On shutdown the consumer is cancelled, handlers
/// in flight get the deadline to finish, abandoned ones have their claims
/// released, and the channel (if given) is closed.
pub async fn serve<S>(
    consumer: Consumer,
    service: S,
    options: ServeOptions,
) -> Result<ServeReport, ServeError>
where
    S: Service<Delivery, Response = Outcome> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let tally = Arc::new(Tally::default());
    let (result, _finishing) = run(consumer, service, options, Arc::clone(&tally)).await;
    result.map(|()| tally.snapshot())
}

/// Serves until stopped. When the consumer failed, the handlers still in
/// flight finish in the background: the returned task, which counts into
/// `tally` as they do.
async fn run<S>(
    mut consumer: Consumer,
    mut service: S,
    options: ServeOptions,
    tally: Arc<Tally>,
) -> (Result<(), ServeError>, Option<tokio::task::JoinHandle<()>>)
where
    S: Service<Delivery, Response = Outcome> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let ServeOptions {
        concurrency,
        shutdown,
        signals,
        shutdown_deadline,
        dead_letters,
        channel,
        close_channel,
        frame_max,
    } = options;
    let queue = consumer.queue().to_string();
    let frame_max = frame_max.unwrap_or(FRAME_MAX_FLOOR);
    let prepared = DeadLetters::prepare(&dead_letters, channel.as_ref(), &queue, frame_max).await;
    let dead_letters = match prepared {
        Ok(dead_letters) => dead_letters,
        Err(err) => return (Err(err), None),
    };
    let mut shutdown = stop_signal(shutdown, signals);
    let slots = Arc::new(Semaphore::new(concurrency));
    let (mut settler, settling) = Settler::start(Arc::clone(&tally));
    // One settler per channel incarnation: delivery tags restart at 1 after
    // lapin's automatic recovery.
    let mut settlings = vec![settling];
    let mut last_tag = 0;
    let (stopping_tx, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let result = loop {
        while let Some(joined) = tasks.try_join_next() {
            log_join(joined);
        }
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => {
                                break Ok(());
            }
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break Ok(()),
            },
        };
        let next = tokio::select! {
            biased;
            () = &mut shutdown => {
                                break Ok(());
            }
            next = consumer.next() => next,
        };
        let delivery = match next {
            None => {
                tracing::info!(queue = %consumer.queue(), "consumer cancelled");
                break Ok(());
            }
            Some(Err(err)) => {
                let Some(channel) = channel.as_ref().filter(|_| err.can_be_recovered()) else {
                    tracing::error!(error = %err, "consumer failed");
                    break Err(ServeError::Consumer(err));
                };
                // With ConnectionProperties::enable_auto_recover, lapin
                // reconnects and restarts the consumer; without it this
                // returns the error at once.
                tracing::warn!(error = %err, "the consumer's channel failed; waiting for lapin's automatic recovery");
                let recovered = tokio::select! {
                    biased;
                    () = &mut shutdown => {
                                                break Ok(());
                    }
                    recovered = channel.wait_for_recovery(err) => recovered,
                };
                match recovered {
                    Ok(()) => {
                        tracing::info!(
                            "channel recovered: consuming again; deliveries from before the failure are never acked on the new channel, the broker redelivers them"
                        );
                        settler = next_epoch(&tally, &mut settlings);
                        // Tags restart at 1 on the recovered channel.
                        last_tag = 0;
                        continue;
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "consumer failed");
                        break Err(ServeError::Consumer(err));
                    }
                }
            }
            Some(Ok(delivery)) => delivery,
        };
        if delivery.delivery_tag <= last_tag {
            // Tags start again at 1: lapin recovered the channel without a
            // word on the stream. Earlier deliveries belong to the old one.
            tracing::info!(
                "the channel was recovered: consuming again; deliveries from before are never acked on the new channel, the broker redelivers them"
            );
            settler = next_epoch(&tally, &mut settlings);
        }
        last_tag = delivery.delivery_tag;
        settler.open(delivery.delivery_tag);
        // Readiness is checked with the delivery in hand: while the store
        // is down the layer stays pending, and this delivery waits here
        // instead of bouncing through the broker.
        let ready = tokio::select! {
            biased;
            () = &mut shutdown => None,
            ready = service.ready() => Some(ready.map(drop)),
        };
        match ready {
            Some(Ok(())) => {}
            Some(Err(err)) => {
                return_to_queue(&settler, delivery);
                break Err(ServeError::Service(err.into()));
            }
            None => {
                return_to_queue(&settler, delivery);
                break Ok(());
            }
        }
        let acker = delivery.acker.clone();
        let tag = delivery.delivery_tag;
        // Only kept when dead letters are republished with their reason.
        let copy = dead_letters.as_ref().map(|dl| {
            (
                Arc::clone(dl),
                DeadLetterCopy {
                    routing_key: delivery.routing_key.clone(),
                    properties: delivery.properties.clone(),
                    data: delivery.data.clone(),
                },
            )
        });
        // A delivery the layer holds (the store refusing writes) is given
        // back once the runner stops, instead of holding up the shutdown.
        let call = STOPPING.scope(stopping.clone(), service.call(delivery));
        let settler = settler.clone();
        let mut stopping = stopping.clone();
        tasks.spawn(async move {
            let outcome = match AssertUnwindSafe(call).catch_unwind().await {
                Ok(Ok(outcome)) => Some(outcome),
                Ok(Err(err)) => {
                    tracing::error!(delivery_tag = tag, error = %err.into(), "service failed: requeueing");
                    None
                }
                Err(_) => {
                    tracing::error!(delivery_tag = tag, "handler panicked: requeueing");
                    None
                }
            };
            let Some(outcome) = outcome else {
                let requeue = Disposition::Requeue { after: Duration::ZERO };
                settler.settle(tag, acker, requeue, requeue, None);
                drop(slot);
                return;
            };
            let kind = Some(outcome.kind());
            let disposition = outcome.disposition();
            if disposition == Disposition::DeadLetter
                && let Some((dead_letters, copy)) = copy
            {
                if dead_letters.publish(copy, &outcome).await {
                    // The copy is confirmed: the original is finished, and
                    // its record goes, so that a replay runs afresh.
                    give_up_record(&outcome, true).await;
                    settler.settle(tag, acker, Disposition::Ack, disposition, kind);
                } else {
                    // Never dropped: the original goes back to its queue,
                    // and its claim is released with its attempt count.
                    give_up_record(&outcome, false).await;
                    let requeue = Disposition::Requeue {
                        after: DEAD_LETTER_RETRY,
                    };
                    tokio::select! {
                        () = tokio::time::sleep(DEAD_LETTER_RETRY) => {}
                        _ = stopping.wait_for(|stopping| *stopping) => {}
                    }
                    settler.settle(tag, acker, requeue, requeue, kind);
                }
                drop(slot);
                return;
            }
            if disposition == Disposition::DeadLetter {
                // The broker's own dead-lettering: nothing to confirm.
                give_up_record(&outcome, true).await;
            }
            if let Disposition::Requeue { after } = disposition
                && !after.is_zero()
            {
                // Hold the message during the backoff, but not past shutdown.
                tokio::select! {
                    () = tokio::time::sleep(after) => {}
                    _ = stopping.wait_for(|stopping| *stopping) => {}
                }
            }
            settler.settle(tag, acker, disposition, disposition, kind);
            drop(slot);
        });
    };

    // Stop taking deliveries and give back the ones that were on their way.
    // With the channel: cancel, then return whatever arrives until the
    // stream ends. Without it: return what is buffered; the rest comes back
    // when the channel closes.
    let cancelled = match &channel {
        Some(channel) if result.is_ok() => {
            let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
            matches!(
                tokio::time::timeout(CLOSE_TIMEOUT, cancel).await,
                Ok(Ok(()))
            )
        }
        _ => false,
    };
    if cancelled {
        let drain = async {
            while let Some(Ok(delivery)) = consumer.next().await {
                settler.open(delivery.delivery_tag);
                return_to_queue(&settler, delivery);
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
    } else {
        while let Some(Some(Ok(delivery))) = consumer.next().now_or_never() {
            settler.open(delivery.delivery_tag);
            return_to_queue(&settler, delivery);
        }
    }
    drop(consumer);
    let _ = stopping_tx.send(true);
    let finish = Finish {
        tasks,
        settler,
        settlings,
        tally: Arc::clone(&tally),
        shutdown_deadline,
    };
    let finishing = if result.is_ok() {
        finish.run().await;
        None
    } else {
        // The consumer failed (connection or channel lost): the handlers in
        // flight finish in the background (their Redis writes matter; their
        // acks cannot reach the broker, which redelivers those messages)
        // while the caller reconnects. Never aborted for a mere reconnect.
        let running = finish.tasks.len();
        if running > 0 {
            tracing::info!(
                running,
                "the consumer stopped: its handlers in flight finish in the background"
            );
        }
        Some(tokio::spawn(finish.run()))
    };
    if let Some(channel) = channel.filter(|_| close_channel)
        && let Ok(Err(err)) =
            tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "OK".into())).await
    {
        tracing::warn!(error = %err, "closing the channel failed");
    }
    tracing::info!(report = ?tally.snapshot(), "runner stopped");
    (result, finishing)
}

/// Gives up the claim a dead-lettered outcome holds: its record is
/// discarded once the copy is `parked` (confirmed), and released with its
/// attempt count otherwise, so that the requeued original is the next
/// attempt rather than the first again.
async fn give_up_record(outcome: &Outcome, parked: bool) {
    let given_up = if parked {
        outcome.discard_record().await
    } else {
        outcome.release_record().await
    };
    match given_up {
        Ok(true) if !parked => crate::metrics::released(),
        Ok(_) => {}
        Err(err) if parked => {
            tracing::warn!(error = %err, "the parked message's record could not be discarded: it expires on its own; a replay before then counts as its next attempt");
        }
        Err(err) => {
            tracing::warn!(error = %err, "the claim of the message whose dead-letter copy was not confirmed could not be released; it frees itself when the lease expires");
        }
    }
}

/// Starts the settler of a recovered channel (its delivery tags start
/// again at 1, so they must never be coalesced with the old ones) and
/// counts the recovery.
fn next_epoch(tally: &Arc<Tally>, settlings: &mut Vec<tokio::task::JoinHandle<()>>) -> Settler {
    let (settler, settling) = Settler::start(Arc::clone(tally));
    settlings.push(settling);
    tally.add(|r| r.reconnects += 1);
    settler
}

tokio::task_local! {
    /// Set by the runner around each delivery: true once it stops.
    static STOPPING: watch::Receiver<bool>;
}

/// Completes once the runner that called the layer stops; never when the
/// layer was called by something else.
pub(crate) async fn runner_stopping() {
    match STOPPING.try_with(watch::Receiver::clone) {
        Ok(mut stopping) => {
            if stopping.wait_for(|stopping| *stopping).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        Err(_) => std::future::pending().await,
    }
}

/// What is left of a runner once it stopped taking deliveries.
struct Finish {
    tasks: JoinSet<()>,
    settler: Settler,
    settlings: Vec<tokio::task::JoinHandle<()>>,
    tally: Arc<Tally>,
    shutdown_deadline: Duration,
}

impl Finish {
    /// Waits for the handlers in flight, up to the deadline, then abandons
    /// the rest (their claims are kept until their leases end), and lets
    /// the settlers send what is left.
    async fn run(self) {
        let Self {
            mut tasks,
            settler,
            settlings,
            tally,
            shutdown_deadline,
        } = self;
        let drained = tokio::time::timeout(shutdown_deadline, async {
            while let Some(joined) = tasks.join_next().await {
                log_join(joined);
            }
        })
        .await;
        if drained.is_err() {
            let abandoned = tasks.len() as u64;
            tracing::warn!(abandoned, deadline = ?shutdown_deadline, "handlers still running at the shutdown deadline: abandoning them; their claims are kept until their leases end");
            tasks.shutdown().await;
            tally.add(|r| r.abandoned += abandoned);
            if !crate::guard::flush_dropped_releases(Duration::from_secs(5)).await {
                tracing::warn!(
                    "some claims could not be released in time; they expire with their lease"
                );
            }
        }
        // Every delivery task is gone: the settlers send what is left and end.
        drop(settler);
        for settling in settlings {
            let abort = settling.abort_handle();
            match tokio::time::timeout(shutdown_deadline, settling).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => tracing::error!(
                    "the settler task failed; unsettled deliveries return when the channel closes"
                ),
                Err(_) => {
                    abort.abort();
                    tracing::warn!(
                        "the broker did not take the last acks in time; those deliveries return when the channel closes"
                    );
                }
            }
        }
    }
}

/// A consumer and what keeps it alive, as returned by the `connect`
/// closure of [`serve_reconnecting`].
#[derive(Debug)]
pub struct Session {
    /// The connection; closed when the session ends.
    pub connection: Connection,
    /// The channel the consumer runs on; closed when the session ends.
    pub channel: Channel,
    /// The consumer to serve.
    pub consumer: Consumer,
}

/// Like [`serve`], but survives the loss of the broker connection.
///
/// `connect` opens a connection and a channel, sets QoS and starts the
/// consumer (the queue is yours: it need not be declared here); it is called
/// again, with a growing delay (100ms doubling up to 10s), whenever the
/// connection or channel fails. Handlers still running when their channel
/// died get the shutdown deadline to finish and write their Redis state,
/// but their deliveries are not acked on the new channel (their tags are
/// invalid there): the broker redelivers them, and the redelivered copies
/// are recognised as done.
///
/// ```no_run
/// use std::convert::Infallible;
/// use amqp_idempotency::{serve_reconnecting, Config, IdempotencyLayer, ServeOptions, Session, store::RedisStore};
/// use lapin::{options::*, types::FieldTable, Connection, ConnectionProperties};
/// use tower::{Layer, service_fn};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::from_env()?;
/// let store = RedisStore::connect(&config).await?;
/// let service = IdempotencyLayer::new(store, "orders", config.clone())?
///     .layer(service_fn(|_delivery| async { Ok::<_, Infallible>(()) }));
/// let url = config.amqp().to_owned();
/// let prefetch = config.prefetch_count();
/// serve_reconnecting(
///     move || {
///         let url = url.clone();
///         async move {
///             let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
///             let channel = connection.create_channel().await?;
///             channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
///             let consumer = channel.basic_consume("orders".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
///             Ok(Session { connection, channel, consumer })
///         }
///     },
///     service,
///     ServeOptions::from_config(&config),
/// )
/// .await?;
/// # Ok(())
/// # }
/// ```
pub async fn serve_reconnecting<C, Fut, S>(
    mut connect: C,
    service: S,
    options: ServeOptions,
) -> Result<ServeReport, ServeError>
where
    C: FnMut() -> Fut + Send,
    Fut: std::future::Future<Output = Result<Session, lapin::Error>> + Send,
    S: Service<Delivery, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    const FIRST_DELAY: Duration = Duration::from_millis(100);
    const MAX_DELAY: Duration = Duration::from_secs(10);
    let ServeOptions {
        concurrency,
        shutdown,
        signals,
        shutdown_deadline,
        dead_letters,
        channel: _,
        close_channel: _,
        frame_max: _,
    } = options;
    let shutdown = stop_signal(shutdown, signals);
    // One stop signal shared by every session.
    let (stop_tx, stop) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    // One tally for every session, so that handlers of a lost session that
    // finish in the background still count.
    let tally = Arc::new(Tally::default());
    let mut finishing = Vec::new();
    let mut delay = FIRST_DELAY;
    let mut sessions = 0u64;
    let outcome = loop {
        if *stop.borrow() {
            break Ok(());
        }
        let session = tokio::select! {
            session = connect() => session,
            () = stopped(stop.clone()) => break Ok(()),
        };
        let Session {
            connection,
            channel,
            consumer,
        } = match session {
            Ok(session) => session,
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?delay, "cannot connect to RabbitMQ or declare the topology; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(stop.clone()) => break Ok(()),
                }
                delay = (delay * 2).min(MAX_DELAY);
                continue;
            }
        };
        if sessions > 0 {
            tally.add(|r| r.reconnects += 1);
            tracing::info!("reconnected to RabbitMQ: consuming again");
        }
        sessions += 1;
        delay = FIRST_DELAY;
        let options = ServeOptions {
            concurrency,
            shutdown: Some(Box::pin(stopped(stop.clone()))),
            signals: false,
            shutdown_deadline,
            dead_letters: dead_letters.clone(),
            channel: Some(channel),
            close_channel: true,
            frame_max: Some(connection.configuration().frame_max()),
        };
        let (result, background) =
            run(consumer, service.clone(), options, Arc::clone(&tally)).await;
        finishing.extend(background);
        // A dead connection may never answer the close: bounded.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "OK".into())).await;
        match result {
            Ok(()) if *stop.borrow() => break Ok(()),
            Ok(()) => tracing::warn!("the broker cancelled the consumer; reconnecting"),
            Err(ServeError::Consumer(err)) => {
                tracing::warn!(error = %err, retry_in = ?delay, "lost the RabbitMQ connection; reconnecting");
            }
            Err(err) => break Err(err),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(stop.clone()) => break Ok(()),
        }
        delay = (delay * 2).min(MAX_DELAY);
    };
    watcher.abort();
    // Handlers of lost sessions finish (each within the shutdown deadline).
    for background in finishing {
        let _ = background.await;
    }
    outcome.map(|()| tally.snapshot())
}

/// Gives a delivery that was never handed to the service back to the broker.
fn return_to_queue(settler: &Settler, delivery: Delivery) {
    let requeue = Disposition::Requeue {
        after: Duration::ZERO,
    };
    settler.settle(
        delivery.delivery_tag,
        delivery.acker,
        requeue,
        requeue,
        None,
    );
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined
        && !err.is_cancelled()
    {
        tracing::error!(error = %err, "delivery task failed");
    }
}

/// The future that asks the runner to stop: the one given, else SIGINT or
/// SIGTERM when signals are on, else never.
fn stop_signal(given: Option<BoxFuture<'static, ()>>, signals: bool) -> BoxFuture<'static, ()> {
    match given {
        Some(signal) => signal,
        None if signals => Box::pin(termination_signal()),
        None => Box::pin(std::future::pending()),
    }
}

/// Completes on SIGINT or SIGTERM.
async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("termination signal received: stopping");
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
