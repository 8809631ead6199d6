//! The seed's scenario: a user double-clicks "register", two identical
//! messages reach the consumer, and without protection the database gets two rows.
//!
//! The program starts from a clean slate (it recreates the `users` table,
//! purges its queue and deletes the done marks of the emails it is about to
//! register), publishes K registrations, **each twice** with the same
//! `message_id` (`register:<email>`), back to back as a double click sends
//! them, then consumes the queue and prints how many rows each email got.
//!
//! - With the middleware (the default) the second copy is recognised by its
//!   `message_id` and acked without running the handler: one row per user,
//!   exit status 0 only if every user has exactly one row.
//! - With `--without-middleware` a plain lapin loop inserts and acks every
//!   delivery: every user gets two rows, and the program says how many
//!   duplicates there are (exit status 0: that is the point of the demo).
//!
//! The `users` table deliberately has no unique constraint on `email`: the
//! database would otherwise hide the duplicates the middleware is there to
//! prevent (and many real tables cannot have one, e.g. an append-only log of
//! payments).
//!
//! ```text
//! cargo run --example register_users                      # 50 users, with the middleware
//! cargo run --example register_users -- --users 20
//! cargo run --example register_users -- --without-middleware
//! ```
//!
//! Options: `--users K` (default 50), `--without-middleware`, `--timeout SECS`
//! (default 60: give up if the deliveries are not all settled by then).
//! Environment: `REGISTER_QUEUE` (default `register_users`), `REGISTER_DB`
//! (the SQLite file, default `register_users.sqlite` in the temp directory),
//! plus `AMQP_URL`, `REDIS_URL`, their TLS files (`AMQP_TLS_*`, `REDIS_TLS_*`)
//! and the `IDEMPOTENCY_*` settings of the README.
//! Logs go to stderr (`RUST_LOG`, default `warn`).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_idempotency::{
    Config, Disposition, HandlerError, IdempotencyLayer, Outcome, ServeOptions, amqp,
    records::Records, serve, store::RedisStore,
};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
// Why SQLite: it needs no server (nothing more to run in docker-compose), it
// is bundled into the binary by rusqlite's `bundled` feature, and the result
// is a single file a newcomer can open with `sqlite3` to see the rows.
use rusqlite::Connection as Db;
use tower::{Layer, ServiceExt, service_fn};

const USAGE: &str =
    "usage: register_users [--users K] [--without-middleware] [--timeout SECS] [--linger SECS]
  METRICS_PORT=9090 serves the counters in Prometheus text format at http://0.0.0.0:9090/metrics;
  --linger keeps serving them after the run for SECS seconds (0: until Ctrl-C or SIGTERM)";

struct Args {
    users: u32,
    without_middleware: bool,
    timeout: Duration,
    linger: Option<Duration>,
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logs();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(message) = serve_metrics().await {
        eprintln!("error: {message}");
        return ExitCode::FAILURE;
    }
    let linger = args.linger;
    let code = match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    };
    if let Some(linger) = linger {
        println!("lingering so the metrics can be scraped (Ctrl-C to stop)");
        let stop = tokio::signal::ctrl_c();
        if linger.is_zero() {
            let _ = stop.await;
        } else {
            let _ = tokio::time::timeout(linger, stop).await;
        }
    }
    code
}

