//! End to end against the real RabbitMQ and Redis: the runner, the layer
//! and the Redis store together.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_idempotency::records::{Record, State};
use amqp_idempotency::store::{RedisStore, Store};
use amqp_idempotency::{
    Config, HandlerError, IdempotencyLayer, Outcome, OutcomeKind, RetryMode, ServeOptions,
    ServeReport, serve,
};
use common::{
    TestQueue, amqp, consume, declare_queue, eventually, publish, ready_count, redis_store,
};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tower::{Layer, Service, service_fn};

/// What a stored value says, read through the public records API.
fn state(value: &[u8]) -> State {
    Record::decode("", (value.to_vec(), None)).state().clone()
}

fn config(prefix: &str) -> Config {
    Config::default()
        .with_key_prefix(prefix)
        .with_retry_backoff(Duration::from_millis(20))
        .with_retry_backoff_max(Duration::from_millis(100))
}

/// Records every outcome, in order, and lets a test wait for a count.
#[derive(Clone, Default)]
struct Journal {
    events: Arc<Mutex<Vec<String>>>,
    changed: Arc<watch::Sender<usize>>,
}

impl Journal {
    fn push(&self, event: impl Into<String>) {
        let mut events = self.events.lock().unwrap();
        let event = event.into();
        if std::env::var("JOURNAL_TRACE").is_ok() {
            eprintln!("{:?} {event}", std::time::SystemTime::now());
        }
        events.push(event);
        self.changed.send_replace(events.len());
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    fn count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| *e == event).count()
    }

    /// Completes once `done` holds for the journal.
    fn until(
        &self,
        done: impl Fn(&Journal) -> bool + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let journal = self.clone();
        let mut changes = self.changed.subscribe();
        async move {
            loop {
                if done(&journal) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    /// Wraps the idempotent service to log each outcome's kind.
    fn record<S>(self, inner: S) -> Recorded<S> {
        Recorded {
            inner,
            journal: self,
        }
    }
}

/// Logs each outcome's kind; readiness is the inner service's, so the
/// runner pauses when the layer does.
#[derive(Clone)]
struct Recorded<S> {
    inner: S,
    journal: Journal,
}

impl<S> Service<Delivery> for Recorded<S>
where
    S: Service<Delivery, Response = Outcome, Error = amqp_idempotency::BoxError>,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = amqp_idempotency::BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Outcome, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let journal = self.journal.clone();
        let call = self.inner.call(delivery);
        Box::pin(async move {
            let outcome = call.await?;
            journal.push(outcome.kind().as_str());
            Ok(outcome)
        })
    }
}

async fn run_until(
    connection: &Connection,
    queue: &str,
    service: impl Service<
        Delivery,
        Response = Outcome,
        Error = amqp_idempotency::BoxError,
        Future = impl Send + 'static,
    > + Send
    + 'static,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> ServeReport {
    let (channel, consumer) = consume(connection, queue, 8).await;
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .concurrency(8)
        .shutdown_on(async move {
            if tokio::time::timeout(Duration::from_secs(30), stop)
                .await
                .is_err()
            {
                eprintln!("test stop condition not reached in 30s; stopping the runner");
            }
        })
        .close_channel(channel);
    serve(consumer, service, options).await.expect("serve")
}

async fn finish(connection: &Connection, queue: &TestQueue) -> (u32, u32) {
    let channel = connection.create_channel().await.unwrap();
    let counts = (
        ready_count(&channel, &queue.name).await,
        ready_count(&channel, &queue.dead).await,
    );
    queue.delete(&channel).await;
    counts
}

/// Runs an end-to-end test against each Redis deployment: the standalone
/// Redis 7 at REDIS_URL, the 3-master Redis Cluster and Valkey 8.1 (on its
/// native compare-and-set) of `common::cluster_nodes` and `common::valkey_url`.
macro_rules! on_every_deployment {
    ($($name:ident),* $(,)?) => {
        mod deployments {
            $(
                pub mod $name {
                    #[tokio::test]
                    async fn standalone_redis() {
                        super::super::$name(super::super::redis_store().await).await;
                    }
                    #[tokio::test]
                    async fn redis_cluster() {
                        super::super::$name(super::super::common::cluster_store().await).await;
                    }
                    #[tokio::test]
                    async fn valkey_native() {
                        let store = super::super::common::valkey_store().await;
                        assert!(store.native_compare_and_set(), "Valkey 8.1 has SET ... IFEQ");
                        super::super::$name(store).await;
                    }
                }
            )*
        }
    };
}

on_every_deployment!(
    first_delivery_is_processed_and_a_duplicate_is_acked_without_running,
    a_retryable_failure_is_released_and_the_requeued_copy_takes_effect_once,
);

async fn first_delivery_is_processed_and_a_duplicate_is_acked_without_running(store: RedisStore) {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "dup").await;
    publish(&setup, &queue.name, b"order", Some("order-1")).await;
    publish(&setup, &queue.name, b"order", Some("order-1")).await;

    let runs = Arc::new(AtomicUsize::new(0));
    let journal = Journal::default();
    let r = runs.clone();
    let service = IdempotencyLayer::new(store, &queue.name, config(&common::unique("p")))
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        }));
    let report = run_until(
        &connection,
        &queue.name,
        journal.clone().record(service),
        journal.until(|j| j.events().len() >= 2),
    )
    .await;

    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler runs once");
    assert_eq!(journal.events(), ["processed", "duplicate"]);
    assert_eq!(report.acked, 2);
    assert_eq!(
        finish(&connection, &queue).await,
        (0, 0),
        "both acked, none dead-lettered"
    );
}

