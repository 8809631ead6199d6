//! Publishing the plan: pre-filling a queue (batches of pipelined publishes,
//! then their confirms), or publishing at a fixed rate while a variant
//! drains (open loop), each message stamped with its publish time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use harness::amqp::check_confirm;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tokio::sync::oneshot;

use crate::meter::now_ns;
use crate::plan::{Plan, body};
use crate::run::Ctx;

/// Header carrying the publish time (nanoseconds since the harness started) in open-loop mode.
pub const SENT_HEADER: &str = "x-bench-sent-ns";
/// Messages published before their confirms are awaited while pre-filling.
const PUBLISH_BATCH: usize = 2000;

pub fn properties(id: u32, sent_ns: Option<u64>) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_message_id(id.to_string().into())
        .with_delivery_mode(1);
    match sent_ns {
        None => properties,
        Some(ns) => {
            let mut headers = FieldTable::default();
            headers.insert(
                SENT_HEADER.into(),
                AMQPValue::LongLongInt(i64::try_from(ns).unwrap_or(i64::MAX)),
            );
            properties.with_headers(headers)
        }
    }
}

/// Pre-fills `queue`: batches of pipelined publishes, then their confirms.
pub async fn prefill(ctx: &Ctx, queue: &str) -> Result<(), String> {
    let channel = &ctx.publish_channel;
    for chunk in ctx.plan.ids.chunks(PUBLISH_BATCH) {
        let publishes = chunk.iter().map(|&id| async move {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body(id, ctx.options.payload),
                    properties(id, None),
                )
                .await
                .map_err(|err| format!("publish to `{queue}` failed: {err}"))?;
            check_confirm(confirm.await)
        });
        futures_util::future::try_join_all(publishes).await?;
    }
    Ok(())
}

/// Open loop: publishes the plan at `rate` msgs/s once the consumer is
/// ready, stamping each message with its publish time.
pub async fn publish_open_loop(
    channel: Channel,
    queue: String,
    plan: Arc<Plan>,
    payload: usize,
    rate: f64,
    ready: oneshot::Receiver<()>,
) -> Result<(), String> {
    if ready.await.is_err() {
        return Ok(()); // the drain failed before consuming
    }
    let started = Instant::now();
    let total = plan.ids.len();
    let mut sent = 0;
    let mut confirms = FuturesUnordered::new();
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
        // The messages due by now go out together (their frames share
        // writes), each stamped with the time it is handed to lapin.
        let publishes = plan.ids[sent..due].iter().map(|&id| {
            let channel = &channel;
            let queue = queue.as_str();
            async move {
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &body(id, payload),
                        properties(id, Some(now_ns())),
                    )
                    .await
                    .map_err(|err| format!("publish to `{queue}` failed: {err}"))
            }
        });
        confirms.extend(futures_util::future::try_join_all(publishes).await?);
        sent = due;
        while let Some(Some(confirm)) = confirms.next().now_or_never() {
            check_confirm(confirm)?;
        }
        if sent < total {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    while let Some(confirm) = confirms.next().await {
        check_confirm(confirm)?;
    }
    Ok(())
}
