//! Dead-lettering with a reason: a copy of the message, with
//! `x-idempotency-*` headers, published on a confirm-mode channel; the
//! original is acked only once the broker confirmed the copy.
//!
//! ```no_run
//! use amqp_idempotency::ServeOptions;
//! // Dead letters go to `orders.dlx` with their reason; needs the channel.
//! # fn options(channel: lapin::Channel) -> ServeOptions {
//! ServeOptions::new().dead_letter_exchange("orders.dlx").close_channel(channel)
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use crate::outcome::Outcome;
use crate::runner::ServeError;

/// How long the exchange check, confirm.select and a confirm may take.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct DeadLetters {
    channel: Channel,
    exchange: String,
}

pub(crate) struct DeadLetterCopy {
    pub(crate) routing_key: ShortString,
    pub(crate) properties: BasicProperties,
    pub(crate) data: Vec<u8>,
}

impl DeadLetters {
    /// Checks that `exchange` exists and puts the channel in confirm mode.
    /// A publish to a missing exchange would close the consumer's channel
    /// (404) on the first dead letter, so that is found out at start.
    pub(crate) async fn prepare(
        exchange: Option<String>,
        channel: Option<&Channel>,
    ) -> Result<Option<Arc<Self>>, ServeError> {
        let (exchange, channel) = match (exchange, channel) {
            (Some(exchange), Some(channel)) => (exchange, channel),
            (Some(_), None) => {
                tracing::warn!(
                    "dead_letter_exchange needs the channel (ServeOptions::channel): dead letters are rejected instead"
                );
                return Ok(None);
            }
            (None, _) => return Ok(None),
        };
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let check = channel.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            passive,
            FieldTable::default(),
        );
        let unanswered = || {
            lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closed,
                "exchange.declare",
            ))
        };
        match tokio::time::timeout(CONFIRM_TIMEOUT, check).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(ServeError::DeadLetterExchange { exchange, error }),
            Err(_) => {
                let error = unanswered();
                return Err(ServeError::DeadLetterExchange { exchange, error });
            }
        }
        let confirm = channel.confirm_select(ConfirmSelectOptions::default());
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(())) => Ok(Some(Arc::new(Self {
                channel: channel.clone(),
                exchange,
            }))),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot put the channel in confirm mode: dead letters are rejected to the queue's own dead-letter exchange");
                Ok(None)
            }
            Err(_) => {
                tracing::warn!(
                    "no answer to confirm.select: dead letters are rejected to the queue's own dead-letter exchange"
                );
                Ok(None)
            }
        }
    }

    /// Publishes the copy with its reason; true once the broker confirmed it.
    pub(crate) async fn publish(&self, copy: DeadLetterCopy, outcome: &Outcome) -> bool {
        let mut headers = copy.properties.headers().clone().unwrap_or_default();
        let reason = outcome.reason().unwrap_or(outcome.kind().as_str());
        headers.insert(
            "x-idempotency-outcome".into(),
            AMQPValue::LongString(LongString::from(outcome.kind().as_str())),
        );
        headers.insert(
            "x-idempotency-reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            "x-idempotency-attempts".into(),
            AMQPValue::LongLongInt(i64::from(outcome.attempt())),
        );
        let properties = copy.properties.with_headers(headers);
        let confirmed = async {
            self.channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    copy.routing_key,
                    BasicPublishOptions::default(),
                    &copy.data,
                    properties,
                )
                .await?
                .await
        };
        let Ok(confirmed) = tokio::time::timeout(CONFIRM_TIMEOUT, confirmed).await else {
            tracing::warn!(exchange = %self.exchange, "no publisher confirm for the dead-letter copy in time: rejecting the original instead");
            return false;
        };
        match confirmed {
            Ok(confirmation) if confirmation.is_ack() => true,
            Ok(_) => {
                tracing::warn!(exchange = %self.exchange, "the broker refused the dead-letter copy: rejecting the original instead");
                false
            }
            Err(err) => {
                tracing::warn!(exchange = %self.exchange, error = %err, "publishing the dead-letter copy failed: rejecting the original instead");
                false
            }
        }
    }
}
