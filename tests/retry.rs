//! Retries through the broker (`IDEMPOTENCY_RETRY=broker`, the default)
//! against the real RabbitMQ and Redis: a retryable failure's copy waits in
//! a delay queue `{queue}.retry.<delay>`, the original is acked only once
//! the copy is confirmed, and the copy comes back to the failing
//! consumer's queue alone.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_idempotency::{
    Config, HandlerError, IdempotencyLayer, RetryMode, ServeError, ServeOptions, ServeReport, serve,
};
use common::{TestQueue, amqp, consume, declare_queue, eventually, ready_count, redis_store};
use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use tower::{Layer, service_fn};

/// A backoff of `first` doubling up to `max`: the delay queues are one per step.
fn config(first: Duration, max: Duration) -> Config {
    Config::default()
        .with_key_prefix(common::unique("p"))
        .with_retry_backoff(first)
        .with_retry_backoff_max(max)
        .with_max_attempts(5)
}

/// The delay queues of `queue` for `steps`, named as the runner names them.
fn delay_queues(queue: &str, steps: &[&str]) -> Vec<String> {
    steps
        .iter()
        .map(|step| format!("{queue}.retry.{step}"))
        .collect()
}

/// Empties `queues` (each on a channel of its own: a missing one closes it).
async fn purge_queues(connection: &Connection, queues: &[String]) {
    for queue in queues {
        let channel = connection.create_channel().await.unwrap();
        let _ = channel
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await;
    }
}

/// The test's queue (and its parking queue), under a fixed name so that
/// the delay queues the runner declares for it are the same on every run:
/// they are emptied, never deleted. RabbitMQ 3.10 can lose its
/// at-least-once dead-letter supervisor when quorum queues with that
/// strategy are deleted while their dead-letter worker starts; the tests do
/// not churn them.
async fn fixed_queue(
    connection: &Connection,
    label: &str,
    delays: &[&str],
) -> (TestQueue, Vec<String>) {
    let name = format!("t-retry-{label}");
    let queue = TestQueue {
        dead: format!("{name}.dead"),
        name,
    };
    let channel = connection.create_channel().await.unwrap();
    for queue in [&queue.name, &queue.dead] {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect("declare the test queue");
    }
    let delays = delay_queues(&queue.name, delays);
    purge_queues(connection, &[queue.name.clone(), queue.dead.clone()]).await;
    purge_queues(connection, &delays).await;
    (queue, delays)
}

/// The handler's view of each run: the `x-idempotency-attempts` header it
/// was given (0 when absent).
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<Vec<i64>>>);

impl Runs {
    fn note(&self, delivery: &Delivery) {
        let attempts = delivery.properties.headers().as_ref().and_then(|headers| {
            headers
                .inner()
                .iter()
                .find(|(name, _)| name.as_str() == "x-idempotency-attempts")
                .map(|(_, value)| value.clone())
        });
        let seen = match attempts {
            Some(AMQPValue::LongLongInt(n)) => n,
            _ => 0,
        };
        self.0.lock().unwrap().push(seen);
    }

    fn all(&self) -> Vec<i64> {
        self.0.lock().unwrap().clone()
    }
}

/// Serves `queue` with a handler that fails (retryable) its first
/// `failures` runs and then succeeds, until `effects` reaches `until` or
/// 30 s pass; the options are `ServeOptions::from_config`.
async fn serve_failing(
    connection: &Connection,
    queue: &str,
    config: Config,
    failures: usize,
    effects: Arc<AtomicUsize>,
    until: usize,
    runs: Runs,
) -> Result<ServeReport, ServeError> {
    let calls = Arc::new(AtomicUsize::new(0));
    let done = effects.clone();
    let service = IdempotencyLayer::new(redis_store().await, queue, config.clone())
        .unwrap()
        .layer(service_fn(move |delivery: Delivery| {
            runs.note(&delivery);
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let effects = effects.clone();
            async move {
                if call <= failures {
                    return Err(HandlerError::retryable("the payment gateway timed out"));
                }
                effects.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }));
    let (channel, consumer) = consume(connection, queue, 8).await;
    let options = ServeOptions::from_config(&config)
        .shutdown_on(async move {
            let reached = eventually(Duration::from_secs(30), || {
                let done = done.clone();
                async move { done.load(Ordering::SeqCst) >= until }
            })
            .await;
            if !reached {
                eprintln!("the test's stop condition was not reached in 30 s; stopping");
            }
        })
        .close_channel(channel);
    serve(consumer, service, options).await
}

async fn publish_to(channel: &Channel, exchange: &str, routing_key: &str, id: &str) {
    let _ = channel
        .confirm_select(ConfirmSelectOptions::default())
        .await;
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            b"charge 10",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.into())
                .with_correlation_id("corr-7".into()),
        )
        .await
        .expect("publish")
        .await
        .expect("publisher confirm");
}

