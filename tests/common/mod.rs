//! Helpers shared by the integration tests: real Redis and RabbitMQ only.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use amqp_idempotency::store::RedisStore;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};

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
    match RedisStore::connect_url(&url).await {
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
    let name = scratch_queue(channel, label).await;
    let dead = format!("{name}.dead");
    channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .expect("declare the parking queue");
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

/// A channel with `prefetch` deliveries in flight, consuming `queue`.
pub async fn consume(connection: &Connection, queue: &str, prefetch: u16) -> (Channel, Consumer) {
    let channel = connection.create_channel().await.expect("open a channel");
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("set prefetch");
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|err| panic!("start consuming `{queue}`: {err}"));
    (channel, consumer)
}

/// Publishes `body` to `queue` through the default exchange, confirmed.
pub async fn publish(channel: &Channel, queue: &str, body: &[u8], message_id: Option<&str>) {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    publish_with(channel, queue, body, properties).await;
}

/// Publishes `body` with `properties` to `queue` through the default
/// exchange, confirmed.
pub async fn publish_with(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    let _ = channel
        .confirm_select(ConfirmSelectOptions::default())
        .await;
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

/// A queue of the test's (a downstream or reply queue), deleted by the
/// broker after 10 unused minutes.
pub async fn scratch_queue(channel: &Channel, label: &str) -> String {
    let name = unique(label);
    let mut expires = FieldTable::default();
    expires.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            expires,
        )
        .await
        .unwrap_or_else(|err| panic!("declare the scratch queue `{name}`: {err}"));
    name
}

