//! The outbox end to end, against the real RabbitMQ and Redis: what a
//! handler stages is published once its done mark is committed, before
//! the ack; duplicates finish what was not sent and get the stored reply;
//! and a consumer that dies at any point of that sequence still sends
//! every outgoing message at least once, always with the same message id.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqp_idempotency::outbox::{Checkpoint, OutboxDelivery, OutboxPublisher};
use amqp_idempotency::store::{RedisStore, Store};
use amqp_idempotency::{
    Config, HandlerError, IdempotencyLayer, RetryMode, ServeOptions, ServeReport, serve,
};
use common::{TestQueue, amqp, consume, declare_queue, eventually, ready_count, redis_store};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tower::{Layer, service_fn};

fn config(prefix: &str) -> Config {
    Config::default()
        .with_key_prefix(prefix)
        .with_lease_ttl(Duration::from_secs(1))
        .with_in_progress_wait(Duration::from_secs(1))
        .with_handler_timeout(Duration::from_millis(800))
        .with_retry_backoff(Duration::from_millis(20))
        .with_retry_backoff_max(Duration::from_millis(100))
}

/// Publishes an incoming message, confirmed.
async fn send(channel: &Channel, queue: &str, id: &str, body: &[u8], reply: Option<(&str, &str)>) {
    let mut properties = BasicProperties::default().with_message_id(id.into());
    if let Some((reply_to, correlation_id)) = reply {
        properties = properties
            .with_reply_to(reply_to.into())
            .with_correlation_id(correlation_id.into());
    }
    common::publish_with(channel, queue, body, properties).await;
}

/// What reached a queue: (message_id, correlation_id, body), in order.
type Received = Vec<(String, Option<String>, Vec<u8>)>;

/// Takes every message now in `queue`.
async fn drain(channel: &Channel, queue: &str) -> Received {
    let mut received = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let properties = &message.delivery.properties;
        received.push((
            properties
                .message_id()
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            properties
                .correlation_id()
                .as_ref()
                .map(ToString::to_string),
            message.delivery.data.clone(),
        ));
    }
    received
}

/// Drains `queue` until `expected` messages came, or 10 s passed.
async fn collect(channel: &Channel, queue: &str, expected: usize) -> Received {
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while received.len() < expected && tokio::time::Instant::now() < deadline {
        received.extend(drain(channel, queue).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Anything beyond what was expected, sent a little later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    received.extend(drain(channel, queue).await);
    received
}

fn ids(received: &Received) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for (id, _, _) in received {
        *ids.entry(id.clone()).or_default() += 1;
    }
    ids
}

/// A consumer of `queue` with an outbox on `publisher`, running until
/// `stop` is notified; counts its handler runs in `runs`. The handler
/// stages `charge <body>` twice to `downstream`, and replies `quote <body>`.
struct Consumer {
    task: tokio::task::JoinHandle<ServeReport>,
    connection: Connection,
    stop: Arc<tokio::sync::Notify>,
}

fn handler(
    downstream: String,
    runs: Arc<AtomicUsize>,
) -> impl tower::Service<
    OutboxDelivery,
    Response = (),
    Error = HandlerError,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    service_fn(move |incoming: OutboxDelivery| {
        let downstream = downstream.clone();
        let runs = Arc::clone(&runs);
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let body = incoming.delivery.data.clone();
            for n in 0..2 {
                let mut out = format!("charge {n} ").into_bytes();
                out.extend_from_slice(&body);
                incoming.outbox.publish(
                    "",
                    &downstream,
                    BasicProperties::default().with_delivery_mode(2),
                    out,
                )?;
            }
            let mut quote = b"quote ".to_vec();
            quote.extend_from_slice(&body);
            incoming.outbox.reply(BasicProperties::default(), quote)?;
            Ok::<_, HandlerError>(())
        }
    })
}