async fn cleanup(connection: &Connection, queue: &TestQueue, delays: &[String]) {
    purge_queues(connection, &[queue.name.clone(), queue.dead.clone()]).await;
    purge_queues(connection, delays).await;
}

#[tokio::test]
async fn a_failed_delivery_waits_in_its_delay_queue_then_is_processed_once() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let (queue, delays) = fixed_queue(&connection, "broker", &["2s", "4s"]).await;
    publish_to(&setup, "", &queue.name, "charge-1").await;

    let effects = Arc::new(AtomicUsize::new(0));
    let runs = Runs::default();
    let config = config(Duration::from_secs(2), Duration::from_secs(4));
    let serving = tokio::spawn({
        let connection = amqp().await;
        let (name, effects, runs) = (queue.name.clone(), effects.clone(), runs.clone());
        async move { serve_failing(&connection, &name, config, 1, effects, 1, runs).await }
    });
    // While it waits out its 2 s, the copy is in `{queue}.retry.2s` and the
    // original is gone from the queue (acked, not held in the consumer).
    let waiting = eventually(Duration::from_secs(10), || {
        let (connection, delay, name) = (&connection, delays[0].clone(), queue.name.clone());
        async move {
            // A channel per look: the delay queue may not be declared yet.
            let probe = connection.create_channel().await.unwrap();
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let waiting = probe
                .queue_declare(delay.as_str().into(), passive, FieldTable::default())
                .await
                .is_ok_and(|queue| queue.message_count() == 1);
            if !waiting {
                return false;
            }
            let probe = connection.create_channel().await.unwrap();
            ready_count(&probe, &name).await == 0
        }
    })
    .await;
    assert!(
        waiting,
        "the copy waits in {} while the queue is empty",
        delays[0]
    );

    let report = serving.await.unwrap().expect("serve");
    assert_eq!(effects.load(Ordering::SeqCst), 1, "the effect happens once");
    assert_eq!(
        runs.all(),
        [0, 1],
        "the copy came back with the attempt count in x-idempotency-attempts"
    );
    assert_eq!(
        report.retried, 1,
        "one copy confirmed in a delay queue: {report:?}"
    );
    assert_eq!(report.requeued, 0, "nothing held and requeued: {report:?}");
    assert_eq!(report.acked, 2, "the original, then the copy: {report:?}");
    let probe = connection.create_channel().await.unwrap();
    assert_eq!(ready_count(&probe, &delays[0]).await, 0);
    assert_eq!(ready_count(&probe, &queue.name).await, 0);
    assert_eq!(ready_count(&probe, &queue.dead).await, 0);
    cleanup(&connection, &queue, &delays).await;
}

#[tokio::test]
async fn an_unroutable_retry_copy_leaves_the_original_requeued() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let (queue, delays) = fixed_queue(&connection, "unroutable", &["200ms"]).await;

    let effects = Arc::new(AtomicUsize::new(0));
    let runs = Runs::default();
    let config = config(Duration::from_millis(200), Duration::from_millis(200));
    let serving = tokio::spawn({
        let connection = amqp().await;
        let (name, effects, runs) = (queue.name.clone(), effects.clone(), runs.clone());
        async move { serve_failing(&connection, &name, config, 1, effects, 1, runs).await }
    });
    // Once the runner declared its delay queue, it goes: the copy will come
    // back unroutable, never confirmed.
    let declared = eventually(Duration::from_secs(10), || {
        let (connection, delay) = (&connection, delays[0].clone());
        async move {
            let channel = connection.create_channel().await.unwrap();
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(delay.as_str().into(), passive, FieldTable::default())
                .await
                .is_ok()
        }
    })
    .await;
    assert!(declared, "the runner declares {}", delays[0]);
    // Let its dead-letter worker start before it goes (see `fixed_queue`).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(delays[0].as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the delay queue");
    publish_to(&setup, "", &queue.name, "charge-2").await;

    let report = serving.await.unwrap().expect("serve");
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "processed once, from the requeued original"
    );
    assert_eq!(
        runs.all(),
        [0, 0],
        "the second run is the original again, not a copy"
    );
    assert_eq!(report.retried, 0, "no copy was confirmed: {report:?}");
    assert_eq!(report.requeued, 1, "the original was requeued: {report:?}");
    let probe = connection.create_channel().await.unwrap();
    assert_eq!(ready_count(&probe, &queue.name).await, 0);
    cleanup(&connection, &queue, &delays).await;
}