/// With METRICS_PORT set, installs a Prometheus recorder for the library's
/// counters and serves them over HTTP on that port.
async fn serve_metrics() -> Result<(), String> {
    let Ok(port) = std::env::var("METRICS_PORT") else {
        return Ok(());
    };
    let port: u16 = port
        .trim()
        .parse()
        .map_err(|_| format!("METRICS_PORT={port:?}: expected a TCP port number such as 9090"))?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|err| format!("cannot install the metrics recorder: {err}"))?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .map_err(|err| format!("cannot listen on METRICS_PORT {port}: {err}; pick a free port"))?;
    println!("metrics: http://0.0.0.0:{port}/metrics");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = handle.render();
            tokio::spawn(async move {
                // One request per connection; whatever the path, the answer is the metrics.
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// `Ok(None)` means `--help`.
fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = Args {
        users: 50,
        without_middleware: false,
        timeout: Duration::from_secs(60),
        linger: None,
    };
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--without-middleware" => args.without_middleware = true,
            "--users" => {
                let value = argv.next().ok_or("--users needs a value")?;
                args.users = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or_else(|| format!("--users expects 1 to 100000, got {value:?}"))?;
            }
            "--timeout" => {
                let value = argv.next().ok_or("--timeout needs a value")?;
                let secs: u64 = value
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("--timeout expects seconds >= 1, got {value:?}"))?;
                args.timeout = Duration::from_secs(secs);
            }
            "--linger" => {
                let value = argv.next().ok_or("--linger needs a value")?;
                let secs: u64 = value.parse().map_err(|_| {
                    format!("--linger expects seconds (0: until Ctrl-C), got {value:?}")
                })?;
                args.linger = Some(Duration::from_secs(secs));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(args))
}

/// Returns whether the result is the expected one.
async fn run(args: Args) -> Result<bool, String> {
    let config = Config::from_env().map_err(|err| {
        format!("{err}\n       fix or unset that variable (see DESIGN.md for the settings)")
    })?;
    let queue = match std::env::var("REGISTER_QUEUE") {
        Ok(name) if !name.trim().is_empty() => name,
        _ => "register_users".to_owned(),
    };
    let queue_name = ShortString::try_new(queue.as_str())
        .map_err(|_| format!("REGISTER_QUEUE={queue:?} is longer than AMQP's 255 bytes"))?;
    let db_path = match std::env::var_os("REGISTER_DB") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => std::env::temp_dir().join("register_users.sqlite"),
    };
    let emails: Vec<String> = (1..=args.users)
        .map(|i| format!("user{i:03}@example.com"))
        .collect();

    // Clean slate, 1/3: the table. (Blocking, but nothing else runs yet.)
    let db = open_db(&db_path)?;

    let connection = connect_amqp(&config).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| format!("cannot open a RabbitMQ channel: {err}"))?;
    // Clean slate, 2/3: the queue.
    channel
        .queue_declare(
            queue_name.clone(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| {
            if is_precondition_failed(&err) {
                format!(
                    "queue `{queue}` exists with other settings ({err}); delete it \
                     (rabbitmqctl delete_queue {queue}) or set REGISTER_QUEUE to another name"
                )
            } else {
                format!("cannot declare queue `{queue}`: {err}")
            }
        })?;
    let purged = channel
        .queue_purge(queue_name.clone(), QueuePurgeOptions::default())
        .await
        .map_err(|err| format!("cannot purge queue `{queue}`: {err}"))?;

    let mode = if args.without_middleware {
        "WITHOUT the middleware (plain lapin loop)"
    } else {
        "with the idempotency middleware"
    };
    println!(
        "registering {} users, each published twice, consumed {mode}",
        args.users
    );
    println!(
        "queue `{queue}` (purged {purged} old messages), database {}",
        db_path.display()
    );

    let settled = if args.without_middleware {
        publish(&connection, &queue_name, &emails).await?;
        consume_plain(
            &channel,
            &queue_name,
            Arc::clone(&db),
            &emails,
            args.timeout,
        )
        .await?
    } else {
        let store = RedisStore::connect(&config)
            .await
            .map_err(|err| err.to_string())?;
        let layer = IdempotencyLayer::new(store, &queue, config.clone())
            .map_err(|err| format!("{err}\n       fix or unset that variable"))?;
        // Clean slate, 3/3: the done marks of a previous run, or the second
        // run would find every registration already done and insert nothing.
        let keys: Vec<String> = emails
            .iter()
            .map(|email| layer.deduplicator().key(&message_id(email)))
            .collect();
        let deleted = delete_keys(&config, &keys).await?;
        println!(
            "deleted {deleted} done marks left by an earlier run (keys like `{}`)",
            keys.first().map(String::as_str).unwrap_or_default()
        );
        publish(&connection, &queue_name, &emails).await?;
        consume_with_middleware(
            &config,
            channel,
            &queue_name,
            layer,
            Arc::clone(&db),
            emails.len(),
            args.timeout,
        )
        .await?
    };

    if let Err(err) = connection.close(200, "OK".into()).await {
        eprintln!("warning: closing the RabbitMQ connection failed: {err}");
    }
    report(&db, &emails, settled, args.without_middleware)
}

