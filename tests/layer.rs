//! The layer's dispositions, with `MemoryStore` and `Delivery::mock`
//! (no services needed; the store is the in-process one).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use amqp_idempotency::records::{Record, State};
use amqp_idempotency::store::{Expect, MemoryStore, Store};
use amqp_idempotency::{
    BoxError, Config, Disposition, HandlerError, IdempotencyLayer, NoFingerprintPolicy,
    OutcomeKind, StoreError, StoreFailurePolicy,
};
use lapin::BasicProperties;
use lapin::message::Delivery;
use tower::{Layer, Service, ServiceExt, service_fn};

/// What a stored value says, read through the public records API.
fn state(value: &[u8]) -> State {
    Record::decode("", (value.to_vec(), None)).state().clone()
}

fn delivery(id: Option<&str>, body: &[u8]) -> Delivery {
    let mut d = Delivery::mock(1, "".into(), "q".into(), false, body.to_vec());
    if let Some(id) = id {
        d.properties = BasicProperties::default().with_message_id(id.into());
    }
    d
}

fn config() -> Config {
    Config::default()
        .with_retry_backoff(Duration::from_millis(10))
        .with_in_progress_wait(Duration::ZERO)
}

/// A handler that counts its runs and answers what `behaviour` says.
fn counting(
    runs: Arc<AtomicUsize>,
    behaviour: impl Fn(usize) -> Result<(), HandlerError> + Clone + Send + Sync + 'static,
) -> impl Service<Delivery, Response = (), Error = HandlerError, Future = impl Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_d: Delivery| {
        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
        let result = behaviour(run);
        async move { result }
    })
}

#[tokio::test]
async fn processed_once_then_duplicate_acked_without_running() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new(), "q", config()).unwrap();
    let svc = layer.layer(counting(runs.clone(), |_| Ok(())));
    let first = svc
        .clone()
        .oneshot(delivery(Some("m1"), b"x"))
        .await
        .unwrap();
    assert_eq!(first.kind(), OutcomeKind::Processed);
    assert_eq!(first.disposition(), Disposition::Ack);
    let second = svc.oneshot(delivery(Some("m1"), b"x")).await.unwrap();
    assert_eq!(second.kind(), OutcomeKind::Duplicate);
    assert_eq!(second.disposition(), Disposition::Ack);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn retryable_failure_releases_so_the_redelivery_runs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new(), "q", config()).unwrap();
    let svc = layer.layer(counting(runs.clone(), |run| {
        if run == 1 {
            Err(HandlerError::retryable("database busy"))
        } else {
            Ok(())
        }
    }));
    let first = svc
        .clone()
        .oneshot(delivery(Some("m"), b"x"))
        .await
        .unwrap();
    assert_eq!(first.kind(), OutcomeKind::Retry);
    assert!(
        matches!(first.disposition(), Disposition::Requeue { after } if after == Duration::from_millis(10))
    );
    assert!(first.reason().unwrap().contains("database busy"));
    let second = svc
        .clone()
        .oneshot(delivery(Some("m"), b"x"))
        .await
        .unwrap();
    assert_eq!(second.kind(), OutcomeKind::Processed);
    assert_eq!(second.attempt(), 2);
    let third = svc.oneshot(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(third.kind(), OutcomeKind::Duplicate);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn foreign_errors_count_as_retryable() {
    let layer = IdempotencyLayer::new(MemoryStore::new(), "q", config()).unwrap();
    let svc = layer.layer(service_fn(|_d: Delivery| async {
        Err::<(), BoxError>("socket closed".into())
    }));
    let outcome = svc.oneshot(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Retry);
}

#[tokio::test]
async fn permanent_failure_is_dead_lettered() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new(), "q", config()).unwrap();
    let svc = layer.layer(counting(runs.clone(), |_| {
        Err(HandlerError::permanent("unknown customer"))
    }));
    let outcome = svc.oneshot(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Failed);
    assert_eq!(outcome.disposition(), Disposition::DeadLetter);
    assert!(outcome.reason().unwrap().contains("unknown customer"));
}