async fn start<St: Store + Clone>(
    store: St,
    queue: &str,
    config: &Config,
    publisher: OutboxPublisher,
    downstream: &str,
    runs: &Arc<AtomicUsize>,
) -> Consumer {
    let service = IdempotencyLayer::new(store, queue, config.clone())
        .expect("layer")
        .with_outbox(publisher)
        .layer(handler(downstream.to_owned(), Arc::clone(runs)));
    Consumer::serve(queue, service).await
}

impl Consumer {
    /// Serves `queue` with `service` on a connection of its own (8
    /// deliveries in flight) until stopped or killed.
    async fn serve<S>(queue: &str, service: S) -> Self
    where
        S: tower::Service<
                lapin::message::Delivery,
                Response = amqp_idempotency::Outcome,
                Error = amqp_idempotency::BoxError,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let connection = amqp().await;
        let (channel, consumer) = consume(&connection, queue, 8).await;
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = Arc::clone(&stop);
        let options = ServeOptions::new()
            .retry(RetryMode::Hold)
            .concurrency(8)
            .shutdown_on(async move { stopped.notified().await })
            .close_channel(channel);
        let task =
            tokio::spawn(async move { serve(consumer, service, options).await.expect("serve") });
        Self {
            task,
            connection,
            stop,
        }
    }

    /// Stops as a consumer would on SIGTERM, letting what is in flight
    /// finish; returns its report.
    async fn stop(self) -> ServeReport {
        self.stop.notify_one();
        let report = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the consumer stopped in time")
            .expect("the consumer's task");
        let _ = self.connection.close(200, "OK".into()).await;
        report
    }

    /// Dies as a killed process would: its tasks stop where they are, its
    /// connection drops, unacked deliveries return to the queue, and its
    /// Redis records stay as they were.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = self.connection.close(320, "killed".into()).await;
    }
}

async fn finish(channel: &Channel, queue: &TestQueue, downstream: &str) -> (u32, u32) {
    let counts = (
        ready_count(channel, &queue.name).await,
        ready_count(channel, &queue.dead).await,
    );
    queue.delete(channel).await;
    let _ = channel
        .queue_delete(downstream.into(), Default::default())
        .await;
    counts
}

async fn outgoing_messages_are_published_after_the_commit_and_a_duplicate_sends_nothing_again<
    St: Store + Clone,
>(
    store: St,
) {
    let connection = amqp().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = declare_queue(&channel, "outbox").await;
    let downstream = common::scratch_queue(&channel, "outbox-down").await;
    let config = config("ob1");
    let runs = Arc::new(AtomicUsize::new(0));
    let consumer = start(
        store.clone(),
        &queue.name,
        &config,
        OutboxPublisher::connect(&config),
        &downstream,
        &runs,
    )
    .await;

    send(&channel, &queue.name, "order-1", b"o1", None).await;
    let first = collect(&channel, &downstream, 2).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let channel = channel.clone();
            let queue = queue.name.clone();
            async move { ready_count(&channel, &queue).await == 0 }
        })
        .await
    );
    send(&channel, &queue.name, "order-1", b"o1", None).await;
    // The duplicate is acked without running the handler or sending again.
    assert!(
        eventually(Duration::from_secs(10), || {
            let channel = channel.clone();
            let queue = queue.name.clone();
            async move { ready_count(&channel, &queue).await == 0 }
        })
        .await
    );
    let again = collect(&channel, &downstream, 1).await;
    consumer.stop().await;

    let scope = &queue.name;
    let expected: BTreeMap<String, usize> = [
        (format!("{scope}:order-1:0"), 1),
        (format!("{scope}:order-1:1"), 1),
    ]
    .into();
    assert_eq!(
        ids(&first),
        expected,
        "each outgoing message once, with its id"
    );
    assert_eq!(first[0].2, b"charge 0 o1", "in the order staged");
    assert_eq!(first[1].2, b"charge 1 o1");
    assert!(again.is_empty(), "the duplicate sent nothing: {again:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    // Dispatched messages are dropped from the outbox; the reply stays.
    let key = format!("ob1:{scope}:order-1");
    let left = store
        .outbox(&amqp_idempotency::outbox::outbox_key(&key))
        .await
        .expect("read the outbox");
    let fields: Vec<&[u8]> = left.iter().map(|(field, _)| &field[..]).collect();
    assert_eq!(
        fields,
        [&b"r"[..], b"t"],
        "only the reply (and the commit time) is kept"
    );
    assert_eq!(finish(&channel, &queue, &downstream).await, (0, 0));
}