#[tokio::test]
async fn after_the_last_attempt_a_broker_retried_message_is_parked_with_its_count() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let (queue, delays) = fixed_queue(&connection, "parked", &["100ms", "200ms"]).await;
    publish_to(&setup, "", &queue.name, "charge-3").await;

    let config =
        config(Duration::from_millis(100), Duration::from_millis(200)).with_max_attempts(3);
    let service = IdempotencyLayer::new(redis_store().await, &queue.name, config.clone())
        .unwrap()
        .layer(service_fn(|_d: Delivery| async {
            Err::<(), _>(HandlerError::retryable("always fails"))
        }));
    let (channel, consumer) = consume(&connection, &queue.name, 4).await;
    let parked_probe = connection.create_channel().await.unwrap();
    let dead = queue.dead.clone();
    let options = ServeOptions::from_config(&config)
        .shutdown_on(async move {
            let _ = eventually(Duration::from_secs(30), || {
                let (probe, dead) = (parked_probe.clone(), dead.clone());
                async move { ready_count(&probe, &dead).await >= 1 }
            })
            .await;
        })
        .close_channel(channel);
    let report = serve(consumer, service, options).await.expect("serve");
    assert_eq!(
        report.retried, 2,
        "attempts 1 and 2 went through delay queues: {report:?}"
    );
    assert_eq!(report.requeued, 0, "{report:?}");

    let reader = connection.create_channel().await.unwrap();
    let parked = reader
        .basic_get(queue.dead.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is parked after its last attempt");
    let headers = parked
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let header = |name: &str| headers.inner().get(name).cloned();
    assert_eq!(
        header("x-idempotency-attempts"),
        Some(AMQPValue::LongLongInt(3))
    );
    assert_eq!(
        header("x-idempotency-outcome"),
        Some(AMQPValue::LongString(LongString::from(
            "attempts_exhausted"
        )))
    );
    assert_eq!(
        parked
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str()),
        Some("charge-3"),
        "the copy kept the original's properties"
    );
    assert_eq!(
        parked
            .delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str()),
        Some("corr-7")
    );
    for delay in &delays {
        assert_eq!(ready_count(&reader, delay).await, 0, "{delay} is empty");
    }
    cleanup(&connection, &queue, &delays).await;
}

#[tokio::test]
async fn a_quorum_source_queue_retries_through_the_broker() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let name = "t-retry-quorum-source".to_owned();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    // RabbitMQ 4 sets a delivery limit on quorum queues by default: set
    // here explicitly, and low; a retry through the broker never counts
    // against it.
    arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(1));
    setup
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::durable(),
            arguments,
        )
        .await
        .expect("declare the quorum queue");
    let queue = TestQueue {
        dead: format!("{name}.dead"),
        name,
    };
    let delays = delay_queues(&queue.name, &["100ms", "200ms"]);
    purge_queues(&connection, &[queue.name.clone(), queue.dead.clone()]).await;
    purge_queues(&connection, &delays).await;
    publish_to(&setup, "", &queue.name, "charge-4").await;

    let effects = Arc::new(AtomicUsize::new(0));
    let runs = Runs::default();
    let config = config(Duration::from_millis(100), Duration::from_millis(200));
    let report = serve_failing(
        &connection,
        &queue.name,
        config,
        3,
        effects.clone(),
        1,
        runs.clone(),
    )
    .await
    .expect("serve");
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "processed once on its 4th attempt"
    );
    assert_eq!(runs.all(), [0, 1, 2, 3]);
    assert_eq!(report.retried, 3, "{report:?}");
    let probe = connection.create_channel().await.unwrap();
    assert_eq!(ready_count(&probe, &queue.dead).await, 0, "nothing parked");
    cleanup(&connection, &queue, &delays).await;
}

#[tokio::test]
async fn a_message_routed_to_two_queues_is_retried_only_in_the_failing_one() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let exchange = common::unique("retry-fanout");
    setup
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the exchange");
    let (failing, delays) = fixed_queue(&connection, "failing", &["100ms", "200ms"]).await;
    let other = declare_queue(&setup, "retry-other").await;
    for queue in [&failing, &other] {
        setup
            .queue_bind(
                queue.name.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }
    publish_to(&setup, &exchange, "orders.created", "charge-5").await;

    let effects = Arc::new(AtomicUsize::new(0));
    let runs = Runs::default();
    let config = config(Duration::from_millis(100), Duration::from_millis(200));
    let report = serve_failing(
        &connection,
        &failing.name,
        config,
        1,
        effects.clone(),
        1,
        runs.clone(),
    )
    .await
    .expect("serve");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(report.retried, 1, "{report:?}");
    let probe = connection.create_channel().await.unwrap();
    assert_eq!(
        ready_count(&probe, &other.name).await,
        1,
        "the other queue got the message once, not again with the retry"
    );
    cleanup(&connection, &failing, &delays).await;
    other.delete(&probe).await;
    let _ = probe
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}

