//! Runs the `amqp-idempotency` binary against the real Redis at `REDIS_URL`
//! (default `redis://127.0.0.1:6379`). Each test writes its records under a
//! key prefix of its own and deletes them when it ends. The last tests
//! run it against a TLS-only Redis and against the Redis Cluster of
//! `TEST_REDIS_CLUSTER_NODES` (or the one the tests start, see `common::cluster_nodes`).

mod common;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use amqp_idempotency::Config;
use amqp_idempotency::fingerprint::record_key;
use amqp_idempotency::store::{ClaimOutcome, RedisStore, Token, machine};
use common::{Pki, TlsRedis};

const BIN: &str = env!("CARGO_BIN_EXE_amqp-idempotency");

fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into())
}

/// A connection to the shared Redis; fails the test (never skips it) when
/// Redis is not there.
fn connection() -> redis::Connection {
    let url = redis_url();
    let client = redis::Client::open(url.as_str())
        .unwrap_or_else(|err| panic!("REDIS_URL `{url}` is not a valid Redis URL: {err}"));
    client
        .get_connection_with_timeout(Duration::from_secs(3))
        .unwrap_or_else(|err| {
            panic!(
                "these tests need Redis at {url} (set REDIS_URL to use another): {err}\n\
                 start it with: redis-server --daemonize yes --port 6379"
            )
        })
}

/// A key prefix no other test (or earlier run) uses; its keys are deleted on drop.
struct Space {
    prefix: String,
    redis: redis::Connection,
}

impl Space {
    fn new(label: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Self {
            prefix: format!(
                "cli-{label}-{}-{}-{nanos:x}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
            redis: connection(),
        }
    }

    fn key(&self, scope: &str, fingerprint: &str) -> String {
        format!("{}:{scope}:{fingerprint}", self.prefix)
    }

    /// Writes `value` at `key`, expiring after `ttl_ms` if given.
    fn set(&mut self, key: &str, value: &str, ttl_ms: Option<u64>) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ms) = ttl_ms {
            cmd.arg("PX").arg(ms);
        }
        cmd.query::<()>(&mut self.redis)
            .unwrap_or_else(|err| panic!("SET {key}: {err}"));
    }

    fn exists(&mut self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query::<i64>(&mut self.redis)
            .unwrap_or_else(|err| panic!("EXISTS {key}: {err}"))
            == 1
    }

    /// Runs the binary with `--prefix <this prefix>` and `args`.
    fn cli(&self, args: &[&str]) -> Run {
        let mut all = vec!["--prefix", self.prefix.as_str()];
        all.extend_from_slice(args);
        cli(&all, &[])
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        let pattern = format!("{}:*", self.prefix);
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query::<(u64, Vec<String>)>(&mut self.redis)
            else {
                return;
            };
            if !keys.is_empty() {
                let _ = redis::cmd("DEL").arg(&keys).query::<i64>(&mut self.redis);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

/// The outcome of one run of the binary.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The value of a `name: value` line of the output.
    fn field(&self, name: &str) -> Option<String> {
        let label = format!("{name}:");
        self.stdout.lines().find_map(|line| {
            line.strip_prefix(&label)
                .map(|value| value.trim().to_owned())
        })
    }

    /// The count of a `name  N` line of `stats`.
    fn count(&self, name: &str) -> u64 {
        self.stdout
            .lines()
            .find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some(name))
                    .then(|| words.next().and_then(|n| n.parse().ok()))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no `{name}` count in:\n{}", self.stdout))
    }
}

/// Runs the binary with `args` and `env`, Redis at `REDIS_URL`, and no
/// prefix or scope from the environment unless `env` sets them.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("REDIS_URL", redis_url())
        .env_remove("IDEMPOTENCY_KEY_PREFIX")
        .env_remove("IDEMPOTENCY_SCOPE");
    for (name, value) in env {
        command.env(name, value);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {BIN}: {err}"));
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Seconds of a `time to live` value below one minute, such as `29.871s`.
fn seconds(ttl: &str) -> f64 {
    ttl.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("`{ttl}` is not a time to live in seconds"))
}