fn message_id(email: &str) -> String {
    format!("register:{email}")
}

fn open_db(path: &std::path::Path) -> Result<Arc<Mutex<Db>>, String> {
    let db = Db::open(path).map_err(|err| {
        format!(
            "cannot open the SQLite database {}: {err}; set REGISTER_DB to a writable path",
            path.display()
        )
    })?;
    db.execute_batch(
        "DROP TABLE IF EXISTS users;
         CREATE TABLE users (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             email TEXT NOT NULL, -- no UNIQUE: duplicates must be visible
             name TEXT
         );",
    )
    .map_err(|err| format!("cannot create the users table in {}: {err}", path.display()))?;
    Ok(Arc::new(Mutex::new(db)))
}

/// Inserts one user. Blocking: run it on the blocking thread pool.
fn insert_user(db: &Mutex<Db>, email: &str, name: &str) -> rusqlite::Result<()> {
    let db = db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    db.execute(
        "INSERT INTO users (email, name) VALUES (?1, ?2)",
        (email, name),
    )?;
    Ok(())
}

/// The body is two lines, `email=...` and `name=...`.
fn parse_registration(body: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(body).ok()?;
    let mut email = None;
    let mut name = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("email", value)) if !value.is_empty() => email = Some(value.to_owned()),
            Some(("name", value)) => name = Some(value.to_owned()),
            _ => {}
        }
    }
    Some((email?, name.unwrap_or_default()))
}

async fn register(db: Arc<Mutex<Db>>, delivery: &Delivery) -> Result<(), HandlerError> {
    let Some((email, name)) = parse_registration(&delivery.data) else {
        // No retry can fix a malformed message: dead-letter it.
        return Err(HandlerError::permanent(
            "not a registration: expected the lines `email=...` and `name=...`",
        ));
    };
    tokio::task::spawn_blocking(move || insert_user(&db, &email, &name))
        .await
        .map_err(|err| HandlerError::retryable(format!("the insert task failed: {err}")))?
        .map_err(|err| HandlerError::retryable(format!("insert into users failed: {err}")))
}

/// Publishes each registration twice in a row, like a double click, and
/// waits for the broker to confirm every copy.
async fn publish(
    connection: &Connection,
    queue: &ShortString,
    emails: &[String],
) -> Result<(), String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| format!("cannot open a channel to publish: {err}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|err| format!("cannot enable publisher confirms: {err}"))?;
    let mut confirms = Vec::with_capacity(emails.len() * 2);
    for (i, email) in emails.iter().enumerate() {
        let body = format!("email={email}\nname=User {}", i + 1);
        let properties = BasicProperties::default()
            .with_message_id(message_id(email).into())
            .with_content_type("text/plain".into())
            .with_delivery_mode(2);
        for _click in 0..2 {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.clone(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties.clone(),
                )
                .await
                .map_err(|err| format!("publish failed: {err}"))?;
            confirms.push(confirm);
        }
    }
    for confirm in confirms {
        match confirm.await {
            Ok(Confirmation::Ack(_)) => {}
            Ok(other) => return Err(format!("the broker did not store a message: {other:?}")),
            Err(err) => return Err(format!("no confirmation from the broker: {err}")),
        }
    }
    let _ = channel.close(200, "OK".into()).await;
    println!("published {} messages, all confirmed", emails.len() * 2);
    Ok(())
}

