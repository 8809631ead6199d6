//! The consumer runner: [`serve`](super::serve) drives a lapin [`Consumer`] through a service.
//!
//! ```no_run
//! use std::convert::Infallible;
//! use amqp_idempotency::{serve, Config, IdempotencyLayer, ServeOptions, store::RedisStore};
//! use lapin::{options::{BasicConsumeOptions, BasicQosOptions}, types::FieldTable, ConnectionProperties};
//! use tower::{Layer, service_fn};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_env()?;
//! // amqps:// with AMQP_TLS_* works too.
//! let connection = amqp_idempotency::amqp::connect(&config, ConnectionProperties::default()).await?;
//! let channel = connection.create_channel().await?;
//! channel.basic_qos(config.prefetch(), BasicQosOptions::default()).await?;
//! let consumer = channel
//!     .basic_consume("orders".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
//!     .await?;
//! let store = RedisStore::connect(&config).await?;
//! let service = IdempotencyLayer::new(store, "orders", config.clone())?
//!     .layer(service_fn(|_delivery| async { Ok::<_, Infallible>(()) }));
//! let options = ServeOptions::from_config(&config)
//!     // Dead-letter copies go out on this connection: they must fit its frame_max.
//!     .frame_max(connection.configuration().frame_max())
//!     .close_channel(channel);
//! let report = serve(consumer, service, options).await?;
//! println!("acked {}", report.acked);
//! # Ok(())
//! # }
//! ```

mod consume;
mod copy;
mod dead_letter;
mod deliver;
mod options;
mod reconnecting;
mod retry;
mod settle;
mod shutdown;

use std::time::Duration;

pub use self::consume::serve;
pub use self::options::ServeOptions;
pub use self::reconnecting::{Session, serve_reconnecting};

/// How long a message whose dead-letter copy was not confirmed is held
/// before it is requeued.
pub(crate) const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// How long closing a channel or connection may take (a dead one may never answer).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
