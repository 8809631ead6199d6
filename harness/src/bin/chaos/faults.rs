//! The fault injectors: `kill -9` or `SIGSTOP` of a consumer process, a
//! kill and restart of the suite's redis-server, cuts of every connection
//! through the Redis or the RabbitMQ proxy, Redis refusing writes for a
//! while (out of memory, a password set under the consumers, read-only),
//! two messages that hurt their handler: one that times out while the
//! work it spawned goes on, one that aborts its consumer process; and, in
//! `--failover` mode, a failover of the replicated Redis under Sentinel.
//! The orchestrator chooses which fault and when; each injection is written
//! to the ledger.

use std::time::Duration;

use harness::proxy::Proxy;
use harness::redis_server::RedisServer;
use harness::sentinel::{Failover, FailoverStep, ReplicatedRedis};

use crate::ledger::{Ledger, now_us};
use crate::messages::Injected;
use crate::report::Clock;
use crate::rng::SplitMix;
use crate::supervisor::{Consumers, signal};

/// A pause lasts this much longer than the lease.
pub const PAUSE_BEYOND_LEASE: Duration = Duration::from_secs(1);

/// About how long a failover takes, from the kill of the master until the
/// restarted server is an online replica again (for pacing the messages):
/// measured on Redis 7.0, the sentinels promote the replica about 4.3s
/// after the kill (3s of down-after), and turn the restarted server into a
/// replica 10-11s later; the full sync takes well under a second.
pub const FAILOVER_ESTIMATE: Duration = Duration::from_secs(16);

/// A kind of fault (`--faults`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Kill,
    Pause,
    RedisRestart,
    RedisCut,
    AmqpCut,
    RedisOom,
    RedisPassword,
    RedisReadonly,
    HandlerTimeout,
    PoisonAbort,
    Failover,
}

impl Fault {
    pub const ALL: [Fault; 11] = [
        Fault::Kill,
        Fault::Pause,
        Fault::RedisRestart,
        Fault::RedisCut,
        Fault::AmqpCut,
        Fault::RedisOom,
        Fault::RedisPassword,
        Fault::RedisReadonly,
        Fault::HandlerTimeout,
        Fault::PoisonAbort,
        Fault::Failover,
    ];

    /// The faults of a run on the single redis-server (the default).
    pub const SINGLE: [Fault; 10] = [
        Fault::Kill,
        Fault::Pause,
        Fault::RedisRestart,
        Fault::RedisCut,
        Fault::AmqpCut,
        Fault::RedisOom,
        Fault::RedisPassword,
        Fault::RedisReadonly,
        Fault::HandlerTimeout,
        Fault::PoisonAbort,
    ];

