//! One benchmark run: the connections every variant shares, then for each
//! round and variant a fresh queue (and for ours_outbox a downstream queue),
//! filled (or published to in open loop), drained and measured, and its
//! queues and Redis keys deleted. A variant's queue has the same name in
//! every round, so that the retry delay queues the runner declares for it
//! (`{queue}.retry.<delay>`, durable quorum queues) are created once per
//! run, and deleted at its end once empty, not right after their declare
//! (which can crash RabbitMQ 3.10's at-least-once dead-lettering).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amqp_idempotency::store::{ClaimOutcome, RedisStore, Token, machine};
use amqp_idempotency::{Config, redact_url};
use futures_util::StreamExt;
use harness::CONNECT_TIMEOUT;
use harness::amqp::{connect as connect_amqp, new_channel};
use lapin::options::{
    BasicConsumeOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::{oneshot, watch};

use crate::footprint::bytes_per_done_record;
use crate::meter::{Measured, ServerCpu, broker_cpu_ticks, broker_pids, epoch};
use crate::options::Options;
use crate::pin::{CONSUMER_CPU, Pinned, REDIS_CPU, Target};
use crate::plan::Plan;
use crate::publish::{prefill, publish_open_loop};
use crate::report::{Outgoing, Row, RunFacts, report, summary};
use crate::servers::Servers;
use crate::stats::RunStats;
use crate::variants::drain_plain;
use crate::variants::ours::drain_ours;
use crate::variants::{Variant, stop_consumer};

/// Shared connections and settings.
pub struct Ctx {
    pub options: Options,
    pub plan: Arc<Plan>,
    pub consume_conn: Connection,
    pub publish_channel: Channel,
    /// The Redis server(s) of the store, for `INFO` and clean-up.
    pub redis: Servers,
    pub store: RedisStore,
    /// The naive variant's pool (standalone only).
    pub pool: Option<deadpool_redis::Pool>,
    /// Prefix of every queue and Redis key of this harness run.
    pub base: String,
    /// Becomes true on the first Ctrl-C: the drain stops, and the run
    /// cleans up and ends.
    pub stop: watch::Receiver<bool>,
}

pub async fn run_one(ctx: &mut Ctx, variant: Variant, round: u32) -> Result<(Row, String), String> {
    let queue = queue_name(ctx, variant);
    let key_prefix = format!("{queue}-r{round}");
    // ours_outbox's handler publishes here through the outbox.
    let downstream = (variant == Variant::OursOutbox).then(|| format!("{queue}.downstream"));
    for declared in std::iter::once(&queue).chain(downstream.as_ref()) {
        ctx.publish_channel
            .queue_declare(
                declared.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| format!("cannot declare the queue `{declared}`: {err}"))?;
    }
    let mut stop = ctx.stop.clone();
    let result = tokio::select! {
        result = measure(ctx, variant, &queue, &key_prefix, downstream.as_deref()) => result,
        _ = stop.wait_for(|stop| *stop) => Err(INTERRUPTED.into()),
    };
    // What the outbox published, once the drain worked.
    let outgoing = match (&downstream, &result) {
        (Some(downstream), Ok(_)) => {
            let mut stop = ctx.stop.clone();
            tokio::select! {
                outgoing = read_outgoing(ctx, downstream) => Some(outgoing),
                _ = stop.wait_for(|stop| *stop) => Some(Err(INTERRUPTED.into())),
            }
        }
        _ => None,
    };
    // Clean up whether or not the drain worked.
    for declared in std::iter::once(&queue).chain(downstream.as_ref()) {
        if let Err(err) = ctx
            .publish_channel
            .queue_delete(declared.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            eprintln!("bench: cannot delete the queue `{declared}`: {err}");
        }
    }
    if let Err(err) = ctx.redis.unlink_prefix(&key_prefix).await {
        eprintln!("bench: cannot delete the Redis keys {key_prefix}*: {err}");
    }
    let (stats, measured, redis_cmds, server_cpu) = result?;
    let outgoing = outgoing.transpose()?;
    Ok(report(
        ctx,
        variant,
        round,
        &stats,
        &measured,
        redis_cmds,
        &server_cpu,
        outgoing.as_ref(),
    ))
}

/// A downstream read that gets nothing new for this long stops there.
const OUTGOING_STALL: Duration = Duration::from_secs(10);

/// Empties `downstream` (after the drain, outside the measured time),
/// counting its messages by `message_id`: the outbox published them all
/// before it let the runner ack, so they are all there.
pub async fn read_outgoing(ctx: &Ctx, downstream: &str) -> Result<Outgoing, String> {
    let channel = new_channel(&ctx.consume_conn).await?;
    let waiting = channel
        .queue_declare(
            downstream.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("cannot look at the queue `{downstream}`: {err}"))?
        .message_count();
    let mut consumer = channel
        .basic_consume(
            downstream.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("basic.consume on `{downstream}` failed: {err}"))?;
    let mut outgoing = Outgoing::default();
    let mut ids = HashSet::new();
    while outgoing.received < u64::from(waiting) {
        match tokio::time::timeout(OUTGOING_STALL, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                outgoing.received += 1;
                match delivery.properties.message_id() {
                    Some(id) => {
                        ids.insert(id.as_str().to_owned());
                    }
                    None => outgoing.without_id += 1,
                }
            }
            Ok(Some(Err(err))) => {
                stop_consumer(&channel, &consumer).await;
                return Err(format!("reading `{downstream}` failed: {err}"));
            }
            Ok(None) | Err(_) => break,
        }
    }
    stop_consumer(&channel, &consumer).await;
    outgoing.distinct = ids.len() as u64;
    Ok(outgoing)
}

