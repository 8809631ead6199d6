//! Benchmark harness (issue 5): what does the idempotency middleware cost
//! compared with a plain lapin consumer on the same broker, in the same run?
//!
//! It pre-fills a fresh queue on the local RabbitMQ (publisher confirms,
//! pipelined in batches) and drains it with each variant, interleaved
//! (A B C A B C ...) for several rounds:
//!
//! - `raw_single`: plain lapin consume + one `basic.ack` per message;
//! - `raw_multi`: plain lapin consume + `basic.ack(multiple=true)` over the
//!   contiguous prefix of finished delivery tags. The faster of the two
//!   `raw` sub-variants is the ceiling (`raw_msgs_per_s` in the summary);
//! - `naive`: the obvious implementation: a deadpool-redis pool, one
//!   connection checked out per command, `SET key 1 NX EX 86400` to claim,
//!   then `SET key done EX 86400` to mark done, one ack per message;
//! - `ours`: the crate's [`serve`] runner + [`IdempotencyLayer`] on a
//!   [`RedisStore`], default [`Config`] apart from the prefetch and a key
//!   prefix unique to the run.
//!
//! Every variant processes up to `--prefetch` deliveries at once (spawned
//! tasks bounded by a semaphore, like the runner), and its handler does the
//! same thing: sleep `--handler-delay-ms` when it is above zero, then count
//! one execution for the message id.
//!
//! Per variant and round it prints one JSON line:
//!
//! - `msgs_per_s`: published messages / time from `basic.consume` to the last ack;
//! - `p50_ms`, `p99_ms`: delivery-to-ack latency. Pre-filled: from the moment
//!   the consumer got the delivery to the return of the ack call. Open loop
//!   (`--open-loop-rate`): from the publish timestamp (header
//!   `x-bench-sent-ns`, nanoseconds since the harness started) to the ack.
//!   For `ours` the runner acks internally, so the end point is the moment
//!   the service returned its `Outcome`; the runner issues the ack right after;
//! - `redis_roundtrips_per_msg`: client-side count (naive: commands sent
//!   plus pool checkouts, each of which costs deadpool-redis's recycle
//!   `UNWATCH`+`PING` round trip; ours: pipelines sent, from
//!   `RedisStore::round_trips`, since requests that wait together share one;
//!   ours_mem: calls to the store primitives, through `CountingStore`);
//! - `redis_cmds_per_msg`: from `INFO commandstats` (sum of `calls=`) before
//!   and after the drain. Server-wide: commands run inside Lua scripts count
//!   too, and so do other clients of the same Redis (noise);
//! - `ack_frames_per_msg`: ack/nack/reject calls issued by the consumer;
//! - `consumer_cpu_us_per_msg`: utime + stime of this process
//!   (`/proc/self/stat`, converted with `getconf CLK_TCK`, 100 if unknown)
//!   during the drain, per message. In open-loop mode it includes the publisher;
//! - `redis_server_cpu_us_per_msg` (`INFO cpu`) and `broker_cpu_us_per_msg`
//!   (the local `beam.smp`'s `/proc/<pid>/stat`): server-side CPU during
//!   the drain, per message, `null` when unavailable. Both servers are
//!   shared, so other load on the machine shows up here;
//! - `processed` (distinct ids executed), `duplicates` (deliveries suppressed
//!   as duplicates; for raw, executions beyond the first), plus `published`,
//!   `unique`, `executions`, `ok`.
//!
//! The last line is the summary (medians over rounds):
//! `{"raw_msgs_per_s":..,"ours_msgs_per_s":..,"naive_msgs_per_s":..,"ratio":ours/raw,"redis_roundtrips_per_msg":..,"p99_ms":..}`
//! (round trips and p99 are `ours`'; extra keys follow). In open-loop mode
//! every variant runs at the publish rate, so look at the latencies, not the ratio.
//!
//! The process exits non-zero when a variant lost a message or ran one twice
//! (`processed != unique`, or, for naive and ours, `executions != unique`).
//! Queues and Redis keys of the run are deleted at the end.
//!
//! ```text
//! cargo run --release --example bench -- --messages 100000 --prefetch 256 --payload 64 --rounds 3
//! cargo run --release --example bench -- --open-loop-rate 10000 --variants raw,ours
//! cargo run --example bench -- --quick          # 2000 messages, 1 round: for CI
//! ```
//!
//! Options: `--messages N` (100000), `--payload BYTES` (64), `--prefetch P`
//! (256), `--duplicates F` (fraction of the messages that re-publish an
//! earlier message id with the same body, 0), `--handler-delay-ms D` (0),
//! `--rounds R` (3), `--variants raw,naive,ours` (all; `raw_single` and
//! `raw_multi` select one raw sub-variant; `ours_mem`, never run by default,
//! is ours over a plain in-process map instead of Redis: what the runner and
//! layer cost by themselves), `--open-loop-rate MSGS_PER_S`
//! (publish concurrently at that rate instead of pre-filling), `--quick`
//! (2000 messages and 1 round unless given explicitly).
//!
//! Services: `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`)
//! and `REDIS_URL` (default `redis://127.0.0.1:6379`). Queues are
//! non-durable and messages transient, so the numbers measure the consumer
//! side rather than the broker's disk.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use amqp_idempotency::redact_url;
use amqp_idempotency::store::{Expect, RedisStore, Store};
use amqp_idempotency::{
    BoxError, Config, Disposition, IdempotencyLayer, Outcome, OutcomeKind, ServeOptions,
    StoreError, serve,
};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tower::{Layer, Service, service_fn};