/// Runs an end-to-end test against each Redis deployment: the standalone
/// Redis 7 at REDIS_URL, the 3-master Redis Cluster and Valkey 8.1.
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
                        super::super::$name(super::super::common::valkey_store().await).await;
                    }
                }
            )*
        }
    };
}

on_every_deployment!(
    outgoing_messages_are_published_after_the_commit_and_a_duplicate_sends_nothing_again,
);

/// A delivery whose outbox is committed but not yet confirmed is held up
/// to half the consumer timeout, then requeued: its done mark and outbox
/// must still be there when the copy comes back, whatever the retention of
/// plain done marks, or the copy would run the handler again.
#[tokio::test]
async fn an_outbox_commit_outlives_the_hold_of_an_undispatched_delivery() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = declare_queue(&channel, "outbox-retention").await;
    let downstream = common::scratch_queue(&channel, "outbox-retention-down").await;
    let consumer_timeout = Duration::from_secs(600);
    let config = config("obret")
        .with_done_ttl(Duration::from_secs(5))
        .with_consumer_timeout(consumer_timeout);
    let runs = Arc::new(AtomicUsize::new(0));
    let consumer = start(
        redis_store().await,
        &queue.name,
        &config,
        OutboxPublisher::connect(&config),
        &downstream,
        &runs,
    )
    .await;
    send(&channel, &queue.name, "order-r", b"or", None).await;
    let sent = collect(&channel, &downstream, 2).await;
    consumer.stop().await;
    assert_eq!(sent.len(), 2, "{sent:?}");

    let key = format!("obret:{}:order-r", queue.name);
    let hold = consumer_timeout / 2;
    let client = redis::Client::open(common::redis_url()).expect("the Redis URL");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    for key in [key.clone(), amqp_idempotency::outbox::outbox_key(&key)] {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap_or_else(|err| panic!("PTTL {key:?}: {err}"));
        assert!(
            pttl > hold.as_millis() as i64,
            "{key:?} expires in {pttl} ms, before a delivery held for {hold:?} comes back \
             (IDEMPOTENCY_DONE_TTL is {:?})",
            Duration::from_secs(5)
        );
    }
    assert_eq!(finish(&channel, &queue, &downstream).await, (0, 0));
}

#[tokio::test]
async fn nothing_a_failed_attempt_staged_is_published() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = declare_queue(&channel, "outbox-fail").await;
    let downstream = common::scratch_queue(&channel, "outbox-fail-down").await;
    let config = config("ob2");
    let store = redis_store().await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&attempts);
    let target = downstream.clone();
    // A connection of the caller's, rather than one of the publisher's own.
    let publishing = amqp().await;
    let service = IdempotencyLayer::new(store, &queue.name, config.clone())
        .unwrap()
        .with_outbox(OutboxPublisher::new(publishing))
        .layer(service_fn(move |incoming: OutboxDelivery| {
            let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
            let target = target.clone();
            async move {
                let body = format!("from attempt {attempt}");
                incoming
                    .outbox
                    .publish("", &target, BasicProperties::default(), body)?;
                if attempt == 1 {
                    return Err(HandlerError::retryable("the first attempt fails"));
                }
                Ok(())
            }
        }));
    let consumer = Consumer::serve(&queue.name, service).await;
    send(&channel, &queue.name, "order-2", b"o2", None).await;
    let received = collect(&channel, &downstream, 1).await;
    let report = consumer.stop().await;

    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(report.acked, 1);
    let bodies: Vec<&[u8]> = received.iter().map(|(_, _, body)| &body[..]).collect();
    assert_eq!(
        bodies,
        [&b"from attempt 2"[..]],
        "only the successful run's message"
    );
    assert_eq!(finish(&channel, &queue, &downstream).await, (0, 0));
}

