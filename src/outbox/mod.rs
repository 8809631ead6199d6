//! The outbox: messages a handler publishes, committed with its done mark,
//! dispatched after the commit, and finished by duplicates.
//!
//! ```no_run
//! use amqp_idempotency::{Config, HandlerError, IdempotencyLayer};
//! use amqp_idempotency::outbox::{OutboxDelivery, OutboxPublisher};
//! use amqp_idempotency::store::RedisStore;
//! use lapin::BasicProperties;
//! use tower::{Layer, service_fn};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_env()?;
//! let store = RedisStore::connect(&config).await?;
//! let service = IdempotencyLayer::new(store, "orders", config.clone())?
//!     .with_outbox(OutboxPublisher::connect(&config))
//!     .layer(service_fn(|incoming: OutboxDelivery| async move {
//!         // Staged, not sent: published once the done mark is written.
//!         incoming.outbox.publish(
//!             "payments",
//!             "charge",
//!             BasicProperties::default(),
//!             incoming.delivery.data.clone(),
//!         )?;
//!         Ok::<_, HandlerError>(())
//!     }));
//! # let _ = service;
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//!
//! The handler gets an [`OutboxDelivery`]: the delivery and an [`Outbox`]
//! on which it stages outgoing messages ([`Outbox::publish`]) and, for a
//! request, its reply ([`Outbox::reply`]). Nothing is sent while it runs.
//!
//! 1. **Commit.** When the handler succeeded, its done mark and the staged
//!    messages are written in one atomic step (a script over the record's
//!    key and its companion [`outbox_key`], which share a hash tag,
//!    so it holds on a Redis Cluster too). A handler that failed or timed
//!    out commits nothing, and nothing it staged is ever published.
//! 2. **Dispatch.** The messages are published on a confirm-mode channel,
//!    each with a deterministic `message_id`: `{scope}:{fingerprint}:{n}`
//!    for the n-th message (from 0) and `{scope}:{fingerprint}:reply:{h}`
//!    for the reply, where `{h}` is 16 hex digits of a SHA-256 of the
//!    request's `correlation_id` (`{scope}:{fingerprint}:reply` for a
//!    request without one); an id longer than AMQP's 255 bytes is hashed.
//!    As the broker confirms them, they are marked dispatched (their
//!    bodies are dropped from the outbox).
//! 3. **Ack.** Only then is the incoming message acked. When a message was
//!    not confirmed, the incoming one is held and what is left sent again,
//!    for up to half of `IDEMPOTENCY_CONSUMER_TIMEOUT`, then requeued
//!    ([`OutcomeKind::Undispatched`](crate::OutcomeKind::Undispatched)).
//!
//! A duplicate of a done message dispatches what its outbox still holds
//! (never what was marked dispatched) before it is acked, and a duplicate
//! request whose reply is stored gets that reply again, at its own
//! `reply_to` with its own `correlation_id`, without running the handler.
//!
//! So a crash anywhere sends each outgoing message at least once, always
//! with the same `message_id`: a consumer that deduplicates by it (every
//! consumer of this crate does, by default) handles it once. The reply is
//! kept for the done mark's retention; dispatched messages' bodies are
//! dropped at once. An outbox consumer's done marks (and outboxes) are kept
//! at least half of `IDEMPOTENCY_CONSUMER_TIMEOUT` plus
//! `IDEMPOTENCY_RETRY_BACKOFF_MAX` and `IDEMPOTENCY_LEASE_TTL`, even when
//! `IDEMPOTENCY_DONE_TTL` is shorter: a delivery whose messages are not
//! confirmed is held that long, then requeued, and its copy must find them.
//!
//! # What a requester can deduplicate on
//!
//! A reply's `message_id` is one per request *attempt*: the same for
//! every copy of the reply to one `correlation_id` (a crash may send it
//! twice), different for a retried request that carries a new
//! `correlation_id`, so a requester that deduplicates replies by
//! `message_id` drops the extra copies and still gets the answer to its
//! retry. Match a reply to its request by `correlation_id`, as usual. A
//! requester that retries with the same `correlation_id` gets replies
//! with the same `message_id`, which its deduplication treats as one.
//!
//! A handler that writes to a database is not made atomic with the done
//! mark by this: only what goes through the outbox is.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::basic::{AMQPProperties, gen_properties, parse_properties};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tower::Layer;

