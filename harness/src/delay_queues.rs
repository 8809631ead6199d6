//! The runner's delay queues (`IDEMPOTENCY_RETRY=broker`), seen from the
//! outside: their names, how many messages wait in them, and their removal
//! once a run is over.
//!
//! The runner declares `{queue}.retry.<delay>` for each step of the backoff
//! schedule (`IDEMPOTENCY_RETRY_BACKOFF` doubling up to
//! `IDEMPOTENCY_RETRY_BACKOFF_MAX`) as durable quorum queues without an
//! expiry, so a suite that consumes a fresh queue per run must delete them
//! itself. Deleting a quorum queue with at-least-once dead-lettering right
//! after it was declared can crash RabbitMQ 3.10's `rabbit_fifo_dlx_sup`
//! (every such declare then fails until it is restarted), so
//! [`remove`] deletes a delay queue only once it is empty and at least
//! [`SETTLE`] after the caller's last consumer stopped. (Not with
//! `if_empty`: quorum queues refuse it with a connection-level error.)
//!
//! ```
//! use std::time::Duration;
//! let ms = Duration::from_millis;
//! assert_eq!(
//!     harness::delay_queues::names("orders", ms(500), ms(2000)),
//!     ["orders.retry.500ms", "orders.retry.1s", "orders.retry.2s"]
//! );
//! ```

use std::time::{Duration, Instant};

use lapin::Connection;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

/// How long after the last declare a delay queue is left alone before it is deleted.
pub const SETTLE: Duration = Duration::from_secs(5);

/// The runner's name for a delay of `delay`: `500ms`, `2s`, `1h` (its
/// `format_duration`, which is internal to the library).
pub fn format_delay(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms > 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The backoff schedule: `backoff` doubling up to `max`, each step once.
pub fn schedule(backoff: Duration, max: Duration) -> Vec<Duration> {
    let mut steps: Vec<Duration> = Vec::new();
    let mut step = backoff.min(max);
    while steps.last() != Some(&step) && steps.len() < 64 {
        steps.push(step);
        step = step.saturating_mul(2).min(max);
    }
    steps
}

/// The delay queues of `queue` for that schedule, shortest first.
pub fn names(queue: &str, backoff: Duration, max: Duration) -> Vec<String> {
    schedule(backoff, max)
        .into_iter()
        .map(|step| format!("{queue}.retry.{}", format_delay(step)))
        .collect()
}

/// Messages waiting in `queue` (ready ones: a delay queue has no
/// consumer); `None` when the queue does not exist or cannot be asked
/// (each question uses a channel of its own, which a missing queue closes).
pub async fn waiting(connection: &Connection, queue: &str) -> Option<u32> {
    let channel = connection.create_channel().await.ok()?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = channel.close(200, "OK".into()).await;
    Some(declared.message_count())
}

/// Messages waiting in all of `queues` (missing ones count 0).
pub async fn waiting_in_all(connection: &Connection, queues: &[String]) -> u32 {
    let mut total = 0;
    for queue in queues {
        total += waiting(connection, queue).await.unwrap_or(0);
    }
    total
}

/// Deletes `queues` once each is empty (waiting up to `patience` for
/// that), no sooner than [`SETTLE`] after `last_declare`; a queue that does
/// not empty in time is left and named in the result. Returns
/// (deleted, left behind with the reason).
pub async fn remove(
    connection: &Connection,
    queues: &[String],
    last_declare: Instant,
    patience: Duration,
) -> (usize, Vec<String>) {
    let settle_until = last_declare + SETTLE;
    if let Some(wait) = settle_until.checked_duration_since(Instant::now()) {
        tokio::time::sleep(wait).await;
    }
    let deadline = Instant::now() + patience;
    let mut deleted = 0;
    let mut left = Vec::new();
    for queue in queues {
        loop {
            match waiting(connection, queue).await {
                None => break, // never declared (or already gone)
                Some(0) => {
                    let deleted_now = match connection.create_channel().await {
                        Ok(channel) => {
                            let result = channel
                                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                                .await;
                            let _ = channel.close(200, "OK".into()).await;
                            result.map_err(|err| err.to_string())
                        }
                        Err(err) => Err(err.to_string()),
                    };
                    match deleted_now {
                        Ok(_) => deleted += 1,
                        Err(err) => left.push(format!("{queue} ({err})")),
                    }
                    break;
                }
                Some(n) if Instant::now() >= deadline => {
                    left.push(format!("{queue} ({n} messages still waiting)"));
                    break;
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    (deleted, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_doubles_up_to_the_cap_each_step_once() {
        let ms = Duration::from_millis;
        assert_eq!(
            schedule(ms(50), ms(400)),
            [ms(50), ms(100), ms(200), ms(400)]
        );
        assert_eq!(schedule(ms(300), ms(1000)), [ms(300), ms(600), ms(1000)]);
        assert_eq!(schedule(ms(100), ms(100)), [ms(100)]);
        assert_eq!(
            names("q", ms(500), Duration::from_secs(30))
                .last()
                .map(String::as_str),
            Some("q.retry.30s")
        );
        assert_eq!(format_delay(ms(1500)), "1500ms");
        assert_eq!(format_delay(Duration::from_secs(7200)), "2h");
    }
}