async fn a_retryable_failure_is_released_and_the_requeued_copy_takes_effect_once(
    store: RedisStore,
) {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "retry").await;
    publish(&setup, &queue.name, b"pay 10", Some("payment-1")).await;

    let attempts = Arc::new(AtomicUsize::new(0));
    let effects = Arc::new(AtomicUsize::new(0));
    let journal = Journal::default();
    let (a, e) = (attempts.clone(), effects.clone());
    let service = IdempotencyLayer::new(store, &queue.name, config(&common::unique("p")))
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            let attempt = a.fetch_add(1, Ordering::SeqCst) + 1;
            let e = e.clone();
            async move {
                if attempt == 1 {
                    return Err(HandlerError::retryable("payment gateway timeout"));
                }
                e.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }));
    // A producer retry of the same payment arrives too.
    publish(&setup, &queue.name, b"pay 10", Some("payment-1")).await;
    let report = run_until(
        &connection,
        &queue.name,
        journal.clone().record(service),
        journal.until(|j| j.count("processed") + j.count("duplicate") >= 2),
    )
    .await;

    assert_eq!(effects.load(Ordering::SeqCst), 1, "the effect happens once");
    assert_eq!(journal.count("retry"), 1);
    assert_eq!(journal.count("processed"), 1);
    assert!(report.requeued >= 1);
    assert_eq!(finish(&connection, &queue).await, (0, 0));
}

#[tokio::test]
async fn a_permanent_failure_reaches_the_dead_letter_queue() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "perm").await;
    publish(&setup, &queue.name, b"bad order", Some("order-bad")).await;
    let journal = Journal::default();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(|_d: Delivery| async {
        Err::<(), _>(HandlerError::permanent("unknown product"))
    }));
    let report = run_until(
        &connection,
        &queue.name,
        journal.clone().record(service),
        journal.until(|j| !j.events().is_empty()),
    )
    .await;
    assert_eq!(journal.events(), ["failed"]);
    assert_eq!(report.dead_lettered, 1);
    let channel = connection.create_channel().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let channel = channel.clone();
            let dead = queue.dead.clone();
            async move { ready_count(&channel, &dead).await == 1 }
        })
        .await,
        "the message is in the dead-letter queue"
    );
    assert_eq!(finish(&connection, &queue).await, (0, 1));
}

#[tokio::test]
async fn a_message_without_fingerprint_is_dead_lettered_by_default() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "nofp").await;
    publish(&setup, &queue.name, b"", None).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let journal = Journal::default();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(move |_d: Delivery| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, HandlerError>(()) }
    }));
    run_until(
        &connection,
        &queue.name,
        journal.clone().record(service),
        journal.until(|j| !j.events().is_empty()),
    )
    .await;
    assert_eq!(journal.events(), ["no_fingerprint"]);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let channel = connection.create_channel().await.unwrap();
    let dead = queue.dead.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let channel = channel.clone();
            let dead = dead.clone();
            async move { ready_count(&channel, &dead).await == 1 }
        })
        .await
    );
    assert_eq!(finish(&connection, &queue).await, (0, 1));
}

async fn slow_service(
    queue: &str,
    prefix: &str,
    journal: Journal,
) -> impl Service<
    Delivery,
    Response = Outcome,
    Error = amqp_idempotency::BoxError,
    Future = impl Send + 'static,
> + Send
+ Clone
+ 'static {
    let handler_journal = journal.clone();
    let service = IdempotencyLayer::new(redis_store().await, queue, config(prefix))
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            let journal = handler_journal.clone();
            async move {
                journal.push("handler-start");
                tokio::time::sleep(Duration::from_millis(800)).await;
                journal.push("handler-end");
                Ok::<_, HandlerError>(())
            }
        }));
    journal.clone().record(service)
}

#[tokio::test]
async fn two_consumers_with_the_same_fingerprint_run_the_handler_once() {
    let connection_a: &'static Connection = Box::leak(Box::new(amqp().await));
    let connection_b: &'static Connection = Box::leak(Box::new(amqp().await));
    let setup = connection_a.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "race").await;
    publish(
        &setup,
        &queue.name,
        b"register alice",
        Some("register:alice"),
    )
    .await;
    publish(
        &setup,
        &queue.name,
        b"register alice",
        Some("register:alice"),
    )
    .await;

    let prefix = common::unique("p");
    let journal = Journal::default();
    let service_a = slow_service(&queue.name, &prefix, journal.clone()).await;
    let service_b = slow_service(&queue.name, &prefix, journal.clone()).await;
    let settled = |j: &Journal| j.count("processed") + j.count("duplicate") >= 2;
    // Prefetch 1 on each consumer: each takes one copy, both in flight together.
    let run = |connection: &'static Connection, service, stop| {
        let queue = queue.name.clone();
        async move {
            let (channel, consumer) = consume(connection, &queue, 1).await;
            let options = ServeOptions::new()
                .retry(RetryMode::Hold)
                .concurrency(1)
                .shutdown_on(stop)
                .close_channel(channel);
            serve(consumer, service, options).await.expect("serve")
        }
    };
    let stop_a = journal.until(settled);
    let stop_b = journal.until(settled);
    let (a, b) = tokio::join!(
        run(connection_a, service_a, stop_a),
        run(connection_b, service_b, stop_b)
    );

    let events = journal.events();
    assert_eq!(journal.count("handler-start"), 1, "ran once: {events:?}");
    let end = events
        .iter()
        .position(|e| e == "handler-end")
        .expect("handler finished");
    let duplicate = events
        .iter()
        .position(|e| e == "duplicate")
        .expect("duplicate settled");
    assert!(
        duplicate > end,
        "the second copy was settled as a duplicate only after the first finished: {events:?}"
    );
    assert_eq!(a.acked + b.acked, 2);
    assert_eq!(finish(connection_a, &queue).await, (0, 0));
}

