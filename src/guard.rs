//! The guard API, for consumers that keep their own delivery loop.
//!
//! ```no_run
//! use amqp_idempotency::{Begin, Config, Deduplicator, Skip, store::RedisStore};
//! use futures_util::StreamExt;
//! use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
//!
//! # async fn work(_: &lapin::message::Delivery, _token: &str) -> Result<(), Box<dyn std::error::Error>> { Ok(()) }
//! # async fn run(mut consumer: lapin::Consumer) -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_env()?;
//! // REDIS_URL or REDIS_CLUSTER_NODES, REDIS_TLS_*, IDEMPOTENCY_MIN_REPLICAS
//! let store = RedisStore::connect(&config).await?;
//! let dedup = Deduplicator::new(store, "orders", config)?;
//! let requeue = BasicNackOptions { requeue: true, ..Default::default() };
//! while let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     match dedup.begin(&delivery).await {
//!         Ok(Begin::Process(claim)) => {
//!             if work(&delivery, claim.token()).await.is_ok() {
//!                 claim.complete().await?; // the done mark first...
//!                 delivery.ack(BasicAckOptions::default()).await?; // ...then the ack
//!             } else {
//!                 claim.release().await?;
//!                 delivery.nack(requeue).await?;
//!             }
//!         }
//!         Ok(Begin::Unprotected) => {
//!             work(&delivery, "").await?;
//!             delivery.ack(BasicAckOptions::default()).await?;
//!         }
//!         Ok(Begin::Skip(Skip::Done)) => {
//!             delivery.ack(BasicAckOptions::default()).await?;
//!         }
//!         // Still running elsewhere: never ack it, let it come back.
//!         Ok(Begin::Skip(Skip::InProgress { .. })) => {
//!             delivery.nack(requeue).await?;
//!         }
//!         // No fingerprint, payload mismatch, foreign record: dead-letter.
//!         Ok(Begin::Skip(_)) => {
//!             delivery.reject(BasicRejectOptions { requeue: false }).await?;
//!         }
//!         // Redis down: give the message back and wait until it answers.
//!         Err(_) => {
//!             delivery.nack(requeue).await?;
//!             dedup.wait_for_store().await;
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! To dead-letter a claimed message yourself (a permanent failure, the
//! last attempt), publish its copy in confirm mode (mandatory), and once
//! the broker confirmed it, [`ClaimGuard::discard`] the record, then ack
//! the original. Discard only after the confirm: when the copy is not
//! confirmed, [`ClaimGuard::release`] the claim (it keeps the attempt
//! count) and requeue the original, which is then never run again from
//! attempt 1 nor lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::{Config, NoFingerprintPolicy};
use crate::error::{ConfigError, StoreError};
use crate::fingerprint::{self, Fingerprint, MessageIdOrBodyHash};
use crate::stopping::Stopping;
use crate::store::{Claim, ClaimOutcome, Store, Token, machine};

/// Claims messages before they are processed: the engine under both the
/// tower layer and the guard API. Clones share the store and settings.
pub struct Deduplicator<St, F = MessageIdOrBodyHash> {
    shared: Arc<Shared<St, F>>,
}

struct Shared<St, F> {
    store: St,
    fingerprint: F,
    config: Config,
    scope: String,
    store_down: AtomicBool,
    /// Requests the store refused since the current pause began.
    refusals: AtomicU64,
    /// The runner's shutdown, shared with it explicitly.
    stopping: Stopping,
}

impl<St, F> Deduplicator<St, F> {
    /// The shutdown handle to give the runner that serves this
    /// deduplicator's layer ([`ServeOptions::stopping`](crate::ServeOptions::stopping)):
    /// its holds end when that runner stops, and the runner waits for the
    /// claims its dropped guards release. Clones share it.
    pub fn stopping(&self) -> &Stopping {
        &self.shared.stopping
    }
}

impl<St, F> Clone for Deduplicator<St, F> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<St, F> std::fmt::Debug for Deduplicator<St, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deduplicator")
            .field("scope", &self.shared.scope)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Why a delivery must not be processed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Already processed: ack it without running the handler.
    Done,
    /// Another consumer is processing it and did not finish within the
    /// in-progress wait: requeue it, never ack it.
    InProgress {
        /// How long the other consumer's lease had left.
        remaining: Option<Duration>,
    },
    /// No usable fingerprint and the policy is to dead-letter.
    NoFingerprint,
    /// The fingerprint was seen with a different payload.
    PayloadMismatch {
        /// The fingerprint.
        fingerprint: String,
    },
    /// The key holds a value this library did not write.
    Unrecognized {
        /// The key.
        key: String,
    },
}

