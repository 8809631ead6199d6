//! Dead-lettering that cannot lose a message: a copy, with
//! `x-idempotency-*` headers saying why, published on the consumer's
//! channel in confirm mode (mandatory, so an unroutable copy comes back);
//! the original is acked only once the broker confirmed the copy, and
//! requeued otherwise. The default target is a parking queue the runner
//! declares and owns, `{queue}.dead`.
//! The copy and its headers: [`super::copy`].
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

use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

use super::copy::{self, CONFIRM_TIMEOUT, MessageCopy, Target};
use crate::amqp::{Published, within};
use crate::config::DeadLetterTarget;
use crate::error::ServeError;
use crate::outcome::Outcome;

pub(crate) struct DeadLetters {
    channel: Channel,
    exchange: String,
    /// `None`: the message's own routing key.
    routing_key: Option<String>,
    /// The consumed queue, named in the copy's `x-idempotency-queue`.
    queue: String,
    /// Where copies go, for logs and errors.
    shown: String,
    /// The connection's negotiated `frame_max`, which every copy fits.
    frame_max: u32,
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
        frame_max: u32,
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
            within(CONFIRM_TIMEOUT, "queue.declare", declare)
                .await
                .map_err(|error| {
                    problem(format!(
                        "cannot declare it (durable, no arguments): {error}; if a queue of that \
                         name exists with other arguments, choose another name with \
                         IDEMPOTENCY_DEAD_LETTER_QUEUE (your own queue is never redeclared)"
                    ))
                })?;
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
            within(CONFIRM_TIMEOUT, "exchange.declare", check)
                .await
                .map_err(|error| {
                    problem(format!(
                        "{error}; declare it, or fix IDEMPOTENCY_DEAD_LETTER_EXCHANGE"
                    ))
                })?;
        }
        let confirm = channel.confirm_select(ConfirmSelectOptions::default());
        within(CONFIRM_TIMEOUT, "confirm.select", confirm)
            .await
            .map_err(|error| problem(format!("cannot put the channel in confirm mode: {error}")))?;
        Ok(Some(Arc::new(Self {
            channel: channel.clone(),
            exchange,
            routing_key,
            queue: queue.to_owned(),
            shown,
            frame_max,
        })))
    }

    /// Publishes the copy with its reason; true once the broker confirmed
    /// it and did not return it as unroutable.
    pub(crate) async fn publish(&self, copy: MessageCopy, outcome: &Outcome) -> bool {
        let target = Target {
            channel: &self.channel,
            exchange: &self.exchange,
            routing_key: self.routing_key.as_deref(),
            queue: &self.queue,
            shown: &self.shown,
            frame_max: self.frame_max,
        };
        let published = copy::publish(target, copy, outcome).await;
        match &published {
            Published::Confirmed => {}
            Published::Returned => {
                tracing::error!(target = %self.shown, "the dead-letter copy could not be routed (was the parking queue deleted?): requeueing the original");
            }
            other => {
                tracing::warn!(target = %self.shown, problem = %other, "the dead-letter copy was not confirmed: requeueing the original");
            }
        }
        published.is_confirmed()
    }
}