    /// The faults that make sense with `--failover`: the failover itself,
    /// and those that hit the consumers and the broker. The others act on
    /// the single redis-server (and its proxy), which that mode does not run.
    pub const WITH_FAILOVER: [Fault; 6] = [
        Fault::Failover,
        Fault::Kill,
        Fault::Pause,
        Fault::AmqpCut,
        Fault::HandlerTimeout,
        Fault::PoisonAbort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::RedisRestart => "redis-restart",
            Fault::RedisCut => "redis-cut",
            Fault::AmqpCut => "amqp-cut",
            Fault::RedisOom => "redis-oom",
            Fault::RedisPassword => "redis-password",
            Fault::RedisReadonly => "redis-readonly",
            Fault::HandlerTimeout => "handler-timeout",
            Fault::PoisonAbort => "poison-abort",
            Fault::Failover => "failover",
        }
    }

    /// The name of its count in the JSON line.
    pub fn json_name(self) -> &'static str {
        match self {
            Fault::Kill => "kills",
            Fault::Pause => "pauses",
            Fault::RedisRestart => "redis_restarts",
            Fault::RedisCut => "redis_cuts",
            Fault::AmqpCut => "amqp_cuts",
            Fault::RedisOom => "redis_ooms",
            Fault::RedisPassword => "redis_password_flips",
            Fault::RedisReadonly => "redis_readonly",
            Fault::HandlerTimeout => "handler_timeouts",
            Fault::PoisonAbort => "poison_aborts",
            Fault::Failover => "failovers",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The Redis the consumers use, which the Redis faults act on.
pub enum RedisSide {
    /// The suite's own redis-server, which the consumers reach through the
    /// proxy (the default).
    Single { server: RedisServer, proxy: Proxy },
    /// A master, its replica and three sentinels (`--failover`): the
    /// consumers ask the sentinels for the master and reach it directly.
    Replicated {
        pair: ReplicatedRedis,
        failover: Option<FailoverRun>,
    },
}

/// A failover under way, with the times for its ledger line.
pub struct FailoverRun {
    pub state: Failover,
    pub killed_us: u64,
    pub promoted_us: Option<u64>,
    /// The sentinels started it on their own (its ledger line ends with
    /// `unplanned`).
    pub unplanned: bool,
}

impl RedisSide {
    /// Whether a failover was started and its killed server is not back as
    /// an online replica yet.
    pub fn failing_over(&self) -> bool {
        matches!(
            self,
            RedisSide::Replicated {
                failover: Some(_),
                ..
            }
        )
    }

    /// Advances the failover under way, if any: restarts the killed server
    /// once the sentinels promoted the replica, and writes the ledger line
    /// `failover <killed> <promoted> <rejoined> <old port> <new port>` once
    /// it is an online replica again (followed by `unplanned` for a failover
    /// the sentinels started on their own). Returns true when a failover ended
    /// now. Fails when the sentinels or the restarted server take too long.
    pub async fn poll(&mut self, ledger: &Ledger, clock: &Clock) -> Result<bool, String> {
        let RedisSide::Replicated { pair, failover } = self else {
            return Ok(false);
        };
        let Some(run) = failover else {
            return Ok(false);
        };
        match pair.advance(&mut run.state).await? {
            FailoverStep::Waiting => Ok(false),
            FailoverStep::Promoted(new) => {
                run.promoted_us = Some(now_us());
                clock.say(format!(
                    "failover: the sentinels promoted 127.0.0.1:{new} {:.1}s after the kill; \
                     127.0.0.1:{} restarted empty, as a plain server",
                    run.state.killed.elapsed().as_secs_f64(),
                    run.state.old
                ));
                Ok(false)
            }
            FailoverStep::Unplanned(now) => {
                // The failover under way ends here for the ledger: its
                // window, from its kill until now, covers whatever made the
                // sentinels act (`now` is the server it killed). The one
                // the suite did not cause goes on in its place, from now
                // (as its kill: a done mark written before and a copy
                // begun after may be lost with it) to its own rejoin line.
                let at = now_us();
                ledger.append(&format!(
                    "failover {} {} {at} {now} {}",
                    run.killed_us,
                    run.promoted_us.unwrap_or(at),
                    run.state.old
                ));
                run.killed_us = at;
                run.promoted_us = Some(at);
                run.unplanned = true;
                clock.say(format!(
                    "failover: the sentinels failed 127.0.0.1:{} over to 127.0.0.1:{now} on their \
                     own (nobody killed it), before 127.0.0.1:{now} was seen as its online \
                     replica: if it had not synced, the done marks are lost (the master they \
                     left resyncs from it); waiting for 127.0.0.1:{} to become a replica. \
                     Their events: {}",
                    run.state.old,
                    run.state.old,
                    pair.events()
                ));
                Ok(false)
            }
            FailoverStep::Rejoined => {
                let rejoined = now_us();
                let new = run.state.new.unwrap_or_default();
                ledger.append(&format!(
                    "failover {} {} {rejoined} {} {new}{}",
                    run.killed_us,
                    run.promoted_us.unwrap_or(rejoined),
                    run.state.old,
                    if run.unplanned { " unplanned" } else { "" }
                ));
                clock.say(format!(
                    "failover: 127.0.0.1:{} is an online replica of 127.0.0.1:{new} ({:.1}s after the kill)",
                    run.state.old,
                    run.state.killed.elapsed().as_secs_f64()
                ));
                *failover = None;
                Ok(true)
            }
        }
    }

    /// Kills every Redis process.
    pub fn kill(&mut self) {
        match self {
            RedisSide::Single { server, .. } => server.kill(),
            RedisSide::Replicated { pair, .. } => pair.kill(),
        }
    }
}

/// What the injectors act on, for one injection.
pub struct Injector<'a> {
    pub consumers: &'a mut Consumers,
    pub redis: &'a mut RedisSide,
    pub amqp_proxy: &'a Proxy,
    /// Publishes the messages of `handler-timeout` and `poison-abort`.
    pub injected: &'a mut Injected,
    pub ledger: &'a Ledger,
    pub clock: &'a Clock,
    pub rng: &'a mut SplitMix,
    /// How long a paused consumer stays stopped: the lease plus [`PAUSE_BEYOND_LEASE`].
    pub pause: Duration,
}

