//! Error types, each named after what owns it.
//!
//! ```
//! use amqp_idempotency::{FailureKind, HandlerError};
//!
//! let err = HandlerError::permanent("order 42 references an unknown customer");
//! assert_eq!(err.kind(), FailureKind::Permanent);
//! assert!(err.to_string().contains("order 42"));
//! ```

use std::fmt;

pub_for_testing! {
    /// `url` with its password replaced by `***`, for error messages and logs:
    /// `redis://user:secret@host/0` becomes `redis://user:***@host/0`.
    ///
    /// ```ignore
    /// use amqp_idempotency::redact_url;
    /// assert_eq!(redact_url("amqp://guest:guest@rabbit:5672/%2f"), "amqp://guest:***@rabbit:5672/%2f");
    /// assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    /// // Malformed URLs too: a password with a `/` or `@` in it, a missing `//`.
    /// assert_eq!(redact_url("rediss://idem:pa/ss@word@host:6380"), "rediss://idem:***@host:6380");
    /// assert_eq!(redact_url("amqp:guest:secret@host"), "amqp:guest:***@host");
    /// ```
    fn redact_url(url: &str) -> String {
        // The credentials end at the last `@`, wherever it is: a password that
        // was not percent-encoded may hold `/`, `?`, `#` or `@`, and hiding too
        // much of a malformed URL is better than showing a password.
        let (head, rest, slashes) = match url.split_once("://") {
            Some((scheme, rest)) => (format!("{scheme}://"), rest, true),
            None => match url.split_once(':') {
                Some((scheme, rest)) => (format!("{scheme}:"), rest, false),
                None => return url.to_owned(),
            },
        };
        let Some((credentials, after)) = rest.rsplit_once('@') else {
            return url.to_owned();
        };
        match credentials.split_once(':') {
            Some((user, _password)) => format!("{head}{user}:***@{after}"),
            // `scheme://user@host` names a user only.
            None if slashes => url.to_owned(),
            // `user:password@host`, without a scheme: what follows the `:` is a password.
            None => format!("{head}***@{after}"),
        }
    }
}

/// A type-erased error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whether a failed handler should be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// A transient failure: the claim is released and the message requeued
    /// (with a backoff, up to the configured number of attempts).
    Retryable,
    /// A failure that no retry can fix: the claim is released and the
    /// message is rejected without requeue, so it reaches the dead-letter
    /// exchange.
    Permanent,
}

/// The error a business handler returns to say how it failed.
///
/// A handler's error type only has to convert into [`BoxError`]. If the
/// boxed error is a `HandlerError` its [`kind`](Self::kind) is honoured;
/// any other error counts as [`FailureKind::Retryable`], because a
/// redelivery is recoverable and a lost message is not.
#[derive(Debug)]
pub struct HandlerError {
    kind: FailureKind,
    source: BoxError,
}

impl HandlerError {
    /// A transient failure: release the claim and requeue the message.
    pub fn retryable(source: impl Into<BoxError>) -> Self {
        Self {
            kind: FailureKind::Retryable,
            source: source.into(),
        }
    }