const USAGE: &str = "usage: bench [--messages N] [--payload BYTES] [--prefetch P] [--duplicates F]
             [--handler-delay-ms D] [--rounds R] [--variants raw,naive,ours]
             [--open-loop-rate MSGS_PER_S] [--runtime current|multi] [--quick]
--runtime: the tokio runtime every variant runs on (default current: one thread,
           fewer wakeups, the faster choice on a small machine)
env: AMQP_URL (amqp://guest:guest@127.0.0.1:5672/%2f), REDIS_URL (redis://127.0.0.1:6379)";

/// Header carrying the publish time (nanoseconds since the harness started) in open-loop mode.
const SENT_HEADER: &str = "x-bench-sent-ns";
/// Messages published before their confirms are awaited while pre-filling.
const PUBLISH_BATCH: usize = 2000;
/// A drain that makes no progress for this long fails.
const STALL: Duration = Duration::from_secs(30);
/// How long connecting to a service may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Retention of the naive variant's keys, as the issue describes it.
const NAIVE_TTL_SECS: u64 = 86_400;

// ---------------------------------------------------------------- options

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    RawSingle,
    RawMulti,
    Naive,
    Ours,
    /// Diagnostic, only when asked for: ours over the in-process
    /// `MemoryStore`, to separate the runner and layer from Redis.
    OursMemory,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::RawSingle => "raw_single",
            Self::RawMulti => "raw_multi",
            Self::Naive => "naive",
            Self::Ours => "ours",
            Self::OursMemory => "ours_mem",
        }
    }

    /// Whether the variant suppresses duplicates (raw runs every delivery).
    fn deduplicates(self) -> bool {
        matches!(self, Self::Naive | Self::Ours | Self::OursMemory)
    }
}

#[derive(Clone, Debug)]
struct Options {
    messages: u64,
    payload: usize,
    prefetch: u16,
    duplicates: f64,
    handler_delay: Duration,
    rounds: u32,
    variants: Vec<Variant>,
    open_loop_rate: Option<f64>,
    multi_thread: bool,
    amqp_url: String,
    redis_url: String,
}

/// `Ok(None)`: `--help`.
fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut messages = None;
    let mut rounds = None;
    let mut payload = 64;
    let mut prefetch = 256;
    let mut duplicates = 0.0;
    let mut handler_delay = Duration::ZERO;
    let mut variants = vec![
        Variant::RawSingle,
        Variant::RawMulti,
        Variant::Naive,
        Variant::Ours,
    ];
    let mut open_loop_rate = None;
    let mut quick = false;
    let mut multi_thread = false;
    while let Some(arg) = argv.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_owned(), Some(value.into())),
            _ => (arg.clone(), None),
        };
        let mut value = |expected: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{name} needs a value ({expected})"))
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(None),
            "--quick" => quick = true,
            "--runtime" => {
                let value = argv.next().ok_or("--runtime needs `current` or `multi`")?;
                multi_thread = match value.as_str() {
                    "current" => false,
                    "multi" => true,
                    _ => {
                        return Err(format!(
                            "--runtime expects `current` or `multi`, got {value:?}"
                        ));
                    }
                };
            }
            "--messages" => messages = Some(parse_num(&name, &value("a count")?, 1..=u64::MAX)?),
            "--payload" => payload = parse_num(&name, &value("bytes")?, 0..=16 * 1024 * 1024)?,
            "--prefetch" => prefetch = parse_num(&name, &value("1 to 65535")?, 1..=u16::MAX)?,
            "--rounds" => rounds = Some(parse_num(&name, &value("a count")?, 1..=1000)?),
            "--handler-delay-ms" => {
                handler_delay =
                    Duration::from_millis(parse_num(&name, &value("milliseconds")?, 0..=60_000)?)
            }
            "--duplicates" => {
                let raw = value("a fraction in [0, 1)")?;
                duplicates = raw
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| (0.0..1.0).contains(f))
                    .ok_or_else(|| {
                        format!("--duplicates: `{raw}` is not a fraction in [0, 1), e.g. 0.1")
                    })?;
            }
            "--open-loop-rate" => {
                let raw = value("messages per second")?;
                open_loop_rate = Some(
                    raw.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or_else(|| {
                            format!("--open-loop-rate: `{raw}` is not a positive rate (msgs/s)")
                        })?,
                );
            }
            "--variants" => {
                let raw = value("a list such as raw,naive,ours")?;
                let mut chosen = Vec::new();
                for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let add: &[Variant] = match part {
                        "raw" => &[Variant::RawSingle, Variant::RawMulti],
                        "raw_single" => &[Variant::RawSingle],
                        "raw_multi" => &[Variant::RawMulti],
                        "naive" => &[Variant::Naive],
                        "ours" => &[Variant::Ours],
                        "ours_mem" => &[Variant::OursMemory],
                        other => {
                            return Err(format!(
                                "--variants: unknown variant `{other}` (expected raw, raw_single, raw_multi, naive, ours, ours_mem)"
                            ));
                        }
                    };
                    for v in add {
                        if !chosen.contains(v) {
                            chosen.push(*v);
                        }
                    }
                }
                if chosen.is_empty() {
                    return Err("--variants: name at least one of raw, naive, ours".into());
                }
                variants = chosen;
            }
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    let env = |name: &str, default: &str| match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Ok(value),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(default.to_owned()),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    };
    Ok(Some(Options {
        messages: messages.unwrap_or(if quick { 2000 } else { 100_000 }),
        payload,
        prefetch,
        duplicates,
        handler_delay,
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        variants,
        open_loop_rate,
        multi_thread,
        amqp_url: env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")?,
        redis_url: env("REDIS_URL", "redis://127.0.0.1:6379")?,
    }))
}

