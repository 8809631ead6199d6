//! Trace context forwarding, against the real RabbitMQ and Redis: what the
//! library publishes for a delivery (outbox messages, stored replies,
//! parked dead-letter copies) carries the delivery's W3C `traceparent` and
//! `tracestate`. No OpenTelemetry tracer is installed here, so they are the
//! incoming headers, unchanged, with or without the `opentelemetry`
//! feature (tests/opentelemetry.rs covers the tracer's case).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_idempotency::outbox::{OutboxDelivery, OutboxPublisher};
use amqp_idempotency::{Config, HandlerError, IdempotencyLayer, RetryMode, ServeOptions, serve};
use common::{TestQueue, amqp, consume, declare_queue, eventually, redis_store};
use lapin::BasicProperties;
use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use tower::{Layer, service_fn};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
const OTHER_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn config(prefix: &str) -> Config {
    Config::default()
        .with_key_prefix(prefix)
        .with_lease_ttl(Duration::from_secs(2))
        .with_in_progress_wait(Duration::from_secs(1))
        .with_handler_timeout(Duration::from_millis(1500))
        .with_retry_backoff(Duration::from_millis(20))
        .with_retry_backoff_max(Duration::from_millis(100))
}

/// Properties of an incoming message with `id` and, when given, a trace
/// context and a reply address.
fn incoming(id: &str, trace: Option<(&str, &str)>, reply: Option<(&str, &str)>) -> BasicProperties {
    let mut properties = BasicProperties::default().with_message_id(id.into());
    if let Some((traceparent, tracestate)) = trace {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(traceparent.into()),
        );
        headers.insert(
            "tracestate".into(),
            AMQPValue::LongString(tracestate.into()),
        );
        properties = properties.with_headers(headers);
    }
    if let Some((reply_to, correlation_id)) = reply {
        properties = properties
            .with_reply_to(reply_to.into())
            .with_correlation_id(correlation_id.into());
    }
    properties
}

/// The string value of header `name`, if the message has it.
fn header(message: &BasicGetMessage, name: &str) -> Option<String> {
    let headers = message.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into()),
        AMQPValue::ShortString(value) => Some(value.to_string()),
        other => panic!("header `{name}` is not a string: {other:?}"),
    }
}

/// Serves `queue` with `service` until the returned sender is used.
fn run<S>(
    connection: lapin::Connection,
    queue: String,
    service: S,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<lapin::Connection>,
)
where
    S: tower::Service<
            Delivery,
            Response = amqp_idempotency::Outcome,
            Error = amqp_idempotency::BoxError,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (channel, consumer) = consume(&connection, &queue, 8).await;
        let options = ServeOptions::new()
            .retry(RetryMode::Hold)
            .concurrency(8)
            .shutdown_on(async move {
                let _ = stopped.await;
            })
            .close_channel(channel);
        serve(consumer, service, options).await.expect("serve");
        connection
    });
    (stop, task)
}

#[tokio::test]
async fn outbox_messages_and_stored_replies_carry_the_incoming_trace_context() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.expect("open a channel");
    let queue = declare_queue(&channel, "trace-outbox").await;
    let downstream = common::scratch_queue(&channel, "trace-down").await;
    let first_asker = common::scratch_queue(&channel, "trace-asker-1").await;
    let second_asker = common::scratch_queue(&channel, "trace-asker-2").await;
    let config = config(&common::unique("tr"));
    let target = downstream.clone();
    let service = IdempotencyLayer::new(redis_store().await, &queue.name, config.clone())
        .expect("layer")
        .with_outbox(OutboxPublisher::connect(&config))
        .layer(service_fn(move |incoming: OutboxDelivery| {
            let target = target.clone();
            async move {
                incoming.outbox.publish(
                    "",
                    &target,
                    BasicProperties::default(),
                    incoming.delivery.data.clone(),
                )?;
                if incoming.delivery.properties.reply_to().is_some() {
                    incoming
                        .outbox
                        .reply(BasicProperties::default(), b"answer".to_vec())?;
                }
                Ok::<_, HandlerError>(())
            }
        }));
    let (stop, task) = run(amqp().await, queue.name.clone(), service);

    common::publish_with(
        &channel,
        &queue.name,
        b"traced",
        incoming(
            "trace-1",
            Some((TRACEPARENT, TRACESTATE)),
            Some((&first_asker, "c-1")),
        ),
    )
    .await;
    let sent = common::next_message(&channel, &downstream).await;
    let reply = common::next_message(&channel, &first_asker).await;
    // A duplicate request from another trace gets the stored reply in its
    // own trace.
    common::publish_with(
        &channel,
        &queue.name,
        b"traced",
        incoming(
            "trace-1",
            Some((OTHER_TRACEPARENT, TRACESTATE)),
            Some((&second_asker, "c-2")),
        ),
    )
    .await;
    let resent = common::next_message(&channel, &second_asker).await;
    // A message without a trace context leads to messages without one.
    common::publish_with(
        &channel,
        &queue.name,
        b"untraced",
        incoming("trace-2", None, None),
    )
    .await;
    let untraced = common::next_message(&channel, &downstream).await;
    let _ = stop.send(());
    let consumer_connection = task.await.expect("the consumer's task");
    let _ = consumer_connection.close(200, "OK".into()).await;

    assert_eq!(sent.delivery.data, b"traced");
    assert_eq!(header(&sent, "traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(header(&sent, "tracestate").as_deref(), Some(TRACESTATE));
    assert_eq!(reply.delivery.data, b"answer");
    assert_eq!(header(&reply, "traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(header(&reply, "tracestate").as_deref(), Some(TRACESTATE));
    assert_eq!(resent.delivery.data, b"answer");
    assert_eq!(
        header(&resent, "traceparent").as_deref(),
        Some(OTHER_TRACEPARENT),
        "the stored reply, sent again in the duplicate's trace"
    );
    assert_eq!(untraced.delivery.data, b"untraced");
    assert_eq!(header(&untraced, "traceparent"), None);
    assert_eq!(header(&untraced, "tracestate"), None);
    for scratch in [&downstream, &first_asker, &second_asker] {
        let _ = channel
            .queue_delete(scratch.as_str().into(), Default::default())
            .await;
    }
    queue.delete(&channel).await;
}

#[tokio::test]
async fn a_parked_copy_carries_the_incoming_trace_context() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.expect("open a channel");
    let queue = declare_queue(&channel, "trace-parked").await;
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("tp")),
    )
    .expect("layer")
    .layer(service_fn(|_delivery: Delivery| async {
        Err::<(), _>(HandlerError::permanent("unknown product"))
    }));
    let (stop, task) = run(amqp().await, queue.name.clone(), service);

    common::publish_with(
        &channel,
        &queue.name,
        b"bad order",
        incoming("trace-bad", Some((TRACEPARENT, TRACESTATE)), None),
    )
    .await;
    let parked = common::next_message(&channel, &queue.dead).await;
    let _ = stop.send(());
    let consumer_connection = task.await.expect("the consumer's task");
    let _ = consumer_connection.close(200, "OK".into()).await;

    assert_eq!(
        header(&parked, "x-idempotency-outcome").as_deref(),
        Some("failed")
    );
    assert_eq!(header(&parked, "traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(header(&parked, "tracestate").as_deref(), Some(TRACESTATE));
    queue.delete(&channel).await;
}

/// The string value of header `name` of a delivery.
fn delivery_header(delivery: &Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into()),
        _ => None,
    }
}

