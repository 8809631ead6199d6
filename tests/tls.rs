//! TLS with real handshakes: a private redis-server that only speaks TLS,
//! and stunnel in front of the shared RabbitMQ, with certificates made by
//! the openssl CLI for each test. Certificates are always verified: a CA
//! that did not sign the server's certificate, or a certificate for
//! another host, is refused with an error that names the URL (password
//! hidden) and the variable to set.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqp_idempotency::store::{ClaimOutcome, RedisStore, Token, machine};
use amqp_idempotency::{
    Config, HandlerError, IdempotencyLayer, RetryMode, ServeOptions, amqp, serve,
};
use common::{Pki, Stunnel, TlsRedis};
use lapin::ConnectionProperties;
use lapin::message::Delivery;
use lapin::types::FieldTable;
use tower::{Layer, ServiceExt, service_fn};

const LEASE: Duration = Duration::from_secs(5);
const RETENTION: Duration = Duration::from_secs(60);

/// A config read the way a deployment sets it: through the variables.
fn config_from(vars: &[(&str, String)]) -> Config {
    Config::from_lookup(|name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|err| panic!("the TLS settings are accepted: {err}"))
}

fn path(p: std::path::PathBuf) -> String {
    p.display().to_string()
}

/// Claim, complete, and a duplicate seen as done: the store works.
async fn claim_complete_duplicate(store: &RedisStore) {
    let key = format!("idem:{}:order-1", common::unique("tls"));
    let ClaimOutcome::Acquired(claim) = machine::claim(store, &key, &Token::new(), "h", LEASE)
        .await
        .expect("claim over TLS")
    else {
        panic!("a fresh key is ours");
    };
    assert!(
        machine::complete(store, &claim, RETENTION)
            .await
            .expect("complete")
    );
    let duplicate = machine::claim(store, &key, &Token::new(), "h", LEASE)
        .await
        .expect("claim the duplicate");
    assert_eq!(duplicate, ClaimOutcome::Done, "the duplicate is recognised");
}

#[tokio::test]
async fn the_store_works_over_rediss_with_a_private_ca() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, pki.server(), false);
    let config = config_from(&[
        ("REDIS_URL", redis.url()),
        ("REDIS_TLS_CA_FILE", path(pki.ca())),
    ]);
    let store = RedisStore::connect(&config)
        .await
        .unwrap_or_else(|err| panic!("connect over TLS with the private CA: {err}"));
    claim_complete_duplicate(&store).await;
}

#[tokio::test]
async fn the_readme_least_privilege_user_works_over_rediss() {
    let pki = Pki::new();
    // The documented ACL line, as a redis-server `--user` directive.
    let mut user: Vec<String> = common::readme_acl_line("idem-consumer")
        .into_iter()
        .skip(2)
        .map(|word| {
            if word == common::README_PASSWORD {
                ">tls-pw".to_owned()
            } else {
                word
            }
        })
        .collect();
    user.insert(0, "--user".to_owned());
    let redis = TlsRedis::start_with(&pki, pki.server(), false, &user);
    let config = config_from(&[
        (
            "REDIS_URL",
            format!("rediss://idem-consumer:tls-pw@127.0.0.1:{}", redis.port),
        ),
        ("REDIS_TLS_CA_FILE", path(pki.ca())),
    ]);
    let store = RedisStore::connect(&config)
        .await
        .unwrap_or_else(|err| panic!("connect over TLS as idem-consumer: {err}"));
    claim_complete_duplicate(&store).await;
    // The user and password come from the URL: a wrong password is refused.
    let wrong = config_from(&[
        (
            "REDIS_URL",
            format!("rediss://idem-consumer:hunter2@127.0.0.1:{}", redis.port),
        ),
        ("REDIS_TLS_CA_FILE", path(pki.ca())),
    ]);
    let err = RedisStore::connect(&wrong)
        .await
        .expect_err("a wrong password is refused");
    let text = err.to_string();
    assert!(text.contains("REDIS_URL"), "says what to fix: {text}");
    assert!(!text.contains("hunter2"), "no password: {text}");
}

#[tokio::test]
async fn a_redis_certificate_from_an_unrelated_ca_is_refused_naming_what_to_set() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, pki.server(), false);
    let url = format!("rediss://idem:hunter2@127.0.0.1:{}", redis.port);
    let config = config_from(&[
        ("REDIS_URL", url),
        ("REDIS_TLS_CA_FILE", path(pki.other_ca())),
    ]);
    let err = RedisStore::connect(&config)
        .await
        .expect_err("a certificate the configured CA did not sign is refused");
    let text = err.to_string();
    assert!(
        text.contains(&format!("rediss://idem:***@127.0.0.1:{}", redis.port)),
        "names the URL, password hidden: {text}"
    );
    assert!(!text.contains("hunter2"), "no password: {text}");
    assert!(
        text.contains("point REDIS_TLS_CA_FILE at the CA that signed the server's certificate"),
        "says what to set: {text}"
    );
    assert!(
        text.contains(&path(pki.other_ca())),
        "names the file: {text}"
    );
}