#[tokio::test]
async fn retries_are_bounded_by_max_attempts() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer =
        IdempotencyLayer::new(MemoryStore::new(), "q", config().with_max_attempts(3)).unwrap();
    let svc = layer.layer(counting(runs.clone(), |_| {
        Err(HandlerError::retryable("always"))
    }));
    let mut kinds = Vec::new();
    for _ in 0..3 {
        kinds.push(
            svc.clone()
                .oneshot(delivery(Some("poison"), b"x"))
                .await
                .unwrap(),
        );
    }
    assert_eq!(kinds[0].kind(), OutcomeKind::Retry);
    assert_eq!(kinds[1].kind(), OutcomeKind::Retry);
    assert!(
        matches!(kinds[1].disposition(), Disposition::Requeue { after } if after == Duration::from_millis(20)),
        "the delay grows"
    );
    assert_eq!(kinds[2].kind(), OutcomeKind::AttemptsExhausted);
    assert_eq!(kinds[2].disposition(), Disposition::DeadLetter);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // The runner discards the record once the parked copy is confirmed.
    assert!(kinds[2].discard_record().await.unwrap());
    assert!(!kinds[2].discard_record().await.unwrap(), "only once");
    // Replayed from the dead-letter queue, it starts again from attempt 1.
    let replay = svc.oneshot(delivery(Some("poison"), b"x")).await.unwrap();
    assert_eq!(replay.kind(), OutcomeKind::Retry);
    assert_eq!(replay.attempt(), 1);
}

