//! Settings: builder methods and [`Config::from_env`].
//!
//! ```
//! use std::time::Duration;
//! use amqp_idempotency::Config;
//!
//! let config = Config::default()
//!     .with_key_prefix("shop")
//!     .with_lease_ttl(Duration::from_secs(10))
//!     .with_handler_timeout(Duration::from_secs(8));
//! assert!(config.validate().is_ok());
//!
//! // Environment variables use the same names as DESIGN.md and the README.
//! let env = [("IDEMPOTENCY_LEASE_TTL", "500ms"), ("IDEMPOTENCY_HANDLER_TIMEOUT", "400ms")];
//! let from_env = Config::from_lookup(|name| {
//!     env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
//! })?;
//! assert_eq!(from_env.lease_ttl(), Duration::from_millis(500));
//! # Ok::<(), amqp_idempotency::ConfigError>(())
//! ```

mod deployment;
mod env;
mod getters;
#[cfg(test)]
mod tests;
mod validate;

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{redact_nodes, redact_url};
use crate::tls::TlsFiles;

pub use self::deployment::RedisDeployment;
pub(crate) use self::deployment::{SentinelUrl, is_sentinel_url};
pub(crate) use self::env::format_duration;
#[cfg(feature = "testing")]
pub use self::env::parse_duration;

/// What to do with a message that has no usable fingerprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoFingerprintPolicy {
    /// Reject it without requeue, so it reaches the dead-letter exchange (default).
    DeadLetter,
    /// Run the handler without protection: duplicates of it are processed again.
    PassThrough,
}

/// What to do when the store cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFailurePolicy {
    /// Do not run handlers; requeue and pause until the store answers (default).
    FailClosed,
    /// Run handlers without protection while the store is down. Duplicates
    /// arriving during the outage are processed again: choose this only for
    /// handlers whose effect is idempotent by itself.
    FailOpen,
}

/// How the runner retries a message whose handler failed with a
/// retryable error (`IDEMPOTENCY_RETRY`).
///
/// ```
/// use amqp_idempotency::{Config, RetryMode};
/// assert_eq!(Config::default().retry(), RetryMode::Broker);
/// let config = Config::from_lookup(|name| (name == "IDEMPOTENCY_RETRY").then(|| "hold".to_owned()))?;
/// assert_eq!(config.retry(), RetryMode::Hold);
/// # Ok::<(), amqp_idempotency::ConfigError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetryMode {
    /// `broker` (default): a copy waits out the backoff in a delay queue,
    /// `{queue}.retry.<delay>`, that the runner declares (one per step of
    /// the backoff schedule, each dead-lettering back to `{queue}` when its
    /// TTL ends); the original is acked once the broker confirmed the copy
    /// and requeued otherwise. The prefetch window stays free for healthy
    /// messages.
    #[default]
    Broker,
    /// `hold`: the delivery is held for the backoff, then requeued with
    /// `basic.nack`. It keeps a prefetch slot meanwhile, and each requeue
    /// counts against a quorum queue's delivery limit.
    Hold,
}

/// Where the runner sends a message the middleware dead-letters (attempts
/// exhausted, permanent failure, no fingerprint, payload mismatch, too
/// large, crashed).
///
/// The default is a parking queue the runner owns: nothing it dead-letters
/// can vanish, whatever the consumed queue's arguments. A copy is
/// published (body, properties, headers, plus `x-idempotency-outcome`,
/// `x-idempotency-reason`, `x-idempotency-attempts` and
/// `x-idempotency-queue`) on the consumer's channel in confirm mode, and the
/// original is acked only once the broker confirmed the copy; an
/// unconfirmed or unroutable copy means the original is requeued.
///
/// ```
/// use amqp_idempotency::{Config, DeadLetterTarget};
/// let config = Config::from_lookup(|name| {
///     (name == "IDEMPOTENCY_DEAD_LETTER_QUEUE").then(|| "orders.parked".to_owned())
/// })?;
/// assert_eq!(config.dead_letters(), &DeadLetterTarget::ParkingQueue(Some("orders.parked".into())));
/// # Ok::<(), amqp_idempotency::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadLetterTarget {
    /// A durable queue without arguments that the runner declares and
    /// publishes to through the default exchange: the given name
    /// (`IDEMPOTENCY_DEAD_LETTER_QUEUE`), or `None` for `{queue}.dead`
    /// (the default).
    ParkingQueue(Option<String>),
    /// An exchange of yours (`IDEMPOTENCY_DEAD_LETTER_EXCHANGE`), with a
    /// routing key (`IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY`, or the
    /// message's own when `None`). It must exist; a copy it cannot route is
    /// returned and the original requeued.
    Exchange {
        /// The exchange.
        exchange: String,
        /// The routing key; `None` keeps the message's own.
        routing_key: Option<String>,
    },
    /// The broker's own dead-lettering (`IDEMPOTENCY_DEAD_LETTERS=broker`):
    /// reject without requeue. Only for a queue with `x-dead-letter-exchange`
    /// or a DLX policy: on any other queue RabbitMQ drops the message.
    Broker,
}

