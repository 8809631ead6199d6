//! Settings: builder methods and [`Config::from_env`].
//!
//! ```
//! use std::time::Duration;
//! use amqp_idempotency::Config;
//!
//! let config = Config::default()
//!     .key_prefix("shop")
//!     .lease_ttl(Duration::from_secs(10))
//!     .handler_timeout(Duration::from_secs(8));
//! assert!(config.validate().is_ok());
//!
//! // Environment variables use the same names as DESIGN.md and the README.
//! let env = [("IDEMPOTENCY_LEASE_TTL", "500ms"), ("IDEMPOTENCY_HANDLER_TIMEOUT", "400ms")];
//! let from_env = Config::from_lookup(|name| {
//!     env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
//! })?;
//! assert_eq!(from_env.lease(), Duration::from_millis(500));
//! # Ok::<(), amqp_idempotency::ConfigError>(())
//! ```

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{ConfigError, redact_url};
use crate::tls::{Side, TlsFiles};

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
/// assert_eq!(config.dead_letter_target(), &DeadLetterTarget::ParkingQueue(Some("orders.parked".into())));
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
            .field("redis_tls", redis_tls)
            .field("amqp_tls", amqp_tls)
            .finish()
    }
}

/// Which Redis a [`Config`] names, from [`Config::redis`]. Only a
/// standalone server comes with a URL to open a plain connection on: a
/// Sentinel URL must be resolved to the master first
/// ([`store::sentinel_master_url`](crate::store::sentinel_master_url)), and
/// a cluster is reached through its nodes. `Debug` hides the passwords.
#[derive(Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisDeployment<'a> {
    /// One server (a standalone Redis or Valkey, or a primary) at this
    /// `redis://` or `rediss://` URL (`REDIS_URL`).
    Standalone(&'a str),
    /// The master that Redis Sentinel names, from this
    /// `redis-sentinel://` or `rediss-sentinel://` URL (`REDIS_URL`).
    Sentinel(&'a str),
    /// A Redis Cluster, from these seed nodes (`REDIS_CLUSTER_NODES`).
    Cluster(&'a [String]),
}

impl<'a> RedisDeployment<'a> {
    /// The URL of a standalone server; `None` for Sentinel or a cluster,
    /// whose URLs are not a server to connect to directly.
    pub fn standalone_url(&self) -> Option<&'a str> {
        match *self {
            Self::Standalone(url) => Some(url),
            Self::Sentinel(_) | Self::Cluster(_) => None,
        }
    }
}

impl std::fmt::Display for RedisDeployment<'_> {
    /// What to show in a message: the URL or the nodes, passwords hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standalone(url) => write!(f, "Redis at {}", redact_url(url)),
            Self::Sentinel(url) => write!(f, "Redis through Sentinel at {}", redact_url(url)),
            Self::Cluster(nodes) => {
                write!(f, "the Redis Cluster of {}", redact_nodes(&nodes.join(",")))
            }
        }
    }
}

impl std::fmt::Debug for RedisDeployment<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standalone(url) => f.debug_tuple("Standalone").field(&redact_url(url)).finish(),
            Self::Sentinel(url) => f.debug_tuple("Sentinel").field(&redact_url(url)).finish(),
            Self::Cluster(nodes) => f
                .debug_tuple("Cluster")
                .field(
                    &nodes
                        .iter()
                        .map(|node| redact_url(node))
                        .collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
}

/// True for a `redis-sentinel://` or `rediss-sentinel://` URL.
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("redis-sentinel://") || url.starts_with("rediss-sentinel://")
}

/// Every environment variable [`Config::from_env`] reads: the one list that
/// both the reading and the check for unknown names use (reading a name
/// that is not here fails the tests).
pub(crate) const VARIABLES: &[&str] = &[
    "REDIS_URL",
    "REDIS_CLUSTER_NODES",
    "AMQP_URL",
    "IDEMPOTENCY_KEY_PREFIX",
    "IDEMPOTENCY_SCOPE",
    "IDEMPOTENCY_LEASE_TTL",
    "IDEMPOTENCY_DONE_TTL",
    "IDEMPOTENCY_HANDLER_TIMEOUT",
    "IDEMPOTENCY_IN_PROGRESS_WAIT",
    "IDEMPOTENCY_RETRY_BACKOFF",
    "IDEMPOTENCY_RETRY_BACKOFF_MAX",
    "IDEMPOTENCY_CONSUMER_TIMEOUT",
    "IDEMPOTENCY_REPLICA_TIMEOUT",
    "IDEMPOTENCY_MIN_REPLICAS",
    "IDEMPOTENCY_PREFETCH",
    "IDEMPOTENCY_MAX_ATTEMPTS",
    "IDEMPOTENCY_ON_STORE_ERROR",
    "IDEMPOTENCY_ON_MISSING_FINGERPRINT",
    "IDEMPOTENCY_MAX_BODY_BYTES",
    "IDEMPOTENCY_OUTBOX_MAX_BYTES",
    "IDEMPOTENCY_VERIFY_PAYLOAD",
    "IDEMPOTENCY_DEAD_LETTERS",
    "IDEMPOTENCY_DEAD_LETTER_QUEUE",
    "IDEMPOTENCY_DEAD_LETTER_EXCHANGE",
    "IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY",
    "REDIS_TLS_CA_FILE",
    "REDIS_TLS_CERT_FILE",
    "REDIS_TLS_KEY_FILE",
    "AMQP_TLS_CA_FILE",
    "AMQP_TLS_CERT_FILE",
    "AMQP_TLS_KEY_FILE",
];

/// Prefixes reserved for this library's settings: [`Config::from_env`]
/// refuses a variable under one of them that is not in [`VARIABLES`].
pub(crate) const RESERVED_PREFIXES: &[&str] = &[
    "IDEMPOTENCY_",
    "REDIS_TLS_",
    "AMQP_TLS_",
    "REDIS_CLUSTER_",
    "REDIS_SENTINEL_",
];

/// Longest duration any setting accepts: a typo like `30d` for `30s` is refused.
const MAX_DURATION: Duration = Duration::from_secs(90 * 24 * 3600);

