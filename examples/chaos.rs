//! Fault-injection suite for `amqp-idempotency` (issue 4): proves with
//! numbers that no message is lost and that every duplicate effect falls in
//! one of the windows DESIGN.md admits, while consumers are killed, paused,
//! and cut off from Redis and RabbitMQ.
//!
//! # What it does
//!
//! 1. Starts its own `redis-server` on a free port (AOF with
//!    `appendfsync always` in a temporary directory, so a restart keeps the
//!    keys; the shared Redis on 6379 is never touched), declares a fresh
//!    queue on the real RabbitMQ at `AMQP_URL` with a dead-letter exchange
//!    and queue behind it, and opens two TCP proxies on `127.0.0.1:0`, one
//!    to Redis and one to RabbitMQ.
//! 2. Starts `--consumers` consumer processes: this same binary re-executed
//!    with a hidden `--role consumer`. They reach Redis and RabbitMQ only
//!    through the proxies and run `serve_reconnecting` with the idempotency
//!    layer (lease 2s, handler timeout 1500ms, prefetch 32, 4 attempts,
//!    retry backoff 50ms..400ms, dead letters republished with their
//!    `x-idempotency-*` headers). The handler works 0-1ms, performs its
//!    effect (a ledger line), then works 0-1ms more.
//! 3. Publishes `--messages` unique messages (each with a `message_id`), a
//!    `--duplicates` fraction of them a second time (same `message_id`, same
//!    body; half of the copies right after their original, half anywhere),
//!    `--poison` messages (the handler always fails them, retryable, so they
//!    are dead-lettered after the last attempt) and `--no-fingerprint`
//!    messages (no `message_id`, empty body: dead-lettered by the default
//!    policy), shuffled. Half of them go out evenly over about one round of
//!    faults (or `N / --rate` seconds if longer), the other half in bursts
//!    released just before each fault, so that faults hit consumers with
//!    full prefetch windows.
//! 4. Meanwhile injects faults, one every `--fault-interval-ms` (jittered),
//!    in rounds that each hold every enabled kind once, ordered by a PRNG
//!    seeded with `--seed`:
//!    - `kill`: `kill -9` of a random consumer; a new one takes its slot;
//!    - `pause`: `SIGSTOP` of a random consumer for the lease plus 1s, then `SIGCONT`;
//!    - `redis-restart`: `kill -9` of the redis-server, restarted on the same
//!      port and directory after a short outage;
//!    - `redis-cut`: every connection through the Redis proxy is dropped;
//!    - `amqp-cut`: every connection through the RabbitMQ proxy is dropped.
//! 5. Stops injecting once everything is published, every enabled fault
//!    happened at least once and every message is accounted for; waits for
//!    the queue to drain (no ready message, no handler in flight, nothing
//!    written to the ledger for a few seconds); stops the consumers with
//!    SIGTERM; reads the dead-letter queue; deletes the queues.
//!
//! # Running it
//!
//! ```text
//! cargo run --release --example chaos -- --messages 20000 --duplicates 0.2 --consumers 4 --seed 1
//! cargo run --release --example chaos -- --faults kill,pause --fault-interval-ms 800
//! ```
//!
//! Options (defaults in brackets): `--messages N` [2000], `--duplicates R`
//! [0.2], `--consumers C` [3], `--seed S` [1], `--poison F` [0.01],
//! `--no-fingerprint F` [0.005], `--faults LIST` [kill,pause,redis-restart,
//! redis-cut,amqp-cut; `none` for no faults], `--fault-interval-ms MS`
//! [1500], `--rate R` [800 messages/s at most on average; 0 publishes
//! everything at once], `--timeout-secs S` [600, the whole run], `--keep`
//! (keep the run directory even when the run passes).
//! `chaos --analyse <run dir>/ledger.log` classifies a kept ledger again.
//! Environment: `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; start the broker with
//! `rabbitmq-server -detached`), `CHAOS_CONSUMER_LOG` (the consumers'
//! `RUST_LOG`, default `warn`). Needs `redis-server` 7+ and `kill` on the
//! PATH: Linux and other Unixes only.
//!
//! # Reading the output
//!
//! Progress goes to stderr. The last line on stdout is one JSON object:
//!
//! ```text
//! {"messages":N,"unique":U,"executions":E,"lost":L,"duplicate_effects":D,
//!  "explained_duplicates":X,"unexplained_duplicates":Y,"dead_lettered":Q,
//!  "faults":{"kills":..,"pauses":..,"redis_restarts":..,"redis_cuts":..,"amqp_cuts":..}}
//! ```
//!
//! - `messages`: `--messages`; `unique`: distinct messages published (plain,
//!   poison and fingerprint-less; duplicates are extra copies of plain ones).
//! - `executions`: handler runs (effects plus failed poison runs).
//! - `lost`: plain and fingerprint-less messages that neither took effect
//!   nor reached the dead-letter queue. Must be 0.
//! - `duplicate_effects`: effects beyond the first for the same message.
//!   Each is `explained` when the ledger shows one of the windows DESIGN.md
//!   admits (a crash after the effect but before the done mark, a pause
//!   longer than the lease): every earlier execution of that message was cut
//!   off between its effect and its done mark (its process was killed
//!   before it wrote an outcome; its outcome was `lease_lost`, `unrecorded`
//!   or `dropped`; or its process was stopped past the lease while it ran,
//!   so that its claim expired and its handler timed out after the effect),
//!   or the later execution itself was stopped past the lease between its
//!   start and its effect (its claim expired under it). Anything else is
//!   `unexplained` and must be 0. Progress lists the explanations found.
//! - `dead_lettered`: messages found in the dead-letter queue at the end
//!   (poison and fingerprint-less ones, plus any re-dead-lettered copy).
//! - `faults`: how many of each were injected.
//!
//! Exit status: 0 when `lost` and `unexplained_duplicates` are 0, 1 when
//! not, 2 when the suite could not run (e.g. RabbitMQ unreachable). The run
//! directory (ledger, one log per consumer process, redis log) is printed
//! and kept when the run fails or with `--keep`. Lines starting with
//! `WARNING` point at trouble that does not fail the run by itself, such as
//! a consumer that did not stop within 15s of SIGTERM.
//!
//! # The ledger
//!
//! `<run dir>/ledger.log`, appended with `O_APPEND`, one line per event in a
//! single `write` (so it survives `kill -9` and Redis restarts); times are
//! microseconds since the Unix epoch:
//!
//! ```text
//! begin   <id> <pid> <nonce> <t>          the delivery entered the idempotent service
//! effect  <id> <pid> <nonce> <t>          the handler performed its effect
//! fail    <id> <pid> <nonce> <t>          the handler failed a poison message
//! outcome <id> <pid> <nonce> <t> <kind>   the layer returned (processed, duplicate, lease_lost, ...)
//! start <pid> <t> | kill <pid> <t> | pause <pid> <t0> <t1> | exit <pid> <t>
//! redis-restart <t0> <t1> | redis-cut <t> <n> | amqp-cut <t> <n>
//! ```
//!
//! The nonce is shared by the wrapper that writes `begin`/`outcome` and the
//! handler through a tokio task-local.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqp_idempotency::store::RedisStore;
use amqp_idempotency::{
    BoxError, Config, HandlerError, IdempotencyLayer, Outcome, ServeOptions, Session,
    parse_duration, serve_reconnecting,
};
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::{Layer, Service, service_fn};

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Header naming each message for the ledger; not part of the fingerprint.
const ID_HEADER: &str = "x-chaos-id";
/// Queues left behind by an aborted run disappear after an hour unused.
const QUEUE_EXPIRY_MS: i32 = 3_600_000;
/// The consumers' settings (every `IDEMPOTENCY_*` of the caller is replaced).
const CONSUMER_ENV: &[(&str, &str)] = &[
    ("IDEMPOTENCY_KEY_PREFIX", "chaos"),
    ("IDEMPOTENCY_LEASE_TTL", "2s"),
    ("IDEMPOTENCY_HANDLER_TIMEOUT", "1500ms"),
    ("IDEMPOTENCY_PREFETCH", "32"),
    ("IDEMPOTENCY_IN_PROGRESS_WAIT", "3s"),
    ("IDEMPOTENCY_MAX_ATTEMPTS", "4"),
    ("IDEMPOTENCY_RETRY_BACKOFF", "50ms"),
    ("IDEMPOTENCY_RETRY_BACKOFF_MAX", "400ms"),
    ("IDEMPOTENCY_DONE_TTL", "1h"),
    ("IDEMPOTENCY_ON_STORE_ERROR", "fail-closed"),
    ("IDEMPOTENCY_ON_MISSING_FINGERPRINT", "dead-letter"),
    ("IDEMPOTENCY_VERIFY_PAYLOAD", "true"),
];
/// Removed from the consumers' environment: the scope is the queue name.
const CLEARED_ENV: &[&str] = &["IDEMPOTENCY_SCOPE"];
/// Outcome kinds whose disposition is the dead-letter exchange.
const DEAD_LETTER_KINDS: &[&str] = &[
    "failed",
    "attempts_exhausted",
    "no_fingerprint",
    "payload_mismatch",
    "unrecognized_record",
];
/// Why a duplicate is explained when the earlier execution says `processed`
/// although its process was stopped past the lease while it ran.
const MISREPORTED: &str = "stopped past the lease, yet reported processed";
/// A pause lasts this much longer than the lease.
const PAUSE_BEYOND_LEASE: Duration = Duration::from_secs(1);
/// A `begin` without an outcome older than this is not waited for.
const STALE_BEGIN: Duration = Duration::from_secs(30);