impl Default for DeadLetterTarget {
    fn default() -> Self {
        Self::ParkingQueue(None)
    }
}

/// Every tunable of the middleware and the runner.
///
/// Build it with the methods below or read it with [`Config::from_env`];
/// [`Config::validate`] refuses inconsistent values, and the layer and the
/// guard call it when they are built. Its `Debug` output hides the
/// passwords in the URLs.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    pub(crate) redis_url: String,
    pub(crate) redis_cluster_nodes: Vec<String>,
    pub(crate) amqp_url: String,
    pub(crate) key_prefix: String,
    pub(crate) scope: Option<String>,
    pub(crate) lease_ttl: Duration,
    pub(crate) done_ttl: Duration,
    pub(crate) handler_timeout: Duration,
    pub(crate) prefetch: u16,
    pub(crate) in_progress_wait: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) retry_backoff: Duration,
    pub(crate) retry_backoff_max: Duration,
    pub(crate) on_store_error: StoreFailurePolicy,
    pub(crate) on_missing_fingerprint: NoFingerprintPolicy,
    pub(crate) verify_payload: bool,
    pub(crate) max_body_bytes: Option<usize>,
    pub(crate) outbox_max_bytes: usize,
    pub(crate) consumer_timeout: Duration,
    pub(crate) min_replicas: u32,
    pub(crate) replica_timeout: Duration,
    pub(crate) dead_letters: DeadLetterTarget,
    pub(crate) retry: RetryMode,
    pub(crate) redis_tls: TlsFiles,
    pub(crate) amqp_tls: TlsFiles,
}

/// The default of `IDEMPOTENCY_OUTBOX_MAX_BYTES`: 1 MiB.
const DEFAULT_OUTBOX_MAX_BYTES: usize = 1 << 20;

impl Default for Config {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_cluster_nodes: Vec::new(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            key_prefix: "idem".into(),
            scope: None,
            lease_ttl: Duration::from_secs(30),
            done_ttl: Duration::from_secs(24 * 3600),
            handler_timeout: Duration::from_secs(25),
            prefetch: 64,
            in_progress_wait: Duration::from_secs(5),
            max_attempts: 5,
            retry_backoff: Duration::from_millis(500),
            retry_backoff_max: Duration::from_secs(30),
            on_store_error: StoreFailurePolicy::FailClosed,
            on_missing_fingerprint: NoFingerprintPolicy::DeadLetter,
            verify_payload: true,
            max_body_bytes: None,
            outbox_max_bytes: DEFAULT_OUTBOX_MAX_BYTES,
            consumer_timeout: Duration::from_secs(30 * 60),
            min_replicas: 0,
            replica_timeout: Duration::from_secs(1),
            dead_letters: DeadLetterTarget::default(),
            retry: RetryMode::default(),
            redis_tls: TlsFiles::default(),
            amqp_tls: TlsFiles::default(),
        }
    }
}