impl Injector<'_> {
    /// Injects `fault`; `kill` and `pause` hit the consumer `pid` in `slot`.
    /// `failover` only kills the master: [`RedisSide::poll`] carries the
    /// failover on while the orchestrator goes on. `busy` describes the
    /// deliveries in flight, for the progress line. Returns whether the
    /// fault happened (a signal can fail to be sent; a failover does not
    /// start while another is under way).
    pub async fn inject(
        self,
        fault: Fault,
        slot: usize,
        pid: u32,
        busy: &str,
    ) -> Result<bool, String> {
        let Injector {
            consumers,
            redis,
            amqp_proxy,
            injected: messages,
            ledger,
            clock,
            rng: fault_rng,
            pause,
        } = self;
        let mut injected = false;
        match fault {
            Fault::Kill => {
                if consumers.kill(slot).is_some() {
                    ledger.append(&format!("kill {pid} {}", now_us()));
                    let new = consumers.spawn(slot)?;
                    injected = true;
                    clock.say(format!(
                        "fault: kill -9 consumer {pid} (slot {slot}; {busy}); started {new}"
                    ));
                }
            }
            Fault::Pause => {
                let from = now_us();
                if signal(pid, "STOP") {
                    clock.say(format!(
                        "fault: SIGSTOP consumer {pid} (slot {slot}; {busy}) for {pause:?}"
                    ));
                    tokio::time::sleep(pause).await;
                    signal(pid, "CONT");
                    ledger.append(&format!("pause {pid} {from} {}", now_us()));
                    injected = true;
                    clock.say(format!("fault: SIGCONT consumer {pid}"));
                }
            }
            Fault::RedisRestart => {
                let (redis, _) = single(redis, fault)?;
                let from = now_us();
                redis.kill();
                let outage = Duration::from_millis(200 + fault_rng.below(600));
                tokio::time::sleep(outage).await;
                redis.spawn()?;
                redis.wait_ready().await?;
                ledger.append(&format!("redis-restart {from} {}", now_us()));
                injected = true;
                clock.say(format!(
                    "fault: redis-server killed and restarted (down {:.1}s; {})",
                    (now_us() - from) as f64 / 1e6,
                    busy.split(',').next().unwrap_or_default()
                ));
            }
            Fault::RedisCut => {
                let (_, redis_proxy) = single(redis, fault)?;
                let cut = redis_proxy.cut();
                ledger.append(&format!("redis-cut {} {cut}", now_us()));
                injected = true;
                clock.say(format!(
                    "fault: cut {cut} Redis connections ({})",
                    busy.split(',').next().unwrap_or_default()
                ));
            }
            Fault::AmqpCut => {
                let cut = amqp_proxy.cut();
                ledger.append(&format!("amqp-cut {} {cut}", now_us()));
                injected = true;
                clock.say(format!(
                    "fault: cut {cut} RabbitMQ connections ({})",
                    busy.split(',').next().unwrap_or_default()
                ));
            }
            Fault::RedisOom | Fault::RedisPassword | Fault::RedisReadonly => {
                let (redis, _) = single(redis, fault)?;
                let outage = Duration::from_millis(300 + fault_rng.below(700));
                let from = now_us();
                let what = refuse_writes(redis.port(), fault, outage).await?;
                let kind = match fault {
                    Fault::RedisOom => "redis-oom",
                    Fault::RedisPassword => "redis-password",
                    _ => "redis-readonly",
                };
                ledger.append(&format!("{kind} {from} {}", now_us()));
                injected = true;
                clock.say(format!(
                    "fault: {what} for {:.1}s ({})",
                    outage.as_secs_f64(),
                    busy.split(',').next().unwrap_or_default()
                ));
            }
            Fault::HandlerTimeout => {
                let id = messages.publish_slow().await?;
                injected_message(ledger, clock, &id, "times out while its work goes on");
                injected = true;
            }
            Fault::PoisonAbort => {
                let id = messages.publish_abort().await?;
                injected_message(ledger, clock, &id, "aborts the consumer that handles it");
                injected = true;
            }
            Fault::Failover => {
                let RedisSide::Replicated { pair, failover } = redis else {
                    return Err("the failover fault needs --failover".into());
                };
                // One at a time: the orchestrator waits for the last one to end.
                if failover.is_none() {
                    let killed_us = now_us();
                    let state = pair.kill_master().await?;
                    clock.say(format!(
                        "fault: failover: kill -9 of the master 127.0.0.1:{} ({})",
                        state.old,
                        busy.split(',').next().unwrap_or_default()
                    ));
                    *failover = Some(FailoverRun {
                        state,
                        killed_us,
                        promoted_us: None,
                        unplanned: false,
                    });
                    injected = true;
                }
            }
        }
        Ok(injected)
    }
}