const USAGE: &str = "usage: chaos [--messages N] [--duplicates R] [--consumers C] [--seed S]
             [--poison F] [--no-fingerprint F] [--faults kill,pause,redis-restart,redis-cut,amqp-cut|none]
             [--fault-interval-ms MS] [--rate R] [--timeout-secs S] [--keep]
       chaos --analyse <run dir>/ledger.log
fault-injection suite: see the doc comment of examples/chaos.rs";

// ---------------------------------------------------------------------------
// Entry point

#[tokio::main]
async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--role") {
        return consumer_main(&argv).await;
    }
    if argv.first().map(String::as_str) == Some("--analyse") {
        return analyse_main(argv.get(1));
    }
    let options = match parse_options(&argv) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match orchestrate(options).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("chaos: error: {message}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    RedisRestart,
    RedisCut,
    AmqpCut,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::Kill,
        Fault::Pause,
        Fault::RedisRestart,
        Fault::RedisCut,
        Fault::AmqpCut,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::RedisRestart => "redis-restart",
            Fault::RedisCut => "redis-cut",
            Fault::AmqpCut => "amqp-cut",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Debug)]
struct Options {
    messages: usize,
    duplicates: f64,
    consumers: usize,
    seed: u64,
    poison: f64,
    no_fingerprint: f64,
    faults: Vec<Fault>,
    fault_interval: Duration,
    rate: usize,
    timeout: Duration,
    keep: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            messages: 2000,
            duplicates: 0.2,
            consumers: 3,
            seed: 1,
            poison: 0.01,
            no_fingerprint: 0.005,
            faults: Fault::ALL.to_vec(),
            fault_interval: Duration::from_millis(1500),
            rate: 800,
            timeout: Duration::from_secs(600),
            keep: false,
        }
    }
}

/// `Ok(None)` means `--help`.
fn parse_options(argv: &[String]) -> Result<Option<Options>, String> {
    let mut options = Options::default();
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "-h" | "--help" => return Ok(None),
            "--messages" => options.messages = parse_int(name, &value()?, 1)?,
            "--consumers" => options.consumers = parse_int(name, &value()?, 1)?,
            "--seed" => {
                let text = value()?;
                options.seed = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("--seed: `{text}` is not an unsigned integer"))?;
            }
            "--duplicates" => options.duplicates = parse_fraction(name, &value()?)?,
            "--poison" => options.poison = parse_fraction(name, &value()?)?,
            "--no-fingerprint" => options.no_fingerprint = parse_fraction(name, &value()?)?,
            "--faults" => options.faults = parse_faults(&value()?)?,
            "--fault-interval-ms" => {
                let ms = parse_int(name, &value()?, 10)?;
                options.fault_interval = Duration::from_millis(ms as u64);
            }
            "--rate" => options.rate = parse_int(name, &value()?, 0)?,
            "--timeout-secs" => {
                let secs = parse_int(name, &value()?, 10)?;
                options.timeout = Duration::from_secs(secs as u64);
            }
            "--keep" => options.keep = true,
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    Ok(Some(options))
}

fn parse_int(name: &str, text: &str, min: usize) -> Result<usize, String> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= min)
        .ok_or_else(|| format!("{name}: `{text}` is not an integer >= {min}"))
}

fn parse_fraction(name: &str, text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("{name}: `{text}` is not a fraction between 0 and 1"))
}

fn parse_faults(text: &str) -> Result<Vec<Fault>, String> {
    let text = text.trim();
    if text.is_empty() || text == "none" {
        return Ok(Vec::new());
    }
    let mut faults = Vec::new();
    for name in text.split(',').map(str::trim) {
        let fault = Fault::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                format!(
                    "--faults: unknown fault `{name}` (expected kill, pause, redis-restart, redis-cut, amqp-cut or none)"
                )
            })?;
        if !faults.contains(&fault) {
            faults.push(fault);
        }
    }
    Ok(faults)
}

// ---------------------------------------------------------------------------
// Small helpers shared by both roles

/// SplitMix64: a tiny seeded PRNG, enough for schedules and shuffles.
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Microseconds since the Unix epoch: comparable across the processes.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The append-only ledger: one line per event, each in a single `write`.
struct Ledger {
    file: File,
}

impl Ledger {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file })
    }

    fn try_append(&self, line: &str) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let written = (&self.file).write(&buf)?;
        if written == buf.len() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "short write to the ledger ({written} of {} bytes)",
                buf.len()
            )))
        }
    }

    fn append(&self, line: &str) {
        if let Err(err) = self.try_append(line) {
            eprintln!("ledger write failed ({line}): {err}");
        }
    }
}

/// The queue, its dead-letter exchange and dead-letter queue.
#[derive(Clone, Debug)]
struct Topology {
    queue: String,
    dlx: String,
    dead: String,
}

impl Topology {
    fn new(queue: &str) -> Self {
        Self {
            queue: queue.to_owned(),
            dlx: format!("{queue}.dlx"),
            dead: format!("{queue}.dead"),
        }
    }