use crate::config::Config;
use crate::error::HandlerError;
use crate::fingerprint::MessageIdOrBodyHash;
use crate::guard::Deduplicator;
use crate::layer::Idempotency;
use crate::store::OutboxEntry;

/// What a handler behind [`OutboxLayer`] receives: the delivery, and the
/// outbox it publishes through.
#[derive(Debug)]
pub struct OutboxDelivery {
    /// The incoming message (the runner settles it; do not ack it).
    pub delivery: Delivery,
    /// Where the handler stages what it publishes.
    pub outbox: Outbox,
}

/// The staging area of one delivery's outgoing messages.
///
/// Cloning it gives another handle on the same staging area. Staging after
/// the handler returned fails: what the handler left is what is committed.
#[derive(Clone, Debug)]
pub struct Outbox {
    staging: Arc<Mutex<Staging>>,
}

#[derive(Debug, Default)]
struct Staging {
    messages: Vec<Vec<u8>>,
    reply: Option<Vec<u8>>,
    bytes: usize,
    limit: usize,
    sealed: bool,
    /// Set once the limit was passed: the run fails, whatever the handler
    /// does with the error.
    overflow: Option<String>,
}

impl Outbox {
    fn new(limit: usize) -> Self {
        Self {
            staging: Arc::new(Mutex::new(Staging {
                limit,
                ..Staging::default()
            })),
        }
    }