pub async fn measure(
    ctx: &mut Ctx,
    variant: Variant,
    queue: &str,
    key_prefix: &str,
    downstream: Option<&str>,
) -> Result<(Arc<RunStats>, Measured, u64, ServerCpu), String> {
    if ctx.options.open_loop_rate.is_none() {
        prefill(ctx, queue).await?;
    }
    let stats = Arc::new(RunStats::new(
        &ctx.plan,
        ctx.options.handler_delay,
        variant.retry().is_some(),
    ));
    let (ready_tx, ready_rx) = oneshot::channel();
    let publisher = ctx.options.open_loop_rate.map(|rate| {
        tokio::spawn(publish_open_loop(
            ctx.publish_channel.clone(),
            queue.to_owned(),
            Arc::clone(&ctx.plan),
            ctx.options.payload,
            rate,
            ready_rx,
        ))
    });
    let commands_before = ctx.redis.commands().await?;
    let redis_cpu_before = ctx.redis.cpu_s().await;
    let broker_cpu_before = broker_cpu_ticks();
    let drained = match variant {
        Variant::Ours | Variant::OursOutbox | Variant::OursHold | Variant::OursBroker => {
            let store = ctx.store.clone();
            let pipelines_before = store.round_trips();
            let drained = drain_ours(
                ctx, variant, store, queue, key_prefix, downstream, &stats, ready_tx,
            )
            .await;
            // RedisStore sends the requests that wait together as one
            // pipeline: its own count of pipelines is the round-trip count
            // (the wrapper below counts requests).
            let pipelines = ctx.store.round_trips() - pipelines_before;
            stats.redis_roundtrips.store(pipelines, Ordering::Relaxed);
            drained
        }
        Variant::OursMemory => {
            let store = amqp_idempotency::store::MemoryStore::new();
            drain_ours(
                ctx, variant, store, queue, key_prefix, None, &stats, ready_tx,
            )
            .await
        }
        _ => drain_plain(ctx, variant, queue, key_prefix, &stats, ready_tx).await,
    };
    let commands_after = ctx.redis.commands().await?;
    let server_cpu = ServerCpu {
        redis_us: match (redis_cpu_before, ctx.redis.cpu_s().await) {
            (Some(before), Some(after)) => Some((after - before).max(0.0) * 1e6),
            _ => None,
        },
        broker_us: harness::cpu::ticks_us(broker_cpu_before, broker_cpu_ticks()),
    };
    if let Some(publisher) = publisher {
        if drained.is_err() {
            publisher.abort();
        } else {
            match publisher.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(err),
                Err(err) => return Err(format!("the publisher task failed: {err}")),
            }
        }
    }
    // The two `INFO`s (commandstats, cpu) that took the first snapshots
    // are counted in the second, on every master.
    let redis_cmds = commands_after.saturating_sub(commands_before + 2 * ctx.redis.masters());
    Ok((stats, drained?, redis_cmds, server_cpu))
}