#[tokio::test]
async fn without_a_ca_file_a_private_ca_is_not_trusted() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, pki.server(), false);
    let err = RedisStore::connect_url(&redis.url())
        .await
        .expect_err("the platform roots do not hold the test CA");
    let text = err.to_string();
    assert!(text.contains(&redis.url()), "names the URL: {text}");
    assert!(
        text.contains("set REDIS_TLS_CA_FILE to the CA that signed the server's certificate"),
        "says what to set: {text}"
    );
}

#[tokio::test]
async fn a_redis_certificate_for_another_host_is_refused_naming_the_host() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, pki.elsewhere(), false);
    let config = config_from(&[
        ("REDIS_URL", redis.url()),
        ("REDIS_TLS_CA_FILE", path(pki.ca())),
    ]);
    let err = RedisStore::connect(&config)
        .await
        .expect_err("a certificate for elsewhere.example is refused for 127.0.0.1");
    let text = err.to_string();
    assert!(text.contains(&redis.url()), "names the URL: {text}");
    assert!(
        text.contains("not valid for the host `127.0.0.1`"),
        "names the host: {text}"
    );
    assert!(text.contains("REDIS_URL"), "says what to change: {text}");
}

#[tokio::test]
async fn a_redis_that_requires_client_certificates_accepts_ours_and_refuses_none() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, pki.server(), true);
    let (cert, key) = pki.client();
    let without = config_from(&[
        ("REDIS_URL", redis.url()),
        ("REDIS_TLS_CA_FILE", path(pki.ca())),
    ]);
    let err = match RedisStore::connect(&without).await {
        Err(err) => err,
        // TLS 1.3: the server may only refuse after the handshake, on the
        // first request.
        Ok(store) => machine::claim(&store, "idem:q:no-cert", &Token::new(), "h", LEASE)
            .await
            .expect_err("a connection without a client certificate is refused"),
    };
    let text = err.to_string();
    assert!(
        text.contains("set REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE"),
        "says what to set: {text}"
    );
    let with = config_from(&[
        ("REDIS_URL", redis.url()),
        ("REDIS_TLS_CA_FILE", path(pki.ca())),
        ("REDIS_TLS_CERT_FILE", path(cert)),
        ("REDIS_TLS_KEY_FILE", path(key)),
    ]);
    let store = RedisStore::connect(&with)
        .await
        .unwrap_or_else(|err| panic!("connect with the client certificate: {err}"));
    claim_complete_duplicate(&store).await;
}

#[tokio::test]
async fn serve_runs_end_to_end_over_amqps_and_rediss() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, pki.server(), false);
    let tunnel = Stunnel::start(&pki, false);
    // Published over plain AMQP, consumed through the TLS tunnel.
    let plain = common::amqp().await;
    let setup = plain.create_channel().await.expect("open a channel");
    let queue = common::declare_queue(&setup, "tls").await;
    common::publish(&setup, &queue.name, b"register alice", Some("user-1")).await;
    common::publish(&setup, &queue.name, b"register alice", Some("user-1")).await;

    let config = config_from(&[
        ("REDIS_URL", redis.url()),
        ("REDIS_TLS_CA_FILE", path(pki.ca())),
        ("AMQP_URL", tunnel.url()),
        ("AMQP_TLS_CA_FILE", path(pki.ca())),
        ("IDEMPOTENCY_KEY_PREFIX", common::unique("p")),
    ]);
    let connection = amqp::connect(&config, ConnectionProperties::default())
        .await
        .unwrap_or_else(|err| panic!("connect to RabbitMQ through stunnel: {err}"));
    let (channel, consumer) = common::consume(&connection, &queue.name, 8).await;
    let store = RedisStore::connect(&config)
        .await
        .unwrap_or_else(|err| panic!("connect to Redis over TLS: {err}"));
    let runs = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let o = outcomes.clone();
    let service = IdempotencyLayer::new(store, &queue.name, config.clone())
        .expect("layer")
        .layer(service_fn(move |_d: Delivery| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        }))
        .map_response(move |outcome| {
            o.fetch_add(1, Ordering::SeqCst);
            outcome
        });
    let seen = outcomes.clone();
    let options = ServeOptions::new()
        .retry(RetryMode::Hold)
        .concurrency(8)
        .shutdown_on(async move {
            let done = common::eventually(Duration::from_secs(30), || {
                let seen = seen.clone();
                async move { seen.load(Ordering::SeqCst) >= 2 }
            })
            .await;
            if !done {
                eprintln!("both deliveries not seen in 30s; stopping the runner");
            }
        })
        .close_channel(channel);
    let report = serve(consumer, service, options)
        .await
        .expect("serve over amqps");
    let _ = connection.close(200, "OK".into()).await;

    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler runs once for two copies"
    );
    assert_eq!(report.acked, 2, "both copies acked: {report:?}");
    assert_eq!(common::ready_count(&setup, &queue.name).await, 0);
    assert_eq!(common::ready_count(&setup, &queue.dead).await, 0);
    queue.delete(&setup).await;
}

