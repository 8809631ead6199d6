//! Dead-lettering that cannot lose a message: a copy, with
//! `x-idempotency-*` headers saying why, published on the consumer's
//! channel in confirm mode (mandatory, so an unroutable copy comes back);
//! the original is acked only once the broker confirmed the copy, and
//! requeued otherwise. The default target is a parking queue the runner
//! declares and owns, `{queue}.dead`.
//!
//! ```no_run
//! use amqp_idempotency::{DeadLetterTarget, ServeOptions};
//! # fn options(channel: lapin::Channel) -> ServeOptions {
//! // The default: park dead letters in `{queue}.dead`; needs the channel.
//! ServeOptions::new().close_channel(channel)
//! # }
//! # fn exchange(channel: lapin::Channel) -> ServeOptions {
//! // Or publish them to an exchange of yours.
//! ServeOptions::new()
//!     .dead_letters(DeadLetterTarget::Exchange { exchange: "errors".into(), routing_key: None })
//!     .close_channel(channel)
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use crate::config::DeadLetterTarget;
use crate::outcome::Outcome;
use crate::runner::ServeError;

/// How long the exchange check, confirm.select and a confirm may take.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct DeadLetters {
    channel: Channel,
    exchange: String,
    /// `None`: the message's own routing key.
    routing_key: Option<String>,
    /// The consumed queue, named in the copy's `x-idempotency-queue`.
    queue: String,
    /// Where copies go, for logs and errors.
    shown: String,
}

pub(crate) struct DeadLetterCopy {
    pub(crate) routing_key: ShortString,
    pub(crate) properties: BasicProperties,
    pub(crate) data: Vec<u8>,
}

/// An unanswered channel request, as a lapin error.
fn unanswered(what: &'static str) -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
        lapin::ChannelState::Closed,
        what,
    ))
}

impl DeadLetters {
    /// Readies `target` for dead letters of `queue` on `channel`: declares
    /// the parking queue (durable, no arguments) or checks that the
    /// exchange exists, then puts the channel in confirm mode. `Ok(None)`
    /// means the broker's own dead-lettering (reject without requeue).
    /// Found out at start: a publish to a missing exchange would close the
    /// consumer's channel (404) on the first dead letter.
    pub(crate) async fn prepare(
        target: &DeadLetterTarget,
        channel: Option<&Channel>,
        queue: &str,
    ) -> Result<Option<Arc<Self>>, ServeError> {
        let (exchange, routing_key, shown) = match target {
            DeadLetterTarget::Broker => return Ok(None),
            DeadLetterTarget::ParkingQueue(name) => {
                let name = name.clone().unwrap_or_else(|| format!("{queue}.dead"));
                let shown = format!("the parking queue `{name}`");
                (String::new(), Some(name), shown)
            }
            DeadLetterTarget::Exchange {
                exchange,
                routing_key,
            } => {
                let shown = format!("the exchange `{exchange}`");
                (exchange.clone(), routing_key.clone(), shown)
            }
        };
        let problem = |problem: String| ServeError::DeadLetters {
            target: shown.clone(),
            problem,
        };
        let Some(channel) = channel else {
            return Err(problem(
                "the runner publishes dead letters on the consumer's channel: pass it with \
                 ServeOptions::channel or ServeOptions::close_channel, or opt into the broker's \
                 own dead-lettering (DeadLetterTarget::Broker, IDEMPOTENCY_DEAD_LETTERS=broker) \
                 for a queue with x-dead-letter-exchange"
                    .into(),
            ));
        };
        if exchange.is_empty() {
            let name = routing_key.as_deref().unwrap_or_default();
            let declare = channel.queue_declare(
                name.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            );
            match tokio::time::timeout(CONFIRM_TIMEOUT, declare).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    return Err(problem(format!(
                        "cannot declare it (durable, no arguments): {error}; if a queue of that \
                         name exists with other arguments, choose another name with \
                         IDEMPOTENCY_DEAD_LETTER_QUEUE (your own queue is never redeclared)"
                    )));
                }
                Err(_) => return Err(problem(unanswered("queue.declare").to_string())),
            }
        } else {
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
            match tokio::time::timeout(CONFIRM_TIMEOUT, check).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    return Err(problem(format!(
                        "{error}; declare it, or fix IDEMPOTENCY_DEAD_LETTER_EXCHANGE"
                    )));
                }
                Err(_) => return Err(problem(unanswered("exchange.declare").to_string())),
            }
        }
        let confirm = channel.confirm_select(ConfirmSelectOptions::default());
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(())) => Ok(Some(Arc::new(Self {
                channel: channel.clone(),
                exchange,
                routing_key,
                queue: queue.to_owned(),
                shown,
            }))),
            Ok(Err(error)) => Err(problem(format!(
                "cannot put the channel in confirm mode: {error}"
            ))),
            Err(_) => Err(problem(unanswered("confirm.select").to_string())),
        }
    }

    /// Publishes the copy with its reason; true once the broker confirmed
    /// it and did not return it as unroutable.
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
        headers.insert(
            "x-idempotency-queue".into(),
            AMQPValue::LongString(LongString::from(self.queue.as_str())),
        );
        let properties = copy.properties.with_headers(headers);
        let routing_key = match &self.routing_key {
            Some(key) => key.as_str().into(),
            None => copy.routing_key,
        };
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirmed = async {
            self.channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    routing_key,
                    options,
                    &copy.data,
                    properties,
                )
                .await?
                .await
        };
        let shown = &self.shown;
        let Ok(confirmed) = tokio::time::timeout(CONFIRM_TIMEOUT, confirmed).await else {
            tracing::warn!(target = %shown, "no publisher confirm for the dead-letter copy in time: requeueing the original");
            return false;
        };
        match confirmed {
            Ok(Confirmation::Ack(None)) => true,
            Ok(Confirmation::Ack(Some(_))) => {
                tracing::error!(target = %shown, "the dead-letter copy could not be routed (was the parking queue deleted?): requeueing the original");
                false
            }
            Ok(_) => {
                tracing::warn!(target = %shown, "the broker refused the dead-letter copy: requeueing the original");
                false
            }
            Err(err) => {
                tracing::warn!(target = %shown, error = %err, "publishing the dead-letter copy failed: requeueing the original");
                false
            }
        }
    }
}
