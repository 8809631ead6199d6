//! The records API against the real Redis at `REDIS_URL` (and the cluster
//! of `TEST_REDIS_CLUSTER_NODES`): what the consumers wrote reads back as
//! the documented states, with the outbox's messages; `forget` deletes a
//! record and its outbox at once; `stats` counts per state.

mod common;

use std::time::Duration;

use amqp_idempotency::Config;
use amqp_idempotency::records::{Records, State};
use amqp_idempotency::store::{ClaimOutcome, RedisStore, Token, machine};

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(600);

async fn claim(store: &RedisStore, key: &str, hash: &str) -> amqp_idempotency::store::Claim {
    match machine::claim(store, key, &Token::new(), hash, LEASE).await {
        Ok(ClaimOutcome::Acquired(claim)) => claim,
        other => panic!("a fresh key is ours: {other:?}"),
    }
}

/// Records under a prefix of their own, on the Redis of `config`.
async fn records(config: Config) -> Records {
    Records::connect(&config)
        .await
        .unwrap_or_else(|err| panic!("the records API connects: {err}"))
}

#[tokio::test]
async fn each_state_reads_back_with_its_attempts_lease_and_outbox() {
    let prefix = common::unique("records");
    let config = Config::default()
        .with_redis_url(common::redis_url())
        .with_key_prefix(prefix.as_str());
    let store = RedisStore::connect(&config)
        .await
        .expect("the store connects");
    let records = records(config).await;
    let hash = "0123456789ab";

    let running = records.key("orders", "running");
    assert_eq!(running, format!("{prefix}:orders:running"));
    let claimed = claim(&store, &running, hash).await;
    let record = records.get(&running).await.expect("get").expect("a record");
    assert_eq!(record.key(), running);
    match record.state() {
        State::InProgress {
            token,
            attempt,
            payload_hash,
            lease_left,
        } => {
            assert_eq!(token, claimed.token());
            assert_eq!(*attempt, 1);
            assert_eq!(payload_hash, hash);
            let left = lease_left.expect("a running lease");
            assert!(
                left > LEASE - Duration::from_secs(5) && left <= LEASE,
                "{left:?}"
            );
        }
        other => panic!("expected in progress, found {other:?}"),
    }
    assert!(
        record.ttl().expect("expires") > LEASE,
        "kept past its lease"
    );

    let failed = records.key("orders", "failed");
    let first = claim(&store, &failed, hash).await;
    assert!(
        machine::release(&store, &first, RETENTION)
            .await
            .expect("release")
    );
    let record = records.get(&failed).await.expect("get").expect("a record");
    assert!(
        matches!(record.state(), State::Released { attempts: 1, token, .. } if token == first.token()),
        "{record:?}"
    );

    let sent = records.key("orders", "sent");
    let done = claim(&store, &sent, hash).await;
    let outbox = amqp_idempotency::outbox::outbox_key(&sent);
    let entries = [
        (b"m1".to_vec(), b"x".to_vec()),
        (b"m2".to_vec(), b"y".to_vec()),
    ];
    assert!(
        machine::complete_with_outbox(&store, &done, RETENTION, &outbox, &entries)
            .await
            .expect("complete")
    );
    let record = records.get(&sent).await.expect("get").expect("a record");
    assert!(
        matches!(record.state(), State::Done { token, payload_hash } if done.token().starts_with(token.as_str()) && hash.starts_with(payload_hash.as_str())),
        "{record:?}"
    );
    assert_eq!(record.outbox_messages(), 2);
    let ttl = record.ttl().expect("expires");
    assert!(
        ttl > RETENTION - Duration::from_secs(5) && ttl <= RETENTION,
        "{ttl:?}"
    );

    let stats = records.stats(Some("orders")).await.expect("stats");
    assert_eq!(
        (stats.in_progress, stats.released, stats.done),
        (1, 1, 1),
        "{stats:?}"
    );
    assert_eq!(stats.total(), 3);
    assert_eq!(
        records.stats(Some("other")).await.expect("stats").total(),
        0
    );

    // Forget: the record and its outbox go in one step, and what they
    // held comes back; the next claim is a first attempt again.
    let forgotten = records
        .forget(&sent)
        .await
        .expect("forget")
        .expect("was there");
    assert_eq!(forgotten.outbox_messages(), 2);
    assert_eq!(records.get(&sent).await.expect("get"), None);
    let outbox_left: Vec<(Vec<u8>, Vec<u8>)> =
        amqp_idempotency::store::Store::outbox(&store, &outbox)
            .await
            .expect("read the outbox");
    assert!(outbox_left.is_empty(), "the outbox went with its record");
    assert_eq!(records.forget(&sent).await.expect("forget"), None);
    let again = claim(&store, &sent, hash).await;
    assert_eq!(again.attempt(), 1);

    for key in [running, failed, sent] {
        records.forget(&key).await.expect("clean up");
    }
    assert_eq!(records.stats(None).await.expect("stats").total(), 0);
}