#[tokio::test]
async fn with_redis_unreachable_the_handler_does_not_run_and_the_message_stays_queued() {
    let mut redis = common::PrivateRedis::start();
    let store = RedisStore::connect_url(&redis.url())
        .await
        .expect("connect to the private redis");
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "down").await;
    redis.stop();
    publish(&setup, &queue.name, b"charge", Some("charge-1")).await;

    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let journal = Journal::default();
    let layer = IdempotencyLayer::new(store, &queue.name, config(&common::unique("p"))).unwrap();
    let dedup = layer.deduplicator().clone();
    let service = layer.layer(service_fn(move |_d: Delivery| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, HandlerError>(()) }
    }));
    let service = journal.clone().record(service);
    let report = run_until(&connection, &queue.name, service.clone(), async move {
        // The claim failed: the delivery is held (not requeued) while paused.
        while !dedup.store_is_down() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Stay a little longer: paused, nothing else may happen.
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "handler not run while Redis is down"
    );
    assert_eq!(
        journal.events(),
        ["store_unavailable"],
        "held while paused, given back once at shutdown (not requeued in a loop)"
    );
    assert_eq!(report.acked, 0);
    assert_eq!(report.requeued, 1);
    let channel = connection.create_channel().await.unwrap();
    assert_eq!(
        ready_count(&channel, &queue.name).await,
        1,
        "the message is still in the queue"
    );

    // Redis comes back: the same service resumes by itself.
    redis.restart();
    journal.push("redis-restarted");
    run_until(
        &connection,
        &queue.name,
        service,
        journal.until(|j| j.count("processed") >= 1),
    )
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(finish(&connection, &queue).await, (0, 0));
}

#[tokio::test]
async fn shutdown_abandons_a_hung_handler_keeps_its_claim_and_the_message() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "shutdown").await;
    publish(&setup, &queue.name, b"slow", Some("slow-1")).await;
    let prefix = common::unique("p");
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let service = IdempotencyLayer::new(redis_store().await, &queue.name, config(&prefix))
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            s.notify_one();
            async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                Ok::<_, HandlerError>(())
            }
        }));
    let (channel, consumer) = consume(&connection, &queue.name, 1).await;
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .concurrency(1)
        .shutdown_on(async move { started.notified().await })
        .shutdown_deadline(Duration::from_millis(300))
        .close_channel(channel);
    let report = serve(consumer, service, options).await.expect("serve");
    assert_eq!(report.abandoned, 1);
    assert_eq!(report.acked, 0);

    let store = redis_store().await;
    let key = format!("{prefix}:{}:slow-1", queue.name);
    let stored = store.get(&key).await.unwrap().expect("a record");
    let value = stored.0.clone();
    let record = Record::decode(&key, stored);
    // Kept past its lease (for the crash count), so its time to live is
    // longer than the lease left.
    let lingers = matches!(
        record.state(),
        State::InProgress { attempt: 1, lease_left: Some(left), .. }
            if record.ttl().is_some_and(|ttl| ttl > *left + Duration::from_secs(3600))
    );
    assert!(
        lingers,
        "the abandoned claim is kept until its lease ends (its work may still run), not released: {value:?}"
    );
    let channel = connection.create_channel().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let channel = channel.clone();
            let name = queue.name.clone();
            async move { ready_count(&channel, &name).await == 1 }
        })
        .await,
        "the message is back in the queue"
    );
    let _ = finish(&connection, &queue).await;
    let _ = OutcomeKind::Processed;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_after_max_attempts_with_reason_headers() {
    use lapin::options::BasicGetOptions;
    use lapin::types::AMQPValue;

    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "poison").await;
    publish(&setup, &queue.name, b"explode", Some("poison-1")).await;
    let journal = Journal::default();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")).with_max_attempts(3),
    )
    .unwrap()
    .layer(service_fn(|_d: Delivery| async {
        Err::<(), _>(HandlerError::retryable("always fails"))
    }));
    let (channel, consumer) = consume(&connection, &queue.name, 4).await;
    let stop = journal.until(|j| j.count("attempts_exhausted") >= 1);
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .concurrency(4)
        .shutdown_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
        })
        .close_channel(channel);
    // The queue has no dead-letter exchange (like most existing queues):
    // the runner parks the message in `{queue}.dead`, which it declares.
    let report = serve(consumer, journal.clone().record(service), options)
        .await
        .expect("serve");
    assert_eq!(journal.events(), ["retry", "retry", "attempts_exhausted"]);
    assert_eq!(report.requeued, 2);
    assert_eq!(report.dead_lettered, 1);

    let reader = connection.create_channel().await.unwrap();
    let mut dead = None;
    for _ in 0..100 {
        dead = reader
            .basic_get(queue.dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if dead.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = dead.expect("the poison message reached the dead-letter queue");
    assert_eq!(dead.delivery.data, b"explode");
    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str()),
        Some("poison-1")
    );
    let headers = dead
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let header = |name: &str| {
        headers
            .inner()
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("x-idempotency-attempts"),
        Some(AMQPValue::LongLongInt(3))
    );
    let text = |v: Option<AMQPValue>| match v {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("expected a string header, got {other:?}"),
    };
    assert_eq!(text(header("x-idempotency-outcome")), "attempts_exhausted");
    assert_eq!(text(header("x-idempotency-queue")), queue.name);
    assert!(text(header("x-idempotency-reason")).contains("always fails"));
    assert_eq!(
        finish(&connection, &queue).await,
        (0, 0),
        "exactly one dead letter, now read"
    );
}