    /// Declares everything; consumers run it again on every reconnect.
    async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let expiry = || {
            let mut args = FieldTable::default();
            args.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRY_MS));
            args
        };
        channel
            .exchange_declare(
                self.dlx.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                self.dead.as_str().into(),
                QueueDeclareOptions::default(),
                expiry(),
            )
            .await?;
        channel
            .queue_bind(
                self.dead.as_str().into(),
                self.dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut args = expiry();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.dlx.as_str())),
        );
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions::default(),
                args,
            )
            .await?;
        Ok(())
    }

    async fn delete(&self, channel: &Channel) {
        for queue in [&self.queue, &self.dead] {
            if let Err(err) = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await
            {
                eprintln!("cannot delete queue {queue}: {err}");
            }
        }
        // Auto-deleted with its last binding; this is for the odd case it is not.
        let _ = channel
            .exchange_delete(self.dlx.as_str().into(), Default::default())
            .await;
    }
}

/// The id the suite gave a message (header, else `message_id`, else `-`).
/// The header that tells the handler which execution it is.
const NONCE_HEADER: &str = "x-chaos-nonce";

/// The execution number `Recorded` gave this delivery (0 if none).
fn exec_nonce(delivery: &Delivery) -> u64 {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| {
            headers
                .inner()
                .iter()
                .find(|(name, _)| name.as_str() == NONCE_HEADER)
                .and_then(|(_, value)| match value {
                    AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
                    _ => None,
                })
        })
        .unwrap_or(0)
}

fn chaos_id(delivery: &Delivery) -> String {
    let header = delivery.properties.headers().as_ref().and_then(|headers| {
        headers
            .inner()
            .iter()
            .find(|(name, _)| name.as_str() == ID_HEADER)
            .and_then(|(_, value)| match value {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                _ => None,
            })
    });
    header
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
        })
        .filter(|id| !id.is_empty() && !id.contains(char::is_whitespace))
        .unwrap_or_else(|| "-".to_owned())
}

/// `kill -s SIGNAL PID` through the `kill` command; true if it was sent.
fn signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Consumer role

async fn consumer_main(argv: &[String]) -> ExitCode {
    init_consumer_logs();
    let mut queue = None;
    let mut ledger = None;
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--role" => {
                if args.next().map(String::as_str) != Some("consumer") {
                    eprintln!("unknown --role (expected `consumer`)");
                    return ExitCode::from(2);
                }
            }
            "--queue" => queue = args.next().cloned(),
            "--ledger" => ledger = args.next().map(PathBuf::from),
            other => {
                eprintln!("consumer: unknown argument `{other}`");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(queue), Some(ledger)) = (queue, ledger) else {
        eprintln!("consumer: --queue and --ledger are required");
        return ExitCode::from(2);
    };
    match run_consumer(&queue, &ledger).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("consumer {}: {message}", std::process::id());
            ExitCode::FAILURE
        }
    }
}

fn init_consumer_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

async fn run_consumer(queue: &str, ledger_path: &Path) -> Result<(), String> {
    let pid = std::process::id();
    exit_with_parent();
    let config = Config::from_env().map_err(|err| err.to_string())?;
    let ledger = Arc::new(
        Ledger::open(ledger_path)
            .map_err(|err| format!("cannot open the ledger {}: {err}", ledger_path.display()))?,
    );
    let store = connect_store(config.redis()).await?;
    let handler = {
        let ledger = Arc::clone(&ledger);
        service_fn(move |delivery: Delivery| {
            let ledger = Arc::clone(&ledger);
            async move { handle(&ledger, pid, delivery).await }
        })
    };
    let idempotent = IdempotencyLayer::new(store, queue, config.clone())
        .map_err(|err| err.to_string())?
        .layer(handler);
    let service = Recorded {
        inner: idempotent,
        ledger: Arc::clone(&ledger),
        pid,
        next: Arc::new(AtomicU64::new(0)),
    };
    let topology = Topology::new(queue);
    let dlx = topology.dlx.clone();
    let url = config.amqp().to_owned();
    let prefetch = config.prefetch_count();
    let connect = move || {
        let url = url.clone();
        let topology = topology.clone();
        async move { open_session(&url, &topology, prefetch).await }
    };
    ledger.append(&format!("start {pid} {}", now_us()));
    let options = ServeOptions::from_config(&config)
        .dead_letter_exchange(dlx)
        .shutdown_deadline(Duration::from_secs(10));
    let report = serve_reconnecting(connect, service, options)
        .await
        .map_err(|err| err.to_string())?;
    eprintln!("consumer {pid} stopped: {report:?}");
    Ok(())
}

/// Exits when the orchestrator is gone, so that an aborted run leaves no consumer behind.
fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if std::os::unix::process::parent_id() != parent {
                eprintln!("the orchestrator is gone: exiting");
                std::process::exit(3);
            }
        }
    });
}

/// Connects to Redis, retrying while it restarts.
async fn connect_store(url: &str) -> Result<RedisStore, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match RedisStore::connect(url).await {
            Ok(store) => return Ok(store),
            Err(err) if Instant::now() < deadline => {
                tracing::warn!(error = %err, "cannot connect to Redis yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => return Err(err.to_string()),
        }
    }
}

async fn open_session(
    url: &str,
    topology: &Topology,
    prefetch: u16,
) -> Result<Session, lapin::Error> {
    let connect = Connection::connect(url, ConnectionProperties::default());
    let connection = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(connection) => connection?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting to RabbitMQ timed out",
            )
            .into());
        }
    };
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            topology.queue.as_str().into(),
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

/// The business handler: 0-1ms of work, the effect (a ledger line), 0-1ms more.
/// Poison messages always fail, retryably.
async fn handle(ledger: &Ledger, pid: u32, delivery: Delivery) -> Result<(), HandlerError> {
    let nonce = exec_nonce(&delivery);
    let id = chaos_id(&delivery);
    let mut work = SplitMix::new((u64::from(pid) << 32) ^ nonce);
    tokio::time::sleep(Duration::from_micros(work.below(1001))).await;
    if id.starts_with('p') {
        ledger.append(&format!("fail {id} {pid} {nonce} {}", now_us()));
        return Err(HandlerError::retryable(
            "poison message: this handler always fails",
        ));
    }
    ledger
        .try_append(&format!("effect {id} {pid} {nonce} {}", now_us()))
        .map_err(|err| HandlerError::retryable(format!("cannot write the ledger: {err}")))?;
    // The rest of the work, after the write: widens the window between the
    // effect and the done mark that kills and pauses can hit.
    tokio::time::sleep(Duration::from_micros(work.below(1001))).await;
    Ok(())
}

/// Wraps the idempotent service: `begin` when a delivery enters, `outcome`
/// when the layer returns (`dropped` if the call is abandoned).
#[derive(Clone)]
struct Recorded<S> {
    inner: S,
    ledger: Arc<Ledger>,
    pid: u32,
    next: Arc<AtomicU64>,
}

/// Writes the outcome line, or `dropped` if the call never finished.
struct OutcomeLine {
    ledger: Arc<Ledger>,
    head: String,
    kind: Option<&'static str>,
}

impl Drop for OutcomeLine {
    fn drop(&mut self) {
        let kind = self.kind.unwrap_or("dropped");
        self.ledger
            .append(&format!("outcome {} {} {kind}", self.head, now_us()));
    }
}