/// The single redis-server and its proxy, which `fault` acts on.
fn single(redis: &mut RedisSide, fault: Fault) -> Result<(&mut RedisServer, &Proxy), String> {
    match redis {
        RedisSide::Single { server, proxy } => Ok((server, proxy)),
        RedisSide::Replicated { .. } => Err(format!(
            "the `{}` fault acts on the single redis-server: not with --failover",
            fault.name()
        )),
    }
}

fn injected_message(ledger: &Ledger, clock: &Clock, id: &str, what: &str) {
    ledger.append(&format!("inject {id} {}", now_us()));
    clock.say(format!("fault: published {id}, a message that {what}"));
}

/// Makes the suite's redis-server refuse every write for `outage`, the way
/// `fault` does in production, then lifts it. Returns what was done.
/// PING keeps answering throughout: only a write tells the consumers that
/// Redis is usable again.
async fn refuse_writes(port: u16, fault: Fault, outage: Duration) -> Result<String, String> {
    let url = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(url.as_str()).map_err(|err| err.to_string())?;
    let admin = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|err| format!("cannot reach the suite's redis-server at {url}: {err}"))?;
    let run = |args: Vec<String>| {
        let mut admin = admin.clone();
        async move {
            let mut cmd = redis::cmd(&args[0]);
            for arg in &args[1..] {
                cmd.arg(arg);
            }
            cmd.query_async::<redis::Value>(&mut admin)
                .await
                .map_err(|err| format!("redis-server {args:?}: {err}"))
        }
    };
    let words = |text: &str| text.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let what = match fault {
        Fault::RedisOom => {
            run(words("CONFIG SET maxmemory-policy noeviction")).await?;
            run(words("CONFIG SET maxmemory 1")).await?;
            tokio::time::sleep(outage).await;
            run(words("CONFIG SET maxmemory 0")).await?;
            "Redis out of memory (maxmemory 1, noeviction)"
        }
        Fault::RedisPassword => {
            run(words("CONFIG SET requirepass chaos-flip")).await?;
            // The consumers' connections drop; their reconnects are refused.
            run(words("CLIENT KILL TYPE normal SKIPME yes")).await?;
            tokio::time::sleep(outage).await;
            run(vec![
                "CONFIG".into(),
                "SET".into(),
                "requirepass".into(),
                String::new(),
            ])
            .await?;
            "Redis password set under the consumers, then their password restored"
        }
        _ => {
            let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|err| format!("cannot find a free port: {err}"))?;
            run(words(&format!("REPLICAOF 127.0.0.1 {nowhere}"))).await?;
            tokio::time::sleep(outage).await;
            run(words("REPLICAOF NO ONE")).await?;
            "Redis turned read-only (REPLICAOF a dummy), then primary again"
        }
    };
    Ok(what.to_owned())
}