fn parse_num<T>(name: &str, raw: &str, range: std::ops::RangeInclusive<T>) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    raw.trim()
        .parse::<T>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            format!(
                "{name}: `{raw}` is not an integer from {} to {}",
                range.start(),
                range.end()
            )
        })
}

// ---------------------------------------------------------------- clock, cpu

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the harness started (the open-loop publish timestamp).
fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// utime + stime of this process, in clock ticks.
fn cpu_ticks() -> Option<u64> {
    stat_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// utime + stime from the text of a `/proc/<pid>/stat`.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces: fields after the last ')'
    // start with field 3 (state); utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `getconf CLK_TCK`, read once; 100 (the usual value on Linux) if that fails.
fn clock_ticks_per_s() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Wall clock and CPU time of a drain.
struct Meter {
    started: Instant,
    cpu: Option<u64>,
}

struct Measured {
    elapsed: Duration,
    cpu_us: Option<f64>,
}

impl Meter {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            cpu: cpu_ticks(),
        }
    }

    fn stop(&self) -> Measured {
        let elapsed = self.started.elapsed();
        let cpu_us = match (self.cpu, cpu_ticks()) {
            (Some(before), Some(after)) => {
                Some(after.saturating_sub(before) as f64 * 1e6 / clock_ticks_per_s())
            }
            _ => None,
        };
        Measured { elapsed, cpu_us }
    }
}

// ---------------------------------------------------------------- the plan

/// The message ids to publish, in order: `unique` ids, some of them twice.
struct Plan {
    ids: Vec<u32>,
    unique: u32,
}

impl Plan {
    fn new(total: u64, duplicate_fraction: f64) -> Result<Self, String> {
        let total_u32 = u32::try_from(total)
            .map_err(|_| format!("--messages {total} is too large (at most {})", u32::MAX))?;
        let dups = ((f64::from(total_u32) * duplicate_fraction).round() as u32)
            .min(total_u32.saturating_sub(1));
        let unique = total_u32 - dups;
        let mut ids: Vec<u32> = (0..unique).collect();
        // Deterministic pseudo-random choice and order (xorshift64), so all
        // variants drain the same sequence.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        if dups > 0 {
            for _ in 0..dups {
                ids.push((next() % u64::from(unique)) as u32);
            }
            for i in (1..ids.len()).rev() {
                let j = (next() % (i as u64 + 1)) as usize;
                ids.swap(i, j);
            }
        }
        Ok(Self { ids, unique })
    }

    fn published(&self) -> u64 {
        self.ids.len() as u64
    }
}

/// The body of message `id`: `size` bytes derived from the id, so a
/// duplicate carries the same body (the middleware compares payload hashes).
fn body(id: u32, size: usize) -> Vec<u8> {
    let seed = id.to_le_bytes();
    (0..size).map(|i| seed[i % 4] ^ (i as u8)).collect()
}

// ---------------------------------------------------------------- per-run tallies

/// Everything a drain counts; shared by the consumer tasks.
struct RunStats {
    /// Executions of the handler per message id.
    executions: Vec<AtomicU32>,
    handler_delay: Duration,
    /// Delivery-to-ack latencies, microseconds.
    latencies_us: Mutex<Vec<u32>>,
    /// Published messages finished for good (acked, or dead-lettered).
    settled: AtomicU64,
    target: u64,
    done: Notify,
    /// Deliveries suppressed as duplicates (naive, ours).
    duplicates: AtomicU64,
    ack_calls: AtomicU64,
    redis_roundtrips: AtomicU64,
    /// Deliveries requeued (ours: a duplicate in progress elsewhere, a store error).
    requeued: AtomicU64,
    /// Anything that should not happen in a benchmark: failed acks, Redis
    /// errors, dead-lettered messages, outcomes other than processed/duplicate.
    errors: AtomicU64,
    /// Deliveries whose message id is not one of ours.
    foreign: AtomicU64,
}

impl RunStats {
    fn new(plan: &Plan, handler_delay: Duration) -> Self {
        Self {
            executions: (0..plan.unique).map(|_| AtomicU32::new(0)).collect(),
            handler_delay,
            latencies_us: Mutex::new(Vec::with_capacity(plan.ids.len())),
            settled: AtomicU64::new(0),
            target: plan.published(),
            done: Notify::new(),
            duplicates: AtomicU64::new(0),
            ack_calls: AtomicU64::new(0),
            redis_roundtrips: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        }
    }