impl<S> Service<Delivery> for Recorded<S>
where
    S: Service<Delivery, Response = Outcome, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Outcome, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let nonce = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let head = format!("{} {} {nonce}", chaos_id(&delivery), self.pid);
        self.ledger.append(&format!("begin {head} {}", now_us()));
        let mut line = OutcomeLine {
            ledger: Arc::clone(&self.ledger),
            head,
            kind: None,
        };
        // Carried in a header: the layer runs the handler in a task of its
        // own, where a task-local set here would not be visible.
        let mut delivery = delivery;
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(NONCE_HEADER.into(), AMQPValue::LongLongInt(nonce as i64));
        delivery.properties = delivery.properties.clone().with_headers(headers);
        let call = self.inner.call(delivery);
        Box::pin(async move {
            let result = call.await;
            line.kind = Some(match &result {
                Ok(outcome) => outcome.kind().as_str(),
                Err(_) => "error",
            });
            drop(line);
            result
        })
    }
}

// ---------------------------------------------------------------------------
// Orchestrator: infrastructure

/// The suite's own redis-server (AOF, `appendfsync always`).
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    async fn start(dir: &Path) -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .map_err(|err| format!("cannot find a free port: {err}"))?;
        let mut server = Self {
            port,
            dir: dir.to_owned(),
            child: None,
        };
        server.spawn()?;
        server.wait_ready().await?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| {
                format!(
                    "cannot start redis-server (install Redis 7+, e.g. `apt-get install redis-server`): {err}"
                )
            })?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the server answers PING (not `-LOADING`).
    async fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ping(self.port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {} did not answer within 20s (log: {})",
                    self.port,
                    self.dir.join("redis.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn ping(port: u16) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply).await.ok()?;
        Some(reply[..n].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), exchange).await,
        Ok(Some(true))
    )
}