#[tokio::test]
async fn a_cut_broker_connection_mid_handler_reconnects_and_the_effect_happens_once() {
    use amqp_idempotency::{Session, serve_reconnecting};

    let proxy = common::Proxy::start(5672).await;
    let direct = amqp().await;
    let setup = direct.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "cut").await;
    publish(&setup, &queue.name, b"ship", Some("ship-1")).await;

    let effects = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let (e, s) = (effects.clone(), started.clone());
    let journal = Journal::default();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(move |_d: Delivery| {
        let (e, s) = (e.clone(), s.clone());
        async move {
            s.notify_one();
            tokio::time::sleep(Duration::from_millis(500)).await;
            e.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(())
        }
    }));
    let url = common::amqp_url().replace(":5672", &format!(":{}", proxy.port));
    assert_ne!(
        url,
        common::amqp_url(),
        "AMQP_URL must name port 5672 for this test"
    );
    let queue_name = queue.name.clone();
    let connect = move || {
        let url = url.clone();
        let queue_name = queue_name.clone();
        async move {
            let connection =
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel.basic_qos(4, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    queue_name.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok(Session {
                connection,
                channel,
                consumer,
            })
        }
    };
    let stop = journal.until(|j| j.count("duplicate") + j.count("processed") >= 2);
    let runner = tokio::spawn(serve_reconnecting(
        connect,
        journal.clone().record(service),
        ServeOptions::new()
            .retry(RetryMode::Hold)
            .concurrency(4)
            .shutdown_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
            }),
    ));
    started.notified().await;
    assert!(
        proxy.cut() >= 1,
        "the consumer's connection went through the proxy"
    );
    let report = runner.await.unwrap().expect("serve_reconnecting");

    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the effect happened once"
    );
    assert_eq!(
        journal.events(),
        ["processed", "duplicate"],
        "the redelivered copy was recognised"
    );
    assert!(report.reconnects >= 1);
    assert!(
        report.unsettled >= 1,
        "the ack on the dead channel was not counted as done"
    );
    assert_eq!(finish(&direct, &queue).await, (0, 0));
}

#[tokio::test]
async fn acks_are_coalesced_without_acking_a_slow_or_failing_delivery_early() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "coalesce").await;
    const N: usize = 200;
    for n in 0..N {
        publish(
            &setup,
            &queue.name,
            format!("m{n}").as_bytes(),
            Some(&format!("m{n}")),
        )
        .await;
    }
    let effects = Arc::new(Mutex::new(std::collections::HashMap::<String, usize>::new()));
    let failed_once = Arc::new(AtomicUsize::new(0));
    let (e, f) = (effects.clone(), failed_once.clone());
    let journal = Journal::default();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(move |d: Delivery| {
        let (e, f) = (e.clone(), f.clone());
        async move {
            let body = String::from_utf8_lossy(&d.data).into_owned();
            if body == "m0" {
                // Slow: holds the lowest tag open while others finish.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if body == "m10" && f.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(HandlerError::retryable("first attempt fails"));
            }
            *e.lock().unwrap().entry(body).or_default() += 1;
            Ok(())
        }
    }));
    let (channel, consumer) = consume(&connection, &queue.name, 64).await;
    let stop = journal.until(|j| j.count("processed") >= N);
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .concurrency(64)
        .shutdown_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
        })
        .close_channel(channel);
    let report = serve(consumer, journal.clone().record(service), options)
        .await
        .expect("serve");

    let effects = effects.lock().unwrap().clone();
    assert_eq!(effects.len(), N, "every message took effect");
    assert!(effects.values().all(|n| *n == 1), "each exactly once");
    assert_eq!(
        report.unsettled, 0,
        "no ack was refused (a double ack would close the channel)"
    );
    assert_eq!(report.acked, N as u64);
    assert_eq!(report.requeued, 1);
    assert!(
        report.frames <= report.acked + report.requeued,
        "{report:?}"
    );
    assert_eq!(
        finish(&connection, &queue).await,
        (0, 0),
        "nothing left unacked or dead-lettered"
    );
}

#[tokio::test]
async fn a_reused_channel_falls_back_to_single_acks() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "reuse").await;
    for n in 0..20 {
        publish(&setup, &queue.name, b"x", Some(&format!("r{n}"))).await;
    }
    let journal = Journal::default();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(|_d: Delivery| async {
        Ok::<_, HandlerError>(())
    }));
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut reports = Vec::new();
    for (round, target) in [(0, 5), (1, 20)] {
        // The same channel, a new consumer: tags go on from where they were.
        let consumer = channel
            .basic_consume(
                queue.name.as_str().into(),
                format!("c{round}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let stop = journal.until(move |j| j.count("processed") >= target);
        let options = ServeOptions::new()
            .retry(RetryMode::Hold)
            .concurrency(1)
            .shutdown_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
            })
            .channel(channel.clone());
        reports.push(
            serve(consumer, journal.clone().record(service.clone()), options)
                .await
                .unwrap(),
        );
    }
    let second = reports[1];
    assert_eq!(second.unsettled, 0, "{second:?}");
    assert_eq!(
        second.frames,
        second.acked + second.requeued,
        "one frame per delivery: {second:?}"
    );
    assert_eq!(journal.count("processed"), 20);
    let _ = channel.close(200, "OK".into()).await;
    assert_eq!(finish(&connection, &queue).await, (0, 0));
}

#[tokio::test]
async fn a_missing_dead_letter_exchange_is_reported_at_start() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "nodlx").await;
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(|_d: Delivery| async {
        Ok::<_, HandlerError>(())
    }));
    let (channel, consumer) = consume(&connection, &queue.name, 1).await;
    let missing = common::unique("no-such-exchange");
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .shutdown_on(std::future::pending())
        .dead_letter_exchange(missing.clone())
        .close_channel(channel);
    let err = tokio::time::timeout(Duration::from_secs(10), serve(consumer, service, options))
        .await
        .expect("serve returns at once")
        .expect_err("the exchange does not exist");
    assert!(
        matches!(&err, amqp_idempotency::ServeError::DeadLetters { target, .. } if target.contains(&missing)),
        "{err}"
    );
    assert!(err.to_string().contains("declare it"), "{err}");
    let _ = finish(&connection, &queue).await;
}

