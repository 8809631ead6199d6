//! The `opentelemetry` feature, with an SDK tracer and the in-memory
//! exporter: the `delivery` span joins the incoming W3C trace and carries
//! the messaging attributes, and what the library publishes for the
//! delivery (an outbox message, the reply, a parked copy) carries that
//! span's context. Run with `cargo test --features opentelemetry --test opentelemetry`.

mod common;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqp_idempotency::outbox::{OutboxDelivery, OutboxPublisher};
use amqp_idempotency::store::MemoryStore;
use amqp_idempotency::{
    Config, HandlerError, IdempotencyLayer, OutcomeKind, RetryMode, ServeOptions, serve,
};
use common::{TestQueue, amqp, consume, declare_queue, redis_store};
use lapin::BasicProperties;
use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower::{Layer, ServiceExt, service_fn};
use tracing_subscriber::layer::SubscriberExt;

const TRACESTATE: &str = "congo=t61rcWkgMzE";

/// The exporter every test of this binary reads; the tracer is installed
/// once, as the global subscriber (the runner's tasks may run anywhere).
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("tests")));
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other subscriber in this test binary");
        exporter
    })
}

/// A trace id of its own for each test, so that tests sharing the exporter
/// find their own spans.
fn fresh_trace() -> (TraceId, SpanId, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(1);
    let trace_id = TraceId::from(nanos | 1 << 100);
    let parent = SpanId::from(0x00f0_67aa_0ba9_02b7);
    let traceparent = format!("00-{trace_id}-{parent}-01");
    (trace_id, parent, traceparent)
}

fn trace_headers(traceparent: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    headers.insert(
        "tracestate".into(),
        AMQPValue::LongString(TRACESTATE.into()),
    );
    headers
}

/// The finished `delivery` spans of `trace_id`, waiting up to 10 s for `count`.
async fn delivery_spans(trace_id: TraceId, count: usize) -> Vec<SpanData> {
    finished(|span| span.span_context.trace_id() == trace_id, count).await
}

/// The finished `delivery` spans that `pick` selects, waiting up to 10 s
/// for `count` (a span is exported when it closes).
async fn finished(pick: impl Fn(&SpanData) -> bool, count: usize) -> Vec<SpanData> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let spans: Vec<SpanData> = exporter()
            .get_finished_spans()
            .expect("read the in-memory exporter")
            .into_iter()
            .filter(|span| span.name == "delivery" && pick(span))
            .collect();
        if spans.len() >= count || tokio::time::Instant::now() >= deadline {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|KeyValue { key: k, .. }| k.as_str() == key)
        .map(|kv| &kv.value)
}

fn text(value: &str) -> Option<Value> {
    Some(Value::from(value.to_owned()))
}

#[tokio::test]
async fn the_delivery_span_joins_the_incoming_trace_with_the_messaging_attributes() {
    exporter();
    let (trace_id, parent, traceparent) = fresh_trace();
    let layer =
        IdempotencyLayer::new(MemoryStore::new(), "orders", Config::default()).expect("layer");
    let service = layer.layer(service_fn(|_delivery: Delivery| async {
        Ok::<_, HandlerError>(())
    }));
    let mut delivery = Delivery::mock(
        7,
        "shop".into(),
        "order.created".into(),
        false,
        b"{}".to_vec(),
    );
    delivery.properties = BasicProperties::default()
        .with_message_id("order-7".into())
        .with_headers(trace_headers(&traceparent));
    let outcome = service.oneshot(delivery).await.expect("the layer answers");
    assert_eq!(outcome.kind(), OutcomeKind::Processed);

    let spans = delivery_spans(trace_id, 1).await;
    assert_eq!(spans.len(), 1, "one delivery span in the incoming trace");
    let span = &spans[0];
    assert_eq!(
        span.parent_span_id, parent,
        "its parent is the incoming span"
    );
    assert!(span.parent_span_is_remote);
    assert_eq!(span.span_kind, SpanKind::Consumer);
    assert_eq!(span.span_context.trace_state().header(), TRACESTATE);
    assert_eq!(
        attribute(span, "messaging.system").cloned(),
        text("rabbitmq")
    );
    assert_eq!(
        attribute(span, "messaging.destination.name").cloned(),
        text("shop")
    );
    assert_eq!(
        attribute(span, "messaging.rabbitmq.destination.routing_key").cloned(),
        text("order.created")
    );
    assert_eq!(
        attribute(span, "messaging.message.id").cloned(),
        text("order-7")
    );
    assert_eq!(
        attribute(span, "messaging.operation.type").cloned(),
        text("process")
    );
    assert_eq!(attribute(span, "outcome").cloned(), text("processed"));
    assert_eq!(attribute(span, "fingerprint").cloned(), text("order-7"));
}

