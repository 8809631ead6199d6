//! Retries through the broker (`IDEMPOTENCY_RETRY=broker`, the default): a
//! retryable failure waits out its backoff in a delay queue, not in the
//! consumer's prefetch window.
//!
//! The runner declares one delay queue per step of the backoff schedule,
//! `{queue}.retry.<delay>` (`orders.retry.500ms`, `orders.retry.1s`, ...
//! up to `IDEMPOTENCY_RETRY_BACKOFF_MAX`), so that every message in a
//! queue waits the same time and none blocks another. Each is a durable
//! quorum queue whose `x-message-ttl` is its step and which dead-letters
//! back to `{queue}` through the default exchange: only the failing
//! consumer's queue sees the message again, not the other queues bound to
//! the exchange it was first published to. Dead-lettering is
//! `at-least-once` (with `x-overflow` `reject-publish`, which it needs), so
//! a broker failure while a message moves back cannot lose it; RabbitMQ
//! 3.10 or later.
//!
//! A failed delivery's copy ([`super::copy`]: body, properties, headers,
//! plus `x-idempotency-attempts` and the bounded reason) is published to
//! the queue of its delay, mandatory and confirmed; the original is acked
//! only once the copy is confirmed, and held then requeued as with
//! `hold` otherwise. The attempt count stays the record's.
//!
//! ```ignore
//! let retries = Retries::prepare(RetryMode::Broker, &config.retry_schedule(), Some(&channel), "orders", frame_max).await?;
//! assert_eq!(delay_queue("orders", Duration::from_secs(2)), "orders.retry.2s");
//! ```

use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use super::copy::{self, CONFIRM_TIMEOUT, MessageCopy, Target};
use crate::amqp::{Published, within};
use crate::config::{RetryMode, format_duration};
use crate::error::ServeError;
use crate::outcome::Outcome;

/// The delay queue of `queue` for `delay`: `{queue}.retry.<delay>`.
pub(crate) fn delay_queue(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", format_duration(delay))
}

/// The arguments of a delay queue of `delay` in front of `queue`.
fn delay_queue_arguments(queue: &str, delay: Duration) -> FieldTable {
    let text = |value: &str| AMQPValue::LongString(LongString::from(value));
    let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), text("quorum"));
    arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    arguments.insert("x-dead-letter-exchange".into(), text(""));
    arguments.insert("x-dead-letter-routing-key".into(), text(queue));
    arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    arguments.insert("x-overflow".into(), text("reject-publish"));
    arguments
}

/// The delay queues of one consumed queue, on the consumer's channel.
pub(crate) struct Retries {
    channel: Channel,
    queue: String,
    /// Each step of the schedule and its delay queue, shortest first.
    steps: Vec<(Duration, String)>,
    frame_max: u32,
}

impl Retries {
    /// Declares the delay queues of `queue` for `schedule` and puts the
    /// channel in confirm mode; `Ok(None)` with [`RetryMode::Hold`].
    pub(crate) async fn prepare(
        mode: RetryMode,
        schedule: &[Duration],
        channel: Option<&Channel>,
        queue: &str,
        frame_max: u32,
    ) -> Result<Option<Arc<Self>>, ServeError> {
        if mode == RetryMode::Hold || schedule.is_empty() {
            return Ok(None);
        }
        let Some(channel) = channel else {
            return Err(ServeError::RetryQueue {
                queue: delay_queue(queue, schedule[0]),
                problem: "the runner publishes retries on the consumer's channel: pass it with \
                          ServeOptions::channel or ServeOptions::close_channel, or hold failed \
                          deliveries in the consumer instead (RetryMode::Hold, \
                          IDEMPOTENCY_RETRY=hold)"
                    .into(),
            });
        };
        let mut steps = Vec::with_capacity(schedule.len());
        for &delay in schedule {
            let name = delay_queue(queue, delay);
            let declare = channel.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                delay_queue_arguments(queue, delay),
            );
            if let Err(error) = within(CONFIRM_TIMEOUT, "queue.declare", declare).await {
                return Err(ServeError::RetryQueue {
                    queue: name,
                    problem: format!(
                        "cannot declare it as a durable quorum queue with x-message-ttl {} ms, \
                         dead-lettering at-least-once to `{queue}` through the default \
                         exchange: {error}. It is the runner's own delay queue: if it exists \
                         with other arguments, delete it once it is empty and start again; the \
                         user needs the configure permission on it and write on the default \
                         exchange; quorum delay queues need RabbitMQ 3.10 or later. Or hold \
                         failed deliveries in the consumer instead (IDEMPOTENCY_RETRY=hold)",
                        delay.as_millis()
                    ),
                });
            }
            steps.push((delay, name));
        }
        let confirm = channel.confirm_select(ConfirmSelectOptions::default());
        if let Err(error) = within(CONFIRM_TIMEOUT, "confirm.select", confirm).await {
            return Err(ServeError::RetryQueue {
                queue: steps[0].1.clone(),
                problem: format!("cannot put the channel in confirm mode: {error}"),
            });
        }
        Ok(Some(Arc::new(Self {
            channel: channel.clone(),
            queue: queue.to_owned(),
            steps,
            frame_max,
        })))
    }

    /// The delay queue for a wait of `after`: the shortest step that is
    /// at least `after`, or the longest.
    fn queue_for(&self, after: Duration) -> &str {
        self.steps
            .iter()
            .find(|(step, _)| *step >= after)
            .or(self.steps.last())
            .map_or("", |(_, name)| name.as_str())
    }

    /// Publishes the failed delivery's copy to the delay queue for `after`;
    /// true once the broker confirmed it and routed it.
    pub(crate) async fn publish(
        &self,
        copy: MessageCopy,
        outcome: &Outcome,
        after: Duration,
    ) -> bool {
        let name = self.queue_for(after);
        let shown = format!("the delay queue `{name}`");
        let target = Target {
            channel: &self.channel,
            exchange: "",
            routing_key: Some(name),
            queue: &self.queue,
            shown: &shown,
            frame_max: self.frame_max,
        };
        let published = copy::publish(target, copy, outcome).await;
        match &published {
            Published::Confirmed => {}
            Published::Returned => {
                tracing::error!(target = %shown, "the retry copy could not be routed (was the delay queue deleted?): holding the original, then requeueing it");
            }
            other => {
                tracing::warn!(target = %shown, problem = %other, "the retry copy was not confirmed: holding the original, then requeueing it");
            }
        }
        published.is_confirmed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_queues_are_named_after_their_delay() {
        assert_eq!(
            delay_queue("orders", Duration::from_secs(2)),
            "orders.retry.2s"
        );
        assert_eq!(
            delay_queue("orders", Duration::from_millis(500)),
            "orders.retry.500ms"
        );
        assert_eq!(
            delay_queue("orders", Duration::from_millis(1500)),
            "orders.retry.1500ms"
        );
    }

    #[test]
    fn a_delay_queue_dead_letters_back_to_its_queue_at_least_once() {
        let arguments = delay_queue_arguments("orders", Duration::from_secs(2));
        let get = |name: &str| arguments.inner().get(name).cloned();
        let text = |value: &str| Some(AMQPValue::LongString(LongString::from(value)));
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongLongInt(2000)));
        assert_eq!(get("x-dead-letter-exchange"), text(""));
        assert_eq!(get("x-dead-letter-routing-key"), text("orders"));
        assert_eq!(get("x-dead-letter-strategy"), text("at-least-once"));
        assert_eq!(get("x-overflow"), text("reject-publish"));
        assert_eq!(get("x-queue-type"), text("quorum"));
    }
}
