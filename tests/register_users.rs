//! Runs `examples/register_users.rs` end to end against the real RabbitMQ and
//! Redis (`AMQP_URL`, `REDIS_URL`, defaults on 127.0.0.1), through
//! `cargo run --example`, and checks what it prints.
//!
//! Each test uses its own queue (`REGISTER_QUEUE`) and SQLite file
//! (`REGISTER_DB`), so they can run in parallel with each other and with a
//! demo. When a service is down the tests fail, naming the URL and how to
//! start it: they never skip.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amqp_idempotency::Config;
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};

const USERS: usize = 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime for the service checks")
}

fn config() -> Config {
    Config::from_env().unwrap_or_else(|err| panic!("the test environment is invalid: {err}"))
}

/// Fails the test, with directions, unless RabbitMQ and Redis answer.
fn require_services(config: &Config) {
    runtime().block_on(async {
        let amqp = config.amqp_url();
        let connect = Connection::connect(amqp, ConnectionProperties::default());
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(connection)) => {
                let _ = connection.close(200, "OK".into()).await;
            }
            Ok(Err(err)) => panic!(
                "RabbitMQ is not reachable at {amqp}: {err}. Start it with \
                 `rabbitmq-server -detached` (or `docker-compose up -d rabbitmq`), \
                 or set AMQP_URL to a running broker. This test needs it and does not skip."
            ),
            Err(_) => panic!(
                "RabbitMQ at {amqp} did not answer within 10s. Start it with \
                 `rabbitmq-server -detached` (or `docker-compose up -d rabbitmq`), or set AMQP_URL."
            ),
        }

        let url = config
            .redis_deployment()
            .standalone_url()
            .unwrap_or_else(|| {
                panic!(
                    "this test checks a standalone Redis (REDIS_URL), but the environment names {}",
                    config.redis_deployment()
                )
            });
        let start = "Start it with `redis-server --daemonize yes --port 6379` \
                     (or `docker-compose up -d redis`), or set REDIS_URL to a running Redis 7+. \
                     This test needs it and does not skip.";
        let client = redis::Client::open(url)
            .unwrap_or_else(|err| panic!("REDIS_URL={url} is not a valid Redis URL: {err}"));
        let ping = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        match tokio::time::timeout(Duration::from_secs(5), ping).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => panic!("Redis is not reachable at {url}: {err}. {start}"),
            Err(_) => panic!("Redis at {url} did not answer within 5s. {start}"),
        }
    });
}

/// A queue and a database file of our own, removed when dropped.
struct Scratch {
    amqp: String,
    queue: String,
    db: PathBuf,
}

