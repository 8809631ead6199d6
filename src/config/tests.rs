//! Unit tests of the configuration.

use super::env::{RESERVED_PREFIXES, VARIABLES};
use super::*;

fn lookup(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

#[test]
fn an_unknown_variable_under_a_reserved_prefix_is_refused_with_the_closest_name() {
    for (typo, meant) in [
        ("IDEMPOTENCY_MIN_REPLICA", "IDEMPOTENCY_MIN_REPLICAS"),
        ("IDEMPOTENCY_LEASE_TIME", "IDEMPOTENCY_LEASE_TTL"),
        (
            "IDEMPOTENCY_RETRY_BACKOF_MAX",
            "IDEMPOTENCY_RETRY_BACKOFF_MAX",
        ),
        ("idempotency_min_replicas", "IDEMPOTENCY_MIN_REPLICAS"),
        ("REDIS_TLS_CA", "REDIS_TLS_CA_FILE"),
        ("AMQP_TLS_CERT_FIEL", "AMQP_TLS_CERT_FILE"),
        ("REDIS_CLUSTER_NODE", "REDIS_CLUSTER_NODES"),
    ] {
        let err = Config::from_vars([(typo, "1"), ("HOME", "/root")]).expect_err(typo);
        assert_eq!(err.variable(), typo);
        assert!(err.expected().contains(meant), "{typo}: {err}");
    }
    let err = Config::from_vars([("REDIS_SENTINEL_MASTER", "orders")]).unwrap_err();
    assert_eq!(err.variable(), "REDIS_SENTINEL_MASTER");
    assert!(err.expected().contains("did you mean REDIS_URL?"), "{err}");
    assert!(err.expected().contains("redis-sentinel://"), "{err}");
    // Several: all are named, the first (in name order) as the variable.
    let err =
        Config::from_vars([("IDEMPOTENCY_SCOPES", "a"), ("IDEMPOTENCY_LEASE", "1s")]).unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_LEASE");
    assert!(err.expected().contains("IDEMPOTENCY_SCOPES"), "{err}");
    // A password in an unknown variable's URL is not shown.
    let err = Config::from_vars([("REDIS_CLUSTER_URL", "redis://u:hunter2@h:1")]).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn variables_outside_the_reserved_prefixes_are_ignored_and_known_ones_read() {
    let config = Config::from_vars([
        ("IDEMPOTENCY_MIN_REPLICAS", "2"),
        ("REDIS_HOST", "elsewhere"),
        ("AMQP_URLS", "amqp://x"),
        ("REDIS_TLS", "yes"),
        ("MY_IDEMPOTENCY_SETTING", "1"),
        ("PATH", "/usr/bin"),
    ])
    .unwrap();
    assert_eq!(config.min_replicas, 2);
    assert_eq!(
        Config::from_vars(std::iter::empty::<(&str, &str)>()),
        Ok(Config::default())
    );
}

#[test]
fn the_variables_kubernetes_sets_for_a_service_are_not_typos() {
    // A Service named `redis-cluster`, `redis-sentinel` or `idempotency`.
    let config = Config::from_vars([
        ("REDIS_CLUSTER_SERVICE_HOST", "10.0.0.7"),
        ("REDIS_CLUSTER_SERVICE_PORT", "6379"),
        ("REDIS_CLUSTER_SERVICE_PORT_REDIS", "6379"),
        ("REDIS_CLUSTER_PORT", "tcp://10.0.0.7:6379"),
        ("REDIS_CLUSTER_PORT_6379_TCP", "tcp://10.0.0.7:6379"),
        ("REDIS_CLUSTER_PORT_6379_TCP_ADDR", "10.0.0.7"),
        ("REDIS_CLUSTER_PORT_6379_TCP_PORT", "6379"),
        ("REDIS_CLUSTER_PORT_6379_TCP_PROTO", "tcp"),
        ("REDIS_SENTINEL_SERVICE_HOST", "10.0.0.8"),
        ("IDEMPOTENCY_PORT_9000_TCP", "tcp://10.0.0.9:9000"),
    ]);
    assert_eq!(config, Ok(Config::default()));
    // Near misses are still typos.
    for typo in [
        "REDIS_CLUSTER_NODE",
        "REDIS_CLUSTER_PORTS",
        "IDEMPOTENCY_PORT_X_TCP",
    ] {
        let err = Config::from_vars([(typo, "x")]).unwrap_err();
        assert_eq!(err.variable(), typo, "{err}");
    }
}

#[cfg(unix)]
#[test]
fn a_name_that_is_not_utf8_is_refused_only_under_a_reserved_prefix() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let under = OsString::from_vec(b"IDEMPOTENCY_LEASE_TTL\xff".to_vec());
    let err = Config::from_vars([(under, OsString::from("1s"))]).unwrap_err();
    assert!(err.variable().starts_with("IDEMPOTENCY_LEASE_TTL"), "{err}");
    assert!(err.expected().contains("IDEMPOTENCY_LEASE_TTL"), "{err}");
    let elsewhere = OsString::from_vec(b"\xffIDEMPOTENCY_LEASE_TTL".to_vec());
    assert!(Config::from_vars([(elsewhere, OsString::from("1s"))]).is_ok());
    // A value that is not UTF-8 is refused as malformed, with the variable.
    let value = OsString::from_vec(b"30\xffs".to_vec());
    let err = Config::from_vars([(OsString::from("IDEMPOTENCY_LEASE_TTL"), value)]).unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_LEASE_TTL");
}

#[test]
fn the_table_of_variables_is_what_from_lookup_reads_and_the_readme_lists() {
    let asked = std::cell::RefCell::new(Vec::new());
    Config::from_lookup(|name| {
        asked.borrow_mut().push(name.to_owned());
        None
    })
    .unwrap();
    let mut asked = asked.into_inner();
    asked.sort();
    asked.dedup();
    let mut table: Vec<String> = VARIABLES.iter().map(|name| (*name).to_owned()).collect();
    table.sort();
    assert_eq!(
        asked, table,
        "config::VARIABLES and what from_lookup reads differ"
    );
    let readme = include_str!("../../README.md");
    for name in VARIABLES {
        assert!(
            readme.contains(&format!("`{name}`")),
            "the README's configuration table does not list {name}"
        );
    }
    for name in VARIABLES {
        assert!(
            RESERVED_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
                || ["REDIS_URL", "AMQP_URL"].contains(name),
            "{name} is under no reserved prefix: a misspelling of it would go unnoticed"
        );
    }
}

#[test]
fn a_config_naming_a_cluster_or_sentinel_hands_out_no_standalone_url() {
    let cluster =
        Config::from_vars([("REDIS_CLUSTER_NODES", "redis://:pw@b:2,redis://c:3")]).unwrap();
    assert_eq!(cluster.redis_deployment().standalone_url(), None);
    assert_eq!(
        cluster.redis_deployment(),
        RedisDeployment::Cluster(&["redis://:pw@b:2".to_owned(), "redis://c:3".to_owned()])
    );
    assert!(
        !format!(
            "{:?} {}",
            cluster.redis_deployment(),
            cluster.redis_deployment()
        )
        .contains("pw")
    );
    let sentinel = Config::from_vars([("REDIS_URL", "redis-sentinel://s1:26379#orders")]).unwrap();
    assert_eq!(sentinel.redis_deployment().standalone_url(), None);
    assert_eq!(
        sentinel.redis_deployment(),
        RedisDeployment::Sentinel("redis-sentinel://s1:26379#orders")
    );
    assert_eq!(
        Config::default().redis_deployment().standalone_url(),
        Some("redis://127.0.0.1:6379")
    );
    // The builder: a URL after the nodes clears them.
    let url = cluster.with_redis_url("redis://d:4");
    assert_eq!(
        url.redis_deployment(),
        RedisDeployment::Standalone("redis://d:4")
    );
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
    assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
    assert_eq!(parse_duration(" 5m "), Some(Duration::from_secs(300)));
    for bad in [
        "",
        "30",
        "s",
        "0s",
        "-1s",
        "1.5s",
        "30sec",
        "99999999999999999999h",
    ] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}

#[test]
fn defaults_match_the_design() {
    let config = Config::from_lookup(|_| None).unwrap();
    assert_eq!(config, Config::default());
    assert_eq!(config.lease_ttl, Duration::from_secs(30));
    assert_eq!(config.done_ttl, Duration::from_secs(86_400));
    assert_eq!(config.prefetch, 64);
    assert_eq!(config.max_attempts, 5);
    assert_eq!(config.on_store_error, StoreFailurePolicy::FailClosed);
}

#[test]
fn every_variable_is_read() {
    let config = Config::from_lookup(lookup(&[
        ("REDIS_URL", "redis://r:1"),
        ("AMQP_URL", "amqp://a"),
        ("IDEMPOTENCY_KEY_PREFIX", "shop"),
        ("IDEMPOTENCY_SCOPE", "billing"),
        ("IDEMPOTENCY_LEASE_TTL", "10s"),
        ("IDEMPOTENCY_DONE_TTL", "1h"),
        ("IDEMPOTENCY_HANDLER_TIMEOUT", "9s"),
        ("IDEMPOTENCY_PREFETCH", "8"),
        ("IDEMPOTENCY_IN_PROGRESS_WAIT", "0s"),
        ("IDEMPOTENCY_MAX_ATTEMPTS", "3"),
        ("IDEMPOTENCY_ON_STORE_ERROR", "fail-open"),
        ("IDEMPOTENCY_ON_MISSING_FINGERPRINT", "pass-through"),
        ("IDEMPOTENCY_VERIFY_PAYLOAD", "false"),
        ("IDEMPOTENCY_MAX_BODY_BYTES", "1024"),
        ("IDEMPOTENCY_CONSUMER_TIMEOUT", "1h"),
    ]))
    .unwrap();
    assert_eq!(config.consumer_timeout, Duration::from_secs(3600));
    assert_eq!(config.redis_url, "redis://r:1");
    assert_eq!(config.amqp_url, "amqp://a");
    assert_eq!(config.key_prefix, "shop");
    assert_eq!(config.scope.as_deref(), Some("billing"));
    assert_eq!(config.lease_ttl, Duration::from_secs(10));
    assert_eq!(config.done_ttl, Duration::from_secs(3600));
    assert_eq!(config.handler_timeout, Duration::from_secs(9));
    assert_eq!(config.prefetch, 8);
    assert_eq!(
        config.in_progress_wait,
        Duration::ZERO,
        "0s turns waiting off"
    );
    assert_eq!(config.max_attempts, 3);
    assert_eq!(config.on_store_error, StoreFailurePolicy::FailOpen);
    assert_eq!(
        config.on_missing_fingerprint,
        NoFingerprintPolicy::PassThrough
    );
    assert!(!config.verify_payload);
    assert_eq!(config.max_body_bytes, Some(1024));
}

#[test]
fn a_bad_value_names_variable_value_and_expectation() {
    let err = Config::from_lookup(lookup(&[("IDEMPOTENCY_LEASE_TTL", "thirty")])).unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_LEASE_TTL");
    assert_eq!(err.value(), "thirty");
    assert!(err.expected().contains("30s"));
    let err = Config::from_lookup(lookup(&[("IDEMPOTENCY_PREFETCH", "0")])).unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_PREFETCH");
    let err = Config::from_lookup(lookup(&[("IDEMPOTENCY_ON_STORE_ERROR", "open")])).unwrap_err();
    assert_eq!(err.value(), "open");
}

#[test]
fn inconsistent_values_are_refused() {
    let err = Config::from_lookup(lookup(&[
        ("IDEMPOTENCY_LEASE_TTL", "1h"),
        ("IDEMPOTENCY_DONE_TTL", "10m"),
    ]))
    .unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_DONE_TTL");
    let err = Config::default()
        .with_lease_ttl(Duration::from_secs(5))
        .validate()
        .unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_HANDLER_TIMEOUT");
    assert!(err.expected().contains("LEASE_TTL"));
}

#[test]
fn a_retention_shorter_than_the_retries_is_refused_with_the_smallest_valid_value() {
    // The case: the released record (which counts the attempts)
    // expired before the held copy came back, so max attempts never hit.
    let err = Config::from_lookup(lookup(&[
        ("IDEMPOTENCY_LEASE_TTL", "1s"),
        ("IDEMPOTENCY_HANDLER_TIMEOUT", "500ms"),
        ("IDEMPOTENCY_DONE_TTL", "1s"),
        ("IDEMPOTENCY_RETRY_BACKOFF", "1500ms"),
        ("IDEMPOTENCY_RETRY_BACKOFF_MAX", "1500ms"),
        ("IDEMPOTENCY_MAX_ATTEMPTS", "2"),
    ]))
    .unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_DONE_TTL", "{err}");
    assert_eq!(err.value(), "1s");
    assert!(
        err.expected().contains("IDEMPOTENCY_RETRY_BACKOFF_MAX"),
        "{err}"
    );
    assert!(err.expected().contains("IDEMPOTENCY_LEASE_TTL"), "{err}");
    assert!(err.expected().contains("at least 2500ms"), "{err}");
    // The default backoff cap (30s) with a one-second lease.
    let err = Config::default()
        .with_lease_ttl(Duration::from_secs(1))
        .with_handler_timeout(Duration::from_millis(500))
        .with_done_ttl(Duration::from_secs(10))
        .validate()
        .unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_DONE_TTL");
    assert!(err.expected().contains("at least 31s"), "{err}");
    // The smallest valid value is valid; a millisecond less is not.
    let at = |done: Duration| {
        Config::default()
            .with_lease_ttl(Duration::from_secs(1))
            .with_handler_timeout(Duration::from_millis(500))
            .with_retry_backoff(Duration::from_millis(100))
            .with_retry_backoff_max(Duration::from_millis(1500))
            .with_done_ttl(done)
            .validate()
    };
    assert_eq!(at(Duration::from_millis(2500)), Ok(()));
    assert_eq!(
        at(Duration::from_millis(2499)).map_err(|err| err.variable().to_owned()),
        Err("IDEMPOTENCY_DONE_TTL".to_owned())
    );
}

#[test]
fn an_outbox_commit_outlives_the_hold_of_an_undispatched_delivery() {
    let config = Config::default()
        .with_lease_ttl(Duration::from_secs(1))
        .with_handler_timeout(Duration::from_millis(500))
        .with_retry_backoff(Duration::from_millis(100))
        .with_retry_backoff_max(Duration::from_secs(2))
        .with_done_ttl(Duration::from_secs(5))
        .with_consumer_timeout(Duration::from_secs(600));
    assert_eq!(config.validate(), Ok(()));
    // Held up to consumer_timeout / 2, then requeued with a backoff,
    // then possibly behind a claim in progress: 300s + 2s + 1s.
    assert_eq!(config.outbox_retention(), Duration::from_secs(303));
    // A longer retention is kept as it is.
    let long = config.with_done_ttl(Duration::from_secs(3600));
    assert_eq!(long.outbox_retention(), Duration::from_secs(3600));
}

#[test]
fn waits_longer_than_the_brokers_consumer_timeout_are_refused() {
    let err = Config::from_lookup(lookup(&[("IDEMPOTENCY_RETRY_BACKOFF_MAX", "31m")])).unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_RETRY_BACKOFF_MAX");
    assert!(err.expected().contains("consumer_timeout"), "{err}");
    let err = Config::from_lookup(lookup(&[("IDEMPOTENCY_IN_PROGRESS_WAIT", "40m")])).unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_IN_PROGRESS_WAIT");
    let err = Config::from_lookup(lookup(&[
        ("IDEMPOTENCY_LEASE_TTL", "20m"),
        ("IDEMPOTENCY_HANDLER_TIMEOUT", "10m"),
    ]))
    .unwrap_err();
    assert_eq!(err.variable(), "IDEMPOTENCY_LEASE_TTL");
    // A broker configured for longer: raise the bound with it.
    let config = Config::from_lookup(lookup(&[
        ("IDEMPOTENCY_LEASE_TTL", "20m"),
        ("IDEMPOTENCY_HANDLER_TIMEOUT", "10m"),
        ("IDEMPOTENCY_CONSUMER_TIMEOUT", "2h"),
    ]));
    assert!(config.is_ok(), "{config:?}");
}

#[test]
fn dead_letter_targets_are_read_and_contradictions_refused() {
    let read = |pairs: &'static [(&'static str, &'static str)]| {
        Config::from_lookup(lookup(pairs)).map(|c| c.dead_letters)
    };
    assert_eq!(read(&[]), Ok(DeadLetterTarget::ParkingQueue(None)));
    assert_eq!(
        read(&[("IDEMPOTENCY_DEAD_LETTERS", "broker")]),
        Ok(DeadLetterTarget::Broker)
    );
    assert_eq!(
        read(&[
            ("IDEMPOTENCY_DEAD_LETTER_EXCHANGE", "errors"),
            ("IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY", "orders"),
        ]),
        Ok(DeadLetterTarget::Exchange {
            exchange: "errors".into(),
            routing_key: Some("orders".into())
        })
    );
    for bad in [
        &[("IDEMPOTENCY_DEAD_LETTERS", "drop")][..],
        &[
            ("IDEMPOTENCY_DEAD_LETTERS", "broker"),
            ("IDEMPOTENCY_DEAD_LETTER_QUEUE", "q.dead"),
        ],
        &[
            ("IDEMPOTENCY_DEAD_LETTER_QUEUE", "q.dead"),
            ("IDEMPOTENCY_DEAD_LETTER_EXCHANGE", "errors"),
        ],
        &[("IDEMPOTENCY_DEAD_LETTER_ROUTING_KEY", "k")],
    ] {
        let err = read(bad).expect_err("refused");
        assert!(
            err.variable().starts_with("IDEMPOTENCY_DEAD_LETTER"),
            "{err}"
        );
    }
}