    /// Stages a message for `exchange` (`""`: the default exchange) with
    /// `routing_key`. It is published only after the handler succeeded and
    /// its done mark was written; its `message_id` is set by the outbox.
    ///
    /// Fails (permanently: the message is dead-lettered, nothing is
    /// published) when the staged messages would pass
    /// `IDEMPOTENCY_OUTBOX_MAX_BYTES`, or when the handler already returned.
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: impl Into<Vec<u8>>,
    ) -> Result<(), HandlerError> {
        let encoded = encode(exchange, routing_key, &properties, &body.into())?;
        self.stage(encoded, false)
    }

    /// Stages the reply to a request: published to the delivery's
    /// `reply_to` with its `correlation_id` once the done mark is written,
    /// and kept for the done mark's retention so that a duplicate request
    /// gets it again without running the handler. A second reply replaces
    /// the first. Same limits as [`publish`](Self::publish).
    pub fn reply(
        &self,
        properties: BasicProperties,
        body: impl Into<Vec<u8>>,
    ) -> Result<(), HandlerError> {
        let encoded = encode("", "", &properties, &body.into())?;
        self.stage(encoded, true)
    }

    /// How many messages are staged (the reply not counted).
    pub fn len(&self) -> usize {
        self.lock().messages.len()
    }

    /// True when nothing is staged, reply included.
    pub fn is_empty(&self) -> bool {
        let staging = self.lock();
        staging.messages.is_empty() && staging.reply.is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Staging> {
        self.staging
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stage(&self, encoded: Vec<u8>, reply: bool) -> Result<(), HandlerError> {
        let mut staging = self.lock();
        if staging.sealed {
            return Err(HandlerError::permanent(
                "staged in the outbox after the handler returned: only what is staged while it runs is published (await the work inside the handler)",
            ));
        }
        let replaced = if reply {
            staging.reply.as_ref().map_or(0, Vec::len)
        } else {
            0
        };
        let bytes = staging.bytes - replaced + encoded.len();
        if bytes > staging.limit {
            let message = format!(
                "the outbox would hold {bytes} bytes, over IDEMPOTENCY_OUTBOX_MAX_BYTES={}: nothing is published; stage less per message or raise the limit",
                staging.limit
            );
            staging.overflow = Some(message.clone());
            return Err(HandlerError::permanent(message));
        }
        staging.bytes = bytes;
        if reply {
            staging.reply = Some(encoded);
        } else {
            staging.messages.push(encoded);
        }
        Ok(())
    }

    /// Ends staging: the entries to commit (field, encoded message), or
    /// the limit that was passed.
    pub(crate) fn seal(&self) -> Result<Vec<OutboxEntry>, HandlerError> {
        let mut staging = self.lock();
        staging.sealed = true;
        if let Some(overflow) = &staging.overflow {
            return Err(HandlerError::permanent(overflow.clone()));
        }
        let mut entries: Vec<OutboxEntry> = std::mem::take(&mut staging.messages)
            .into_iter()
            .enumerate()
            .map(|(position, message)| (message_field(position), message))
            .collect();
        if let Some(reply) = staging.reply.take() {
            entries.push((REPLY_FIELD.to_vec(), reply));
        }
        if !entries.is_empty() {
            entries.push((
                COMMITTED_FIELD.to_vec(),
                unix_millis().to_string().into_bytes(),
            ));
        }
        Ok(entries)
    }
}

/// The outbox field of the reply.
const REPLY_FIELD: &[u8] = b"r";

/// The outbox field that holds when it was committed (Unix milliseconds,
/// by the committing consumer's clock).
const COMMITTED_FIELD: &[u8] = b"t";

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// How long ago the outbox of `entries` was committed, when it says.
pub(crate) fn since_commit(entries: &[OutboxEntry]) -> Option<Duration> {
    let (_, value) = entries.iter().find(|(field, _)| field == COMMITTED_FIELD)?;
    let at: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    Some(Duration::from_millis(unix_millis().saturating_sub(at)))
}

/// True when `entries` still hold a message not marked dispatched.
pub(crate) fn undispatched(entries: &[OutboxEntry]) -> bool {
    entries.iter().any(|(field, _)| field.starts_with(b"m"))
}

/// The outbox field of the message staged at `position`.
fn message_field(position: usize) -> Vec<u8> {
    format!("m{position}").into_bytes()
}

/// The first byte of an encoded outgoing message: its format version.
const FORMAT: u8 = 1;

/// `FORMAT`, the exchange and routing key (a length byte each), the AMQP
/// properties (a 4-byte length, then their wire encoding), the body.
fn encode(
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    body: &[u8],
) -> Result<Vec<u8>, HandlerError> {
    let too_long = |what: &str, value: &str| {
        HandlerError::permanent(format!(
            "the outgoing message's {what} `{value}` is longer than AMQP's 255 bytes"
        ))
    };
    let exchange_len = u8::try_from(exchange.len()).map_err(|_| too_long("exchange", exchange))?;
    let key_len =
        u8::try_from(routing_key.len()).map_err(|_| too_long("routing key", routing_key))?;
    let props =
        cookie_factory::gen_simple(gen_properties(properties), Vec::new()).map_err(|err| {
            HandlerError::permanent(format!(
                "the outgoing message's properties cannot be encoded: {err:?}"
            ))
        })?;
    let props_len = u32::try_from(props.len())
        .map_err(|_| HandlerError::permanent("the outgoing message's properties are too large"))?;
    let mut out =
        Vec::with_capacity(7 + exchange.len() + routing_key.len() + props.len() + body.len());
    out.push(FORMAT);
    out.push(exchange_len);
    out.extend_from_slice(exchange.as_bytes());
    out.push(key_len);
    out.extend_from_slice(routing_key.as_bytes());
    out.extend_from_slice(&props_len.to_be_bytes());
    out.extend_from_slice(&props);
    out.extend_from_slice(body);
    Ok(out)
}

/// An outgoing message read back from the outbox.
#[derive(Clone, Debug, PartialEq)]
struct Outgoing {
    exchange: String,
    routing_key: String,
    properties: AMQPProperties,
    body: Vec<u8>,
}

fn decode(encoded: &[u8]) -> Option<Outgoing> {
    let (&format, rest) = encoded.split_first()?;
    if format != FORMAT {
        return None;
    }
    let short = |bytes: &[u8]| -> Option<(String, usize)> {
        let (&len, rest) = bytes.split_first()?;
        let text = std::str::from_utf8(rest.get(..usize::from(len))?).ok()?;
        Some((text.to_owned(), 1 + usize::from(len)))
    };
    let (exchange, used) = short(rest)?;
    let rest = &rest[used..];
    let (routing_key, used) = short(rest)?;
    let rest = &rest[used..];
    let props_len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let rest = &rest[4..];
    let props = rest.get(..props_len)?;
    let (_, properties) = parse_properties(props).ok()?;
    Some(Outgoing {
        exchange,
        routing_key,
        properties,
        body: rest[props_len..].to_vec(),
    })
}

/// The `message_id` of an outgoing message: `{scope}:{fingerprint}:{tail}`,
/// or, past AMQP's 255 bytes, a SHA-256 of it (hex, 32 bytes) and the tail.
fn message_id(scope: &str, fingerprint: &str, tail: &str) -> ShortString {
    let id = format!("{scope}:{fingerprint}:{tail}");
    if id.len() <= 255 {
        return id.into();
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}:{tail}").into()
}

/// The `message_id` tail of a reply: `reply:{h}`, where `h` is the first
/// 16 hex digits of the SHA-256 of the request's `correlation_id`, so
/// that the replies to a request and to its retry (another
/// `correlation_id`) have different ids, and the same `correlation_id`
/// always gets the same one; `reply` for a request without one.
fn reply_tail(correlation_id: Option<&ShortString>) -> String {
    let Some(correlation_id) = correlation_id else {
        return "reply".to_owned();
    };
    let digest = Sha256::digest(correlation_id.as_str().as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("reply:{hex}")
}

/// Where the reply of a delivery goes: its `reply_to`, with its
/// `correlation_id`.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplyTarget {
    reply_to: Option<ShortString>,
    correlation_id: Option<ShortString>,
}

impl ReplyTarget {
    pub(crate) fn of(delivery: &Delivery) -> Self {
        Self {
            reply_to: delivery.properties.reply_to().clone(),
            correlation_id: delivery.properties.correlation_id().clone(),
        }
    }
}

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
/// consumer as if it crashed there ([`OutboxPublisher::halt_at`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    #[doc(hidden)]
    pub fn halt_at(mut self, checkpoint: Checkpoint) -> (Self, Arc<tokio::sync::Notify>) {
        let reached = Arc::new(tokio::sync::Notify::new());
        self.halt = Some((checkpoint, Arc::clone(&reached)));
        (self, reached)
    }

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

/// A message on its way: its outbox field, whether it is the reply, and
/// the message with its `message_id` (and, for the reply, its target).
#[derive(Clone, Debug)]
pub(crate) struct Ready {
    field: Vec<u8>,
    reply: bool,
    message: Arc<Outgoing>,
}

impl Ready {
    pub(crate) fn is_reply(&self) -> bool {
        self.reply
    }

    pub(crate) fn field(&self) -> &[u8] {
        &self.field
    }
}

/// The messages of an outbox to send now, for the delivery of `fingerprint`
/// in `scope`: every message still there, in the order staged, then the
/// reply when `target` has a `reply_to`. `Err` names an entry this version
/// cannot read (written by a newer one, say).
pub(crate) fn ready(
    entries: Vec<OutboxEntry>,
    scope: &str,
    fingerprint: &str,
    target: &ReplyTarget,
) -> Result<Vec<Ready>, String> {
    let mut ready = Vec::with_capacity(entries.len());
    for (field, value) in entries {
        if field == COMMITTED_FIELD {
            continue;
        }
        let reply = field == REPLY_FIELD;
        let position = field
            .strip_prefix(b"m")
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok());
        let (Some(mut message), true) = (decode(&value), reply || position.is_some()) else {
            return Err(format!(
                "the outbox entry `{}` is in a format this version cannot read: run the version that wrote it",
                String::from_utf8_lossy(&field)
            ));
        };
        let tail = match position {
            Some(n) => n.to_string(),
            None => reply_tail(target.correlation_id.as_ref()),
        };
        message.properties =
            message
                .properties
                .with_message_id(message_id(scope, fingerprint, &tail));
        if reply {
            let Some(reply_to) = &target.reply_to else {
                continue;
            };
            message.exchange = String::new();
            message.routing_key = reply_to.to_string();
            if let Some(correlation_id) = &target.correlation_id {
                message.properties = message
                    .properties
                    .with_correlation_id(correlation_id.clone());
            }
        }
        ready.push((
            position.unwrap_or(usize::MAX),
            Ready {
                field,
                reply,
                message: Arc::new(message),
            },
        ));
    }
    ready.sort_by_key(|(position, _)| *position);
    Ok(ready.into_iter().map(|(_, ready)| ready).collect())
}