impl Scratch {
    fn new(config: &Config, tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("register_users_test_{tag}_{}_{nanos}", std::process::id());
        Self {
            amqp: config.amqp_url().to_owned(),
            db: std::env::temp_dir().join(format!("{name}.sqlite")),
            queue: name,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.db);
        let (amqp, queue) = (self.amqp.clone(), self.queue.clone());
        // Best effort: a leftover queue is harmless but untidy.
        let _ = std::thread::spawn(move || {
            runtime().block_on(async {
                let Ok(connection) =
                    Connection::connect(&amqp, ConnectionProperties::default()).await
                else {
                    return;
                };
                if let Ok(channel) = connection.create_channel().await {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = connection.close(200, "OK".into()).await;
            });
        })
        .join();
    }
}

/// Runs the example; returns its stdout after checking that it exited 0.
fn run_example(scratch: &Scratch, extra: &[&str]) -> String {
    let users = USERS.to_string();
    let mut args = vec![
        "run",
        "--quiet",
        "--example",
        "register_users",
        "--",
        "--users",
        users.as_str(),
    ];
    args.extend_from_slice(extra);
    let output = Command::new(env!("CARGO"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("REGISTER_QUEUE", &scratch.queue)
        .env("REGISTER_DB", &scratch.db)
        // The done marks of these one-off queues need not stay for a day.
        .env("IDEMPOTENCY_DONE_TTL", "10m")
        // Its queues are new on every run: no delay queues to leave behind
        // (tests/retry.rs covers retries through the broker).
        .env("IDEMPOTENCY_RETRY", "hold")
        .output()
        .unwrap_or_else(|err| panic!("cannot run `cargo {}`: {err}", args.join(" ")));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`cargo {}` exited with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        args.join(" "),
        output.status
    );
    stdout
}

fn rows_per_email(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|line| line.split_once("@example.com: "))
        .map(|(user, rest)| (format!("{user}@example.com"), rest.to_owned()))
        .collect()
}

#[test]
fn with_the_middleware_every_user_has_exactly_one_row() {
    let config = config();
    require_services(&config);
    let scratch = Scratch::new(&config, "mw");
    let stdout = run_example(&scratch, &[]);

    let rows = rows_per_email(&stdout);
    assert_eq!(rows.len(), USERS, "one line per user expected:\n{stdout}");
    for (email, count) in &rows {
        assert_eq!(
            count, "1 row",
            "{email} should have exactly one row:\n{stdout}"
        );
    }
    let summary = format!(
        "users: {USERS}, rows: {USERS}, users with exactly one row: {USERS}, missing: 0, duplicates: 0"
    );
    assert!(
        stdout.contains(&summary),
        "expected `{summary}` in:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("duplicate {USERS}, processed {USERS}")),
        "the middleware should report {USERS} duplicates and {USERS} processed:\n{stdout}"
    );
    assert!(
        stdout.contains("OK: every user has exactly one row"),
        "{stdout}"
    );
}

#[test]
fn without_the_middleware_the_double_clicks_become_duplicate_rows() {
    let config = config();
    require_services(&config);
    let scratch = Scratch::new(&config, "plain");
    let stdout = run_example(&scratch, &["--without-middleware"]);

    let rows = rows_per_email(&stdout);
    assert_eq!(rows.len(), USERS, "one line per user expected:\n{stdout}");
    for (email, count) in &rows {
        assert!(
            count.starts_with("2 rows"),
            "{email} should have two rows without the middleware:\n{stdout}"
        );
    }
    let summary = format!("users: {USERS}, rows: {}", USERS * 2);
    assert!(
        stdout.contains(&summary),
        "expected `{summary}` in:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("duplicates: {USERS}")),
        "expected `duplicates: {USERS}` in:\n{stdout}"
    );
}

/// Reads the metrics endpoint once.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|err| panic!("cannot connect to the metrics port {port}: {err}"));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send the scrape request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the metrics");
    response
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

#[test]
fn the_metrics_endpoint_counts_what_happened() {
    use std::io::BufRead;

    let config = config();
    require_services(&config);
    let scratch = Scratch::new(&config, "metrics");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let users = USERS.to_string();
    let mut child = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", "register_users", "--"])
        .args(["--users", users.as_str(), "--linger", "60"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("REGISTER_QUEUE", &scratch.queue)
        .env("REGISTER_DB", &scratch.db)
        .env("IDEMPOTENCY_DONE_TTL", "10m")
        // Its queues are new on every run: no delay queues to leave behind
        // (tests/retry.rs covers retries through the broker).
        .env("IDEMPOTENCY_RETRY", "hold")
        .env("METRICS_PORT", port.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the example");
    let stdout = child.stdout.take().expect("the example's stdout");
    let mut seen = String::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("read the example's output");
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("lingering") {
            break;
        }
    }
    let text = if seen.contains("lingering") {
        scrape(port)
    } else {
        String::new()
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("OK: every user has exactly one row"),
        "{seen}"
    );
    assert!(
        text.starts_with("HTTP/1.1 200 OK"),
        "no metrics served:\n{seen}\n{text}"
    );

    let users = USERS as f64;
    assert_eq!(
        metric(&text, "idempotency_processed_total"),
        Some(users),
        "{text}"
    );
    assert_eq!(
        metric(&text, "idempotency_duplicates_total{state=\"done\"}"),
        Some(users),
        "every second copy was acked as a duplicate:\n{text}"
    );
    assert_eq!(
        metric(&text, "idempotency_lease_lost_total"),
        None,
        "{text}"
    );
    assert!(
        text.contains("idempotency_store_seconds{operation=\"claim\""),
        "store latency is recorded:\n{text}"
    );
}
