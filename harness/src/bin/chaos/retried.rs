//! Counting retries in the consumer processes, as they happen: a
//! [`metrics`] recorder that turns each increment of
//! `idempotency_retried_total{via}` into a ledger line
//! `retried <pid> <via> <t>`.
//!
//! The runner increments `via="broker"` right after the broker confirmed a
//! retry copy in a delay queue (the original is acked then), with no await
//! in between, and `via="hold"` when a delivery is held and requeued
//! instead (with `IDEMPOTENCY_RETRY=hold`, or when a copy was not
//! confirmed). Written at once in a single `write`, the lines survive the
//! `kill -9` of a consumer, which the `ServeReport` it would print at the
//! end does not.

use std::sync::Arc;

use amqp_idempotency::metrics::RETRIED;
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

use crate::ledger::{Ledger, now_us};

/// Installs the recorder for this process; an error names what failed.
pub fn install(ledger: Arc<Ledger>, pid: u32) -> Result<(), String> {
    metrics::set_global_recorder(RetriedRecorder { ledger, pid })
        .map_err(|err| format!("cannot install the metrics recorder: {err}"))
}

struct RetriedRecorder {
    ledger: Arc<Ledger>,
    pid: u32,
}

/// One `via` of `idempotency_retried_total`.
struct RetriedCounter {
    ledger: Arc<Ledger>,
    pid: u32,
    via: String,
}

impl CounterFn for RetriedCounter {
    fn increment(&self, value: u64) {
        for _ in 0..value {
            self.ledger
                .append(&format!("retried {} {} {}", self.pid, self.via, now_us()));
        }
    }

    fn absolute(&self, _value: u64) {}
}

impl Recorder for RetriedRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != RETRIED {
            return Counter::noop();
        }
        let via = key
            .labels()
            .find(|label| label.key() == "via")
            .map_or_else(|| "-".to_owned(), |label| label.value().to_owned());
        Counter::from_arc(Arc::new(RetriedCounter {
            ledger: Arc::clone(&self.ledger),
            pid: self.pid,
            via,
        }))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}