pub const REDIS_HINT: &str = "start it with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no` or set REDIS_URL";

/// The store `ours` uses: `REDIS_URL`, or with `REDIS_CLUSTER_NODES` set,
/// what [`Config::from_env`] says (which names the cluster once the library
/// reads that variable).
pub async fn connect_store(options: &Options) -> Result<RedisStore, String> {
    let env = Config::from_env().map_err(|err| format!("the store's configuration: {err}"))?;
    let config = if options.cluster_nodes.is_some() {
        env
    } else {
        // IDEMPOTENCY_MIN_REPLICAS measures the cost of replicated marks.
        let (replicas, timeout) = (env.min_replicas(), env.replica_timeout());
        Config::default()
            .with_redis_url(&options.redis_url)
            .with_min_replicas(replicas)
            .with_replica_timeout(timeout)
    };
    let shown = if options.cluster_nodes.is_some() {
        "the cluster of REDIS_CLUSTER_NODES".to_owned()
    } else {
        format!("Redis at {}", redact_url(&options.redis_url))
    };
    let fail = |err: String| format!("cannot connect the store to {shown}: {REDIS_HINT} ({err})");
    tokio::time::timeout(CONNECT_TIMEOUT, RedisStore::connect(&config))
        .await
        .map_err(|_| fail(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|err| fail(err.to_string()))
}

/// The naive variant's deadpool-redis pool on `url`, checked with a `PING`.
pub async fn connect_pool(url: &str) -> Result<deadpool_redis::Pool, String> {
    let shown = redact_url(url);
    let fail = |err: String| format!("cannot reach Redis at {shown}: {REDIS_HINT} ({err})");
    let pool = deadpool_redis::Config::from_url(url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|err| format!("cannot create the deadpool-redis pool for {shown}: {err}"))?;
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, pool.get())
        .await
        .map_err(|_| fail(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|err| fail(err.to_string()))?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map_err(|err| fail(err.to_string()))?;
    Ok(pool)
}

/// With `REDIS_CLUSTER_NODES`: proves that the store writes to the cluster
/// (one record, then looked for on the masters and deleted), rather than
/// measuring a server the run does not report on.
pub async fn check_store_on_cluster(
    store: &RedisStore,
    redis: &mut Servers,
    base: &str,
) -> Result<(), String> {
    let key = format!("{base}-cluster-check");
    let lease = Config::default().lease_ttl();
    match machine::claim(store, &key, &Token::new(), "", lease).await {
        Ok(ClaimOutcome::Acquired(_)) => {}
        Ok(other) => {
            return Err(format!(
                "the store's check record {key} was not fresh: {other:?}"
            ));
        }
        Err(err) => return Err(format!("the store cannot write: {err}")),
    }
    if redis.unlink_keys(std::slice::from_ref(&key), &key).await? == 1 {
        return Ok(());
    }
    // Written elsewhere: most likely to REDIS_URL. Delete it there.
    if let Ok(url) = harness::env::env_or("REDIS_URL", harness::env::DEFAULT_REDIS_URL)
        && let Ok(client) = redis::Client::open(url)
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let _ = redis::cmd("UNLINK")
            .arg(&key)
            .query_async::<u64>(&mut conn)
            .await;
    }
    Err("REDIS_CLUSTER_NODES is set, but RedisStore::connect(&Config::from_env()?) wrote its record to another server (REDIS_URL?): this amqp-idempotency does not connect to a Redis Cluster".into())
}

