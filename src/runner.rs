//! The consumer runner: [`serve`] drives a lapin [`Consumer`] through a service.
//!
//! ```no_run
//! use std::convert::Infallible;
//! use amqp_idempotency::{serve, Config, IdempotencyLayer, ServeOptions, store::RedisStore};
//! use lapin::{options::{BasicConsumeOptions, BasicQosOptions}, types::FieldTable, Connection, ConnectionProperties};
//! use tower::{Layer, service_fn};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_env()?;
//! let connection = Connection::connect(config.amqp(), ConnectionProperties::default()).await?;
//! let channel = connection.create_channel().await?;
//! channel.basic_qos(config.prefetch_count(), BasicQosOptions::default()).await?;
//! let consumer = channel
//!     .basic_consume("orders".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
//!     .await?;
//! let store = RedisStore::connect(config.redis()).await?;
//! let service = IdempotencyLayer::new(store, "orders", config.clone())?
//!     .layer(service_fn(|_delivery| async { Ok::<_, Infallible>(()) }));
//! let report = serve(consumer, service, ServeOptions::from_config(&config).close_channel(channel)).await?;
//! println!("acked {}", report.acked);
//! # Ok(())
//! # }
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::{Channel, Consumer};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};

use crate::config::Config;
use crate::error::BoxError;
use crate::outcome::{Disposition, Outcome};

/// How [`serve`] runs and stops.
pub struct ServeOptions {
    concurrency: usize,
    shutdown: Option<BoxFuture<'static, ()>>,
    signals: bool,
    shutdown_deadline: Duration,
    channel: Option<Channel>,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("concurrency", &self.concurrency)
            .field("signals", &self.signals)
            .field("shutdown_deadline", &self.shutdown_deadline)
            .finish_non_exhaustive()
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            concurrency: 64,
            shutdown: None,
            signals: true,
            shutdown_deadline: Duration::from_secs(20),
            channel: None,
        }
    }
}

impl ServeOptions {
    /// Defaults: 64 deliveries in flight, stop on SIGINT/SIGTERM, 20s to finish.
    pub fn new() -> Self {
        Self::default()
    }

    /// Concurrency equal to the configured prefetch.
    pub fn from_config(config: &Config) -> Self {
        Self::default().concurrency(usize::from(config.prefetch))
    }

    /// How many deliveries are processed at once; match the channel's prefetch.
    pub fn concurrency(mut self, limit: usize) -> Self {
        self.concurrency = limit.max(1);
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
    /// ones still running then are abandoned: their claims are released and
    /// their messages return to the queue.
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.shutdown_deadline = deadline;
        self
    }

    /// Closes `channel` once stopped, which returns unsettled messages to the queue.
    pub fn close_channel(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self
    }
}

/// What [`serve`] did, in broker terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeReport {
    /// Deliveries acked.
    pub acked: u64,
    /// Deliveries nacked with requeue.
    pub requeued: u64,
    /// Deliveries rejected without requeue (dead-lettered).
    pub dead_lettered: u64,
    /// Deliveries whose ack/nack/reject did not reach the broker (channel
    /// closed): the broker redelivers them.
    pub unsettled: u64,
    /// Handlers still running at the shutdown deadline, abandoned.
    pub abandoned: u64,
}

/// Why [`serve`] stopped early.
#[derive(Debug)]
pub enum ServeError {
    /// The consumer failed (connection or channel lost). Unsettled
    /// deliveries return to the queue; reconnect and serve again.
    Consumer(lapin::Error),
    /// The service failed to become ready.
    Service(BoxError),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Consumer(err) => write!(
                f,
                "the RabbitMQ consumer stopped: {err}; unacked messages return to the queue, reconnect to resume"
            ),
            Self::Service(err) => write!(f, "the handler service failed to become ready: {err}"),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Consumer(err) => Some(err),
            Self::Service(err) => Some(&**err),
        }
    }
}

#[derive(Default)]
struct Tally {
    report: std::sync::Mutex<ServeReport>,
}

