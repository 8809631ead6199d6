//! How `RedisStore` packs the requests that wait together: the
//! token-checked transitions of one pipeline travel as one script call (per
//! node on a cluster), and each key still gets its own answer.

mod common;

use std::time::Duration;

use amqp_idempotency::records::{Record, State};
use amqp_idempotency::store::{ClaimOutcome, RedisStore, Store, Token, machine};

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(60);
const HASH: &str = "a1a1a1a1a1a1";

fn key() -> String {
    format!("idem:{}:fp", common::unique("batching"))
}

async fn acquire(store: &RedisStore, key: &str) -> amqp_idempotency::store::Claim {
    match machine::claim(store, key, &Token::new(), HASH, LEASE)
        .await
        .expect("claim")
    {
        ClaimOutcome::Acquired(claim) => claim,
        other => panic!("expected to acquire {key}, got {other:?}"),
    }
}

/// `calls=` of `cmdstat_evalsha` in `INFO commandstats` at `url`.
fn evalsha_calls(url: &str) -> u64 {
    let info = common::redis_cli_at(url, &["INFO", "commandstats"]);
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// Completes `claims` all at once; every one must be answered true and
/// leave a done mark.
async fn complete_together(store: &RedisStore, claims: &[amqp_idempotency::store::Claim]) {
    let answers = futures_util::future::join_all(
        claims
            .iter()
            .map(|claim| machine::complete(store, claim, RETENTION)),
    )
    .await;
    for (claim, answer) in claims.iter().zip(answers) {
        assert!(answer.expect("complete"), "{}", claim.key());
        let stored = store.get(claim.key()).await.unwrap().unwrap();
        let record = Record::decode(claim.key(), stored);
        assert!(
            matches!(record.state(), State::Done { .. }),
            "{}: {:?}",
            claim.key(),
            record.state()
        );
    }
}

#[tokio::test]
async fn transitions_sent_together_run_as_one_script_call() {
    let redis = common::PrivateRedis::start();
    let url = redis.url();
    let store = RedisStore::connect_url(&url).await.expect("connect");
    let base = key();
    let claims: Vec<_> = futures_util::future::join_all((0..50).map(|n| {
        let store = store.clone();
        let key = format!("{base}:{n}");
        async move { acquire(&store, &key).await }
    }))
    .await;
    // Loads the script, so that NOSCRIPT does not count.
    assert!(machine::renew(&store, &claims[0], LEASE).await.unwrap());
    let before = (evalsha_calls(&url), store.round_trips());
    complete_together(&store, &claims).await;
    let calls = evalsha_calls(&url) - before.0;
    let round_trips = store.round_trips() - before.1;
    assert!(
        calls <= round_trips && calls < 50,
        "at most one script call per pipeline: {calls} calls in {round_trips} round trips for 50 transitions"
    );
}

#[tokio::test]
async fn a_cluster_runs_one_script_call_per_node_for_the_transitions_sent_together() {
    let nodes = common::cluster_nodes();
    let store = common::cluster_store().await;
    let base = key();
    // Keys over many slots, hence over every master.
    let claims: Vec<_> = futures_util::future::join_all((0..60).map(|n| {
        let store = store.clone();
        let key = format!("{base}:{n}");
        async move { acquire(&store, &key).await }
    }))
    .await;
    for claim in &claims {
        // Loads the script on every master.
        assert!(machine::renew(&store, claim, LEASE).await.unwrap());
    }
    let calls = || nodes.iter().map(|node| evalsha_calls(node)).sum::<u64>();
    let before = (calls(), store.round_trips());
    complete_together(&store, &claims).await;
    let calls = calls() - before.0;
    let round_trips = store.round_trips() - before.1;
    assert!(
        calls <= round_trips && calls < 60,
        "at most one script call per pipeline to a master: {calls} calls in {round_trips} round trips for 60 transitions"
    );
}