/// `--pin-redis`: every Redis server of the store on CPU 1, the local
/// RabbitMQ node and this process on CPU 0.
pub async fn pin(redis: &mut Servers) -> Result<Pinned, String> {
    let mut targets = Vec::new();
    for node in &mut redis.nodes {
        let pid = Servers::local_pid(node).await?;
        targets.push(Target {
            label: format!("Redis {}", node.shown),
            pid,
            cpu: REDIS_CPU,
        });
    }
    let brokers = broker_pids();
    if brokers.is_empty() {
        eprintln!(
            "bench: --pin-redis: no RabbitMQ node (beam.smp) runs on this machine; pinning Redis and the benchmark only"
        );
    }
    for pid in brokers {
        targets.push(Target {
            label: "RabbitMQ beam.smp".into(),
            pid,
            cpu: CONSUMER_CPU,
        });
    }
    targets.push(Target {
        label: "bench".into(),
        pid: std::process::id(),
        cpu: CONSUMER_CPU,
    });
    Pinned::pin(&targets)
}

pub const INTERRUPTED: &str = "interrupted";

/// The queue a variant consumes, the same in every round.
fn queue_name(ctx: &Ctx, variant: Variant) -> String {
    format!("{}-{}", ctx.base, variant.name())
}

/// Deletes the retry delay queues the runner declared for the variants
/// that ran it (the default schedule, 500ms doubling to 30s, for `ours`,
/// `ours_outbox` and `ours_mem`, which retry through the broker by
/// default; the `--failing` schedule for `ours_broker`), once empty.
async fn remove_delay_queues(ctx: &Ctx, variants: &[Variant]) {
    let default = Config::default();
    let mut queues = Vec::new();
    for &variant in variants.iter().filter(|v| v.serves()) {
        let (backoff, max) = match variant.retry() {
            Some(amqp_idempotency::RetryMode::Hold) => continue,
            Some(amqp_idempotency::RetryMode::Broker) => failing_schedule(&ctx.options),
            None => (default.retry_backoff(), default.retry_backoff_max()),
        };
        queues.extend(harness::delay_queues::names(
            &queue_name(ctx, variant),
            backoff,
            max,
        ));
    }
    let (deleted, left) = harness::delay_queues::remove(
        &ctx.consume_conn,
        &queues,
        std::time::Instant::now(),
        Duration::from_secs(60),
    )
    .await;
    if deleted > 0 {
        eprintln!("bench: deleted {deleted} retry delay queues");
    }
    for queue in left {
        eprintln!("bench: retry delay queue left behind: {queue}");
    }
}

/// The backoff of the variants that fail the `--failing` ids: `--failing-backoff-ms`
/// doubling up to 8 times that.
pub fn failing_schedule(options: &Options) -> (Duration, Duration) {
    (
        options.failing_backoff,
        options
            .failing_backoff
            .saturating_mul(crate::options::FAILING_BACKOFF_CAP),
    )
}