impl Config {
    /// Reads every setting from the process environment; unset variables
    /// keep their defaults. Fails on the first malformed value, naming the
    /// variable, the value and what is expected, and on inconsistent values.
    /// The TLS files (`REDIS_TLS_*`, `AMQP_TLS_*`) are read to check them: an
    /// unreadable or malformed one fails here, naming the variable and path.
    ///
    /// A variable under `IDEMPOTENCY_`, `REDIS_TLS_`, `AMQP_TLS_`,
    /// `REDIS_CLUSTER_` or `REDIS_SENTINEL_` that is not one of the settings
    /// (a typo such as `IDEMPOTENCY_MIN_REPLICA`) fails too, naming it and
    /// the closest known name: a misspelt setting would otherwise be off
    /// without a word.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars_os())
    }

    /// Like [`from_env`](Self::from_env), from `vars`, the whole environment
    /// as (name, value) pairs: `std::env::vars_os()`, or an environment of
    /// your own (a test's, a file's).
    ///
    /// ```
    /// use amqp_idempotency::Config;
    ///
    /// let config = Config::from_vars([("IDEMPOTENCY_MIN_REPLICAS", "1"), ("HOME", "/root")])?;
    /// assert_eq!(config.replication().0, 1);
    /// let typo = Config::from_vars([("IDEMPOTENCY_MIN_REPLICA", "1")]).unwrap_err();
    /// assert_eq!(typo.variable(), "IDEMPOTENCY_MIN_REPLICA");
    /// assert!(typo.expected().contains("IDEMPOTENCY_MIN_REPLICAS"));
    /// # Ok::<(), amqp_idempotency::ConfigError>(())
    /// ```
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let mut known = HashMap::new();
        let mut unknown = Vec::new();
        for (name, value) in vars {
            // A name that is not UTF-8 is never one of ours (they are all
            // ASCII); its lossy form still starts with a reserved prefix
            // exactly when the name does.
            let shown = name.as_ref().to_string_lossy();
            let value = || value.as_ref().to_string_lossy().into_owned();
            if VARIABLES.contains(&shown.as_ref()) {
                // A value that is not UTF-8 is read as one that parses as
                // nothing we accept, and reported.
                known.insert(shown.into_owned(), value());
            } else if is_reserved(&shown) {
                unknown.push((shown.into_owned(), value()));
            }
        }
        // A typo is reported before any value: its setting is silently off.
        unknown.sort();
        if let Some((name, value)) = unknown.first() {
            let others: Vec<&str> = unknown[1..].iter().map(|(n, _)| n.as_str()).collect();
            return Err(unknown_variable(name, value, &others));
        }
        Self::from_lookup(|name| known.get(name).cloned())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup`.
    /// It cannot see which other variables are set, so it refuses no
    /// misspelt name: prefer [`from_vars`](Self::from_vars).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        let get = |name: &str| {
            debug_assert!(
                VARIABLES.contains(&name),
                "{name} is read but missing from config::VARIABLES"
            );
            lookup(name).filter(|value| !value.trim().is_empty())
        };
        let url = get("REDIS_URL");
        if let Some(nodes) = get("REDIS_CLUSTER_NODES") {
            if let Some(url) = &url {
                return Err(ConfigError::invalid(
                    "REDIS_CLUSTER_NODES",
                    redact_nodes(&nodes),
                    format!(
                        "either REDIS_URL (a standalone Redis) or REDIS_CLUSTER_NODES (a Redis \
                         Cluster), not both: REDIS_URL is `{}`; unset one of them",
                        redact_url(url)
                    ),
                ));
            }
            config.redis_cluster_nodes = nodes
                .split(',')
                .map(str::trim)
                .filter(|node| !node.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(url) = url {
            config.redis_url = url;
        }
        if let Some(url) = get("AMQP_URL") {
            config.amqp_url = url;
        }
        if let Some(prefix) = get("IDEMPOTENCY_KEY_PREFIX") {
            config.key_prefix = prefix;
        }
        config.scope = get("IDEMPOTENCY_SCOPE");
        let duration = |name: &str, slot: &mut Duration| -> Result<(), ConfigError> {
            if let Some(value) = get(name) {
                *slot = parse_duration(&value).ok_or_else(|| {
                    ConfigError::invalid(
                        name,
                        &value,
                        "a duration such as 500ms, 30s, 5m or 24h, greater than zero",
                    )
                })?;
            }
            Ok(())
        };
        duration("IDEMPOTENCY_LEASE_TTL", &mut config.lease_ttl)?;
        duration("IDEMPOTENCY_DONE_TTL", &mut config.done_ttl)?;
        duration("IDEMPOTENCY_HANDLER_TIMEOUT", &mut config.handler_timeout)?;
        match get("IDEMPOTENCY_IN_PROGRESS_WAIT") {
            // Zero is allowed here: it turns waiting off.
            Some(value) if matches!(value.trim(), "0" | "0s" | "0ms") => {
                config.in_progress_wait = Duration::ZERO;
            }
            _ => duration("IDEMPOTENCY_IN_PROGRESS_WAIT", &mut config.in_progress_wait)?,
        }
        duration("IDEMPOTENCY_RETRY_BACKOFF", &mut config.retry_backoff)?;
        duration("IDEMPOTENCY_CONSUMER_TIMEOUT", &mut config.consumer_timeout)?;
        duration("IDEMPOTENCY_REPLICA_TIMEOUT", &mut config.replica_timeout)?;
        if let Some(value) = get("IDEMPOTENCY_MIN_REPLICAS") {
            config.min_replicas =
                value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| *n <= 100)
                    .ok_or_else(|| {
                        ConfigError::invalid(
                            "IDEMPOTENCY_MIN_REPLICAS",
                            &value,
                            "an integer from 0 (do not wait for replicas) to 100",
                        )
                    })?;
        }
        duration(
            "IDEMPOTENCY_RETRY_BACKOFF_MAX",
            &mut config.retry_backoff_max,
        )?;
        if let Some(value) = get("IDEMPOTENCY_PREFETCH") {
            config.prefetch = value
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "IDEMPOTENCY_PREFETCH",
                        &value,
                        "an integer from 1 to 65535",
                    )
                })?;
        }
        if let Some(value) = get("IDEMPOTENCY_MAX_ATTEMPTS") {
            config.max_attempts = value
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "IDEMPOTENCY_MAX_ATTEMPTS",
                        &value,
                        "an integer from 1 to 1000",
                    )
                })?;
        }
        if let Some(value) = get("IDEMPOTENCY_ON_STORE_ERROR") {
            config.on_store_error = match value.trim() {
                "fail-closed" => StoreFailurePolicy::FailClosed,
                "fail-open" => StoreFailurePolicy::FailOpen,
                _ => {
                    return Err(ConfigError::invalid(
                        "IDEMPOTENCY_ON_STORE_ERROR",
                        &value,
                        "`fail-closed` or `fail-open`",
                    ));
                }
            };
        }
        if let Some(value) = get("IDEMPOTENCY_ON_MISSING_FINGERPRINT") {
            config.on_missing_fingerprint = match value.trim() {
                "dead-letter" => NoFingerprintPolicy::DeadLetter,
                "pass-through" => NoFingerprintPolicy::PassThrough,
                _ => {
                    return Err(ConfigError::invalid(
                        "IDEMPOTENCY_ON_MISSING_FINGERPRINT",
                        &value,
                        "`dead-letter` or `pass-through`",
                    ));
                }
            };
        }
        if let Some(value) = get("IDEMPOTENCY_MAX_BODY_BYTES") {
            config.max_body_bytes = Some(value.trim().parse().ok().filter(|n| *n > 0).ok_or_else(
                || {
                    ConfigError::invalid(
                        "IDEMPOTENCY_MAX_BODY_BYTES",
                        &value,
                        "a number of bytes greater than zero, such as 1048576",
                    )
                },
            )?);
        }
        if let Some(value) = get("IDEMPOTENCY_OUTBOX_MAX_BYTES") {
            config.outbox_max_bytes =
                value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        ConfigError::invalid(
                            "IDEMPOTENCY_OUTBOX_MAX_BYTES",
                            &value,
                            "a number of bytes greater than zero, such as 1048576",
                        )
                    })?;
        }
        if let Some(value) = get("IDEMPOTENCY_VERIFY_PAYLOAD") {
            config.verify_payload = match value.trim() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(ConfigError::invalid(
                        "IDEMPOTENCY_VERIFY_PAYLOAD",
                        &value,
                        "`true` or `false`",
                    ));
                }
            };
        }
        config.dead_letters = dead_letters_from(&get)?;
        let path = |name: &str| get(name).map(|value| PathBuf::from(value.trim()));
        config.redis_tls = TlsFiles {
            ca_file: path("REDIS_TLS_CA_FILE"),
            cert_file: path("REDIS_TLS_CERT_FILE"),
            key_file: path("REDIS_TLS_KEY_FILE"),
        };
        config.amqp_tls = TlsFiles {
            ca_file: path("AMQP_TLS_CA_FILE"),
            cert_file: path("AMQP_TLS_CERT_FILE"),
            key_file: path("AMQP_TLS_KEY_FILE"),
        };
        config.validate()?;
        // Unreadable or malformed TLS files fail now, not at the first connection.
        config.redis_tls.load(Side::Redis)?;
        config.amqp_tls.load(Side::Amqp)?;
        Ok(config)
    }

    /// Checks that the values are usable together:
    /// handler timeout < lease <= retention, and each within its range; a
    /// TLS client certificate comes with its key, and TLS files come with a
    /// `rediss://` or `amqps://` URL. Reads no file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let secs = |d: Duration| format_duration(d);
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_KEY_PREFIX",
                &self.key_prefix,
                "a non-empty prefix without spaces, such as `idem`",
            ));
        }
        if let Some(scope) = &self.scope
            && (scope.is_empty() || scope.contains(char::is_whitespace))
        {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_SCOPE",
                scope,
                "a non-empty consumer group name without spaces",
            ));
        }
        for (name, value) in [
            ("IDEMPOTENCY_LEASE_TTL", self.lease_ttl),
            ("IDEMPOTENCY_DONE_TTL", self.done_ttl),
            ("IDEMPOTENCY_HANDLER_TIMEOUT", self.handler_timeout),
            ("IDEMPOTENCY_RETRY_BACKOFF", self.retry_backoff),
            ("IDEMPOTENCY_RETRY_BACKOFF_MAX", self.retry_backoff_max),
            ("IDEMPOTENCY_CONSUMER_TIMEOUT", self.consumer_timeout),
        ] {
            if value < Duration::from_millis(1) || value > MAX_DURATION {
                return Err(ConfigError::invalid(
                    name,
                    secs(value),
                    "a duration between 1ms and 90 days",
                ));
            }
        }
        if self.in_progress_wait > MAX_DURATION {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_IN_PROGRESS_WAIT",
                secs(self.in_progress_wait),
                "a duration up to 90 days (0s disables waiting)",
            ));
        }
        if self.handler_timeout >= self.lease_ttl {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_HANDLER_TIMEOUT",
                secs(self.handler_timeout),
                format!(
                    "less than IDEMPOTENCY_LEASE_TTL ({}), so a claim never outlives a hung handler unnoticed",
                    secs(self.lease_ttl)
                ),
            ));
        }
        // The retention is also the lifetime of the released record that
        // counts a failed message's attempts. After the release the delivery
        // is held for its backoff (at most IDEMPOTENCY_RETRY_BACKOFF_MAX),
        // then requeued, and the copy's claim must still read the count, or
        // IDEMPOTENCY_MAX_ATTEMPTS never triggers. The copy may have to wait
        // for a prefetch slot behind deliveries whose handlers run (each
        // times out within a lease), or for a duplicate in progress
        // elsewhere (whose claim is held up to a lease): one lease more
        // covers that. The same bound keeps a done mark alive longer than
        // the claim it replaces.
        let shortest_done_ttl = self.retry_backoff_max.saturating_add(self.lease_ttl);
        if self.done_ttl < shortest_done_ttl {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_DONE_TTL",
                secs(self.done_ttl),
                format!(
                    "at least {} (IDEMPOTENCY_RETRY_BACKOFF_MAX {} plus IDEMPOTENCY_LEASE_TTL {}): \
                     the released record that counts a failed message's attempts lives this \
                     long, and must outlive the backoff before its copy comes back, or \
                     IDEMPOTENCY_MAX_ATTEMPTS never triggers; raise IDEMPOTENCY_DONE_TTL or \
                     lower IDEMPOTENCY_RETRY_BACKOFF_MAX",
                    secs(shortest_done_ttl),
                    secs(self.retry_backoff_max),
                    secs(self.lease_ttl)
                ),
            ));
        }
        if self.retry_backoff_max < self.retry_backoff {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_RETRY_BACKOFF_MAX",
                secs(self.retry_backoff_max),
                format!(
                    "at least IDEMPOTENCY_RETRY_BACKOFF ({})",
                    secs(self.retry_backoff)
                ),
            ));
        }
        // Every wait below holds a delivery unacked; past the broker's
        // consumer_timeout RabbitMQ closes the channel with all of them.
        let bound = |what: &str| {
            format!(
                "{what} below IDEMPOTENCY_CONSUMER_TIMEOUT ({}), RabbitMQ's consumer_timeout: \
                 a delivery held longer makes the broker close the channel; if your broker \
                 allows longer, raise IDEMPOTENCY_CONSUMER_TIMEOUT to match",
                secs(self.consumer_timeout)
            )
        };
        if self.lease_ttl.saturating_mul(2) >= self.consumer_timeout {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_LEASE_TTL",
                secs(self.lease_ttl),
                bound(
                    "twice the lease (a timed-out handler's delivery is held until its lease ends)",
                ),
            ));
        }
        if self.in_progress_wait.saturating_add(self.lease_ttl) >= self.consumer_timeout {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_IN_PROGRESS_WAIT",
                secs(self.in_progress_wait),
                bound(
                    "the wait plus IDEMPOTENCY_LEASE_TTL (a duplicate in progress elsewhere is held up to both)",
                ),
            ));
        }
        if self.retry_backoff_max >= self.consumer_timeout {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_RETRY_BACKOFF_MAX",
                secs(self.retry_backoff_max),
                bound("a delay (a failed delivery is held during its backoff)"),
            ));
        }
        if self.min_replicas > 100 {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_MIN_REPLICAS",
                self.min_replicas.to_string(),
                "an integer from 0 (do not wait for replicas) to 100",
            ));
        }
        if self.replica_timeout.is_zero() || self.replica_timeout > Duration::from_secs(10) {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_REPLICA_TIMEOUT",
                secs(self.replica_timeout),
                "a duration from 1ms to 10s (how long WAIT waits for the replicas)",
            ));
        }
        if self.prefetch == 0 {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_PREFETCH",
                "0",
                "an integer from 1 to 65535",
            ));
        }
        if !(1..=1000).contains(&self.max_attempts) {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_MAX_ATTEMPTS",
                self.max_attempts.to_string(),
                "an integer from 1 to 1000",
            ));
        }
        for node in &self.redis_cluster_nodes {
            if !node.starts_with("redis://") && !node.starts_with("rediss://") {
                return Err(ConfigError::invalid(
                    "REDIS_CLUSTER_NODES",
                    redact_nodes(&self.redis_cluster_nodes.join(",")),
                    "comma-separated redis:// or rediss:// URLs of the cluster's nodes, such as \
                     `redis://10.0.0.1:7000,redis://10.0.0.2:7000`",
                ));
            }
        }
        if is_sentinel_url(&self.redis_url) {
            crate::store::SentinelUrl::parse(&self.redis_url).map_err(|problem| {
                ConfigError::invalid("REDIS_URL", redact_url(&self.redis_url), problem)
            })?;
        }
        let redis_url = self.redis_cluster_nodes.first().unwrap_or(&self.redis_url);
        for (side, url, files) in [
            (Side::Redis, redis_url, &self.redis_tls),
            (Side::Amqp, &self.amqp_url, &self.amqp_tls),
        ] {
            files.check_pairs(side)?;
            // TLS files with a plain URL: the connection would silently go
            // without TLS.
            if let Some((var, path)) = files.first_set(side)
                && !side.is_tls_url(url)
            {
                return Err(ConfigError::invalid(
                    var,
                    path.display().to_string(),
                    format!(
                        "to be set only when {} starts with {}:// (it is `{}`, without TLS, so \
                         the file would be ignored): use {}:// or unset {var}",
                        side.url_var(),
                        side.tls_scheme(),
                        redact_url(url),
                        side.tls_scheme(),
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Redis URL (`REDIS_URL`): a standalone Redis or Valkey, or a
    /// primary. Clears the cluster nodes.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = url.into();
        self.redis_cluster_nodes.clear();
        self
    }

    /// Seed nodes of a Redis Cluster (`REDIS_CLUSTER_NODES`, comma-separated
    /// `redis://` or `rediss://` URLs): the store then runs in cluster mode,
    /// the URL of [`redis_url`](Self::redis_url) is not used, and
    /// [`redis`](Self::redis) says [`RedisDeployment::Cluster`].
    pub fn redis_cluster<I, S>(mut self, nodes: I) -> Self
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
    pub fn min_replicas(mut self, replicas: u32) -> Self {
        self.min_replicas = replicas;
        self
    }

    /// How long `WAIT` waits for the replicas (`IDEMPOTENCY_REPLICA_TIMEOUT`,
    /// default `1s`, at most `10s`).
    pub fn replica_timeout(mut self, timeout: Duration) -> Self {
        self.replica_timeout = timeout;
        self
    }

    /// The replicas each write must reach, and how long to wait for them.
    pub fn replication(&self) -> (u32, Duration) {
        (self.min_replicas, self.replica_timeout)
    }

    /// Broker URL (`AMQP_URL`).
    pub fn amqp_url(mut self, url: impl Into<String>) -> Self {
        self.amqp_url = url.into();
        self
    }

    /// CA certificates (PEM) that Redis's certificate must chain to, instead
    /// of the platform's trusted roots (`REDIS_TLS_CA_FILE`; `rediss://` only).
    pub fn redis_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_tls.ca_file = Some(path.into());
        self
    }

    /// Client certificate (PEM) presented to a Redis that requires one
    /// (`REDIS_TLS_CERT_FILE`, with [`redis_tls_key_file`](Self::redis_tls_key_file)).
    pub fn redis_tls_cert_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_tls.cert_file = Some(path.into());
        self
    }

    /// Private key (PEM) of the Redis client certificate (`REDIS_TLS_KEY_FILE`).
    pub fn redis_tls_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_tls.key_file = Some(path.into());
        self
    }

    /// CA certificates (PEM) that the broker's certificate must chain to,
    /// instead of the platform's trusted roots (`AMQP_TLS_CA_FILE`; `amqps://` only).
    pub fn amqp_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.amqp_tls.ca_file = Some(path.into());
        self
    }

    /// Client certificate (PEM) presented to a broker that requires one
    /// (`AMQP_TLS_CERT_FILE`, with [`amqp_tls_key_file`](Self::amqp_tls_key_file)).
    pub fn amqp_tls_cert_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.amqp_tls.cert_file = Some(path.into());
        self
    }

    /// Private key (PEM) of the broker client certificate (`AMQP_TLS_KEY_FILE`).
    pub fn amqp_tls_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.amqp_tls.key_file = Some(path.into());
        self
    }

    /// Key prefix (`IDEMPOTENCY_KEY_PREFIX`, default `idem`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Consumer group (`IDEMPOTENCY_SCOPE`, default: the queue name).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Lifetime of an in-progress claim (`IDEMPOTENCY_LEASE_TTL`, default 30s);
    /// renewed while the handler runs.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Retention of the done mark (`IDEMPOTENCY_DONE_TTL`, default 24h):
    /// duplicates are recognised for this long.
    pub fn done_ttl(mut self, ttl: Duration) -> Self {
        self.done_ttl = ttl;
        self
    }

    /// How long a handler may run before it counts as a retryable failure
    /// (`IDEMPOTENCY_HANDLER_TIMEOUT`, default 25s); must be below the lease.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// Prefetch and concurrency (`IDEMPOTENCY_PREFETCH`, default 64).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// How long to wait for a duplicate that is in progress elsewhere to
    /// finish before requeueing it (`IDEMPOTENCY_IN_PROGRESS_WAIT`, default 5s).
    /// With an outbox, also how long after the first run's commit a
    /// duplicate leaves that run to dispatch its messages before it sends
    /// what is left itself.
    pub fn in_progress_wait(mut self, wait: Duration) -> Self {
        self.in_progress_wait = wait;
        self
    }

    /// Attempts before a retryable failure is dead-lettered
    /// (`IDEMPOTENCY_MAX_ATTEMPTS`, default 5).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Delay before the first requeue (`IDEMPOTENCY_RETRY_BACKOFF`, default
    /// 500ms); doubles per attempt up to [`retry_backoff_max`](Self::retry_backoff_max).
    pub fn retry_backoff(mut self, delay: Duration) -> Self {
        self.retry_backoff = delay;
        self
    }

    /// Upper bound of the requeue delay (`IDEMPOTENCY_RETRY_BACKOFF_MAX`, default 30s).
    pub fn retry_backoff_max(mut self, delay: Duration) -> Self {
        self.retry_backoff_max = delay;
        self
    }

    /// Fail closed (default) or open when the store is unreachable
    /// (`IDEMPOTENCY_ON_STORE_ERROR`: `fail-closed` or `fail-open`).
    pub fn on_store_error(mut self, policy: StoreFailurePolicy) -> Self {
        self.on_store_error = policy;
        self
    }

    /// What to do with messages without a fingerprint
    /// (`IDEMPOTENCY_ON_MISSING_FINGERPRINT`: `dead-letter` or `pass-through`).
    pub fn on_missing_fingerprint(mut self, policy: NoFingerprintPolicy) -> Self {
        self.on_missing_fingerprint = policy;
        self
    }

    /// Whether a duplicate's payload must match the first one's
    /// (`IDEMPOTENCY_VERIFY_PAYLOAD`, default true); a mismatch is dead-lettered.
    pub fn verify_payload(mut self, verify: bool) -> Self {
        self.verify_payload = verify;
        self
    }

    /// Largest body the handler is given (`IDEMPOTENCY_MAX_BODY_BYTES`,
    /// default: no limit); a larger message is dead-lettered with a reason
    /// instead of reaching the handler.
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = Some(limit.max(1));
        self
    }

    /// Most bytes one delivery may stage in its outbox, messages and reply
    /// together, encoded (`IDEMPOTENCY_OUTBOX_MAX_BYTES`, default 1 MiB).
    /// Staging past it fails the handler permanently: the message is
    /// dead-lettered and nothing it staged is published.
    pub fn outbox_max_bytes(mut self, limit: usize) -> Self {
        self.outbox_max_bytes = limit.max(1);
        self
    }

    /// RabbitMQ's `consumer_timeout` (`IDEMPOTENCY_CONSUMER_TIMEOUT`,
    /// default 30m, the broker's default): the longest a delivery may stay
    /// unacked before the broker closes its channel. Every hold (backoff,
    /// waiting for a duplicate in progress elsewhere, a timed-out handler's
    /// lease, a store outage) is kept below it; set it to your broker's
    /// value if you changed that.
    pub fn consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = timeout;
        self
    }

    /// Where dead letters go (see [`DeadLetterTarget`]; default: the
    /// parking queue `{queue}.dead`).
    pub fn dead_letters(mut self, target: DeadLetterTarget) -> Self {
        self.dead_letters = target;
        self
    }

    /// The configured dead-letter target.
    pub fn dead_letter_target(&self) -> &DeadLetterTarget {
        &self.dead_letters
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
    /// let config = Config::default().redis_cluster(["redis://10.0.0.1:7000"]);
    /// assert_eq!(config.redis().standalone_url(), None);
    /// assert!(matches!(config.redis(), RedisDeployment::Cluster(nodes) if nodes.len() == 1));
    /// ```
    pub fn redis(&self) -> RedisDeployment<'_> {
        if !self.redis_cluster_nodes.is_empty() {
            RedisDeployment::Cluster(&self.redis_cluster_nodes)
        } else if is_sentinel_url(&self.redis_url) {
            RedisDeployment::Sentinel(&self.redis_url)
        } else {
            RedisDeployment::Standalone(&self.redis_url)
        }
    }

    /// The Redis Cluster seed nodes; empty in standalone mode.
    pub fn redis_cluster_nodes(&self) -> &[String] {
        &self.redis_cluster_nodes
    }

    /// The broker URL.
    pub fn amqp(&self) -> &str {
        &self.amqp_url
    }

    /// The TLS files for `rediss://`.
    pub fn redis_tls(&self) -> &TlsFiles {
        &self.redis_tls
    }

    /// The TLS files for `amqps://`.
    pub fn amqp_tls(&self) -> &TlsFiles {
        &self.amqp_tls
    }

    /// The configured lease.
    pub fn lease(&self) -> Duration {
        self.lease_ttl
    }

    /// The configured prefetch.
    pub fn prefetch_count(&self) -> u16 {
        self.prefetch
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

    /// The delay before requeueing the `attempt`-th failure.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.retry_backoff
            .saturating_mul(factor)
            .min(self.retry_backoff_max)
    }
}