    /// The handler every variant runs: sleep (if asked), then count one
    /// execution of the message id.
    async fn handle(&self, id: Option<u32>) {
        if !self.handler_delay.is_zero() {
            tokio::time::sleep(self.handler_delay).await;
        }
        match id.and_then(|id| self.executions.get(id as usize)) {
            Some(count) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.foreign.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn settle(&self, start_ns: u64) {
        self.record_latency(&[start_ns]);
        self.settled_n(1);
    }

    fn settle_many(&self, starts: &[u64]) {
        self.record_latency(starts);
        self.settled_n(starts.len() as u64);
    }

    fn record_latency(&self, starts: &[u64]) {
        let now = now_ns();
        let mut latencies = self
            .latencies_us
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        latencies.extend(
            starts
                .iter()
                .map(|start| u32::try_from(now.saturating_sub(*start) / 1000).unwrap_or(u32::MAX)),
        );
    }

    fn settled_n(&self, n: u64) {
        if self.settled.fetch_add(n, Ordering::AcqRel) + n >= self.target {
            self.done.notify_one();
        }
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until every published message is settled; fails when nothing
    /// moves for [`STALL`].
    async fn wait_done(&self) -> Result<(), String> {
        let mut last = self.settled.load(Ordering::Acquire);
        let mut last_progress = Instant::now();
        loop {
            let settled = self.settled.load(Ordering::Acquire);
            if settled >= self.target {
                return Ok(());
            }
            if settled != last {
                last = settled;
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= STALL {
                return Err(format!(
                    "stalled: {settled} of {} messages settled, no progress for {STALL:?}",
                    self.target
                ));
            }
            tokio::select! {
                () = self.done.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// The message id (decimal) of a delivery.
fn message_id(delivery: &Delivery) -> Option<u32> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .and_then(|id| id.as_str().parse().ok())
}

/// Where the delivery-to-ack latency starts: the publish timestamp in
/// open-loop mode, else now (the consumer just received the delivery).
fn latency_start(delivery: &Delivery) -> u64 {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| match headers.inner().get(SENT_HEADER) {
            Some(AMQPValue::LongLongInt(ns)) => u64::try_from(*ns).ok(),
            _ => None,
        })
        .unwrap_or_else(now_ns)
}

// ---------------------------------------------------------------- ours: counting store, observing service

/// A store that counts calls to the four primitives and delegates them.
///
/// `claim`/`renew`/`complete`/`release` are provided methods of [`Store`]
/// built on the primitives, and `RedisStore` does one round trip per
/// primitive, so the count is the number of Redis round trips. If the
/// library ever overrides a provided method in `RedisStore` (a pipelined
/// claim, say), this wrapper must delegate that method too, or the benchmark
/// would measure the provided fallback instead of the override.
struct CountingStore<S> {
    inner: S,
    stats: Arc<RunStats>,
}

impl<S> CountingStore<S> {
    fn tick(&self) {
        RunStats::count(&self.stats.redis_roundtrips);
    }
}

impl<S: Store> Store for CountingStore<S> {
    async fn insert_or_get(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        self.tick();
        self.inner.insert_or_get(key, value, ttl).await
    }

    async fn transition(
        &self,
        key: &str,
        from: Expect<'_>,
        to: Option<&str>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.tick();
        self.inner.transition(key, from, to, ttl).await
    }

    async fn get(&self, key: &str) -> Result<Option<(String, Option<Duration>)>, StoreError> {
        self.tick();
        self.inner.get(key).await
    }

    async fn probe(&self, key: &str) -> Result<(), StoreError> {
        self.tick();
        self.inner.probe(key).await
    }
}

/// Wraps the idempotency service to see each [`Outcome`]: counts
/// duplicates and requeues, and records the latency up to the outcome
/// (the runner acks right after it).
#[derive(Clone)]
struct Observe<S> {
    inner: S,
    stats: Arc<RunStats>,
}

impl<S> Service<Delivery> for Observe<S>
where
    S: Service<Delivery, Response = Outcome, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let start = latency_start(&delivery);
        let stats = Arc::clone(&self.stats);
        let call = self.inner.call(delivery);
        Box::pin(async move {
            let result = call.await;
            match &result {
                Ok(outcome) => {
                    match outcome.kind() {
                        OutcomeKind::Processed => {}
                        OutcomeKind::Duplicate => RunStats::count(&stats.duplicates),
                        OutcomeKind::InProgressElsewhere => {}
                        other => {
                            eprintln!("bench: unexpected outcome {other} ({:?})", outcome.reason());
                            RunStats::count(&stats.errors);
                        }
                    }
                    match outcome.disposition() {
                        Disposition::Ack => stats.settle(start),
                        Disposition::Requeue { .. } => RunStats::count(&stats.requeued),
                        // Never comes back: counted as settled so the run ends (and fails).
                        Disposition::DeadLetter => stats.settled_n(1),
                    }
                }
                Err(err) => {
                    eprintln!("bench: the service failed: {err}");
                    RunStats::count(&stats.errors);
                    RunStats::count(&stats.requeued);
                }
            }
            result
        })
    }
}

// ---------------------------------------------------------------- drains

/// Shared connections and settings.
struct Ctx {
    options: Options,
    plan: Arc<Plan>,
    consume_conn: Connection,
    publish_channel: Channel,
    admin: MultiplexedConnection,
    store: RedisStore,
    pool: deadpool_redis::Pool,
    /// Prefix of every queue and Redis key of this harness run.
    base: String,
}

async fn consume(channel: &Channel, queue: &str, prefetch: u16) -> Result<Consumer, String> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|err| format!("basic.qos failed: {err}"))?;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("basic.consume on `{queue}` failed: {err}"))
}

async fn new_channel(conn: &Connection) -> Result<Channel, String> {
    conn.create_channel()
        .await
        .map_err(|err| format!("cannot open a RabbitMQ channel: {err}"))
}

async fn stop_consumer(channel: &Channel, consumer: &Consumer) {
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let _ = channel.close(200, "OK".into()).await;
}

/// raw_single, raw_multi and naive: a consume loop that spawns one task per
/// delivery, at most `prefetch` at once, until every message is settled.
async fn drain_plain(
    ctx: &Ctx,
    variant: Variant,
    queue: &str,
    key_prefix: &str,
    stats: &Arc<RunStats>,
    ready: oneshot::Sender<()>,
) -> Result<Measured, String> {
    let channel = new_channel(&ctx.consume_conn).await?;
    let meter = Meter::start();
    let mut consumer = consume(&channel, queue, ctx.options.prefetch).await?;
    let _ = ready.send(());
    let slots = Arc::new(Semaphore::new(usize::from(ctx.options.prefetch)));
    let (finished_tx, finished_rx) = mpsc::unbounded_channel();
    let tracker = (variant == Variant::RawMulti).then(|| {
        tokio::spawn(ack_contiguous_prefix(
            channel.clone(),
            finished_rx,
            Arc::clone(stats),
        ))
    });
    let key_prefix: Arc<str> = key_prefix.into();
    let consume_loop = async {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return "the semaphore closed".to_owned();
            };
            let delivery = match consumer.next().await {
                None => return "the consumer was cancelled".to_owned(),
                Some(Err(err)) => return format!("the consumer failed: {err}"),
                Some(Ok(delivery)) => delivery,
            };
            let stats = Arc::clone(stats);
            match variant {
                Variant::RawSingle => {
                    tokio::spawn(async move {
                        let start = latency_start(&delivery);
                        stats.handle(message_id(&delivery)).await;
                        ack_one(&delivery, &stats, start).await;
                        drop(slot);
                    });
                }
                Variant::RawMulti => {
                    let finished = finished_tx.clone();
                    tokio::spawn(async move {
                        let start = latency_start(&delivery);
                        stats.handle(message_id(&delivery)).await;
                        let _ = finished.send((delivery.delivery_tag, start));
                        drop(slot);
                    });
                }
                Variant::Naive => {
                    let pool = ctx.pool.clone();
                    let key_prefix = Arc::clone(&key_prefix);
                    tokio::spawn(async move {
                        let start = latency_start(&delivery);
                        naive(&pool, &key_prefix, &delivery, &stats, start).await;
                        drop(slot);
                    });
                }
                Variant::Ours | Variant::OursMemory => {
                    unreachable!("ours runs through `serve`")
                }
            }
        }
    };
    let result = tokio::select! {
        done = stats.wait_done() => done,
        failure = consume_loop => Err(failure),
    };
    let measured = meter.stop();
    drop(finished_tx);
    stop_consumer(&channel, &consumer).await;
    if let Some(tracker) = tracker {
        tracker.abort();
    }
    result.map(|()| measured)
}

