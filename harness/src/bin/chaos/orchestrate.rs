//! The run, from the orchestrator's side: sets up the suite's redis-server
//! (or, with `--failover`, a master, its replica and three sentinels), the
//! proxies and the queues, starts the consumers, publishes while it injects
//! faults until every message is accounted for, waits for the queue to
//! drain, stops everything and hands the ledger to the report.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqp_idempotency::{Config, RetryMode, parse_duration};
use harness::amqp::split_amqp_url;
use harness::delay_queues;
use harness::env::{DEFAULT_AMQP_URL, env_or};
use harness::proxy::Proxy;
use harness::redis_server::RedisServer;
use harness::sentinel::ReplicatedRedis;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::watch;

use crate::faults::{FAILOVER_ESTIMATE, Fault, Injector, PAUSE_BEYOND_LEASE, RedisSide};
use crate::ledger::{Ledger, now_us};
use crate::messages::{Injected, Pacer, Plan, publish_all};
use crate::options::{Options, retry_name};
use crate::report::{Clock, Findings, conclude};
use crate::rng::SplitMix;
use crate::supervisor::{CONSUMER_ENV, Consumers};
use crate::tally::Tally;
use crate::topology::{Topology, read_dead_letters, read_downstream, ready_count};

pub async fn orchestrate(options: Options) -> Result<bool, String> {
    let clock = Clock::start();
    // When whoever started the suite is gone (e.g. a test that timed out
    // killed `cargo run`), stop: dropping the consumers and the
    // redis-server kills them.
    let parent = std::os::unix::process::parent_id();
    let orphaned = || {
        (std::os::unix::process::parent_id() != parent)
            .then(|| "the process that started the suite is gone: stopping".to_owned())
    };
    let amqp_url =
        env_or("AMQP_URL", DEFAULT_AMQP_URL).unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned());
    let (upstream, url_head, url_tail) = split_amqp_url(&amqp_url)?;
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .map_err(|err| {
            format!(
                "cannot reach RabbitMQ at {}: {err}\n\
                 start it with `rabbitmq-server -detached` (or set AMQP_URL to a running broker)",
                amqp_idempotency::redact_url(&amqp_url)
            )
        })?;
    let admin = connection
        .create_channel()
        .await
        .map_err(|err| format!("cannot open a channel: {err}"))?;

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let run_name = format!("chaos-{}-{}-{nanos:x}", options.seed, std::process::id());
    let dir = std::env::temp_dir().join(&run_name);
    std::fs::create_dir_all(&dir)
        .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    clock.say(format!("run directory {}", dir.display()));
    let ledger_path = dir.join("ledger.log");
    let ledger = Ledger::open(&ledger_path)
        .map_err(|err| format!("cannot create the ledger {}: {err}", ledger_path.display()))?;

    // The consumers reach the single redis-server through a proxy, and
    // the replicated one through its sentinels, which name the master.
    let (mut redis, redis_url) = if options.failover {
        let pair = ReplicatedRedis::start(&dir, "chaos").await?;
        let url = pair.url();
        let ports = pair.server_ports();
        clock.say(format!(
            "redis-server master on port {} and replica on port {}, sentinels on ports {:?} (quorum 2): {url}",
            ports[0],
            ports[1],
            pair.sentinel_ports()
        ));
        let side = RedisSide::Replicated {
            pair,
            failover: None,
        };
        (side, url)
    } else {
        let server = RedisServer::start(&dir).await?;
        let proxy = Proxy::start(format!("127.0.0.1:{}", server.port())).await?;
        clock.say(format!(
            "redis-server on port {} (proxy {})",
            server.port(),
            proxy.addr()
        ));
        let url = format!("redis://{}", proxy.addr());
        (RedisSide::Single { server, proxy }, url)
    };
    let amqp_proxy = Proxy::start(upstream.clone()).await?;
    clock.say(format!("RabbitMQ {upstream} (proxy {})", amqp_proxy.addr()));

    let topology = Topology::new(&run_name, options.outbox);
    topology
        .declare(&admin)
        .await
        .map_err(|err| format!("cannot declare the queues: {err}"))?;

    let mut env: Vec<(String, String)> = CONSUMER_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    env.push(("REDIS_URL".into(), redis_url));
    env.push(("IDEMPOTENCY_RETRY".into(), retry_name(options.retry).into()));
    env.push((
        "IDEMPOTENCY_MIN_REPLICAS".into(),
        options.min_replicas.to_string(),
    ));
    env.push((
        "AMQP_URL".into(),
        format!("{url_head}{}{url_tail}", amqp_proxy.addr()),
    ));
    env.push((
        "RUST_LOG".into(),
        std::env::var("CHAOS_CONSUMER_LOG").unwrap_or_else(|_| "warn".into()),
    ));
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let config = Config::from_lookup(lookup).map_err(|err| err.to_string())?;
    let setting = |name: &str| {
        lookup(name)
            .as_deref()
            .and_then(parse_duration)
            .unwrap_or_default()
    };
    let pause = config.lease_ttl() + PAUSE_BEYOND_LEASE;
    // With `--retry broker`, the delay queues the consumers' runners
    // declare: watched while draining, deleted at the end.
    let delay_queues = match options.retry {
        RetryMode::Broker => delay_queues::names(
            &topology.queue,
            config.retry_backoff(),
            config.retry_backoff_max(),
        ),
        RetryMode::Hold => Vec::new(),
    };
    // Longer than anything a consumer may hold a delivery without a ledger line.
    let quiet = setting("IDEMPOTENCY_IN_PROGRESS_WAIT")
        + setting("IDEMPOTENCY_RETRY_BACKOFF_MAX")
        + Duration::from_millis(1600);

    let mut rng = SplitMix::new(options.seed);
    let mut plan = Plan::new(&options, &mut rng);
    let unique = plan.unique();
    let total = plan.publications.len();
    clock.say(format!(
        "publishing {total} messages to {}: {} plain, {} duplicates, {} poison, {} transient, {} without fingerprint; {} consumers, retries {}{}; faults: {}",
        topology.queue,
        plan.plain.len(),
        plan.duplicates,
        plan.poison.len(),
        plan.transient.len(),
        plan.no_fingerprint.len(),
        options.consumers,
        match options.retry {
            RetryMode::Broker => format!("through the delay queues {}", delay_queues.join(", ")),
            RetryMode::Hold => "held in the consumers (hold)".to_owned(),
        },
        match &topology.downstream {
            Some(queue) => format!(", each handler staging one message for {queue} in the outbox"),
            None => String::new(),
        },
        if options.faults.is_empty() {
            "none".to_owned()
        } else {
            options
                .faults
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(",")
        }
    ));

    let exe = std::env::current_exe()
        .map_err(|err| format!("cannot find this executable to start consumers: {err}"))?;
    let mut consumers = Consumers {
        exe,
        queue: topology.queue.clone(),
        ledger: ledger_path.clone(),
        dir: dir.clone(),
        env: env.clone(),
        outbox: options.outbox,
        slots: (0..options.consumers).map(|_| None).collect(),
        spawned: 0,
    };
    for slot in 0..options.consumers {
        consumers.spawn(slot)?;
    }

    // Publishing lasts about one round of faults (and no less than
    // `--rate` allows), so that each fault hits traffic.
    // With failovers, over about `--min-failovers` rounds: each takes
    // FAILOVER_ESTIMATE, and the next starts only once the last one ended.
    let mut round = options.fault_interval.mul_f64(options.faults.len() as f64);
    if options.faults.contains(&Fault::Pause) {
        round += pause;
    }
    if options.faults.contains(&Fault::RedisRestart) {
        round += Duration::from_secs(1);
    }
    let rounds = if options.faults.contains(&Fault::Failover) {
        round += FAILOVER_ESTIMATE;
        options.min_failovers
    } else {
        1
    };
    let mut spread = round * rounds as u32 + options.fault_interval;
    if options.rate > 0 {
        spread = spread.max(Duration::from_secs_f64(total as f64 / options.rate as f64));
    } else {
        spread = Duration::ZERO;
    }
    let expected_faults = if options.faults.contains(&Fault::Failover) {
        (options.faults.len() * rounds) as f64
    } else {
        spread.as_secs_f64() / options.fault_interval.as_secs_f64()
    }
    .max(1.0);
    let prefetch = usize::from(config.prefetch());
    let (allowance, allowance_rx) = watch::channel(0usize);
    let mut pacer = Pacer {
        total,
        spread,
        start: Instant::now(),
        burst: ((total / 2) as f64 / expected_faults) as usize,
        bursts: 0,
        allowance,
    };
    pacer.burst = pacer.burst.max(options.consumers * prefetch);
    pacer.tick();
    let published = Arc::new(AtomicUsize::new(0));
    let publisher_channel = connection
        .create_channel()
        .await
        .map_err(|err| format!("cannot open a channel: {err}"))?;
    let mut publisher = Some(tokio::spawn(publish_all(
        publisher_channel,
        topology.queue.clone(),
        std::mem::take(&mut plan.publications),
        allowance_rx,
        Arc::clone(&published),
    )));

    // ---- fault phase
    let injector_channel = connection
        .create_channel()
        .await
        .map_err(|err| format!("cannot open a channel: {err}"))?;
    let mut injected = Injected::new(injector_channel, &topology.queue).await?;
    let mut tally = Tally::new(&ledger_path);
    let mut fault_rng = SplitMix::new(options.seed ^ 0xFA17_5EED_0000_0001);
    let mut counts = [0u64; Fault::ALL.len()];
    let mut schedule: Vec<Fault> = Vec::new();
    let jitter = |rng: &mut SplitMix| options.fault_interval.mul_f64(0.5 + rng.unit());
    let mut next_fault = Instant::now() + jitter(&mut fault_rng);
    let deadline = Instant::now() + options.timeout;
    let mut last_progress = Instant::now();
    let mut crashes = 0u64;
    let mut timed_out = false;
    let fault_summary = |counts: &[u64; Fault::ALL.len()]| {
        Fault::ALL
            .iter()
            .map(|f| format!("{} {}", f.name(), counts[f.index()]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(message) = orphaned() {
            return Err(message);
        }
        pacer.tick();
        if redis.poll(&ledger, &clock).await? {
            // The next fault comes a while after the failover ended.
            next_fault = next_fault.max(Instant::now() + jitter(&mut fault_rng));
        }
        tally.tail()?;
        for (slot, pid, status) in consumers.reap() {
            crashes += 1;
            ledger.append(&format!("exit {pid} {}", now_us()));
            clock.say(format!(
                "consumer {pid} (slot {slot}) exited on its own ({status}); starting another"
            ));
            tally.tail()?;
            // Aborts by `poison-abort` messages are expected crashes.
            if crashes.saturating_sub(tally.abort_lines) > 20 {
                return Err(format!(
                    "consumers keep exiting; see the logs in {}",
                    dir.display()
                ));
            }
            consumers.spawn(slot)?;
        }
        if publisher.as_ref().is_some_and(|p| p.is_finished())
            && let Some(handle) = publisher.take()
        {
            match handle.await {
                Ok(Ok(())) => clock.say(format!("published all {total} messages")),
                Ok(Err(message)) => return Err(message),
                Err(err) => return Err(format!("the publisher task failed: {err}")),
            }
        }
        let every_fault = options.faults.iter().all(|f| counts[f.index()] > 0)
            && (!options.faults.contains(&Fault::Failover)
                || counts[Fault::Failover.index()] >= options.min_failovers as u64);
        if publisher.is_none()
            && every_fault
            && !redis.failing_over()
            && tally.accounted.len() >= unique + injected.count()
        {
            clock.say("every message accounted for: no more faults");
            break;
        }
        if Instant::now() >= deadline {
            clock.say("timeout: stopping the faults");
            timed_out = true;
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(2) {
            last_progress = Instant::now();
            let ready = ready_count(&admin, &topology.queue)
                .await
                .map_or_else(|err| format!("? ({err})"), |n| n.to_string());
            let delayed = delay_queues::waiting_in_all(&connection, &delay_queues).await;
            clock.say(format!(
                "published {}/{total}, effects {}, accounted {}/{}, ready {ready}, delayed {delayed}, in flight {}; faults: {}",
                published.load(Ordering::SeqCst),
                tally.effect_lines,
                tally.accounted.len(),
                unique + injected.count(),
                tally.in_flight(),
                fault_summary(&counts)
            ));
        }
        if options.faults.is_empty() || Instant::now() < next_fault {
            continue;
        }
        if schedule.is_empty() {
            schedule = options.faults.clone();
            fault_rng.shuffle(&mut schedule);
        }
        if schedule.last() == Some(&Fault::Failover) && redis.failing_over() {
            // One failover at a time: the next waits for the last to end.
            continue;
        }
        let Some(fault) = schedule.pop() else {
            continue;
        };
        if fault == Fault::Failover
            && publisher.is_none()
            && counts[fault.index()] >= options.min_failovers as u64
        {
            // Enough failovers, and no more traffic for another to hit:
            // each one holds the consumers back for a while.
            continue;
        }
        if pacer.burst() {
            // Strike while the burst is still arriving: the publisher is
            // faster than the consumers, so their prefetch windows are full.
            tokio::time::sleep(Duration::from_millis(20 + fault_rng.below(60))).await;
        }
        let live = consumers.live();
        let Some(&(slot, pid)) = live.get(fault_rng.below(live.len() as u64) as usize) else {
            continue;
        };
        tally.tail()?;
        let busy = format!(
            "{} deliveries in flight, {} in the target",
            tally.in_flight(),
            tally.in_flight_of(pid)
        );
        let injector = Injector {
            consumers: &mut consumers,
            redis: &mut redis,
            amqp_proxy: &amqp_proxy,
            injected: &mut injected,
            ledger: &ledger,
            clock: &clock,
            rng: &mut fault_rng,
            pause,
        };
        if injector.inject(fault, slot, pid, &busy).await? {
            counts[fault.index()] += 1;
        }
        next_fault = Instant::now() + jitter(&mut fault_rng);
    }

    // ---- drain: nothing ready, nothing in flight, every message accounted
    // for, and the ledger quiet, for `quiet` in a row.
    clock.say(format!("draining (quiet period {quiet:?})"));
    let drain_deadline = if timed_out {
        Instant::now() + Duration::from_secs(30)
    } else {
        deadline.max(Instant::now() + Duration::from_secs(60))
    };
    let mut settled_since: Option<Instant> = None;
    let mut drained = false;
    while Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(message) = orphaned() {
            return Err(message);
        }
        // A failover cut short by the timeout: its server must rejoin.
        redis.poll(&ledger, &clock).await?;
        tally.tail()?;
        for (slot, pid, status) in consumers.reap() {
            ledger.append(&format!("exit {pid} {}", now_us()));
            clock.say(format!(
                "consumer {pid} (slot {slot}) exited on its own ({status}); starting another"
            ));
            consumers.spawn(slot)?;
        }
        let ready = ready_count(&admin, &topology.queue).await.ok();
        // Copies waiting out their backoff come back to the queue.
        let delayed = delay_queues::waiting_in_all(&connection, &delay_queues).await;
        let settled = ready == Some(0)
            && delayed == 0
            && !redis.failing_over()
            && tally.in_flight() == 0
            && tally.accounted.len() >= unique + injected.count()
            && publisher.is_none();
        settled_since = match (settled, settled_since) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, since) => since,
        };
        if settled_since.is_some_and(|since| since.elapsed() >= quiet)
            && tally.last_growth.elapsed() >= quiet
        {
            drained = true;
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(2) {
            last_progress = Instant::now();
            clock.say(format!(
                "draining: ready {}, delayed {delayed}, in flight {}, accounted {}/{}",
                ready.map_or_else(|| "?".to_owned(), |n| n.to_string()),
                tally.in_flight(),
                tally.accounted.len(),
                unique + injected.count()
            ));
        }
    }
    if drained {
        clock.say("drained");
    } else {
        clock.say("WARNING: the queue did not drain in time");
    }
    if let Some(handle) = publisher.take() {
        handle.abort();
    }

    let (graceful, forced) = consumers.terminate(Duration::from_secs(15)).await;
    clock.say(format!("consumers stopped: {graceful} gracefully"));
    for (pid, log) in &forced {
        clock.say(format!(
            "WARNING: consumer {pid} did not stop within 15s of SIGTERM and was killed (stuck; log: {})",
            log.display()
        ));
    }
    let stopped = Instant::now();
    tally.tail()?;
    let left = ready_count(&admin, &topology.queue).await.unwrap_or(0)
        + delay_queues::waiting_in_all(&connection, &delay_queues).await;
    let dead = read_dead_letters(&admin, &topology.dead)
        .await
        .map_err(|err| format!("cannot read the dead-letter queue: {err}"))?;
    let downstream = match &topology.downstream {
        Some(queue) => Some(
            read_downstream(&admin, queue)
                .await
                .map_err(|err| format!("cannot read the downstream queue: {err}"))?,
        ),
        None => None,
    };
    topology.delete(&admin).await;
    // Only once they are empty and a while after the consumers' last
    // declare: RabbitMQ 3.10 can crash its at-least-once dead-lettering
    // supervisor when such a quorum queue is deleted right after it was declared.
    let (_, kept) =
        delay_queues::remove(&connection, &delay_queues, stopped, Duration::from_secs(30)).await;
    for queue in kept {
        clock.say(format!("WARNING: delay queue left behind: {queue}"));
    }
    let _ = connection.close(200, "OK".into()).await;
    drop(amqp_proxy);
    redis.kill();

    Ok(conclude(
        Findings {
            options: &options,
            plan: &plan,
            injected: &injected,
            tally: &tally,
            dead: &dead,
            downstream: downstream.as_ref(),
            scope: &topology.queue,
            left,
            crashes,
            counts,
            forced: &forced,
            dir: &dir,
        },
        &clock,
    ))
}