#[tokio::test]
async fn a_broker_certificate_from_an_unrelated_ca_is_refused_naming_what_to_set() {
    let pki = Pki::new();
    let tunnel = Stunnel::start(&pki, false);
    let config = config_from(&[
        ("AMQP_URL", tunnel.url()),
        ("AMQP_TLS_CA_FILE", path(pki.other_ca())),
    ]);
    let err = amqp::connect(&config, ConnectionProperties::default())
        .await
        .expect_err("a certificate the configured CA did not sign is refused");
    let text = err.to_string();
    let shown = amqp_idempotency::redact_url(&tunnel.url());
    assert!(text.contains(&shown), "names the URL ({shown}): {text}");
    assert!(shown.contains(":***@"), "the password is hidden: {shown}");
    assert!(
        text.contains("point AMQP_TLS_CA_FILE at the CA that signed the server's certificate"),
        "says what to set: {text}"
    );
    assert_eq!(err.url(), shown);
    assert!(
        err.is_tls() && !err.is_io(),
        "a TLS failure, not worth retrying"
    );
}

#[tokio::test]
async fn a_broker_that_requires_client_certificates_accepts_ours() {
    let pki = Pki::new();
    let tunnel = Stunnel::start(&pki, true);
    let (cert, key) = pki.client();
    let config = config_from(&[
        ("AMQP_URL", tunnel.url()),
        ("AMQP_TLS_CA_FILE", path(pki.ca())),
        ("AMQP_TLS_CERT_FILE", path(cert)),
        ("AMQP_TLS_KEY_FILE", path(key)),
    ]);
    let connection = amqp::connect(&config, ConnectionProperties::default())
        .await
        .unwrap_or_else(|err| panic!("connect with the client certificate: {err}"));
    let channel = connection.create_channel().await.expect("open a channel");
    let queue = common::declare_queue(&channel, "mtls").await;
    common::publish(&channel, &queue.name, b"x", Some("m-1")).await;
    assert_eq!(common::ready_count(&channel, &queue.name).await, 1);
    queue.delete(&channel).await;
    let _ = connection.close(200, "OK".into()).await;

    let without = config_from(&[
        ("AMQP_URL", tunnel.url()),
        ("AMQP_TLS_CA_FILE", path(pki.ca())),
    ]);
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        amqp::connect(&without, ConnectionProperties::default()),
    )
    .await
    .expect("refused within 20s");
    let err = refused.expect_err("a connection without a client certificate is refused");
    let text = err.to_string();
    assert!(
        text.contains("set AMQP_TLS_CERT_FILE and AMQP_TLS_KEY_FILE"),
        "says what to set: {text}"
    );
}

#[tokio::test]
async fn lapin_recovery_reconnects_over_tls_reading_the_files_again() {
    let pki = Pki::new();
    // The broker requires a client certificate, so the reconnect, which
    // builds its TLS settings from the files again, must present it too.
    let tunnel = Stunnel::start(&pki, true);
    let proxy = common::Proxy::start(tunnel.port).await;
    let mut url = url::Url::parse(&tunnel.url()).expect("the tunnel's URL");
    url.set_port(Some(proxy.port)).expect("a port");
    let (cert, key) = pki.client();
    let config = config_from(&[
        ("AMQP_URL", url.to_string()),
        ("AMQP_TLS_CA_FILE", path(pki.ca())),
        ("AMQP_TLS_CERT_FILE", path(cert)),
        ("AMQP_TLS_KEY_FILE", path(key)),
    ]);
    let connection = amqp::connect(
        &config,
        ConnectionProperties::default().enable_auto_recover(),
    )
    .await
    .unwrap_or_else(|err| panic!("connect through the proxy and stunnel: {err}"));
    let channel = connection.create_channel().await.expect("open a channel");
    let queue = common::declare_queue(&channel, "tls-recover").await;
    assert!(proxy.cut() >= 1, "the connection ran through the proxy");
    let recovered = common::eventually(Duration::from_secs(20), || {
        let channel = channel.clone();
        let name = queue.name.clone();
        async move {
            let declare = channel.queue_declare(
                name.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            );
            // A call on a channel still recovering may wait: bounded.
            matches!(
                tokio::time::timeout(Duration::from_secs(2), declare).await,
                Ok(Ok(_))
            )
        }
    })
    .await;
    let status = format!("{:?}", connection.status());
    let _ = tokio::time::timeout(Duration::from_secs(5), queue.delete(&channel)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, "OK".into())).await;
    assert!(
        recovered,
        "lapin recovered the connection over TLS with the client certificate: {status}"
    );
}