async fn ack_one(delivery: &Delivery, stats: &RunStats, start: u64) {
    RunStats::count(&stats.ack_calls);
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => stats.settle(start),
        Ok(false) => {
            eprintln!("bench: ack of {} not sent", delivery.delivery_tag);
            RunStats::count(&stats.errors);
        }
        Err(err) => {
            eprintln!("bench: ack of {} failed: {err}", delivery.delivery_tag);
            RunStats::count(&stats.errors);
        }
    }
}

/// raw_multi's acker: collects finished tags and acks the contiguous prefix
/// with one `basic.ack(multiple=true)`; whatever finishes while that ack is
/// being written is acked by the next one. Delivery tags start at 1 on the
/// fresh channel, and only this consumer receives on it.
async fn ack_contiguous_prefix(
    channel: Channel,
    mut finished: mpsc::UnboundedReceiver<(u64, u64)>,
    stats: Arc<RunStats>,
) {
    let mut pending = BTreeMap::new();
    let mut next_tag = 1_u64;
    let mut batch = Vec::new();
    while let Some((tag, start)) = finished.recv().await {
        pending.insert(tag, start);
        while let Ok((tag, start)) = finished.try_recv() {
            pending.insert(tag, start);
        }
        batch.clear();
        while let Some(start) = pending.remove(&next_tag) {
            batch.push(start);
            next_tag += 1;
        }
        if batch.is_empty() {
            continue;
        }
        RunStats::count(&stats.ack_calls);
        let options = BasicAckOptions { multiple: true };
        match channel.basic_ack(next_tag - 1, options).await {
            Ok(()) => stats.settle_many(&batch),
            Err(err) => {
                eprintln!("bench: multiple ack up to {} failed: {err}", next_tag - 1);
                RunStats::count(&stats.errors);
            }
        }
    }
}

/// A pool checkout. deadpool-redis recycles an idle connection with a
/// pipelined `UNWATCH` + `PING` before handing it out (and a new connection
/// starts with a handshake), so every checkout is one more round trip: it is
/// counted in `redis_roundtrips_per_msg` along with the commands themselves.
async fn checkout(
    pool: &deadpool_redis::Pool,
    stats: &RunStats,
) -> Result<deadpool_redis::Connection, String> {
    RunStats::count(&stats.redis_roundtrips);
    pool.get().await.map_err(|err| err.to_string())
}

/// The obvious implementation: a pool checkout per command, claim with
/// `SET NX EX`, mark done with a second `SET`, one ack per message. A key
/// that already exists is taken as a duplicate and acked.
async fn naive(
    pool: &deadpool_redis::Pool,
    key_prefix: &str,
    delivery: &Delivery,
    stats: &RunStats,
    start: u64,
) {
    let id = message_id(delivery);
    let key = match &delivery.properties.message_id() {
        Some(message_id) => format!("{key_prefix}:{}", message_id.as_str()),
        None => format!("{key_prefix}:none"),
    };
    let claimed: Result<bool, String> = async {
        let mut conn = checkout(pool, stats).await?;
        RunStats::count(&stats.redis_roundtrips);
        let reply: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(NAIVE_TTL_SECS)
            .query_async(&mut conn)
            .await
            .map_err(|err| err.to_string())?;
        Ok(reply.is_some())
    }
    .await;
    let marked: Result<(), String> = match claimed {
        Ok(true) => {
            stats.handle(id).await;
            async {
                let mut conn = checkout(pool, stats).await?;
                RunStats::count(&stats.redis_roundtrips);
                redis::cmd("SET")
                    .arg(&key)
                    .arg("done")
                    .arg("EX")
                    .arg(NAIVE_TTL_SECS)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|err| err.to_string())
            }
            .await
        }
        Ok(false) => {
            RunStats::count(&stats.duplicates);
            Ok(())
        }
        Err(err) => Err(err),
    };
    match marked {
        Ok(()) => ack_one(delivery, stats, start).await,
        Err(err) => {
            eprintln!("bench: naive: Redis failed for {key}: {err}; requeueing");
            RunStats::count(&stats.errors);
            RunStats::count(&stats.requeued);
            RunStats::count(&stats.ack_calls);
            let options = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            let _ = delivery.acker.nack(options).await;
        }
    }
}

