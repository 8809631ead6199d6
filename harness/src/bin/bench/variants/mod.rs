//! The benchmark variants, and the consume loop that `raw` and `naive`
//! share:
//!
//! - `raw_single` (here) and `raw_multi` ([`raw`]): plain lapin consumers;
//! - [`naive`]: a deadpool-redis connection per command;
//! - `redis_floor` ([`floor`]): the two cheapest writes per message,
//!   pipelined like ours, acked like `raw_multi`: the Redis CPU floor;
//! - [`ours`]: the crate's runner and layer (`ours_outbox`: with an
//!   outbox; `ours_hold` and `ours_broker`: failing the `--failing` ids).

pub mod floor;
pub mod naive;
pub mod ours;
pub mod raw;

use std::sync::Arc;

use futures_util::StreamExt;
use harness::amqp::new_channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::meter::{Measured, Meter};
use crate::run::Ctx;
use crate::stats::{RunStats, latency_start, message_id};

/// A consumer under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    RawSingle,
    RawMulti,
    Naive,
    /// `SET NX PX` then `SET PX` per message, pipelined, no other logic.
    RedisFloor,
    Ours,
    /// ours with an outbox: the handler stages one message per delivery
    /// for a downstream queue.
    OursOutbox,
    /// Diagnostic, only when asked for: ours over the in-process
    /// `MemoryStore`, to separate the runner and layer from Redis.
    OursMemory,
    /// ours whose handler always fails the `--failing` ids (retryably),
    /// retrying with `IDEMPOTENCY_RETRY=hold`: held in the consumer for
    /// the backoff, then requeued.
    OursHold,
    /// The same with `IDEMPOTENCY_RETRY=broker`: a confirmed copy waits in
    /// a delay queue.
    OursBroker,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Self::RawSingle => "raw_single",
            Self::RawMulti => "raw_multi",
            Self::Naive => "naive",
            Self::RedisFloor => "redis_floor",
            Self::Ours => "ours",
            Self::OursOutbox => "ours_outbox",
            Self::OursMemory => "ours_mem",
            Self::OursHold => "ours_hold",
            Self::OursBroker => "ours_broker",
        }
    }

    /// How the variant retries the `--failing` ids, which its handler
    /// fails; `None` for the variants that process them as usual.
    pub fn retry(self) -> Option<amqp_idempotency::RetryMode> {
        match self {
            Self::OursHold => Some(amqp_idempotency::RetryMode::Hold),
            Self::OursBroker => Some(amqp_idempotency::RetryMode::Broker),
            _ => None,
        }
    }

    /// Whether the variant runs the crate's runner (`serve`).
    pub fn serves(self) -> bool {
        matches!(
            self,
            Self::Ours | Self::OursOutbox | Self::OursMemory | Self::OursHold | Self::OursBroker
        )
    }

    /// Whether the variant suppresses duplicates (raw runs every delivery).
    pub fn deduplicates(self) -> bool {
        matches!(
            self,
            Self::Naive
                | Self::RedisFloor
                | Self::Ours
                | Self::OursOutbox
                | Self::OursMemory
                | Self::OursHold
                | Self::OursBroker
        )
    }
}

pub async fn consume(channel: &Channel, queue: &str, prefetch: u16) -> Result<Consumer, String> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|err| format!("basic.qos failed: {err}"))?;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("basic.consume on `{queue}` failed: {err}"))
}

pub async fn stop_consumer(channel: &Channel, consumer: &Consumer) {
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let _ = channel.close(200, "OK".into()).await;
}

