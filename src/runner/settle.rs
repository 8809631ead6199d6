//! Settling deliveries with the broker: acks coalesced into `multiple=true`
//! frames over the contiguous prefix of finished delivery tags.
//!
//! `basic.ack(tag, multiple=true)` acknowledges *every* unacked delivery up
//! to `tag` on the channel, so it may only cover tags that are finished
//! and recorded. The settler tracks every tag from the moment the runner
//! takes the delivery; an ack is sent for the prefix below the lowest tag
//! still open. Acks stuck behind a slow delivery (a long handler, a delayed
//! requeue) are sent one by one after [`MAX_HOLD`], so one slow message
//! never holds the others' acks for long. Nacks and rejects are always
//! sent at once and alone.
//!
//! A multiple ack is only safe when every delivery on the channel passes
//! through this runner. The settler checks that the tags it sees start at
//! 1 and have no gaps; if they do not (another consumer on the same
//! channel, or a channel used before), it sends single acks only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::outcome::{Disposition, OutcomeKind};
use crate::report::Tally;

/// How long a finished ack may wait for a slower delivery before it is sent alone.
pub(crate) const MAX_HOLD: Duration = Duration::from_millis(2);

/// How long one ack/nack/reject may take. lapin can leave the call pending
/// when the connection dies at that moment; such a delivery counts as
/// unsettled (the broker redelivers it) and the settler moves on.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one frame through `send`, bounded by [`SEND_TIMEOUT`].
async fn bounded(
    tally: &Tally,
    send: impl std::future::Future<Output = lapin::Result<bool>>,
) -> lapin::Result<bool> {
    tally.frame();
    match tokio::time::timeout(SEND_TIMEOUT, send).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(timeout = ?SEND_TIMEOUT, "the broker connection did not take an ack/nack/reject in time");
            Ok(false)
        }
    }
}

pub(crate) enum Event {
    /// The runner took this delivery: it is open until settled.
    Open(u64),
    /// Apply `disposition` now; count it as `tally_as`.
    Settle {
        tag: u64,
        acker: Acker,
        disposition: Disposition,
        tally_as: Disposition,
        kind: Option<OutcomeKind>,
    },
}

/// The sending half, cloned into each delivery task.
#[derive(Clone)]
pub(crate) struct Settler {
    events: mpsc::UnboundedSender<Event>,
}

impl Settler {
    /// Starts the settler task for one channel; it ends once every
    /// `Settler` is dropped and everything queued is settled.
    pub(crate) fn start(tally: Arc<Tally>) -> (Self, tokio::task::JoinHandle<()>) {
        let (events, queue) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(queue, tally));
        (Self { events }, task)
    }

    pub(crate) fn open(&self, tag: u64) {
        let _ = self.events.send(Event::Open(tag));
    }

    pub(crate) fn settle(
        &self,
        tag: u64,
        acker: Acker,
        disposition: Disposition,
        tally_as: Disposition,
        kind: Option<OutcomeKind>,
    ) {
        let event = Event::Settle {
            tag,
            acker,
            disposition,
            tally_as,
            kind,
        };
        if let Err(mpsc::error::SendError(Event::Settle { tag, .. })) = self.events.send(event) {
            tracing::warn!(
                delivery_tag = tag,
                "settler gone: the delivery returns to the queue when the channel closes"
            );
        }
    }
}

struct Ready {
    acker: Acker,
    tally_as: Disposition,
    kind: Option<OutcomeKind>,
    since: Instant,
}

struct State {
    open: BTreeSet<u64>,
    ready: BTreeMap<u64, Ready>,
    /// The last tag opened; tags must follow 1, 2, 3... for multiple acks.
    last_opened: u64,
    /// False once a tag broke the sequence: single acks from then on.
    contiguous: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            open: BTreeSet::new(),
            ready: BTreeMap::new(),
            last_opened: 0,
            contiguous: true,
        }
    }
}