// Derived by hand so that no password in a URL is ever printed; every field
// is listed, so a new one cannot be forgotten.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            redis_url,
            redis_cluster_nodes,
            amqp_url,
            key_prefix,
            scope,
            lease_ttl,
            done_ttl,
            handler_timeout,
            prefetch,
            in_progress_wait,
            max_attempts,
            retry_backoff,
            retry_backoff_max,
            on_store_error,
            on_missing_fingerprint,
            verify_payload,
            max_body_bytes,
            outbox_max_bytes,
            consumer_timeout,
            min_replicas,
            replica_timeout,
            dead_letters,
            retry,
            redis_tls,
            amqp_tls,
        } = self;
        f.debug_struct("Config")
            .field("redis_url", &redact_url(redis_url))
            .field(
                "redis_cluster_nodes",
                &redact_nodes(&redis_cluster_nodes.join(",")),
            )
            .field("amqp_url", &redact_url(amqp_url))
            .field("key_prefix", key_prefix)
            .field("scope", scope)
            .field("lease_ttl", lease_ttl)
            .field("done_ttl", done_ttl)
            .field("handler_timeout", handler_timeout)
            .field("prefetch", prefetch)
            .field("in_progress_wait", in_progress_wait)
            .field("max_attempts", max_attempts)
            .field("retry_backoff", retry_backoff)
            .field("retry_backoff_max", retry_backoff_max)
            .field("on_store_error", on_store_error)
            .field("on_missing_fingerprint", on_missing_fingerprint)
            .field("verify_payload", verify_payload)
            .field("max_body_bytes", max_body_bytes)
            .field("outbox_max_bytes", outbox_max_bytes)
            .field("consumer_timeout", consumer_timeout)
            .field("min_replicas", min_replicas)
            .field("replica_timeout", replica_timeout)
            .field("dead_letters", dead_letters)
            .field("retry", retry)
            .field("redis_tls", redis_tls)
            .field("amqp_tls", amqp_tls)
            .finish()
    }
}

/// Longest duration any setting accepts: a typo like `30d` for `30s` is refused.
const MAX_DURATION: Duration = Duration::from_secs(90 * 24 * 3600);