#[tokio::test]
async fn serve_follows_lapins_automatic_recovery_after_a_cut_connection() {
    let proxy = common::Proxy::start(5672).await;
    let direct = amqp().await;
    let setup = direct.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "recover").await;
    let url = common::amqp_url().replace(":5672", &format!(":{}", proxy.port));
    assert_ne!(
        url,
        common::amqp_url(),
        "AMQP_URL must name port 5672 for this test"
    );
    let recovering = lapin::Connection::connect(
        &url,
        lapin::ConnectionProperties::default().enable_auto_recover(),
    )
    .await
    .expect("connect through the proxy");
    let (channel, consumer) = consume(&recovering, &queue.name, 8).await;
    let journal = Journal::default();
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(move |_d: Delivery| {
        let s = s.clone();
        async move {
            s.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, HandlerError>(())
        }
    }));
    // The copy of `first` whose ack died with the old channel comes back
    // as a duplicate; `second` is published after the cut.
    let stop = journal.until(|j| j.count("processed") >= 2 && j.count("duplicate") >= 1);
    let runner = tokio::spawn(serve(
        consumer,
        journal.clone().record(service),
        ServeOptions::new()
            .retry(RetryMode::Hold)
            .concurrency(8)
            .shutdown_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
            })
            .channel(channel),
    ));
    publish(&setup, &queue.name, b"first", Some("first-1")).await;
    started.notified().await;
    assert!(
        proxy.cut() >= 1,
        "the consumer's connection went through the proxy"
    );
    publish(&setup, &queue.name, b"second", Some("second-1")).await;
    let report = runner
        .await
        .unwrap()
        .expect("serve keeps consuming through lapin's recovery");
    assert_eq!(journal.count("processed"), 2, "{:?}", journal.events());
    assert_eq!(journal.count("duplicate"), 1, "{:?}", journal.events());
    assert!(report.reconnects >= 1, "{report:?}");
    assert!(
        report.unsettled >= 1,
        "the ack on the old channel was never counted as done: {report:?}"
    );
    assert_eq!(finish(&direct, &queue).await, (0, 0));
}

#[tokio::test]
async fn an_unconfirmed_parking_copy_leaves_the_original_in_its_queue() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "unparked").await;
    let journal = Journal::default();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(|d: Delivery| async move {
        if d.data == b"ok" {
            Ok(())
        } else {
            Err(HandlerError::permanent("never valid"))
        }
    }));
    let (channel, consumer) = consume(&connection, &queue.name, 4).await;
    let stop = journal.until(|j| j.count("failed") >= 2);
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .concurrency(4)
        .shutdown_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
        })
        .close_channel(channel);
    let runner = tokio::spawn(serve(consumer, journal.clone().record(service), options));
    // Once the runner runs (it declared the parking queue at start), the
    // parking queue vanishes.
    publish(&setup, &queue.name, b"ok", Some("ok-1")).await;
    let started = journal.until(|j| j.count("processed") >= 1);
    tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("the runner processed the first message");
    assert!(
        eventually(Duration::from_secs(5), || {
            let setup = setup.clone();
            let dead = queue.dead.clone();
            async move {
                setup
                    .queue_delete(dead.as_str().into(), Default::default())
                    .await
                    .is_ok()
            }
        })
        .await
    );
    publish(&setup, &queue.name, b"invalid", Some("invalid-1")).await;
    let report = runner.await.unwrap().expect("serve");
    assert_eq!(report.dead_lettered, 0, "no copy was confirmed: {report:?}");
    assert!(
        report.requeued >= 1,
        "the original was requeued: {report:?}"
    );
    let channel = connection.create_channel().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let channel = channel.clone();
            let name = queue.name.clone();
            async move { ready_count(&channel, &name).await == 1 }
        })
        .await,
        "the message is back in its own queue, not dropped"
    );
    queue.delete(&channel).await;
}

#[tokio::test]
async fn the_brokers_own_dead_lettering_is_an_explicit_opt_in() {
    use amqp_idempotency::DeadLetterTarget;
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, LongString};

    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    // A queue of the user's with its own dead-letter exchange.
    let name = common::unique("brokerdlx");
    let dlx = format!("{name}.dlx");
    let dlq = format!("{name}.dlq");
    setup
        .exchange_declare(
            dlx.as_str().into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut expires = FieldTable::default();
    expires.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
    setup
        .queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions::default(),
            expires.clone(),
        )
        .await
        .unwrap();
    setup
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut args = expires;
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dlx.as_str())),
    );
    setup
        .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    publish(&setup, &name, b"invalid", Some("invalid-2")).await;
    let journal = Journal::default();
    let service = IdempotencyLayer::new(redis_store().await, &name, config(&common::unique("p")))
        .unwrap()
        .layer(service_fn(|_d: Delivery| async {
            Err::<(), _>(HandlerError::permanent("never valid"))
        }));
    let (_channel, consumer) = consume(&connection, &name, 4).await;
    let stop = journal.until(|j| j.count("failed") >= 1);
    // No channel given: fine for the broker's dead-lettering, which rejects.
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .dead_letters(DeadLetterTarget::Broker)
        .shutdown_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
        });
    let report = serve(consumer, journal.clone().record(service), options)
        .await
        .expect("serve");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let channel = connection.create_channel().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let channel = channel.clone();
            let dlq = dlq.clone();
            async move { ready_count(&channel, &dlq).await == 1 }
        })
        .await,
        "the queue's own dead-letter exchange took it"
    );
    for queue in [&name, &dlq] {
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
}

#[tokio::test]
async fn without_a_channel_the_parking_queue_is_refused_at_start() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "nochannel").await;
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(|_d: Delivery| async {
        Ok::<_, HandlerError>(())
    }));
    let (_channel, consumer) = consume(&connection, &queue.name, 1).await;
    let err = serve(
        consumer,
        service,
        ServeOptions::new()
            .retry(RetryMode::Hold)
            .shutdown_on(std::future::pending()),
    )
    .await
    .expect_err("no channel to publish dead letters on");
    let text = err.to_string();
    assert!(
        text.contains(&queue.dead),
        "names the parking queue: {text}"
    );
    assert!(
        text.contains("ServeOptions::channel"),
        "says what to do: {text}"
    );
    let _ = finish(&connection, &queue).await;
}