    /// A failure no retry can fix: release the claim and dead-letter the message.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            kind: FailureKind::Permanent,
            source: source.into(),
        }
    }

    /// How the handler failed.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The underlying error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }

    /// Classifies any handler error: a boxed `HandlerError` keeps its kind,
    /// anything else is retryable.
    pub(crate) fn classify(error: BoxError) -> Self {
        match error.downcast::<HandlerError>() {
            Ok(handler_error) => *handler_error,
            Err(other) => Self::retryable(other),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FailureKind::Retryable => "retryable",
            FailureKind::Permanent => "permanent",
        };
        write!(f, "{kind} handler failure: {}", self.source)
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A store operation failed.
///
/// [`is_unavailable`](Self::is_unavailable) tells a store that cannot be
/// used right now (unreachable, or refusing writes for a reason that is not
/// about this key) from an error about this one key.
#[derive(Debug)]
pub struct StoreError {
    operation: &'static str,
    key: String,
    unavailable: bool,
    source: BoxError,
}

impl StoreError {
    /// A store error for `operation` on `key`.
    pub fn new(
        operation: &'static str,
        key: impl Into<String>,
        unavailable: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Self {
            operation,
            key: key.into(),
            unavailable,
            source: source.into(),
        }
    }

    /// The operation that failed: `claim`, `renew`, `complete`, `release`, `ping`...
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// The key the operation was about (empty for `ping` and `connect`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// True when the store cannot be used right now: unreachable, timed
    /// out, or refusing every write (wrong password, missing ACL
    /// permission, out of memory, read-only replica, loading, a cluster
    /// node, a server too old). The outcome of the operation may be
    /// unknown. Consumption pauses (fail-closed) until a write succeeds;
    /// no message is dead-lettered for it.
    ///
    /// False only for an error about this one key (it holds a value of
    /// another type, say): that message alone is dead-lettered.
    pub fn is_unavailable(&self) -> bool {
        self.unavailable
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "idempotency store {} failed", self.operation)?;
        if !self.key.is_empty() {
            write!(f, " for key `{}`", self.key)?;
        }
        write!(f, ": {}", self.source)?;
        if self.unavailable && self.operation != "connect" {
            write!(
                f,
                " (the store cannot be used: consumption pauses, and no message is processed \
                 or dead-lettered, until a write to Redis at REDIS_URL succeeds)"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A configuration value was missing, malformed or inconsistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    variable: String,
    value: String,
    expected: String,
}

impl ConfigError {
    pub(crate) fn invalid(
        variable: impl Into<String>,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Self {
            variable: variable.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }

    /// The environment variable (or builder setting) at fault.
    pub fn variable(&self) -> &str {
        &self.variable
    }

    /// The value that was refused.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// What would have been accepted.
    pub fn expected(&self) -> &str {
        &self.expected
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: {}={:?}: expected {}",
            self.variable, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

/// Comma-separated URLs with their passwords hidden.
pub(crate) fn redact_nodes(nodes: &str) -> String {
    nodes
        .split(',')
        .map(|node| redact_url(node.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Why [`serve`](crate::serve) stopped early.
#[derive(Debug)]
pub enum ServeError {
    /// The consumer failed (connection or channel lost). Unsettled
    /// deliveries return to the queue; reconnect and serve again.
    Consumer(lapin::Error),
    /// The service failed to become ready.
    Service(BoxError),
    /// The dead-letter target cannot be used: the parking queue cannot be
    /// declared, the exchange does not exist (the check closes the
    /// channel), or there is no channel to publish on. Checked at start,
    /// before any delivery is taken.
    DeadLetters {
        /// The parking queue or exchange, as shown in the message.
        target: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A delay queue for retries through the broker cannot be used
    /// (`IDEMPOTENCY_RETRY=broker`): it exists with other arguments, the
    /// user may not declare it, or there is no channel to publish on.
    /// Checked at start, before any delivery is taken.
    RetryQueue {
        /// The delay queue, `{queue}.retry.<delay>`.
        queue: String,
        /// What is wrong and what to do.
        problem: String,
    },
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Consumer(err) => write!(
                f,
                "the RabbitMQ consumer stopped: {err}; unacked messages return to the queue, reconnect to resume"
            ),
            Self::Service(err) => write!(f, "the handler service failed to become ready: {err}"),
            Self::DeadLetters { target, problem } => {
                write!(f, "dead letters cannot go to {target}: {problem}")
            }
            Self::RetryQueue { queue, problem } => {
                write!(
                    f,
                    "retries cannot wait in the delay queue `{queue}`: {problem}"
                )
            }
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Consumer(err) => Some(err),
            Self::Service(err) => Some(&**err),
            Self::DeadLetters { .. } | Self::RetryQueue { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_keeps_the_kind_of_a_handler_error() {
        let boxed: BoxError = Box::new(HandlerError::permanent("bad input"));
        assert_eq!(HandlerError::classify(boxed).kind(), FailureKind::Permanent);
    }

    #[test]
    fn classify_treats_foreign_errors_as_retryable() {
        let boxed: BoxError = "connection reset".into();
        let classified = HandlerError::classify(boxed);
        assert_eq!(classified.kind(), FailureKind::Retryable);
        assert!(classified.to_string().contains("connection reset"));
    }

    #[test]
    fn redact_url_hides_every_password() {
        for (url, shown) in [
            ("redis://u:secret@h:1/0", "redis://u:***@h:1/0"),
            ("redis://:secret@h", "redis://:***@h"),
            ("rediss://u:sec@ret@h:6380", "rediss://u:***@h:6380"),
            ("amqps://u:se/cr?et@h/%2f", "amqps://u:***@h/%2f"),
            ("amqp:u:secret@h", "amqp:u:***@h"),
            ("redis://user@h", "redis://user@h"),
            ("redis://h:6379/0", "redis://h:6379/0"),
            ("u:secret@h:6379", "u:***@h:6379"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn config_error_names_variable_value_and_expectation() {
        let err = ConfigError::invalid("IDEMPOTENCY_LEASE_TTL", "soon", "a duration like 30s");
        let text = err.to_string();
        assert!(text.contains("IDEMPOTENCY_LEASE_TTL"), "{text}");
        assert!(text.contains("\"soon\""), "{text}");
        assert!(text.contains("a duration like 30s"), "{text}");
    }
}
