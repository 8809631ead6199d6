//! [`ServeOptions`]: how [`serve`](super::serve) runs and stops.

use std::time::Duration;

use futures_util::future::BoxFuture;
use lapin::Channel;
use tokio::sync::Semaphore;

use crate::config::{Config, DeadLetterTarget, RetryMode};

/// How [`serve`](super::serve) runs and stops.
pub struct ServeOptions {
    pub(super) concurrency: usize,
    pub(super) shutdown: Option<BoxFuture<'static, ()>>,
    pub(super) signals: bool,
    pub(super) shutdown_deadline: Duration,
    pub(super) dead_letters: DeadLetterTarget,
    pub(super) channel: Option<Channel>,
    pub(super) close_channel: bool,
    pub(super) frame_max: Option<u32>,
    pub(super) retry: RetryMode,
    /// The waits of the delay queues, shortest first.
    pub(super) retry_schedule: Vec<Duration>,
}

/// The `frame_max` assumed when none is given: the smallest lapin
/// negotiates, so a copy that fits it fits every connection.
pub(super) const FRAME_MAX_FLOOR: u32 = lapin::protocol::constants::FRAME_MIN_SIZE;

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("concurrency", &self.concurrency)
            .field("signals", &self.signals)
            .field("shutdown_deadline", &self.shutdown_deadline)
            .field("frame_max", &self.frame_max)
            .field("retry", &self.retry)
            .field("retry_schedule", &self.retry_schedule)
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
            retry: RetryMode::default(),
            retry_schedule: Config::default().retry_schedule(),
        }
    }
}

impl ServeOptions {
    /// Defaults: 64 deliveries in flight, stop on SIGINT/SIGTERM, 35s to finish.
    pub fn new() -> Self {
        Self::default()
    }

    /// Concurrency equal to the configured prefetch, a shutdown deadline
    /// of the lease plus 5s (above the handler timeout, so that handlers
    /// that keep to it finish before the deadline), and dead letters and
    /// retries as the configuration says.
    pub fn from_config(config: &Config) -> Self {
        let options = Self {
            retry_schedule: config.retry_schedule(),
            ..Self::default()
        };
        options
            .dead_letters(config.dead_letters.clone())
            .retry(config.retry)
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
    /// the original requeued (after a second), so nothing is
    /// dropped and nothing starts again from attempt 1. Needs
    /// the channel given to [`channel`](Self::channel) or
    /// [`close_channel`](Self::close_channel), except for
    /// [`DeadLetterTarget::Broker`]; [`serve_reconnecting`](super::serve_reconnecting) uses each
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
    /// [`serve_reconnecting`](super::serve_reconnecting) reads it from each session's connection.
    pub fn frame_max(mut self, frame_max: u32) -> Self {
        self.frame_max = Some(frame_max);
        self
    }

    /// How retryable failures wait out their backoff ([`RetryMode`]; default
    /// [`RetryMode::Broker`]: in the delay queues `{queue}.retry.<delay>`
    /// the runner declares, one per step of the backoff schedule, which
    /// needs the consumer's [`channel`](Self::channel)).
    /// [`from_config`](Self::from_config) takes the mode and the schedule
    /// from `IDEMPOTENCY_RETRY`, `IDEMPOTENCY_RETRY_BACKOFF` and
    /// `IDEMPOTENCY_RETRY_BACKOFF_MAX`; otherwise the schedule is the
    /// default one (500ms doubling up to 30s).
    pub fn retry(mut self, mode: RetryMode) -> Self {
        self.retry = mode;
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