/// The key of the outbox of the record at `record_key`: a companion key
/// (same cluster slot) whose suffix holds a control character, which no
/// record key does, so that it can never be another message's record.
///
/// ```
/// use amqp_idempotency::outbox::outbox_key;
/// assert_eq!(outbox_key("idem:orders:order-42"), "{idem:orders:order-42}:\0outbox");
/// ```
pub fn outbox_key(record_key: &str) -> String {
    crate::fingerprint::companion_key(record_key, "\0outbox")
}

/// Wraps a handler of [`OutboxDelivery`] in [`Idempotency`]: made by
/// [`IdempotencyLayer::with_outbox`](crate::IdempotencyLayer::with_outbox).
pub struct OutboxLayer<St, F = MessageIdOrBodyHash> {
    dedup: Deduplicator<St, F>,
    mode: WithOutbox,
}

impl<St, F> Clone for OutboxLayer<St, F> {
    fn clone(&self) -> Self {
        Self {
            dedup: self.dedup.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<St, F> std::fmt::Debug for OutboxLayer<St, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxLayer")
            .field("dedup", &self.dedup)
            .field("publisher", &self.mode.publisher)
            .finish()
    }
}

impl<St, F> OutboxLayer<St, F> {
    pub(crate) fn new(dedup: Deduplicator<St, F>, publisher: OutboxPublisher) -> Self {
        Self {
            dedup,
            mode: WithOutbox {
                publisher: Arc::new(publisher),
            },
        }
    }

