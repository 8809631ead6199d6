//! Lease expiry while a handler is paused, against the real Redis.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqp_idempotency::records::{Record, State};
use amqp_idempotency::store::Store;
use amqp_idempotency::{Config, HandlerError, IdempotencyLayer, OutcomeKind};
use lapin::BasicProperties;
use lapin::message::Delivery;
use tower::{Layer, ServiceExt, service_fn};

/// What a stored value says, read through the public records API.
fn state(value: &[u8]) -> State {
    Record::decode("", (value.to_vec(), None)).state().clone()
}

fn delivery() -> Delivery {
    let mut d = Delivery::mock(1, "".into(), "q".into(), false, b"x".to_vec());
    d.properties = BasicProperties::default().with_message_id("invoice-9".into());
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_paused_past_its_lease_loses_the_claim_and_says_so() {
    let prefix = common::unique("lease");
    let config = Config::default()
        .with_key_prefix(&prefix)
        .with_lease_ttl(Duration::from_millis(1000))
        .with_handler_timeout(Duration::from_millis(900))
        .with_in_progress_wait(Duration::ZERO);
    let effects = Arc::new(AtomicUsize::new(0));

    // Consumer A freezes mid-handler (like SIGSTOP): its whole runtime,
    // renewals included, runs on one thread that the handler blocks.
    let e = effects.clone();
    let a_config = config.clone();
    let a = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for consumer A");
        runtime.block_on(async move {
            let paused = IdempotencyLayer::new(common::redis_store().await, "q", a_config)
                .unwrap()
                .layer(service_fn(move |_d: Delivery| {
                    let e = e.clone();
                    async move {
                        e.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(1600));
                        Ok::<_, HandlerError>(())
                    }
                }));
            paused.oneshot(delivery()).await
        })
    });

    // Consumer B gets the redelivered copy after A's lease expired.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let e = effects.clone();
    let healthy = IdempotencyLayer::new(common::redis_store().await, "q", config)
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            e.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        }));
    let b = healthy.oneshot(delivery()).await.unwrap();
    assert_eq!(
        b.kind(),
        OutcomeKind::Processed,
        "the expired claim was taken over"
    );

    let a = tokio::task::spawn_blocking(move || a.join())
        .await
        .unwrap()
        .expect("consumer A's thread")
        .unwrap();
    assert_eq!(
        a.kind(),
        OutcomeKind::LeaseLost,
        "A learns it lost the claim"
    );
    assert_eq!(
        effects.load(Ordering::SeqCst),
        2,
        "the documented window: a pause past the lease without fencing runs the effect twice"
    );
    let store = common::redis_store().await;
    let (value, _) = store
        .get(&format!("{prefix}:q:invoice-9"))
        .await
        .unwrap()
        .expect("done record");
    assert!(
        matches!(state(&value), State::Done { .. }),
        "B's done mark stands: {value:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_its_thread_keeps_its_lease_and_times_out() {
    // The handler runs in a task of its own: one that blocks its worker
    // thread (a synchronous driver, CPU work) starves neither the renewals
    // nor the timeout, and no copy runs beside it.
    let prefix = common::unique("blocking");
    let config = Config::default()
        .with_key_prefix(&prefix)
        .with_lease_ttl(Duration::from_millis(1000))
        .with_handler_timeout(Duration::from_millis(900))
        .with_in_progress_wait(Duration::ZERO);
    let effects = Arc::new(AtomicUsize::new(0));
    let e = effects.clone();
    let blocking = IdempotencyLayer::new(common::redis_store().await, "q", config.clone())
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            let e = e.clone();
            async move {
                e.fetch_add(1, Ordering::SeqCst);
                // Longer than the lease: only renewals keep the claim.
                std::thread::sleep(Duration::from_millis(1600));
                Ok::<_, HandlerError>(())
            }
        }));
    let a = tokio::spawn(blocking.oneshot(delivery()));
    let e = effects.clone();
    let other = IdempotencyLayer::new(common::redis_store().await, "q", config)
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            e.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        }));
    let mut copies = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        copies.push(other.clone().oneshot(delivery()).await.unwrap().kind());
    }
    assert!(
        copies
            .iter()
            .all(|kind| *kind == OutcomeKind::InProgressElsewhere),
        "the renewed claim held every copy off: {copies:?}"
    );
    let a = a.await.unwrap().unwrap();
    assert_eq!(a.kind(), OutcomeKind::Retry, "A timed out: {a:?}");
    assert!(a.reason().unwrap_or("").contains("timed out"), "{a:?}");
    assert_eq!(effects.load(Ordering::SeqCst), 1, "no copy ran beside A");
}
