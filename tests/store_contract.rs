//! One contract, two stores: every test runs against `MemoryStore`,
//! against `RedisStore` on the real Redis at REDIS_URL, and against
//! `RedisStore` connected as the documented least-privilege ACL user to a
//! private redis-server.

mod common;

use std::time::Duration;

use amqp_idempotency::records::{Record, State};
use amqp_idempotency::store::{ClaimOutcome, Expect, MemoryStore, Store, Token, machine};

/// What a stored value says, read through the public records API.
fn state(value: &[u8]) -> State {
    Record::decode("", (value.to_vec(), None)).state().clone()
}

const LEASE: Duration = Duration::from_millis(300);
const RETENTION: Duration = Duration::from_secs(60);
/// Payload hashes as the layer makes them (48 bits in hexadecimal), so the
/// records take their compact form.
const H1: &str = "a1a1a1a1a1a1";
const H2: &str = "b2b2b2b2b2b2";

/// Under the default prefix `idem`, which the documented least-privilege
/// ACL line grants (`~idem:*`).
fn key() -> String {
    format!("idem:{}:fp", common::unique("contract"))
}

async fn acquire<S: Store>(store: &S, key: &str, token: &Token) -> amqp_idempotency::store::Claim {
    match machine::claim(store, key, token, H1, LEASE)
        .await
        .expect("claim")
    {
        ClaimOutcome::Acquired(claim) => claim,
        other => panic!("expected to acquire {key}, got {other:?}"),
    }
}

async fn first_claim_wins<S: Store>(store: S) {
    let key = key();
    let claim = acquire(&store, &key, &Token::new()).await;
    assert_eq!(claim.attempt(), 1);
    let second = machine::claim(&store, &key, &Token::new(), H1, LEASE)
        .await
        .unwrap();
    assert!(
        matches!(second, ClaimOutcome::InProgress { remaining: Some(left) } if left <= LEASE),
        "{second:?}"
    );
}

async fn retried_claim_with_our_token_is_acquired<S: Store>(store: S) {
    let key = key();
    let token = Token::new();
    let first = acquire(&store, &key, &token).await;
    // As after a timed-out reply: the same token claims again.
    let again = acquire(&store, &key, &token).await;
    assert_eq!(first, again);
}

async fn complete_makes_duplicates_done<S: Store>(store: S) {
    let key = key();
    let claim = acquire(&store, &key, &Token::new()).await;
    assert!(machine::complete(&store, &claim, RETENTION).await.unwrap());
    let (value, ttl) = store.get(&key).await.unwrap().expect("a done record");
    assert_eq!(
        state(&value),
        State::Done {
            payload_hash: H1[..8].into(),
            token: claim.token()[..4].into(),
        }
    );
    assert!(value.starts_with(b"-"), "a compact done mark: {value:?}");
    assert!(
        ttl.expect("retention set") > LEASE,
        "retention replaces the lease"
    );
    let dup = machine::claim(&store, &key, &Token::new(), H1, LEASE)
        .await
        .unwrap();
    assert_eq!(dup, ClaimOutcome::Done);
}

async fn release_lets_the_next_attempt_claim<S: Store>(store: S) {
    let key = key();
    let claim = acquire(&store, &key, &Token::new()).await;
    assert!(machine::release(&store, &claim, RETENTION).await.unwrap());
    let next = acquire(&store, &key, &Token::new()).await;
    assert_eq!(next.attempt(), 2, "the attempt count survives the release");
    assert!(machine::release(&store, &next, RETENTION).await.unwrap());
    assert_eq!(acquire(&store, &key, &Token::new()).await.attempt(), 3);
}

async fn discard_forgets_the_attempts<S: Store>(store: S) {
    let key = key();
    let claim = acquire(&store, &key, &Token::new()).await;
    assert!(machine::release(&store, &claim, RETENTION).await.unwrap());
    let second = acquire(&store, &key, &Token::new()).await;
    assert_eq!(second.attempt(), 2);
    assert!(machine::discard(&store, &second).await.unwrap());
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert!(
        !machine::discard(&store, &second).await.unwrap(),
        "only once, and only by the owner"
    );
    assert_eq!(acquire(&store, &key, &Token::new()).await.attempt(), 1);
}