    /// The deduplicator, e.g. to look up a key.
    pub fn deduplicator(&self) -> &Deduplicator<St, F> {
        &self.dedup
    }
}

impl<S, St, F> Layer<S> for OutboxLayer<St, F> {
    type Service = Idempotency<S, St, F, WithOutbox>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::with_mode(inner, self.dedup.clone(), self.mode.clone())
    }
}

/// How [`Idempotency`] calls its handler: with the delivery alone
/// ([`Plain`]) or with an outbox ([`WithOutbox`]). Sealed.
pub trait Mode: Clone + Send + Sync + 'static + sealed::Sealed {
    /// What the handler receives.
    type Request: Send + 'static;

    #[doc(hidden)]
    fn request(delivery: Delivery, outbox: Option<Outbox>) -> Self::Request;

    #[doc(hidden)]
    fn publisher(&self) -> Option<&Arc<OutboxPublisher>>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Plain {}
    impl Sealed for super::WithOutbox {}
}

/// The handler is a `Service<Delivery>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plain;

impl Mode for Plain {
    type Request = Delivery;

    fn request(delivery: Delivery, _outbox: Option<Outbox>) -> Delivery {
        delivery
    }

    fn publisher(&self) -> Option<&Arc<OutboxPublisher>> {
        None
    }
}

