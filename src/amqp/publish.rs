//! One publish-with-confirm for every message the library sends.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};

/// What became of a message published mandatory on a channel in confirm
/// mode: only [`Published::Confirmed`] means the broker has it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Published {
    /// Confirmed and routed to at least one queue.
    Confirmed,
    /// Confirmed, but returned as unroutable (no queue bound for it, or
    /// the queue was deleted): nobody has it.
    Returned,
    /// The broker refused it (`basic.nack`).
    Refused,
    /// The publish or its confirm failed: the channel or connection is gone.
    Failed(String),
    /// No confirm within the time allowed; the broker may still have it.
    Unconfirmed(Duration),
}

impl Published {
    /// True when the broker confirmed the message and routed it.
    pub fn is_confirmed(&self) -> bool {
        matches!(self, Self::Confirmed)
    }

    /// The confirm's answer, as what became of the message.
    pub(crate) fn of(answer: lapin::Result<Confirmation>) -> Self {
        match answer {
            Ok(Confirmation::Ack(None)) => Self::Confirmed,
            Ok(Confirmation::Ack(Some(_))) => Self::Returned,
            Ok(Confirmation::Nack(_)) => Self::Refused,
            Ok(Confirmation::NotRequested) => {
                Self::Failed("the channel is not in confirm mode".to_owned())
            }
            Err(err) => Self::Failed(err.to_string()),
        }
    }
}

impl std::fmt::Display for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Confirmed => f.write_str("confirmed"),
            Self::Returned => {
                f.write_str("returned as unroutable (does the queue exist and is it bound?)")
            }
            Self::Refused => f.write_str("refused by the broker (basic.nack)"),
            Self::Failed(err) => write!(f, "publishing failed: {err}"),
            Self::Unconfirmed(after) => write!(f, "no confirm within {after:?}"),
        }
    }
}

/// Publishes `body` with `properties` to `exchange` (`""`: the default
/// exchange, `routing_key` naming the queue), mandatory, and waits up to
/// `timeout` for the broker's confirm. `channel` must be in confirm mode
/// (`confirm_select`).
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Published {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirmed = async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                options,
                body,
                properties,
            )
            .await?
            .await
    };
    match tokio::time::timeout(timeout, confirmed).await {
        Ok(answer) => Published::of(answer),
        Err(_) => Published::Unconfirmed(timeout),
    }
}