#[tokio::test]
async fn missing_fingerprint_follows_the_policy() {
    let runs = Arc::new(AtomicUsize::new(0));
    let dead = IdempotencyLayer::new(MemoryStore::new(), "q", config()).unwrap();
    let outcome = dead
        .layer(counting(runs.clone(), |_| Ok(())))
        .oneshot(delivery(None, b""))
        .await
        .unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::NoFingerprint);
    assert_eq!(outcome.disposition(), Disposition::DeadLetter);
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    let pass = IdempotencyLayer::new(
        MemoryStore::new(),
        "q",
        config().with_on_missing_fingerprint(NoFingerprintPolicy::PassThrough),
    )
    .unwrap();
    let outcome = pass
        .layer(counting(runs.clone(), |_| Ok(())))
        .oneshot(delivery(None, b""))
        .await
        .unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Unprotected);
    assert_eq!(outcome.disposition(), Disposition::Ack);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn same_id_different_body_is_dead_lettered() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new(), "q", config()).unwrap();
    let svc = layer.layer(counting(runs.clone(), |_| Ok(())));
    svc.clone()
        .oneshot(delivery(Some("m"), b"amount=10"))
        .await
        .unwrap();
    let outcome = svc
        .oneshot(delivery(Some("m"), b"amount=99"))
        .await
        .unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::PayloadMismatch);
    assert_eq!(outcome.disposition(), Disposition::DeadLetter);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn body_hash_makes_identical_bodies_duplicates() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new(), "q", config()).unwrap();
    let svc = layer.layer(counting(runs.clone(), |_| Ok(())));
    assert_eq!(
        svc.clone()
            .oneshot(delivery(None, b"good"))
            .await
            .unwrap()
            .kind(),
        OutcomeKind::Processed
    );
    assert_eq!(
        svc.clone()
            .oneshot(delivery(None, b"good"))
            .await
            .unwrap()
            .kind(),
        OutcomeKind::Duplicate
    );
    assert_eq!(
        svc.oneshot(delivery(None, b"other")).await.unwrap().kind(),
        OutcomeKind::Processed
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn in_progress_duplicate_waits_and_is_never_acked_early() {
    let store = MemoryStore::new();
    let cfg = config().with_in_progress_wait(Duration::from_secs(1));
    let slow = IdempotencyLayer::new(store.clone(), "q", cfg.clone())
        .unwrap()
        .layer(service_fn(|_d: Delivery| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, Infallible>(())
        }));
    let first = tokio::spawn(slow.clone().oneshot(delivery(Some("m"), b"x")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The first is still running after the wait: requeue, not ack.
    let second = slow
        .clone()
        .oneshot(delivery(Some("m"), b"x"))
        .await
        .unwrap();
    assert_eq!(second.kind(), OutcomeKind::InProgressElsewhere);
    assert!(matches!(second.disposition(), Disposition::Requeue { .. }));
    // Waiting long enough, the duplicate sees it done.
    let long_wait = IdempotencyLayer::new(
        store,
        "q",
        cfg.with_in_progress_wait(Duration::from_secs(10)),
    )
    .unwrap()
    .layer(service_fn(|_d: Delivery| async { Ok::<_, Infallible>(()) }));
    let third = long_wait.oneshot(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(third.kind(), OutcomeKind::Duplicate);
    assert_eq!(first.await.unwrap().unwrap().kind(), OutcomeKind::Processed);
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_keeps_its_lease_by_renewing() {
    let store = MemoryStore::new();
    let cfg = config()
        .with_lease_ttl(Duration::from_secs(3))
        .with_handler_timeout(Duration::from_secs(2))
        .with_in_progress_wait(Duration::ZERO);
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let svc = IdempotencyLayer::new(
        store.clone(),
        "q",
        cfg.clone()
            .with_handler_timeout(Duration::from_millis(2900)),
    )
    .unwrap()
    .layer(service_fn(move |_d: Delivery| {
        r.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(2800)).await;
            Ok::<_, Infallible>(())
        }
    }));
    let first = tokio::spawn(svc.clone().oneshot(delivery(Some("m"), b"x")));
    // Past the point where an unrenewed lease would be near expiry.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let dup = svc
        .clone()
        .oneshot(delivery(Some("m"), b"x"))
        .await
        .unwrap();
    assert_eq!(dup.kind(), OutcomeKind::InProgressElsewhere);
    assert_eq!(first.await.unwrap().unwrap().kind(), OutcomeKind::Processed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hung_handler_times_out_and_is_retried() {
    let cfg = config()
        .with_lease_ttl(Duration::from_secs(3))
        .with_handler_timeout(Duration::from_secs(1));
    let svc = IdempotencyLayer::new(MemoryStore::new(), "q", cfg)
        .unwrap()
        .layer(service_fn(|_d: Delivery| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(())
        }));
    let outcome = svc.oneshot(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Retry);
    assert!(outcome.reason().unwrap().contains("timed out"));
}

/// A store that fails as unreachable while `down` is set (unit-test double).
#[derive(Clone, Default)]
struct FlakyStore {
    inner: MemoryStore,
    down: Arc<AtomicBool>,
    /// Claims fail with an error about the key (like WRONGTYPE).
    refuse: Arc<AtomicBool>,
    /// Transitions fail with an error about the key.
    refuse_transitions: Arc<AtomicBool>,
}

impl FlakyStore {
    fn check(&self, op: &'static str) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::new(op, "", true, "connection refused"))
        } else if self.refuse.load(Ordering::SeqCst) && op == "claim"
            || self.refuse_transitions.load(Ordering::SeqCst) && op == "transition"
        {
            Err(StoreError::new(op, "", false, "WRONGTYPE"))
        } else {
            Ok(())
        }
    }
}

impl Store for FlakyStore {
    async fn insert_or_get(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.check("claim")?;
        self.inner.insert_or_get(key, value, ttl).await
    }
    async fn transition(
        &self,
        key: &str,
        from: Expect<'_>,
        to: Option<&[u8]>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.check("transition")?;
        self.inner.transition(key, from, to, ttl).await
    }
    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Duration>)>, StoreError> {
        self.check("get")?;
        self.inner.get(key).await
    }
    async fn probe(&self, _key: &str) -> Result<(), StoreError> {
        self.check("probe")
    }
}

#[tokio::test(start_paused = true)]
async fn fail_closed_holds_the_delivery_and_pauses_until_the_store_takes_writes() {
    let store = FlakyStore::default();
    store.down.store(true, Ordering::SeqCst);
    let runs = Arc::new(AtomicUsize::new(0));
    let mut svc = IdempotencyLayer::new(store.clone(), "q", config())
        .unwrap()
        .layer(counting(runs.clone(), |_| Ok(())));
    // Held, not requeued: a requeue would count against a quorum queue's
    // delivery limit.
    let held = tokio::spawn(svc.clone().oneshot(delivery(Some("m"), b"x")));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!held.is_finished(), "held while the store refuses writes");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Not ready while the store is down...
    let ready = tokio::time::timeout(Duration::from_secs(2), svc.ready()).await;
    assert!(
        ready.is_err(),
        "poll_ready must stay pending while Redis is down"
    );
    // ...and ready again once it answers; the held delivery is processed.
    store.down.store(false, Ordering::SeqCst);
    let outcome = held.await.unwrap().unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Processed);
    tokio::time::timeout(Duration::from_secs(10), svc.ready())
        .await
        .expect("ready after the store is back")
        .unwrap();
    let outcome = svc.call(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Duplicate);
}

#[tokio::test(start_paused = true)]
async fn a_delivery_is_held_at_most_half_the_brokers_consumer_timeout() {
    let store = FlakyStore::default();
    store.down.store(true, Ordering::SeqCst);
    let cfg = config().with_consumer_timeout(Duration::from_secs(600));
    let started = tokio::time::Instant::now();
    let outcome = IdempotencyLayer::new(store, "q", cfg)
        .unwrap()
        .layer(counting(Arc::default(), |_| Ok(())))
        .oneshot(delivery(Some("m"), b"x"))
        .await
        .unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::StoreUnavailable);
    assert!(matches!(outcome.disposition(), Disposition::Requeue { .. }));
    let held = started.elapsed();
    assert!(
        held >= Duration::from_secs(300) && held < Duration::from_secs(330),
        "given back before the broker's consumer_timeout would close the channel: {held:?}"
    );
}