/// A TCP proxy on 127.0.0.1:0 whose connections can all be cut at once.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<watch::Sender<u64>>,
    live: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|err| format!("cannot open a proxy port: {err}"))?;
        let addr = listener
            .local_addr()
            .map_err(|err| format!("cannot read the proxy address: {err}"))?;
        let cut = Arc::new(watch::channel(0u64).0);
        let live = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn({
            let cut = Arc::clone(&cut);
            let live = Arc::clone(&live);
            async move {
                loop {
                    let mut client = match listener.accept().await {
                        Ok((client, _)) => client,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    // Subscribed now: only cuts after this moment apply.
                    let mut cuts = cut.subscribe();
                    let upstream = upstream.clone();
                    let live = Arc::clone(&live);
                    tokio::spawn(async move {
                        let connect = TcpStream::connect(upstream.as_str());
                        let Ok(Ok(mut server)) =
                            tokio::time::timeout(Duration::from_secs(2), connect).await
                        else {
                            return; // Upstream down (Redis restarting): drop the client.
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        live.fetch_add(1, Ordering::SeqCst);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cuts.changed() => {}
                        }
                        live.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Ok(Self {
            addr,
            cut,
            live,
            accept,
        })
    }

    /// Drops every current connection; returns how many there were.
    fn cut(&self) -> usize {
        let live = self.live.load(Ordering::SeqCst);
        self.cut.send_modify(|generation| *generation += 1);
        live
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut.send_modify(|generation| *generation += 1);
    }
}

/// Splits an AMQP URL into the broker's `host:port`, what comes before it
/// (`amqp://user:pass@`) and what follows (`/vhost?query`), so that the URL
/// can be pointed at the proxy.
fn split_amqp_url(url: &str) -> Result<(String, String, String), String> {
    let bad = || format!("AMQP_URL `{url}` is not an amqp://user:pass@host:port/vhost URL");
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    if scheme != "amqp" {
        return Err(format!(
            "AMQP_URL `{url}`: only amqp:// is supported by the suite's TCP proxy"
        ));
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let has_port = match hostport.rfind(':') {
        Some(colon) => !hostport[colon..].contains(']'),
        None => false,
    };
    let upstream = match (hostport.is_empty(), has_port) {
        (true, _) => "127.0.0.1:5672".to_owned(),
        (false, true) => hostport.to_owned(),
        (false, false) => format!("{hostport}:5672"),
    };
    Ok((upstream, format!("amqp://{userinfo}"), tail.to_owned()))
}

/// The consumer processes, one per slot.
struct Consumers {
    exe: PathBuf,
    queue: String,
    ledger: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    /// Per slot: the process, its pid and its log file.
    slots: Vec<Option<(Child, u32, PathBuf)>>,
    spawned: u64,
}

impl Consumers {
    fn spawn(&mut self, slot: usize) -> Result<u32, String> {
        self.spawned += 1;
        let log_path = self
            .dir
            .join(format!("consumer-{slot}-{}.log", self.spawned));
        let log = File::create(&log_path)
            .map_err(|err| format!("cannot create {}: {err}", log_path.display()))?;
        let mut command = Command::new(&self.exe);
        command
            .args(["--role", "consumer", "--queue", &self.queue, "--ledger"])
            .arg(&self.ledger)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for name in CLEARED_ENV {
            command.env_remove(name);
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = command
            .spawn()
            .map_err(|err| format!("cannot start a consumer process: {err}"))?;
        let pid = child.id();
        if let Some(entry) = self.slots.get_mut(slot) {
            *entry = Some((child, pid, log_path));
        }
        Ok(pid)
    }

    fn live(&self) -> Vec<(usize, u32)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, entry)| entry.as_ref().map(|(_, pid, _)| (slot, *pid)))
            .collect()
    }

    /// Consumers that exited on their own: (slot, pid, status).
    fn reap(&mut self) -> Vec<(usize, u32, String)> {
        let mut exited = Vec::new();
        for (slot, entry) in self.slots.iter_mut().enumerate() {
            let status = match entry {
                Some((child, _, _)) => match child.try_wait() {
                    Ok(Some(status)) => status.to_string(),
                    Ok(None) => continue,
                    Err(err) => err.to_string(),
                },
                None => continue,
            };
            if let Some((_, pid, _)) = entry.take() {
                exited.push((slot, pid, status));
            }
        }
        exited
    }

    /// `kill -9` of the consumer in `slot`; returns its pid.
    fn kill(&mut self, slot: usize) -> Option<u32> {
        let (mut child, pid, _) = self.slots.get_mut(slot)?.take()?;
        if !signal(pid, "KILL") {
            let _ = child.kill();
        }
        let _ = child.wait();
        Some(pid)
    }

    /// SIGTERM to all, wait for them to stop; SIGKILL after `limit`.
    /// Returns how many stopped gracefully, and the (pid, log) of those killed.
    async fn terminate(&mut self, limit: Duration) -> (usize, Vec<(u32, PathBuf)>) {
        for (_, pid) in self.live() {
            signal(pid, "TERM");
        }
        let deadline = Instant::now() + limit;
        let mut graceful = 0;
        loop {
            for (slot, status) in self.reap().into_iter().map(|(s, _, st)| (s, st)) {
                if status.contains("exit status: 0") {
                    graceful += 1;
                } else {
                    eprintln!("consumer in slot {slot} stopped with {status}");
                }
            }
            if self.live().is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut killed = Vec::new();
        for (slot, pid) in self.live() {
            let log = self
                .slots
                .get(slot)
                .and_then(|entry| entry.as_ref().map(|(_, _, log)| log.clone()))
                .unwrap_or_default();
            if self.kill(slot).is_some() {
                killed.push((pid, log));
            }
        }
        (graceful, killed)
    }
}

impl Drop for Consumers {
    fn drop(&mut self) {
        for entry in &mut self.slots {
            if let Some((mut child, pid, _)) = entry.take() {
                signal(pid, "CONT");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Orchestrator: messages

struct Publication {
    id: String,
    body: Vec<u8>,
    with_message_id: bool,
}

impl Publication {
    fn copy(&self) -> Self {
        Self {
            id: self.id.clone(),
            body: self.body.clone(),
            with_message_id: self.with_message_id,
        }
    }

    fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ID_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.id.as_str())),
        );
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_content_type("application/json".into());
        if self.with_message_id {
            properties.with_message_id(self.id.as_str().into())
        } else {
            properties
        }
    }
}

/// What is published: plain `m<i>`, poison `p<i>`, fingerprint-less `n<i>`.
struct Plan {
    publications: Vec<Publication>,
    plain: Vec<String>,
    poison: Vec<String>,
    no_fingerprint: Vec<String>,
    duplicates: usize,
}

impl Plan {
    fn new(options: &Options, rng: &mut SplitMix) -> Self {
        let n = options.messages;
        let count = |fraction: f64| (n as f64 * fraction).round() as usize;
        let plain: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let poison: Vec<String> = (0..count(options.poison))
            .map(|i| format!("p{i}"))
            .collect();
        let no_fingerprint: Vec<String> = (0..count(options.no_fingerprint))
            .map(|i| format!("n{i}"))
            .collect();
        let body = |id: &str, rng: &mut SplitMix| {
            format!("{{\"id\":\"{id}\",\"amount\":{}}}", rng.below(100_000)).into_bytes()
        };
        let mut publications = Vec::new();
        for id in plain.iter().chain(&poison) {
            publications.push(Publication {
                id: id.clone(),
                body: body(id, rng),
                with_message_id: true,
            });
        }
        for id in &no_fingerprint {
            publications.push(Publication {
                id: id.clone(),
                body: Vec::new(),
                with_message_id: false,
            });
        }
        // A `--duplicates` fraction of the plain messages, published again as
        // is: half of the copies right after the original (a double click,
        // so both are in flight together), half anywhere (a producer retry).
        let mut chosen: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut chosen);
        let duplicates = count(options.duplicates).min(n);
        let mut adjacent = HashSet::new();
        for (k, &i) in chosen[..duplicates].iter().enumerate() {
            if k % 2 == 0 {
                adjacent.insert(publications[i].id.clone());
            } else {
                let copy = publications[i].copy();
                publications.push(copy);
            }
        }
        rng.shuffle(&mut publications);
        let mut ordered = Vec::with_capacity(publications.len() + adjacent.len());
        for publication in publications {
            let twin = adjacent.remove(&publication.id).then(|| publication.copy());
            ordered.push(publication);
            ordered.extend(twin);
        }
        let publications = ordered;
        Self {
            publications,
            plain,
            poison,
            no_fingerprint,
            duplicates,
        }
    }

    fn unique(&self) -> usize {
        self.plain.len() + self.poison.len() + self.no_fingerprint.len()
    }
}

/// Publishes the plan in order, with confirms, as far as `allowance` allows.
async fn publish_all(
    channel: Channel,
    queue: String,
    publications: Vec<Publication>,
    mut allowance: watch::Receiver<usize>,
    published: Arc<AtomicUsize>,
) -> Result<(), String> {
    const BATCH: usize = 100;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|err| format!("cannot enable publisher confirms: {err}"))?;
    let mut next = 0;
    while next < publications.len() {
        let allowed = (*allowance.borrow_and_update()).min(publications.len());
        if allowed <= next {
            allowance
                .changed()
                .await
                .map_err(|_| "the orchestrator stopped publishing".to_owned())?;
            continue;
        }
        let end = allowed.min(next + BATCH);
        let mut confirms = Vec::with_capacity(end - next);
        for publication in &publications[next..end] {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &publication.body,
                    publication.properties(),
                )
                .await
                .map_err(|err| format!("publishing failed: {err}"))?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm
                .await
                .map_err(|err| format!("publisher confirm failed: {err}"))?;
            if !confirmation.is_ack() {
                return Err("the broker nacked a published message".into());
            }
        }
        published.fetch_add(end - next, Ordering::SeqCst);
        next = end;
    }
    Ok(())
}

/// How many messages may be published so far: half of them evenly over
/// `spread` (background traffic), the other half in bursts released just
/// before each fault, so that faults hit consumers with full prefetch
/// windows; whatever is left is released once `spread` has passed.
struct Pacer {
    total: usize,
    spread: Duration,
    start: Instant,
    burst: usize,
    bursts: usize,
    allowance: watch::Sender<usize>,
}

impl Pacer {
    fn allowed(&self) -> usize {
        if self.spread.is_zero() || self.start.elapsed() >= self.spread {
            return self.total;
        }
        let background = self.start.elapsed().as_secs_f64() / self.spread.as_secs_f64();
        let background = (self.total / 2) as f64 * background;
        (background as usize + self.bursts).min(self.total)
    }

    fn tick(&self) {
        let allowed = self.allowed();
        self.allowance.send_if_modified(|current| {
            let grow = allowed > *current;
            if grow {
                *current = allowed;
            }
            grow
        });
    }

    /// Releases a burst; false when everything is published already.
    fn burst(&mut self) -> bool {
        if self.allowed() >= self.total {
            return false;
        }
        self.bursts += self.burst;
        self.tick();
        true
    }
}

async fn ready_count(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let queue = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(queue.message_count())
}

/// What the dead-letter queue held at the end.
#[derive(Default)]
struct DeadLetters {
    total: usize,
    ids: HashMap<String, usize>,
    /// `x-idempotency-outcome` of each copy (`x-death only` when absent).
    outcomes: BTreeMap<String, usize>,
}

async fn read_dead_letters(channel: &Channel, queue: &str) -> Result<DeadLetters, lapin::Error> {
    let mut letters = DeadLetters::default();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let delivery = &message.delivery;
        letters.total += 1;
        *letters.ids.entry(chaos_id(delivery)).or_default() += 1;
        let outcome = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| {
                headers
                    .inner()
                    .iter()
                    .find(|(name, _)| name.as_str() == "x-idempotency-outcome")
                    .map(|(_, value)| match value {
                        AMQPValue::LongString(s) => {
                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                        }
                        other => format!("{other:?}"),
                    })
            })
            .unwrap_or_else(|| "x-death only".to_owned());
        *letters.outcomes.entry(outcome).or_default() += 1;
    }
    Ok(letters)
}

// ---------------------------------------------------------------------------
// Orchestrator: the ledger, read back

#[derive(Default)]
struct Execution {
    id: String,
    begin: Option<u64>,
    effect: Option<u64>,
    outcome: Option<(u64, String)>,
}

/// Everything the ledger said so far; fed incrementally by [`Tally::tail`].
struct Tally {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    last_growth: Instant,
    garbled: u64,
    executions: HashMap<(u32, u64), Execution>,
    /// Effects per message, in ledger order.
    effects: HashMap<String, Vec<(u32, u64)>>,
    effect_lines: u64,
    fail_lines: u64,
    outcome_kinds: BTreeMap<String, u64>,
    /// Messages whose fate is known: an effect, or a dead-letter outcome.
    accounted: HashSet<String>,
    /// `begin` lines without an outcome yet: (pid, nonce) -> time.
    open: HashMap<(u32, u64), u64>,
    killed: HashMap<u32, u64>,
    exited: HashSet<u32>,
    pauses: HashMap<u32, Vec<(u64, u64)>>,
    /// Redis restarts (down, up) and cuts (at, at).
    outages: Vec<(u64, u64)>,
    processes: u64,
}