#[tokio::test]
async fn a_delay_queue_with_other_arguments_stops_the_start() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let (queue, delays) = fixed_queue(&connection, "inequivalent", &["1s"]).await;
    // A classic queue, never a runner's; kept for the next run.
    // Somebody made `{queue}.retry.1s` as a classic queue without a TTL.
    setup
        .queue_declare(
            delays[0].as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .expect("declare the clashing queue");
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(Duration::from_secs(1), Duration::from_secs(1)),
    )
    .unwrap()
    .layer(service_fn(|_d: Delivery| async {
        Ok::<_, HandlerError>(())
    }));
    let (channel, consumer) = consume(&connection, &queue.name, 1).await;
    let options =
        ServeOptions::from_config(&config(Duration::from_secs(1), Duration::from_secs(1)))
            .shutdown_on(std::future::pending())
            .close_channel(channel);
    let err = serve(consumer, service, options)
        .await
        .expect_err("the clashing delay queue stops the start");
    let ServeError::RetryQueue {
        queue: named,
        problem,
    } = &err
    else {
        panic!("expected ServeError::RetryQueue, got {err}");
    };
    assert_eq!(named, &delays[0], "names the delay queue");
    assert!(
        problem.contains("inequivalent arg"),
        "says what differs: {problem}"
    );
    assert!(
        problem.contains("IDEMPOTENCY_RETRY=hold"),
        "says what to do: {problem}"
    );
    cleanup(&connection, &queue, &delays).await;
}

#[tokio::test]
async fn hold_keeps_todays_behaviour_and_declares_no_delay_queue() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "retry-hold").await;
    let delays = delay_queues(&queue.name, &["100ms", "200ms"]);
    publish_to(&setup, "", &queue.name, "charge-6").await;
    let effects = Arc::new(AtomicUsize::new(0));
    let config =
        config(Duration::from_millis(100), Duration::from_millis(200)).with_retry(RetryMode::Hold);
    let report = serve_failing(
        &connection,
        &queue.name,
        config,
        1,
        effects.clone(),
        1,
        Runs::default(),
    )
    .await
    .expect("serve");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(report.requeued, 1, "held, then requeued: {report:?}");
    assert_eq!(report.retried, 0, "{report:?}");
    let probe = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = probe
        .queue_declare(delays[0].as_str().into(), passive, FieldTable::default())
        .await;
    assert!(declared.is_err(), "no delay queue with hold");
    queue
        .delete(&connection.create_channel().await.unwrap())
        .await;
}

/// A message that runs unprotected (no fingerprint, pass-through) has no
/// record to count its attempts: its copy's `x-idempotency-attempts` does,
/// or an always-failing one would go round the delay queues for ever.
#[tokio::test]
async fn an_unprotected_message_still_reaches_its_last_attempt_through_the_broker() {
    use amqp_idempotency::NoFingerprintPolicy;
    use amqp_idempotency::fingerprint::MessageId;

    let connection = amqp().await;
    let (queue, delays) = fixed_queue(&connection, "unprotected", &["100ms"]).await;
    let setup = connection.create_channel().await.unwrap();
    // No message id: with the MessageId strategy, no fingerprint.
    common::publish(&setup, &queue.name, b"no id", None).await;

    let config = config(Duration::from_millis(100), Duration::from_millis(100))
        .with_max_attempts(3)
        .with_on_missing_fingerprint(NoFingerprintPolicy::PassThrough);
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let service = IdempotencyLayer::new(redis_store().await, &queue.name, config.clone())
        .unwrap()
        .fingerprint(MessageId)
        .layer(service_fn(move |_d: Delivery| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::retryable("always fails")) }
        }));
    let (channel, consumer) = consume(&connection, &queue.name, 4).await;
    let parked_probe = connection.create_channel().await.unwrap();
    let dead = queue.dead.clone();
    let options = ServeOptions::from_config(&config)
        .shutdown_on(async move {
            let parked = eventually(Duration::from_secs(15), || {
                let (probe, dead) = (parked_probe.clone(), dead.clone());
                async move { ready_count(&probe, &dead).await >= 1 }
            })
            .await;
            if !parked {
                eprintln!("not parked within 15 s: stopping");
            }
        })
        .close_channel(channel);
    let report = serve(consumer, service, options).await.expect("serve");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "three runs, then parked: {report:?}"
    );
    assert_eq!(report.retried, 2, "{report:?}");
    let probe = connection.create_channel().await.unwrap();
    assert_eq!(ready_count(&probe, &queue.dead).await, 1, "parked once");
    cleanup(&connection, &queue, &delays).await;
}