/// What the middleware did, per outcome kind.
#[derive(Default)]
struct Tally {
    kinds: Mutex<BTreeMap<&'static str, u64>>,
    settled: AtomicU64,
    all_settled: tokio::sync::Notify,
}

impl Tally {
    fn record(&self, outcome: &Outcome, target: u64) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        *kinds.entry(outcome.kind().as_str()).or_default() += 1;
        drop(kinds);
        // Requeued deliveries come back; acked and dead-lettered ones are final.
        if !matches!(outcome.disposition(), Disposition::Requeue { .. })
            && self.settled.fetch_add(1, Ordering::AcqRel) + 1 == target
        {
            self.all_settled.notify_one();
        }
    }
}

async fn consume_with_middleware(
    config: &Config,
    channel: Channel,
    queue: &ShortString,
    layer: IdempotencyLayer<RedisStore>,
    db: Arc<Mutex<Db>>,
    users: usize,
    timeout: Duration,
) -> Result<u64, String> {
    let target = users as u64 * 2;
    let handler = service_fn(move |delivery: Delivery| {
        let db = Arc::clone(&db);
        async move { register(db, &delivery).await }
    });
    let tally = Arc::new(Tally::default());
    let recorder = Arc::clone(&tally);
    let service = layer.layer(handler).map_response(move |outcome: Outcome| {
        recorder.record(&outcome, target);
        outcome
    });

    channel
        .basic_qos(config.prefetch(), BasicQosOptions::default())
        .await
        .map_err(|err| format!("cannot set the prefetch (basic.qos): {err}"))?;
    let consumer = channel
        .basic_consume(
            queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("cannot consume from `{queue}`: {err}"))?;

    let waiter = Arc::clone(&tally);
    let stop = async move {
        tokio::select! {
            () = waiter.all_settled.notified() => {}
            () = tokio::time::sleep(timeout) => {
                eprintln!("timed out after {timeout:?} with deliveries still unsettled");
            }
            _ = tokio::signal::ctrl_c() => eprintln!("Ctrl-C: stopping"),
        }
    };
    let started = Instant::now();
    let report = serve(
        consumer,
        service,
        ServeOptions::from_config(config)
            .shutdown_on(stop)
            .close_channel(channel),
    )
    .await
    .map_err(|err| err.to_string())?;
    let kinds = tally
        .kinds
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "consumed in {:.2}s: {}; broker: acked {}, requeued {}, dead-lettered {}, unsettled {}",
        started.elapsed().as_secs_f64(),
        kinds.join(", "),
        report.acked,
        report.requeued,
        report.dead_lettered,
        report.unsettled
    );
    Ok(tally.settled.load(Ordering::Acquire))
}

/// The consumer most code starts with: insert, then ack. Every delivery runs.
async fn consume_plain(
    channel: &Channel,
    queue: &ShortString,
    db: Arc<Mutex<Db>>,
    emails: &[String],
    timeout: Duration,
) -> Result<u64, String> {
    let target = emails.len() as u64 * 2;
    let mut consumer = channel
        .basic_consume(
            queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("cannot consume from `{queue}`: {err}"))?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut acked = 0;
    while acked < target {
        let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Err(_) => {
                eprintln!("timed out after {timeout:?} with deliveries still unsettled");
                break;
            }
            Ok(None) => return Err("the consumer was cancelled by the broker".into()),
            Ok(Some(Err(err))) => return Err(format!("the consumer failed: {err}")),
            Ok(Some(Ok(delivery))) => delivery,
        };
        if let Err(err) = register(Arc::clone(&db), &delivery).await {
            return Err(format!("registration failed: {err}"));
        }
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|err| format!("ack failed: {err}"))?;
        acked += 1;
    }
    let _ = channel.close(200, "OK".into()).await;
    println!(
        "consumed in {:.2}s: {acked} deliveries inserted and acked",
        started.elapsed().as_secs_f64()
    );
    Ok(acked)
}

