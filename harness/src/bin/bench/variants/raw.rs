//! `raw_multi`'s acker: one `basic.ack(multiple=true)` over the contiguous
//! prefix of finished delivery tags. (`raw_single` acks each delivery
//! itself, in the consume loop of the parent module.)

use std::collections::BTreeMap;
use std::sync::Arc;

use lapin::Channel;
use lapin::options::BasicAckOptions;
use tokio::sync::mpsc;

use crate::stats::RunStats;

/// with one `basic.ack(multiple=true)`; whatever finishes while that ack is
/// being written is acked by the next one. Delivery tags start at 1 on the
/// fresh channel, and only this consumer receives on it.
pub async fn ack_contiguous_prefix(
    channel: Channel,
    mut finished: mpsc::UnboundedReceiver<(u64, u64)>,
    stats: Arc<RunStats>,
) {
    let mut pending = BTreeMap::new();
    let mut next_tag = 1_u64;
    let mut batch = Vec::new();
    while let Some((tag, start)) = finished.recv().await {
        pending.insert(tag, start);
        while let Ok((tag, start)) = finished.try_recv() {
            pending.insert(tag, start);
        }
        batch.clear();
        while let Some(start) = pending.remove(&next_tag) {
            batch.push(start);
            next_tag += 1;
        }
        if batch.is_empty() {
            continue;
        }
        RunStats::count(&stats.ack_calls);
        let options = BasicAckOptions { multiple: true };
        match channel.basic_ack(next_tag - 1, options).await {
            Ok(()) => stats.settle_many(&batch),
            Err(err) => {
                eprintln!("bench: multiple ack up to {} failed: {err}", next_tag - 1);
                RunStats::count(&stats.errors);
            }
        }
    }
}