#[test]
fn debug_output_hides_the_passwords_in_the_urls() {
    let config = Config::default()
        .with_redis_url("rediss://idem:hunter2@redis.internal:6380/0")
        .with_amqp_url("amqps://app:s3cr3t@rabbit.internal/%2f");
    let shown = format!("{config:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("s3cr3t"), "{shown}");
    assert!(
        shown.contains("rediss://idem:***@redis.internal:6380/0"),
        "{shown}"
    );
    assert!(
        shown.contains("amqps://app:***@rabbit.internal/%2f"),
        "{shown}"
    );
    assert!(shown.contains("lease_ttl: 30s"), "{shown}");
    let shown = format!("{config:#?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cr3t"),
        "{shown}"
    );
}

#[test]
fn tls_variables_are_read_and_checked() {
    let err = Config::from_lookup(lookup(&[
        ("REDIS_URL", "rediss://r:6380"),
        ("REDIS_TLS_CERT_FILE", "/etc/idem/client.pem"),
    ]))
    .unwrap_err();
    assert_eq!(err.variable(), "REDIS_TLS_KEY_FILE", "{err}");
    assert!(err.expected().contains("/etc/idem/client.pem"), "{err}");
    let err = Config::from_lookup(lookup(&[
        ("AMQP_URL", "amqps://a/%2f"),
        ("AMQP_TLS_KEY_FILE", "/etc/idem/client.key"),
    ]))
    .unwrap_err();
    assert_eq!(err.variable(), "AMQP_TLS_CERT_FILE", "{err}");
    let err = Config::from_lookup(lookup(&[
        ("AMQP_URL", "amqps://a/%2f"),
        ("AMQP_TLS_CA_FILE", "/nonexistent/ca.pem"),
    ]))
    .unwrap_err();
    assert_eq!(err.variable(), "AMQP_TLS_CA_FILE");
    assert_eq!(err.value(), "/nonexistent/ca.pem");
    assert!(err.to_string().contains("reading it failed"), "{err}");
    let err = Config::from_lookup(lookup(&[
        ("REDIS_URL", "redis://u:hunter2@r:6379"),
        ("REDIS_TLS_CA_FILE", "/etc/idem/ca.pem"),
    ]))
    .unwrap_err();
    assert_eq!(err.variable(), "REDIS_TLS_CA_FILE");
    assert!(err.expected().contains("rediss://"), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn tls_files_have_builder_methods() {
    let config = Config::default()
        .with_redis_url("rediss://r:6380")
        .with_redis_tls_ca_file("/ca.pem")
        .with_redis_tls_cert_file("/c.pem")
        .with_redis_tls_key_file("/k.pem")
        .with_amqp_url("amqps://a/%2f")
        .with_amqp_tls_ca_file("/a-ca.pem");
    assert!(config.validate().is_ok());
    assert_eq!(
        config.redis_tls().key_file(),
        Some(std::path::Path::new("/k.pem"))
    );
    assert_eq!(
        config.amqp_tls().ca_file(),
        Some(std::path::Path::new("/a-ca.pem"))
    );
    assert!(config.amqp_tls().cert_file().is_none());
    let err = config
        .with_amqp_tls_key_file("/a-k.pem")
        .validate()
        .unwrap_err();
    assert_eq!(err.variable(), "AMQP_TLS_CERT_FILE");
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let config = Config::default()
        .with_retry_backoff(Duration::from_millis(100))
        .with_retry_backoff_max(Duration::from_millis(350));
    assert_eq!(config.backoff(1), Duration::from_millis(100));
    assert_eq!(config.backoff(2), Duration::from_millis(200));
    assert_eq!(config.backoff(3), Duration::from_millis(350));
    assert_eq!(config.backoff(60), Duration::from_millis(350));
}

#[test]
fn cluster_sentinel_and_replica_settings_are_read_and_checked() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let both = Config::from_lookup(env(&[
        ("REDIS_URL", "redis://a:1"),
        ("REDIS_CLUSTER_NODES", "redis://b:2"),
    ]))
    .unwrap_err();
    assert_eq!(both.variable(), "REDIS_CLUSTER_NODES");
    let cluster =
        Config::from_lookup(env(&[("REDIS_CLUSTER_NODES", "redis://b:2, redis://c:3")])).unwrap();
    assert_eq!(
        cluster.redis_cluster_nodes(),
        ["redis://b:2", "redis://c:3"]
    );
    let sentinel = Config::from_lookup(env(&[
        ("REDIS_URL", "redis-sentinel://s1:26379,s2:26379#orders"),
        ("IDEMPOTENCY_MIN_REPLICAS", "1"),
        ("IDEMPOTENCY_REPLICA_TIMEOUT", "250ms"),
    ]))
    .unwrap();
    assert_eq!(
        (sentinel.min_replicas(), sentinel.replica_timeout()),
        (1, Duration::from_millis(250))
    );
    let no_master =
        Config::from_lookup(env(&[("REDIS_URL", "redis-sentinel://s1:26379")])).unwrap_err();
    assert_eq!(no_master.variable(), "REDIS_URL");
    let bad = Config::from_lookup(env(&[("IDEMPOTENCY_MIN_REPLICAS", "two")])).unwrap_err();
    assert_eq!(bad.variable(), "IDEMPOTENCY_MIN_REPLICAS");
}

#[test]
fn the_retry_schedule_doubles_up_to_the_cap_with_each_step_once() {
    let ms = Duration::from_millis;
    assert_eq!(
        Config::default().retry_schedule(),
        [
            ms(500),
            ms(1000),
            ms(2000),
            ms(4000),
            ms(8000),
            ms(16000),
            ms(30000)
        ]
    );
    let flat = Config::default()
        .with_retry_backoff(ms(100))
        .with_retry_backoff_max(ms(100));
    assert_eq!(flat.retry_schedule(), [ms(100)]);
    for step in Config::default().retry_schedule() {
        assert!((1..=30).any(|n| Config::default().backoff(n) == step));
    }
}