/// raw_single, raw_multi, naive and redis_floor: a consume loop that spawns one task per
/// delivery, at most `prefetch` at once, until every message is settled.
pub async fn drain_plain(
    ctx: &Ctx,
    variant: Variant,
    queue: &str,
    key_prefix: &str,
    stats: &Arc<RunStats>,
    ready: oneshot::Sender<()>,
) -> Result<Measured, String> {
    let pool = match (variant, &ctx.pool) {
        (Variant::Naive, None) => {
            return Err("naive needs a standalone Redis (REDIS_URL)".into());
        }
        (_, pool) => pool.clone(),
    };
    let floor = match variant {
        Variant::RedisFloor => Some(floor::Floor::start(
            floor_connection(ctx).await?,
            Arc::clone(stats),
        )),
        _ => None,
    };
    let channel = new_channel(&ctx.consume_conn).await?;
    let meter = Meter::start();
    let mut consumer = consume(&channel, queue, ctx.options.prefetch).await?;
    let _ = ready.send(());
    let slots = Arc::new(Semaphore::new(usize::from(ctx.options.prefetch)));
    let (finished_tx, finished_rx) = mpsc::unbounded_channel();
    let acks_multiple = matches!(variant, Variant::RawMulti | Variant::RedisFloor);
    let tracker = acks_multiple.then(|| {
        tokio::spawn(raw::ack_contiguous_prefix(
            channel.clone(),
            finished_rx,
            Arc::clone(stats),
        ))
    });
    let key_prefix: Arc<str> = key_prefix.into();
    let consume_loop = async {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return "the semaphore closed".to_owned();
            };
            let delivery = match consumer.next().await {
                None => return "the consumer was cancelled".to_owned(),
                Some(Err(err)) => return format!("the consumer failed: {err}"),
                Some(Ok(delivery)) => delivery,
            };
            let stats = Arc::clone(stats);
            match variant {
                Variant::RawSingle => {
                    tokio::spawn(async move {
                        let start = latency_start(&delivery);
                        stats.handle(message_id(&delivery)).await;
                        ack_one(&delivery, &stats, start).await;
                        drop(slot);
                    });
                }
                Variant::RawMulti => {
                    let finished = finished_tx.clone();
                    tokio::spawn(async move {
                        let start = latency_start(&delivery);
                        stats.handle(message_id(&delivery)).await;
                        let _ = finished.send((delivery.delivery_tag, start));
                        drop(slot);
                    });
                }
                Variant::Naive => {
                    let Some(pool) = pool.clone() else {
                        return "naive has no pool".to_owned();
                    };
                    let key_prefix = Arc::clone(&key_prefix);
                    tokio::spawn(async move {
                        let start = latency_start(&delivery);
                        naive::naive(&pool, &key_prefix, &delivery, &stats, start).await;
                        drop(slot);
                    });
                }
                Variant::RedisFloor => {
                    let Some(floor) = floor.clone() else {
                        return "redis_floor has no connection".to_owned();
                    };
                    let finished = finished_tx.clone();
                    let key = format!("{key_prefix}:{}", floor_key(&delivery));
                    tokio::spawn(async move {
                        let start = latency_start(&delivery);
                        floor::run(&floor, key, &delivery, &stats, start, &finished).await;
                        drop(slot);
                    });
                }
                Variant::Ours
                | Variant::OursOutbox
                | Variant::OursMemory
                | Variant::OursHold
                | Variant::OursBroker => {
                    return format!("{} runs through `serve`", variant.name());
                }
            }
        }
    };
    let result = tokio::select! {
        done = stats.wait_done() => done,
        failure = consume_loop => Err(failure),
    };
    let measured = meter.stop();
    drop(finished_tx);
    drop(floor);
    stop_consumer(&channel, &consumer).await;
    if let Some(tracker) = tracker {
        tracker.abort();
    }
    result.map(|()| measured)
}

/// redis_floor's own connection to the standalone Redis of `REDIS_URL`.
async fn floor_connection(ctx: &Ctx) -> Result<redis::aio::MultiplexedConnection, String> {
    if ctx.redis.cluster {
        return Err("redis_floor needs a standalone Redis (REDIS_URL)".into());
    }
    let shown = amqp_idempotency::redact_url(&ctx.options.redis_url);
    let client = redis::Client::open(ctx.options.redis_url.as_str())
        .map_err(|err| format!("REDIS_URL: `{shown}` is not a valid Redis URL: {err}"))?;
    tokio::time::timeout(
        harness::CONNECT_TIMEOUT,
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| format!("cannot reach Redis at {shown} for redis_floor: no answer"))?
    .map_err(|err| format!("cannot reach Redis at {shown} for redis_floor: {err}"))
}

/// The part of a redis_floor key that names the message: its
/// `message_id`, as in naive.
fn floor_key(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(|| "none".to_owned(), |id| id.as_str().to_owned())
}

pub async fn ack_one(delivery: &Delivery, stats: &RunStats, start: u64) {
    RunStats::count(&stats.ack_calls);
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => stats.settle(start),
        Ok(false) => {
            eprintln!("bench: ack of {} not sent", delivery.delivery_tag);
            RunStats::count(&stats.errors);
        }
        Err(err) => {
            eprintln!("bench: ack of {} failed: {err}", delivery.delivery_tag);
            RunStats::count(&stats.errors);
        }
    }
}
