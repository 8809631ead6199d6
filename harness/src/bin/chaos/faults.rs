//! The fault injectors: `kill -9` or `SIGSTOP` of a consumer process, a
//! kill and restart of the suite's redis-server, cuts of every connection
//! through the Redis or the RabbitMQ proxy, Redis refusing writes for a
//! while (out of memory, a password set under the consumers, read-only),
//! and two messages that hurt their handler: one that times out while the
//! work it spawned goes on, one that aborts its consumer process. The
//! orchestrator chooses which fault and when; each injection is written to
//! the ledger.

use std::time::Duration;

use harness::proxy::Proxy;
use harness::redis_server::RedisServer;

use crate::ledger::{Ledger, now_us};
use crate::messages::Injected;
use crate::report::Clock;
use crate::rng::SplitMix;
use crate::supervisor::{Consumers, signal};

/// A pause lasts this much longer than the lease.
pub const PAUSE_BEYOND_LEASE: Duration = Duration::from_secs(1);

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
}

impl Fault {
    pub const ALL: [Fault; 10] = [
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
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What the injectors act on, for one injection.
pub struct Injector<'a> {
    pub consumers: &'a mut Consumers,
    pub redis: &'a mut RedisServer,
    pub redis_proxy: &'a Proxy,
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
    /// `busy` describes the deliveries in flight, for the progress line.
    /// Returns whether the fault happened (a signal can fail to be sent).
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
            redis_proxy,
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
        }
        Ok(injected)
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