#[tokio::test]
async fn staging_past_the_limit_dead_letters_and_publishes_nothing() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = declare_queue(&channel, "outbox-limit").await;
    let downstream = common::scratch_queue(&channel, "outbox-limit-down").await;
    // Two 40-byte bodies and their framing fit; the reply does not.
    let config = config("ob3").with_outbox_max_bytes(100);
    let runs = Arc::new(AtomicUsize::new(0));
    let consumer = start(
        redis_store().await,
        &queue.name,
        &config,
        OutboxPublisher::connect(&config),
        &downstream,
        &runs,
    )
    .await;
    send(&channel, &queue.name, "order-3", &[b'x'; 40], None).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let channel = channel.clone();
            let dead = queue.dead.clone();
            async move { ready_count(&channel, &dead).await == 1 }
        })
        .await,
        "dead-lettered"
    );
    consumer.stop().await;
    let parked = drain(&channel, &queue.dead).await;
    assert_eq!(parked.len(), 1);
    assert!(
        drain(&channel, &downstream).await.is_empty(),
        "nothing published"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a permanent failure: no retry"
    );
    assert_eq!(finish(&channel, &queue, &downstream).await, (0, 0));
}

#[tokio::test]
async fn a_duplicate_request_gets_the_stored_reply_at_its_own_reply_to() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = declare_queue(&channel, "outbox-rpc").await;
    let downstream = common::scratch_queue(&channel, "outbox-rpc-down").await;
    let first_asker = common::scratch_queue(&channel, "asker-1").await;
    let second_asker = common::scratch_queue(&channel, "asker-2").await;
    let config = config("ob4");
    let runs = Arc::new(AtomicUsize::new(0));
    let consumer = start(
        redis_store().await,
        &queue.name,
        &config,
        OutboxPublisher::connect(&config),
        &downstream,
        &runs,
    )
    .await;

    send(
        &channel,
        &queue.name,
        "quote-9",
        b"q9",
        Some((&first_asker, "c-1")),
    )
    .await;
    let first = collect(&channel, &first_asker, 1).await;
    send(
        &channel,
        &queue.name,
        "quote-9",
        b"q9",
        Some((&second_asker, "c-2")),
    )
    .await;
    let second = collect(&channel, &second_asker, 1).await;
    let sent = collect(&channel, &downstream, 2).await;
    consumer.stop().await;

    let scope = &queue.name;
    let reply_id = |hash: &str| format!("{scope}:quote-9:reply:{hash}");
    // The first 16 hex digits of SHA-256("c-1") and of SHA-256("c-2").
    assert_eq!(
        first,
        vec![(
            reply_id("a6f7ef47ee8dc84a"),
            Some("c-1".into()),
            b"quote q9".to_vec()
        )]
    );
    assert_eq!(
        second,
        vec![(
            reply_id("6260cd1bca682c8e"),
            Some("c-2".into()),
            b"quote q9".to_vec()
        )],
        "the stored reply, at the duplicate's reply_to with its correlation_id"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(sent.len(), 2, "the messages went once: {sent:?}");
    for asker in [&first_asker, &second_asker] {
        let _ = channel
            .queue_delete(asker.as_str().into(), Default::default())
            .await;
    }
    assert_eq!(finish(&channel, &queue, &downstream).await, (0, 0));
}

