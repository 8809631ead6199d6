//! The checks across settings: [`Config::validate`].

use std::time::Duration;

use super::{Config, MAX_DURATION, SentinelUrl, format_duration, is_sentinel_url};
use crate::error::{ConfigError, redact_nodes, redact_url};
use crate::tls::Side;

impl Config {
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
            SentinelUrl::parse(&self.redis_url).map_err(|problem| {
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
}