impl Tally {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            offset: 0,
            partial: Vec::new(),
            last_growth: Instant::now(),
            garbled: 0,
            executions: HashMap::new(),
            effects: HashMap::new(),
            effect_lines: 0,
            fail_lines: 0,
            outcome_kinds: BTreeMap::new(),
            accounted: HashSet::new(),
            open: HashMap::new(),
            killed: HashMap::new(),
            exited: HashSet::new(),
            pauses: HashMap::new(),
            outages: Vec::new(),
            processes: 0,
        }
    }

    /// Reads the lines appended since the last call.
    fn tail(&mut self) -> Result<(), String> {
        let mut file = File::open(&self.path)
            .map_err(|err| format!("cannot read the ledger {}: {err}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))
            .map_err(|err| format!("cannot seek in the ledger: {err}"))?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh)
            .map_err(|err| format!("cannot read the ledger: {err}"))?;
        if fresh.is_empty() {
            return Ok(());
        }
        self.offset += fresh.len() as u64;
        self.last_growth = Instant::now();
        self.partial.extend_from_slice(&fresh);
        if let Some(last) = self.partial.iter().rposition(|b| *b == b'\n') {
            let complete: Vec<u8> = self.partial.drain(..=last).collect();
            for line in complete.split(|b| *b == b'\n') {
                if !line.is_empty() {
                    let line = String::from_utf8_lossy(line).into_owned();
                    if self.apply(&line).is_none() {
                        self.garbled += 1;
                        eprintln!("ledger: unreadable line `{line}`");
                    }
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, line: &str) -> Option<()> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let pid = |i: usize| fields.get(i).and_then(|f| f.parse::<u32>().ok());
        match *fields.first()? {
            "begin" | "effect" | "fail" | "outcome" => {
                let id = (*fields.get(1)?).to_owned();
                let key = (pid(2)?, num(3)?);
                let at = num(4)?;
                let execution = self.executions.entry(key).or_default();
                execution.id.clone_from(&id);
                match fields[0] {
                    "begin" => {
                        execution.begin = Some(at);
                        self.open.insert(key, at);
                    }
                    "effect" => {
                        execution.effect = Some(at);
                        self.effect_lines += 1;
                        self.effects.entry(id.clone()).or_default().push(key);
                        if id.starts_with('m') {
                            self.accounted.insert(id);
                        }
                    }
                    "fail" => self.fail_lines += 1,
                    _ => {
                        let kind = (*fields.get(5)?).to_owned();
                        self.open.remove(&key);
                        *self.outcome_kinds.entry(kind.clone()).or_default() += 1;
                        if DEAD_LETTER_KINDS.contains(&kind.as_str()) {
                            self.accounted.insert(id);
                        }
                        execution.outcome = Some((at, kind));
                    }
                }
            }
            "start" => {
                pid(1)?;
                self.processes += 1;
            }
            "kill" => {
                self.killed.insert(pid(1)?, num(2)?);
            }
            "exit" => {
                self.exited.insert(pid(1)?);
            }
            "pause" => {
                let window = (num(2)?, num(3)?);
                self.pauses.entry(pid(1)?).or_default().push(window);
            }
            "redis-restart" => {
                let window = (num(1)?, num(2)?);
                self.outages.push(window);
            }
            "redis-cut" => {
                let at = num(1)?;
                self.outages.push((at, at));
            }
            "amqp-cut" => {}
            _ => return None,
        }
        Some(())
    }

    /// Deliveries being handled by live consumers.
    fn in_flight(&self) -> usize {
        let stale = now_us().saturating_sub(STALE_BEGIN.as_micros() as u64);
        self.open
            .iter()
            .filter(|((pid, _), at)| {
                **at >= stale && !self.killed.contains_key(pid) && !self.exited.contains(pid)
            })
            .count()
    }

    /// Deliveries being handled by `pid`.
    fn in_flight_of(&self, pid: u32) -> usize {
        self.open.keys().filter(|(p, _)| *p == pid).count()
    }

    /// Whether `pid` was stopped (SIGSTOP) at some point between `from` and `to`.
    fn paused_between(&self, pid: u32, from: u64, to: u64) -> bool {
        self.pauses
            .get(&pid)
            .is_some_and(|windows| windows.iter().any(|(t0, t1)| *t0 <= to && *t1 >= from))
    }

    /// Why an execution that took effect did not leave a done mark, if the
    /// ledger shows it was cut off between its effect and its done mark.
    fn cut_off(&self, key: (u32, u64)) -> Option<&'static str> {
        let execution = self.executions.get(&key)?;
        let effect = execution.effect?;
        let begin = execution.begin.unwrap_or(effect);
        match &execution.outcome {
            Some((_, kind)) if kind == "lease_lost" => Some("lease_lost"),
            Some((_, kind)) if kind == "unrecorded" => Some("unrecorded"),
            Some((_, kind)) if kind == "dropped" => Some("dropped"),
            // Stopped past the lease while it ran: the claim expired, and
            // the handler timeout elapsed too, so whatever came after the
            // effect no longer counted.
            Some((at, kind)) if self.paused_between(key.0, begin, *at) => {
                Some(if kind == "processed" {
                    MISREPORTED
                } else {
                    "stopped past the lease, then timed out after its effect"
                })
            }
            Some(_) => None,
            None if self.killed.contains_key(&key.0) => Some("killed"),
            None => None,
        }
    }

    /// Whether the process of an execution was paused, or Redis was
    /// restarted or cut, while it ran (give or take half a second).
    fn faulted_during(&self, key: (u32, u64)) -> bool {
        let Some(execution) = self.executions.get(&key) else {
            return false;
        };
        let Some(begin) = execution.begin.or(execution.effect) else {
            return false;
        };
        let end = execution.outcome.as_ref().map_or(u64::MAX, |(at, _)| *at);
        let (from, to) = (begin.saturating_sub(500_000), end.saturating_add(500_000));
        self.paused_between(key.0, from, to)
            || self.outages.iter().any(|(t0, t1)| *t0 <= to && *t1 >= from)
    }

    /// Whether an execution was stopped past the lease after it began and
    /// before its effect: its claim expired under it.
    fn paused_before_effect(&self, key: (u32, u64)) -> bool {
        self.executions.get(&key).is_some_and(|execution| {
            match (execution.begin, execution.effect) {
                (Some(begin), Some(effect)) => self.paused_between(key.0, begin, effect),
                _ => false,
            }
        })
    }

    fn describe(&self, key: (u32, u64)) -> String {
        let Some(execution) = self.executions.get(&key) else {
            return format!("pid {} nonce {} (unknown)", key.0, key.1);
        };
        let outcome = execution
            .outcome
            .as_ref()
            .map_or("no outcome", |(_, kind)| kind.as_str());
        let fate = if self.killed.contains_key(&key.0) {
            ", process killed"
        } else {
            ""
        };
        let paused = if self.pauses.contains_key(&key.0) {
            ", process paused at some point"
        } else {
            ""
        };
        format!(
            "pid {} nonce {} begin {:?} effect {:?} outcome {outcome}{fate}{paused}",
            key.0, key.1, execution.begin, execution.effect
        )
    }
}

/// Duplicate effects, classified.
#[derive(Default)]
struct Duplicates {
    total: usize,
    explained: usize,
    unexplained: usize,
    reasons: BTreeMap<&'static str, usize>,
    /// Earlier executions reported `processed` although stopped past the lease.
    misreported: usize,
    /// Explained by `lease_lost` or `unrecorded` without a pause of that
    /// process or a Redis outage during the execution.
    unmatched: usize,
    unmatched_examples: Vec<String>,
    examples: Vec<String>,
}

fn classify_duplicates(tally: &Tally) -> Duplicates {
    let mut result = Duplicates::default();
    let mut ids: Vec<&String> = tally.effects.keys().collect();
    ids.sort();
    for id in ids {
        let effects = &tally.effects[id];
        for later in 1..effects.len() {
            result.total += 1;
            let earlier: Vec<Option<&'static str>> = effects[..later]
                .iter()
                .map(|key| tally.cut_off(*key))
                .collect();
            let reason = if earlier.iter().all(Option::is_some) {
                earlier.last().copied().flatten()
            } else if tally.paused_before_effect(effects[later]) {
                Some("later execution paused past the lease before its effect")
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    result.explained += 1;
                    *result.reasons.entry(reason).or_default() += 1;
                    if reason == MISREPORTED {
                        result.misreported += 1;
                    }
                    // A lost lease or an unwritten done mark needs a pause
                    // or a Redis outage while the execution ran.
                    let unmatched = effects[..later].iter().find(|key| {
                        matches!(tally.cut_off(**key), Some("lease_lost" | "unrecorded"))
                            && !tally.faulted_during(**key)
                    });
                    if let Some(key) = unmatched {
                        result.unmatched += 1;
                        if result.unmatched_examples.len() < 10 {
                            result
                                .unmatched_examples
                                .push(format!("{id}: {}", tally.describe(*key)));
                        }
                    }
                }
                None => {
                    result.unexplained += 1;
                    if result.examples.len() < 10 {
                        let history: Vec<String> = effects[..=later]
                            .iter()
                            .map(|k| tally.describe(*k))
                            .collect();
                        result
                            .examples
                            .push(format!("{id}: [{}]", history.join("] then [")));
                    }
                }
            }
        }
    }
    result
}