/// ours: the crate's runner and layer, default settings, over `store`.
async fn drain_ours<S: Store>(
    ctx: &Ctx,
    store: S,
    queue: &str,
    key_prefix: &str,
    stats: &Arc<RunStats>,
    ready: oneshot::Sender<()>,
) -> Result<Measured, String> {
    let config = Config::default()
        .prefetch(ctx.options.prefetch)
        .key_prefix(key_prefix);
    let store = CountingStore {
        inner: store,
        stats: Arc::clone(stats),
    };
    let layer = IdempotencyLayer::new(store, queue, config)
        .map_err(|err| format!("cannot build the idempotency layer: {err}"))?;
    let handler_stats = Arc::clone(stats);
    let handler = service_fn(move |delivery: Delivery| {
        let stats = Arc::clone(&handler_stats);
        let id = message_id(&delivery);
        async move {
            stats.handle(id).await;
            Ok::<_, Infallible>(())
        }
    });
    let service = Observe {
        inner: layer.layer(handler),
        stats: Arc::clone(stats),
    };
    let waiter = Arc::clone(stats);
    let stalled = Arc::new(Mutex::new(None));
    let stalled_in = Arc::clone(&stalled);
    let shutdown = async move {
        if let Err(err) = waiter.wait_done().await {
            *stalled_in
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(err);
        }
    };
    let options = ServeOptions::new()
        .concurrency(usize::from(ctx.options.prefetch))
        .shutdown_on(shutdown);

    let channel = new_channel(&ctx.consume_conn).await?;
    let meter = Meter::start();
    let consumer = consume(&channel, queue, ctx.options.prefetch).await?;
    let _ = ready.send(());
    let served = serve(consumer, service, options).await;
    let measured = meter.stop();
    let _ = channel.close(200, "OK".into()).await;
    let report = served.map_err(|err| format!("serve failed: {err}"))?;
    // The runner counts the ack/nack/reject frames it sent (consecutive
    // acks share one `multiple` frame).
    stats.ack_calls.store(report.frames, Ordering::Relaxed);
    if report.unsettled + report.abandoned > 0 {
        stats
            .errors
            .fetch_add(report.unsettled + report.abandoned, Ordering::Relaxed);
    }
    if let Some(err) = stalled
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
    {
        return Err(err);
    }
    Ok(measured)
}

// ---------------------------------------------------------------- publishing

fn properties(id: u32, sent_ns: Option<u64>) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_message_id(id.to_string().into())
        .with_delivery_mode(1);
    match sent_ns {
        None => properties,
        Some(ns) => {
            let mut headers = FieldTable::default();
            headers.insert(
                SENT_HEADER.into(),
                AMQPValue::LongLongInt(i64::try_from(ns).unwrap_or(i64::MAX)),
            );
            properties.with_headers(headers)
        }
    }
}

fn check_confirm(confirm: Result<lapin::Confirmation, lapin::Error>) -> Result<(), String> {
    match confirm {
        Ok(confirmation) if confirmation.is_ack() => Ok(()),
        Ok(confirmation) => Err(format!(
            "the broker did not confirm a publish: {confirmation:?}"
        )),
        Err(err) => Err(format!("publisher confirm failed: {err}")),
    }
}

/// Pre-fills `queue`: batches of pipelined publishes, then their confirms.
async fn prefill(ctx: &Ctx, queue: &str) -> Result<(), String> {
    let channel = &ctx.publish_channel;
    for chunk in ctx.plan.ids.chunks(PUBLISH_BATCH) {
        let publishes = chunk.iter().map(|&id| async move {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body(id, ctx.options.payload),
                    properties(id, None),
                )
                .await
                .map_err(|err| format!("publish to `{queue}` failed: {err}"))?;
            check_confirm(confirm.await)
        });
        futures_util::future::try_join_all(publishes).await?;
    }
    Ok(())
}

