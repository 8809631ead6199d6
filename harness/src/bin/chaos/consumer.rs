//! The consumer role (`chaos --role consumer --queue Q --ledger PATH
//! [--outbox]`): the orchestrator starts this same binary once per consumer
//! slot. It runs `serve_reconnecting` with the idempotency layer, configured
//! by the `IDEMPOTENCY_*` variables the supervisor sets, behind the proxies;
//! its handler writes the effect to the ledger, and a wrapper writes when
//! each delivery enters and what the layer returned. With `--outbox` the
//! layer has an outbox (`OutboxPublisher::connect`, through the RabbitMQ
//! proxy too), and the handler also stages one message for the run's
//! downstream queue.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use amqp_idempotency::outbox::{Outbox, OutboxDelivery, OutboxPublisher};
use amqp_idempotency::store::RedisStore;
use amqp_idempotency::{
    BoxError, Config, HandlerError, IdempotencyLayer, Outcome, ServeOptions, Session,
    serve_reconnecting,
};
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::AMQPValue;
use lapin::types::{FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tower::{Layer, Service, service_fn};

use crate::ledger::{Ledger, now_us};
use crate::messages::{ID_HEADER, chaos_id, transient_failures};
use crate::rng::SplitMix;
use crate::topology::Topology;

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

pub async fn consumer_main(argv: &[String]) -> ExitCode {
    init_consumer_logs();
    let mut queue = None;
    let mut ledger = None;
    let mut outbox = false;
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
            "--outbox" => outbox = true,
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
    match run_consumer(&queue, &ledger, outbox).await {
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

async fn run_consumer(queue: &str, ledger_path: &Path, outbox: bool) -> Result<(), String> {
    let pid = std::process::id();
    exit_with_parent();
    let config = Config::from_env().map_err(|err| err.to_string())?;
    let ledger = Arc::new(
        Ledger::open(ledger_path)
            .map_err(|err| format!("cannot open the ledger {}: {err}", ledger_path.display()))?,
    );
    crate::retried::install(Arc::clone(&ledger), pid)?;
    let store = connect_store(&config).await?;
    let dir = Arc::new(
        ledger_path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_owned),
    );
    let layer =
        IdempotencyLayer::new(store, queue, config.clone()).map_err(|err| err.to_string())?;
    let topology = Topology::new(queue, outbox);
    match topology.downstream.clone() {
        None => {
            let records = Arc::clone(&ledger);
            let handler = service_fn(move |delivery: Delivery| {
                let ledger = Arc::clone(&records);
                let dir = Arc::clone(&dir);
                async move { handle(ledger, &dir, pid, delivery, None).await }
            });
            serve_consumer(layer.layer(handler), &ledger, &config, topology).await
        }
        Some(downstream) => {
            let downstream: Arc<str> = downstream.into();
            let records = Arc::clone(&ledger);
            let handler = service_fn(move |incoming: OutboxDelivery| {
                let ledger = Arc::clone(&records);
                let dir = Arc::clone(&dir);
                let staging = Staging {
                    outbox: incoming.outbox,
                    downstream: Arc::clone(&downstream),
                };
                async move { handle(ledger, &dir, pid, incoming.delivery, Some(staging)).await }
            });
            let idempotent = layer
                .with_outbox(OutboxPublisher::connect(&config))
                .layer(handler);
            serve_consumer(idempotent, &ledger, &config, topology).await
        }
    }
}

/// Serves `idempotent` (the layer around the handler, with or without an
/// outbox) behind the ledger's `begin`/`outcome` wrapper, reconnecting.
async fn serve_consumer<S>(
    idempotent: S,
    ledger: &Arc<Ledger>,
    config: &Config,
    topology: Topology,
) -> Result<(), String>
where
    S: Service<Delivery, Response = Outcome, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let pid = std::process::id();
    let service = Recorded {
        inner: idempotent,
        ledger: Arc::clone(ledger),
        pid,
        next: Arc::new(AtomicU64::new(0)),
    };
    let dlx = topology.dlx.clone();
    let url = config.amqp_url().to_owned();
    let prefetch = config.prefetch();
    let connect = move || {
        let url = url.clone();
        let topology = topology.clone();
        async move { open_session(&url, &topology, prefetch).await }
    };
    ledger.append(&format!("start {pid} {}", now_us()));
    let options = ServeOptions::from_config(config)
        .dead_letter_exchange(dlx)
        .shutdown_deadline(Duration::from_secs(10));
    let report = serve_reconnecting(connect, service, options)
        .await
        .map_err(|err| err.to_string())?;
    eprintln!("consumer {pid} stopped: {report:?}");
    Ok(())
}

/// With `--outbox`: the delivery's outbox, and the queue its one outgoing
/// message goes to.
struct Staging {
    outbox: Outbox,
    downstream: Arc<str>,
}

impl Staging {
    /// Stages the outgoing message of `id` for the downstream queue (the
    /// default exchange): body and `x-chaos-id` the incoming message's id;
    /// the outbox sets its `message_id`.
    fn stage(&self, id: &str) -> Result<(), HandlerError> {
        let mut headers = FieldTable::default();
        headers.insert(
            ID_HEADER.into(),
            AMQPValue::LongString(LongString::from(id)),
        );
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_content_type("text/plain".into());
        self.outbox
            .publish("", &self.downstream, properties, id.as_bytes().to_vec())
    }
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

/// Connects to Redis as the environment says (`REDIS_URL`, a
/// `redis-sentinel://` one with `--failover`; `IDEMPOTENCY_MIN_REPLICAS`),
/// retrying while it restarts or fails over.
async fn connect_store(config: &Config) -> Result<RedisStore, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match RedisStore::connect(config).await {
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

/// How long the first run of an `s<i>` message works: past the handler
/// timeout (1500ms in [`crate::supervisor::CONSUMER_ENV`]), so the layer
/// gives up on it while the work it spawned goes on and takes effect.
const SLOW_WORK: Duration = Duration::from_millis(1800);

/// The business handler: 0-1ms of work, the effect (a ledger line), 0-1ms more.
/// Poison messages `p<i>` always fail, retryably. Transient ones `t<i>`
/// fail, retryably, on their first one or two runs (counted with files
/// `transient-t<i>-<k>` in the run directory, which survive kills), then
/// behave like plain ones. `a<i>` aborts the process.
/// The first run of `s<i>` spawns its work and waits for it past the
/// handler timeout; later runs work at once. Each run of `s<i>` writes when
/// its work began and ended (`work`), to show that no two overlap.
///
/// With an outbox (`--outbox`), each run stages one outgoing message right
/// after its effect; a poison message, and a transient one on a failing
/// run, stage it too before they fail (a failed run must publish nothing), and the first run of `s<i>` stages it
/// after the layer gave up on the handler, which the outbox refuses.
async fn handle(
    ledger: Arc<Ledger>,
    dir: &Path,
    pid: u32,
    delivery: Delivery,
    staging: Option<Staging>,
) -> Result<(), HandlerError> {
    let nonce = exec_nonce(&delivery);
    let id = chaos_id(&delivery);
    let mut work = SplitMix::new((u64::from(pid) << 32) ^ nonce);
    if id.starts_with('a') {
        ledger.append(&format!("abort {id} {pid} {nonce} {}", now_us()));
        eprintln!("consumer {pid}: {id} is a poison message that aborts its consumer");
        std::process::abort();
    }
    if id.starts_with('s') {
        let first = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(format!("slow-{id}")))
            .is_ok();
        let run = async move {
            let begun = now_us();
            if first {
                tokio::time::sleep(SLOW_WORK).await;
            }
            let done = now_us();
            ledger.append(&format!("effect {id} {pid} {nonce} {done}"));
            ledger.append(&format!("work {id} {pid} {nonce} {begun} {done}"));
            match &staging {
                Some(staging) => staging.stage(&id),
                None => Ok(()),
            }
        };
        // Spawned: when the layer gives up on the handler, the work goes on.
        return tokio::spawn(run)
            .await
            .map_err(|err| HandlerError::retryable(format!("the work failed: {err}")))?;
    }
    tokio::time::sleep(Duration::from_micros(work.below(1001))).await;
    if failing_run(dir, &id) {
        if let Some(staging) = &staging {
            staging.stage(&id)?;
        }
        ledger.append(&format!("fail {id} {pid} {nonce} {}", now_us()));
        return Err(HandlerError::retryable(
            "transient failure: this handler fails the first runs of t<i>",
        ));
    }
    if id.starts_with('p') {
        if let Some(staging) = &staging {
            staging.stage(&id)?;
        }
        ledger.append(&format!("fail {id} {pid} {nonce} {}", now_us()));
        return Err(HandlerError::retryable(
            "poison message: this handler always fails",
        ));
    }
    ledger
        .try_append(&format!("effect {id} {pid} {nonce} {}", now_us()))
        .map_err(|err| HandlerError::retryable(format!("cannot write the ledger: {err}")))?;
    if let Some(staging) = &staging {
        staging.stage(&id)?;
    }
    // The rest of the work, after the write: widens the window between the
    // effect and the done mark that kills and pauses can hit.
    tokio::time::sleep(Duration::from_micros(work.below(1001))).await;
    Ok(())
}

/// Whether this run of a transient message `t<i>` fails: one of its first
/// [`transient_failures`] runs, each taking a file of its own.
fn failing_run(dir: &Path, id: &str) -> bool {
    (0..transient_failures(id)).any(|k| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(format!("transient-{id}-{k}")))
            .is_ok()
    })
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
        headers.insert(
            NONCE_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(nonce).unwrap_or(i64::MAX)),
        );
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