/// Waits up to 10 s for the next message in `queue`, taking it.
pub async fn next_message(channel: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = channel
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get");
        if let Some(message) = got {
            return message;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing reached `{queue}` within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
pub type PrivateRedis = RedisProcess;

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

// ---------------------------------------------------------------------------
// TLS: certificates made with the openssl CLI, a private redis-server with a
// TLS port, and stunnel in front of the shared RabbitMQ.

/// Runs `openssl` with `args` in `dir`; panics with its output when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run openssl (apt-get install openssl; scripts/test installs it): {err}")
        });
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Test certificates in a temporary directory, removed on drop: a CA, a
/// server certificate it signed for `localhost` and `127.0.0.1`, one it
/// signed for another host only, a client certificate it signed, and an
/// unrelated CA. All keys are P-256, all files PEM.
pub struct Pki {
    pub dir: std::path::PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("pki"));
        std::fs::create_dir_all(&dir).expect("create a directory for the test certificates");
        let config = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = replaced by -subj
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[elsewhere]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:elsewhere.example
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
";
        std::fs::write(dir.join("openssl.cnf"), config).expect("write openssl.cnf");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (ca, name) in [
            ("ca", "/CN=amqp-idempotency test CA"),
            ("other-ca", "/CN=unrelated test CA"),
        ] {
            let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            let mut args = vec!["req", "-x509", "-new", "-days", "3", "-subj", name];
            args.extend(ec);
            args.extend([
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
                "-keyout",
                &key,
                "-out",
                &pem,
            ]);
            openssl(&dir, &args);
        }
        for (serial, leaf) in [(2, "server"), (3, "elsewhere"), (4, "client")] {
            let (key, csr, pem) = (
                format!("{leaf}.key"),
                format!("{leaf}.csr"),
                format!("{leaf}.pem"),
            );
            let name = format!("/CN={leaf}");
            let mut args = vec!["req", "-new", "-config", "openssl.cnf", "-subj", &name];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr]);
            openssl(&dir, &args);
            let serial = serial.to_string();
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-set_serial",
                    &serial,
                    "-days",
                    "3",
                    "-extfile",
                    "openssl.cnf",
                    "-extensions",
                    leaf,
                    "-out",
                    &pem,
                ],
            );
        }
        Self { dir }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    /// The CA that signed every certificate below.
    pub fn ca(&self) -> std::path::PathBuf {
        self.path("ca.pem")
    }

    /// A CA that signed nothing here.
    pub fn other_ca(&self) -> std::path::PathBuf {
        self.path("other-ca.pem")
    }

    /// Certificate and key for `localhost` and `127.0.0.1`.
    pub fn server(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        (self.path("server.pem"), self.path("server.key"))
    }

    /// Certificate and key for `elsewhere.example` only.
    pub fn elsewhere(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        (self.path("elsewhere.pem"), self.path("elsewhere.key"))
    }

    /// Client certificate and key.
    pub fn client(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        (self.path("client.pem"), self.path("client.key"))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until something listens on `port`, or panics with `log`'s
/// contents after 10s.
fn wait_for_port(port: u16, what: &str, child: &mut Child, log: &std::path::Path) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before listening on port {port}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!(
        "{what} did not listen on port {port} within 10s: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A private redis-server that only speaks TLS (`--port 0 --tls-port`),
/// with `cert` as its certificate, trusting `Pki::ca` for client
/// certificates, which it requires when `clients_need_certificates`.
/// Killed on drop.
pub struct TlsRedis {
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl TlsRedis {
    pub fn start(
        pki: &Pki,
        cert: (std::path::PathBuf, std::path::PathBuf),
        clients_need_certificates: bool,
    ) -> Self {
        Self::start_with(pki, cert, clients_need_certificates, &[])
    }

    /// Like `start`, with more `redis-server` arguments (`--user ...`).
    pub fn start_with(
        pki: &Pki,
        cert: (std::path::PathBuf, std::path::PathBuf),
        clients_need_certificates: bool,
        extra: &[String],
    ) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("tls-redis"));
        std::fs::create_dir_all(&dir).expect("create a redis dir");
        let log = dir.join("redis.log");
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&cert.0)
            .arg("--tls-key-file")
            .arg(&cert.1)
            .arg("--tls-ca-cert-file")
            .arg(pki.ca())
            .args([
                "--tls-auth-clients",
                if clients_need_certificates {
                    "yes"
                } else {
                    "no"
                },
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start redis-server (apt-get install redis-server): {err}")
            });
        wait_for_port(port, "redis-server with TLS", &mut child, &log);
        Self { port, child, dir }
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// stunnel in the foreground on a free port: TLS with `Pki::server`'s
/// certificate in front of the RabbitMQ at AMQP_URL, requiring a client
/// certificate signed by `Pki::ca` when `clients_need_certificates`.
/// Killed on drop.
pub struct Stunnel {
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl Stunnel {
    pub fn start(pki: &Pki, clients_need_certificates: bool) -> Self {
        let broker = url::Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        let target = format!(
            "{}:{}",
            broker.host_str().unwrap_or("127.0.0.1"),
            broker.port().unwrap_or(5672)
        );
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("stunnel"));
        std::fs::create_dir_all(&dir).expect("create a stunnel dir");
        let (cert, key) = pki.server();
        let log = dir.join("stunnel.log");
        let mut config = format!(
            "foreground = yes\npid =\noutput = {}\ndebug = notice\n\n[amqps]\n\
             accept = 127.0.0.1:{port}\nconnect = {target}\ncert = {}\nkey = {}\n",
            log.display(),
            cert.display(),
            key.display()
        );
        if clients_need_certificates {
            config.push_str(&format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                pki.ca().display()
            ));
        }
        let config_file = dir.join("stunnel.conf");
        std::fs::write(&config_file, config).expect("write stunnel.conf");
        let mut child = Command::new("stunnel")
            .arg(&config_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start stunnel (apt-get install stunnel4; scripts/test installs it): {err}"
                )
            });
        wait_for_port(port, "stunnel", &mut child, &log);
        Self { port, child, dir }
    }

    /// AMQP_URL with `amqps://` and this tunnel's address.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        url.set_scheme("amqps").expect("amqps scheme");
        url.set_host(Some("127.0.0.1")).expect("a host");
        url.set_port(Some(self.port)).expect("a port");
        url.to_string()
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Least privilege: the ACL lines of docs/deployment.md, applied to a private redis-server.