/// Open loop: publishes the plan at `rate` msgs/s once the consumer is
/// ready, stamping each message with its publish time.
async fn publish_open_loop(
    channel: Channel,
    queue: String,
    plan: Arc<Plan>,
    payload: usize,
    rate: f64,
    ready: oneshot::Receiver<()>,
) -> Result<(), String> {
    if ready.await.is_err() {
        return Ok(()); // the drain failed before consuming
    }
    let started = Instant::now();
    let total = plan.ids.len();
    let mut sent = 0;
    let mut confirms = FuturesUnordered::new();
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
        // The messages due by now go out together (their frames share
        // writes), each stamped with the time it is handed to lapin.
        let publishes = plan.ids[sent..due].iter().map(|&id| {
            let channel = &channel;
            let queue = queue.as_str();
            async move {
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &body(id, payload),
                        properties(id, Some(now_ns())),
                    )
                    .await
                    .map_err(|err| format!("publish to `{queue}` failed: {err}"))
            }
        });
        confirms.extend(futures_util::future::try_join_all(publishes).await?);
        sent = due;
        while let Some(Some(confirm)) = confirms.next().now_or_never() {
            check_confirm(confirm)?;
        }
        if sent < total {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    while let Some(confirm) = confirms.next().await {
        check_confirm(confirm)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- redis admin

/// Sum of `calls=` over the `cmdstat_*` lines of `INFO commandstats`.
async fn redis_commands(admin: &mut MultiplexedConnection) -> Result<u64, String> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .map_err(|err| format!("INFO commandstats failed: {err}"))?;
    Ok(info
        .lines()
        .filter(|line| line.starts_with("cmdstat_"))
        .filter_map(|line| {
            let calls = line.split_once("calls=")?.1;
            calls.split(',').next()?.trim().parse::<u64>().ok()
        })
        .sum())
}

/// Redis server CPU (`used_cpu_user` + `used_cpu_sys` of `INFO cpu`), seconds.
async fn redis_cpu_s(admin: &mut MultiplexedConnection) -> Option<f64> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(admin)
        .await
        .ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// Server-side CPU during a drain: Redis and the RabbitMQ node. Both are
/// shared with whatever else runs on the machine.
struct ServerCpu {
    redis_us: Option<f64>,
    broker_us: Option<f64>,
}

/// utime + stime of the local RabbitMQ node (`beam.smp` processes), in
/// clock ticks; `None` when it is not on this machine or not readable.
fn broker_cpu_ticks() -> Option<u64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        let is_beam = std::fs::read_to_string(path.join("comm"))
            .map(|comm| comm.trim() == "beam.smp")
            .unwrap_or(false);
        if !is_beam {
            continue;
        }
        if let Some(ticks) = std::fs::read_to_string(path.join("stat"))
            .ok()
            .and_then(|stat| stat_ticks(&stat))
        {
            total = Some(total.unwrap_or(0) + ticks);
        }
    }
    total
}

