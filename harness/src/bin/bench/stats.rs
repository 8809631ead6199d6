//! What a drain counts: executions per message id, duplicates, ack frames,
//! Redis round trips, latencies; and when every message is settled.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use tokio::sync::Notify;

use crate::meter::now_ns;
use crate::plan::Plan;
use crate::publish::SENT_HEADER;

/// A drain that makes no progress for this long fails.
const STALL: Duration = Duration::from_secs(30);

/// Everything a drain counts; shared by the consumer tasks.
pub struct RunStats {
    /// Executions of the handler per message id.
    pub executions: Vec<AtomicU32>,
    pub handler_delay: Duration,
    /// Delivery-to-ack latencies, microseconds.
    pub latencies_us: Mutex<Vec<u32>>,
    /// Published messages finished for good (acked, or dead-lettered).
    pub settled: AtomicU64,
    pub target: u64,
    pub done: Notify,
    /// Deliveries suppressed as duplicates (naive, ours).
    pub duplicates: AtomicU64,
    pub ack_calls: AtomicU64,
    pub redis_roundtrips: AtomicU64,
    /// Deliveries requeued (ours: a duplicate in progress elsewhere, a store error).
    pub requeued: AtomicU64,
    /// Anything that should not happen in a benchmark: failed acks, Redis
    /// errors, dead-lettered messages, outcomes other than processed/duplicate.
    pub errors: AtomicU64,
    /// Deliveries whose message id is not one of ours.
    pub foreign: AtomicU64,
    /// Per id: whether this variant's handler fails it (`ours_hold` and
    /// `ours_broker` with `--failing`); empty for the other variants.
    pub failing: Vec<bool>,
    /// Published messages whose id does not fail, and how many of them are
    /// settled (acked) so far.
    pub healthy_target: u64,
    pub healthy_settled: AtomicU64,
    /// When the first handler ran, and when the last healthy message was
    /// settled ([`now_ns`]; 0: not yet).
    pub first_call_ns: AtomicU64,
    pub healthy_done_ns: AtomicU64,
    /// Failing deliveries parked (dead-lettered) after their last attempt.
    pub parked: AtomicU64,
    /// `retry` outcomes: failed runs that will run again.
    pub retries: AtomicU64,
    /// Retry copies confirmed in a delay queue (the runner's `ServeReport::retried`).
    pub retried_via_broker: AtomicU64,
}

impl RunStats {
    /// `fails`: the variant's handler fails the plan's failing ids.
    pub fn new(plan: &Plan, handler_delay: Duration, fails: bool) -> Self {
        Self {
            failing: if fails {
                plan.failing.clone()
            } else {
                Vec::new()
            },
            healthy_target: if fails {
                plan.healthy_published()
            } else {
                plan.published()
            },
            healthy_settled: AtomicU64::new(0),
            first_call_ns: AtomicU64::new(0),
            healthy_done_ns: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            retried_via_broker: AtomicU64::new(0),
            executions: (0..plan.unique).map(|_| AtomicU32::new(0)).collect(),
            handler_delay,
            latencies_us: Mutex::new(Vec::with_capacity(plan.ids.len())),
            settled: AtomicU64::new(0),
            target: plan.published(),
            done: Notify::new(),
            duplicates: AtomicU64::new(0),
            ack_calls: AtomicU64::new(0),
            redis_roundtrips: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        }
    }

    /// The handler every variant runs: sleep (if asked), then count one
    /// execution of the message id.
    pub async fn handle(&self, id: Option<u32>) {
        let _ = self.first_call_ns.compare_exchange(
            0,
            now_ns().max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if !self.handler_delay.is_zero() {
            tokio::time::sleep(self.handler_delay).await;
        }
        match id.and_then(|id| self.executions.get(id as usize)) {
            Some(count) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.foreign.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn settle(&self, start_ns: u64) {
        self.record_latency(&[start_ns]);
        self.settled_n(1);
    }

    /// Whether this variant's handler fails `id`.
    pub fn fails(&self, id: Option<u32>) -> bool {
        id.and_then(|id| self.failing.get(id as usize).copied())
            .unwrap_or(false)
    }

    /// A message whose id does not fail was acked: the healthy messages'
    /// clock stops with the last one.
    pub fn settle_healthy(&self) {
        if self.healthy_settled.fetch_add(1, Ordering::AcqRel) + 1 == self.healthy_target {
            self.healthy_done_ns.store(now_ns(), Ordering::Release);
        }
    }

    /// Healthy messages per second: from the first handler run to the ack
    /// of the last healthy message (startup, such as declaring the delay
    /// queues, and the failing messages' tail are left out).
    pub fn healthy_rate(&self) -> Option<f64> {
        let first = self.first_call_ns.load(Ordering::Acquire);
        let done = self.healthy_done_ns.load(Ordering::Acquire);
        (first > 0 && done > first)
            .then(|| self.healthy_target as f64 / ((done - first) as f64 / 1e9))
    }

    pub fn settle_many(&self, starts: &[u64]) {
        self.record_latency(starts);
        self.settled_n(starts.len() as u64);
    }

    pub fn record_latency(&self, starts: &[u64]) {
        let now = now_ns();
        let mut latencies = self
            .latencies_us
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        latencies.extend(
            starts
                .iter()
                .map(|start| u32::try_from(now.saturating_sub(*start) / 1000).unwrap_or(u32::MAX)),
        );
    }

    pub fn settled_n(&self, n: u64) {
        if self.settled.fetch_add(n, Ordering::AcqRel) + n >= self.target {
            self.done.notify_one();
        }
    }

    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until every published message is settled; fails when nothing
    /// moves for [`STALL`].
    pub async fn wait_done(&self) -> Result<(), String> {
        let mut last = self.settled.load(Ordering::Acquire);
        let mut last_progress = Instant::now();
        loop {
            let settled = self.settled.load(Ordering::Acquire);
            if settled >= self.target {
                return Ok(());
            }
            if settled != last {
                last = settled;
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= STALL {
                return Err(format!(
                    "stalled: {settled} of {} messages settled, no progress for {STALL:?}",
                    self.target
                ));
            }
            tokio::select! {
                () = self.done.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// The message id (decimal) of a delivery.
pub fn message_id(delivery: &Delivery) -> Option<u32> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .and_then(|id| id.as_str().parse().ok())
}

/// Where the delivery-to-ack latency starts: the publish timestamp in
/// open-loop mode, else now (the consumer just received the delivery).
pub fn latency_start(delivery: &Delivery) -> u64 {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| match headers.inner().get(SENT_HEADER) {
            Some(AMQPValue::LongLongInt(ns)) => u64::try_from(*ns).ok(),
            _ => None,
        })
        .unwrap_or_else(now_ns)
}