/// A requester that deduplicates replies by `message_id` (as a consumer of
/// this crate does) must get the answer to its retried request: the reply
/// to a duplicate with another `correlation_id` has an id of its own, and
/// the same `correlation_id` again gets the same id.
#[tokio::test]
async fn a_retried_request_gets_a_reply_id_of_its_own_correlation_id() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = declare_queue(&channel, "outbox-retried").await;
    let downstream = common::scratch_queue(&channel, "outbox-retried-down").await;
    let asker = common::scratch_queue(&channel, "retried-asker").await;
    let config = config("ob9");
    let runs = Arc::new(AtomicUsize::new(0));
    let consumer = start(
        redis_store().await,
        &queue.name,
        &config,
        OutboxPublisher::connect(&config),
        &downstream,
        &runs,
    )
    .await;

    let mut replies = Vec::new();
    for correlation_id in ["try-1", "try-2", "try-1"] {
        send(
            &channel,
            &queue.name,
            "quote-r",
            b"qr",
            Some((&asker, correlation_id)),
        )
        .await;
        replies.extend(collect(&channel, &asker, 1).await);
    }
    consumer.stop().await;

    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    let correlations: Vec<Option<&str>> = replies.iter().map(|(_, c, _)| c.as_deref()).collect();
    assert_eq!(
        correlations,
        [Some("try-1"), Some("try-2"), Some("try-1")],
        "one reply per request, each with its own correlation_id: {replies:?}"
    );
    let ids: Vec<&str> = replies.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_ne!(
        ids[0], ids[1],
        "the retried request's reply is not a duplicate of the first by message_id"
    );
    assert_eq!(
        ids[0], ids[2],
        "the same correlation_id gets the same reply id (deterministic)"
    );
    for id in &ids {
        assert!(
            id.starts_with(&format!("{}:quote-r:reply", queue.name)),
            "{id}"
        );
    }
    let _ = channel
        .queue_delete(asker.as_str().into(), Default::default())
        .await;
    assert_eq!(finish(&channel, &queue, &downstream).await, (0, 0));
}

/// Kills a consumer at `checkpoint` while it handles one request, starts
/// another, and checks what reached the downstream queue and the asker.
/// Returns (downstream messages received, replies received, handler runs).
async fn killed_at(checkpoint: Checkpoint, prefix: &str) -> (Received, Received, usize) {
    let connection = amqp().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = declare_queue(&channel, "outbox-kill").await;
    let downstream = common::scratch_queue(&channel, "outbox-kill-down").await;
    let asker = common::scratch_queue(&channel, "outbox-kill-asker").await;
    let config = config(prefix);
    let store: RedisStore = redis_store().await;
    let runs = Arc::new(AtomicUsize::new(0));

    let (halting, reached) = OutboxPublisher::connect(&config).halt_at(checkpoint);
    let doomed = start(
        store.clone(),
        &queue.name,
        &config,
        halting,
        &downstream,
        &runs,
    )
    .await;
    send(
        &channel,
        &queue.name,
        "order-k",
        b"ok",
        Some((&asker, "c-k")),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), reached.notified())
        .await
        .unwrap_or_else(|_| panic!("the consumer never reached {checkpoint:?}"));
    doomed.kill().await;

    let store_view = store.clone();
    let survivor = start(
        store,
        &queue.name,
        &config,
        OutboxPublisher::connect(&config),
        &downstream,
        &runs,
    )
    .await;
    // The redelivered copy settles: acked, after what it had to send.
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut sent = Vec::new();
    let mut replies = Vec::new();
    // Done once the outbox exists and holds no message not marked sent,
    // and the survivor sent its reply (after the doomed consumer's own, if
    // it got as far as publishing): killed after the mark, the outbox
    // already looks done before the redelivered copy reaches the survivor.
    let outbox = amqp_idempotency::outbox::outbox_key(&format!("{prefix}:{}:order-k", queue.name));
    let replies_expected = match checkpoint {
        Checkpoint::Published | Checkpoint::Marked => 2,
        _ => 1,
    };
    while tokio::time::Instant::now() < deadline {
        sent.extend(drain(&channel, &downstream).await);
        replies.extend(drain(&channel, &asker).await);
        let left = store_view.outbox(&outbox).await.expect("read the outbox");
        if !left.is_empty()
            && !left.iter().any(|(field, _)| field.starts_with(b"m"))
            && replies.len() >= replies_expected
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    acked += survivor.stop().await.acked;
    assert_eq!(acked, 1, "the survivor acked the redelivered copy");
    // What it sent before it stopped.
    sent.extend(collect(&channel, &downstream, 0).await);
    replies.extend(collect(&channel, &asker, 0).await);
    // Nothing left unacked: the queue is empty, and nothing was parked.
    assert_eq!(finish(&channel, &queue, &downstream).await, (0, 0));
    (sent, replies, runs.load(Ordering::SeqCst))
}