#[tokio::test]
async fn replay_moves_parked_messages_back_after_a_dry_run() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions};
    use lapin::types::{AMQPValue, LongString};

    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "replay").await;
    for id in ["r1", "r2", "r3"] {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-idempotency-queue".into(),
            AMQPValue::LongString(LongString::from(queue.name.as_str())),
        );
        headers.insert(
            "x-idempotency-outcome".into(),
            AMQPValue::LongString(LongString::from("failed")),
        );
        setup
            .basic_publish(
                "".into(),
                queue.dead.as_str().into(),
                BasicPublishOptions::default(),
                id.as_bytes(),
                lapin::BasicProperties::default()
                    .with_message_id(id.into())
                    .with_headers(headers),
            )
            .await
            .unwrap();
    }
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_amqp-idempotency"))
            .arg("replay")
            .args(args)
            .env("AMQP_URL", common::amqp_url())
            .output()
            .expect("run amqp-idempotency")
    };
    let counts = |channel: Channel| {
        let (name, dead) = (queue.name.clone(), queue.dead.clone());
        async move {
            (
                ready_count(&channel, &name).await,
                ready_count(&channel, &dead).await,
            )
        }
    };
    let reader = connection.create_channel().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let reader = reader.clone();
            let counts = &counts;
            async move { counts(reader).await == (0, 3) }
        })
        .await
    );

    let dry = cli(&[&queue.dead]);
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(dry.status.code(), Some(1), "a dry run by default: {stdout}");
    assert_eq!(stdout.matches("would move").count(), 3, "{stdout}");
    assert!(
        eventually(Duration::from_secs(5), || {
            let reader = reader.clone();
            let counts = &counts;
            async move { counts(reader).await == (0, 3) }
        })
        .await,
        "a dry run moves nothing"
    );

    let moved = cli(&[&queue.dead, "--count", "2", "--yes"]);
    let stdout = String::from_utf8_lossy(&moved.stdout);
    assert_eq!(
        moved.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(stdout.contains("moved 2 message(s)"), "{stdout}");
    assert!(
        eventually(Duration::from_secs(5), || {
            let reader = reader.clone();
            let counts = &counts;
            async move { counts(reader).await == (2, 1) }
        })
        .await,
        "bounded by --count"
    );
    let back = reader
        .basic_get(queue.name.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a replayed message");
    let headers = back
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let names: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
    assert!(!names.contains(&"x-idempotency-outcome"), "{names:?}");
    assert!(names.contains(&"x-idempotency-replayed-from"), "{names:?}");

    // Into a queue that does not exist: refused, and the message stays parked.
    let missing = common::unique("nowhere");
    let refused = cli(&[&queue.dead, "--to", &missing, "--yes"]);
    assert_eq!(
        refused.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let reader = reader.clone();
            let counts = &counts;
            async move { counts(reader).await.1 == 1 }
        })
        .await,
        "the message stays in the parking queue"
    );
    queue.delete(&reader).await;
}

#[tokio::test]
async fn a_full_redis_does_not_burn_a_quorum_queues_delivery_limit() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, LongString};

    // RabbitMQ 4 gives quorum queues a delivery limit by default; here it
    // is set explicitly, and low: each requeue while Redis refuses writes
    // would count against it, and the broker would drop the message.
    let redis = common::PrivateRedis::start();
    let store = RedisStore::connect_url(&redis.url())
        .await
        .expect("connect to the private redis");
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let name = common::unique("quorum");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(2));
    setup
        .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("declare a quorum queue");
    common::redis_cli(
        redis.port,
        None,
        &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
    );
    common::redis_cli(redis.port, None, &["CONFIG", "SET", "maxmemory", "1"]);
    publish(&setup, &name, b"charge", Some("charge-q")).await;

    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let layer = IdempotencyLayer::new(store, &name, config(&common::unique("p"))).unwrap();
    let dedup = layer.deduplicator().clone();
    let journal = Journal::default();
    let service = journal
        .clone()
        .record(layer.layer(service_fn(move |_d: Delivery| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        })));
    let processed = journal.until(|j| j.count("processed") >= 1);
    let port = redis.port;
    let fixer = tokio::spawn(async move {
        // Paused on the refused write, for longer than several requeues take.
        while !dedup.store_is_down() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        common::redis_cli(port, None, &["CONFIG", "SET", "maxmemory", "0"]);
    });
    let report = run_until(&connection, &name, service, processed).await;
    fixer.await.expect("the fixer");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "processed once: {:?}",
        journal.events()
    );
    assert_eq!(journal.events(), ["processed"], "held, never requeued");
    assert_eq!(report.requeued, 0, "{report:?}");
    assert_eq!(report.acked, 1, "{report:?}");
    let channel = connection.create_channel().await.unwrap();
    assert_eq!(ready_count(&channel, &name).await, 0);
    for queue in [name.clone(), format!("{name}.dead")] {
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
}

