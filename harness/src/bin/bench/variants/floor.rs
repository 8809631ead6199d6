//! `redis_floor`: the Redis CPU any claim-then-mark design pays. Per
//! message, the two cheapest commands, `SET key v NX PX <lease>` before the
//! handler and `SET key v PX <retention>` after it, with no other logic,
//! sent the way `ours` sends its requests: the requests that wait together
//! go as one pipeline (up to [`MAX_BATCH`] each, [`MAX_IN_FLIGHT`] under way
//! at once, the store's own limits). The deliveries are consumed and acked
//! like `raw_multi` (one `multiple` ack over the finished prefix).

use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::message::Delivery;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot};

use crate::stats::{RunStats, message_id};

/// The store's pipeline limits (`MAX_BATCH`, `MAX_IN_FLIGHT` in the
/// library's Redis store), so both variants batch alike.
const MAX_BATCH: usize = 512;
const MAX_IN_FLIGHT: usize = 4;

/// The library's default lease and done-mark retention, in milliseconds.
const LEASE_MS: u64 = 30_000;
const RETENTION_MS: u64 = 86_400_000;

/// The two writes of a message.
#[derive(Clone, Copy, Debug)]
enum Write {
    /// `SET key p NX PX <lease>`: `true` when the key was free.
    Claim,
    /// `SET key d PX <retention>`.
    Mark,
}

struct Request {
    write: Write,
    key: String,
    reply: oneshot::Sender<Result<bool, String>>,
}

/// The handle deliveries write through; the pipelining task ends when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Floor {
    queue: mpsc::UnboundedSender<Request>,
}

impl Floor {
    /// Starts the pipelining task on `conn`; each pipeline sent counts as
    /// one round trip in `stats`.
    pub fn start(conn: MultiplexedConnection, stats: Arc<RunStats>) -> Self {
        let (queue, requests) = mpsc::unbounded_channel();
        tokio::spawn(send_in_batches(requests, conn, stats));
        Self { queue }
    }

    /// `SET key p NX PX`: `Ok(true)` when the key was free (a new message),
    /// `Ok(false)` when it exists (a duplicate).
    pub async fn claim(&self, key: String) -> Result<bool, String> {
        self.write(Write::Claim, key).await
    }

    /// `SET key d PX`.
    pub async fn mark(&self, key: String) -> Result<(), String> {
        self.write(Write::Mark, key).await.map(|_| ())
    }

    async fn write(&self, write: Write, key: String) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Request { write, key, reply })
            .map_err(|_| "the redis_floor pipelining task has stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "the redis_floor pipelining task dropped a request".to_owned())?
    }
}

/// One delivery: claim, run the handler when the key was free (else count
/// a duplicate), mark, and hand the delivery tag to the `multiple` acker.
/// A failed write leaves the delivery unacked: the run stalls and reports
/// the error, as nothing here retries.
pub async fn run(
    floor: &Floor,
    key: String,
    delivery: &Delivery,
    stats: &RunStats,
    start: u64,
    finished: &mpsc::UnboundedSender<(u64, u64)>,
) {
    let written = match floor.claim(key.clone()).await {
        Ok(true) => {
            stats.handle(message_id(delivery)).await;
            floor.mark(key).await
        }
        Ok(false) => {
            RunStats::count(&stats.duplicates);
            Ok(())
        }
        Err(err) => Err(err),
    };
    match written {
        Ok(()) => {
            let _ = finished.send((delivery.delivery_tag, start));
        }
        Err(err) => {
            eprintln!("bench: redis_floor: {err}");
            RunStats::count(&stats.errors);
        }
    }
}

/// Everything waiting (up to [`MAX_BATCH`]) as one pipeline, up to
/// [`MAX_IN_FLIGHT`] pipelines under way: the library's batching loop.
async fn send_in_batches(
    mut requests: mpsc::UnboundedReceiver<Request>,
    conn: MultiplexedConnection,
    stats: Arc<RunStats>,
) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            first = requests.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(first) = first else { break };
                let mut batch = Vec::with_capacity(16);
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match requests.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
                RunStats::count(&stats.redis_roundtrips);
                in_flight.push(send(conn.clone(), batch));
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.next().await.is_some() {}
}

async fn send(mut conn: MultiplexedConnection, batch: Vec<Request>) {
    let mut pipe = redis::pipe();
    for request in &batch {
        let cmd = pipe.cmd("SET").arg(&request.key);
        match request.write {
            Write::Claim => cmd.arg("p").arg("NX").arg("PX").arg(LEASE_MS),
            Write::Mark => cmd.arg("d").arg("PX").arg(RETENTION_MS),
        };
    }
    match pipe.query_async::<Vec<Value>>(&mut conn).await {
        Ok(replies) if replies.len() == batch.len() => {
            for (request, reply) in batch.into_iter().zip(replies) {
                let answer = match reply {
                    Value::Okay => Ok(true),
                    Value::Nil => Ok(false),
                    other => Err(format!(
                        "SET {} ({:?}) answered {other:?}",
                        request.key, request.write
                    )),
                };
                let _ = request.reply.send(answer);
            }
        }
        Ok(replies) => {
            let err = format!(
                "a pipeline of {} SETs got {} replies",
                batch.len(),
                replies.len()
            );
            for request in batch {
                let _ = request.reply.send(Err(err.clone()));
            }
        }
        Err(err) => {
            let err = format!("a pipeline of {} SETs failed: {err}", batch.len());
            for request in batch {
                let _ = request.reply.send(Err(err.clone()));
            }
        }
    }
}