/// Deletes the keys that start with `prefix` (SCAN MATCH + UNLINK in batches).
async fn unlink_prefix(admin: &mut MultiplexedConnection, prefix: &str) -> Result<u64, String> {
    let pattern = format!("{prefix}*");
    let mut cursor = 0_u64;
    let mut removed = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(admin)
            .await
            .map_err(|err| format!("SCAN {pattern} failed: {err}"))?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(admin)
                .await
                .map_err(|err| format!("UNLINK failed: {err}"))?;
            removed += n;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

// ---------------------------------------------------------------- one run, reporting

/// One variant's numbers for one round.
#[derive(Clone, Debug)]
struct Row {
    variant: Variant,
    msgs_per_s: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    roundtrips_per_msg: f64,
    ok: bool,
}

async fn run_one(ctx: &mut Ctx, variant: Variant, round: u32) -> Result<(Row, String), String> {
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

async fn measure(
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
    // The `INFO` that took the first snapshot is counted in the second.
    let redis_cmds = commands_after.saturating_sub(commands_before + 1);
    Ok((stats, drained?, redis_cmds, server_cpu))
}

fn percentile(sorted: &[u32], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(f64::from(sorted[rank - 1]) / 1000.0)
}

fn report(
    ctx: &Ctx,
    variant: Variant,
    round: u32,
    stats: &RunStats,
    measured: &Measured,
    redis_cmds: u64,
    server_cpu: &ServerCpu,
) -> (Row, String) {
    let published = ctx.plan.published();
    let unique = u64::from(ctx.plan.unique);
    let per_msg = |n: f64| n / published as f64;
    let mut latencies = std::mem::take(
        &mut *stats
            .latencies_us
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    latencies.sort_unstable();
    let executions: u64 = stats
        .executions
        .iter()
        .map(|c| u64::from(c.load(Ordering::Relaxed)))
        .sum();
    let processed = stats
        .executions
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) > 0)
        .count() as u64;
    let duplicates = if variant.deduplicates() {
        stats.duplicates.load(Ordering::Relaxed)
    } else {
        executions.saturating_sub(processed)
    };
    let errors = stats.errors.load(Ordering::Relaxed);
    let foreign = stats.foreign.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    if processed != unique {
        problems.push(format!(
            "{} message ids never processed",
            unique - processed.min(unique)
        ));
    }
    let expected_executions = if variant.deduplicates() {
        unique
    } else {
        published
    };
    if executions != expected_executions {
        problems.push(format!(
            "{executions} executions, expected {expected_executions}"
        ));
    }
    if duplicates != published - unique {
        problems.push(format!(
            "{duplicates} duplicates, expected {}",
            published - unique
        ));
    }
    if errors > 0 {
        problems.push(format!("{errors} errors"));
    }
    if foreign > 0 {
        problems.push(format!("{foreign} deliveries with a foreign message id"));
    }
    let secs = measured.elapsed.as_secs_f64();
    let row = Row {
        variant,
        msgs_per_s: published as f64 / secs.max(1e-9),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        roundtrips_per_msg: per_msg(stats.redis_roundtrips.load(Ordering::Relaxed) as f64),
        ok: problems.is_empty(),
    };
    let line = json_object(&[
        ("variant", Json::Str(variant.name().into())),
        ("round", Json::Int(u64::from(round))),
        ("msgs_per_s", Json::num(row.msgs_per_s, 1)),
        ("p50_ms", Json::opt(row.p50_ms, 3)),
        ("p99_ms", Json::opt(row.p99_ms, 3)),
        (
            "redis_roundtrips_per_msg",
            Json::num(row.roundtrips_per_msg, 3),
        ),
        (
            "redis_cmds_per_msg",
            Json::num(per_msg(redis_cmds as f64), 3),
        ),
        (
            "ack_frames_per_msg",
            Json::num(per_msg(stats.ack_calls.load(Ordering::Relaxed) as f64), 4),
        ),
        (
            "consumer_cpu_us_per_msg",
            Json::opt(measured.cpu_us.map(per_msg), 2),
        ),
        (
            "redis_server_cpu_us_per_msg",
            Json::opt(server_cpu.redis_us.map(per_msg), 2),
        ),
        (
            "broker_cpu_us_per_msg",
            Json::opt(server_cpu.broker_us.map(per_msg), 2),
        ),
        ("processed", Json::Int(processed)),
        ("duplicates", Json::Int(duplicates)),
        ("published", Json::Int(published)),
        ("unique", Json::Int(unique)),
        ("executions", Json::Int(executions)),
        (
            "requeued",
            Json::Int(stats.requeued.load(Ordering::Relaxed)),
        ),
        ("elapsed_s", Json::num(secs, 3)),
        ("ok", Json::Bool(row.ok)),
        ("problems", Json::Str(problems.join("; "))),
    ]);
    (row, line)
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn summary(options: &Options, rows: &[Row]) -> String {
    let med = |variant: Variant, field: fn(&Row) -> Option<f64>| {
        median(
            rows.iter()
                .filter(|r| r.variant == variant)
                .filter_map(field)
                .collect(),
        )
    };
    let rate = |r: &Row| Some(r.msgs_per_s);
    let single = med(Variant::RawSingle, rate);
    let multi = med(Variant::RawMulti, rate);
    let (raw, ceiling) = match (single, multi) {
        (Some(s), Some(m)) if m > s => (Some(m), "raw_multi"),
        (Some(s), _) => (Some(s), "raw_single"),
        (None, Some(m)) => (Some(m), "raw_multi"),
        (None, None) => (None, ""),
    };
    let ours = med(Variant::Ours, rate);
    let ratio = match (ours, raw) {
        (Some(o), Some(r)) if r > 0.0 => Some(o / r),
        _ => None,
    };
    json_object(&[
        ("raw_msgs_per_s", Json::opt(raw, 1)),
        ("ours_msgs_per_s", Json::opt(ours, 1)),
        ("naive_msgs_per_s", Json::opt(med(Variant::Naive, rate), 1)),
        ("ratio", Json::opt(ratio, 3)),
        (
            "redis_roundtrips_per_msg",
            Json::opt(med(Variant::Ours, |r| Some(r.roundtrips_per_msg)), 3),
        ),
        ("p99_ms", Json::opt(med(Variant::Ours, |r| r.p99_ms), 3)),
        ("raw_ceiling", Json::Str(ceiling.into())),
        ("raw_single_msgs_per_s", Json::opt(single, 1)),
        ("raw_multi_msgs_per_s", Json::opt(multi, 1)),
        (
            "naive_p99_ms",
            Json::opt(med(Variant::Naive, |r| r.p99_ms), 3),
        ),
        (
            "raw_p99_ms",
            Json::opt(
                med(
                    if ceiling == "raw_multi" {
                        Variant::RawMulti
                    } else {
                        Variant::RawSingle
                    },
                    |r| r.p99_ms,
                ),
                3,
            ),
        ),
        ("messages", Json::Int(options.messages)),
        ("prefetch", Json::Int(u64::from(options.prefetch))),
        ("payload", Json::Int(options.payload as u64)),
        ("rounds", Json::Int(u64::from(options.rounds))),
        ("open_loop_rate", Json::opt(options.open_loop_rate, 1)),
        (
            "runtime",
            Json::Str(
                if options.multi_thread {
                    "multi"
                } else {
                    "current"
                }
                .into(),
            ),
        ),
        ("ok", Json::Bool(rows.iter().all(|r| r.ok))),
    ])
}

/// A tiny JSON writer that keeps the keys in the order given.
enum Json {
    Num(f64, i32),
    Int(u64),
    Str(String),
    Bool(bool),
    Null,
}

impl Json {
    fn num(value: f64, decimals: i32) -> Self {
        Self::Num(value, decimals)
    }

    fn opt(value: Option<f64>, decimals: i32) -> Self {
        value.map_or(Self::Null, |v| Self::Num(v, decimals))
    }
}

fn json_object(fields: &[(&str, Json)]) -> String {
    let mut out = String::from("{");
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, key);
        out.push(':');
        match value {
            Json::Num(v, decimals) if v.is_finite() => {
                let scale = 10_f64.powi(*decimals);
                out.push_str(&((v * scale).round() / scale).to_string());
            }
            Json::Num(..) | Json::Null => out.push_str("null"),
            Json::Int(v) => out.push_str(&v.to_string()),
            Json::Str(s) => push_json_str(&mut out, s),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
    out.push('}');
    out
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------- main

async fn connect_amqp(url: &str) -> Result<Connection, String> {
    let hint = || {
        format!(
            "cannot reach RabbitMQ at {}: start it with `rabbitmq-server -detached` or set AMQP_URL",
            redact_url(url)
        )
    };
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(format!("{} ({err})", hint())),
        Err(_) => Err(format!("{} (no answer within {CONNECT_TIMEOUT:?})", hint())),
    }
}

const REDIS_HINT: &str = "start it with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no` or set REDIS_URL";

async fn connect_redis(
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

async fn run(options: Options) -> Result<bool, String> {
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

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("bench: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = if options.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bench: error: cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("bench: error: {message}");
            ExitCode::FAILURE
        }
    }
}