#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace() {
    exporter();
    let service = IdempotencyLayer::new(MemoryStore::new(), "orders", Config::default())
        .expect("layer")
        .layer(service_fn(|_delivery: Delivery| async {
            Ok::<_, HandlerError>(())
        }));
    let id = common::unique("malformed");
    let mut delivery = Delivery::mock(1, "".into(), "orders".into(), false, b"{}".to_vec());
    // An all-zero trace id is invalid.
    delivery.properties = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_headers(trace_headers(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ));
    let outcome = service.oneshot(delivery).await.expect("the layer answers");
    assert_eq!(outcome.kind(), OutcomeKind::Processed);

    let spans = finished(
        |span| attribute(span, "messaging.message.id") == text(&id).as_ref(),
        1,
    )
    .await;
    assert_eq!(spans.len(), 1, "the delivery span was exported");
    assert_eq!(spans[0].parent_span_id, SpanId::INVALID, "a root span");
    assert!(spans[0].span_context.is_valid());
}

fn header(message: &BasicGetMessage, name: &str) -> Option<String> {
    let headers = message.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into()),
        other => panic!("header `{name}` is not a long string: {other:?}"),
    }
}

#[tokio::test]
async fn what_we_publish_carries_the_delivery_spans_context() {
    exporter();
    let connection = amqp().await;
    let channel = connection.create_channel().await.expect("open a channel");
    let queue = declare_queue(&channel, "otel").await;
    let mut expires = FieldTable::default();
    expires.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
    let downstream = common::unique("otel-down");
    let asker = common::unique("otel-asker");
    for name in [&downstream, &asker] {
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                expires.clone(),
            )
            .await
            .expect("declare a scratch queue");
    }
    let config = Config::default()
        .with_key_prefix(common::unique("ot"))
        .with_retry_backoff(Duration::from_millis(20));
    let target = downstream.clone();
    let service = IdempotencyLayer::new(redis_store().await, &queue.name, config.clone())
        .expect("layer")
        .with_outbox(OutboxPublisher::connect(&config))
        .layer(service_fn(move |incoming: OutboxDelivery| {
            let target = target.clone();
            async move {
                if incoming.delivery.data == b"bad" {
                    return Err(HandlerError::permanent("unknown product"));
                }
                incoming.outbox.publish(
                    "",
                    &target,
                    BasicProperties::default(),
                    b"charge".to_vec(),
                )?;
                incoming
                    .outbox
                    .reply(BasicProperties::default(), b"answer".to_vec())?;
                Ok::<_, HandlerError>(())
            }
        }));
    let consumer_connection = amqp().await;
    let (consumer_channel, consumer) = consume(&consumer_connection, &queue.name, 8).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .shutdown_on(async move {
            let _ = stopped.await;
        })
        .close_channel(consumer_channel);
    let task = tokio::spawn(serve(consumer, service, options));

    let (good_trace, _, good_parent) = fresh_trace();
    let properties = BasicProperties::default()
        .with_message_id("otel-good".into())
        .with_reply_to(asker.as_str().into())
        .with_correlation_id("c-1".into())
        .with_headers(trace_headers(&good_parent));
    common::publish_with(&channel, &queue.name, b"good", properties).await;
    let sent = common::next_message(&channel, &downstream).await;
    let reply = common::next_message(&channel, &asker).await;
    let (bad_trace, _, bad_parent) = fresh_trace();
    let properties = BasicProperties::default()
        .with_message_id("otel-bad".into())
        .with_headers(trace_headers(&bad_parent));
    common::publish_with(&channel, &queue.name, b"bad", properties).await;
    let parked = common::next_message(&channel, &queue.dead).await;
    let good_spans = delivery_spans(good_trace, 1).await;
    let bad_spans = delivery_spans(bad_trace, 1).await;
    let _ = stop.send(());
    task.await.expect("the consumer's task").expect("serve");
    let _ = consumer_connection.close(200, "OK".into()).await;

    let in_span = |span: &SpanData| {
        format!(
            "00-{}-{}-01",
            span.span_context.trace_id(),
            span.span_context.span_id()
        )
    };
    assert_eq!(good_spans.len(), 1, "the good delivery's span was exported");
    let good = in_span(&good_spans[0]);
    assert_eq!(header(&sent, "traceparent"), Some(good.clone()));
    assert_eq!(header(&sent, "tracestate").as_deref(), Some(TRACESTATE));
    assert_eq!(header(&reply, "traceparent"), Some(good));
    assert_eq!(header(&reply, "tracestate").as_deref(), Some(TRACESTATE));
    assert_eq!(bad_spans.len(), 1, "the bad delivery's span was exported");
    assert_eq!(
        header(&parked, "traceparent"),
        Some(in_span(&bad_spans[0])),
        "the parked copy is a child of the delivery span, not of its sender"
    );
    assert_eq!(header(&parked, "tracestate").as_deref(), Some(TRACESTATE));
    for name in [&downstream, &asker] {
        let _ = channel
            .queue_delete(name.as_str().into(), Default::default())
            .await;
    }
    queue.delete(&channel).await;
}

