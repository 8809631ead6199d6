//! The broker side of the outbox: [`OutboxPublisher`] sends what is ready
//! on channels in confirm mode and says what the broker confirmed.
//!
//! ```ignore
//! let publisher = OutboxPublisher::connect(&config);
//! let dispatched = publisher.dispatch(&ready).await;
//! // Mark `dispatched.confirmed` dispatched; send the rest again.
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::{mpsc, oneshot};

use super::ready::Ready;
use crate::config::Config;

/// The broker side of the outbox: channels in confirm mode.
///
/// Dispatches that wait together are sent together on a channel that no
/// other batch uses meanwhile, so the broker confirms them in few frames,
/// a message it returns as unroutable is told apart by its `message_id`,
/// and a channel the broker closes (a publish to a missing exchange) fails
/// only that batch, whose dispatches are then tried again each alone.
/// [`connect`](Self::connect) opens a connection of its own (from
/// `AMQP_URL`, with `AMQP_TLS_*`) at the first dispatch and again after a
/// failure; [`new`](Self::new) opens its channels on a connection you
/// manage.
pub struct OutboxPublisher {
    channels: Arc<Channels>,
    /// The dispatcher task's queue, started at the first dispatch.
    jobs: std::sync::OnceLock<mpsc::UnboundedSender<Job>>,
    /// Where a fault-injection test stops its deliveries.
    #[cfg(feature = "testing")]
    halt: Option<(Checkpoint, Arc<tokio::sync::Notify>)>,
}

/// Where the dispatcher gets its confirm-mode channels.
struct Channels {
    source: Source,
    /// The publisher's own connection ([`OutboxPublisher::connect`]).
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// Channels in confirm mode, waiting for the next batch.
    idle: Mutex<Vec<Channel>>,
    confirm_timeout: Duration,
}

/// The messages of one dispatch, and where its result goes.
struct Job {
    messages: Vec<Ready>,
    answer: oneshot::Sender<Dispatched>,
}

/// Most dispatches sent together on one channel.
const MAX_BATCH: usize = 256;

/// Most batches awaiting their confirms at once.
const MAX_IN_FLIGHT: usize = 4;

/// A point of the outbox's sequence, where fault-injection tests stop a
/// consumer as if it crashed there (`OutboxPublisher::halt_at`, with the
/// `testing` feature; without it, nothing stops there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum Checkpoint {
    /// The handler succeeded; nothing is committed yet.
    BeforeCommit,
    /// The done mark and the outbox are committed; nothing is published.
    Committed,
    /// The messages are published (and confirmed); not marked dispatched.
    Published,
    /// Marked dispatched; the incoming message is not acked yet.
    Marked,
}

enum Source {
    Connection(Box<Connection>),
    Connect(Box<Config>),
}

impl std::fmt::Debug for OutboxPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.channels.source {
            Source::Connection(_) => "a given connection",
            Source::Connect(_) => "its own connection",
        };
        f.debug_struct("OutboxPublisher")
            .field("source", &source)
            .field("confirm_timeout", &self.channels.confirm_timeout)
            .finish_non_exhaustive()
    }
}

/// How a dispatch went.
#[derive(Debug, Default)]
pub(crate) struct Dispatched {
    /// Message fields the broker confirmed: to be marked dispatched.
    pub(crate) confirmed: Vec<Vec<u8>>,
    /// The reply was confirmed (or came back unroutable: its requester is gone).
    pub(crate) reply_sent: bool,
    /// Why some were not, when some were not.
    pub(crate) problem: Option<String>,
}

impl OutboxPublisher {
    /// Publishes on channels of `connection` (opened as needed, in confirm
    /// mode). When the connection closes, dispatches fail (their incoming
    /// messages are held, then requeued) until you give the layer another
    /// publisher; prefer [`connect`](Self::connect), which reconnects.
    pub fn new(connection: Connection) -> Self {
        Self::with_source(Source::Connection(Box::new(connection)))
    }

    /// Publishes on a connection of its own to `config`'s broker, opened
    /// at the first dispatch and again after a failure.
    pub fn connect(config: &Config) -> Self {
        Self::with_source(Source::Connect(Box::new(config.clone())))
    }

    fn with_source(source: Source) -> Self {
        Self {
            channels: Arc::new(Channels {
                source,
                connection: tokio::sync::Mutex::new(None),
                idle: Mutex::new(Vec::new()),
                confirm_timeout: Duration::from_secs(5),
            }),
            jobs: std::sync::OnceLock::new(),
            #[cfg(feature = "testing")]
            halt: None,
        }
    }