/// Counts what the layer reports through the `metrics` facade, for the
/// duration of `body` on a current-thread runtime.
fn with_metrics(body: impl std::future::Future<Output = ()>) -> String {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(body);
    });
    handle.render()
}

fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn metrics_tell_releases_from_discards_and_count_refusals() {
    let text = with_metrics(async {
        let store = FlakyStore::default();
        let svc = IdempotencyLayer::new(store.clone(), "q", config())
            .unwrap()
            .layer(service_fn(|d: Delivery| async move {
                match d.data.as_slice() {
                    b"retry" => Err(HandlerError::retryable("again")),
                    b"poison" => Err(HandlerError::permanent("never")),
                    _ => Ok(()),
                }
            }));
        let retry = svc
            .clone()
            .oneshot(delivery(Some("a"), b"retry"))
            .await
            .unwrap();
        assert_eq!(retry.kind(), OutcomeKind::Retry);
        let poison = svc
            .clone()
            .oneshot(delivery(Some("b"), b"poison"))
            .await
            .unwrap();
        assert_eq!(poison.kind(), OutcomeKind::Failed);
        store.refuse.store(true, Ordering::SeqCst);
        let refused = svc
            .clone()
            .oneshot(delivery(Some("c"), b"ok"))
            .await
            .unwrap();
        assert_eq!(refused.kind(), OutcomeKind::StoreRefused);
        store.refuse.store(false, Ordering::SeqCst);
        store.refuse_transitions.store(true, Ordering::SeqCst);
        let unrecorded = svc.oneshot(delivery(Some("d"), b"ok")).await.unwrap();
        assert_eq!(unrecorded.kind(), OutcomeKind::Unrecorded);
    });
    assert_eq!(
        counter(&text, "idempotency_released_total"),
        1,
        "a dead-lettered message's discard is not a release:\n{text}"
    );
    assert_eq!(
        counter(&text, "idempotency_store_refused_total"),
        1,
        "{text}"
    );
    assert_eq!(counter(&text, "idempotency_unrecorded_total"), 1, "{text}");
}

