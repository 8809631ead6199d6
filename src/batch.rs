//! Requests that wait together travel together: the loop behind the Redis
//! store's pipelines and the outbox's publisher batches.

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;

/// Takes everything waiting in `queue` (up to `max_batch` items) as one
/// batch and hands it to `send`; up to `max_in_flight` batches are under
/// way at once, so an item never waits for an unrelated batch's answers
/// before it is sent. Ends once the queue is closed and every batch sent.
pub(crate) async fn send_in_batches<T, F, Fut>(
    mut queue: mpsc::UnboundedReceiver<T>,
    max_batch: usize,
    max_in_flight: usize,
    send: F,
) where
    F: Fn(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            batch = next_batch(&mut queue, max_batch), if in_flight.len() < max_in_flight => {
                let Some(batch) = batch else { break };
                in_flight.push(send(batch));
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.next().await.is_some() {}
}

/// Everything waiting in `queue`, up to `max_batch` items, after waiting
/// for the first; `None` once the queue is closed and empty.
pub(crate) async fn next_batch<T>(
    queue: &mut mpsc::UnboundedReceiver<T>,
    max_batch: usize,
) -> Option<Vec<T>> {
    let first = queue.recv().await?;
    let mut batch = Vec::with_capacity(16);
    batch.push(first);
    while batch.len() < max_batch {
        match queue.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}