/// The whole run; `stop` turning true (Ctrl-C) ends it early, after
/// cleaning up.
pub async fn run(options: Options, stop: watch::Receiver<bool>) -> Result<bool, String> {
    epoch();
    let plan = Arc::new(Plan::new(
        options.messages,
        options.duplicates,
        options.failing,
    )?);
    let mut redis = Servers::connect(&options.redis_url, options.cluster_nodes.as_deref()).await?;
    let store = connect_store(&options).await?;
    let mut variants = options.variants.clone();
    let mut skipped = Vec::new();
    let pool = if redis.cluster {
        for one_server in [Variant::Naive, Variant::RedisFloor] {
            if variants.contains(&one_server) {
                eprintln!(
                    "bench: {} skipped: it sends plain SETs to one server, and REDIS_CLUSTER_NODES is set (its fields are null)",
                    one_server.name()
                );
                variants.retain(|v| *v != one_server);
                skipped.push(one_server.name());
            }
        }
        None
    } else if variants.contains(&Variant::Naive) {
        Some(connect_pool(&options.redis_url).await?)
    } else {
        None
    };
    let consume_conn = connect_amqp(&options.amqp_url).await?;
    let publish_conn = connect_amqp(&options.amqp_url).await?;
    let publish_channel = new_channel(&publish_conn).await?;
    publish_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|err| format!("confirm.select failed: {err}"))?;
    let base = format!(
        "bench-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    if redis.cluster {
        check_store_on_cluster(&store, &mut redis, &base).await?;
    }
    // Restores the affinities when dropped: at the end, on an error, and
    // when `main` drops this future on Ctrl-C.
    let mut pinned = if options.pin_redis {
        Some(pin(&mut redis).await?)
    } else {
        None
    };
    eprintln!(
        "bench: {} messages ({} unique), payload {} B, prefetch {}, handler delay {:?}, {} round(s), {}; {} Redis{}; run prefix {base}",
        plan.published(),
        plan.unique,
        options.payload,
        options.prefetch,
        options.handler_delay,
        options.rounds,
        match options.open_loop_rate {
            Some(rate) => format!("open loop at {rate} msgs/s"),
            None => "pre-filled queue".into(),
        },
        redis.kind(),
        if pinned.is_some() { ", pinned" } else { "" },
    );
    if options.failing > 0.0 {
        let (backoff, max) = failing_schedule(&options);
        eprintln!(
            "bench: --failing {}: {} of {} ids always fail in ours_hold and ours_broker (retry backoff {backoff:?} doubling to {max:?}, parked after 5 attempts)",
            options.failing,
            plan.failing.iter().filter(|f| **f).count(),
            plan.unique,
        );
    }
    eprintln!(
        "bench: bytes per done record: writing {} records",
        crate::footprint::RECORDS
    );
    let bytes_per_record = match bytes_per_done_record(&store, &mut redis).await {
        Ok(bytes) => Some(bytes),
        Err(err) => {
            eprintln!("bench: bytes_per_done_record unavailable: {err}");
            None
        }
    };
    let mut ctx = Ctx {
        options: options.clone(),
        plan,
        consume_conn,
        publish_channel,
        redis,
        store,
        pool,
        base,
        stop,
    };
    let mut rows = Vec::new();
    let mut failure = None;
    'rounds: for round in 1..=options.rounds {
        for &variant in &variants {
            if *ctx.stop.borrow() {
                failure = Some(INTERRUPTED.to_owned());
                break 'rounds;
            }
            eprintln!("bench: round {round}: {}", variant.name());
            match run_one(&mut ctx, variant, round).await {
                Ok((row, line)) => {
                    println!("{line}");
                    rows.push(row);
                }
                Err(err) if err == INTERRUPTED => {
                    failure = Some(err);
                    break 'rounds;
                }
                Err(err) => {
                    failure = Some(format!("{} round {round}: {err}", variant.name()));
                    break 'rounds;
                }
            }
        }
    }
    if let Some(pinned) = &mut pinned {
        pinned.restore();
    }
    remove_delay_queues(&ctx, &variants).await;
    match ctx.redis.unlink_prefix(&ctx.base).await {
        Ok(0) => {}
        Ok(n) => eprintln!("bench: removed {n} leftover Redis keys"),
        Err(err) => eprintln!("bench: final cleanup of {}* failed: {err}", ctx.base),
    }
    let _ = ctx.publish_channel.close(200, "OK".into()).await;
    let _ = publish_conn.close(200, "OK".into()).await;
    let _ = ctx.consume_conn.close(200, "OK".into()).await;
    if let Some(err) = failure {
        return Err(err);
    }
    let facts = RunFacts {
        min_replicas: Config::from_env()
            .map(|config| config.min_replicas())
            .unwrap_or(0),
        store: ctx.redis.kind(),
        pinned: pinned.is_some(),
        bytes_per_done_record: bytes_per_record,
        skipped: skipped.join(","),
    };
    println!("{}", summary(&options, &rows, &facts));
    let ok = rows.iter().all(|r| r.ok);
    if !ok {
        eprintln!("bench: FAILED: a variant lost or double-processed messages (see `problems`)");
    }
    Ok(ok)
}