/// Prints the rows per email; returns whether the outcome is the expected one.
fn report(
    db: &Mutex<Db>,
    emails: &[String],
    settled: u64,
    without_middleware: bool,
) -> Result<bool, String> {
    let db = db.lock().unwrap_or_else(|p| p.into_inner());
    let mut statement = db
        .prepare("SELECT email, COUNT(*) FROM users GROUP BY email")
        .map_err(|err| format!("cannot query users: {err}"))?;
    let counts: BTreeMap<String, u64> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .and_then(|rows| rows.collect())
        .map_err(|err| format!("cannot read users: {err}"))?;
    let mut rows = 0;
    let mut exactly_one = 0;
    let mut missing = 0;
    for email in emails {
        let n = counts.get(email).copied().unwrap_or(0);
        rows += n;
        match n {
            0 => missing += 1,
            1 => exactly_one += 1,
            _ => {}
        }
        let flag = if n == 1 { "" } else { "   <-- not exactly one" };
        println!("{email}: {n} row{}{flag}", if n == 1 { "" } else { "s" });
    }
    let known: std::collections::HashSet<&String> = emails.iter().collect();
    let strangers = counts.keys().filter(|e| !known.contains(e)).count();
    let duplicates = rows.saturating_sub(emails.len() as u64 - missing);
    println!(
        "users: {}, rows: {rows}, users with exactly one row: {exactly_one}, missing: {missing}, duplicates: {duplicates}",
        emails.len()
    );
    let target = emails.len() as u64 * 2;
    if settled < target {
        println!("only {settled} of {target} deliveries were settled before stopping");
    }
    if strangers > 0 {
        println!("{strangers} unexpected emails in the table");
    }
    if without_middleware {
        if duplicates > 0 {
            println!(
                "without the middleware each double click was inserted twice: {duplicates} duplicate rows"
            );
        }
        Ok(missing == 0 && settled == target)
    } else {
        let ok = exactly_one == emails.len() && strangers == 0 && settled == target;
        if ok {
            println!("OK: every user has exactly one row");
        } else {
            println!("FAILED: some users do not have exactly one row");
        }
        Ok(ok)
    }
}

async fn delete_keys(config: &Config, keys: &[String]) -> Result<u64, String> {
    // The library's records API: the same Redis, TLS files and prefix as the store.
    let records = tokio::time::timeout(Duration::from_secs(5), Records::connect(config))
        .await
        .map_err(|_| format!("{} did not answer within 5s", config.redis_deployment()))?
        .map_err(|err| format!("{err}; start it or set REDIS_URL"))?;
    let mut deleted = 0;
    for key in keys {
        let forgotten = records
            .forget(key)
            .await
            .map_err(|err| format!("cannot delete old done marks in Redis: {err}"))?;
        deleted += u64::from(forgotten.is_some());
    }
    Ok(deleted)
}

fn is_precondition_failed(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

/// Connects (TLS for amqps://, as AMQP_TLS_* say), retrying a few times on
/// I/O errors: in docker-compose the broker's health check can pass a
/// moment before it accepts logins.
async fn connect_amqp(config: &Config) -> Result<Connection, String> {
    const TRIES: u32 = 5;
    for attempt in 1..=TRIES {
        let connect = amqp::connect(config, ConnectionProperties::default());
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(err)) if err.is_io() && attempt < TRIES => {
                eprintln!("RabbitMQ not ready ({err}); retrying in 2s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(Err(err)) if err.is_io() => {
                return Err(format!(
                    "{err}\n       (or `docker-compose up -d rabbitmq`)"
                ));
            }
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_) => {
                return Err("RabbitMQ (AMQP_URL) did not answer within 10s; check AMQP_URL and that the broker is up".to_owned());
            }
        }
    }
    Err("cannot connect to RabbitMQ at AMQP_URL".to_owned())
}

fn init_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