/// `--analyse LEDGER`: classifies the duplicate effects of a kept run's ledger again.
fn analyse_main(path: Option<&String>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("usage: chaos --analyse <run dir>/ledger.log");
        return ExitCode::from(2);
    };
    let mut tally = Tally::new(Path::new(path));
    if let Err(message) = tally.tail() {
        eprintln!("{message}");
        return ExitCode::from(2);
    }
    let duplicates = classify_duplicates(&tally);
    println!(
        "{} effects, outcomes {:?}; duplicate effects {} ({} explained: {:?}; {} unexplained)",
        tally.effect_lines,
        tally.outcome_kinds,
        duplicates.total,
        duplicates.explained,
        duplicates.reasons,
        duplicates.unexplained
    );
    for example in &duplicates.examples {
        println!("UNEXPLAINED duplicate {example}");
    }
    for example in &duplicates.unmatched_examples {
        println!("WARNING: no pause or Redis outage during {example}");
    }
    if duplicates.unexplained == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------
// Orchestrator: the run

/// Progress on stderr, stamped with the time since the start.
struct Clock(Instant);

impl Clock {
    fn say(&self, message: impl std::fmt::Display) {
        eprintln!("[{:7.1}s] {message}", self.0.elapsed().as_secs_f64());
    }
}