#[tokio::test]
async fn a_foreign_value_is_unrecognized_and_counted_apart() {
    let prefix = common::unique("records-foreign");
    let config = Config::default()
        .with_redis_url(common::redis_url())
        .with_key_prefix(prefix.as_str());
    let store = RedisStore::connect(&config)
        .await
        .expect("the store connects");
    let records = records(config).await;
    let key = records.key("orders", "foreign");
    let big = vec![b'x'; 10_000];
    amqp_idempotency::store::Store::insert_or_get(&store, &key, &big, LEASE)
        .await
        .expect("write");
    let record = records.get(&key).await.expect("get").expect("a value");
    match record.state() {
        State::Unrecognized { kind, value, len } => {
            assert_eq!(kind, "string");
            assert_eq!(*len, 10_000);
            assert!(value.len() < 10_000, "a huge value is not read whole");
        }
        other => panic!("expected unrecognized, found {other:?}"),
    }
    assert_eq!(records.stats(None).await.expect("stats").unrecognized, 1);
    records.forget(&key).await.expect("clean up");
}

#[tokio::test]
async fn connecting_tells_a_bad_setting_from_an_unreachable_redis() {
    let bad = Records::connect(&Config::default().with_redis_url("http://x"))
        .await
        .expect_err("not a Redis URL");
    assert!(!bad.is_unavailable(), "a setting to fix: {bad}");
    assert!(bad.to_string().contains("http://x"), "{bad}");
    let down =
        Records::connect(&Config::default().with_redis_url("redis://user:s3cret@127.0.0.1:1"))
            .await
            .expect_err("nothing listens on port 1");
    assert!(down.is_unavailable(), "{down}");
    assert!(
        down.to_string()
            .contains("cannot reach Redis at redis://user:***@127.0.0.1:1"),
        "{down}"
    );
    assert!(!down.to_string().contains("s3cret"), "{down}");
}

#[tokio::test]
async fn on_a_cluster_every_master_is_read() {
    let nodes = common::cluster_nodes();
    let prefix = common::unique("records-cluster");
    let config = Config::default()
        .with_redis_cluster_nodes(nodes.iter().cloned())
        .with_key_prefix(prefix.as_str());
    let store = RedisStore::connect(&config)
        .await
        .expect("the store connects");
    let records = records(config).await;
    // Keys spread over the three masters' slots.
    let keys: Vec<String> = (0..20)
        .map(|i| records.key("orders", &format!("k{i}")))
        .collect();
    for key in &keys {
        let claim = claim(&store, key, "").await;
        assert!(
            machine::complete(&store, &claim, RETENTION)
                .await
                .expect("complete")
        );
    }
    assert_eq!(records.stats(None).await.expect("stats").done, 20);
    for key in &keys {
        let record = records.get(key).await.expect("get").expect("a record");
        assert!(matches!(record.state(), State::Done { .. }), "{record:?}");
        assert!(records.forget(key).await.expect("forget").is_some());
    }
    assert_eq!(records.stats(None).await.expect("stats").total(), 0);
}