/// Moves `slots` hash slots from one cluster master to another with
/// `redis-cli --cluster reshard` (keys move with MIGRATE, clients meet ASK
/// and MOVED redirections meanwhile).
fn reshard(nodes: &[String], from: &str, to: &str, slots: u32) {
    let seed = nodes[0].trim_start_matches("redis://");
    let output = std::process::Command::new("redis-cli")
        .args(["--cluster", "reshard", seed, "--cluster-from", from])
        .args(["--cluster-to", to, "--cluster-slots", &slots.to_string()])
        .args(["--cluster-yes", "--cluster-pipeline", "10"])
        .output()
        .expect("run redis-cli --cluster reshard");
    assert!(
        output.status.success(),
        "reshard {slots} slots from {from} to {to}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn node_id(node: &str) -> String {
    common::redis_cli_at(node, &["CLUSTER", "MYID"])
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_cluster_reshard_while_messages_flow_loses_nothing_and_runs_nothing_twice() {
    let nodes = common::cluster_nodes();
    let (a, b) = (node_id(&nodes[0]), node_id(&nodes[1]));
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "reshard").await;
    let effects: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
    let journal = Journal::default();
    let seen = effects.clone();
    let service = IdempotencyLayer::new(
        common::cluster_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(move |d: Delivery| {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        *seen.lock().unwrap().entry(id).or_default() += 1;
        async { Ok::<_, HandlerError>(()) }
    }));
    // Messages keep arriving while 1000 slots move from the first master to
    // the second, and back.
    let published = Arc::new(AtomicUsize::new(0));
    let resharding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let publisher = {
        let channel = connection.create_channel().await.unwrap();
        let (name, published, resharding) =
            (queue.name.clone(), published.clone(), resharding.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while resharding.load(Ordering::SeqCst) || n < 200 {
                let id = format!("reshard-{n}");
                publish(&channel, &name, id.as_bytes(), Some(&id)).await;
                n += 1;
                published.store(n, Ordering::SeqCst);
            }
            // A redelivered copy of every tenth message: a duplicate.
            for n in (0..n).step_by(10) {
                let id = format!("reshard-{n}");
                publish(&channel, &name, id.as_bytes(), Some(&id)).await;
            }
            n
        })
    };
    let mover = {
        let (nodes, resharding) = (nodes.clone(), resharding.clone());
        tokio::task::spawn_blocking(move || {
            reshard(&nodes, &a, &b, 1000);
            reshard(&nodes, &b, &a, 1000);
            resharding.store(false, Ordering::SeqCst);
        })
    };
    let stop = {
        let journal = journal.clone();
        let published = published.clone();
        let resharding = resharding.clone();
        async move {
            loop {
                journal.until(|j| !j.events().is_empty()).await;
                let total = published.load(Ordering::SeqCst);
                let expected = total + total.div_ceil(10);
                if !resharding.load(Ordering::SeqCst) && journal.events().len() >= expected {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (report, moved, sent) = tokio::join!(
        run_until(
            &connection,
            &queue.name,
            journal.clone().record(service),
            stop
        ),
        mover,
        publisher
    );
    moved.expect("the reshard ran");
    let sent = sent.expect("the publisher ran");
    let effects = effects.lock().unwrap().clone();
    assert_eq!(effects.len(), sent, "every message ran: none lost");
    let twice: Vec<_> = effects.iter().filter(|(_, runs)| **runs != 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    assert_eq!(journal.count("processed"), sent);
    assert_eq!(journal.count("duplicate"), sent.div_ceil(10));
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(finish(&connection, &queue).await, (0, 0));
}

/// Takes the first message parked in `dead`, waiting up to 5 s for it.
async fn parked(connection: &Connection, dead: &str) -> Option<lapin::message::BasicGetMessage> {
    use lapin::options::BasicGetOptions;
    let reader = connection.create_channel().await.unwrap();
    for _ in 0..100 {
        let got = reader
            .basic_get(dead.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if got.is_some() {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A header of a parked copy, as text (`None` when absent or not a string).
fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    headers
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .and_then(|(_, v)| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        })
}

/// A permanent failure whose error echoes a large body: before, the whole
/// message went into `x-idempotency-reason`, the header frame passed
/// `frame_max`, and RabbitMQ closed the connection (FRAME_ERROR).
#[tokio::test]
async fn a_huge_failure_reason_is_bounded_and_the_connection_stays_open() {
    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "huge-reason").await;
    publish(&setup, &queue.name, b"echo me", Some("huge-1")).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let journal = Journal::default();
    let r = runs.clone();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(move |_d: Delivery| {
        r.fetch_add(1, Ordering::SeqCst);
        // 150 KB of two-byte characters: a cut in the middle of one would
        // not be UTF-8.
        let echo = "é".repeat(75_000);
        async move { Err::<(), _>(HandlerError::permanent(format!("rejected body: {echo}"))) }
    }));
    let (channel, consumer) = consume(&connection, &queue.name, 4).await;
    let stop = journal.until(|j| !j.events().is_empty());
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .concurrency(4)
        .shutdown_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
        })
        .close_channel(channel);
    let served = serve(consumer, journal.clone().record(service), options).await;

    assert!(
        connection.status().connected(),
        "the connection stays open: {served:?}"
    );
    let report = served.expect("serve");
    assert_eq!(journal.events(), ["failed"]);
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let dead = parked(&connection, &queue.dead)
        .await
        .expect("the message is parked");
    assert_eq!(dead.delivery.data, b"echo me");
    let reason = header_text(&dead.delivery, "x-idempotency-reason").expect("a reason");
    assert!(reason.len() <= 1024, "bounded: {} bytes", reason.len());
    assert!(reason.contains("rejected body: é"), "{reason}");
    assert!(reason.contains("[truncated "), "says it was cut: {reason}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(
        finish(&connection, &queue).await,
        (0, 0),
        "the original was acked, its parked copy read"
    );
}

/// The original's own headers can fill most of a frame: the parked copy
/// then goes without the ones that do not fit, and says which, instead of
/// killing the connection in a loop under `serve_reconnecting`.
#[tokio::test]
async fn a_parked_copy_that_cannot_fit_frame_max_drops_the_oversized_headers_and_says_so() {
    use amqp_idempotency::{Session, serve_reconnecting};
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, LongString};

    let direct = amqp().await;
    let frame_max = direct.configuration().frame_max();
    assert!(
        (8192..=1 << 20).contains(&frame_max),
        "this test needs the broker's frame_max bounded (RabbitMQ's default is 131072): {frame_max}"
    );
    let setup = direct.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "big-headers").await;
    let mut headers = FieldTable::default();
    // The original just fits the negotiated frame_max; with the reason
    // headers added, its copy cannot.
    let big = usize::try_from(frame_max).unwrap() - 600;
    headers.insert(
        "x-big".into(),
        AMQPValue::LongString(LongString::from("b".repeat(big))),
    );
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    let properties = BasicProperties::default()
        .with_message_id("big-1".into())
        .with_headers(headers);
    common::publish_with(&setup, &queue.name, b"payload", properties).await;

    let runs = Arc::new(AtomicUsize::new(0));
    let journal = Journal::default();
    let r = runs.clone();
    let service = IdempotencyLayer::new(
        redis_store().await,
        &queue.name,
        config(&common::unique("p")),
    )
    .unwrap()
    .layer(service_fn(move |_d: Delivery| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(HandlerError::permanent("x".repeat(5_000))) }
    }));
    let queue_name = queue.name.clone();
    let connect = move || {
        let queue_name = queue_name.clone();
        async move {
            let connection = lapin::Connection::connect(
                &common::amqp_url(),
                lapin::ConnectionProperties::default(),
            )
            .await?;
            let channel = connection.create_channel().await?;
            channel.basic_qos(4, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    queue_name.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok(Session {
                connection,
                channel,
                consumer,
            })
        }
    };
    let stop = journal.until(|j| !j.events().is_empty());
    let runner = tokio::spawn(serve_reconnecting(
        connect,
        journal.clone().record(service),
        ServeOptions::new()
            .retry(RetryMode::Hold)
            .concurrency(4)
            .shutdown_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
            }),
    ));
    let dead = parked(&direct, &queue.dead).await;
    let report = runner.await.unwrap().expect("serve_reconnecting");
    let dead = dead.expect("the message is parked");
    assert_eq!(report.reconnects, 0, "no connection was lost: {report:?}");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(dead.delivery.data, b"payload");
    assert_eq!(
        header_text(&dead.delivery, "x-idempotency-headers-dropped").as_deref(),
        Some("x-big"),
        "the copy says which header it goes without"
    );
    assert_eq!(header_text(&dead.delivery, "x-big"), None);
    assert_eq!(
        header_text(&dead.delivery, "tenant").as_deref(),
        Some("acme"),
        "the headers that fit are kept"
    );
    assert_eq!(
        header_text(&dead.delivery, "x-idempotency-outcome").as_deref(),
        Some("failed")
    );
    assert_eq!(
        header_text(&dead.delivery, "x-idempotency-queue").as_deref(),
        Some(queue.name.as_str())
    );
    assert!(header_text(&dead.delivery, "x-idempotency-reason").is_some_and(|r| r.len() <= 1024));
    assert_eq!(finish(&direct, &queue).await, (0, 0));
}

