//! Redis errors that are not network errors, against a private real Redis:
//! refused credentials, missing ACL permissions, a full Redis, a read-only
//! replica. None may dead-letter a message; each pauses consumption (the
//! delivery is held, the handler not run) until a write succeeds, and the
//! store recovers by itself once the fault is fixed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqp_idempotency::store::{ClaimOutcome, RedisStore, Store, Token, machine};
use amqp_idempotency::{Config, HandlerError, IdempotencyLayer, OutcomeKind};
use common::{PrivateRedis, redis_cli};
use lapin::BasicProperties;
use lapin::message::Delivery;
use tower::{Layer, ServiceExt, service_fn};

const LEASE: Duration = Duration::from_secs(5);

fn delivery(id: &str) -> Delivery {
    let mut d = Delivery::mock(1, "".into(), "q".into(), false, b"x".to_vec());
    d.properties = BasicProperties::default().with_message_id(id.into());
    d
}

async fn connect(redis: &PrivateRedis) -> RedisStore {
    RedisStore::connect_url(&redis.url())
        .await
        .unwrap_or_else(|err| panic!("connect to the private redis-server: {err}"))
}

/// Claims until the store answers, for up to about 10s.
async fn claim_when_back(store: &RedisStore, key: &str) -> ClaimOutcome {
    let mut last = None;
    for _ in 0..40 {
        match machine::claim(store, key, &Token::new(), "", LEASE).await {
            Ok(outcome) => return outcome,
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the store never recovered: {last:?}");
}

#[tokio::test]
async fn a_refused_password_pauses_and_the_store_recovers_by_itself() {
    let redis = PrivateRedis::start();
    let store = connect(&redis).await;
    // The password changes under a running consumer, and its connection drops.
    redis_cli(
        redis.port,
        None,
        &["CONFIG", "SET", "requirepass", "s3cret"],
    );
    redis_cli(
        redis.port,
        Some("s3cret"),
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    );
    let err = machine::claim(&store, "idem:q:a", &Token::new(), "", LEASE)
        .await
        .expect_err("the reconnect cannot authenticate");
    assert!(
        err.is_unavailable(),
        "refused credentials pause consumption, they never dead-letter: {err}"
    );
    let text = err.to_string();
    assert!(text.contains("REDIS_URL"), "says what to fix: {text}");
    assert!(
        !text.contains("s3cret"),
        "the password never appears: {text}"
    );
    // The password is put back: the store reconnects by itself.
    redis_cli(
        redis.port,
        Some("s3cret"),
        &["CONFIG", "SET", "requirepass", ""],
    );
    let outcome = claim_when_back(&store, "idem:q:a").await;
    assert!(matches!(outcome, ClaimOutcome::Acquired(_)), "{outcome:?}");
}

#[tokio::test]
async fn a_missing_acl_permission_pauses_and_names_the_permission() {
    let redis = PrivateRedis::start();
    redis_cli(
        redis.port,
        None,
        &[
            "ACL", "SETUSER", "limited", "on", ">pw", "~*", "+get", "+ping", "+pttl",
        ],
    );
    let url = format!("redis://limited:pw@127.0.0.1:{}", redis.port);
    let store = RedisStore::connect_url(&url)
        .await
        .expect("connect as limited");
    let err = machine::claim(&store, "idem:q:a", &Token::new(), "", LEASE)
        .await
        .expect_err("SET is not allowed");
    assert!(err.is_unavailable(), "NOPERM pauses: {err}");
    let text = err.to_string();
    assert!(text.contains("'set'"), "names the command: {text}");
    assert!(text.contains("ACL"), "says what to fix: {text}");
    assert!(!text.contains(":pw@"), "the password never appears: {text}");
}

/// Runs one delivery through the layer while `fault` holds, and lifts it
/// with `fix` after the call has been refused at least once: the delivery
/// must be held (no requeue, no dead letter) and processed once the store
/// accepts writes.
async fn held_while_writes_are_refused(fault: &[&[&str]], fix: &[&[&str]]) {
    let redis = PrivateRedis::start();
    let store = connect(&redis).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let config = Config::default()
        .with_in_progress_wait(Duration::ZERO)
        .with_retry_backoff(Duration::from_millis(10));
    let svc = IdempotencyLayer::new(store.clone(), "q", config)
        .expect("layer")
        .layer(service_fn(move |_d: Delivery| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        }));
    for args in fault {
        redis_cli(redis.port, None, args);
    }
    // PING still answers: that is why a pause must end on a write, not a PING.
    assert_eq!(redis_cli(redis.port, None, &["PING"]).trim(), "PONG");
    let call = tokio::spawn(svc.oneshot(delivery("held")));
    // Wait until the store has refused the claim at least once.
    let refused = common::eventually(Duration::from_secs(10), || {
        let store = store.clone();
        async move {
            machine::claim(&store, "idem:q:probe-refused", &Token::new(), "", LEASE)
                .await
                .is_err()
        }
    })
    .await;
    assert!(refused, "the fault refuses writes");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "no handler runs while refused"
    );
    for args in fix {
        redis_cli(redis.port, None, args);
    }
    let outcome = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("processed once writes are accepted")
        .expect("no panic")
        .expect("an outcome");
    assert_eq!(
        outcome.kind(),
        OutcomeKind::Processed,
        "held, then processed: not requeued, not dead-lettered"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_full_redis_holds_the_delivery_until_a_write_succeeds() {
    held_while_writes_are_refused(
        &[
            &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
            &["CONFIG", "SET", "maxmemory", "1"],
        ],
        &[&["CONFIG", "SET", "maxmemory", "0"]],
    )
    .await;
}

#[tokio::test]
async fn a_read_only_redis_holds_the_delivery_until_a_write_succeeds() {
    let nowhere = common::free_port().to_string();
    held_while_writes_are_refused(
        &[&["REPLICAOF", "127.0.0.1", &nowhere]],
        &[&["REPLICAOF", "NO", "ONE"]],
    )
    .await;
}

#[tokio::test]
async fn a_password_flip_holds_the_delivery_until_the_password_is_right() {
    // Set by `fault` below; redis-cli authenticates only where needed.
    let redis = PrivateRedis::start();
    let store = connect(&redis).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let svc = IdempotencyLayer::new(store.clone(), "q", Config::default())
        .expect("layer")
        .layer(service_fn(move |_d: Delivery| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        }));
    redis_cli(redis.port, None, &["CONFIG", "SET", "requirepass", "flip"]);
    redis_cli(
        redis.port,
        Some("flip"),
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    );
    let call = tokio::spawn(svc.oneshot(delivery("flipped")));
    let refused = common::eventually(Duration::from_secs(10), || {
        let store = store.clone();
        async move {
            machine::claim(&store, "idem:q:probe-refused", &Token::new(), "", LEASE)
                .await
                .is_err()
        }
    })
    .await;
    assert!(refused, "the flip refuses the store");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    redis_cli(
        redis.port,
        Some("flip"),
        &["CONFIG", "SET", "requirepass", ""],
    );
    let outcome = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("processed once the password is right")
        .expect("no panic")
        .expect("an outcome");
    assert_eq!(outcome.kind(), OutcomeKind::Processed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Runs every kind of request the consumer makes (claim, a transition
/// whose script is loaded on NOSCRIPT, a read, a take-over check, a
/// discard, the pause probe) and returns the first error.
async fn every_request(store: &RedisStore) -> Result<(), amqp_idempotency::StoreError> {
    use amqp_idempotency::store::Expect;
    let key = format!("idem:q:{}", common::unique("acl"));
    let ClaimOutcome::Acquired(claim) =
        machine::claim(store, &key, &Token::new(), "h", LEASE).await?
    else {
        panic!("a fresh key is ours");
    };
    machine::renew(store, &claim, LEASE).await?;
    store.get(&key).await?;
    store
        .transition(
            &key,
            Expect::Expired {
                value: claim.value(),
                grace: Duration::from_millis(1),
            },
            Some(&b"taken"[..]),
            LEASE,
        )
        .await?;
    machine::discard(store, &claim).await?;
    store.probe("idem:q:\0probe").await?;
    Ok(())
}

#[tokio::test]
async fn the_readme_acl_grants_every_command_and_each_one_is_needed_and_named() {
    let line = common::readme_acl_line("idem-consumer");
    let commands: Vec<String> = line
        .iter()
        .filter_map(|word| word.strip_prefix('+'))
        .map(str::to_owned)
        .collect();
    assert!(
        commands.len() >= 6,
        "the documented line grants the commands: {line:?}"
    );
    // The whole line is enough.
    let (_redis, store) = common::least_privilege_store().await;
    if let Err(err) = every_request(&store).await {
        panic!("the documented ACL line does not grant enough: {err}");
    }
    // Each command is needed, and its absence is named.
    for command in &commands {
        let redis = PrivateRedis::start();
        let without: Vec<String> = line
            .iter()
            .filter(|word| word.strip_prefix('+') != Some(command.as_str()))
            .cloned()
            .collect();
        common::apply_acl(redis.port, &without, "pw");
        let url = format!("redis://idem-consumer:pw@127.0.0.1:{}", redis.port);
        let store = RedisStore::connect_url(&url)
            .await
            .unwrap_or_else(|err| panic!("connect without +{command}: {err}"));
        let err = every_request(&store)
            .await
            .expect_err(&format!("+{command} is needed"));
        let text = err.to_string();
        assert!(err.is_unavailable(), "NOPERM pauses: {text}");
        assert!(
            text.contains(&format!("'{command}'")),
            "without +{command} the error names it: {text}"
        );
        assert!(
            text.contains("Least privilege"),
            "and says where the grant is: {text}"
        );
        assert!(!text.contains(":pw@"), "the password never appears: {text}");
    }
}