async fn a_stranger_cannot_complete_release_or_renew<S: Store>(store: S) {
    let key = key();
    let owner = acquire(&store, &key, &Token::new()).await;
    // A claim object for the same key with another token: what a consumer
    // whose lease expired and was taken over holds.
    let other_store = MemoryStore::new();
    let stranger = acquire(&other_store, &key, &Token::new()).await;
    assert!(
        !machine::complete(&store, &stranger, RETENTION)
            .await
            .unwrap()
    );
    assert!(
        !machine::release(&store, &stranger, RETENTION)
            .await
            .unwrap()
    );
    assert!(!machine::renew(&store, &stranger, LEASE).await.unwrap());
    let (value, _) = store.get(&key).await.unwrap().expect("record kept");
    assert_eq!(value, owner.value(), "the owner's record is untouched");
}

async fn an_expired_lease_can_be_taken_over<S: Store>(store: S) {
    let key = key();
    let crashed = acquire(&store, &key, &Token::new()).await;
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    let heir = acquire(&store, &key, &Token::new()).await;
    assert_ne!(heir.token(), crashed.token());
    // The crashed consumer wakes up: it owns nothing any more.
    assert!(
        !machine::complete(&store, &crashed, RETENTION)
            .await
            .unwrap()
    );
    assert!(machine::complete(&store, &heir, RETENTION).await.unwrap());
}

async fn a_late_complete_after_another_consumer_finished_is_not_ours<S: Store>(store: S) {
    let key = key();
    let paused = acquire(&store, &key, &Token::new()).await;
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    let heir = acquire(&store, &key, &Token::new()).await;
    assert!(machine::complete(&store, &heir, RETENTION).await.unwrap());
    // The paused consumer wakes up: the key is done, but not by it.
    assert!(!machine::complete(&store, &paused, RETENTION).await.unwrap());
    let (value, _) = store.get(&key).await.unwrap().unwrap();
    match state(&value) {
        State::Done { token, .. } => {
            assert!(
                !token.is_empty() && heir.token().starts_with(&token),
                "{token}"
            )
        }
        other => panic!("expected the heir's done mark, found {other:?}"),
    }
}

async fn renew_extends_the_lease<S: Store>(store: S) {
    let key = key();
    let claim = acquire(&store, &key, &Token::new()).await;
    for _ in 0..4 {
        tokio::time::sleep(LEASE / 2).await;
        assert!(
            machine::renew(&store, &claim, LEASE).await.unwrap(),
            "still ours"
        );
    }
    let other = machine::claim(&store, &key, &Token::new(), H1, LEASE)
        .await
        .unwrap();
    assert!(
        matches!(other, ClaimOutcome::InProgress { .. }),
        "{other:?}"
    );
}

async fn retried_complete_and_release_are_harmless<S: Store>(store: S) {
    let key = key();
    let claim = acquire(&store, &key, &Token::new()).await;
    assert!(machine::complete(&store, &claim, RETENTION).await.unwrap());
    assert!(
        machine::complete(&store, &claim, RETENTION).await.unwrap(),
        "a retry after a lost reply"
    );
    let key2 = format!("{key}2");
    let claim2 = acquire(&store, &key2, &Token::new()).await;
    assert!(machine::release(&store, &claim2, RETENTION).await.unwrap());
    assert!(machine::release(&store, &claim2, RETENTION).await.unwrap());
}

async fn a_different_payload_is_a_mismatch<S: Store>(store: S) {
    let key = key();
    let claim = acquire(&store, &key, &Token::new()).await;
    let other = machine::claim(&store, &key, &Token::new(), H2, LEASE)
        .await
        .unwrap();
    assert_eq!(other, ClaimOutcome::PayloadMismatch { stored: H1.into() });
    assert!(machine::complete(&store, &claim, RETENTION).await.unwrap());
    let unchecked = machine::claim(&store, &key, &Token::new(), "", LEASE)
        .await
        .unwrap();
    assert_eq!(
        unchecked,
        ClaimOutcome::Done,
        "an empty hash skips the check"
    );
}

async fn foreign_values_are_reported_not_overwritten<S: Store>(store: S) {
    let key = key();
    assert_eq!(
        store
            .insert_or_get(&key, b"hello", RETENTION)
            .await
            .unwrap(),
        None
    );
    let outcome = machine::claim(&store, &key, &Token::new(), H1, LEASE)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        ClaimOutcome::Unrecognized {
            value: "hello".into()
        }
    );
    assert_eq!(
        store.get(&key).await.unwrap().map(|(v, _)| v).as_deref(),
        Some(&b"hello"[..])
    );
}

