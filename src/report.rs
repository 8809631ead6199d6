//! What the runner did, in broker terms: [`ServeReport`], and the tally
//! that the runner and the settler both count into (it sits below both).
//!
//! ```
//! use amqp_idempotency::ServeReport;
//!
//! let mut total = ServeReport::default();
//! total += ServeReport { acked: 3, frames: 1, ..ServeReport::default() };
//! assert_eq!(total.acked, 3);
//! ```

use crate::outcome::{Disposition, OutcomeKind};

/// What [`serve`](crate::serve) did, in broker terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeReport {
    /// Deliveries acked.
    pub acked: u64,
    /// Deliveries nacked with requeue.
    pub requeued: u64,
    /// Deliveries whose retryable failure went through the broker: a copy
    /// confirmed in a delay queue, the original acked (counted in
    /// `acked` too).
    pub retried: u64,
    /// Deliveries rejected without requeue (dead-lettered).
    pub dead_lettered: u64,
    /// Deliveries whose ack/nack/reject did not reach the broker (channel
    /// closed): the broker redelivers them.
    pub unsettled: u64,
    /// Handlers still running at the shutdown deadline, abandoned.
    pub abandoned: u64,
    /// Connections re-established by [`serve_reconnecting`](crate::serve_reconnecting), and channels
    /// recovered by lapin (`ConnectionProperties::enable_auto_recover`).
    pub reconnects: u64,
    /// ack / nack / reject frames sent: the acks of consecutive finished
    /// deliveries share one `multiple` frame, so this is usually well
    /// below the number of deliveries.
    pub frames: u64,
}

impl std::ops::AddAssign for ServeReport {
    fn add_assign(&mut self, other: Self) {
        self.acked += other.acked;
        self.requeued += other.requeued;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.unsettled += other.unsettled;
        self.abandoned += other.abandoned;
        self.reconnects += other.reconnects;
        self.frames += other.frames;
    }
}

#[derive(Default)]
pub(crate) struct Tally {
    report: std::sync::Mutex<ServeReport>,
}

impl Tally {
    /// Counts the broker's answer to an ack/nack/reject of `tag`.
    /// Counts one frame sent to the broker.
    pub(crate) fn frame(&self) {
        self.add(|r| r.frames += 1);
    }

    pub(crate) fn record(
        &self,
        tag: u64,
        verb: &'static str,
        tally_as: Disposition,
        kind: Option<OutcomeKind>,
        result: lapin::Result<bool>,
    ) {
        match result {
            Ok(true) => self.add(|r| match tally_as {
                // Only a retry whose copy the broker confirmed is acked.
                Disposition::Ack if kind == Some(OutcomeKind::Retry) => {
                    r.acked += 1;
                    r.retried += 1;
                }
                Disposition::Ack => r.acked += 1,
                Disposition::Requeue { .. } => r.requeued += 1,
                Disposition::DeadLetter => {
                    r.dead_lettered += 1;
                    if let Some(kind) = kind {
                        crate::metrics::dead_lettered(kind);
                    }
                }
            }),
            Ok(false) => {
                tracing::warn!(
                    delivery_tag = tag,
                    verb,
                    "not settled: the channel is closed or the delivery was already settled; the broker redelivers it"
                );
                self.add(|r| r.unsettled += 1);
                crate::metrics::unsettled();
            }
            Err(err) => {
                tracing::warn!(delivery_tag = tag, verb, error = %err, "not settled; the broker redelivers it");
                self.add(|r| r.unsettled += 1);
                crate::metrics::unsettled();
            }
        }
    }

    pub(crate) fn add(&self, f: impl FnOnce(&mut ServeReport)) {
        let mut report = self
            .report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut report);
    }

    pub(crate) fn snapshot(&self) -> ServeReport {
        *self
            .report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
