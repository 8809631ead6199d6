//! A store built from a `Config` talks to the Redis that the `Config`
//! names, whatever its kind: here a Redis Cluster (`REDIS_CLUSTER_NODES`),
//! against the 3-master cluster of `common::cluster_nodes` and the
//! standalone Redis at `REDIS_URL`, whose default URL a cluster
//! configuration once handed out.

mod common;

use std::time::Duration;

use amqp_idempotency::Config;
use amqp_idempotency::store::{ClaimOutcome, RedisStore, Token, machine};

#[tokio::test]
async fn a_store_built_from_a_cluster_config_writes_its_records_on_the_cluster() {
    let nodes = common::cluster_nodes();
    let config = Config::from_vars([("REDIS_CLUSTER_NODES", nodes.join(","))])
        .expect("a cluster configuration");
    assert_eq!(
        config.redis_deployment().standalone_url(),
        None,
        "a cluster configuration handed out a standalone URL"
    );
    let store = RedisStore::connect(&config)
        .await
        .expect("connect the store");
    let key = format!("idem:{}:fp", common::unique("connect-cluster"));
    let claimed = machine::claim(&store, &key, &Token::new(), "", Duration::from_secs(30))
        .await
        .expect("claim");
    assert!(matches!(claimed, ClaimOutcome::Acquired(_)), "{claimed:?}");
    // Seen through the cluster (redis-cli -c follows the redirection to the
    // key's master), not on the standalone Redis.
    let on_cluster = common::cluster_cli(&nodes, &["EXISTS", &key]);
    let on_standalone = common::redis_cli_at(&common::redis_url(), &["EXISTS", &key]);
    common::cluster_cli(&nodes, &["DEL", &key]);
    common::redis_cli_at(&common::redis_url(), &["DEL", &key]);
    assert_eq!(
        on_standalone.trim(),
        "0",
        "the record went to the standalone Redis at {}",
        common::redis_url()
    );
    assert_eq!(on_cluster.trim(), "1", "the record is not on the cluster");
}
