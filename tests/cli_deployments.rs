//! The operator CLI reaches Redis as the library does, from the same
//! variables: a TLS-only redis-server with a private CA
//! (`REDIS_URL=rediss://...`, `REDIS_TLS_CA_FILE`), and the Redis Cluster of
//! `TEST_REDIS_CLUSTER_NODES` (`REDIS_CLUSTER_NODES`), whose masters each
//! hold some of the records. Records are written through `RedisStore` with
//! the same settings, then read with the binary.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use amqp_idempotency::Config;
use amqp_idempotency::fingerprint::record_key;
use amqp_idempotency::store::{ClaimOutcome, RedisStore, Store, Token};
use common::{Pki, TlsRedis};

const BIN: &str = env!("CARGO_BIN_EXE_amqp-idempotency");
const LEASE: Duration = Duration::from_secs(60);
const RETENTION: Duration = Duration::from_secs(300);

/// What a run of the binary printed.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The number on the `name` line of `stats`' output.
    fn count(&self, name: &str) -> u64 {
        self.stdout
            .lines()
            .find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some(name))
                    .then(|| words.next().and_then(|n| n.parse().ok()))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no `{name}` count in {self:?}"))
    }
}

/// Runs the binary with `args` and exactly the Redis variables in `env`
/// (none of the caller's Redis, TLS or idempotency settings).
fn cli(args: &[&str], env: &[(&str, String)]) -> Run {
    let mut command = Command::new(BIN);
    command.args(args);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if ["REDIS_", "IDEMPOTENCY_", "AMQP_"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            command.env_remove(name.as_ref());
        }
    }
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
            let ClaimOutcome::Acquired(claim) = store
                .claim(&key, &Token::new(), "h", LEASE)
                .await
                .unwrap_or_else(|err| panic!("claim {key}: {err}"))
            else {
                panic!("{key} is fresh, so the claim is ours");
            };
            match kind {
                "d" => {
                    assert!(store.complete(&claim, RETENTION).await.expect("complete"));
                    done_keys.push(key);
                }
                "r" => assert!(store.release(&claim, RETENTION).await.expect("release")),
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
    let env = [
        ("REDIS_URL", redis.url()),
        ("REDIS_TLS_CA_FILE", path(pki.ca())),
    ];
    let config = Config::from_vars(env.iter().map(|(name, value)| (*name, value.as_str())))
        .unwrap_or_else(|err| panic!("the TLS settings are accepted: {err}"));
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
    scoped.push(("IDEMPOTENCY_KEY_PREFIX", prefix.clone()));
    scoped.push(("IDEMPOTENCY_SCOPE", "orders".into()));
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
    let env = [("REDIS_CLUSTER_NODES", nodes.join(","))];
    let config = Config::default().redis_cluster(nodes.iter().cloned());
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
    let env = [
        ("REDIS_URL", "redis://127.0.0.1:6379".to_owned()),
        ("IDEMPOTENCY_SCOPEE", "orders".to_owned()),
    ];
    let run = cli(&["stats"], &env);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("IDEMPOTENCY_SCOPEE"), "{run:?}");
    assert!(run.stderr.contains("IDEMPOTENCY_SCOPE"), "{run:?}");
}