/// The record of a dead-lettered message is discarded only once its
/// parked copy is confirmed: when the copy comes back unroutable (the
/// parking queue was deleted), the claim is released with its attempt
/// count, so the requeued original neither starts again from attempt 1
/// nor is lost; once the parking queue is back, it is parked with the
/// count kept, and only then is its record gone.
#[tokio::test]
async fn an_unconfirmed_parking_copy_keeps_the_record_and_its_attempt_count() {
    use lapin::types::AMQPValue;

    let connection = amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = declare_queue(&setup, "kept").await;
    let store = redis_store().await;
    let prefix = common::unique("p");
    let runs = Arc::new(AtomicUsize::new(0));
    let journal = Journal::default();
    let r = runs.clone();
    let service = journal.clone().record(
        IdempotencyLayer::new(store.clone(), &queue.name, config(&prefix))
            .unwrap()
            .layer(service_fn(move |d: Delivery| {
                let r = r.clone();
                async move {
                    if d.data == b"ok" {
                        return Ok(());
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::permanent("never valid"))
                }
            })),
    );
    let serve_until = |failures: usize| {
        let stop = journal.until(move |j| j.count("failed") >= failures);
        ServeOptions::new()
            .retry(RetryMode::Hold)
            .concurrency(4)
            .shutdown_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), stop).await;
            })
    };
    let (channel, consumer) = consume(&connection, &queue.name, 4).await;
    let first = tokio::spawn(serve(
        consumer,
        service.clone(),
        serve_until(1).close_channel(channel),
    ));
    // Once the runner runs (it declared the parking queue at start), the
    // parking queue vanishes.
    publish(&setup, &queue.name, b"ok", Some("ok-1")).await;
    tokio::time::timeout(
        Duration::from_secs(10),
        journal.until(|j| j.count("processed") >= 1),
    )
    .await
    .expect("the runner processed the first message");
    setup
        .queue_delete(queue.dead.as_str().into(), Default::default())
        .await
        .expect("delete the parking queue");
    publish(&setup, &queue.name, b"invalid", Some("invalid-1")).await;
    let report = first.await.unwrap().expect("serve");
    assert_eq!(report.dead_lettered, 0, "no copy was confirmed: {report:?}");
    let key = format!("{prefix}:{}:invalid-1", queue.name);
    let record = store
        .get(&key)
        .await
        .unwrap()
        .map(|(value, _)| state(&value));
    assert!(
        matches!(record, Some(State::Released { attempts: 1, .. })),
        "the record is kept, released with its attempt count: {record:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let setup = setup.clone();
            let name = queue.name.clone();
            async move { ready_count(&setup, &name).await == 1 }
        })
        .await,
        "the original is back in its queue, not dropped"
    );

    // The parking queue is back (the runner declares it at start): the
    // message is parked with its attempt count kept, and only then is its
    // record discarded.
    let (channel, consumer) = consume(&connection, &queue.name, 4).await;
    let report = serve(consumer, service, serve_until(2).close_channel(channel))
        .await
        .expect("serve");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let dead = parked(&connection, &queue.dead)
        .await
        .expect("the message is parked");
    let attempts = dead
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default()
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == "x-idempotency-attempts")
        .map(|(_, v)| v.clone());
    assert_eq!(
        attempts,
        Some(AMQPValue::LongLongInt(2)),
        "the second run counts as the second attempt"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "discarded once the copy was confirmed"
    );
    assert_eq!(finish(&connection, &queue).await, (0, 0));
}