    /// How long each step with the broker may take (connecting, opening a
    /// channel, publishing, the confirms; default 5s). Messages not
    /// confirmed in time are sent again, with the same `message_id`.
    /// Set it before the first dispatch.
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        if let Some(channels) = Arc::get_mut(&mut self.channels) {
            channels.confirm_timeout = timeout;
        }
        self
    }

    /// For fault-injection tests: every delivery that reaches `checkpoint`
    /// stops there for good (as if its consumer crashed) after notifying
    /// the returned `Notify`. Not for production use.
    #[cfg(feature = "testing")]
    pub fn halt_at(mut self, checkpoint: Checkpoint) -> (Self, Arc<tokio::sync::Notify>) {
        let reached = Arc::new(tokio::sync::Notify::new());
        self.halt = Some((checkpoint, Arc::clone(&reached)));
        (self, reached)
    }

    #[cfg(not(feature = "testing"))]
    pub(crate) async fn checkpoint(&self, _at: Checkpoint) {}

    /// Stops here for good when [`halt_at`](Self::halt_at) named `at`.
    #[cfg(feature = "testing")]
    pub(crate) async fn checkpoint(&self, at: Checkpoint) {
        if let Some((checkpoint, reached)) = &self.halt
            && *checkpoint == at
        {
            reached.notify_one();
            std::future::pending::<()>().await;
        }
    }

    /// Publishes `messages` in order and awaits their confirms. Dispatches
    /// that wait together travel together, on one channel that no other
    /// batch uses meanwhile (so the broker confirms them in few frames,
    /// and a message it returns as unroutable is told by its `message_id`).
    /// A reply that comes back is only logged (its requester is gone).
    pub(crate) async fn dispatch(&self, messages: &[Ready]) -> Dispatched {
        if messages.is_empty() {
            return Dispatched::default();
        }
        let jobs = self.jobs.get_or_init(|| {
            let (jobs, queue) = mpsc::unbounded_channel();
            tokio::spawn(run_dispatcher(Arc::clone(&self.channels), queue));
            jobs
        });
        let (answer, answered) = oneshot::channel();
        let job = Job {
            messages: messages.to_vec(),
            answer,
        };
        let stopped = || Dispatched {
            problem: Some("the outbox dispatcher stopped (was the runtime shut down?)".into()),
            ..Dispatched::default()
        };
        if jobs.send(job).is_err() {
            return stopped();
        }
        answered.await.unwrap_or_else(|_| stopped())
    }
}

/// Sends waiting dispatches in batches, up to [`MAX_IN_FLIGHT`] at once,
/// each on a channel of its own. Ends when the publisher is dropped.
async fn run_dispatcher(channels: Arc<Channels>, queue: mpsc::UnboundedReceiver<Job>) {
    let channels = &channels;
    crate::batch::send_in_batches(queue, MAX_BATCH, MAX_IN_FLIGHT, |batch| {
        channels.send_batch(batch)
    })
    .await;
}