#[tokio::test]
async fn a_retry_copy_carries_the_incoming_trace_context() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.expect("open a channel");
    // Fixed names, emptied rather than deleted: the runner declares the
    // delay queue `{queue}.retry.200ms` (a quorum queue) for this queue,
    // and tests/retry.rs says why those are not churned.
    let queue = TestQueue {
        name: "t-trace-retry".into(),
        dead: "t-trace-retry.dead".into(),
    };
    let delay = "t-trace-retry.retry.200ms".to_owned();
    for name in [&queue.name, &queue.dead] {
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect("declare the test queue");
    }
    for name in [&queue.name, &queue.dead, &delay] {
        let purge = connection.create_channel().await.expect("open a channel");
        let _ = purge
            .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
            .await;
    }
    let config = Config::default()
        .with_key_prefix(common::unique("tr"))
        .with_retry_backoff(Duration::from_millis(200))
        .with_retry_backoff_max(Duration::from_millis(200));
    // What each run saw: (x-idempotency-outcome, traceparent, tracestate).
    type Seen = Vec<(Option<String>, Option<String>, Option<String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let runs = Arc::clone(&seen);
    let service = IdempotencyLayer::new(redis_store().await, &queue.name, config.clone())
        .expect("layer")
        .layer(service_fn(move |delivery: Delivery| {
            let first = {
                let mut runs = runs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                runs.push((
                    delivery_header(&delivery, "x-idempotency-outcome"),
                    delivery_header(&delivery, "traceparent"),
                    delivery_header(&delivery, "tracestate"),
                ));
                runs.len() == 1
            };
            async move {
                if first {
                    return Err(HandlerError::retryable("the gateway timed out"));
                }
                Ok(())
            }
        }));
    let consumer_connection = amqp().await;
    let (consumer_channel, consumer) = consume(&consumer_connection, &queue.name, 8).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions::from_config(&config)
        .shutdown_on(async move {
            let _ = stopped.await;
        })
        .close_channel(consumer_channel);
    let task = tokio::spawn(serve(consumer, service, options));

    common::publish_with(
        &channel,
        &queue.name,
        b"charge",
        incoming("trace-retry", Some((TRACEPARENT, TRACESTATE)), None),
    )
    .await;
    let retried = eventually(Duration::from_secs(15), || {
        let seen = Arc::clone(&seen);
        async move { seen.lock().map(|runs| runs.len() >= 2).unwrap_or(false) }
    })
    .await;
    let _ = stop.send(());
    let report = task.await.expect("the consumer's task").expect("serve");
    let _ = consumer_connection.close(200, "OK".into()).await;

    assert!(retried, "the copy came back from {delay}");
    assert_eq!(report.retried, 1, "through the delay queue: {report:?}");
    let runs = seen
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    assert_eq!(
        runs[1],
        (
            Some("retry".to_owned()),
            Some(TRACEPARENT.to_owned()),
            Some(TRACESTATE.to_owned())
        ),
        "the second run got the retry copy, in the incoming trace"
    );
    for name in [&queue.name, &queue.dead, &delay] {
        let purge = connection.create_channel().await.expect("open a channel");
        let _ = purge
            .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
            .await;
    }
}