#[tokio::test]
async fn a_retried_deliverys_span_is_a_child_of_the_first_attempts() {
    exporter();
    let connection = amqp().await;
    // Fixed names, emptied rather than deleted (see tests/retry.rs): the
    // runner declares the delay queue `{queue}.retry.200ms` for this queue.
    let queue = TestQueue {
        name: "t-otel-retry".into(),
        dead: "t-otel-retry.dead".into(),
    };
    let delay = "t-otel-retry.retry.200ms".to_owned();
    let channel = connection.create_channel().await.expect("open a channel");
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
    let purge = |names: Vec<String>| {
        let connection = &connection;
        async move {
            for name in names {
                let channel = connection.create_channel().await.expect("open a channel");
                let _ = channel
                    .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
                    .await;
            }
        }
    };
    purge(vec![queue.name.clone(), queue.dead.clone(), delay.clone()]).await;
    let config = Config::default()
        .with_key_prefix(common::unique("otr"))
        .with_retry_backoff(Duration::from_millis(200))
        .with_retry_backoff_max(Duration::from_millis(200));
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let service = IdempotencyLayer::new(redis_store().await, &queue.name, config.clone())
        .expect("layer")
        .layer(service_fn(move |_delivery: Delivery| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
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

    let (trace_id, parent, traceparent) = fresh_trace();
    let properties = BasicProperties::default()
        .with_message_id("otel-retry".into())
        .with_headers(trace_headers(&traceparent));
    common::publish_with(&channel, &queue.name, b"charge", properties).await;
    let spans = delivery_spans(trace_id, 2).await;
    let _ = stop.send(());
    let report = task.await.expect("the consumer's task").expect("serve");
    let _ = consumer_connection.close(200, "OK".into()).await;
    purge(vec![queue.name.clone(), queue.dead.clone(), delay]).await;

    assert_eq!(report.retried, 1, "through the delay queue: {report:?}");
    assert_eq!(
        spans.len(),
        2,
        "both attempts' spans, in the incoming trace"
    );
    let first = spans
        .iter()
        .find(|span| attribute(span, "outcome") == text("retry").as_ref())
        .expect("the first attempt's span");
    let second = spans
        .iter()
        .find(|span| attribute(span, "outcome") == text("processed").as_ref())
        .expect("the second attempt's span");
    assert_eq!(first.parent_span_id, parent);
    assert_eq!(
        second.parent_span_id,
        first.span_context.span_id(),
        "the retry copy carried the first attempt's span as its parent"
    );
}