/// The handler is a `Service<OutboxDelivery>`.
#[derive(Clone, Debug)]
pub struct WithOutbox {
    publisher: Arc<OutboxPublisher>,
}

impl Mode for WithOutbox {
    type Request = OutboxDelivery;

    fn request(delivery: Delivery, outbox: Option<Outbox>) -> OutboxDelivery {
        OutboxDelivery {
            delivery,
            outbox: outbox.unwrap_or_else(|| Outbox::new(0)),
        }
    }

    fn publisher(&self) -> Option<&Arc<OutboxPublisher>> {
        Some(&self.publisher)
    }
}

/// A fresh staging area with the configured limit.
pub(crate) fn staging(config: &Config) -> Outbox {
    Outbox::new(config.outbox_max_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable};

    #[test]
    fn messages_round_trip_through_their_encoding() {
        let mut headers = FieldTable::default();
        headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers)
            .with_delivery_mode(2);
        let encoded = encode("payments", "charge", &properties, b"{\"cents\":100}").unwrap();
        let decoded = decode(&encoded).unwrap();
        assert_eq!(decoded.exchange, "payments");
        assert_eq!(decoded.routing_key, "charge");
        assert_eq!(decoded.properties, properties);
        assert_eq!(decoded.body, b"{\"cents\":100}");
        assert!(decode(&encoded[..5]).is_none());
        assert!(decode(b"\x02rest").is_none());
    }

    #[test]
    fn staging_keeps_to_its_limit_and_ends_with_the_handler() {
        let outbox = Outbox::new(200);
        outbox
            .publish("", "q", BasicProperties::default(), vec![0; 50])
            .unwrap();
        outbox
            .reply(BasicProperties::default(), vec![1; 50])
            .unwrap();
        // A second reply replaces the first, and counts once.
        outbox
            .reply(BasicProperties::default(), vec![2; 50])
            .unwrap();
        let err = outbox
            .publish("", "q", BasicProperties::default(), vec![0; 150])
            .unwrap_err();
        assert!(
            err.to_string().contains("IDEMPOTENCY_OUTBOX_MAX_BYTES=200"),
            "{err}"
        );
        // Passing the limit fails the run even when the handler ignores it.
        assert!(outbox.seal().is_err());

        let outbox = Outbox::new(1000);
        outbox
            .publish("x", "a", BasicProperties::default(), "1")
            .unwrap();
        outbox
            .publish("x", "b", BasicProperties::default(), "2")
            .unwrap();
        outbox.reply(BasicProperties::default(), "r").unwrap();
        let entries = outbox.seal().unwrap();
        let fields: Vec<&[u8]> = entries.iter().map(|(f, _)| &f[..]).collect();
        assert_eq!(fields, [&b"m0"[..], b"m1", b"r", b"t"]);
        assert!(undispatched(&entries));
        assert!(since_commit(&entries).is_some_and(|age| age < Duration::from_secs(60)));
        assert!(!undispatched(&entries[2..]));
        assert!(
            outbox
                .publish("x", "c", BasicProperties::default(), "3")
                .is_err()
        );
    }

    #[test]
    fn ready_keeps_the_staged_order_and_refuses_what_it_cannot_read() {
        let outbox = Outbox::new(100_000);
        for n in 0..12 {
            outbox
                .publish("", "q", BasicProperties::default(), format!("{n}"))
                .unwrap();
        }
        let mut entries = outbox.seal().unwrap();
        // As a store returns them: sorted by field bytes (m0, m1, m10, m11, m2...).
        entries.sort_unstable();
        let ready = ready(entries.clone(), "s", "f", &ReplyTarget::default()).unwrap();
        let bodies: Vec<String> = ready
            .iter()
            .map(|r| String::from_utf8_lossy(&r.message.body).into_owned())
            .collect();
        let staged: Vec<String> = (0..12).map(|n| n.to_string()).collect();
        assert_eq!(bodies, staged);
        entries.push((b"m12".to_vec(), b"\x02from a newer version".to_vec()));
        let err = super::ready(entries, "s", "f", &ReplyTarget::default()).unwrap_err();
        assert!(err.contains("`m12`"), "{err}");
    }

    #[test]
    fn message_ids_are_deterministic_and_fit_amqp() {
        assert_eq!(message_id("orders", "o-7", "0").as_str(), "orders:o-7:0");
        let long = "f".repeat(300);
        let id = message_id("orders", &long, "reply");
        assert!(id.as_str().len() <= 255);
        assert_eq!(id, message_id("orders", &long, "reply"));
        assert_ne!(id, message_id("orders", &long, "0"));
    }

    #[test]
    fn reply_ids_are_one_per_correlation_id() {
        let outbox = Outbox::new(1000);
        outbox.reply(BasicProperties::default(), "r").unwrap();
        let entries = outbox.seal().unwrap();
        let reply_id = |correlation_id: Option<&str>| {
            let target = ReplyTarget {
                reply_to: Some("asker".into()),
                correlation_id: correlation_id.map(Into::into),
            };
            let ready = ready(entries.clone(), "quotes", "q-1", &target).unwrap();
            ready[0].message.properties.message_id().clone().unwrap()
        };
        let first = reply_id(Some("c-1"));
        assert!(first.as_str().starts_with("quotes:q-1:reply:"), "{first}");
        assert_eq!(first.as_str().len(), "quotes:q-1:reply:".len() + 16);
        assert_eq!(first, reply_id(Some("c-1")), "deterministic");
        assert_ne!(first, reply_id(Some("c-2")), "one per correlation id");
        assert_eq!(reply_id(None).as_str(), "quotes:q-1:reply");
        // A long correlation id still makes a short id.
        let long = "c".repeat(255);
        assert!(reply_id(Some(&long)).as_str().len() < 64);
        let long_fingerprint = "f".repeat(300);
        let target = ReplyTarget {
            reply_to: Some("asker".into()),
            correlation_id: Some("c-1".into()),
        };
        let ready = ready(entries, "quotes", &long_fingerprint, &target).unwrap();
        let id = ready[0].message.properties.message_id().clone().unwrap();
        assert!(id.as_str().len() <= 255, "{id}");
        assert!(
            id.as_str()
                .ends_with(&first.as_str()["quotes:q-1:".len()..]),
            "{id}"
        );
    }

    #[test]
    fn ready_sets_ids_and_sends_the_reply_to_the_asker() {
        let outbox = Outbox::new(1000);
        outbox
            .publish("x", "a", BasicProperties::default(), "1")
            .unwrap();
        outbox
            .reply(
                BasicProperties::default().with_content_type("text/plain".into()),
                "r",
            )
            .unwrap();
        let entries = outbox.seal().unwrap();
        let target = ReplyTarget {
            reply_to: Some("amq.rabbitmq.reply-to.abc".into()),
            correlation_id: Some("c-1".into()),
        };
        let ready = ready(entries.clone(), "quotes", "q-1", &target).unwrap();
        assert_eq!(ready.len(), 2);
        assert_eq!(
            ready[0]
                .message
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
            Some("quotes:q-1:0")
        );
        let reply = &ready[1];
        assert!(reply.reply);
        assert_eq!(reply.message.routing_key, "amq.rabbitmq.reply-to.abc");
        assert_eq!(
            reply
                .message
                .properties
                .correlation_id()
                .as_ref()
                .map(ShortString::as_str),
            Some("c-1")
        );
        // Without a reply_to, the reply stays in the outbox unsent.
        assert_eq!(
            super::ready(entries, "quotes", "q-1", &ReplyTarget::default())
                .unwrap()
                .len(),
            1
        );
    }
}