async fn an_expired_lease_is_taken_over_as_the_next_attempt<S: Store>(store: S) {
    // The owner died mid-handler: nobody completed or released the claim.
    let key = key();
    let crashed = acquire(&store, &key, &Token::new()).await;
    assert!(!crashed.after_crash());
    let early = machine::claim(&store, &key, &Token::new(), H1, LEASE)
        .await
        .unwrap();
    assert!(
        matches!(early, ClaimOutcome::InProgress { remaining: Some(left) } if left <= LEASE),
        "during the lease the record is in progress: {early:?}"
    );
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    let heir = acquire(&store, &key, &Token::new()).await;
    assert_eq!(heir.attempt(), 2, "the crashed run counts as an attempt");
    assert!(heir.after_crash());
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    let third = acquire(&store, &key, &Token::new()).await;
    assert_eq!(third.attempt(), 3);
}

async fn complete_writes_the_mark_where_the_key_vanished<S: Store>(store: S) {
    // Our lease expired and nobody took over (here: the key was deleted).
    let key = key();
    let claim = acquire(&store, &key, &Token::new()).await;
    assert!(
        store
            .transition(&key, Expect::Value(claim.value()), None, Duration::ZERO)
            .await
            .unwrap()
    );
    assert!(machine::complete(&store, &claim, RETENTION).await.unwrap());
    let dup = machine::claim(&store, &key, &Token::new(), H1, LEASE)
        .await
        .unwrap();
    assert_eq!(
        dup,
        ClaimOutcome::Done,
        "the effect that happened is recorded"
    );
    // Release and renew still need the key to be ours.
    let key = format!("{key}-2");
    let claim = acquire(&store, &key, &Token::new()).await;
    store
        .transition(&key, Expect::Value(claim.value()), None, Duration::ZERO)
        .await
        .unwrap();
    assert!(!machine::release(&store, &claim, RETENTION).await.unwrap());
    assert!(!machine::renew(&store, &claim, LEASE).await.unwrap());
}

async fn a_record_of_the_previous_format_expires_with_its_lease<S: Store>(store: S) {
    // 0.1.0 wrote in-progress records without the `+`: their lease is the
    // key's whole life, so they are never taken over early.
    let key = key();
    let old = format!("p:0123456789abcdef0123456789abcdef:1:{H1}");
    assert!(matches!(
        state(old.as_bytes()),
        State::InProgress { attempt: 1, .. }
    ));
    store
        .insert_or_get(&key, old.as_bytes(), LEASE)
        .await
        .unwrap();
    let seen = machine::claim(&store, &key, &Token::new(), H1, LEASE)
        .await
        .unwrap();
    assert!(
        matches!(seen, ClaimOutcome::InProgress { remaining: Some(left) } if left <= LEASE),
        "{seen:?}"
    );
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    let fresh = acquire(&store, &key, &Token::new()).await;
    assert_eq!(fresh.attempt(), 1);
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(amqp_idempotency::store::MemoryStore::new()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::redis_store().await).await;
                }
            )*
        }
        /// On the 3-master Redis Cluster (scripts: Redis 7 has no IFEQ).
        mod redis_cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::cluster_store().await).await;
                }
            )*
        }
        /// On Valkey 8.1 with its native `SET ... IFEQ`.
        mod valkey_native {
            $(
                #[tokio::test]
                async fn $name() {
                    let store = super::common::valkey_store().await;
                    assert!(store.native_compare_and_set());
                    super::$name(store).await;
                }
            )*
        }
        /// On Valkey 8.1 with the token-checked scripts.
        mod valkey_scripts {
            $(
                #[tokio::test]
                async fn $name() {
                    let store = super::common::valkey_store().await.scripts_only();
                    assert!(!store.native_compare_and_set());
                    super::$name(store).await;
                }
            )*
        }
        /// As the documented least-privilege Redis user, on a private Redis.
        mod redis_least_privilege {
            $(
                #[tokio::test]
                async fn $name() {
                    let (_redis, store) = super::common::least_privilege_store().await;
                    super::$name(store).await;
                }
            )*
        }
    };
}

contract!(
    first_claim_wins,
    retried_claim_with_our_token_is_acquired,
    complete_makes_duplicates_done,
    release_lets_the_next_attempt_claim,
    discard_forgets_the_attempts,
    a_stranger_cannot_complete_release_or_renew,
    an_expired_lease_can_be_taken_over,
    a_late_complete_after_another_consumer_finished_is_not_ours,
    renew_extends_the_lease,
    retried_complete_and_release_are_harmless,
    a_different_payload_is_a_mismatch,
    foreign_values_are_reported_not_overwritten,
    an_expired_lease_is_taken_over_as_the_next_attempt,
    complete_writes_the_mark_where_the_key_vanished,
    a_record_of_the_previous_format_expires_with_its_lease,
);

