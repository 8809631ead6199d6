//! Helpers shared by the integration tests: real Redis and RabbitMQ only.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use amqp_idempotency::store::RedisStore;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test (or earlier run) uses.
pub fn unique(label: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "t-{label}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn redis_store() -> RedisStore {
    let url = redis_url();
    match RedisStore::connect(&url).await {
        Ok(store) => store,
        Err(err) => panic!(
            "these tests need Redis at {url} (set REDIS_URL): {err}\n\
             start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"
        ),
    }
}

pub async fn amqp() -> Connection {
    let url = amqp_url();
    match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(connection) => connection,
        Err(err) => panic!(
            "these tests need RabbitMQ at {url} (set AMQP_URL): {err}\n\
             start it with: rabbitmq-server -detached"
        ),
    }
}

/// A queue as users already have them: no dead-letter exchange, an
/// argument of its own (`x-expires`, so that leftovers of a failed test
/// vanish after 10 unused minutes), never redeclared by the library. `dead`
/// is the parking queue the runner declares for its dead letters
/// (`{name}.dead`, durable, no arguments), declared here the same way so
/// that a test can read it before the runner started.
pub struct TestQueue {
    pub name: String,
    pub dead: String,
}

pub async fn declare_queue(channel: &Channel, label: &str) -> TestQueue {
    let name = unique(label);
    let dead = format!("{name}.dead");
    let mut expires = FieldTable::default();
    expires.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
    channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .expect("declare the parking queue");
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            expires,
        )
        .await
        .expect("declare the test queue");
    TestQueue { name, dead }
}

impl TestQueue {
    pub async fn delete(&self, channel: &Channel) {
        for queue in [&self.name, &self.dead] {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
    }
}

/// Publishes `body` to `queue` through the default exchange, confirmed.
pub async fn publish(channel: &Channel, queue: &str, body: &[u8], message_id: Option<&str>) {
    let _ = channel
        .confirm_select(ConfirmSelectOptions::default())
        .await;
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("publisher confirm");
}

/// Number of ready messages in `queue`.
pub async fn ready_count(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("inspect queue")
        .message_count()
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private redis-server on a free port, killed on drop: for tests that
/// stop or restart Redis without touching the shared one.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("find a free port");
        let dir = std::env::temp_dir().join(unique("redis"));
        std::fs::create_dir_all(&dir).expect("create a redis dir");
        let mut this = Self {
            port,
            child: None,
            dir,
        };
        this.spawn();
        this
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start redis-server (apt-get install redis-server): {err}")
            });
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy to `target` whose live connections can be cut, to make
/// network faults without stopping the shared services.
pub struct Proxy {
    pub port: u16,
    links: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

use std::sync::{Arc, Mutex};

impl Proxy {
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let links: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let registry = Arc::clone(&links);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let link = tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                registry.lock().unwrap().push(link.abort_handle());
            }
        });
        Self {
            port,
            links,
            accept,
        }
    }

    /// Drops every connection open through the proxy; new ones still work.
    pub fn cut(&self) -> usize {
        let links: Vec<_> = self.links.lock().unwrap().drain(..).collect();
        let live = links.iter().filter(|l| !l.is_finished()).count();
        for link in links {
            link.abort();
        }
        live
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Runs `redis-cli` against the Redis on `port` (as `password`, if given)
/// and returns what it printed; panics with the command when it fails.
pub fn redis_cli(port: u16, password: Option<&str>, args: &[&str]) -> String {
    let mut command = Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(password) = password {
        command.args(["--no-auth-warning", "-a", password]);
    }
    let output = command
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run redis-cli (apt-get install redis-tools): {err}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && !text.starts_with("ERR") && !text.starts_with("NOAUTH"),
        "redis-cli -p {port} {args:?} failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// A port nothing listens on.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}