#[tokio::test]
async fn fail_open_runs_the_handler_unprotected() {
    let store = FlakyStore::default();
    store.down.store(true, Ordering::SeqCst);
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(
        store,
        "q",
        config().with_on_store_error(StoreFailurePolicy::FailOpen),
    )
    .unwrap()
    .layer(counting(runs.clone(), |_| Ok(())));
    let outcome = svc.oneshot(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Unprotected);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_reported_and_still_acked() {
    let store = MemoryStore::new();
    let cfg = config()
        .with_lease_ttl(Duration::from_secs(3))
        .with_handler_timeout(Duration::from_millis(2900));
    let thief_store = store.clone();
    let svc = IdempotencyLayer::new(store.clone(), "q", cfg)
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            let store = thief_store.clone();
            async move {
                // Someone deletes our record mid-run (an operator's `forget`,
                // or an expiry during a pause) and another consumer claims it.
                let key = "idem:q:m";
                let (value, _) = store.get(key).await.unwrap().unwrap();
                assert!(
                    store
                        .transition(key, Expect::Value(&value), None, Duration::ZERO)
                        .await
                        .unwrap()
                );
                store
                    .insert_or_get(key, b"p:thief:1:", Duration::from_secs(30))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, Infallible>(())
            }
        }));
    let outcome = svc.oneshot(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::LeaseLost);
    assert_eq!(outcome.disposition(), Disposition::Ack);
    let (value, _) = store.get("idem:q:m").await.unwrap().unwrap();
    assert_eq!(value, b"p:thief:1:", "the new owner's record is untouched");
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_call_keeps_its_claim_until_the_lease_ends() {
    // Shutdown aborts a handler that outlived the deadline: work it
    // started may still run, so its claim must not be handed to the
    // redelivered copy before the lease ends.
    let store = MemoryStore::new();
    let cfg = config()
        .with_lease_ttl(Duration::from_secs(3))
        .with_handler_timeout(Duration::from_secs(2));
    let svc = IdempotencyLayer::new(store.clone(), "q", cfg)
        .unwrap()
        .layer(service_fn(|_d: Delivery| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(())
        }));
    let call = tokio::spawn(svc.clone().oneshot(delivery(Some("m"), b"x")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    call.abort();
    let _ = call.await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    let (value, _) = store.get("idem:q:m").await.unwrap().expect("record kept");
    assert!(
        matches!(state(&value), State::InProgress { attempt: 1, .. }),
        "the abandoned claim is kept, not released: {value:?}"
    );
    let copy = svc
        .clone()
        .oneshot(delivery(Some("m"), b"x"))
        .await
        .unwrap();
    assert_eq!(
        copy.kind(),
        OutcomeKind::InProgressElsewhere,
        "a copy during the lease does not run"
    );
    // After the lease, the next copy takes the claim over as attempt 2.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let store2 = store.clone();
    let later = IdempotencyLayer::new(store2, "q", config())
        .unwrap()
        .layer(service_fn(|_d: Delivery| async { Ok::<_, Infallible>(()) }))
        .oneshot(delivery(Some("m"), b"x"))
        .await
        .unwrap();
    assert_eq!(later.kind(), OutcomeKind::Processed);
    assert_eq!(later.attempt(), 2, "the abandoned run counts as an attempt");
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_handler_keeps_its_claim_until_the_lease_ends() {
    // The handler's work goes on in a task of its own after the timeout.
    let running = Arc::new(AtomicUsize::new(0));
    let overlap = Arc::new(AtomicBool::new(false));
    let (r, o) = (running.clone(), overlap.clone());
    let svc = IdempotencyLayer::new(
        MemoryStore::new(),
        "q",
        config()
            .with_lease_ttl(Duration::from_secs(3))
            .with_handler_timeout(Duration::from_secs(1)),
    )
    .unwrap()
    .layer(service_fn(move |_d: Delivery| {
        let (r, o) = (r.clone(), o.clone());
        async move {
            if r.fetch_add(1, Ordering::SeqCst) > 0 {
                o.store(true, Ordering::SeqCst);
            }
            let r = r.clone();
            // Work the handler started and does not wait for: 2.5s.
            let work = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                r.fetch_sub(1, Ordering::SeqCst);
            });
            let _ = work.await;
            Ok::<_, Infallible>(())
        }
    }));
    let first = tokio::spawn(svc.clone().oneshot(delivery(Some("m"), b"x")));
    // After the timeout (1s), before the lease ends (3s): the copy waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let copy = svc
        .clone()
        .oneshot(delivery(Some("m"), b"x"))
        .await
        .unwrap();
    assert_eq!(copy.kind(), OutcomeKind::InProgressElsewhere);
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.kind(), OutcomeKind::Retry);
    assert!(first.reason().unwrap().contains("timed out"));
    let retry = svc.oneshot(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(retry.kind(), OutcomeKind::Retry, "the retry times out too");
    assert!(
        !overlap.load(Ordering::SeqCst),
        "the retry never ran beside the timed-out run's work"
    );
}

