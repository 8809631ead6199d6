//! The fault injectors: `kill -9` or `SIGSTOP` of a consumer process, a
//! kill and restart of the suite's redis-server, and cuts of every
//! connection through the Redis or the RabbitMQ proxy. The orchestrator
//! chooses which fault and when; each injection is written to the ledger.

use std::time::Duration;

use harness::proxy::Proxy;
use harness::redis_server::RedisServer;

use crate::ledger::{Ledger, now_us};
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
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::Kill,
        Fault::Pause,
        Fault::RedisRestart,
        Fault::RedisCut,
        Fault::AmqpCut,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::RedisRestart => "redis-restart",
            Fault::RedisCut => "redis-cut",
            Fault::AmqpCut => "amqp-cut",
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
        }
        Ok(injected)
    }
}
