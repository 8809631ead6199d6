//! How many replicas must acknowledge each write (`WAIT`, from
//! `IDEMPOTENCY_MIN_REPLICAS`), and the failure when fewer do.
//!
//! ```ignore
//! let replication = Replication::of(&config);
//! if let Some(wait) = replication.wait() {
//!     pipe.add_command(wait); // one WAIT after a pipeline's writes
//! }
//! ```

use std::time::Duration;

use redis::{AsyncConnectionConfig, Cmd, Value};

use super::errors::Failure;
use super::{RedisStore, millis};
use crate::config::Config;

/// How many replicas must acknowledge each write (`WAIT`), and for how long
/// to wait for them.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Replication {
    replicas: u32,
    pub(super) timeout: Duration,
}

impl Replication {
    pub(super) fn of(config: &Config) -> Self {
        let (replicas, timeout) = (config.min_replicas(), config.replica_timeout());
        Self { replicas, timeout }
    }

    /// The timeouts of a plain connection whose writes wait for these
    /// replicas: a reply may take the `WAIT` on top of the usual time.
    pub(super) fn connection_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RedisStore::RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RedisStore::RESPONSE_TIMEOUT + self.timeout))
    }

    /// `WAIT replicas timeout`, or nothing when no replica is asked for.
    pub(super) fn wait(&self) -> Option<Cmd> {
        (self.replicas > 0).then(|| {
            let mut wait = redis::cmd("WAIT");
            wait.arg(self.replicas).arg(millis(self.timeout));
            wait
        })
    }

    /// The answer of a write that `WAIT` answered with `reply`: `None` when
    /// enough replicas have it.
    pub(super) fn shortfall(&self, reply: &redis::RedisResult<Value>) -> Option<Failure> {
        let confirmed = match reply {
            Ok(Value::Int(n)) => *n,
            Ok(_) | Err(_) => -1,
        };
        if confirmed >= i64::from(self.replicas) {
            return None;
        }
        crate::metrics::unreplicated();
        let found = match reply {
            Err(err) => format!("WAIT failed: {err}"),
            _ => format!("{} confirmed", confirmed.max(0)),
        };
        tracing::warn!(
            replicas = self.replicas,
            confirmed,
            "a write was not confirmed by enough replicas; it is retried and its message held"
        );
        Some(Failure::unavailable(format!(
            "the write reached fewer replicas than IDEMPOTENCY_MIN_REPLICAS={} within \
             IDEMPOTENCY_REPLICA_TIMEOUT ({:?}; {found}): a failover could lose it, so the \
             message is held and the write retried until they confirm; bring the replicas back \
             or lower IDEMPOTENCY_MIN_REPLICAS",
            self.replicas, self.timeout
        )))
    }
}
