//! Connecting to RabbitMQ as a [`Config`](crate::Config) says: `amqp://`, or `amqps://`
//! with the TLS files of `AMQP_TLS_CA_FILE`, `AMQP_TLS_CERT_FILE` and
//! `AMQP_TLS_KEY_FILE`.
//!
//! ```no_run
//! use amqp_idempotency::{amqp, Config};
//! use lapin::ConnectionProperties;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // AMQP_URL=amqps://app:secret@rabbit.internal:5671/%2f
//! // AMQP_TLS_CA_FILE=/etc/idem/rabbit-ca.pem
//! let config = Config::from_env()?;
//! let connection = amqp::connect(&config, ConnectionProperties::default()).await?;
//! let channel = connection.create_channel().await?;
//! # drop(channel);
//! # Ok(())
//! # }
//! ```
//!
//! The broker's certificate is always verified, against `AMQP_TLS_CA_FILE`
//! when it is set and the platform's trusted roots otherwise; with a CA
//! file, only the CAs in it are trusted, and the files are read again for
//! each connection. A failed connection says which URL (password
//! hidden) and what to fix; a certificate that is not trusted names
//! `AMQP_TLS_CA_FILE`.
//!
//! Every message the library publishes (a parked dead letter, an outbox
//! message, a replayed one) goes out the same way: mandatory, on a channel
//! in confirm mode, and counts as sent only once the broker confirmed it
//! and did not return it ([`publish_confirmed`], [`Published`]).

mod connect;
mod publish;
mod request;

pub use self::connect::{ConnectError, connect};
pub use self::publish::{Published, publish_confirmed};
pub(crate) use self::request::within;