impl Config {
    /// Redis URL (`REDIS_URL`): a standalone Redis or Valkey, or a
    /// primary. Clears the cluster nodes.
    pub fn with_redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = url.into();
        self.redis_cluster_nodes.clear();
        self
    }

    /// Seed nodes of a Redis Cluster (`REDIS_CLUSTER_NODES`, comma-separated
    /// `redis://` or `rediss://` URLs): the store then runs in cluster mode,
    /// the URL of [`redis_url`](Self::redis_url) is not used, and
    /// [`redis_deployment`](Self::redis_deployment) says [`RedisDeployment::Cluster`].
    pub fn with_redis_cluster_nodes<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.redis_cluster_nodes = nodes.into_iter().map(Into::into).collect();
        self
    }

    /// Replicas that must hold each write before the store answers
    /// (`IDEMPOTENCY_MIN_REPLICAS`, default 0: do not wait). With N > 0 the
    /// store sends `WAIT N` after its writes; a claim or done mark that
    /// fewer replicas confirm within [`replica_timeout`](Self::replica_timeout)
    /// counts as unanswered: the message is held and the write retried,
    /// never acked on a mark a failover could lose.
    pub fn with_min_replicas(mut self, replicas: u32) -> Self {
        self.min_replicas = replicas;
        self
    }

    /// How long `WAIT` waits for the replicas (`IDEMPOTENCY_REPLICA_TIMEOUT`,
    /// default `1s`, at most `10s`).
    pub fn with_replica_timeout(mut self, timeout: Duration) -> Self {
        self.replica_timeout = timeout;
        self
    }

    /// Broker URL (`AMQP_URL`).
    pub fn with_amqp_url(mut self, url: impl Into<String>) -> Self {
        self.amqp_url = url.into();
        self
    }

    /// CA certificates (PEM) that Redis's certificate must chain to, instead
    /// of the platform's trusted roots (`REDIS_TLS_CA_FILE`; `rediss://` only).
    pub fn with_redis_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_tls.ca_file = Some(path.into());
        self
    }

    /// Client certificate (PEM) presented to a Redis that requires one
    /// (`REDIS_TLS_CERT_FILE`, with [`redis_tls_key_file`](Self::redis_tls_key_file)).
    pub fn with_redis_tls_cert_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_tls.cert_file = Some(path.into());
        self
    }

    /// Private key (PEM) of the Redis client certificate (`REDIS_TLS_KEY_FILE`).
    pub fn with_redis_tls_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_tls.key_file = Some(path.into());
        self
    }

    /// CA certificates (PEM) that the broker's certificate must chain to,
    /// instead of the platform's trusted roots (`AMQP_TLS_CA_FILE`; `amqps://` only).
    pub fn with_amqp_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.amqp_tls.ca_file = Some(path.into());
        self
    }

    /// Client certificate (PEM) presented to a broker that requires one
    /// (`AMQP_TLS_CERT_FILE`, with [`amqp_tls_key_file`](Self::amqp_tls_key_file)).
    pub fn with_amqp_tls_cert_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.amqp_tls.cert_file = Some(path.into());
        self
    }

    /// Private key (PEM) of the broker client certificate (`AMQP_TLS_KEY_FILE`).
    pub fn with_amqp_tls_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.amqp_tls.key_file = Some(path.into());
        self
    }

    /// Key prefix (`IDEMPOTENCY_KEY_PREFIX`, default `idem`).
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Consumer group (`IDEMPOTENCY_SCOPE`, default: the queue name).
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Lifetime of an in-progress claim (`IDEMPOTENCY_LEASE_TTL`, default 30s);
    /// renewed while the handler runs.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Retention of the done mark (`IDEMPOTENCY_DONE_TTL`, default 24h):
    /// duplicates are recognised for this long.
    pub fn with_done_ttl(mut self, ttl: Duration) -> Self {
        self.done_ttl = ttl;
        self
    }

    /// How long a handler may run before it counts as a retryable failure
    /// (`IDEMPOTENCY_HANDLER_TIMEOUT`, default 25s); must be below the lease.
    pub fn with_handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// Prefetch and concurrency (`IDEMPOTENCY_PREFETCH`, default 64).
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// How long to wait for a duplicate that is in progress elsewhere to
    /// finish before requeueing it (`IDEMPOTENCY_IN_PROGRESS_WAIT`, default 5s).
    /// With an outbox, also how long after the first run's commit a
    /// duplicate leaves that run to dispatch its messages before it sends
    /// what is left itself.
    pub fn with_in_progress_wait(mut self, wait: Duration) -> Self {
        self.in_progress_wait = wait;
        self
    }

    /// Attempts before a retryable failure is dead-lettered
    /// (`IDEMPOTENCY_MAX_ATTEMPTS`, default 5).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Delay before the first requeue (`IDEMPOTENCY_RETRY_BACKOFF`, default
    /// 500ms); doubles per attempt up to [`retry_backoff_max`](Self::retry_backoff_max).
    pub fn with_retry_backoff(mut self, delay: Duration) -> Self {
        self.retry_backoff = delay;
        self
    }

    /// Upper bound of the requeue delay (`IDEMPOTENCY_RETRY_BACKOFF_MAX`, default 30s).
    pub fn with_retry_backoff_max(mut self, delay: Duration) -> Self {
        self.retry_backoff_max = delay;
        self
    }

    /// Fail closed (default) or open when the store is unreachable
    /// (`IDEMPOTENCY_ON_STORE_ERROR`: `fail-closed` or `fail-open`).
    pub fn with_on_store_error(mut self, policy: StoreFailurePolicy) -> Self {
        self.on_store_error = policy;
        self
    }

    /// What to do with messages without a fingerprint
    /// (`IDEMPOTENCY_ON_MISSING_FINGERPRINT`: `dead-letter` or `pass-through`).
    pub fn with_on_missing_fingerprint(mut self, policy: NoFingerprintPolicy) -> Self {
        self.on_missing_fingerprint = policy;
        self
    }

    /// Whether a duplicate's payload must match the first one's
    /// (`IDEMPOTENCY_VERIFY_PAYLOAD`, default true); a mismatch is dead-lettered.
    pub fn with_verify_payload(mut self, verify: bool) -> Self {
        self.verify_payload = verify;
        self
    }

    /// Largest body the handler is given (`IDEMPOTENCY_MAX_BODY_BYTES`,
    /// default: no limit); a larger message is dead-lettered with a reason
    /// instead of reaching the handler.
    pub fn with_max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = Some(limit.max(1));
        self
    }

    /// Most bytes one delivery may stage in its outbox, messages and reply
    /// together, encoded (`IDEMPOTENCY_OUTBOX_MAX_BYTES`, default 1 MiB).
    /// Staging past it fails the handler permanently: the message is
    /// dead-lettered and nothing it staged is published.
    pub fn with_outbox_max_bytes(mut self, limit: usize) -> Self {
        self.outbox_max_bytes = limit.max(1);
        self
    }

    /// RabbitMQ's `consumer_timeout` (`IDEMPOTENCY_CONSUMER_TIMEOUT`,
    /// default 30m, the broker's default): the longest a delivery may stay
    /// unacked before the broker closes its channel. Every hold (backoff,
    /// waiting for a duplicate in progress elsewhere, a timed-out handler's
    /// lease, a store outage) is kept below it; set it to your broker's
    /// value if you changed that.
    pub fn with_consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = timeout;
        self
    }

    /// Where dead letters go (see [`DeadLetterTarget`]; default: the
    /// parking queue `{queue}.dead`).
    pub fn with_dead_letters(mut self, target: DeadLetterTarget) -> Self {
        self.dead_letters = target;
        self
    }

    /// The Redis this configuration names, and of which kind: a cluster
    /// when it has seed nodes, else `REDIS_URL` (a standalone server, or
    /// Sentinel for a `redis-sentinel://` URL). Only
    /// [`RedisDeployment::Standalone`] is a URL to open a plain
    /// connection on; [`RedisStore::connect`](crate::store::RedisStore::connect)
    /// takes the whole `Config` and handles every kind.
    ///
    /// ```
    /// use amqp_idempotency::{Config, RedisDeployment};
    ///
    /// let config = Config::default().with_redis_cluster_nodes(["redis://10.0.0.1:7000"]);
    /// assert_eq!(config.redis_deployment().standalone_url(), None);
    /// assert!(matches!(config.redis_deployment(), RedisDeployment::Cluster(nodes) if nodes.len() == 1));
    /// ```
    pub fn redis_deployment(&self) -> RedisDeployment<'_> {
        if !self.redis_cluster_nodes.is_empty() {
            RedisDeployment::Cluster(&self.redis_cluster_nodes)
        } else if is_sentinel_url(&self.redis_url) {
            RedisDeployment::Sentinel(&self.redis_url)
        } else {
            RedisDeployment::Standalone(&self.redis_url)
        }
    }

    /// How long an outbox consumer keeps its done mark and outbox:
    /// [`done_ttl`](Self::done_ttl), but never less than what can still
    /// bring the message back. A committed delivery whose messages the
    /// broker has not confirmed is held for up to half the consumer timeout
    /// while they are sent again, then requeued after a backoff (at most
    /// the backoff cap); its copy may then wait up to a lease behind a
    /// claim in progress. Its done mark must still be there then, or the
    /// copy runs the handler again.
    pub(crate) fn outbox_retention(&self) -> Duration {
        let horizon = (self.consumer_timeout / 2)
            .saturating_add(self.retry_backoff_max)
            .saturating_add(self.lease_ttl);
        self.done_ttl.max(horizon)
    }

    /// How retryable failures are retried (`IDEMPOTENCY_RETRY`: `broker`,
    /// the default, or `hold`; see [`RetryMode`]).
    pub fn with_retry(mut self, mode: RetryMode) -> Self {
        self.retry = mode;
        self
    }

    /// The steps of the backoff schedule: `IDEMPOTENCY_RETRY_BACKOFF`
    /// doubling up to `IDEMPOTENCY_RETRY_BACKOFF_MAX`, each once; the
    /// delays [`backoff`](Self::backoff) gives. One delay queue each.
    pub(crate) fn retry_schedule(&self) -> Vec<Duration> {
        let mut steps = Vec::new();
        let mut attempt = 1;
        loop {
            let step = self.backoff(attempt);
            if steps.last() == Some(&step) || steps.len() >= 64 {
                return steps;
            }
            steps.push(step);
            attempt += 1;
        }
    }

    /// The delay before requeueing the `attempt`-th failure.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.retry_backoff
            .saturating_mul(factor)
            .min(self.retry_backoff_max)
    }
}