#[tokio::test]
async fn attempts_count_handler_runs_not_broker_deliveries() {
    // A quorum queue's x-delivery-count also counts requeues that ran
    // nothing (in progress elsewhere, a store pause): 16 of those must not
    // exhaust 5 attempts on the first failure.
    let mut d = delivery(Some("m"), b"x");
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-delivery-count".into(),
        lapin::types::AMQPValue::LongLongInt(16),
    );
    d.properties = d.properties.with_headers(headers);
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(MemoryStore::new(), "q", config())
        .unwrap()
        .layer(counting(runs.clone(), |_| {
            Err(HandlerError::retryable("flaky"))
        }));
    let outcome = svc.oneshot(d).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Retry);
    assert_eq!(outcome.attempt(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_message_that_kills_its_consumer_is_dead_lettered_after_the_last_attempt() {
    let store = MemoryStore::new();
    let cfg = config()
        .with_max_attempts(3)
        .with_lease_ttl(Duration::from_secs(3))
        .with_handler_timeout(Duration::from_secs(2));
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let svc = IdempotencyLayer::new(store.clone(), "q", cfg)
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            r.fetch_add(1, Ordering::SeqCst);
            async {
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(())
            }
        }));
    let mut attempts = Vec::new();
    for _ in 0..3 {
        // The consumer dies mid-handler: its future is gone, nothing settles.
        let call = tokio::spawn(svc.clone().oneshot(delivery(Some("m"), b"x")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        call.abort();
        let _ = call.await;
        let (value, _) = store.get("idem:q:m").await.unwrap().expect("record");
        if let State::InProgress { attempt, .. } = state(&value) {
            attempts.push(attempt);
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    assert_eq!(attempts, [1, 2, 3], "each crash counts");
    let outcome = svc.oneshot(delivery(Some("m"), b"x")).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Crashed);
    assert_eq!(outcome.disposition(), Disposition::DeadLetter);
    assert!(
        outcome
            .reason()
            .unwrap()
            .contains("never reached an outcome")
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "the handler did not run again"
    );
    assert!(
        store.get("idem:q:m").await.unwrap().is_some(),
        "the record stays until the parked copy is confirmed"
    );
    assert!(outcome.discard_record().await.unwrap());
    assert!(
        store.get("idem:q:m").await.unwrap().is_none(),
        "a replay from the parking queue starts afresh"
    );
}

/// A dead-lettered outcome holds its claim until told whether the parked
/// copy was confirmed: not confirmed (or never told), the claim is
/// released with its attempt count, so the requeued original is the next
/// attempt, not the first again.
#[tokio::test]
async fn a_dead_lettered_claim_is_released_with_its_attempts_unless_the_copy_is_confirmed() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(store.clone(), "q", config())
        .unwrap()
        .layer(counting(runs.clone(), |_| {
            Err(HandlerError::permanent("unknown customer"))
        }));
    let attempts = |key: &'static str| {
        let store = store.clone();
        async move {
            match store.get(key).await.unwrap() {
                Some((value, _)) => match state(&value) {
                    State::Released { attempts, .. } => Some(attempts),
                    _ => None,
                },
                None => None,
            }
        }
    };

    let outcome = svc
        .clone()
        .oneshot(delivery(Some("a"), b"x"))
        .await
        .unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Failed);
    assert_eq!(outcome, outcome.clone(), "equality ignores the claim");
    assert!(outcome.release_record().await.unwrap(), "not confirmed");
    assert_eq!(attempts("idem:q:a").await, Some(1));
    assert!(!outcome.discard_record().await.unwrap(), "already settled");
    let again = svc
        .clone()
        .oneshot(delivery(Some("a"), b"x"))
        .await
        .unwrap();
    assert_eq!(again.attempt(), 2, "the requeued copy is the next attempt");
    assert!(again.discard_record().await.unwrap());

    // Dropped (every clone) without a word: released in the background.
    let outcome = svc.oneshot(delivery(Some("b"), b"x")).await.unwrap();
    let clone = outcome.clone();
    drop(outcome);
    assert!(
        store.get("idem:q:b").await.unwrap().is_some() && attempts("idem:q:b").await.is_none(),
        "a clone still holds the claim"
    );
    drop(clone);
    assert!(
        common_eventually(|| async { attempts("idem:q:b").await == Some(1) }).await,
        "released with its attempt count"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn the_handler_cannot_settle_the_delivery_itself() {
    let svc = IdempotencyLayer::new(MemoryStore::new(), "q", config())
        .unwrap()
        .layer(service_fn(|d: Delivery| async move {
            let acked = d
                .acker
                .ack(lapin::options::BasicAckOptions::default())
                .await;
            assert!(matches!(acked, Ok(true)), "the handler's ack is a no-op");
            Ok::<_, Infallible>(())
        }));
    let d = delivery(Some("m"), b"x");
    let runner_acker = d.acker.clone();
    let outcome = svc.oneshot(d).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Processed);
    assert!(
        runner_acker.usable(),
        "the runner's acker is untouched: it settles after the done mark"
    );
}

async fn common_eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(start_paused = true)]
async fn a_done_mark_that_cannot_be_written_holds_the_message_until_the_store_answers() {
    let store = FlakyStore::default();
    let down = store.down.clone();
    let svc = IdempotencyLayer::new(store.clone(), "q", config())
        .unwrap()
        .layer(service_fn(move |_d: Delivery| {
            let down = down.clone();
            async move {
                // The effect happens, then Redis goes away for a while.
                down.store(true, Ordering::SeqCst);
                let down = down.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    down.store(false, Ordering::SeqCst);
                });
                Ok::<_, Infallible>(())
            }
        }));
    let call = tokio::spawn(svc.oneshot(delivery(Some("m"), b"x")));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !call.is_finished(),
        "not settled while the done mark is unwritten"
    );
    let outcome = call.await.unwrap().unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Processed);
    let (value, _) = store.inner.get("idem:q:m").await.unwrap().unwrap();
    assert!(
        matches!(state(&value), State::Done { .. }),
        "the done mark was written: {value:?}"
    );
}

