//! A store that takes the pause's write probe but refuses claims, against
//! a private real Redis: the held delivery backs off, and the pause is
//! logged once when it starts and once when it ends.
//!
//! A test binary of its own: it reads the log lines of the one test it
//! runs, which a subscriber set for its thread only sees reliably when no
//! other test registers the same call sites from another thread.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqp_idempotency::store::RedisStore;
use amqp_idempotency::{Config, HandlerError, IdempotencyLayer, OutcomeKind};
use common::{PrivateRedis, redis_cli};
use lapin::BasicProperties;
use lapin::message::Delivery;
use tower::{Layer, ServiceExt, service_fn};

fn delivery(id: &str) -> Delivery {
    let mut d = Delivery::mock(1, "".into(), "q".into(), false, b"x".to_vec());
    d.properties = BasicProperties::default().with_message_id(id.into());
    d
}

/// Log lines, kept for a test to read.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut kept) => kept.extend_from_slice(bytes),
            Err(poisoned) => poisoned.into_inner().extend_from_slice(bytes),
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        let kept = self.0.lock().map(|kept| kept.clone()).unwrap_or_default();
        String::from_utf8_lossy(&kept)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// `rejected_calls` of `SET` in `INFO commandstats`: requests the ACL refused.
fn rejected_sets(port: u16) -> u64 {
    let stats = redis_cli(port, None, &["INFO", "commandstats"]);
    stats
        .lines()
        .find(|line| line.starts_with("cmdstat_set:"))
        .and_then(|line| {
            line.split(',')
                .find_map(|field| field.strip_prefix("rejected_calls="))
        })
        .map_or(0, |n| n.trim().parse().unwrap_or(0))
}

/// A user that may write keys but not read them: a plain `SET` (what the
/// pause's write probe used to send) is accepted, a claim (`SET ... GET`)
/// refused. The held delivery must back off between claims instead of
/// claiming again as soon as the probe passes, and the pause must log one
/// line when it starts and one when it ends, not one per refusal.
#[tokio::test(flavor = "current_thread")]
async fn a_claim_refused_while_the_probe_passes_backs_off() {
    let redis = PrivateRedis::start();
    redis_cli(
        redis.port,
        None,
        &["ACL", "SETUSER", "writer", "on", ">pw", "%W~*", "+@all"],
    );
    let url = format!("redis://writer:pw@127.0.0.1:{}", redis.port);
    let store = RedisStore::connect_url(&url)
        .await
        .expect("connect as writer");
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let svc = IdempotencyLayer::new(store, "q", Config::default())
        .expect("layer")
        .layer(service_fn(move |_d: Delivery| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        }));
    let call = tokio::spawn(svc.oneshot(delivery("refused")));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused = rejected_sets(redis.port);
    assert!(refused >= 1, "the claim was refused at least once");
    assert!(
        refused <= 40,
        "a refused claim backs off (100 ms doubling): {refused} refused requests in 2 s"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no run while refused");

    // Reading is granted: the held delivery is processed.
    redis_cli(redis.port, None, &["ACL", "SETUSER", "writer", "%R~*"]);
    let outcome = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("processed once the claim is allowed")
        .expect("no panic")
        .expect("an outcome");
    assert_eq!(outcome.kind(), OutcomeKind::Processed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let lines = logs.lines();
    let errors = lines.iter().filter(|line| line.contains("ERROR")).count();
    let paused = lines.iter().filter(|line| line.contains("pausing")).count();
    let resumed: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("resuming"))
        .collect();
    assert_eq!(
        (errors, paused, resumed.len()),
        (1, 1, 1),
        "one line when the pause starts (the only ERROR), one when it ends: {lines:#?}"
    );
    assert!(
        resumed[0].contains("refused="),
        "the end of the pause counts the refusals: {}",
        resumed[0]
    );
}