impl Channels {
    /// `step` within the confirm timeout, or an error naming `what`.
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        step: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.confirm_timeout, step).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(format!("{what} failed: {err}")),
            Err(_) => Err(format!(
                "{what} took longer than {:?}",
                self.confirm_timeout
            )),
        }
    }

    /// A channel in confirm mode for one batch: an idle one, or a new one.
    async fn checkout(&self) -> Result<Channel, String> {
        loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pop();
            match idle {
                Some(channel) if channel.status().connected() => return Ok(channel),
                Some(_) => {}
                None => break,
            }
        }
        let channel = match &self.source {
            Source::Connection(connection) => {
                self.bounded("opening an outbox channel", connection.create_channel())
                    .await?
            }
            Source::Connect(config) => {
                // One connection attempt at a time; bounded, so a broker
                // that does not answer holds nobody for long.
                let mut open = self.connection.lock().await;
                let connection = match open.take() {
                    Some(connection) if connection.status().connected() => connection,
                    _ => {
                        self.bounded(
                            "connecting the outbox publisher",
                            crate::amqp::connect(config, ConnectionProperties::default()),
                        )
                        .await?
                    }
                };
                let channel = self
                    .bounded("opening an outbox channel", connection.create_channel())
                    .await;
                *open = Some(connection);
                channel?
            }
        };
        self.bounded(
            "putting the outbox channel in confirm mode",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(channel)
    }

    /// Publishes a batch of dispatches on one channel and answers each.
    /// When the channel fails under the batch (a publish to a missing
    /// exchange closes it), the dispatches that did not go through are
    /// tried once more, each on a channel of its own, so that one message
    /// cannot keep holding up the others it happened to travel with.
    async fn send_batch(&self, batch: Vec<Job>) {
        let lists: Vec<&[Ready]> = batch.iter().map(|job| &job.messages[..]).collect();
        let (mut results, channel_failed) = self.publish(&lists).await;
        if channel_failed && batch.len() > 1 {
            let again: Vec<usize> = (0..results.len())
                .filter(|&index| results[index].problem.is_some())
                .collect();
            let alone = again
                .iter()
                .map(|&index| self.publish(&lists[index..=index]));
            let retried = futures_util::future::join_all(alone).await;
            for (index, (mut alone, _)) in again.into_iter().zip(retried) {
                let result = &mut results[index];
                let alone = alone.pop().unwrap_or_default();
                result.confirmed.extend(alone.confirmed);
                result.reply_sent |= alone.reply_sent;
                result.problem = alone.problem;
            }
        }
        for (job, result) in batch.into_iter().zip(results) {
            let _ = job.answer.send(result);
        }
    }

    /// Publishes `lists` (one per dispatch) on one channel and says how
    /// each went, and whether the channel failed under them.
    async fn publish(&self, lists: &[&[Ready]]) -> (Vec<Dispatched>, bool) {
        let channel = match self.checkout().await {
            Ok(channel) => channel,
            Err(problem) => {
                let failed = lists
                    .iter()
                    .map(|_| Dispatched {
                        problem: Some(problem.clone()),
                        ..Dispatched::default()
                    })
                    .collect();
                return (failed, false);
            }
        };
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut results: Vec<Dispatched> = lists.iter().map(|_| Dispatched::default()).collect();
        let mut pending = Vec::new();
        let mut clean = true;
        'publish: for (job_index, messages) in lists.iter().enumerate() {
            for ready in messages.iter() {
                let published = self
                    .bounded(
                        "publishing",
                        channel.basic_publish(
                            ready.message.exchange.as_str().into(),
                            ready.message.routing_key.as_str().into(),
                            options,
                            &ready.message.body,
                            ready.message.properties.clone(),
                        ),
                    )
                    .await;
                match published {
                    Ok(confirm) => pending.push((job_index, ready, confirm)),
                    Err(problem) => {
                        clean = false;
                        // This one and every later one stay unconfirmed.
                        for result in &mut results[job_index..] {
                            result.problem.get_or_insert_with(|| problem.clone());
                        }
                        break 'publish;
                    }
                }
            }
        }
        let timeout = self.confirm_timeout;
        let confirms = pending
            .into_iter()
            .map(|(job_index, ready, confirm)| async move {
                (
                    job_index,
                    ready,
                    tokio::time::timeout(timeout, confirm).await,
                )
            });
        let answers = futures_util::future::join_all(confirms).await;
        // Returns are not tied to the confirm that carries them: gather
        // them all (this channel served this batch alone) and match them
        // by message_id.
        let mut returned = Vec::new();
        let mut acked = Vec::with_capacity(answers.len());
        for (job_index, ready, answer) in answers {
            let problem = match answer {
                Ok(Ok(Confirmation::Ack(back))) => {
                    returned.extend(back.and_then(|back| back.properties.message_id().clone()));
                    acked.push((job_index, ready));
                    continue;
                }
                Ok(Ok(Confirmation::NotRequested)) => {
                    acked.push((job_index, ready));
                    continue;
                }
                Ok(Ok(Confirmation::Nack(back))) => {
                    returned.extend(back.and_then(|back| back.properties.message_id().clone()));
                    "the broker refused a message (nack)".to_owned()
                }
                Ok(Err(err)) => {
                    clean = false;
                    format!("no confirm: {err}")
                }
                Err(_) => {
                    clean = false;
                    format!("no confirm within {timeout:?}")
                }
            };
            results[job_index].problem.get_or_insert(problem);
        }
        for (job_index, ready) in acked {
            let result = &mut results[job_index];
            let came_back = ready
                .message
                .properties
                .message_id()
                .as_ref()
                .is_some_and(|id| returned.contains(id));
            match (came_back, ready.reply) {
                (false, false) => result.confirmed.push(ready.field.clone()),
                (false, true) => result.reply_sent = true,
                (true, true) => {
                    tracing::warn!(reply_to = %ready.message.routing_key, "the reply could not be routed (is the requester gone?): dropped");
                    crate::metrics::outbox_unroutable();
                    result.reply_sent = true;
                }
                (true, false) => {
                    crate::metrics::outbox_unroutable();
                    result.problem.get_or_insert_with(|| {
                        format!(
                            "the broker could not route a message to exchange `{}` with routing key `{}` (is a queue bound?)",
                            ready.message.exchange, ready.message.routing_key
                        )
                    });
                }
            }
        }
        if clean {
            if channel.status().connected() {
                self.idle
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(channel);
            }
        } else if channel.status().connected() {
            // It may hold confirms or returns that belong to nobody now.
            let _ = tokio::time::timeout(timeout, channel.close(200, "OK".into())).await;
        }
        (results, !clean)
    }
}