impl Skip {
    /// True when the message was already processed and can be acked.
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Done)
    }
}

/// The answer of [`Deduplicator::begin`].
#[derive(Debug)]
pub enum Begin<St: Store> {
    /// The message is ours to process: complete or release the claim.
    Process(ClaimGuard<St>),
    /// The message has no fingerprint and the policy lets it through
    /// unprotected: process it, there is nothing to complete.
    Unprotected,
    /// Do not process the message.
    Skip(Skip),
}

impl<St: Store, F: Fingerprint> Deduplicator<St, F> {
    /// The scope (consumer group) of the keys: `IDEMPOTENCY_SCOPE` if set, else `queue`.
    pub fn scope(&self) -> &str {
        &self.shared.scope
    }

    /// The settings in use.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.shared.store
    }

    /// Uses `fingerprint` instead of the current strategy.
    pub fn with_fingerprint<G: Fingerprint>(self, fingerprint: G) -> Deduplicator<St, G>
    where
        St: Clone,
    {
        let shared = &self.shared;
        Deduplicator {
            shared: Arc::new(Shared {
                store: shared.store.clone(),
                fingerprint,
                config: shared.config.clone(),
                scope: shared.scope.clone(),
                store_down: AtomicBool::new(false),
                refusals: AtomicU64::new(0),
                stopping: shared.stopping.clone(),
            }),
        }
    }

    /// Shares `stopping` with a runner (and other deduplicators) instead
    /// of a handle of its own: one handle for every layer that runner
    /// serves. See [`Stopping`].
    pub fn with_stopping(self, stopping: Stopping) -> Self
    where
        St: Clone,
        F: Clone,
    {
        let shared = &self.shared;
        Self {
            shared: Arc::new(Shared {
                store: shared.store.clone(),
                fingerprint: shared.fingerprint.clone(),
                config: shared.config.clone(),
                scope: shared.scope.clone(),
                store_down: AtomicBool::new(false),
                refusals: AtomicU64::new(0),
                stopping,
            }),
        }
    }

    /// The Redis key of `fingerprint`: `{prefix}:{scope}:{fingerprint}`.
    pub fn key(&self, fingerprint: &str) -> String {
        fingerprint::record_key(
            &self.shared.config.key_prefix,
            &self.shared.scope,
            fingerprint,
        )
    }

    /// The fingerprint of `delivery`, normalised for use in a key.
    pub fn fingerprint(&self, delivery: &Delivery) -> Option<String> {
        self.shared
            .fingerprint
            .fingerprint(delivery)
            .map(fingerprint::normalize)
    }

    /// Claims `delivery` before it is processed.
    ///
    /// A duplicate that is in progress elsewhere is waited for, up to the
    /// configured in-progress wait: if the other consumer completes it the
    /// answer is [`Skip::Done`], if it releases it the claim is ours.
    /// A store error is returned as is; the message must then be requeued
    /// (or, if you chose to fail open, processed unprotected).
    ///
    /// To try again for the same delivery after an error (instead of
    /// requeueing it), use [`begin_with_token`](Self::begin_with_token)
    /// with one token for all the tries.
    pub async fn begin(&self, delivery: &Delivery) -> Result<Begin<St>, StoreError> {
        self.begin_with(delivery, self.fingerprint(delivery), &Token::new())
            .await
    }

    /// Like [`begin`](Self::begin), claiming with `token`: pass the same
    /// token each time you try again for one delivery after an error, so
    /// that a claim the store wrote but did not confirm (a timeout, a
    /// `WAIT` shortfall) is found as yours, instead of being waited out as
    /// another consumer's and taken over as a crashed attempt.
    ///
    /// ```no_run
    /// use amqp_idempotency::{Begin, Deduplicator, store::{RedisStore, Token}};
    /// # async fn run(dedup: Deduplicator<RedisStore>, delivery: lapin::message::Delivery) {
    /// let token = Token::new();
    /// let begun = loop {
    ///     match dedup.begin_with_token(&delivery, &token).await {
    ///         Err(_) => dedup.wait_for_store().await, // the store is down: try again
    ///         Ok(begun) => break begun,
    ///     }
    /// };
    /// # let _ = begun;
    /// # }
    /// ```
    pub async fn begin_with_token(
        &self,
        delivery: &Delivery,
        token: &Token,
    ) -> Result<Begin<St>, StoreError> {
        self.begin_with(delivery, self.fingerprint(delivery), token)
            .await
    }

    /// [`begin`](Self::begin) with the delivery's fingerprint and claim
    /// token: a delivery keeps one token across the claims it retries after
    /// the store did not answer, so that a retry finds its own first claim
    /// (written, but answered as unavailable) as ours.
    pub(crate) async fn begin_with(
        &self,
        delivery: &Delivery,
        fingerprint: Option<String>,
        token: &Token,
    ) -> Result<Begin<St>, StoreError> {
        let Some(fingerprint) = fingerprint else {
            return Ok(match self.shared.config.on_missing_fingerprint {
                NoFingerprintPolicy::DeadLetter => Begin::Skip(Skip::NoFingerprint),
                NoFingerprintPolicy::PassThrough => Begin::Unprotected,
            });
        };
        let key = self.key(&fingerprint);
        let payload_hash = if self.shared.config.verify_payload {
            fingerprint::payload_hash(&delivery.data)
        } else {
            String::new()
        };
        let lease = self.shared.config.lease_ttl;
        let deadline = Instant::now() + self.shared.config.in_progress_wait;
        let mut poll = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        let mut polls = 0u32;
        loop {
            let started = std::time::Instant::now();
            let outcome =
                machine::claim(&self.shared.store, &key, token, &payload_hash, lease).await;
            crate::metrics::store_latency("claim", started);
            let outcome = outcome.inspect_err(|err| self.note_store_error("claim", err))?;
            self.note_store_ok();
            let skip = match outcome {
                ClaimOutcome::Acquired(claim) => {
                    // Handler runs, as the record counts them: a broker's
                    // x-delivery-count also counts requeues that ran nothing.
                    let attempt = claim.attempt();
                    let after_crash = claim.after_crash();
                    return Ok(Begin::Process(ClaimGuard {
                        dedup: self.erased(),
                        claim: Some(claim),
                        attempt,
                        after_crash,
                        fingerprint,
                        work_done: false,
                        work_started: false,
                    }));
                }
                ClaimOutcome::Done => Skip::Done,
                ClaimOutcome::PayloadMismatch { stored } => {
                    tracing::error!(
                        %key, stored, received = %payload_hash,
                        "same fingerprint, different payload: a producer reused an id or the fingerprint strategy collides"
                    );
                    Skip::PayloadMismatch { fingerprint }
                }
                ClaimOutcome::Unrecognized { value } => {
                    tracing::error!(%key, value, "key holds a value this library did not write; not touching it");
                    Skip::Unrecognized { key }
                }
                ClaimOutcome::InProgress { remaining } => {
                    if polls == 0 {
                        tracing::debug!(%key, ?remaining, "duplicate in progress elsewhere: waiting for it to finish");
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(Begin::Skip(Skip::InProgress { remaining }));
                    }
                    polls += 1;
                    let mut wait = poll.next_delay().min(deadline - now);
                    if let Some(left) = remaining {
                        // No point polling long before the lease can expire.
                        wait = wait.min(left + Duration::from_millis(1));
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            return Ok(Begin::Skip(skip));
        }
    }

    /// Blocks until the store accepts a write again after an outage (or a
    /// refusal that is not about one key) was seen. Returns at once when the
    /// store is believed up.
    ///
    /// The pause ends when a real request succeeds, not when the probe
    /// does: a store may take the probe and still refuse a claim.
    pub async fn wait_for_store(&self) {
        if !self.shared.store_down.load(Ordering::Acquire) {
            return;
        }
        let probe = fingerprint::probe_key(&self.shared.config.key_prefix, &self.shared.scope);
        let mut backoff = Backoff::store_pause();
        while !self.probe(&probe).await {
            backoff.wait().await;
        }
    }

    /// After a claim of `fingerprint` was refused: waits the next delay of
    /// `backoff`, then until a write probe on the same slot succeeds, the
    /// delays growing whatever the probe says, so that a claim the store
    /// keeps refusing is not retried at once after each passing probe.
    pub(crate) async fn wait_to_claim_again(
        &self,
        fingerprint: Option<&str>,
        backoff: &mut Backoff,
    ) {
        let probe = match fingerprint {
            // On the record's slot, so that on a cluster it asks the master
            // that refused the claim.
            Some(fingerprint) => fingerprint::record_probe_key(
                &self.shared.config.key_prefix,
                &self.key(fingerprint),
            ),
            None => fingerprint::probe_key(&self.shared.config.key_prefix, &self.shared.scope),
        };
        loop {
            backoff.wait().await;
            if self.probe(&probe).await {
                return;
            }
        }
    }

    /// One write probe of `key`: true when the store took it.
    async fn probe(&self, key: &str) -> bool {
        // A write shaped like a claim, not a PING: a full or read-only
        // Redis answers PING, and an ACL may allow a plain SET but not a claim.
        match self.shared.store.probe(key).await {
            Ok(()) => true,
            Err(err) => {
                self.note_store_error("probe", &err);
                tracing::debug!(error = %err, "store still refuses writes");
                false
            }
        }
    }

    /// True after an operation found the store unreachable, until one succeeds.
    pub fn store_is_down(&self) -> bool {
        self.shared.store_down.load(Ordering::Acquire)
    }

    pub(crate) fn note_store_error(&self, operation: &'static str, err: &StoreError) {
        self.shared.note_error(operation, err);
    }

    pub(crate) fn note_store_ok(&self) {
        self.shared.note_ok();
    }

    /// The shared state, seen as what a claim guard needs: no allocation.
    fn erased(&self) -> Arc<dyn Settle<St>> {
        Arc::clone(&self.shared) as Arc<dyn Settle<St>>
    }
}

impl<St: Store> Deduplicator<St> {
    /// A deduplicator over `store` for deliveries from `queue`, with the
    /// default fingerprint (`message_id`, else a hash of the body).
    ///
    /// `queue` is the default scope; `IDEMPOTENCY_SCOPE` (or
    /// [`Config::scope`]) overrides it so that several queues can share a
    /// consumer group. Fails when the configuration is inconsistent.
    pub fn new(store: St, queue: &str, config: Config) -> Result<Self, ConfigError> {
        config.validate()?;
        let scope = config.scope.clone().unwrap_or_else(|| queue.to_owned());
        if scope.is_empty() {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_SCOPE",
                "",
                "a consumer group name: set IDEMPOTENCY_SCOPE or pass the queue name",
            ));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                fingerprint: MessageIdOrBodyHash,
                config,
                scope,
                store_down: AtomicBool::new(false),
                refusals: AtomicU64::new(0),
                stopping: Stopping::new(),
            }),
        })
    }
}

