#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

pub mod amqp;
mod backoff;
mod batch;
mod config;
mod error;
pub mod fingerprint;
mod finish;
mod guard;
mod layer;
pub mod metrics;
pub mod outbox;
mod outcome;
mod report;
mod runner;
mod stopping;
pub mod store;
pub mod tls;
mod trace;

pub use config::{
    Config, DeadLetterTarget, NoFingerprintPolicy, RedisDeployment, StoreFailurePolicy,
    parse_duration,
};
pub use error::{
    BoxError, ConfigError, FailureKind, HandlerError, ServeError, StoreError, redact_url,
};
pub use guard::{Begin, ClaimGuard, Deduplicator, Skip};
pub use layer::{Idempotency, IdempotencyLayer};
pub use outcome::{Disposition, Outcome, OutcomeKind};
pub use report::ServeReport;
pub use runner::{ServeOptions, Session, serve, serve_reconnecting};
