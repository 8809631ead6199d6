//! Redis Sentinel and replicated done marks, against real servers: a
//! master, a replica and three sentinels (`common::SentinelGroup`), and
//! RabbitMQ for the end-to-end test.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_idempotency::store::{ClaimOutcome, RedisStore, Token, machine};
use amqp_idempotency::{Config, HandlerError, IdempotencyLayer, RetryMode, ServeOptions, serve};
use common::{RedisProcess, SentinelGroup};
use lapin::message::Delivery;
use tower::{Layer, service_fn};

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(600);
/// How long the sentinels may take to promote the replica: down-after (3s),
/// the election, and a TILT period (30s) a stalled machine may start.
const PROMOTION: Duration = Duration::from_secs(60);

async fn claim(store: &RedisStore, key: &str) -> amqp_idempotency::store::Claim {
    match machine::claim(store, key, &Token::new(), "", LEASE)
        .await
        .expect("claim")
    {
        ClaimOutcome::Acquired(claim) => claim,
        other => panic!("expected to acquire {key}, got {other:?}"),
    }
}

/// Retries `op` until it succeeds (the store is unavailable during a
/// failover); panics after 30 s.
async fn until_ok<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, amqp_idempotency::StoreError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match op().await {
            Ok(value) => return value,
            Err(err) => {
                assert!(
                    err.is_unavailable(),
                    "only outages while failing over: {err}"
                );
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the store did not recover: {err}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn the_store_follows_the_master_that_sentinel_promotes() {
    let mut group = SentinelGroup::start();
    let config = Config::default()
        .with_redis_url(group.url())
        .with_min_replicas(1);
    let store = RedisStore::connect(&config)
        .await
        .expect("connect through the sentinels");
    let before = claim(&store, "idem:failover:before").await;
    assert!(machine::complete(&store, &before, RETENTION).await.unwrap());

    let old = group.master().port;
    group.master().kill();
    let new = group.wait_for_new_master(old, PROMOTION);
    assert_ne!(new, old);

    // With no replica left, every request is held: nothing is confirmed
    // on one copy alone.
    let retried = Token::new();
    let err = machine::claim(&store, "idem:failover:after", &retried, "", LEASE)
        .await
        .expect_err("no replica confirms the claim");
    assert!(err.is_unavailable(), "{err}");
    assert!(
        err.to_string().contains("IDEMPOTENCY_MIN_REPLICAS"),
        "{err}"
    );
    // The old master comes back; the sentinels make it a replica of the
    // new one, and requests go through again.
    let restarted = group
        .nodes
        .iter_mut()
        .find(|node| node.port == old)
        .expect("the old master");
    restarted.restart();
    group.wait_until_ready(Duration::from_secs(30));
    // The replica confirmed the done mark before the store answered, so
    // the promoted master has it.
    let token = Token::new();
    let seen = until_ok(|| machine::claim(&store, "idem:failover:before", &token, "", LEASE)).await;
    assert_eq!(
        seen,
        ClaimOutcome::Done,
        "the done mark survived the failover"
    );
    // The consumer retries its unconfirmed claim with the same token.
    let after = until_ok(|| async {
        match machine::claim(&store, "idem:failover:after", &retried, "", LEASE).await? {
            ClaimOutcome::Acquired(claim) => Ok(claim),
            other => panic!("expected to acquire, got {other:?}"),
        }
    })
    .await;
    assert!(machine::complete(&store, &after, RETENTION).await.unwrap());
}

#[tokio::test]
async fn min_replicas_holds_writes_that_no_replica_confirmed() {
    let master = RedisProcess::server(&[]);
    let mut replica = RedisProcess::server(&[
        "--replicaof".into(),
        "127.0.0.1".into(),
        master.port.to_string(),
    ]);
    let config = Config::default()
        .with_redis_url(master.url())
        .with_min_replicas(1)
        .with_replica_timeout(Duration::from_millis(200));
    let store = RedisStore::connect(&config).await.expect("connect");
    let token = Token::new();
    let first = until_ok(|| async {
        match machine::claim(&store, "idem:wait:1", &token, "", LEASE).await? {
            ClaimOutcome::Acquired(claim) => Ok(claim),
            other => panic!("expected to acquire, got {other:?}"),
        }
    })
    .await;
    replica.kill();
    let err = machine::complete(&store, &first, RETENTION)
        .await
        .expect_err("a done mark on the master alone is not confirmed");
    assert!(err.is_unavailable(), "held, not dead-lettered: {err}");
    assert!(
        err.to_string().contains("IDEMPOTENCY_MIN_REPLICAS=1"),
        "{err}"
    );
    replica.restart();
    // Once the replica is back, the retried completion is confirmed.
    assert!(until_ok(|| machine::complete(&store, &first, RETENTION)).await);
    let value = common::redis_cli_at(&replica.url(), &["GET", "idem:wait:1"]);
    assert!(
        value.trim().starts_with('-'),
        "the replica has the done mark: {value}"
    );
}

/// Runs of each message id, as the handlers saw them.
type Runs = Arc<Mutex<HashMap<String, usize>>>;

/// A consumer of `queue` through the layer on `store`, recording each run
/// in `runs`, until `stop` is set.
async fn spawn_consumer(
    connection: &lapin::Connection,
    queue: &str,
    store: RedisStore,
    config: Config,
    runs: &Runs,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<amqp_idempotency::ServeReport, amqp_idempotency::ServeError>> {
    let seen = runs.clone();
    let service = IdempotencyLayer::new(store, queue, config)
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
    let (channel, consumer) = common::consume(connection, queue, 16).await;
    let stop = stop.clone();
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .concurrency(16)
        .shutdown_on(async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .close_channel(channel);
    tokio::spawn(serve(consumer, service, options))
}

/// How many messages the flow tests publish.
const MESSAGES: usize = 600;

/// Messages in flight around a fault: publishes `MESSAGES` ids
/// `<label>-<n>`, 5 ms apart, and returns once a third of them are out
/// (the rest follow while the test breaks something).
async fn publish_paced(
    connection: &lapin::Connection,
    queue: &str,
    label: &'static str,
) -> tokio::task::JoinHandle<()> {
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let channel = connection.create_channel().await.unwrap();
        let (name, published) = (queue.to_owned(), published.clone());
        tokio::spawn(async move {
            for n in 0..MESSAGES {
                let id = format!("{label}-{n}");
                common::publish(&channel, &name, id.as_bytes(), Some(&id)).await;
                published.store(n + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    while published.load(Ordering::SeqCst) < MESSAGES / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher
}

#[tokio::test]
async fn consumption_resumes_by_itself_after_sentinel_fails_the_master_over() {
    let mut group = SentinelGroup::start();
    let connection = common::amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = common::declare_queue(&setup, "failover").await;
    let runs: Runs = Arc::default();
    let prefix = common::unique("p");
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let config = Config::default()
            .with_redis_url(group.url())
            .with_key_prefix(&prefix)
            .with_retry_backoff(Duration::from_millis(20));
        let store = RedisStore::connect(&config)
            .await
            .expect("connect through the sentinels");
        consumers.push(spawn_consumer(&connection, &queue.name, store, config, &runs, &stop).await);
    }
    // Messages flow before, during and after the failover.
    let publisher = publish_paced(&connection, &queue.name, "m").await;
    let old = group.master().port;
    group.master().kill();
    group.wait_for_new_master(old, PROMOTION);
    publisher.await.unwrap();
    let all_ran = common::eventually(Duration::from_secs(60), || {
        let runs = runs.clone();
        async move { runs.lock().unwrap().len() == MESSAGES }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for consumer in consumers {
        consumer.await.unwrap().expect("serve");
    }
    let runs = runs.lock().unwrap().clone();
    assert!(
        all_ran,
        "every message ran after the failover, without restarting a consumer: {} of {MESSAGES}",
        runs.len()
    );
    let channel = connection.create_channel().await.unwrap();
    assert_eq!(
        common::ready_count(&channel, &queue.name).await,
        0,
        "none left"
    );
    assert_eq!(
        common::ready_count(&channel, &queue.dead).await,
        0,
        "none dead-lettered"
    );
    queue.delete(&channel).await;
}

/// A cluster node on a free port, with its cluster bus on another.
fn cluster_node(extra: &[&str]) -> RedisProcess {
    let bus = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port");
    let mut args: Vec<String> = [
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        "2000",
        "--repl-diskless-sync-delay",
        "0",
        "--cluster-port",
    ]
    .map(String::from)
    .to_vec();
    args.push(bus.to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    RedisProcess::server(&args)
}

fn cli(args: &[&str]) -> String {
    let output = std::process::Command::new("redis-cli")
        .args(args)
        .output()
        .expect("run redis-cli");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "redis-cli {args:?}: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

#[tokio::test]
async fn a_cluster_master_failover_is_followed_and_nothing_is_lost() {
    // Three masters, and a replica for the first one.
    let mut nodes: Vec<RedisProcess> = (0..4).map(|_| cluster_node(&[])).collect();
    let addr = |node: &RedisProcess| format!("127.0.0.1:{}", node.port);
    let masters: Vec<String> = nodes[..3].iter().map(addr).collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(masters.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    cli(&create);
    let first_id = common::redis_cli_at(&nodes[0].url(), &["CLUSTER", "MYID"])
        .trim()
        .to_owned();
    cli(&[
        "--cluster",
        "add-node",
        &addr(&nodes[3]),
        &masters[0],
        "--cluster-slave",
        "--cluster-master-id",
        &first_id,
    ]);
    let replica_id = common::redis_cli_at(&nodes[3].url(), &["CLUSTER", "MYID"])
        .trim()
        .to_owned();
    let ready = common::eventually(Duration::from_secs(30), || {
        let (first, replica) = (nodes[0].url(), nodes[3].url());
        let others = [nodes[1].url(), nodes[2].url()];
        let (first_id, replica_id) = (first_id.clone(), replica_id.clone());
        async move {
            // Synced, not only connected: a replica killed mid-sync is
            // never promoted.
            common::redis_cli_at(&first, &["INFO", "replication"]).contains("state=online")
                && common::redis_cli_at(&replica, &["INFO", "replication"])
                    .contains("master_link_status:up")
                && common::redis_cli_at(&replica, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
                // The masters that will vote know it as the first one's
                // replica (a vote request from a node they have not met yet
                // is dropped, and the next election is 8 s later).
                && others.iter().all(|other| {
                    common::redis_cli_at(other, &["CLUSTER", "NODES"])
                        .lines()
                        .any(|line| {
                            let fields: Vec<&str> = line.split(' ').collect();
                            fields.first() == Some(&replica_id.as_str())
                                && fields.get(2).is_some_and(|flags| *flags == "slave")
                                && fields.get(3) == Some(&first_id.as_str())
                                && fields.get(7) == Some(&"connected")
                        })
                })
        }
    })
    .await;
    assert!(ready, "the cluster and its replica came up");

    let connection = common::amqp().await;
    let setup = connection.create_channel().await.unwrap();
    let queue = common::declare_queue(&setup, "cluster-failover").await;
    let config = Config::default()
        .with_redis_cluster_nodes(nodes.iter().map(RedisProcess::url))
        .with_key_prefix(common::unique("p"))
        .with_retry_backoff(Duration::from_millis(20));
    let store = RedisStore::connect(&config)
        .await
        .expect("connect to the cluster");
    let runs: Runs = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = spawn_consumer(&connection, &queue.name, store, config, &runs, &stop).await;
    let publisher = publish_paced(&connection, &queue.name, "c").await;
    // The first master dies; the cluster promotes its replica (an election
    // that fails is retried after 4 × the node timeout: give it several).
    nodes[0].kill();
    let promoted = common::eventually(Duration::from_secs(60), || {
        let replica = nodes[3].url();
        async move { common::redis_cli_at(&replica, &["ROLE"]).starts_with("master") }
    })
    .await;
    assert!(
        promoted,
        "the replica was not promoted within 60 s of the kill.\n\
         CLUSTER NODES as the replica sees it:\n{}\nand as a master sees it:\n{}\n\
         the replica's log:\n{}\nthe other masters' logs:\n{}\n{}",
        common::redis_cli_at(&nodes[3].url(), &["CLUSTER", "NODES"]),
        common::redis_cli_at(&nodes[1].url(), &["CLUSTER", "NODES"]),
        nodes[3].log_tail(30),
        nodes[1].log_tail(10),
        nodes[2].log_tail(10)
    );
    publisher.await.unwrap();
    let all_ran = common::eventually(Duration::from_secs(60), || {
        let runs = runs.clone();
        async move { runs.lock().unwrap().len() == MESSAGES }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    consumer.await.unwrap().expect("serve");
    let runs = runs.lock().unwrap().clone();
    assert!(all_ran, "every message ran: {} of {MESSAGES}", runs.len());
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "no copy was published twice, so none runs twice: {twice:?}"
    );
    let channel = connection.create_channel().await.unwrap();
    assert_eq!(common::ready_count(&channel, &queue.name).await, 0);
    assert_eq!(common::ready_count(&channel, &queue.dead).await, 0);
    queue.delete(&channel).await;
}

#[tokio::test]
async fn the_operator_cli_reads_through_sentinel_before_and_after_a_failover() {
    let mut group = SentinelGroup::start();
    let config = Config::default()
        .with_redis_url(group.url())
        .with_min_replicas(1);
    let store = RedisStore::connect(&config)
        .await
        .expect("connect through the sentinels");
    let key = "idem:cli:order-1";
    let done = claim(&store, key).await;
    assert!(machine::complete(&store, &done, RETENTION).await.unwrap());
    let inspect = |url: String| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_amqp-idempotency"))
            .args(["inspect", key])
            .env("REDIS_URL", url)
            .output()
            .expect("run the CLI");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "inspect through Sentinel: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    };
    assert!(inspect(group.url()).contains("done"), "found on the master");
    let old = group.master().port;
    group.master().kill();
    group.wait_for_new_master(old, PROMOTION);
    assert!(
        inspect(group.url()).contains("done"),
        "found on the promoted master"
    );
}

#[tokio::test]
async fn a_retried_completion_on_a_new_connection_still_waits_for_the_replicas() {
    let master = RedisProcess::server(&[]);
    let replica = RedisProcess::server(&[
        "--replicaof".into(),
        "127.0.0.1".into(),
        master.port.to_string(),
    ]);
    let config = Config::default()
        .with_redis_url(master.url())
        .with_min_replicas(1)
        .with_replica_timeout(Duration::from_millis(200));
    let store = RedisStore::connect(&config).await.expect("connect");
    let token = Token::new();
    let claimed = until_ok(|| async {
        match machine::claim(&store, "idem:rewait:1", &token, "", LEASE).await? {
            ClaimOutcome::Acquired(claim) => Ok(claim),
            other => panic!("expected to acquire, got {other:?}"),
        }
    })
    .await;
    // The replica stays connected but acknowledges nothing: the done mark
    // reaches the master only.
    replica.pause();
    let err = machine::complete(&store, &claimed, RETENTION)
        .await
        .expect_err("not confirmed");
    assert!(err.is_unavailable(), "{err}");
    // The retry comes on a new connection (the old one dropped), which
    // has written nothing yet: WAIT there must still wait for the mark.
    let fresh = RedisStore::connect(&config).await.expect("connect again");
    let retried = machine::complete(&fresh, &claimed, RETENTION).await;
    assert!(
        matches!(&retried, Err(err) if err.is_unavailable()),
        "a mark that only the master holds is never reported confirmed: {retried:?}"
    );
    replica.resume();
    assert!(until_ok(|| machine::complete(&fresh, &claimed, RETENTION)).await);
}

/// A claim that reached the master but not the paused replica is answered
/// as unavailable (`WAIT` falls short): the layer holds the delivery and
/// claims again once the replica is back. That retry must find its own
/// first claim (one token for the delivery's whole life) and run the
/// handler at once, as attempt 1, instead of taking its own record for a
/// crashed consumer's.
#[tokio::test]
async fn a_claim_retried_after_a_replica_shortfall_finds_its_own_record() {
    let master = RedisProcess::server(&[]);
    let replica = RedisProcess::server(&[
        "--replicaof".into(),
        "127.0.0.1".into(),
        master.port.to_string(),
    ]);
    let config = Config::default()
        .with_redis_url(master.url())
        .with_min_replicas(1)
        .with_replica_timeout(Duration::from_millis(200))
        .with_lease_ttl(Duration::from_secs(2))
        .with_handler_timeout(Duration::from_secs(1))
        .with_max_attempts(1);
    let store = RedisStore::connect(&config).await.expect("connect");
    // The replica is in sync before the fault.
    let token = Token::new();
    let synced = until_ok(|| async {
        match machine::claim(&store, "idem:own:sync", &token, "", LEASE).await? {
            ClaimOutcome::Acquired(claim) => Ok(claim),
            other => panic!("expected to acquire, got {other:?}"),
        }
    })
    .await;
    assert!(until_ok(|| machine::complete(&store, &synced, RETENTION)).await);

    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let service = IdempotencyLayer::new(store.clone(), "own", config)
        .expect("layer")
        .layer(service_fn(move |_d: Delivery| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        }));
    let mut delivery = Delivery::mock(1, "".into(), "own".into(), false, b"x".to_vec());
    delivery.properties = lapin::BasicProperties::default().with_message_id("m-1".into());

    replica.pause();
    let call = tokio::spawn(tower::ServiceExt::oneshot(service, delivery));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "no run while the claim is unconfirmed"
    );
    replica.resume();
    let outcome = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the delivery is settled once the replica is back")
        .expect("no panic")
        .expect("an outcome");
    assert_eq!(
        (outcome.kind(), outcome.attempt(), outcome.reason()),
        (amqp_idempotency::OutcomeKind::Processed, 1, None),
        "the retried claim is ours: processed as the first attempt"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
}