#[test]
fn help_explains_every_command() {
    for args in [&["--help"][..], &["help"], &["-h"], &["inspect", "--help"]] {
        let run = cli(args, &[]);
        assert_eq!(run.code, Some(0), "{args:?}: {run:?}");
        for text in [
            "inspect <FINGERPRINT|KEY>",
            "forget <FINGERPRINT|KEY> --yes",
            "stats",
            "--redis-url",
            "--prefix",
            "--scope",
            "REDIS_URL",
            "IDEMPOTENCY_KEY_PREFIX",
            "IDEMPOTENCY_SCOPE",
            "<prefix>:<scope>:<fingerprint>",
            "SCAN",
            "EXIT STATUS",
        ] {
            assert!(
                run.stdout.contains(text),
                "{args:?}: no `{text}` in:\n{}",
                run.stdout
            );
        }
    }
    let run = cli(&[], &[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("inspect <FINGERPRINT|KEY>"), "{run:?}");
    assert!(run.stderr.contains("no command given"), "{run:?}");
}

#[test]
fn inspect_shows_an_in_progress_claim() {
    let mut space = Space::new("inprogress");
    let key = space.key("orders", "42");
    space.set(&key, "p:0123456789abcdef:2:c0ffee", Some(30_000));
    let run = space.cli(&["inspect", &key]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.field("key").as_deref(), Some(key.as_str()));
    assert_eq!(run.field("state").as_deref(), Some("in progress"));
    assert_eq!(
        run.field("owner token").as_deref(),
        Some("0123456789abcdef")
    );
    assert_eq!(run.field("attempt").as_deref(), Some("2"));
    assert_eq!(run.field("payload hash").as_deref(), Some("c0ffee"));
    let ttl = seconds(&run.field("time to live").unwrap_or_default());
    assert!((20.0..=30.0).contains(&ttl), "{run:?}");
}

#[test]
fn inspect_shows_a_done_mark() {
    let mut space = Space::new("done");
    let key = space.key("orders", "43");
    space.set(&key, "d:beef", Some(2 * 3_600_000));
    let run = space.cli(&["inspect", &key]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.field("state").as_deref(), Some("done"));
    assert_eq!(run.field("payload hash").as_deref(), Some("beef"));
    assert_eq!(run.field("owner token"), None, "{run:?}");
    let ttl = run.field("time to live").unwrap_or_default();
    assert!(ttl.starts_with("1h 59m") || ttl == "2h", "{run:?}");

    // A record written without payload check.
    let unchecked = space.key("orders", "44");
    space.set(&unchecked, "d:", Some(60_000));
    let run = space.cli(&["inspect", &unchecked]);
    assert_eq!(run.field("state").as_deref(), Some("done"));
    assert!(
        run.field("payload hash")
            .unwrap_or_default()
            .contains("not checked"),
        "{run:?}"
    );
}

#[test]
fn inspect_shows_a_released_record_with_its_attempts() {
    let mut space = Space::new("released");
    let key = space.key("orders", "45");
    space.set(&key, "f:3:abc123", Some(60_000));
    let run = space.cli(&["inspect", &key]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.field("state").as_deref(),
        Some("released after 3 failed attempts")
    );
    assert_eq!(run.field("payload hash").as_deref(), Some("abc123"));

    let once = space.key("orders", "46");
    space.set(&once, "f:1:abc123", Some(60_000));
    let run = space.cli(&["inspect", &once]);
    assert_eq!(
        run.field("state").as_deref(),
        Some("released after 1 failed attempt")
    );
}

#[test]
fn inspect_of_an_absent_key_exits_1() {
    let space = Space::new("absent");
    let key = space.key("orders", "nothing-here");
    let run = space.cli(&["inspect", &key]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.field("state").as_deref(), Some("absent"));
    assert!(run.stderr.contains("no such key"), "{run:?}");
    assert!(run.stderr.contains(&key), "{run:?}");
}

#[test]
fn inspect_reports_foreign_values_without_parsing_them() {
    let mut space = Space::new("foreign");
    for (fingerprint, value) in [
        ("plain", "hello"),
        ("no-attempt", "p:tok"),
        ("bad-attempt", "p:tok:two:hash"),
        ("done-extra", "d:x:y:z"),
        ("empty", ""),
    ] {
        let key = space.key("orders", fingerprint);
        space.set(&key, value, None);
        let run = space.cli(&["inspect", &key]);
        assert_eq!(run.code, Some(0), "{value}: {run:?}");
        let state = run.field("state").unwrap_or_default();
        assert!(state.starts_with("unrecognized"), "{value}: {run:?}");
        assert!(state.contains("not written by amqp-idempotency"), "{run:?}");
        assert_eq!(
            run.field("value").as_deref(),
            Some(format!("\"{value}\"").as_str())
        );
        assert_eq!(run.field("owner token"), None, "{run:?}");
        assert_eq!(run.field("payload hash"), None, "{run:?}");
        assert!(
            run.field("time to live")
                .unwrap_or_default()
                .contains("never expires"),
            "{run:?}"
        );
    }

    let hash = space.key("orders", "a-hash");
    redis::cmd("HSET")
        .arg(&hash)
        .arg("field")
        .arg("value")
        .query::<()>(&mut space.redis)
        .unwrap_or_else(|err| panic!("HSET: {err}"));
    let run = space.cli(&["inspect", &hash]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.field("state")
            .unwrap_or_default()
            .contains("unrecognized: a Redis hash"),
        "{run:?}"
    );

    let long = space.key("orders", "long");
    space.set(&long, &format!("d:{}", "x".repeat(10_000)), Some(60_000));
    let run = space.cli(&["inspect", &long]);
    assert!(
        run.field("state")
            .unwrap_or_default()
            .starts_with("unrecognized"),
        "{run:?}"
    );
    assert!(
        run.field("value")
            .unwrap_or_default()
            .contains("10002 bytes"),
        "{run:?}"
    );
}

#[test]
fn a_fingerprint_is_completed_with_prefix_and_scope() {
    let mut space = Space::new("fingerprint");
    let key = space.key("billing", "order-7");
    space.set(&key, "d:h", Some(60_000));

    // Without a scope, a bare fingerprint is a usage error that says what to pass.
    let run = space.cli(&["inspect", "order-7"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("--scope"), "{run:?}");
    assert!(run.stderr.contains("IDEMPOTENCY_SCOPE"), "{run:?}");

    let run = space.cli(&["--scope", "billing", "inspect", "order-7"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.field("key").as_deref(), Some(key.as_str()));
    assert_eq!(run.field("state").as_deref(), Some("done"));

    // Scope and prefix from the environment, options after the command.
    let run = cli(
        &["inspect", "order-7"],
        &[
            ("IDEMPOTENCY_SCOPE", "billing"),
            ("IDEMPOTENCY_KEY_PREFIX", &space.prefix),
        ],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.field("key").as_deref(), Some(key.as_str()));

    // --key and --fingerprint override the guess.
    let run = space.cli(&["inspect", "--scope=billing", "--key", "order-7"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.field("key").as_deref(), Some("order-7"));
    let odd = space.key("billing", &format!("{}:x", space.prefix));
    space.set(&odd, "d:h", Some(60_000));
    let as_fingerprint = format!("{}:x", space.prefix);
    let run = space.cli(&[
        "inspect",
        "--scope",
        "billing",
        "--fingerprint",
        &as_fingerprint,
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.field("key").as_deref(), Some(odd.as_str()));
}

#[test]
fn forget_refuses_without_yes_then_deletes() {
    let mut space = Space::new("forget");
    let key = space.key("orders", "47");
    space.set(&key, "d:cafe", Some(60_000));

    let run = space.cli(&["forget", &key]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.contains("would delete"), "{run:?}");
    assert_eq!(run.field("key").as_deref(), Some(key.as_str()));
    assert_eq!(run.field("state").as_deref(), Some("done"));
    assert!(run.stderr.contains("refusing"), "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("amqp-idempotency forget {key} --yes")),
        "{run:?}"
    );
    assert!(space.exists(&key), "refused forget must not delete");

    let run = space.cli(&["forget", &key, "--yes"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("deleted"), "{run:?}");
    assert_eq!(run.field("state").as_deref(), Some("done"));
    assert!(!space.exists(&key), "forget --yes must delete");

    // An in-progress record is deleted with a warning.
    let claimed = space.key("orders", "48");
    space.set(&claimed, "p:tok:1:", Some(30_000));
    let run = space.cli(&["forget", "-y", &claimed]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("warning"), "{run:?}");
    assert!(!space.exists(&claimed));
}

#[test]
fn forget_of_a_missing_key_exits_1() {
    let space = Space::new("forget-missing");
    let key = space.key("orders", "49");
    for args in [&["forget", key.as_str(), "--yes"][..], &["forget", &key]] {
        let run = space.cli(args);
        assert_eq!(run.code, Some(1), "{run:?}");
        assert!(run.stderr.contains("no such key"), "{run:?}");
        assert!(run.stderr.contains(&key), "{run:?}");
    }
}

#[test]
fn stats_counts_records_per_state() {
    let mut space = Space::new("stats");
    let records = [
        ("orders", "1", "p:a:1:h"),
        ("orders", "2", "p:b:3:"),
        ("orders", "3", "d:h"),
        ("orders", "4", "d:"),
        ("orders", "5", "d:h2"),
        ("orders", "6", "f:2:h"),
        ("orders", "7", "junk"),
        ("billing", "1", "d:h"),
        ("billing", "2", "f:1:"),
    ];
    for (scope, fingerprint, value) in records {
        let key = space.key(scope, fingerprint);
        space.set(&key, value, Some(60_000));
    }
    let set_key = space.key("billing", "a-set");
    redis::cmd("SADD")
        .arg(&set_key)
        .arg("member")
        .query::<()>(&mut space.redis)
        .unwrap_or_else(|err| panic!("SADD: {err}"));

    let run = space.cli(&["stats"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.count("in_progress"), 2, "{run:?}");
    assert_eq!(run.count("done"), 4, "{run:?}");
    assert_eq!(run.count("released"), 2, "{run:?}");
    assert_eq!(run.count("unrecognized"), 2, "{run:?}");
    assert_eq!(run.count("total"), 10, "{run:?}");

    let run = space.cli(&["stats", "--scope", "orders"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.count("in_progress"), 2, "{run:?}");
    assert_eq!(run.count("done"), 3, "{run:?}");
    assert_eq!(run.count("released"), 1, "{run:?}");
    assert_eq!(run.count("unrecognized"), 1, "{run:?}");
    assert_eq!(run.count("total"), 7, "{run:?}");

    // An empty prefix counts nothing.
    let empty = Space::new("stats-empty");
    let run = empty.cli(&["stats"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.count("total"), 0, "{run:?}");
}

#[test]
fn stats_pages_through_every_scan_batch() {
    let mut space = Space::new("stats-many");
    let mut pipe = redis::pipe();
    for n in 0..2500 {
        pipe.cmd("SET")
            .arg(space.key("bulk", &n.to_string()))
            .arg(if n % 5 == 0 { "f:1:" } else { "d:" })
            .arg("PX")
            .arg(120_000)
            .ignore();
    }
    pipe.query::<()>(&mut space.redis)
        .unwrap_or_else(|err| panic!("pipeline: {err}"));
    let run = space.cli(&["stats"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.count("done"), 2000, "{run:?}");
    assert_eq!(run.count("released"), 500, "{run:?}");
    assert_eq!(run.count("total"), 2500, "{run:?}");
}

#[test]
fn stats_matches_the_scope_literally() {
    let mut space = Space::new("stats-glob");
    space.set(&space.key("a*", "1"), "d:", Some(60_000));
    space.set(&space.key("ab", "1"), "d:", Some(60_000));
    space.set(&space.key("ab", "2"), "d:", Some(60_000));
    let run = space.cli(&["stats", "--scope", "a*"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.count("total"), 1, "{run:?}");
    let run = space.cli(&["stats", "--scope", "a?"]);
    assert_eq!(run.count("total"), 0, "{run:?}");
}

#[test]
fn stats_escapes_the_scope_as_keys_do() {
    // The library writes scope `a:b` as `a%3Ab`, so that it cannot collide
    // with scope `a`; stats must look where inspect and the layer look.
    let mut space = Space::new("stats-colon");
    let key = amqp_idempotency::fingerprint::record_key(&space.prefix, "a:b", "7");
    space.set(&key, "d:", Some(60_000));
    let other = amqp_idempotency::fingerprint::record_key(&space.prefix, "a", "b:7");
    space.set(&other, "f:1::", Some(60_000));
    let run = space.cli(&["--scope", "a:b", "inspect", "7"]);
    assert_eq!(run.code, Some(0), "inspect finds it: {run:?}");
    let run = space.cli(&["stats", "--scope", "a:b"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.count("done"), 1, "{run:?}");
    assert_eq!(
        run.count("released"),
        0,
        "scope `a` is not counted: {run:?}"
    );
    assert_eq!(run.count("total"), 1, "{run:?}");
}

#[test]
fn stats_does_not_count_the_write_probe() {
    // A paused consumer proves Redis takes writes again with a probe key
    // under its scope; it is not a record.
    let mut space = Space::new("stats-probe");
    space.set(&space.key("orders", "1"), "d:", Some(60_000));
    let probe = format!("{}:orders:\u{0}probe", space.prefix);
    space.set(&probe, "probe", Some(60_000));
    let run = space.cli(&["stats", "--scope", "orders"]);
    assert_eq!(run.count("total"), 1, "{run:?}");
    assert_eq!(run.count("unrecognized"), 0, "{run:?}");
}

#[test]
fn a_malformed_url_is_a_usage_error_that_shows_the_expected_form() {
    let run = cli(&["--redis-url", "not a url", "stats"], &[]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("not a valid Redis URL"), "{run:?}");
    assert!(run.stderr.contains("--redis-url"), "{run:?}");
    assert!(run.stderr.contains("redis://"), "{run:?}");

    let run = cli(&["inspect", "idem:orders:1"], &[("REDIS_URL", "http://x")]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("from REDIS_URL") && run.stderr.contains("`http://x`"),
        "{run:?}"
    );
}

#[test]
fn unreachable_redis_exits_3_and_says_how_to_start_it() {
    let url = "redis://127.0.0.1:1";
    for args in [
        &["--redis-url", url, "stats"][..],
        &["--redis-url", url, "inspect", "idem:orders:1"],
        &["--redis-url", url, "forget", "idem:orders:1", "--yes"],
    ] {
        let run = cli(args, &[]);
        assert_eq!(run.code, Some(3), "{args:?}: {run:?}");
        assert!(
            run.stderr
                .contains("cannot reach Redis at redis://127.0.0.1:1"),
            "{run:?}"
        );
        assert!(
            run.stderr
                .contains("redis-server --daemonize yes --port 6379"),
            "{run:?}"
        );
    }
    // REDIS_URL is used when --redis-url is absent, and passwords are not shown.
    let run = cli(
        &["stats"],
        &[("REDIS_URL", "redis://user:s3cret@127.0.0.1:1/0")],
    );
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stderr.contains("redis://user:***@127.0.0.1:1/0"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("s3cret"), "{run:?}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["frobnicate"][..],
        &["stats", "--verbose"],
        &["inspect"],
        &["inspect", "a", "b"],
        &["inspect", "idem:o:1", "--yes"],
        &["stats", "extra"],
        &["stats", "--redis-url"],
        &["--prefix", "has space", "stats"],
        &["--key", "--fingerprint", "inspect", "x"],
    ] {
        let run = cli(args, &[]);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.starts_with("error: "), "{args:?}: {run:?}");
        assert!(run.stderr.contains("--help"), "{args:?}: {run:?}");
    }
}

#[test]
fn a_fingerprint_maps_to_the_key_the_library_uses() {
    use amqp_idempotency::store::MemoryStore;
    use amqp_idempotency::{Config, Deduplicator};
    use lapin::BasicProperties;
    use lapin::message::Delivery;

    let space = Space::new("same-key");
    let dedup = Deduplicator::new(
        MemoryStore::new(),
        "orders",
        Config::default().with_key_prefix(space.prefix.clone()),
    )
    .unwrap_or_else(|err| panic!("deduplicator: {err}"));
    // Verbatim, too long (hashed) and with a control character (hashed).
    for id in ["m-1".to_owned(), "x".repeat(250), "a\u{7}b".to_owned()] {
        let mut delivery = Delivery::mock(1, "".into(), "orders".into(), false, b"x".to_vec());
        delivery.properties = BasicProperties::default().with_message_id(id.clone().into());
        let fingerprint = dedup
            .fingerprint(&delivery)
            .unwrap_or_else(|| panic!("no fingerprint for {id:?}"));
        let expected = dedup.key(&fingerprint);
        let run = space.cli(&["--scope", "orders", "inspect", "--", &id]);
        assert_eq!(run.code, Some(1), "{id:?}: {run:?}");
        assert_eq!(run.field("key"), Some(expected), "{id:?}: {run:?}");
    }
}

// The CLI reaches Redis as the library does, from the same variables: a
// TLS-only redis-server with a private CA (`REDIS_URL=rediss://...`,
// `REDIS_TLS_CA_FILE`), and the Redis Cluster of `common::cluster_nodes`
// (`REDIS_CLUSTER_NODES`), whose masters each hold some of the records.
// Records are written through `RedisStore` with the same settings.

const LEASE: Duration = Duration::from_secs(60);
const RETENTION: Duration = Duration::from_secs(300);

/// Writes, under `prefix` and scope `orders`, `done` done records,
/// `in_progress` claims and `released` released records (fingerprints
/// `d0..`, `p0..`, `r0..`); returns the keys of the done records.
async fn write_records(
    store: &RedisStore,
    prefix: &str,
    done: usize,
    in_progress: usize,
    released: usize,
) -> Vec<String> {
    let mut done_keys = Vec::new();
    let plan = [("d", done), ("p", in_progress), ("r", released)];
    for (kind, n) in plan {
        for i in 0..n {
            let key = record_key(prefix, "orders", &format!("{kind}{i}"));
            let ClaimOutcome::Acquired(claim) =
                machine::claim(store, &key, &Token::new(), "h", LEASE)
                    .await
                    .unwrap_or_else(|err| panic!("claim {key}: {err}"))
            else {
                panic!("{key} is fresh, so the claim is ours");
            };
            match kind {
                "d" => {
                    assert!(
                        machine::complete(store, &claim, RETENTION)
                            .await
                            .expect("complete")
                    );
                    done_keys.push(key);
                }
                "r" => assert!(
                    machine::release(store, &claim, RETENTION)
                        .await
                        .expect("release")
                ),
                _ => {}
            }
        }
    }
    done_keys
}

fn path(p: std::path::PathBuf) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn stats_and_inspect_reach_a_tls_only_redis_with_a_private_ca() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, pki.server(), false);
    let (url, ca) = (redis.url(), path(pki.ca()));
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_TLS_CA_FILE", ca.as_str()),
    ];
    let config =
        Config::from_vars(env).unwrap_or_else(|err| panic!("the TLS settings are accepted: {err}"));
    let store = RedisStore::connect(&config)
        .await
        .unwrap_or_else(|err| panic!("the store connects over TLS: {err}"));
    let prefix = common::unique("clitls");
    let done = write_records(&store, &prefix, 2, 1, 1).await;

    let stats = cli(&["--prefix", &prefix, "stats"], &env);
    assert_eq!(stats.code, Some(0), "{stats:?}");
    assert_eq!(stats.count("done"), 2, "{stats:?}");
    assert_eq!(stats.count("in_progress"), 1, "{stats:?}");
    assert_eq!(stats.count("released"), 1, "{stats:?}");
    assert_eq!(stats.count("total"), 4, "{stats:?}");

    let inspect = cli(&["--prefix", &prefix, "inspect", &done[0]], &env);
    assert_eq!(inspect.code, Some(0), "{inspect:?}");
    assert!(inspect.stdout.contains("state:"), "{inspect:?}");
    assert!(inspect.stdout.contains("done"), "{inspect:?}");

    // A fingerprint with the scope from the environment, as consumers set it.
    let mut scoped = env.to_vec();
    scoped.push(("IDEMPOTENCY_KEY_PREFIX", prefix.as_str()));
    scoped.push(("IDEMPOTENCY_SCOPE", "orders"));
    let by_fingerprint = cli(&["inspect", "p0"], &scoped);
    assert_eq!(by_fingerprint.code, Some(0), "{by_fingerprint:?}");
    assert!(
        by_fingerprint.stdout.contains("in progress"),
        "{by_fingerprint:?}"
    );

    // Without the CA the server's certificate is not trusted: a Redis
    // error (exit 3) that names the URL and the variable to set.
    let untrusted = cli(&["--prefix", &prefix, "stats"], &env[..1]);
    assert_eq!(untrusted.code, Some(3), "{untrusted:?}");
    assert!(untrusted.stderr.contains(&redis.url()), "{untrusted:?}");
    assert!(
        untrusted.stderr.contains("REDIS_TLS_CA_FILE"),
        "{untrusted:?}"
    );
}

#[tokio::test]
async fn stats_inspect_and_forget_reach_every_master_of_a_cluster() {
    let nodes = common::cluster_nodes();
    // REDIS_URL blank: unset, as the library reads it.
    let joined = nodes.join(",");
    let env = [("REDIS_URL", ""), ("REDIS_CLUSTER_NODES", joined.as_str())];
    let config = Config::default().with_redis_cluster_nodes(nodes.iter().cloned());
    let store = RedisStore::connect(&config)
        .await
        .unwrap_or_else(|err| panic!("the store connects to the cluster: {err}"));
    let prefix = common::unique("clicluster");
    // 30 done records: their keys spread over the three masters' slots, so
    // a count from one master alone falls short.
    let done = write_records(&store, &prefix, 30, 2, 1).await;
    let stats = cli(&["--prefix", &prefix, "stats"], &env);
    assert_eq!(stats.code, Some(0), "{stats:?}");
    assert_eq!(stats.count("done"), 30, "{stats:?}");
    assert_eq!(stats.count("in_progress"), 2, "{stats:?}");
    assert_eq!(stats.count("released"), 1, "{stats:?}");
    assert_eq!(stats.count("total"), 33, "{stats:?}");

    // Every done record is found on the master that serves its slot.
    for key in &done[..5] {
        let inspect = cli(&["--prefix", &prefix, "inspect", key], &env);
        assert_eq!(inspect.code, Some(0), "{key}: {inspect:?}");
        assert!(inspect.stdout.contains("done"), "{key}: {inspect:?}");
    }

    let forget = cli(&["--prefix", &prefix, "forget", &done[0], "--yes"], &env);
    assert_eq!(forget.code, Some(0), "{forget:?}");
    let gone = cli(&["--prefix", &prefix, "inspect", &done[0]], &env);
    assert_eq!(gone.code, Some(1), "forgotten: {gone:?}");

    // Clean up the rest through the CLI too.
    for i in 1..30 {
        let key = record_key(&prefix, "orders", &format!("d{i}"));
        let forget = cli(&["--prefix", &prefix, "forget", &key, "--yes"], &env);
        assert_eq!(forget.code, Some(0), "{forget:?}");
    }
    for fingerprint in ["p0", "p1", "r0"] {
        let key = record_key(&prefix, "orders", fingerprint);
        let forget = cli(&["--prefix", &prefix, "forget", &key, "--yes"], &env);
        assert_eq!(forget.code, Some(0), "{forget:?}");
    }
    let empty = cli(&["--prefix", &prefix, "stats"], &env);
    assert_eq!(empty.count("total"), 0, "{empty:?}");
}

#[test]
fn a_misspelt_variable_is_refused_like_the_library_refuses_it() {
    let run = cli(&["stats"], &[("IDEMPOTENCY_SCOPEE", "orders")]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("IDEMPOTENCY_SCOPEE"), "{run:?}");
    assert!(run.stderr.contains("IDEMPOTENCY_SCOPE"), "{run:?}");
}
