//! The least-privilege Redis users of docs/deployment.md, applied to a private
//! redis-server: the operator CLI's user can run every command of the CLI,
//! and without `+del` it can read but not delete. (The consumer's user runs
//! the whole store contract in tests/store_contract.rs, and each of its
//! commands is shown to be needed in tests/store_faults.rs.)

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use amqp_idempotency::store::{ClaimOutcome, RedisStore, Token, machine};
use common::{PrivateRedis, apply_acl, readme_acl_line};

const BIN: &str = env!("CARGO_BIN_EXE_amqp-idempotency");

/// Runs the CLI against `url` with `args`, without the caller's settings.
fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .env_remove("REDIS_URL")
        .env_remove("IDEMPOTENCY_KEY_PREFIX")
        .env_remove("IDEMPOTENCY_SCOPE")
        .args(["--redis-url", url])
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("run {BIN}: {err}"))
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A done record at `key`, written by the library as the default user.
async fn done_record(redis: &PrivateRedis, key: &str) {
    let store = RedisStore::connect_url(&redis.url())
        .await
        .unwrap_or_else(|err| panic!("connect to the private redis-server: {err}"));
    let ClaimOutcome::Acquired(claim) =
        machine::claim(&store, key, &Token::new(), "h", Duration::from_secs(30))
            .await
            .expect("claim")
    else {
        panic!("a fresh key is ours");
    };
    assert!(
        machine::complete(&store, &claim, Duration::from_secs(600))
            .await
            .expect("complete")
    );
}

#[tokio::test]
async fn the_readme_cli_user_can_inspect_count_and_forget() {
    let redis = PrivateRedis::start();
    apply_acl(redis.port, &readme_acl_line("idem-cli"), "cli-pw");
    let key = "idem:orders:order-42";
    done_record(&redis, key).await;
    let url = format!("redis://idem-cli:cli-pw@127.0.0.1:{}", redis.port);

    let stats = cli(&url, &["stats"]);
    assert!(stats.status.success(), "stats: {}", text(&stats));
    assert!(
        String::from_utf8_lossy(&stats.stdout).contains("done"),
        "{}",
        text(&stats)
    );
    let inspect = cli(&url, &["inspect", key]);
    assert!(inspect.status.success(), "inspect: {}", text(&inspect));
    let forget = cli(&url, &["forget", key, "--yes"]);
    assert!(forget.status.success(), "forget: {}", text(&forget));
    for output in [&stats, &inspect, &forget] {
        assert!(
            !text(output).contains("cli-pw"),
            "no password: {}",
            text(output)
        );
    }
    let exists = common::redis_cli(redis.port, None, &["EXISTS", key]);
    assert_eq!(exists.trim(), "0", "forget deleted the record");
}

#[tokio::test]
async fn without_del_the_cli_user_can_read_but_not_forget() {
    let redis = PrivateRedis::start();
    let read_only: Vec<String> = readme_acl_line("idem-cli")
        .into_iter()
        .filter(|word| word != "+del")
        .collect();
    apply_acl(redis.port, &read_only, "cli-pw");
    let key = "idem:orders:order-43";
    done_record(&redis, key).await;
    let url = format!("redis://idem-cli:cli-pw@127.0.0.1:{}", redis.port);

    let inspect = cli(&url, &["inspect", key]);
    assert!(inspect.status.success(), "inspect: {}", text(&inspect));
    let stats = cli(&url, &["stats"]);
    assert!(stats.status.success(), "stats: {}", text(&stats));
    let forget = cli(&url, &["forget", key, "--yes"]);
    assert_eq!(
        forget.status.code(),
        Some(3),
        "a refused command is a Redis error: {}",
        text(&forget)
    );
    let exists = common::redis_cli(redis.port, None, &["EXISTS", key]);
    assert_eq!(exists.trim(), "1", "nothing was deleted");
}