/// Every outgoing message arrived at least once, and deduplicated by
/// `message_id` exactly the two the handler staged.
fn exactly_once_by_id(sent: &Received, scope_prefix: &str) {
    let distinct: BTreeSet<&str> = sent.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(distinct.len(), 2, "two distinct ids: {sent:?}");
    for id in &distinct {
        assert!(id.starts_with(scope_prefix), "{id}");
        assert!(
            id.ends_with(":order-k:0") || id.ends_with(":order-k:1"),
            "{id}"
        );
    }
}

#[tokio::test]
async fn killed_before_the_commit_nothing_is_published_and_the_copy_runs_again() {
    let (sent, replies, runs) = killed_at(Checkpoint::BeforeCommit, "ob5").await;
    exactly_once_by_id(&sent, "t-outbox-kill");
    assert_eq!(sent.len(), 2, "only the second run's messages: {sent:?}");
    assert_eq!(
        runs, 2,
        "the copy ran the handler again (nothing was recorded)"
    );
    assert_eq!(replies.len(), 1, "one reply: {replies:?}");
}

#[tokio::test]
async fn killed_between_the_commit_and_the_publish_the_duplicate_sends_the_outbox() {
    let (sent, replies, runs) = killed_at(Checkpoint::Committed, "ob6").await;
    exactly_once_by_id(&sent, "t-outbox-kill");
    assert_eq!(sent.len(), 2, "sent once, by the duplicate: {sent:?}");
    assert_eq!(runs, 1, "the handler ran once");
    assert_eq!(replies.len(), 1, "the stored reply: {replies:?}");
    assert_eq!(replies[0].1.as_deref(), Some("c-k"));
}

#[tokio::test]
async fn killed_between_the_publish_and_the_mark_the_copies_share_their_ids() {
    let (sent, replies, runs) = killed_at(Checkpoint::Published, "ob7").await;
    exactly_once_by_id(&sent, "t-outbox-kill");
    assert_eq!(
        sent.len(),
        4,
        "published, then again by the duplicate: {sent:?}"
    );
    assert_eq!(runs, 1, "the handler ran once");
    assert_eq!(
        replies.len(),
        2,
        "the reply went with them, and again: {replies:?}"
    );
}

#[tokio::test]
async fn killed_between_the_mark_and_the_ack_only_the_reply_goes_again() {
    let (sent, replies, runs) = killed_at(Checkpoint::Marked, "ob8").await;
    exactly_once_by_id(&sent, "t-outbox-kill");
    assert_eq!(sent.len(), 2, "marked dispatched: not sent again: {sent:?}");
    assert_eq!(runs, 1, "the handler ran once");
    assert_eq!(
        replies.len(),
        2,
        "the stored reply is sent to every duplicate: {replies:?}"
    );
}

/// A consumer whose handler stages what the body asks for:
/// `to <exchange> <routing key>` lines, one message each.
async fn start_router(queue: &str, config: &Config) -> Consumer {
    let service = IdempotencyLayer::new(redis_store().await, queue, config.clone())
        .expect("layer")
        .with_outbox(OutboxPublisher::connect(config))
        .layer(service_fn(|incoming: OutboxDelivery| async move {
            let body = String::from_utf8_lossy(&incoming.delivery.data).into_owned();
            for line in body.lines() {
                let mut words = line.split(' ');
                let (Some("to"), Some(exchange), Some(key)) =
                    (words.next(), words.next(), words.next())
                else {
                    return Err(HandlerError::permanent(format!("bad line `{line}`")));
                };
                let exchange = if exchange == "-" { "" } else { exchange };
                incoming.outbox.publish(
                    exchange,
                    key,
                    BasicProperties::default(),
                    line.to_owned(),
                )?;
            }
            Ok::<_, HandlerError>(())
        }));
    Consumer::serve(queue, service).await
}