/// Reads `IDEMPOTENCY_DEAD_LETTERS`, `IDEMPOTENCY_DEAD_LETTER_QUEUE`,
/// `IDEMPOTENCY_DEAD_LETTER_EXCHANGE` and `IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY`.
fn dead_letters_from(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<DeadLetterTarget, ConfigError> {
    let mode = get("IDEMPOTENCY_DEAD_LETTERS");
    let queue = get("IDEMPOTENCY_DEAD_LETTER_QUEUE");
    let exchange = get("IDEMPOTENCY_DEAD_LETTER_EXCHANGE");
    let routing_key = get("IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY");
    let name = |variable: &str, value: &str| {
        if value.trim().is_empty() || value.len() > 255 {
            Err(ConfigError::invalid(
                variable,
                value,
                "a queue or exchange name of 1 to 255 bytes",
            ))
        } else {
            Ok(value.trim().to_owned())
        }
    };
    match mode.as_deref().map(str::trim) {
        None | Some("park") => {}
        Some("broker") => {
            if let Some(other) = queue.as_ref().or(exchange.as_ref()) {
                return Err(ConfigError::invalid(
                    "IDEMPOTENCY_DEAD_LETTERS",
                    "broker",
                    format!(
                        "`park` when IDEMPOTENCY_DEAD_LETTER_QUEUE or IDEMPOTENCY_DEAD_LETTER_EXCHANGE is set (got `{other}`); the broker's own dead-lettering uses the queue's x-dead-letter-exchange"
                    ),
                ));
            }
            return Ok(DeadLetterTarget::Broker);
        }
        Some(other) => {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_DEAD_LETTERS",
                other,
                "`park` (a queue or exchange the runner publishes to, the default) or `broker` (reject without requeue, for queues with x-dead-letter-exchange)",
            ));
        }
    }
    match (queue, exchange) {
        (Some(queue), Some(_)) => Err(ConfigError::invalid(
            "IDEMPOTENCY_DEAD_LETTER_QUEUE",
            queue,
            "unset when IDEMPOTENCY_DEAD_LETTER_EXCHANGE is set: dead letters go to one place",
        )),
        (Some(queue), None) => {
            if let Some(key) = routing_key {
                return Err(ConfigError::invalid(
                    "IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY",
                    key,
                    "unset unless IDEMPOTENCY_DEAD_LETTER_EXCHANGE is set (a parking queue is published to by its name)",
                ));
            }
            Ok(DeadLetterTarget::ParkingQueue(Some(name(
                "IDEMPOTENCY_DEAD_LETTER_QUEUE",
                &queue,
            )?)))
        }
        (None, Some(exchange)) => Ok(DeadLetterTarget::Exchange {
            exchange: name("IDEMPOTENCY_DEAD_LETTER_EXCHANGE", &exchange)?,
            routing_key,
        }),
        (None, None) => {
            if let Some(key) = routing_key {
                return Err(ConfigError::invalid(
                    "IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY",
                    key,
                    "unset unless IDEMPOTENCY_DEAD_LETTER_EXCHANGE is set",
                ));
            }
            Ok(DeadLetterTarget::ParkingQueue(None))
        }
    }
}

