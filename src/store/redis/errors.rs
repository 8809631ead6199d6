//! What a Redis error means for us: about the one key (dead-letter that
//! message) or systemic (pause consuming, fail-closed), whether the
//! connection is still usable, and what an operator should do about it.
//!
//! ```ignore
//! let failure = failure(err); // a READONLY reply, say
//! assert!(failure.unavailable);
//! assert!(failure.message.contains("read-only replica"));
//! ```

use redis::{ErrorKind, RedisError, Value};

use crate::error::StoreError;

/// A request's failure, before it is named after its operation and key.
#[derive(Clone)]
pub(super) struct Failure {
    pub(super) unavailable: bool,
    /// The server did not understand the command (`ERR syntax error`).
    pub(super) syntax: bool,
    /// The server does not know the script (`NOSCRIPT`).
    pub(super) noscript: bool,
    pub(super) message: String,
}

impl Failure {
    pub(super) fn unavailable(message: String) -> Self {
        Self {
            unavailable: true,
            syntax: false,
            noscript: false,
            message,
        }
    }
}

/// True for the errors that are about one key and nothing else: only those
/// may dead-letter a message. Everything else (an outage, refused
/// credentials, a missing permission, a full, read-only or loading server,
/// a cluster redirect, an old server) is systemic: consumption pauses until
/// a write succeeds.
pub(super) fn is_about_the_key(err: &RedisError) -> bool {
    err.code() == Some("WRONGTYPE")
}

/// True when the connection that produced `err` cannot be used any more:
/// it broke, or the server no longer accepts it as authenticated.
pub(super) fn breaks_connection(err: &RedisError) -> bool {
    err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_io_error()
        || err.is_unrecoverable_error()
        || err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("NOAUTH" | "WRONGPASS" | "READONLY"))
}

/// What an operator should do about a systemic error, if we can tell.
pub(super) fn remedy(err: &RedisError) -> Option<&'static str> {
    let text = err.to_string();
    let code = err.code().unwrap_or("");
    let remedy = if err.kind() == ErrorKind::AuthenticationFailed
        || matches!(code, "NOAUTH" | "WRONGPASS")
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
    {
        "Redis refused the credentials: put the right user and password in REDIS_URL \
         (redis://user:password@host:port)"
    } else if code == "NOPERM"
        || text.contains("NOPERM")
        || text.contains("The user executing the script can't")
    {
        "the Redis ACL user lacks a permission: grant the commands and key pattern listed \
         in docs/deployment.md (Least privilege)"
    } else if matches!(code, "MOVED" | "ASK" | "CROSSSLOT") {
        "REDIS_URL points at a Redis Cluster node: give the cluster's nodes in \
         REDIS_CLUSTER_NODES (and unset REDIS_URL) instead"
    } else if matches!(code, "CLUSTERDOWN" | "TRYAGAIN") {
        "the Redis Cluster is down or resharding: consumption resumes once it serves \
         the slot again"
    } else if code == "OOM" {
        "Redis is out of memory (maxmemory with noeviction): raise maxmemory or lower \
         IDEMPOTENCY_DONE_TTL; consumption resumes once a write succeeds"
    } else if code == "READONLY" {
        "Redis is a read-only replica (after a failover?): point REDIS_URL at the primary, \
         or at the sentinels (redis-sentinel://host:port,...#master) to follow failovers"
    } else if code == "MISCONF" {
        "Redis refuses writes because it cannot persist (stop-writes-on-bgsave-error): \
         fix its disk or persistence settings"
    } else if code == "NOREPLICAS" {
        "Redis has fewer replicas than min-replicas-to-write: bring the replicas back"
    } else if code == "LOADING" {
        "Redis is loading its dataset: consumption resumes when it is done"
    } else if code == "BUSY" {
        "Redis is busy running a slow script: wait, or SCRIPT KILL it"
    } else if code == "ERR" && (text.contains("syntax error") || text.contains("unknown command")) {
        "the server does not support `SET key value NX PX ms GET`: amqp-idempotency needs \
         Redis 7.0 or newer (or Valkey)"
    } else {
        return None;
    };
    Some(remedy)
}

pub(super) fn failure(err: RedisError) -> Failure {
    let message = match remedy(&err) {
        Some(remedy) => format!("{err} ({remedy})"),
        None => err.to_string(),
    };
    Failure {
        unavailable: !is_about_the_key(&err),
        syntax: err.code() == Some("ERR") && err.to_string().contains("syntax error"),
        noscript: err.code() == Some("NOSCRIPT"),
        message,
    }
}

pub(super) fn parse<T: redis::FromRedisValue>(
    operation: &'static str,
    key: &str,
    value: Value,
) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(|err| {
        StoreError::new(
            operation,
            key,
            true,
            format!(
                "unexpected reply from Redis: {err}; is REDIS_URL a Redis 7 (or newer) server?"
            ),
        )
    })
}