#[tokio::test]
async fn an_unroutable_message_is_held_until_it_can_be_routed_and_never_marked_sent() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = declare_queue(&channel, "outbox-unroutable").await;
    let routed = common::scratch_queue(&channel, "outbox-routed").await;
    let late = common::unique("outbox-late");
    let config = config("ob9");
    let consumer = start_router(&queue.name, &config).await;

    // m0 goes nowhere (nothing is bound to its key yet), m1 to a queue.
    let body = format!("to amq.direct {late}\nto - {routed}");
    send(&channel, &queue.name, "route-1", body.as_bytes(), None).await;
    let first = collect(&channel, &routed, 1).await;
    assert_eq!(first.len(), 1, "the routed message went: {first:?}");
    let outbox = amqp_idempotency::outbox::outbox_key(&format!("ob9:{}:route-1", queue.name));
    let store = redis_store().await;
    let fields = |entries: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<Vec<u8>> {
        entries.into_iter().map(|(field, _)| field).collect()
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            let (store, outbox) = (store.clone(), outbox.clone());
            async move {
                store.outbox(&outbox).await.map(fields).ok()
                    == Some(vec![b"m0".to_vec(), b"t".to_vec()])
            }
        })
        .await,
        "the routed message is marked dispatched, the unroutable one is not"
    );

    // Bind a queue to the key: the held delivery's next try gets through.
    channel
        .queue_declare(
            late.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            late.as_str().into(),
            "amq.direct".into(),
            late.as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let arrived = collect(&channel, &late, 1).await;
    let report = consumer.stop().await;

    assert_eq!(
        ids(&arrived),
        [(format!("{}:route-1:0", queue.name), 1)].into(),
        "the unroutable message, once it could be routed"
    );
    assert_eq!(report.acked, 1, "acked once everything was confirmed");
    assert_eq!(report.requeued, 0, "held, not requeued");
    let _ = channel
        .queue_delete(late.as_str().into(), Default::default())
        .await;
    assert_eq!(finish(&channel, &queue, &routed).await, (0, 0));
}

#[tokio::test]
async fn a_message_for_a_missing_exchange_holds_only_its_own_delivery() {
    let connection = amqp().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = declare_queue(&channel, "outbox-404").await;
    let routed = common::scratch_queue(&channel, "outbox-404-routed").await;
    let missing = common::unique("outbox-missing-exchange");
    let config = config("ob10");
    let consumer = start_router(&queue.name, &config).await;

    send(
        &channel,
        &queue.name,
        "poison",
        format!("to {missing} k").as_bytes(),
        None,
    )
    .await;
    for n in 0..5 {
        let body = format!("to - {routed}");
        send(
            &channel,
            &queue.name,
            &format!("fine-{n}"),
            body.as_bytes(),
            None,
        )
        .await;
    }
    // Every other delivery goes through while the first is held.
    let others = collect(&channel, &routed, 5).await;
    assert_eq!(ids(&others).len(), 5, "{others:?}");

    // Once the exchange exists, the held one goes too.
    channel
        .exchange_declare(
            missing.as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            routed.as_str().into(),
            missing.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let late = collect(&channel, &routed, 1).await;
    let report = consumer.stop().await;

    assert_eq!(
        ids(&late),
        [(format!("{}:poison:0", queue.name), 1)].into(),
        "{late:?}"
    );
    assert_eq!(report.acked, 6);
    assert_eq!(report.requeued, 0, "held, not requeued");
    assert_eq!(finish(&channel, &queue, &routed).await, (0, 0));
}