/// The words of the `ACL SETUSER <user> ...` line in docs/deployment.md
/// (Least privilege; the README links there), so that the tests check
/// exactly what the documentation tells operators to run.
pub fn readme_acl_line(user: &str) -> Vec<String> {
    let docs = include_str!("../../docs/deployment.md");
    let start = format!("ACL SETUSER {user} ");
    let line = docs
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with(&start))
        .unwrap_or_else(|| panic!("docs/deployment.md has no line starting with `{start}`"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// The password the documented ACL lines use, to be replaced.
pub const README_PASSWORD: &str = ">CHANGE-ME";

/// Runs `words` (an `ACL SETUSER` line, its documented password replaced by
/// `password`) on the Redis at `port`.
pub fn apply_acl(port: u16, words: &[String], password: &str) {
    let args: Vec<String> = words
        .iter()
        .map(|word| {
            if word == README_PASSWORD {
                format!(">{password}")
            } else {
                word.clone()
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let answer = redis_cli(port, None, &args);
    assert_eq!(answer.trim(), "OK", "{args:?}: {answer}");
}

/// A private redis-server with the documented consumer user, and a store
/// connected as that user.
pub async fn least_privilege_store() -> (PrivateRedis, RedisStore) {
    least_privilege_store_as("idem-consumer").await
}

/// A private redis-server with the documented `user`, and a store connected
/// as that user.
pub async fn least_privilege_store_as(user: &str) -> (PrivateRedis, RedisStore) {
    let redis = PrivateRedis::start();
    apply_acl(redis.port, &readme_acl_line(user), "consumer-pw");
    let url = format!("redis://{user}:consumer-pw@127.0.0.1:{}", redis.port);
    let store = RedisStore::connect_url(&url)
        .await
        .unwrap_or_else(|err| panic!("connect as the documented {user} user: {err}"));
    (redis, store)
}

// ---------------------------------------------------------------------------
// A Redis Cluster and a Valkey server: the ones the environment names
// (`TEST_REDIS_CLUSTER_NODES`, `TEST_VALKEY_URL`, e.g. from `.ci/servers.sh`),
// else this test binary's own, started on first use (see `servers`).

mod servers;

/// What to do when a server the environment names does not answer.
const NAMED_SERVER_DOWN: &str = "start it (`.ci/servers.sh up` and `eval \"$(.ci/servers.sh env)\"`), \
     or unset the variable and the tests start their own";

/// Connects to `url` with the sync client and sends `PING`; the error says
/// what failed.
fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|err| format!("bad URL: {err}"))?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .map_err(|err| format!("cannot connect: {err}"))?;
    connection
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|err| format!("cannot set a read timeout: {err}"))?;
    let answer: String = redis::cmd("PING")
        .query(&mut connection)
        .map_err(|err| format!("PING failed: {err}"))?;
    if answer == "PONG" {
        Ok(())
    } else {
        Err(format!("PING answered {answer:?}"))
    }
}

/// A variable's value, `None` when unset or blank.
fn var_set(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

/// The URLs (`redis://127.0.0.1:P`) of a 3-master Redis Cluster's nodes:
/// those of `TEST_REDIS_CLUSTER_NODES` (comma-separated) when it is set,
/// else those of the cluster this test binary starts for itself. Panics,
/// saying why and what to do, when a named node does not answer `PING` or
/// the cluster cannot be started.
pub fn cluster_nodes() -> Vec<String> {
    const VAR: &str = "TEST_REDIS_CLUSTER_NODES";
    let Some(value) = var_set(VAR) else {
        return servers::cluster().unwrap_or_else(|err| {
            panic!(
                "these tests need a Redis Cluster ({VAR} is unset, so they start their own): {err}"
            )
        });
    };
    let nodes: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(
        !nodes.is_empty(),
        "{VAR} is set but names no node ({value:?}): {NAMED_SERVER_DOWN}"
    );
    for node in &nodes {
        if let Err(err) = ping(node) {
            panic!(
                "the Redis Cluster node {node} (from {VAR}) does not answer: {err}\n{NAMED_SERVER_DOWN}"
            );
        }
    }
    nodes
}

/// The URL of a Valkey 8.1+ server: `TEST_VALKEY_URL` when it is set, else
/// that of the server this test binary starts for itself. Panics, saying
/// why and what to do, when the named server does not answer `PING` or no
/// server can be started.
pub fn valkey_url() -> String {
    const VAR: &str = "TEST_VALKEY_URL";
    let Some(url) = var_set(VAR) else {
        return servers::valkey().unwrap_or_else(|err| {
            panic!("these tests need Valkey 8.1+ ({VAR} is unset, so they start their own): {err}")
        });
    };
    if let Err(err) = ping(&url) {
        panic!("the Valkey server {url} (from {VAR}) does not answer: {err}\n{NAMED_SERVER_DOWN}");
    }
    url
}

/// Runs `redis-cli -c -h H -p P <args>` against the first of `nodes` (as
/// `cluster_nodes` returns them) and returns what it printed; panics with
/// its stderr when it fails. For tests that reshard (`--cluster reshard
/// H:P ...`, `CLUSTER SETSLOT ...`).
pub fn cluster_cli(nodes: &[String], args: &[&str]) -> String {
    let first = nodes.first().expect("cluster_cli needs at least one node");
    let url = url::Url::parse(first)
        .unwrap_or_else(|err| panic!("cluster node {first:?} is not a URL: {err}"));
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port().unwrap_or(6379).to_string();
    let output = Command::new("redis-cli")
        .args(["-c", "-h", &host, "-p", &port])
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run redis-cli (apt-get install redis-tools): {err}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && !text.starts_with("ERR"),
        "redis-cli -c -h {host} -p {port} {args:?} failed ({}): {text}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// Runs `redis-cli -h H -p P <args>` against the server at `url` and returns
/// what it printed; panics with its stderr when it fails.
#[allow(dead_code)]
pub fn redis_cli_at(url: &str, args: &[&str]) -> String {
    let parsed =
        url::Url::parse(url).unwrap_or_else(|err| panic!("{url:?} is not a Redis URL: {err}"));
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = parsed.port().unwrap_or(6379).to_string();
    let output = Command::new("redis-cli")
        .args(["-h", &host, "-p", &port])
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run redis-cli (apt-get install redis-tools): {err}"));
    assert!(
        output.status.success(),
        "redis-cli -h {host} -p {port} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A store on the 3-master Redis Cluster (see [`cluster_nodes`]).
#[allow(dead_code)]
pub async fn cluster_store() -> RedisStore {
    let nodes = cluster_nodes();
    let config = amqp_idempotency::Config::default().with_redis_cluster_nodes(nodes.clone());
    RedisStore::connect(&config)
        .await
        .unwrap_or_else(|err| panic!("connect to the Redis Cluster at {nodes:?}: {err}"))
}

/// A store on Valkey 8.1 (see [`valkey_url`]).
#[allow(dead_code)]
pub async fn valkey_store() -> RedisStore {
    let url = valkey_url();
    RedisStore::connect_url(&url)
        .await
        .unwrap_or_else(|err| panic!("connect to Valkey at {url}: {err}"))
}

// ---------------------------------------------------------------------------
// Redis Sentinel: a master, one replica and three sentinels on free ports,
// without persistence (a killed master loses what it had not replicated).

/// One redis-server (or sentinel) process, killed on drop.
pub struct RedisProcess {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
    dir: std::path::PathBuf,
}

impl RedisProcess {
    /// A data server with `extra` arguments (`--replicaof ...`).
    pub fn server(extra: &[String]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("redis-node"));
        std::fs::create_dir_all(&dir).expect("create a redis dir");
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--port"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(port.to_string());
        args.extend(
            [
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
            ]
            .map(String::from),
        );
        args.push(dir.display().to_string());
        args.push("--logfile".into());
        args.push(dir.join("redis.log").display().to_string());
        args.extend_from_slice(extra);
        let mut this = Self {
            port,
            args,
            child: None,
            dir,
        };
        this.spawn();
        this
    }

    /// A sentinel watching `master` on `master_port`. Its down-after is 3s:
    /// with 1s, the fault suite's sentinels once failed over a master nobody
    /// killed on this 2-core machine (a PING answered late), which would
    /// lose a done mark these tests look for.
    pub fn sentinel(master: &str, master_port: u16) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("sentinel"));
        std::fs::create_dir_all(&dir).expect("create a sentinel dir");
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {master} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {master} 3000\n\
                 sentinel failover-timeout {master} 3000\n\
                 sentinel parallel-syncs {master} 1\n",
                dir.display()
            ),
        )
        .expect("write sentinel.conf");
        let mut this = Self {
            port,
            args: vec![conf.display().to_string(), "--sentinel".into()],
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
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start redis-server (apt-get install redis-server): {err}")
            });
        self.child = Some(child);
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server {:?} did not start", self.args);
    }

    /// A data server that writes every change to its append-only file, so
    /// that a restart keeps what was acknowledged.
    pub fn start() -> Self {
        Self::server(&["--appendonly", "yes", "--appendfsync", "always"].map(String::from))
    }

    /// Stops it (SIGKILL); [`restart`](Self::restart) brings it back.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// The last `lines` lines of a data server's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let path = self.dir.join("redis.log");
        match std::fs::read_to_string(&path) {
            Ok(log) => {
                let all: Vec<&str> = log.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(err) => format!("({}: {err})", path.display()),
        }
    }

    /// SIGKILL: no shutdown, nothing saved.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`resume` sends SIGCONT): a replica that stays connected
    /// but acknowledges nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the process runs").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts the process again on its port with its arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A master, a replica and three sentinels that agree on them.
pub struct SentinelGroup {
    pub name: String,
    /// The two data servers; which one is master changes with failovers.
    pub nodes: Vec<RedisProcess>,
    pub sentinels: Vec<RedisProcess>,
}

impl SentinelGroup {
    pub fn start() -> Self {
        let name = unique("master").replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let master = RedisProcess::server(&[]);
        let replica = RedisProcess::server(&[
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port.to_string(),
        ]);
        let sentinels = (0..3)
            .map(|_| RedisProcess::sentinel(&name, master.port))
            .collect();
        let group = Self {
            name,
            nodes: vec![master, replica],
            sentinels,
        };
        group.wait_until_ready(Duration::from_secs(30));
        group
    }

    /// `redis-sentinel://` URL of the three sentinels.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis-sentinel://{}#{}", hosts.join(","), self.name)
    }

    /// The master's port, as the first sentinel that answers says.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|sentinel| {
            let out = redis_cli_at(
                &sentinel.url(),
                &["SENTINEL", "get-master-addr-by-name", &self.name],
            );
            out.lines().nth(1).and_then(|port| port.trim().parse().ok())
        })
    }

    /// The data server that is master now.
    pub fn master(&mut self) -> &mut RedisProcess {
        let port = self.master_port().expect("the sentinels name a master");
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("the master is one of ours")
    }

    /// Waits until the master has its replica and every sentinel sees a
    /// quorum able to fail over; panics after `limit`.
    pub fn wait_until_ready(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let ready = self.master_port().is_some_and(|port| {
                let info = redis_cli_at(
                    &format!("redis://127.0.0.1:{port}"),
                    &["INFO", "replication"],
                );
                info.contains("connected_slaves:1")
                    && info.contains("state=online")
                    && self.sentinels.iter().all(|sentinel| {
                        redis_cli_at(&sentinel.url(), &["SENTINEL", "ckquorum", &self.name])
                            .starts_with("OK 3")
                    })
            });
            if ready {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sentinel group did not get ready within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the sentinels name a master other than `old`; panics after `limit`.
    pub fn wait_for_new_master(&self, old: u16, limit: Duration) -> u16 {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(port) = self.master_port().filter(|port| *port != old) {
                return port;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sentinels did not promote the replica within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