// ---------------------------------------------------------------------------
// The outbox: committed with the done mark, in one atomic step.

fn outbox_key(key: &str) -> String {
    amqp_idempotency::outbox::outbox_key(key)
}

fn entries() -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b"m0".to_vec(), b"charge 1".to_vec()),
        (b"m1".to_vec(), vec![0, 255, 1, 2]),
        (b"r".to_vec(), b"quote 7".to_vec()),
    ]
}

async fn an_outbox_commits_with_the_done_mark<S: Store>(store: S) {
    let key = key();
    let outbox = outbox_key(&key);
    assert!(
        store.outbox(&outbox).await.unwrap().is_empty(),
        "no outbox yet"
    );
    let claim = acquire(&store, &key, &Token::new()).await;
    assert!(
        machine::complete_with_outbox(&store, &claim, RETENTION, &outbox, &entries())
            .await
            .unwrap()
    );
    let (value, _) = store.get(&key).await.unwrap().expect("a done record");
    assert!(matches!(state(&value), State::Done { .. }), "{value:?}");
    assert_eq!(store.outbox(&outbox).await.unwrap(), entries());
    let dup = machine::claim(&store, &key, &Token::new(), H1, LEASE)
        .await
        .unwrap();
    assert_eq!(dup, ClaimOutcome::Done);
}

async fn a_retried_commit_leaves_the_outbox_as_dispatch_left_it<S: Store>(store: S) {
    let key = key();
    let outbox = outbox_key(&key);
    let claim = acquire(&store, &key, &Token::new()).await;
    assert!(
        machine::complete_with_outbox(&store, &claim, RETENTION, &outbox, &entries())
            .await
            .unwrap()
    );
    store
        .outbox_remove(&outbox, &[b"m0".to_vec()])
        .await
        .unwrap();
    // As after a lost reply: the same commit again.
    assert!(
        machine::complete_with_outbox(&store, &claim, RETENTION, &outbox, &entries())
            .await
            .unwrap()
    );
    assert_eq!(
        store.outbox(&outbox).await.unwrap(),
        entries()[1..].to_vec(),
        "what was dispatched stays dispatched"
    );
    // Removing what is gone is no error.
    store
        .outbox_remove(&outbox, &[b"m0".to_vec(), b"m1".to_vec()])
        .await
        .unwrap();
    assert_eq!(
        store.outbox(&outbox).await.unwrap(),
        entries()[2..].to_vec()
    );
}

async fn a_claim_taken_over_commits_no_outbox<S: Store>(store: S) {
    let key = key();
    let outbox = outbox_key(&key);
    let first = acquire(&store, &key, &Token::new()).await;
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    let second = acquire(&store, &key, &Token::new()).await;
    assert_eq!(second.attempt(), 2, "taken over");
    assert!(
        !machine::complete_with_outbox(&store, &first, RETENTION, &outbox, &entries())
            .await
            .unwrap(),
        "not ours any more"
    );
    assert!(
        store.outbox(&outbox).await.unwrap().is_empty(),
        "nothing staged was committed"
    );
    let (value, _) = store.get(&key).await.unwrap().expect("the new claim");
    assert_eq!(value, second.value(), "the new owner's claim is untouched");
}

macro_rules! outbox_contract {
    ($($name:ident),* $(,)?) => {
        mod outbox {
            $(
                pub mod $name {
                    #[tokio::test]
                    async fn memory() {
                        super::super::$name(amqp_idempotency::store::MemoryStore::new()).await;
                    }
                    #[tokio::test]
                    async fn redis() {
                        super::super::$name(super::super::common::redis_store().await).await;
                    }
                    #[tokio::test]
                    async fn redis_cluster() {
                        super::super::$name(super::super::common::cluster_store().await).await;
                    }
                    #[tokio::test]
                    async fn valkey_native() {
                        super::super::$name(super::super::common::valkey_store().await).await;
                    }
                    /// As the documented least-privilege user for consumers with an outbox.
                    #[tokio::test]
                    async fn redis_least_privilege() {
                        let (_redis, store) =
                            super::super::common::least_privilege_store_as("idem-outbox").await;
                        super::super::$name(store).await;
                    }
                }
            )*
        }
    };
}

