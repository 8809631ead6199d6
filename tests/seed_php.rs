//! The seed's own publisher against our demo: php-amqplib's unchanged
//! `amqp_publisher.php` (Debian's `php-amqplib` ships it under its
//! examples) shares the queue `msgs` with `examples/basic_nack.rs`, in
//! either start order. Each run gets a virtual host of its own, so the
//! seed's fixed names (`router`, `msgs`) never meet anything else.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};

const PUBLISHER: &str = "/usr/share/doc/php-amqplib/examples/amqp_publisher.php";

/// A virtual host for one run, deleted on drop.
struct Vhost(String);

impl Vhost {
    fn new() -> Self {
        let name = common::unique("seed");
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self(name)
    }

    fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!("this test needs rabbitmqctl (the RabbitMQ server's CLI) on the PATH: {err}")
        });
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The seed's publisher, unchanged, beside a `config.php` for this broker.
fn publisher_dir(vhost: &Vhost) -> PathBuf {
    assert!(
        Path::new(PUBLISHER).exists(),
        "this test runs the seed's publisher: apt-get install php-cli php-amqplib ({PUBLISHER} is missing)"
    );
    let dir = std::env::temp_dir().join(common::unique("php"));
    std::fs::create_dir_all(&dir).expect("create a directory for the PHP publisher");
    std::fs::copy(PUBLISHER, dir.join("amqp_publisher.php")).expect("copy amqp_publisher.php");
    let config = format!(
        "<?php\nrequire_once 'PhpAmqpLib/autoload.php';\n\
         define('HOST', '127.0.0.1');\ndefine('PORT', 5672);\ndefine('USER', 'guest');\n\
         define('PASS', 'guest');\ndefine('VHOST', '{}');\n",
        vhost.0
    );
    std::fs::write(dir.join("config.php"), config).expect("write config.php");
    dir
}

fn php_publish(dir: &Path, body: &str) {
    let output = Command::new("php")
        .arg("amqp_publisher.php")
        .arg(body)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|err| {
            panic!("this test needs php on the PATH (apt-get install php-cli): {err}")
        });
    assert!(
        output.status.success(),
        "php amqp_publisher.php {body} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `examples/basic_nack`, as `cargo test` builds it.
fn basic_nack(vhost: &Vhost, prefix: &str) -> (Child, mpsc::Receiver<String>) {
    let exe = std::env::current_exe().expect("the test's own path");
    let examples = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("examples").join("basic_nack"))
        .expect("target/<profile>/examples");
    assert!(
        examples.exists(),
        "{} is missing: run the tests with `cargo test`, which builds the examples",
        examples.display()
    );
    let mut child = Command::new(examples)
        .env("AMQP_URL", vhost.amqp_url())
        .env("REDIS_URL", common::redis_url())
        .env("IDEMPOTENCY_KEY_PREFIX", prefix)
        .env("IDEMPOTENCY_MAX_ATTEMPTS", "3")
        .env("IDEMPOTENCY_RETRY_BACKOFF", "20ms")
        .env("IDEMPOTENCY_RETRY_BACKOFF_MAX", "50ms")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start basic_nack");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    (child, received)
}

/// Collects lines until one contains `needle`; panics after `limit`.
fn wait_for(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.iter().any(|line| line.contains(needle)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "basic_nack never printed `{needle}`; it printed:\n{}",
                seen.join("\n")
            ),
        }
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait for basic_nack") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("basic_nack did not stop after `quit`");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn check_queues(vhost: &Vhost) {
    let connection = Connection::connect(&vhost.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect to the test's virtual host");
    let channel = connection.create_channel().await.expect("a channel");
    assert_eq!(
        common::ready_count(&channel, "msgs").await,
        0,
        "nothing left in msgs"
    );
    let parked = channel
        .basic_get("msgs.dead".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("read msgs.dead")
        .expect("the failing body is parked in msgs.dead");
    assert_eq!(parked.delivery.data, b"bad");
    let headers = parked
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let header = |name: &str| {
        headers
            .inner()
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.clone())
    };
    assert!(
        matches!(header("x-idempotency-outcome"), Some(AMQPValue::LongString(s)) if s.as_bytes() == b"attempts_exhausted"),
        "reason headers: {headers:?}"
    );
    assert!(header("x-idempotency-reason").is_some(), "{headers:?}");
    let more = channel
        .basic_get("msgs.dead".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("read msgs.dead");
    assert!(more.is_none(), "only the failing body is parked");
}

fn assert_ran_once(seen: &[String]) {
    let runs = seen
        .iter()
        .filter(|line| line.contains("handler: processing \"good\""))
        .count();
    assert_eq!(runs, 1, "the doubled `good` ran once:\n{}", seen.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_php_publisher_and_basic_nack_share_msgs_in_either_order() {
    // The PHP publisher first: it declares `msgs` (durable, no arguments).
    {
        let vhost = Vhost::new();
        let dir = publisher_dir(&vhost);
        php_publish(&dir, "good");
        php_publish(&dir, "good");
        let (mut child, lines) = basic_nack(&vhost, &common::unique("php-first"));
        let mut seen = Vec::new();
        wait_for(&lines, &mut seen, "waiting for messages");
        php_publish(&dir, "bad");
        wait_for(&lines, &mut seen, "parked in msgs.dead");
        php_publish(&dir, "quit");
        let status = wait_exit(&mut child);
        seen.extend(lines.try_iter());
        assert!(
            status.success(),
            "quit stops it cleanly: {status}\n{}",
            seen.join("\n")
        );
        assert_ran_once(&seen);
        check_queues(&vhost).await;
        let _ = std::fs::remove_dir_all(dir);
    }
    // basic_nack first: the publisher's declaration must match its own.
    {
        let vhost = Vhost::new();
        let dir = publisher_dir(&vhost);
        let (mut child, lines) = basic_nack(&vhost, &common::unique("rust-first"));
        let mut seen = Vec::new();
        wait_for(&lines, &mut seen, "waiting for messages");
        php_publish(&dir, "good");
        php_publish(&dir, "good");
        php_publish(&dir, "bad");
        wait_for(&lines, &mut seen, "parked in msgs.dead");
        php_publish(&dir, "quit");
        let status = wait_exit(&mut child);
        seen.extend(lines.try_iter());
        assert!(
            status.success(),
            "quit stops it cleanly: {status}\n{}",
            seen.join("\n")
        );
        assert_ran_once(&seen);
        check_queues(&vhost).await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