/// True for a name under one of [`RESERVED_PREFIXES`], in any case (a
/// lower-case spelling is refused too rather than ignored).
fn is_reserved(name: &str) -> bool {
    RESERVED_PREFIXES.iter().any(|prefix| {
        name.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    })
}

/// The error for `name`, set under a reserved prefix but not a variable we
/// read; `others` are more such names.
fn unknown_variable(name: &str, value: &str, others: &[&str]) -> ConfigError {
    let upper = name.to_ascii_uppercase();
    // No setting lives under REDIS_SENTINEL_: Sentinel is a REDIS_URL.
    let sentinel = upper.starts_with("REDIS_SENTINEL_");
    let closest = VARIABLES
        .iter()
        .filter(|known| !sentinel || **known == "REDIS_URL")
        .min_by_key(|known| edit_distance(&upper, known))
        .copied()
        .unwrap_or("REDIS_URL");
    let mut expected = format!(
        "a variable this library reads: did you mean {closest}? Names under {} are reserved \
         for its settings, and an unknown one is refused so that a typo cannot leave a \
         setting off; rename it or unset it (the README's Configuration section lists them)",
        RESERVED_PREFIXES.join(", ")
    );
    if sentinel {
        expected.push_str(
            "; Sentinel is set through REDIS_URL=redis-sentinel://host:port,host:port#master",
        );
    }
    if !others.is_empty() {
        expected.push_str(&format!("; also unknown: {}", others.join(", ")));
    }
    // The value is shown, its URL password hidden, unless the name says it
    // is a secret.
    let secret = ["PASS", "SECRET", "TOKEN"]
        .iter()
        .any(|word| upper.contains(word));
    let value = if secret {
        "***".to_owned()
    } else {
        redact_url(value)
    };
    ConfigError::invalid(name, value, expected)
}

