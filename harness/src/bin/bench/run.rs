//! One benchmark run: the connections every variant shares, then for each
//! round and variant a fresh queue, filled (or published to in open loop),
//! drained and measured, and its queue and Redis keys deleted.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use amqp_idempotency::redact_url;
use amqp_idempotency::store::RedisStore;
use harness::CONNECT_TIMEOUT;
use harness::amqp::{connect as connect_amqp, new_channel};
use harness::redis_admin::{redis_commands, redis_cpu_s, unlink_prefix};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use redis::aio::MultiplexedConnection;
use tokio::sync::oneshot;

use crate::meter::{Measured, ServerCpu, broker_cpu_ticks, clock_ticks_per_s, epoch};
use crate::options::Options;
use crate::plan::Plan;
use crate::publish::{prefill, publish_open_loop};
use crate::report::{Row, report, summary};
use crate::stats::RunStats;
use crate::variants::Variant;
use crate::variants::drain_plain;
use crate::variants::ours::drain_ours;

/// Shared connections and settings.
pub struct Ctx {
    pub options: Options,
    pub plan: Arc<Plan>,
    pub consume_conn: Connection,
    pub publish_channel: Channel,
    pub admin: MultiplexedConnection,
    pub store: RedisStore,
    pub pool: deadpool_redis::Pool,
    /// Prefix of every queue and Redis key of this harness run.
    pub base: String,
}

pub async fn run_one(ctx: &mut Ctx, variant: Variant, round: u32) -> Result<(Row, String), String> {
    let name = format!("{}-{}-r{round}", ctx.base, variant.name());
    let queue = name.clone();
    let key_prefix = name;
    ctx.publish_channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("cannot declare the queue `{queue}`: {err}"))?;
    let result = measure(ctx, variant, &queue, &key_prefix).await;
    // Clean up whether or not the drain worked.
    if let Err(err) = ctx
        .publish_channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
    {
        eprintln!("bench: cannot delete the queue `{queue}`: {err}");
    }
    if let Err(err) = unlink_prefix(&mut ctx.admin, &key_prefix).await {
        eprintln!("bench: cannot delete the Redis keys {key_prefix}*: {err}");
    }
    let (stats, measured, redis_cmds, server_cpu) = result?;
    Ok(report(
        ctx,
        variant,
        round,
        &stats,
        &measured,
        redis_cmds,
        &server_cpu,
    ))
}

pub async fn measure(
    ctx: &mut Ctx,
    variant: Variant,
    queue: &str,
    key_prefix: &str,
) -> Result<(Arc<RunStats>, Measured, u64, ServerCpu), String> {
    if ctx.options.open_loop_rate.is_none() {
        prefill(ctx, queue).await?;
    }
    let stats = Arc::new(RunStats::new(&ctx.plan, ctx.options.handler_delay));
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
    let commands_before = redis_commands(&mut ctx.admin).await?;
    let redis_cpu_before = redis_cpu_s(&mut ctx.admin).await;
    let broker_cpu_before = broker_cpu_ticks();
    let drained = match variant {
        Variant::Ours => {
            let store = ctx.store.clone();
            let pipelines_before = store.round_trips();
            let drained = drain_ours(ctx, store, queue, key_prefix, &stats, ready_tx).await;
            // RedisStore sends the requests that wait together as one
            // pipeline: its own count of pipelines is the round-trip count
            // (the wrapper below counts requests).
            let pipelines = ctx.store.round_trips() - pipelines_before;
            stats.redis_roundtrips.store(pipelines, Ordering::Relaxed);
            drained
        }
        Variant::OursMemory => {
            let store = amqp_idempotency::store::MemoryStore::new();
            drain_ours(ctx, store, queue, key_prefix, &stats, ready_tx).await
        }
        _ => drain_plain(ctx, variant, queue, key_prefix, &stats, ready_tx).await,
    };
    let commands_after = redis_commands(&mut ctx.admin).await?;
    let server_cpu = ServerCpu {
        redis_us: match (redis_cpu_before, redis_cpu_s(&mut ctx.admin).await) {
            (Some(before), Some(after)) => Some((after - before).max(0.0) * 1e6),
            _ => None,
        },
        broker_us: match (broker_cpu_before, broker_cpu_ticks()) {
            (Some(before), Some(after)) => {
                Some(after.saturating_sub(before) as f64 * 1e6 / clock_ticks_per_s())
            }
            _ => None,
        },
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
    // are counted in the second.
    let redis_cmds = commands_after.saturating_sub(commands_before + 2);
    Ok((stats, drained?, redis_cmds, server_cpu))
}

pub const REDIS_HINT: &str = "start it with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no` or set REDIS_URL";

pub async fn connect_redis(
    url: &str,
) -> Result<(MultiplexedConnection, RedisStore, deadpool_redis::Pool), String> {
    let shown = redact_url(url);
    let fail = |err: String| format!("cannot reach Redis at {shown}: {REDIS_HINT} ({err})");
    let client = redis::Client::open(url)
        .map_err(|err| format!("REDIS_URL `{shown}` is not a valid Redis URL: {err}"))?;
    let admin = tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| fail(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|err| fail(err.to_string()))?;
    let store = tokio::time::timeout(CONNECT_TIMEOUT, RedisStore::connect(url))
        .await
        .map_err(|_| fail(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|err| fail(err.to_string()))?;
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
    Ok((admin, store, pool))
}

pub async fn run(options: Options) -> Result<bool, String> {
    epoch();
    let plan = Arc::new(Plan::new(options.messages, options.duplicates)?);
    let (admin, store, pool) = connect_redis(&options.redis_url).await?;
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
    eprintln!(
        "bench: {} messages ({} unique), payload {} B, prefetch {}, handler delay {:?}, {} round(s), {}; run prefix {base}",
        plan.published(),
        plan.unique,
        options.payload,
        options.prefetch,
        options.handler_delay,
        options.rounds,
        match options.open_loop_rate {
            Some(rate) => format!("open loop at {rate} msgs/s"),
            None => "pre-filled queue".into(),
        }
    );
    let mut ctx = Ctx {
        options: options.clone(),
        plan,
        consume_conn,
        publish_channel,
        admin,
        store,
        pool,
        base,
    };
    let mut rows = Vec::new();
    let mut failure = None;
    'rounds: for round in 1..=options.rounds {
        for &variant in &options.variants {
            eprintln!("bench: round {round}: {}", variant.name());
            match run_one(&mut ctx, variant, round).await {
                Ok((row, line)) => {
                    println!("{line}");
                    rows.push(row);
                }
                Err(err) => {
                    failure = Some(format!("{} round {round}: {err}", variant.name()));
                    break 'rounds;
                }
            }
        }
    }
    match unlink_prefix(&mut ctx.admin, &ctx.base).await {
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
    println!("{}", summary(&options, &rows));
    let ok = rows.iter().all(|r| r.ok);
    if !ok {
        eprintln!("bench: FAILED: a variant lost or double-processed messages (see `problems`)");
    }
    Ok(ok)
}