outbox_contract!(
    an_outbox_commits_with_the_done_mark,
    a_retried_commit_leaves_the_outbox_as_dispatch_left_it,
    a_claim_taken_over_commits_no_outbox,
);

#[tokio::test]
async fn redis_store_recovers_when_redis_forgets_its_scripts() {
    let redis = common::PrivateRedis::start();
    let store = amqp_idempotency::store::RedisStore::connect_url(&redis.url())
        .await
        .expect("connect to the private redis");
    let key = key();
    let claim = acquire(&store, &key, &Token::new()).await;
    assert!(machine::renew(&store, &claim, LEASE).await.unwrap());
    let status = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "SCRIPT", "FLUSH"])
        .status()
        .expect("run redis-cli");
    assert!(status.success());
    assert!(
        machine::complete(&store, &claim, RETENTION).await.unwrap(),
        "reloaded and ran"
    );
    assert_eq!(
        machine::claim(&store, &key, &Token::new(), H1, LEASE)
            .await
            .unwrap(),
        ClaimOutcome::Done
    );
}

#[tokio::test]
async fn redis_store_sends_concurrent_requests_in_shared_round_trips() {
    let store = common::redis_store().await;
    let before = (store.round_trips(), store.commands());
    let claims = (0..200).map(|n| {
        let store = store.clone();
        let key = format!("{}:{n}", key());
        async move { acquire(&store, &key, &Token::new()).await }
    });
    let claims = futures_util::future::join_all(claims).await;
    let round_trips = store.round_trips() - before.0;
    let commands = store.commands() - before.1;
    assert_eq!(claims.len(), 200);
    assert!(commands >= 200, "every claim was sent: {commands}");
    assert!(
        round_trips < commands,
        "requests issued together share pipelines: {round_trips} round trips for {commands} commands"
    );
}