async fn run(mut queue: mpsc::UnboundedReceiver<Event>, tally: Arc<Tally>) {
    let mut state = State::default();
    let mut closed = false;
    while !closed || !state.ready.is_empty() {
        // Wait for an event, or for the oldest held ack to be due.
        let due = state.ready.values().map(|r| r.since + MAX_HOLD).min();
        let event = match due {
            _ if closed => None,
            Some(due) => tokio::select! {
                event = queue.recv() => event,
                () = tokio::time::sleep_until(due) => None,
            },
            None => queue.recv().await,
        };
        match event {
            Some(event) => {
                apply(&mut state, event, &tally).await;
                // Take everything else already queued before sending acks.
                while let Ok(event) = queue.try_recv() {
                    apply(&mut state, event, &tally).await;
                }
            }
            None if !closed && queue.is_closed() && queue.is_empty() => closed = true,
            None => {}
        }
        flush(&mut state, &tally, closed).await;
    }
}

async fn apply(state: &mut State, event: Event, tally: &Tally) {
    match event {
        Event::Open(tag) => {
            if state.contiguous && tag != state.last_opened + 1 {
                state.contiguous = false;
                tracing::warn!(
                    delivery_tag = tag,
                    "delivery tags are not 1, 2, 3...: the channel is shared with another consumer or was used before; acking one by one"
                );
            }
            state.last_opened = tag;
            state.open.insert(tag);
        }
        Event::Settle {
            tag,
            acker,
            disposition,
            tally_as,
            kind,
        } => {
            state.open.remove(&tag);
            match disposition {
                Disposition::Ack => {
                    state.ready.insert(
                        tag,
                        Ready {
                            acker,
                            tally_as,
                            kind,
                            since: Instant::now(),
                        },
                    );
                }
                Disposition::Requeue { .. } => {
                    let options = BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    };
                    let result = bounded(tally, acker.nack(options)).await;
                    tally.record(tag, "nack", tally_as, kind, result);
                }
                Disposition::DeadLetter => {
                    let result =
                        bounded(tally, acker.reject(BasicRejectOptions { requeue: false })).await;
                    tally.record(tag, "reject", tally_as, kind, result);
                }
            }
        }
    }
}

/// Sends one `multiple=true` ack for the finished prefix, then single acks
/// for the finished deliveries held too long behind an open one (or all of
/// them when closing).
async fn flush(state: &mut State, tally: &Tally, closing: bool) {
    let lowest_open = if state.contiguous {
        state.open.first().copied().unwrap_or(u64::MAX)
    } else {
        0
    };
    let prefix: Vec<(u64, Ready)> = {
        let rest = state.ready.split_off(&lowest_open);
        std::mem::replace(&mut state.ready, rest)
            .into_iter()
            .collect()
    };
    if let Some((last_tag, last)) = prefix.last() {
        let multiple = prefix.len() > 1;
        let result = bounded(tally, last.acker.ack(BasicAckOptions { multiple })).await;
        let sent = matches!(result, Ok(true));
        tally.record(*last_tag, "ack", last.tally_as, last.kind, result);
        for (tag, ready) in &prefix[..prefix.len() - 1] {
            let result = if sent {
                Ok(true)
            } else if !ready.acker.poisoned() {
                // The last one's acker was already used (a handler acked its
                // own delivery?) while the channel is fine: ack these alone.
                bounded(tally, ready.acker.ack(BasicAckOptions::default())).await
            } else {
                Ok(false)
            };
            tally.record(*tag, "ack", ready.tally_as, ready.kind, result);
        }
    }
    let now = Instant::now();
    let overdue: Vec<u64> = state
        .ready
        .iter()
        .filter(|(_, r)| closing || !state.contiguous || r.since + MAX_HOLD <= now)
        .map(|(tag, _)| *tag)
        .collect();
    for tag in overdue {
        if let Some(ready) = state.ready.remove(&tag) {
            let result = bounded(tally, ready.acker.ack(BasicAckOptions::default())).await;
            tally.record(tag, "ack", ready.tally_as, ready.kind, result);
        }
    }
}