/// Levenshtein distance between two ASCII names, by bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, &x) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, &y) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(x != y);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// Parses `500ms`, `30s`, `5m`, `24h` or `7d`. Zero and unitless values are refused.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86_400)?),
        _ => return None,
    };
    (!duration.is_zero()).then_some(duration)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(1000) && ms > 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Comma-separated URLs with their passwords hidden.
fn redact_nodes(nodes: &str) -> String {
    nodes
        .split(',')
        .map(|node| redact_url(node.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn an_unknown_variable_under_a_reserved_prefix_is_refused_with_the_closest_name() {
        for (typo, meant) in [
            ("IDEMPOTENCY_MIN_REPLICA", "IDEMPOTENCY_MIN_REPLICAS"),
            ("IDEMPOTENCY_LEASE_TIME", "IDEMPOTENCY_LEASE_TTL"),
            (
                "IDEMPOTENCY_RETRY_BACKOF_MAX",
                "IDEMPOTENCY_RETRY_BACKOFF_MAX",
            ),
            ("idempotency_min_replicas", "IDEMPOTENCY_MIN_REPLICAS"),
            ("REDIS_TLS_CA", "REDIS_TLS_CA_FILE"),
            ("AMQP_TLS_CERT_FIEL", "AMQP_TLS_CERT_FILE"),
            ("REDIS_CLUSTER_NODE", "REDIS_CLUSTER_NODES"),
        ] {
            let err = Config::from_vars([(typo, "1"), ("HOME", "/root")]).expect_err(typo);
            assert_eq!(err.variable(), typo);
            assert!(err.expected().contains(meant), "{typo}: {err}");
        }
        let err = Config::from_vars([("REDIS_SENTINEL_MASTER", "orders")]).unwrap_err();
        assert_eq!(err.variable(), "REDIS_SENTINEL_MASTER");
        assert!(err.expected().contains("did you mean REDIS_URL?"), "{err}");
        assert!(err.expected().contains("redis-sentinel://"), "{err}");
        // Several: all are named, the first (in name order) as the variable.
        let err = Config::from_vars([("IDEMPOTENCY_SCOPES", "a"), ("IDEMPOTENCY_LEASE", "1s")])
            .unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_LEASE");
        assert!(err.expected().contains("IDEMPOTENCY_SCOPES"), "{err}");
        // A password in an unknown variable's URL is not shown.
        let err = Config::from_vars([("REDIS_CLUSTER_URL", "redis://u:hunter2@h:1")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn variables_outside_the_reserved_prefixes_are_ignored_and_known_ones_read() {
        let config = Config::from_vars([
            ("IDEMPOTENCY_MIN_REPLICAS", "2"),
            ("REDIS_HOST", "elsewhere"),
            ("AMQP_URLS", "amqp://x"),
            ("REDIS_TLS", "yes"),
            ("MY_IDEMPOTENCY_SETTING", "1"),
            ("PATH", "/usr/bin"),
        ])
        .unwrap();
        assert_eq!(config.min_replicas, 2);
        assert_eq!(
            Config::from_vars(std::iter::empty::<(&str, &str)>()),
            Ok(Config::default())
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_name_that_is_not_utf8_is_refused_only_under_a_reserved_prefix() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let under = OsString::from_vec(b"IDEMPOTENCY_LEASE_TTL\xff".to_vec());
        let err = Config::from_vars([(under, OsString::from("1s"))]).unwrap_err();
        assert!(err.variable().starts_with("IDEMPOTENCY_LEASE_TTL"), "{err}");
        assert!(err.expected().contains("IDEMPOTENCY_LEASE_TTL"), "{err}");
        let elsewhere = OsString::from_vec(b"\xffIDEMPOTENCY_LEASE_TTL".to_vec());
        assert!(Config::from_vars([(elsewhere, OsString::from("1s"))]).is_ok());
        // A value that is not UTF-8 is refused as malformed, with the variable.
        let value = OsString::from_vec(b"30\xffs".to_vec());
        let err =
            Config::from_vars([(OsString::from("IDEMPOTENCY_LEASE_TTL"), value)]).unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_LEASE_TTL");
    }

    #[test]
    fn the_table_of_variables_is_what_from_lookup_reads_and_the_readme_lists() {
        let asked = std::cell::RefCell::new(Vec::new());
        Config::from_lookup(|name| {
            asked.borrow_mut().push(name.to_owned());
            None
        })
        .unwrap();
        let mut asked = asked.into_inner();
        asked.sort();
        asked.dedup();
        let mut table: Vec<String> = VARIABLES.iter().map(|name| (*name).to_owned()).collect();
        table.sort();
        assert_eq!(
            asked, table,
            "config::VARIABLES and what from_lookup reads differ"
        );
        let readme = include_str!("../README.md");
        for name in VARIABLES {
            assert!(
                readme.contains(&format!("`{name}`")),
                "the README's configuration table does not list {name}"
            );
        }
        for name in VARIABLES {
            assert!(
                RESERVED_PREFIXES
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
                    || ["REDIS_URL", "AMQP_URL"].contains(name),
                "{name} is under no reserved prefix: a misspelling of it would go unnoticed"
            );
        }
    }

    #[test]
    fn a_config_naming_a_cluster_or_sentinel_hands_out_no_standalone_url() {
        let cluster =
            Config::from_vars([("REDIS_CLUSTER_NODES", "redis://:pw@b:2,redis://c:3")]).unwrap();
        assert_eq!(cluster.redis().standalone_url(), None);
        assert_eq!(
            cluster.redis(),
            RedisDeployment::Cluster(&["redis://:pw@b:2".to_owned(), "redis://c:3".to_owned()])
        );
        assert!(!format!("{:?} {}", cluster.redis(), cluster.redis()).contains("pw"));
        let sentinel =
            Config::from_vars([("REDIS_URL", "redis-sentinel://s1:26379#orders")]).unwrap();
        assert_eq!(sentinel.redis().standalone_url(), None);
        assert_eq!(
            sentinel.redis(),
            RedisDeployment::Sentinel("redis-sentinel://s1:26379#orders")
        );
        assert_eq!(
            Config::default().redis().standalone_url(),
            Some("redis://127.0.0.1:6379")
        );
        // The builder: a URL after the nodes clears them.
        let url = cluster.redis_url("redis://d:4");
        assert_eq!(url.redis(), RedisDeployment::Standalone("redis://d:4"));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration(" 5m "), Some(Duration::from_secs(300)));
        for bad in [
            "",
            "30",
            "s",
            "0s",
            "-1s",
            "1.5s",
            "30sec",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults_match_the_design() {
        let config = Config::from_lookup(|_| None).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.lease_ttl, Duration::from_secs(30));
        assert_eq!(config.done_ttl, Duration::from_secs(86_400));
        assert_eq!(config.prefetch, 64);
        assert_eq!(config.max_attempts, 5);
        assert_eq!(config.on_store_error, StoreFailurePolicy::FailClosed);
    }

    #[test]
    fn every_variable_is_read() {
        let config = Config::from_lookup(lookup(&[
            ("REDIS_URL", "redis://r:1"),
            ("AMQP_URL", "amqp://a"),
            ("IDEMPOTENCY_KEY_PREFIX", "shop"),
            ("IDEMPOTENCY_SCOPE", "billing"),
            ("IDEMPOTENCY_LEASE_TTL", "10s"),
            ("IDEMPOTENCY_DONE_TTL", "1h"),
            ("IDEMPOTENCY_HANDLER_TIMEOUT", "9s"),
            ("IDEMPOTENCY_PREFETCH", "8"),
            ("IDEMPOTENCY_IN_PROGRESS_WAIT", "0s"),
            ("IDEMPOTENCY_MAX_ATTEMPTS", "3"),
            ("IDEMPOTENCY_ON_STORE_ERROR", "fail-open"),
            ("IDEMPOTENCY_ON_MISSING_FINGERPRINT", "pass-through"),
            ("IDEMPOTENCY_VERIFY_PAYLOAD", "false"),
            ("IDEMPOTENCY_MAX_BODY_BYTES", "1024"),
            ("IDEMPOTENCY_CONSUMER_TIMEOUT", "1h"),
        ]))
        .unwrap();
        assert_eq!(config.consumer_timeout, Duration::from_secs(3600));
        assert_eq!(config.redis_url, "redis://r:1");
        assert_eq!(config.amqp_url, "amqp://a");
        assert_eq!(config.key_prefix, "shop");
        assert_eq!(config.scope.as_deref(), Some("billing"));
        assert_eq!(config.lease_ttl, Duration::from_secs(10));
        assert_eq!(config.done_ttl, Duration::from_secs(3600));
        assert_eq!(config.handler_timeout, Duration::from_secs(9));
        assert_eq!(config.prefetch, 8);
        assert_eq!(
            config.in_progress_wait,
            Duration::ZERO,
            "0s turns waiting off"
        );
        assert_eq!(config.max_attempts, 3);
        assert_eq!(config.on_store_error, StoreFailurePolicy::FailOpen);
        assert_eq!(
            config.on_missing_fingerprint,
            NoFingerprintPolicy::PassThrough
        );
        assert!(!config.verify_payload);
        assert_eq!(config.max_body_bytes, Some(1024));
    }

    #[test]
    fn a_bad_value_names_variable_value_and_expectation() {
        let err = Config::from_lookup(lookup(&[("IDEMPOTENCY_LEASE_TTL", "thirty")])).unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_LEASE_TTL");
        assert_eq!(err.value(), "thirty");
        assert!(err.expected().contains("30s"));
        let err = Config::from_lookup(lookup(&[("IDEMPOTENCY_PREFETCH", "0")])).unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_PREFETCH");
        let err =
            Config::from_lookup(lookup(&[("IDEMPOTENCY_ON_STORE_ERROR", "open")])).unwrap_err();
        assert_eq!(err.value(), "open");
    }

    #[test]
    fn inconsistent_values_are_refused() {
        let err = Config::from_lookup(lookup(&[
            ("IDEMPOTENCY_LEASE_TTL", "1h"),
            ("IDEMPOTENCY_DONE_TTL", "10m"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_DONE_TTL");
        let err = Config::default()
            .lease_ttl(Duration::from_secs(5))
            .validate()
            .unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_HANDLER_TIMEOUT");
        assert!(err.expected().contains("LEASE_TTL"));
    }

    #[test]
    fn a_retention_shorter_than_the_retries_is_refused_with_the_smallest_valid_value() {
        // The issue's case: the released record (which counts the attempts)
        // expired before the held copy came back, so max attempts never hit.
        let err = Config::from_lookup(lookup(&[
            ("IDEMPOTENCY_LEASE_TTL", "1s"),
            ("IDEMPOTENCY_HANDLER_TIMEOUT", "500ms"),
            ("IDEMPOTENCY_DONE_TTL", "1s"),
            ("IDEMPOTENCY_RETRY_BACKOFF", "1500ms"),
            ("IDEMPOTENCY_RETRY_BACKOFF_MAX", "1500ms"),
            ("IDEMPOTENCY_MAX_ATTEMPTS", "2"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_DONE_TTL", "{err}");
        assert_eq!(err.value(), "1s");
        assert!(
            err.expected().contains("IDEMPOTENCY_RETRY_BACKOFF_MAX"),
            "{err}"
        );
        assert!(err.expected().contains("IDEMPOTENCY_LEASE_TTL"), "{err}");
        assert!(err.expected().contains("at least 2500ms"), "{err}");
        // The default backoff cap (30s) with a one-second lease.
        let err = Config::default()
            .lease_ttl(Duration::from_secs(1))
            .handler_timeout(Duration::from_millis(500))
            .done_ttl(Duration::from_secs(10))
            .validate()
            .unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_DONE_TTL");
        assert!(err.expected().contains("at least 31s"), "{err}");
        // The smallest valid value is valid; a millisecond less is not.
        let at = |done: Duration| {
            Config::default()
                .lease_ttl(Duration::from_secs(1))
                .handler_timeout(Duration::from_millis(500))
                .retry_backoff(Duration::from_millis(100))
                .retry_backoff_max(Duration::from_millis(1500))
                .done_ttl(done)
                .validate()
        };
        assert_eq!(at(Duration::from_millis(2500)), Ok(()));
        assert_eq!(
            at(Duration::from_millis(2499)).map_err(|err| err.variable().to_owned()),
            Err("IDEMPOTENCY_DONE_TTL".to_owned())
        );
    }

    #[test]
    fn an_outbox_commit_outlives_the_hold_of_an_undispatched_delivery() {
        let config = Config::default()
            .lease_ttl(Duration::from_secs(1))
            .handler_timeout(Duration::from_millis(500))
            .retry_backoff(Duration::from_millis(100))
            .retry_backoff_max(Duration::from_secs(2))
            .done_ttl(Duration::from_secs(5))
            .consumer_timeout(Duration::from_secs(600));
        assert_eq!(config.validate(), Ok(()));
        // Held up to consumer_timeout / 2, then requeued with a backoff,
        // then possibly behind a claim in progress: 300s + 2s + 1s.
        assert_eq!(config.outbox_retention(), Duration::from_secs(303));
        // A longer retention is kept as it is.
        let long = config.done_ttl(Duration::from_secs(3600));
        assert_eq!(long.outbox_retention(), Duration::from_secs(3600));
    }

    #[test]
    fn waits_longer_than_the_brokers_consumer_timeout_are_refused() {
        let err =
            Config::from_lookup(lookup(&[("IDEMPOTENCY_RETRY_BACKOFF_MAX", "31m")])).unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_RETRY_BACKOFF_MAX");
        assert!(err.expected().contains("consumer_timeout"), "{err}");
        let err =
            Config::from_lookup(lookup(&[("IDEMPOTENCY_IN_PROGRESS_WAIT", "40m")])).unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_IN_PROGRESS_WAIT");
        let err = Config::from_lookup(lookup(&[
            ("IDEMPOTENCY_LEASE_TTL", "20m"),
            ("IDEMPOTENCY_HANDLER_TIMEOUT", "10m"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable(), "IDEMPOTENCY_LEASE_TTL");
        // A broker configured for longer: raise the bound with it.
        let config = Config::from_lookup(lookup(&[
            ("IDEMPOTENCY_LEASE_TTL", "20m"),
            ("IDEMPOTENCY_HANDLER_TIMEOUT", "10m"),
            ("IDEMPOTENCY_CONSUMER_TIMEOUT", "2h"),
        ]));
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn dead_letter_targets_are_read_and_contradictions_refused() {
        let read = |pairs: &'static [(&'static str, &'static str)]| {
            Config::from_lookup(lookup(pairs)).map(|c| c.dead_letters)
        };
        assert_eq!(read(&[]), Ok(DeadLetterTarget::ParkingQueue(None)));
        assert_eq!(
            read(&[("IDEMPOTENCY_DEAD_LETTERS", "broker")]),
            Ok(DeadLetterTarget::Broker)
        );
        assert_eq!(
            read(&[
                ("IDEMPOTENCY_DEAD_LETTER_EXCHANGE", "errors"),
                ("IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY", "orders"),
            ]),
            Ok(DeadLetterTarget::Exchange {
                exchange: "errors".into(),
                routing_key: Some("orders".into())
            })
        );
        for bad in [
            &[("IDEMPOTENCY_DEAD_LETTERS", "drop")][..],
            &[
                ("IDEMPOTENCY_DEAD_LETTERS", "broker"),
                ("IDEMPOTENCY_DEAD_LETTER_QUEUE", "q.dead"),
            ],
            &[
                ("IDEMPOTENCY_DEAD_LETTER_QUEUE", "q.dead"),
                ("IDEMPOTENCY_DEAD_LETTER_EXCHANGE", "errors"),
            ],
            &[("IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY", "k")],
        ] {
            let err = read(bad).expect_err("refused");
            assert!(
                err.variable().starts_with("IDEMPOTENCY_DEAD_LETTER"),
                "{err}"
            );
        }
    }

    #[test]
    fn debug_output_hides_the_passwords_in_the_urls() {
        let config = Config::default()
            .redis_url("rediss://idem:hunter2@redis.internal:6380/0")
            .amqp_url("amqps://app:s3cr3t@rabbit.internal/%2f");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(
            shown.contains("rediss://idem:***@redis.internal:6380/0"),
            "{shown}"
        );
        assert!(
            shown.contains("amqps://app:***@rabbit.internal/%2f"),
            "{shown}"
        );
        assert!(shown.contains("lease_ttl: 30s"), "{shown}");
        let shown = format!("{config:#?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn tls_variables_are_read_and_checked() {
        let err = Config::from_lookup(lookup(&[
            ("REDIS_URL", "rediss://r:6380"),
            ("REDIS_TLS_CERT_FILE", "/etc/idem/client.pem"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable(), "REDIS_TLS_KEY_FILE", "{err}");
        assert!(err.expected().contains("/etc/idem/client.pem"), "{err}");
        let err = Config::from_lookup(lookup(&[
            ("AMQP_URL", "amqps://a/%2f"),
            ("AMQP_TLS_KEY_FILE", "/etc/idem/client.key"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable(), "AMQP_TLS_CERT_FILE", "{err}");
        let err = Config::from_lookup(lookup(&[
            ("AMQP_URL", "amqps://a/%2f"),
            ("AMQP_TLS_CA_FILE", "/nonexistent/ca.pem"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable(), "AMQP_TLS_CA_FILE");
        assert_eq!(err.value(), "/nonexistent/ca.pem");
        assert!(err.to_string().contains("reading it failed"), "{err}");
        let err = Config::from_lookup(lookup(&[
            ("REDIS_URL", "redis://u:hunter2@r:6379"),
            ("REDIS_TLS_CA_FILE", "/etc/idem/ca.pem"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable(), "REDIS_TLS_CA_FILE");
        assert!(err.expected().contains("rediss://"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn tls_files_have_builder_methods() {
        let config = Config::default()
            .redis_url("rediss://r:6380")
            .redis_tls_ca_file("/ca.pem")
            .redis_tls_cert_file("/c.pem")
            .redis_tls_key_file("/k.pem")
            .amqp_url("amqps://a/%2f")
            .amqp_tls_ca_file("/a-ca.pem");
        assert!(config.validate().is_ok());
        assert_eq!(
            config.redis_tls().key_file(),
            Some(std::path::Path::new("/k.pem"))
        );
        assert_eq!(
            config.amqp_tls().ca_file(),
            Some(std::path::Path::new("/a-ca.pem"))
        );
        assert!(config.amqp_tls().cert_file().is_none());
        let err = config.amqp_tls_key_file("/a-k.pem").validate().unwrap_err();
        assert_eq!(err.variable(), "AMQP_TLS_CERT_FILE");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = Config::default()
            .retry_backoff(Duration::from_millis(100))
            .retry_backoff_max(Duration::from_millis(350));
        assert_eq!(config.backoff(1), Duration::from_millis(100));
        assert_eq!(config.backoff(2), Duration::from_millis(200));
        assert_eq!(config.backoff(3), Duration::from_millis(350));
        assert_eq!(config.backoff(60), Duration::from_millis(350));
    }

    #[test]
    fn cluster_sentinel_and_replica_settings_are_read_and_checked() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let both = Config::from_lookup(env(&[
            ("REDIS_URL", "redis://a:1"),
            ("REDIS_CLUSTER_NODES", "redis://b:2"),
        ]))
        .unwrap_err();
        assert_eq!(both.variable(), "REDIS_CLUSTER_NODES");
        let cluster =
            Config::from_lookup(env(&[("REDIS_CLUSTER_NODES", "redis://b:2, redis://c:3")]))
                .unwrap();
        assert_eq!(
            cluster.redis_cluster_nodes(),
            ["redis://b:2", "redis://c:3"]
        );
        let sentinel = Config::from_lookup(env(&[
            ("REDIS_URL", "redis-sentinel://s1:26379,s2:26379#orders"),
            ("IDEMPOTENCY_MIN_REPLICAS", "1"),
            ("IDEMPOTENCY_REPLICA_TIMEOUT", "250ms"),
        ]))
        .unwrap();
        assert_eq!(sentinel.replication(), (1, Duration::from_millis(250)));
        let no_master =
            Config::from_lookup(env(&[("REDIS_URL", "redis-sentinel://s1:26379")])).unwrap_err();
        assert_eq!(no_master.variable(), "REDIS_URL");
        let bad = Config::from_lookup(env(&[("IDEMPOTENCY_MIN_REPLICAS", "two")])).unwrap_err();
        assert_eq!(bad.variable(), "IDEMPOTENCY_MIN_REPLICAS");
    }
}