#[tokio::test]
async fn redis_store_batched_transitions_answer_each_key_on_its_own() {
    let store = common::redis_store().await;
    let stranger_store = MemoryStore::new();
    let base = key();
    let mut owners = Vec::new();
    let mut strangers = Vec::new();
    for n in 0..100 {
        let key = format!("{base}:{n}");
        owners.push(acquire(&store, &key, &Token::new()).await);
        strangers.push(acquire(&stranger_store, &key, &Token::new()).await);
    }
    // Sent together: even keys completed by their owner, odd keys by a stranger.
    let attempts = (0..100).map(|n| {
        let store = store.clone();
        let claim = if n % 2 == 0 {
            owners[n].clone()
        } else {
            strangers[n].clone()
        };
        async move { machine::complete(&store, &claim, RETENTION).await.unwrap() }
    });
    let answers = futures_util::future::join_all(attempts).await;
    for (n, answer) in answers.iter().enumerate() {
        assert_eq!(*answer, n % 2 == 0, "key {n}");
        let (value, _) = store.get(&format!("{base}:{n}")).await.unwrap().unwrap();
        let done = matches!(state(&value), State::Done { .. });
        assert_eq!(done, n % 2 == 0, "key {n}: {value:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn memory_store_forgets_expired_records_as_it_grows() {
    let store = MemoryStore::new();
    for n in 0..5000 {
        let key = format!("k{n}");
        assert_eq!(
            store
                .insert_or_get(&key, b"v", Duration::from_secs(1))
                .await
                .unwrap(),
            None
        );
        if n % 1000 == 999 {
            tokio::time::advance(Duration::from_secs(2)).await;
        }
    }
    assert_eq!(store.len(), 0, "every record expired");
    // A live record survives the sweeps and still answers.
    assert_eq!(
        store.insert_or_get("live", b"v", RETENTION).await.unwrap(),
        None
    );
    for n in 0..3000 {
        store
            .insert_or_get(&format!("j{n}"), b"v", Duration::from_millis(1))
            .await
            .unwrap();
    }
    assert_eq!(
        store
            .insert_or_get("live", b"w", RETENTION)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"v"[..])
    );
}

fn redis_cli(port: Option<u16>, args: &[&str]) {
    let port = port.map(|p| p.to_string()).unwrap_or_else(|| {
        common::redis_url()
            .rsplit(':')
            .next()
            .and_then(|p| p.split('/').next())
            .unwrap_or("6379")
            .to_owned()
    });
    let status = std::process::Command::new("redis-cli")
        .args(["-p", &port])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run redis-cli");
    assert!(status.success(), "redis-cli {args:?}");
}

#[tokio::test]
async fn redis_store_answers_a_key_of_another_type_alone_and_as_permanent() {
    let store = common::redis_store().await;
    let base = key();
    let claims: Vec<_> = futures_util::future::join_all((0..3).map(|n| {
        let store = store.clone();
        let key = format!("{base}:{n}");
        async move { acquire(&store, &key, &Token::new()).await }
    }))
    .await;
    // Someone turns the middle key into a hash behind our back.
    let middle = format!("{base}:1");
    redis_cli(None, &["DEL", &middle]);
    redis_cli(None, &["HSET", &middle, "f", "v"]);
    let answers = futures_util::future::join_all(claims.iter().map(|claim| {
        let store = store.clone();
        async move { machine::complete(&store, claim, RETENTION).await }
    }))
    .await;
    assert!(matches!(answers[0], Ok(true)), "{:?}", answers[0]);
    assert!(matches!(answers[2], Ok(true)), "{:?}", answers[2]);
    let err = answers[1].as_ref().expect_err("the hash key fails alone");
    assert!(!err.is_unavailable(), "WRONGTYPE is not an outage: {err}");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    let claim = machine::claim(&store, &middle, &Token::new(), H1, LEASE).await;
    assert!(
        matches!(&claim, Err(err) if !err.is_unavailable()),
        "{claim:?}"
    );
    redis_cli(None, &["DEL", &middle]);
}

#[tokio::test]
async fn redis_store_treats_a_full_redis_as_unavailable() {
    let redis = common::PrivateRedis::start();
    let store = amqp_idempotency::store::RedisStore::connect_url(&redis.url())
        .await
        .expect("connect to the private redis");
    redis_cli(
        Some(redis.port),
        &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
    );
    redis_cli(Some(redis.port), &["CONFIG", "SET", "maxmemory", "1"]);
    let err = machine::claim(&store, &key(), &Token::new(), H1, LEASE)
        .await
        .expect_err("a full Redis refuses writes");
    assert!(
        err.is_unavailable(),
        "OOM pauses consumption like an outage: {err}"
    );
}

#[tokio::test]
async fn redis_7_uses_the_scripts_and_valkey_8_1_compares_natively() {
    assert!(!common::redis_store().await.native_compare_and_set());
    assert!(!common::cluster_store().await.native_compare_and_set());
    let valkey = common::valkey_store().await;
    assert!(valkey.native_compare_and_set());
    // The native path runs no script: Valkey's EVALSHA count stays put
    // through a claim, a renewal, a completion and a release.
    let evalsha_calls = || {
        let info = common::redis_cli_at(&common::valkey_url(), &["INFO", "commandstats"]);
        info.lines()
            .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = evalsha_calls();
    let claim = acquire(&valkey, &key(), &Token::new()).await;
    assert!(machine::renew(&valkey, &claim, LEASE).await.unwrap());
    assert!(machine::complete(&valkey, &claim, RETENTION).await.unwrap());
    let other = acquire(&valkey, &key(), &Token::new()).await;
    assert!(machine::release(&valkey, &other, RETENTION).await.unwrap());
    assert_eq!(evalsha_calls(), before, "no script ran on the native path");
}

#[tokio::test]
async fn a_done_mark_takes_at_most_150_bytes_of_redis_memory() {
    // The issue's yardstick: the default prefix, a 6-character scope and
    // 16-character message ids, INFO memory's delta over 50,000 records.
    let redis = common::PrivateRedis::start();
    let store = amqp_idempotency::store::RedisStore::connect_url(&redis.url())
        .await
        .expect("connect to the private redis");
    let used = || {
        let info = common::redis_cli_at(&redis.url(), &["INFO", "memory"]);
        info.lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|value| value.trim().parse::<i64>().ok())
            .expect("INFO memory has used_memory")
    };
    const RECORDS: usize = 50_000;
    let before = used();
    for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(1000) {
        futures_util::future::join_all(chunk.iter().map(|n| {
            let store = store.clone();
            async move {
                let key = amqp_idempotency::fingerprint::record_key(
                    "idem",
                    "orders",
                    &format!("{n:016x}"),
                );
                let claim = acquire(&store, &key, &Token::new()).await;
                assert!(
                    machine::complete(&store, &claim, Duration::from_secs(86_400))
                        .await
                        .unwrap()
                );
            }
        }))
        .await;
    }
    // Let Redis's cron shrink the query buffers the pipelines grew.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_record = (used() - before) / RECORDS as i64;
    eprintln!("{per_record} bytes of Redis memory per done mark");
    assert!(per_record <= 150, "{per_record} bytes per done mark");
}
