#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

/// An item public with the `testing` feature (for the project's own tests,
/// benchmark and fault suite), crate-private otherwise.
macro_rules! pub_for_testing {
    ($(#[$meta:meta])* fn $($rest:tt)*) => {
        #[cfg(feature = "testing")]
        $(#[$meta])* pub fn $($rest)*
        #[cfg(not(feature = "testing"))]
        $(#[$meta])* pub(crate) fn $($rest)*
    };
}

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
pub mod records;
mod report;
mod runner;
mod stopping;
pub mod store;
mod tls;
mod trace;

#[cfg(feature = "testing")]
pub use config::parse_duration;
pub use config::{
    Config, DeadLetterTarget, NoFingerprintPolicy, RedisDeployment, RetryMode, StoreFailurePolicy,
};
#[cfg(feature = "testing")]
pub use error::redact_url;
pub use error::{BoxError, ConfigError, FailureKind, HandlerError, ServeError, StoreError};
pub use guard::{Begin, ClaimGuard, Deduplicator, Skip};
pub use layer::{Idempotency, IdempotencyLayer};
pub use outcome::{Disposition, Outcome, OutcomeKind};
pub use report::ServeReport;
pub use runner::{ServeOptions, Session, serve, serve_reconnecting};
pub use stopping::Stopping;

/// The pages under `docs/`, compiled by `cargo test --doc` only: their Rust
/// examples must build like the README's (every other code block there is
/// marked with its language, so it is not taken for Rust).
#[cfg(doctest)]
mod docs {
    #[doc = include_str!("../docs/guarantees.md")]
    struct Guarantees;
    #[doc = include_str!("../docs/outbox.md")]
    struct Outbox;
    #[doc = include_str!("../docs/retries.md")]
    struct Retries;
    #[doc = include_str!("../docs/deployment.md")]
    struct Deployment;
    #[doc = include_str!("../docs/operations.md")]
    struct Operations;
    #[doc = include_str!("../docs/metrics.md")]
    struct Metrics;
    #[doc = include_str!("../docs/performance.md")]
    struct Performance;
    #[doc = include_str!("../docs/reliability.md")]
    struct Reliability;
}
