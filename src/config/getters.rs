//! Reading a [`Config`] back: one getter per setting, named like the
//! setting's variable (`IDEMPOTENCY_LEASE_TTL` is set with
//! [`Config::with_lease_ttl`] and read with [`Config::lease_ttl`]).
//!
//! ```
//! use std::time::Duration;
//! use amqp_idempotency::Config;
//!
//! let config = Config::default().with_lease_ttl(Duration::from_secs(10));
//! assert_eq!(config.lease_ttl(), Duration::from_secs(10));
//! assert_eq!(config.prefetch(), 64);
//! ```

use std::path::Path;
use std::time::Duration;

use super::{Config, DeadLetterTarget, NoFingerprintPolicy, RetryMode, StoreFailurePolicy};
use crate::tls::TlsFiles;

impl Config {
    /// `REDIS_URL`: a standalone server, a primary, or a
    /// `redis-sentinel://` URL. Not used when cluster nodes are set; see
    /// [`redis_deployment`](Self::redis_deployment).
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// `REDIS_CLUSTER_NODES`: the Redis Cluster seed nodes; empty when not a cluster.
    pub fn redis_cluster_nodes(&self) -> &[String] {
        &self.redis_cluster_nodes
    }

    /// `AMQP_URL`: the broker.
    pub fn amqp_url(&self) -> &str {
        &self.amqp_url
    }

    /// `REDIS_TLS_CA_FILE`.
    pub fn redis_tls_ca_file(&self) -> Option<&Path> {
        self.redis_tls.ca_file()
    }

    /// `REDIS_TLS_CERT_FILE`.
    pub fn redis_tls_cert_file(&self) -> Option<&Path> {
        self.redis_tls.cert_file()
    }

    /// `REDIS_TLS_KEY_FILE`.
    pub fn redis_tls_key_file(&self) -> Option<&Path> {
        self.redis_tls.key_file()
    }

    /// `AMQP_TLS_CA_FILE`.
    pub fn amqp_tls_ca_file(&self) -> Option<&Path> {
        self.amqp_tls.ca_file()
    }

    /// `AMQP_TLS_CERT_FILE`.
    pub fn amqp_tls_cert_file(&self) -> Option<&Path> {
        self.amqp_tls.cert_file()
    }

    /// `AMQP_TLS_KEY_FILE`.
    pub fn amqp_tls_key_file(&self) -> Option<&Path> {
        self.amqp_tls.key_file()
    }

    /// The three `REDIS_TLS_*` files together.
    pub(crate) fn redis_tls(&self) -> &TlsFiles {
        &self.redis_tls
    }

    /// The three `AMQP_TLS_*` files together.
    pub(crate) fn amqp_tls(&self) -> &TlsFiles {
        &self.amqp_tls
    }

    /// `IDEMPOTENCY_KEY_PREFIX`.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// `IDEMPOTENCY_SCOPE`; `None`: the queue name.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// `IDEMPOTENCY_LEASE_TTL`.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// `IDEMPOTENCY_DONE_TTL`.
    pub fn done_ttl(&self) -> Duration {
        self.done_ttl
    }

    /// `IDEMPOTENCY_HANDLER_TIMEOUT`.
    pub fn handler_timeout(&self) -> Duration {
        self.handler_timeout
    }

    /// `IDEMPOTENCY_PREFETCH`: the channel's prefetch and the runner's concurrency.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
    }

    /// `IDEMPOTENCY_IN_PROGRESS_WAIT`.
    pub fn in_progress_wait(&self) -> Duration {
        self.in_progress_wait
    }

    /// `IDEMPOTENCY_MAX_ATTEMPTS`.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// `IDEMPOTENCY_RETRY_BACKOFF`.
    pub fn retry_backoff(&self) -> Duration {
        self.retry_backoff
    }

    /// `IDEMPOTENCY_RETRY_BACKOFF_MAX`.
    pub fn retry_backoff_max(&self) -> Duration {
        self.retry_backoff_max
    }

    /// `IDEMPOTENCY_ON_STORE_ERROR`.
    pub fn on_store_error(&self) -> StoreFailurePolicy {
        self.on_store_error
    }

    /// `IDEMPOTENCY_ON_MISSING_FINGERPRINT`.
    pub fn on_missing_fingerprint(&self) -> NoFingerprintPolicy {
        self.on_missing_fingerprint
    }

    /// `IDEMPOTENCY_VERIFY_PAYLOAD`.
    pub fn verify_payload(&self) -> bool {
        self.verify_payload
    }

    /// `IDEMPOTENCY_MAX_BODY_BYTES`; `None`: no limit.
    pub fn max_body_bytes(&self) -> Option<usize> {
        self.max_body_bytes
    }

    /// `IDEMPOTENCY_OUTBOX_MAX_BYTES`.
    pub fn outbox_max_bytes(&self) -> usize {
        self.outbox_max_bytes
    }

    /// `IDEMPOTENCY_CONSUMER_TIMEOUT`.
    pub fn consumer_timeout(&self) -> Duration {
        self.consumer_timeout
    }

    /// `IDEMPOTENCY_MIN_REPLICAS`.
    pub fn min_replicas(&self) -> u32 {
        self.min_replicas
    }

    /// `IDEMPOTENCY_REPLICA_TIMEOUT`.
    pub fn replica_timeout(&self) -> Duration {
        self.replica_timeout
    }

    /// `IDEMPOTENCY_DEAD_LETTERS` with `IDEMPOTENCY_DEAD_LETTER_QUEUE`,
    /// `_EXCHANGE` and `_ROUTING_KEY`.
    pub fn dead_letters(&self) -> &DeadLetterTarget {
        &self.dead_letters
    }

    /// `IDEMPOTENCY_RETRY`.
    pub fn retry(&self) -> RetryMode {
        self.retry
    }
}
