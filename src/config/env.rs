//! Reading a [`Config`] from the environment: one table of the variables,
//! the reading, and the check for names that are not ours.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use super::{Config, DeadLetterTarget, NoFingerprintPolicy, RetryMode, StoreFailurePolicy};
use crate::error::{ConfigError, redact_nodes, redact_url};
use crate::tls::{Side, TlsFiles};

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
    "IDEMPOTENCY_RETRY",
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
    /// assert_eq!(config.min_replicas(), 1);
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
        if let Some(value) = get("IDEMPOTENCY_RETRY") {
            config.retry = match value.trim() {
                "broker" => RetryMode::Broker,
                "hold" => RetryMode::Hold,
                _ => {
                    return Err(ConfigError::invalid(
                        "IDEMPOTENCY_RETRY",
                        &value,
                        "`broker` (a copy waits in a delay queue) or `hold` (the delivery is held, then requeued)",
                    ));
                }
            };
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
    }) && !is_service_link(name)
}

/// True for the variables Kubernetes (and Docker's legacy links) set for
/// every Service of a pod's namespace: `<SERVICE>_SERVICE_HOST`,
/// `<SERVICE>_SERVICE_PORT[_<NAME>]` and `<SERVICE>_PORT[_<N>_<PROTO>[_ADDR|_PORT|_PROTO]]`.
/// A Service named `redis-cluster` or `redis-sentinel` sets
/// `REDIS_CLUSTER_SERVICE_HOST` and the like, which are not typos of ours.
fn is_service_link(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    if upper.ends_with("_SERVICE_HOST") || upper.contains("_SERVICE_PORT") {
        return true;
    }
    // `<SERVICE>_PORT`, or `<SERVICE>_PORT_<N>_<PROTO>` with an optional
    // `_ADDR`, `_PORT` or `_PROTO` after it.
    let Some((_, after)) = upper.rsplit_once("_PORT") else {
        return false;
    };
    if after.is_empty() {
        return true;
    }
    let mut parts = after.trim_start_matches('_').split('_');
    let number = parts
        .next()
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let protocol = parts
        .next()
        .is_some_and(|p| matches!(p, "TCP" | "UDP" | "SCTP"));
    let rest: Vec<&str> = parts.collect();
    number && protocol && (rest.is_empty() || matches!(rest[..], ["ADDR"] | ["PORT"] | ["PROTO"]))
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

pub_for_testing! {
    /// Parses `500ms`, `30s`, `5m`, `24h` or `7d`. Zero and unitless values are refused.
    fn parse_duration(text: &str) -> Option<Duration> {
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