/// The attempt number the broker reports: quorum queues count deliveries
/// in `x-delivery-count` (0 on the first delivery); a copy that waited in
/// a delay queue (`x-idempotency-outcome` `retry`) is the attempt after
/// its `x-idempotency-attempts`. Used where there is no record to count.
pub(crate) fn broker_attempt(delivery: &Delivery) -> u32 {
    let Some(headers) = delivery.properties.headers() else {
        return 1;
    };
    let number = |name: &str| {
        headers
            .inner()
            .iter()
            .find(|(key, _)| key.as_str() == name)
            .and_then(|(_, value)| match value {
                AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
                AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
                AMQPValue::LongUInt(n) => Some(*n),
                AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
                AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
                AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
                _ => None,
            })
    };
    let counted = number("x-delivery-count").map_or(1, |n| n.saturating_add(1));
    let retried = headers
        .inner()
        .iter()
        .any(|(key, value)| {
            key.as_str() == "x-idempotency-outcome"
                && matches!(value, AMQPValue::LongString(text) if text.as_bytes() == b"retry")
        })
        .then(|| number("x-idempotency-attempts"))
        .flatten()
        .map_or(0, |n| n.saturating_add(1));
    counted.max(retried)
}

/// The store-facing half of a deduplicator, without its fingerprint type,
/// so that a [`ClaimGuard`] names only the store.
trait Settle<St>: Send + Sync {
    fn store(&self) -> &St;
    fn config(&self) -> &Config;
    fn note_error(&self, operation: &'static str, err: &StoreError);
    fn note_ok(&self);
    fn stopping(&self) -> &Stopping;
}

impl<St: Store, F: Fingerprint> Settle<St> for Shared<St, F> {
    fn store(&self) -> &St {
        &self.store
    }
    fn config(&self) -> &Config {
        &self.config
    }
    fn note_error(&self, operation: &'static str, err: &StoreError) {
        crate::metrics::store_error(operation);
        if !err.is_unavailable() {
            return;
        }
        if self.store_down.swap(true, Ordering::AcqRel) {
            self.refusals.fetch_add(1, Ordering::AcqRel);
        } else {
            self.refusals.store(1, Ordering::Release);
            crate::metrics::store_paused(&self.scope, true);
            tracing::error!(error = %err, operation, "idempotency store unusable: pausing consumption until a write succeeds");
        }
    }
    fn note_ok(&self) {
        if self.store_down.swap(false, Ordering::AcqRel) {
            let refused = self.refusals.swap(0, Ordering::AcqRel);
            crate::metrics::store_paused(&self.scope, false);
            tracing::info!(
                refused,
                "idempotency store answers again: resuming consumption"
            );
        }
    }
    fn stopping(&self) -> &Stopping {
        &self.stopping
    }
}

/// A claim on one message. Complete it after the work succeeded, release
/// it after a failure. Dropped without either, it is released in the
/// background (best effort; the lease expires otherwise).
pub struct ClaimGuard<St: Store> {
    dedup: Arc<dyn Settle<St>>,
    claim: Option<Claim>,
    attempt: u32,
    after_crash: bool,
    fingerprint: String,
    work_done: bool,
    work_started: bool,
}

impl<St: Store> std::fmt::Debug for ClaimGuard<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimGuard")
            .field("claim", &self.claim)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl<St: Store> ClaimGuard<St> {
    /// The owner token, unique to this claim: pass it to your own store as a
    /// fencing value to make the effect safe even if the lease is lost.
    pub fn token(&self) -> &str {
        self.claim.as_ref().map_or("", Claim::token)
    }

    /// The Redis key.
    pub fn key(&self) -> &str {
        self.claim.as_ref().map_or("", Claim::key)
    }

    /// The fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Which attempt this is, starting at 1: handler runs as the record
    /// counts them (failed ones, and ones whose consumer died before an
    /// outcome), not broker deliveries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// True when the previous attempt never reached an outcome (its
    /// consumer crashed or hung past its lease) and this claim took over.
    /// With [`attempt`](Self::attempt) above the maximum, this is the crash
    /// loop of a poison message: dead-letter it without running the work.
    pub fn after_crash(&self) -> bool {
        self.after_crash
    }

    /// Marks the work as started: from now on, a guard dropped without
    /// complete or release keeps the claim until its lease ends instead of
    /// releasing it, because work that was started (a spawned task, a
    /// request already sent) may still be running, and a released claim
    /// would let a redelivered copy run beside it.
    pub fn mark_started(&mut self) {
        self.work_started = true;
    }

    /// Extends the lease; false if the claim is no longer ours.
    pub async fn renew(&self) -> Result<bool, StoreError> {
        let Some(claim) = &self.claim else {
            return Ok(false);
        };
        let lease = self.dedup.config().lease_ttl;
        let started = std::time::Instant::now();
        self.observe(
            "renew",
            started,
            machine::renew(self.dedup.store(), claim, lease).await,
        )
    }

    /// Records the message as done. False means the lease was lost before
    /// (another consumer may have taken over): the effect happened anyway,
    /// so ack it, and make the effect fenced if that must never happen.
    /// On an error the claim is not released (the work is done): it stays
    /// in progress until its lease expires.
    pub async fn complete(mut self) -> Result<bool, StoreError> {
        let result = self.try_complete(None).await;
        // Whatever the answer, never release a claim whose work is done.
        self.claim = None;
        result
    }

    /// Like [`complete`](Self::complete), but keeps the claim on an error so
    /// the caller can try again; a dropped guard no longer releases it.
    pub(crate) async fn try_complete(
        &mut self,
        outbox: Option<(&str, &[crate::store::OutboxEntry])>,
    ) -> Result<bool, StoreError> {
        self.work_done = true;
        let Some(claim) = &self.claim else {
            return Ok(false);
        };
        // An outbox's delivery may be held, then requeued, after its commit:
        // its mark is kept until that copy is back.
        let retention = match outbox {
            Some(_) => self.dedup.config().outbox_retention(),
            None => self.dedup.config().done_ttl,
        };
        let started = std::time::Instant::now();
        let store = self.dedup.store();
        let result = match outbox {
            Some((key, entries)) => {
                machine::complete_with_outbox(store, claim, retention, key, entries).await
            }
            None => machine::complete(store, claim, retention).await,
        };
        let result = self.observe("complete", started, result);
        if result.is_ok() {
            self.claim = None;
        }
        result
    }

    /// Gives the claim up after a failure so that the redelivered copy can
    /// be processed; the attempt count is kept. False if it was no longer ours.
    pub async fn release(mut self) -> Result<bool, StoreError> {
        let Some(claim) = self.claim.take() else {
            return Ok(false);
        };
        let retention = self.dedup.config().done_ttl;
        let started = std::time::Instant::now();
        self.observe(
            "release",
            started,
            machine::release(self.dedup.store(), &claim, retention).await,
        )
    }

    /// Deletes the record after the message was dead-lettered, so that a
    /// later copy (replayed from the dead-letter queue) starts afresh.
    /// False if it was no longer ours.
    ///
    /// Call it only once the broker confirmed your dead-letter copy (a
    /// publish in confirm mode, mandatory, acked and not returned), then
    /// ack the original. When the copy was not confirmed, requeue the
    /// original and [`release`](Self::release) instead: a discarded record
    /// would let the requeued copy run again from attempt 1, and again
    /// each time the copy fails.
    pub async fn discard(mut self) -> Result<bool, StoreError> {
        let Some(claim) = self.claim.take() else {
            return Ok(false);
        };
        let started = std::time::Instant::now();
        let result = machine::discard(self.dedup.store(), &claim).await;
        self.observe("discard", started, result)
    }

    fn observe(
        &self,
        operation: &'static str,
        started: std::time::Instant,
        result: Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        crate::metrics::store_latency(operation, started);
        match &result {
            Ok(_) => self.dedup.note_ok(),
            Err(err) => self.dedup.note_error(operation, err),
        }
        result
    }
}

impl<St: Store> Drop for ClaimGuard<St> {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        if self.work_done {
            tracing::warn!(
                key = claim.key(),
                "the work is done but its done mark was not written; the claim expires with its lease"
            );
            return;
        }
        if self.work_started {
            tracing::warn!(
                key = claim.key(),
                "abandoned while its work may still run: the claim is kept until its lease ends, then the next copy takes it over"
            );
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                key = claim.key(),
                "claim dropped outside a runtime; it expires with its lease"
            );
            return;
        };
        let dedup = Arc::clone(&self.dedup);
        // Counted (for the runner's shutdown) until it reached the store,
        // or the runtime dropped its task.
        let pending = dedup.stopping().release_started();
        runtime.spawn(async move {
            let _pending = pending;
            let retention = dedup.config().done_ttl;
            match machine::release(dedup.store(), &claim, retention).await {
                Ok(released) => {
                    tracing::debug!(key = claim.key(), released, "released an abandoned claim");
                }
                Err(err) => {
                    tracing::warn!(key = claim.key(), error = %err, "could not release an abandoned claim; it expires with its lease");
                }
            }
        });
    }
}

/// How an [`Outcome`](crate::Outcome) of the layer holds the claim of a
/// dead-lettered message until the runner knows whether the copy was
/// confirmed.
impl<St: Store> crate::outcome::HeldClaim for ClaimGuard<St> {
    fn discard(
        self: Box<Self>,
    ) -> futures_util::future::BoxFuture<'static, Result<bool, StoreError>> {
        Box::pin((*self).discard())
    }

    fn release(
        self: Box<Self>,
    ) -> futures_util::future::BoxFuture<'static, Result<bool, StoreError>> {
        Box::pin((*self).release())
    }

    fn abandon(mut self: Box<Self>) {
        // The handler has returned: nothing of its work still runs, so the
        // drop releases the claim (counted for the shutdown's flush).
        self.work_started = false;
        self.work_done = false;
    }
}
