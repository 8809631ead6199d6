//! Reaching the records through the library's records API
//! ([`amqp_idempotency::records::Records`]), from a runtime of our own,
//! and turning its errors into the CLI's exit codes and advice.

use std::future::Future;

use amqp_idempotency::StoreError;
use amqp_idempotency::records::Records;

use crate::Failure;
use crate::settings::Settings;

const START_REDIS: &str = "redis-server --daemonize yes --port 6379";

/// Runs `work` to completion on a single-threaded runtime.
pub(crate) fn block_on<T>(work: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| Failure::Redis(format!("cannot start the async runtime: {err}")))?;
    runtime.block_on(work)
}

/// Connects to the records `settings` name.
pub(crate) async fn connect(settings: &Settings) -> Result<Records, Failure> {
    Records::connect(&settings.config)
        .await
        .map_err(|err| redis_failure(settings, &err))
}

/// What the library said, without its "idempotency store ... failed" frame.
fn message(err: &StoreError) -> String {
    std::error::Error::source(err).map_or_else(|| err.to_string(), ToString::to_string)
}

/// A bad setting is a usage error (exit 2); anything else a Redis error
/// (exit 3), with what to do.
pub(crate) fn redis_failure(settings: &Settings, err: &StoreError) -> Failure {
    let message = message(err);
    if !err.is_unavailable() {
        let source = if settings.url_flag {
            "--redis-url"
        } else if settings.config.redis_cluster_nodes().is_empty() {
            "REDIS_URL"
        } else {
            "REDIS_CLUSTER_NODES"
        };
        return Failure::Usage(format!(
            "the Redis from {source} cannot be used: {message}; pass --redis-url or set REDIS_URL to \
             redis://[[user]:password@]host[:port][/db], or rediss://... with \
             REDIS_TLS_CA_FILE for TLS"
        ));
    }
    if message.starts_with("cannot reach") || err.operation() == "connect" {
        Failure::Redis(format!(
            "{message}. Is it running? Start a local one with `{START_REDIS}`, or point \
             --redis-url (or REDIS_URL, or REDIS_CLUSTER_NODES) at a running server; for \
             rediss://, REDIS_TLS_CA_FILE names the CA that signed its certificate."
        ))
    } else {
        Failure::Redis(message)
    }
}