#[tokio::test]
async fn bad_input_is_dead_lettered_with_a_reason_not_a_panic() {
    use amqp_idempotency::fingerprint::Header;
    use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString};

    let runs = Arc::new(AtomicUsize::new(0));
    // A header fingerprint whose value is not UTF-8, or not a string at all.
    let by_header = IdempotencyLayer::new(MemoryStore::new(), "q", config())
        .unwrap()
        .fingerprint(Header::new("order-id"))
        .layer(counting(runs.clone(), |_| Ok(())));
    for value in [
        AMQPValue::LongString(LongString::from(vec![0xff, 0xfe, 0x00])),
        AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
        AMQPValue::FieldTable(FieldTable::default()),
    ] {
        let mut headers = FieldTable::default();
        headers.insert("order-id".into(), value);
        let mut d = delivery(None, b"x");
        d.properties = BasicProperties::default().with_headers(headers);
        let outcome = by_header.clone().oneshot(d).await.unwrap();
        assert_eq!(outcome.kind(), OutcomeKind::NoFingerprint);
        assert!(outcome.reason().is_some());
    }

    // A nonsensical x-delivery-count is ignored, not trusted.
    let layer = IdempotencyLayer::new(MemoryStore::new(), "q", config().with_max_body_bytes(16))
        .unwrap()
        .layer(counting(runs.clone(), |_| Ok(())));
    let mut headers = FieldTable::default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongString(LongString::from("lots")),
    );
    let mut d = delivery(Some("m"), b"x");
    d.properties = d.properties.clone().with_headers(headers);
    let outcome = layer.clone().oneshot(d).await.unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::Processed);
    assert_eq!(outcome.attempt(), 1);

    // An oversized body never reaches the handler.
    let outcome = layer
        .oneshot(delivery(Some("big"), &[b'x'; 17]))
        .await
        .unwrap();
    assert_eq!(outcome.kind(), OutcomeKind::BodyTooLarge);
    assert_eq!(outcome.disposition(), Disposition::DeadLetter);
    assert!(
        outcome
            .reason()
            .unwrap()
            .contains("IDEMPOTENCY_MAX_BODY_BYTES=16")
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only the valid message ran");
}

#[tokio::test]
async fn the_guard_api_claims_completes_and_releases() {
    use amqp_idempotency::{Begin, Deduplicator, Skip};

    let store = MemoryStore::new();
    let dedup = Deduplicator::new(store.clone(), "q", config()).unwrap();
    let Begin::Process(claim) = dedup.begin(&delivery(Some("g1"), b"x")).await.unwrap() else {
        panic!("a new message is ours to process");
    };
    assert_eq!(claim.attempt(), 1);
    assert_eq!(claim.key(), "idem:q:g1");
    assert!(!claim.token().is_empty());
    // While we hold it, a duplicate is in progress elsewhere, not done.
    assert!(matches!(
        dedup.begin(&delivery(Some("g1"), b"x")).await.unwrap(),
        Begin::Skip(Skip::InProgress { .. })
    ));
    assert!(claim.complete().await.unwrap());
    match dedup.begin(&delivery(Some("g1"), b"x")).await.unwrap() {
        Begin::Skip(skip) => assert!(skip.is_done()),
        other => panic!("expected done, got {other:?}"),
    }

    // Released explicitly: the next copy is processed, as attempt 2.
    let Begin::Process(claim) = dedup.begin(&delivery(Some("g2"), b"x")).await.unwrap() else {
        panic!("ours");
    };
    assert!(claim.release().await.unwrap());
    let Begin::Process(again) = dedup.begin(&delivery(Some("g2"), b"x")).await.unwrap() else {
        panic!("released, so ours again");
    };
    assert_eq!(again.attempt(), 2);
    drop(again);

    // Dropped without a word: released in the background.
    let released =
        common_eventually(|| {
            let store = store.clone();
            async move {
                matches!(store.get("idem:q:g2").await, Ok(Some((v, _))) if matches!(state(&v), State::Released { attempts: 2, .. }))
            }
        })
        .await;
    assert!(released, "a dropped claim is released");

    // No fingerprint: the reason, not a claim.
    assert!(matches!(
        dedup.begin(&delivery(None, b"")).await.unwrap(),
        Begin::Skip(Skip::NoFingerprint)
    ));
}

#[tokio::test]
async fn a_panicking_handler_backs_off_and_is_dead_lettered_after_the_last_attempt() {
    let layer =
        IdempotencyLayer::new(MemoryStore::new(), "q", config().with_max_attempts(2)).unwrap();
    let svc = layer.layer(service_fn(|_d: Delivery| async {
        if true {
            panic!("index out of bounds");
        }
        Ok::<_, Infallible>(())
    }));
    let first = svc
        .clone()
        .oneshot(delivery(Some("boom"), b"x"))
        .await
        .unwrap();
    assert_eq!(first.kind(), OutcomeKind::Retry);
    assert!(matches!(first.disposition(), Disposition::Requeue { after } if !after.is_zero()));
    assert!(first.reason().unwrap().contains("index out of bounds"));
    let second = svc.oneshot(delivery(Some("boom"), b"x")).await.unwrap();
    assert_eq!(second.kind(), OutcomeKind::AttemptsExhausted);
    assert_eq!(second.disposition(), Disposition::DeadLetter);
}