impl Tally {
    fn add(&self, f: impl FnOnce(&mut ServeReport)) {
        let mut report = self
            .report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut report);
    }

    fn snapshot(&self) -> ServeReport {
        *self
            .report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
/// as a retryable failure. On shutdown the consumer is cancelled, handlers
/// in flight get the deadline to finish, abandoned ones have their claims
/// released, and the channel (if given) is closed.
pub async fn serve<S>(
    mut consumer: Consumer,
    mut service: S,
    options: ServeOptions,
) -> Result<ServeReport, ServeError>
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
        channel,
    } = options;
    let mut shutdown: BoxFuture<'static, ()> = match shutdown {
        Some(signal) => signal,
        None if signals => Box::pin(termination_signal()),
        None => Box::pin(std::future::pending()),
    };
    let slots = Arc::new(Semaphore::new(concurrency));
    let tally = Arc::new(Tally::default());
    let (stopping_tx, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let result = loop {
        while let Some(joined) = tasks.try_join_next() {
            log_join(joined);
        }
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break Ok(()),
            },
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            ready = service.ready() => if let Err(err) = ready {
                break Err(ServeError::Service(err.into()));
            },
        }
        let next = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            next = consumer.next() => next,
        };
        let delivery = match next {
            None => {
                tracing::info!(queue = %consumer.queue(), "consumer cancelled");
                break Ok(());
            }
            Some(Err(err)) => {
                tracing::error!(error = %err, "consumer failed");
                break Err(ServeError::Consumer(err));
            }
            Some(Ok(delivery)) => delivery,
        };
        let acker = delivery.acker.clone();
        let tag = delivery.delivery_tag;
        let call = service.call(delivery);
        let tally = Arc::clone(&tally);
        let stopping = stopping.clone();
        tasks.spawn(async move {
            let disposition = match AssertUnwindSafe(call).catch_unwind().await {
                Ok(Ok(outcome)) => outcome.disposition(),
                Ok(Err(err)) => {
                    tracing::error!(delivery_tag = tag, error = %err.into(), "service failed: requeueing");
                    Disposition::Requeue { after: Duration::ZERO }
                }
                Err(_) => {
                    tracing::error!(delivery_tag = tag, "handler panicked: requeueing");
                    Disposition::Requeue { after: Duration::ZERO }
                }
            };
            settle(&acker, tag, disposition, stopping, &tally).await;
            drop(slot);
        });
    };

    // Stop taking deliveries: dropping the consumer cancels it; prefetched
    // deliveries not yet taken return to the queue when the channel closes.
    drop(consumer);
    let _ = stopping_tx.send(true);
    let drained = tokio::time::timeout(shutdown_deadline, async {
        while let Some(joined) = tasks.join_next().await {
            log_join(joined);
        }
    })
    .await;
    if drained.is_err() {
        let abandoned = tasks.len() as u64;
        tracing::warn!(abandoned, deadline = ?shutdown_deadline, "handlers still running at the shutdown deadline: abandoning them and releasing their claims");
        tasks.shutdown().await;
        tally.add(|r| r.abandoned += abandoned);
        if !crate::guard::flush_dropped_releases(Duration::from_secs(5)).await {
            tracing::warn!(
                "some claims could not be released in time; they expire with their lease"
            );
        }
    }
    if let Some(channel) = channel
        && let Err(err) = channel.close(200, "OK".into()).await
    {
        tracing::warn!(error = %err, "closing the channel failed");
    }
    let report = tally.snapshot();
    tracing::info!(?report, "runner stopped");
    result.map(|()| report)
}

async fn settle(
    acker: &Acker,
    tag: u64,
    disposition: Disposition,
    mut stopping: watch::Receiver<bool>,
    tally: &Tally,
) {
    let (verb, result) = match disposition {
        Disposition::Ack => ("ack", acker.ack(BasicAckOptions::default()).await),
        Disposition::Requeue { after } => {
            if !after.is_zero() {
                // Hold the message during the backoff, but not past shutdown.
                tokio::select! {
                    () = tokio::time::sleep(after) => {}
                    _ = stopping.wait_for(|stopping| *stopping) => {}
                }
            }
            let options = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            ("nack", acker.nack(options).await)
        }
        Disposition::DeadLetter => {
            let options = BasicRejectOptions { requeue: false };
            ("reject", acker.reject(options).await)
        }
    };
    match result {
        Ok(true) => tally.add(|r| match disposition {
            Disposition::Ack => r.acked += 1,
            Disposition::Requeue { .. } => r.requeued += 1,
            Disposition::DeadLetter => r.dead_lettered += 1,
        }),
        Ok(false) => {
            tracing::warn!(
                delivery_tag = tag,
                verb,
                "not settled: the channel is closed or the delivery was already settled; the broker redelivers it"
            );
            tally.add(|r| r.unsettled += 1);
        }
        Err(err) => {
            tracing::warn!(delivery_tag = tag, verb, error = %err, "not settled; the broker redelivers it");
            tally.add(|r| r.unsettled += 1);
        }
    }
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined
        && !err.is_cancelled()
    {
        tracing::error!(error = %err, "delivery task failed");
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