async fn orchestrate(options: Options) -> Result<bool, String> {
    let clock = Clock(Instant::now());
    // When whoever started the suite is gone (e.g. a test that timed out
    // killed `cargo run`), stop: dropping the consumers and the
    // redis-server kills them.
    let parent = std::os::unix::process::parent_id();
    let orphaned = || {
        (std::os::unix::process::parent_id() != parent)
            .then(|| "the process that started the suite is gone: stopping".to_owned())
    };
    let amqp_url = std::env::var("AMQP_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
    let (upstream, url_head, url_tail) = split_amqp_url(&amqp_url)?;
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .map_err(|err| {
            format!(
                "cannot reach RabbitMQ at {amqp_url}: {err}\n\
                 start it with `rabbitmq-server -detached` (or set AMQP_URL to a running broker)"
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

    let mut redis = RedisServer::start(&dir).await?;
    let redis_proxy = Proxy::start(format!("127.0.0.1:{}", redis.port)).await?;
    let amqp_proxy = Proxy::start(upstream.clone()).await?;
    clock.say(format!(
        "redis-server on port {} (proxy {}), RabbitMQ {upstream} (proxy {})",
        redis.port, redis_proxy.addr, amqp_proxy.addr
    ));

    let topology = Topology::new(&run_name);
    topology
        .declare(&admin)
        .await
        .map_err(|err| format!("cannot declare the queues: {err}"))?;

    let mut env: Vec<(String, String)> = CONSUMER_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    env.push(("REDIS_URL".into(), format!("redis://{}", redis_proxy.addr)));
    env.push((
        "AMQP_URL".into(),
        format!("{url_head}{}{url_tail}", amqp_proxy.addr),
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
    let pause = config.lease() + PAUSE_BEYOND_LEASE;
    // Longer than anything a consumer may hold a delivery without a ledger line.
    let quiet = setting("IDEMPOTENCY_IN_PROGRESS_WAIT")
        + setting("IDEMPOTENCY_RETRY_BACKOFF_MAX")
        + Duration::from_millis(1600);

    let mut rng = SplitMix::new(options.seed);
    let mut plan = Plan::new(&options, &mut rng);
    let unique = plan.unique();
    let total = plan.publications.len();
    clock.say(format!(
        "publishing {total} messages to {}: {} plain, {} duplicates, {} poison, {} without fingerprint; {} consumers; faults: {}",
        topology.queue,
        plan.plain.len(),
        plan.duplicates,
        plan.poison.len(),
        plan.no_fingerprint.len(),
        options.consumers,
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
        slots: (0..options.consumers).map(|_| None).collect(),
        spawned: 0,
    };
    for slot in 0..options.consumers {
        consumers.spawn(slot)?;
    }

    // Publishing lasts about one round of faults (and no less than
    // `--rate` allows), so that each fault hits traffic.
    let mut spread = options
        .fault_interval
        .mul_f64(options.faults.len() as f64 + 1.0);
    if options.faults.contains(&Fault::Pause) {
        spread += pause;
    }
    if options.faults.contains(&Fault::RedisRestart) {
        spread += Duration::from_secs(1);
    }
    if options.rate > 0 {
        spread = spread.max(Duration::from_secs_f64(total as f64 / options.rate as f64));
    } else {
        spread = Duration::ZERO;
    }
    let expected_faults = (spread.as_secs_f64() / options.fault_interval.as_secs_f64()).max(1.0);
    let prefetch = usize::from(config.prefetch_count());
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
    let mut tally = Tally::new(&ledger_path);
    let mut fault_rng = SplitMix::new(options.seed ^ 0xFA17_5EED_0000_0001);
    let mut counts = [0u64; 5];
    let mut schedule: Vec<Fault> = Vec::new();
    let jitter = |rng: &mut SplitMix| options.fault_interval.mul_f64(0.5 + rng.unit());
    let mut next_fault = Instant::now() + jitter(&mut fault_rng);
    let deadline = Instant::now() + options.timeout;
    let mut last_progress = Instant::now();
    let mut crashes = 0u64;
    let mut timed_out = false;
    let fault_summary = |counts: &[u64; 5]| {
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
        tally.tail()?;
        for (slot, pid, status) in consumers.reap() {
            crashes += 1;
            ledger.append(&format!("exit {pid} {}", now_us()));
            clock.say(format!(
                "consumer {pid} (slot {slot}) exited on its own ({status}); starting another"
            ));
            if crashes > 20 {
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
        let every_fault = options.faults.iter().all(|f| counts[f.index()] > 0);
        if publisher.is_none() && every_fault && tally.accounted.len() >= unique {
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
            clock.say(format!(
                "published {}/{total}, effects {}, accounted {}/{unique}, ready {ready}, in flight {}; faults: {}",
                published.load(Ordering::SeqCst),
                tally.effect_lines,
                tally.accounted.len(),
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
        let Some(fault) = schedule.pop() else {
            continue;
        };
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
        match fault {
            Fault::Kill => {
                if consumers.kill(slot).is_some() {
                    ledger.append(&format!("kill {pid} {}", now_us()));
                    let new = consumers.spawn(slot)?;
                    counts[fault.index()] += 1;
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
                    counts[fault.index()] += 1;
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
                counts[fault.index()] += 1;
                clock.say(format!(
                    "fault: redis-server killed and restarted (down {:.1}s; {})",
                    (now_us() - from) as f64 / 1e6,
                    busy.split(',').next().unwrap_or_default()
                ));
            }
            Fault::RedisCut => {
                let cut = redis_proxy.cut();
                ledger.append(&format!("redis-cut {} {cut}", now_us()));
                counts[fault.index()] += 1;
                clock.say(format!(
                    "fault: cut {cut} Redis connections ({})",
                    busy.split(',').next().unwrap_or_default()
                ));
            }
            Fault::AmqpCut => {
                let cut = amqp_proxy.cut();
                ledger.append(&format!("amqp-cut {} {cut}", now_us()));
                counts[fault.index()] += 1;
                clock.say(format!(
                    "fault: cut {cut} RabbitMQ connections ({})",
                    busy.split(',').next().unwrap_or_default()
                ));
            }
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
        tally.tail()?;
        for (slot, pid, status) in consumers.reap() {
            ledger.append(&format!("exit {pid} {}", now_us()));
            clock.say(format!(
                "consumer {pid} (slot {slot}) exited on its own ({status}); starting another"
            ));
            consumers.spawn(slot)?;
        }
        let ready = ready_count(&admin, &topology.queue).await.ok();
        let settled = ready == Some(0)
            && tally.in_flight() == 0
            && tally.accounted.len() >= unique
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
                "draining: ready {}, in flight {}, accounted {}/{unique}",
                ready.map_or_else(|| "?".to_owned(), |n| n.to_string()),
                tally.in_flight(),
                tally.accounted.len()
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
    tally.tail()?;
    let left = ready_count(&admin, &topology.queue).await.unwrap_or(0);
    let dead = read_dead_letters(&admin, &topology.dead)
        .await
        .map_err(|err| format!("cannot read the dead-letter queue: {err}"))?;
    topology.delete(&admin).await;
    let _ = connection.close(200, "OK".into()).await;
    drop(redis_proxy);
    drop(amqp_proxy);
    redis.kill();

    // ---- the numbers
    let mut lost_ids = Vec::new();
    for id in plan.plain.iter().chain(&plan.no_fingerprint) {
        if !tally.effects.contains_key(id) && !dead.ids.contains_key(id) {
            lost_ids.push(id.clone());
        }
    }
    let poison_missing: Vec<&String> = plan
        .poison
        .iter()
        .filter(|id| !dead.ids.contains_key(*id))
        .collect();
    let plain_dead: Vec<&String> = plan
        .plain
        .iter()
        .filter(|id| dead.ids.contains_key(*id))
        .collect();
    let duplicates = classify_duplicates(&tally);
    let executions = tally.effect_lines + tally.fail_lines;

    clock.say(format!(
        "ledger: {} consumer processes, {} effects, {} poison failures, outcomes {:?}, {} unreadable lines",
        tally.processes, tally.effect_lines, tally.fail_lines, tally.outcome_kinds, tally.garbled
    ));
    clock.say(format!(
        "dead-letter queue: {} messages ({} poison of {}, {} without fingerprint of {}, {} plain), by outcome {:?}",
        dead.total,
        plan.poison.iter().filter(|id| dead.ids.contains_key(*id)).count(),
        plan.poison.len(),
        plan.no_fingerprint
            .iter()
            .filter(|id| dead.ids.contains_key(*id))
            .count(),
        plan.no_fingerprint.len(),
        plain_dead.len(),
        dead.outcomes
    ));
    if left > 0 {
        clock.say(format!(
            "WARNING: {left} messages were left in the queue after the consumers stopped"
        ));
    }
    if !poison_missing.is_empty() {
        clock.say(format!(
            "WARNING: {} poison messages never reached the dead-letter queue: {:?}",
            poison_missing.len(),
            &poison_missing[..poison_missing.len().min(10)]
        ));
    }
    if !plain_dead.is_empty() {
        clock.say(format!(
            "note: plain messages dead-lettered: {:?}",
            &plain_dead[..plain_dead.len().min(10)]
        ));
    }
    if !lost_ids.is_empty() {
        clock.say(format!(
            "LOST {} messages, e.g. {:?}",
            lost_ids.len(),
            &lost_ids[..lost_ids.len().min(10)]
        ));
    }
    clock.say(format!(
        "duplicate effects: {} ({} explained: {:?}; {} unexplained)",
        duplicates.total, duplicates.explained, duplicates.reasons, duplicates.unexplained
    ));
    if duplicates.misreported > 0 {
        clock.say(format!(
            "note: {} executions were reported `processed` although their process was stopped past the lease between effect and done mark",
            duplicates.misreported
        ));
    }
    for example in &duplicates.examples {
        clock.say(format!("UNEXPLAINED duplicate {example}"));
    }
    if duplicates.unmatched > 0 {
        clock.say(format!(
            "WARNING: {} duplicates are explained by a lost lease or an unwritten done mark although no pause or Redis outage overlapped that execution, e.g. {:?}",
            duplicates.unmatched, duplicates.unmatched_examples
        ));
    }
    if crashes > 0 {
        clock.say(format!(
            "WARNING: {crashes} consumer processes exited on their own"
        ));
    }

    let passed = lost_ids.is_empty() && duplicates.unexplained == 0;
    if passed && !options.keep && forced.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        clock.say(format!("run directory kept: {}", dir.display()));
    }
    clock.say(format!(
        "{} in {:.1}s",
        if passed { "PASSED" } else { "FAILED" },
        clock.0.elapsed().as_secs_f64()
    ));
    println!(
        "{{\"messages\":{},\"unique\":{unique},\"executions\":{executions},\"lost\":{},\"duplicate_effects\":{},\"explained_duplicates\":{},\"unexplained_duplicates\":{},\"dead_lettered\":{},\"faults\":{{\"kills\":{},\"pauses\":{},\"redis_restarts\":{},\"redis_cuts\":{},\"amqp_cuts\":{}}}}}",
        options.messages,
        lost_ids.len(),
        duplicates.total,
        duplicates.explained,
        duplicates.unexplained,
        dead.total,
        counts[Fault::Kill.index()],
        counts[Fault::Pause.index()],
        counts[Fault::RedisRestart.index()],
        counts[Fault::RedisCut.index()],
        counts[Fault::AmqpCut.index()],
    );
    Ok(passed)
}