/// A guard-API consumer that tries again for one delivery keeps its token:
/// a claim the store wrote (here: its answer was lost to the caller) is
/// found as its own, as the same attempt, never as another consumer's.
#[tokio::test]
async fn the_guard_finds_its_own_claim_when_it_tries_again_with_its_token() {
    use amqp_idempotency::store::Token;
    use amqp_idempotency::{Begin, Deduplicator};
    let dedup = Deduplicator::new(MemoryStore::new(), "q", config()).unwrap();
    let token = Token::new();
    let message = delivery(Some("again"), b"x");
    let Begin::Process(mut first) = dedup.begin_with_token(&message, &token).await.unwrap() else {
        panic!("a new message is ours to process");
    };
    // The caller never saw that answer (a timeout, say) and tries again;
    // a guard dropped after its work started keeps the claim.
    first.mark_started();
    drop(first);
    let Begin::Process(again) = dedup.begin_with_token(&message, &token).await.unwrap() else {
        panic!("the claim written with our token is ours");
    };
    assert_eq!((again.attempt(), again.token()), (1, token.as_str()));
    assert!(again.complete().await.unwrap());
    // Another token (another consumer, or a new try without the token) finds it done.
    assert!(matches!(
        dedup.begin(&message).await.unwrap(),
        Begin::Skip(amqp_idempotency::Skip::Done)
    ));
}

/// The value of the gauge `series` with `label`, as the recorder renders it.
fn gauge(text: &str, series: &str, label: &str) -> Option<f64> {
    let prefix = format!("{series}{{{label}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
}

#[test]
fn the_pause_gauge_follows_the_store() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let paused = |text: &str| {
        gauge(
            text,
            amqp_idempotency::metrics::STORE_PAUSED,
            "scope=\"orders\"",
        )
    };
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async {
                let store = FlakyStore::default();
                let svc = IdempotencyLayer::new(
                    store.clone(),
                    "orders",
                    config().with_on_store_error(StoreFailurePolicy::FailOpen),
                )
                .unwrap()
                .layer(counting(Arc::default(), |_| Ok(())));
                store.down.store(true, Ordering::SeqCst);
                let outcome = svc
                    .clone()
                    .oneshot(delivery(Some("a"), b"x"))
                    .await
                    .unwrap();
                assert_eq!(outcome.kind(), OutcomeKind::Unprotected);
                let text = handle.render();
                assert_eq!(
                    paused(&text),
                    Some(1.0),
                    "paused while the store is down:\n{text}"
                );
                store.down.store(false, Ordering::SeqCst);
                let outcome = svc.oneshot(delivery(Some("b"), b"x")).await.unwrap();
                assert_eq!(outcome.kind(), OutcomeKind::Processed);
                let text = handle.render();
                assert_eq!(
                    paused(&text),
                    Some(0.0),
                    "resumed once a write succeeded:\n{text}"
                );
            });
    });
}

#[test]
fn a_delivery_whose_outbox_stays_unconfirmed_is_counted_as_undispatched() {
    let text = with_metrics(async {
        let cfg = config()
            .with_consumer_timeout(Duration::from_secs(2))
            .with_lease_ttl(Duration::from_millis(500))
            .with_handler_timeout(Duration::from_millis(400))
            .with_retry_backoff_max(Duration::from_millis(100))
            // Nothing listens there: no message can be confirmed.
            .with_amqp_url(format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()));
        let publisher = amqp_idempotency::outbox::OutboxPublisher::connect(&cfg)
            .confirm_timeout(Duration::from_millis(200));
        let outcome = IdempotencyLayer::new(MemoryStore::new(), "q", cfg)
            .unwrap()
            .with_outbox(publisher)
            .layer(service_fn(
                |incoming: amqp_idempotency::outbox::OutboxDelivery| async move {
                    incoming
                        .outbox
                        .publish("", "elsewhere", BasicProperties::default(), "x")
                },
            ))
            .oneshot(delivery(Some("u"), b"x"))
            .await
            .unwrap();
        assert_eq!(outcome.kind(), OutcomeKind::Undispatched);
    });
    assert_eq!(
        counter(&text, amqp_idempotency::metrics::OUTBOX_UNDISPATCHED),
        1,
        "{text}"
    );
}

/// A loopback port nothing listens on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}
