//! The Redis store: one key per message, token-checked scripts, and every
//! request that is waiting sent together as one pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, RedisError, Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::Store;
use crate::error::{StoreError, redact_url};

/// Compare-and-set on each key: if KEYS[i] holds ARGV[3i-2], set it to
/// ARGV[3i-1] with a PX of ARGV[3i] (or delete it when ARGV[3i-1] is
/// empty). A key that already holds its target also answers 1, so a
/// retried transition is harmless. Each key is checked and written on its
/// own, and an error on one key (a key of another type, say) is that key's
/// answer alone; one call carries the transitions of every request that
/// waited together, so the script's overhead is paid once per round trip.
const TRANSITIONS: &str = r"
local answers = {}
for i = 1, #KEYS do
  local from, to, ttl = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local current = redis.pcall('GET', KEYS[i])
  if type(current) == 'table' and current.err then
    answers[i] = current
  elseif current == from then
    local written
    if to == '' then
      written = redis.pcall('DEL', KEYS[i])
    else
      written = redis.pcall('SET', KEYS[i], to, 'PX', ttl)
    end
    if type(written) == 'table' and written.err then
      answers[i] = written
    else
      answers[i] = 1
    end
  elseif to ~= '' and current == to then
    answers[i] = 1
  else
    answers[i] = 0
  end
end
return answers
";

/// Most requests sent in one pipeline.
const MAX_BATCH: usize = 512;

/// Most pipelines awaiting their replies at once.
const MAX_IN_FLIGHT: usize = 4;

/// A [`Store`] on Redis 7 or newer (it uses `SET ... NX PX GET`).
///
/// All clones share one multiplexed connection that reconnects by itself,
/// and one writer task: requests issued while a pipeline is in flight are
/// sent together as the next pipeline, so under load the claims of many
/// deliveries and the done marks of earlier ones share a round trip. No
/// timer is involved: a lone request is sent at once. The token-checked
/// transitions of one pipeline run in a single script call (called by SHA,
/// loaded again after a Redis restart); each key is still checked and
/// written on its own. That call names several keys, so this store is for
/// a standalone Redis (or a primary with replicas), not Redis Cluster.
///
/// ```no_run
/// use amqp_idempotency::store::RedisStore;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), amqp_idempotency::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    requests: mpsc::UnboundedSender<Request>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    round_trips: AtomicU64,
    commands: AtomicU64,
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Value, Failure>>,
}

enum Op {
    /// Sent as it is.
    Command(Cmd),
    /// Merged with the other transitions of its batch into one script call.
    Transition {
        key: String,
        from: String,
        to: String,
        ttl_ms: u64,
    },
}

/// A request's failure, before it is named after its operation and key.
struct Failure {
    unavailable: bool,
    message: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("round_trips", &self.round_trips())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// How long a pipeline may wait for its replies before its requests count as unanswered.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

    /// Connects to Redis at `url` (`redis://host:port/db`).
    ///
    /// Fails when the URL is malformed or Redis does not answer; the error
    /// names the URL. Once connected, a dropped connection is re-established
    /// in the background and requests in between fail as unavailable.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let client = redis::Client::open(url).map_err(|err| {
            StoreError::new(
                "connect",
                "",
                false,
                format!(
                    "`{shown}` is not a valid Redis URL (expected redis://host:port/db): {err}"
                ),
            )
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Self::RESPONSE_TIMEOUT))
            .set_response_timeout(Some(Self::RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|err| {
                StoreError::new(
                    "connect",
                    "",
                    true,
                    format!(
                        "cannot reach Redis at {shown}: {err}; start it (for example \
                         `redis-server --port 6379`) or set REDIS_URL"
                    ),
                )
            })?;
        Ok(Self::from_connection(connection))
    }

    /// Wraps an existing connection manager. Must be called within a Tokio
    /// runtime: it starts the writer task.
    pub fn from_connection(connection: ConnectionManager) -> Self {
        let stats = Arc::new(Stats::default());
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(connection, queue, Arc::clone(&stats)));
        Self { requests, stats }
    }

    /// Pipelines sent to Redis so far (each is one round trip), by all clones.
    pub fn round_trips(&self) -> u64 {
        self.stats.round_trips.load(Ordering::Relaxed)
    }

    /// Commands sent to Redis so far, by all clones.
    pub fn commands(&self) -> u64 {
        self.stats.commands.load(Ordering::Relaxed)
    }

    async fn send(&self, operation: &'static str, key: &str, op: Op) -> Result<Value, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || {
            StoreError::new(
                operation,
                key,
                true,
                "the Redis writer task stopped (was the runtime shut down?)",
            )
        };
        self.requests
            .send(Request { op, reply })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?.map_err(|failure| {
            StoreError::new(operation, key, failure.unavailable, failure.message)
        })
    }
}

/// Sends every waiting request as one pipeline: commands as they are,
/// transitions merged into one script call. Up to [`MAX_IN_FLIGHT`]
/// pipelines travel at once on the multiplexed connection, so a request
/// never waits for an unrelated pipeline's replies before it is sent.
async fn write_batches(
    connection: ConnectionManager,
    mut queue: mpsc::UnboundedReceiver<Request>,
    stats: Arc<Stats>,
) {
    let script = Arc::new(Script::new(TRANSITIONS));
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            first = queue.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(first) = first else { break };
                let mut batch = Vec::with_capacity(16);
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
                in_flight.push(send_batch(
                    connection.clone(),
                    batch,
                    Arc::clone(&script),
                    Arc::clone(&stats),
                ));
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.next().await.is_some() {}
}

/// Sends one batch as one pipeline and answers each request.
async fn send_batch(
    mut connection: ConnectionManager,
    batch: Vec<Request>,
    script: Arc<Script>,
    stats: Arc<Stats>,
) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut command_replies = Vec::with_capacity(batch.len());
    let mut transition_replies = Vec::new();
    let mut transitions = redis::cmd("EVALSHA");
    for request in batch {
        match request.op {
            Op::Command(cmd) => {
                pipe.add_command(cmd);
                command_replies.push(request.reply);
            }
            Op::Transition {
                key,
                from,
                to,
                ttl_ms,
            } => {
                // Keys first, then the arguments: collected apart below.
                transition_replies.push((key, from, to, ttl_ms, request.reply));
            }
        }
    }
    if !transition_replies.is_empty() {
        transitions
            .arg(script.get_hash())
            .arg(transition_replies.len());
        for (key, ..) in &transition_replies {
            transitions.arg(key);
        }
        for (_, from, to, ttl_ms, _) in &transition_replies {
            transitions.arg(from).arg(to).arg(*ttl_ms);
        }
        pipe.add_command(transitions.clone());
    }
    stats.round_trips.fetch_add(1, Ordering::Relaxed);
    stats
        .commands
        .fetch_add(pipe.len() as u64, Ordering::Relaxed);
    let replies: Result<Vec<redis::RedisResult<Value>>, RedisError> =
        pipe.query_async(&mut connection).await;
    let mut replies = match replies {
        Ok(replies) if replies.len() == pipe.len() => replies,
        Ok(replies) => {
            let failure = Failure {
                unavailable: true,
                message: format!(
                    "Redis answered {} replies to a pipeline of {} commands",
                    replies.len(),
                    pipe.len()
                ),
            };
            answer_all(command_replies, transition_replies, &failure);
            return;
        }
        Err(err) => {
            answer_all(command_replies, transition_replies, &failure(err));
            return;
        }
    };
    let script_reply = (!transition_replies.is_empty()).then(|| replies.pop());
    for (reply, answer) in command_replies.into_iter().zip(replies) {
        let _ = reply.send(answer.map_err(failure));
    }
    let Some(script_reply) = script_reply.flatten() else {
        return;
    };
    let script_reply = match script_reply {
        Err(err) if err.code() == Some("NOSCRIPT") => {
            // Redis restarted or flushed its scripts: load it and send
            // the transitions again (safe: none of them ran).
            stats.round_trips.fetch_add(1, Ordering::Relaxed);
            let mut retry = redis::pipe();
            retry.cmd("SCRIPT").arg("LOAD").arg(TRANSITIONS).ignore();
            retry.add_command(transitions);
            retry
                .query_async::<(Value,)>(&mut connection)
                .await
                .map(|(value,)| value)
        }
        other => other,
    };
    match script_reply.map_err(failure) {
        Ok(Value::Array(answers)) if answers.len() == transition_replies.len() => {
            for ((.., reply), answer) in transition_replies.into_iter().zip(answers) {
                let answer = match answer {
                    Value::ServerError(err) => Err(failure(RedisError::from(err))),
                    answer => Ok(answer),
                };
                let _ = reply.send(answer);
            }
        }
        Ok(other) => {
            let failure = Failure {
                unavailable: false,
                message: format!("unexpected reply to the transition script: {other:?}"),
            };
            answer_all(Vec::new(), transition_replies, &failure);
        }
        Err(failure) => answer_all(Vec::new(), transition_replies, &failure),
    }
}

type Reply = oneshot::Sender<Result<Value, Failure>>;

fn answer_all(
    commands: Vec<Reply>,
    transitions: Vec<(String, String, String, u64, Reply)>,
    failure: &Failure,
) {
    let replies = commands
        .into_iter()
        .chain(transitions.into_iter().map(|(.., reply)| reply));
    for reply in replies {
        let _ = reply.send(Err(Failure {
            unavailable: failure.unavailable,
            message: failure.message.clone(),
        }));
    }
}

/// Server errors that say "not now" rather than "never": Redis is full
/// (`noeviction`), loading, read-only after a failover, busy with a script...
const TRANSIENT_CODES: &[&str] = &[
    "OOM",
    "READONLY",
    "LOADING",
    "MASTERDOWN",
    "TRYAGAIN",
    "BUSY",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "MISCONF",
];

fn is_unavailable(err: &RedisError) -> bool {
    err.code()
        .is_some_and(|code| TRANSIENT_CODES.contains(&code))
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_io_error()
        || err.is_unrecoverable_error()
}

fn failure(err: RedisError) -> Failure {
    Failure {
        unavailable: is_unavailable(&err),
        message: err.to_string(),
    }
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn parse<T: redis::FromRedisValue>(
    operation: &'static str,
    key: &str,
    value: Value,
) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(|err| {
        StoreError::new(
            operation,
            key,
            false,
            format!("unexpected reply from Redis: {err}"),
        )
    })
}

impl Store for RedisStore {
    async fn insert_or_get(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .arg("GET");
        let reply = self.send("claim", key, Op::Command(cmd)).await?;
        parse("claim", key, reply)
    }

    async fn transition(
        &self,
        key: &str,
        from: &str,
        to: Option<&str>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let op = Op::Transition {
            key: key.to_owned(),
            from: from.to_owned(),
            to: to.unwrap_or("").to_owned(),
            ttl_ms: millis(ttl),
        };
        let reply = self.send("transition", key, op).await?;
        Ok(parse::<i64>("transition", key, reply)? == 1)
    }

    async fn get(&self, key: &str) -> Result<Option<(String, Option<Duration>)>, StoreError> {
        // Two requests queued together travel in the same pipeline.
        let mut get = redis::cmd("GET");
        get.arg(key);
        let mut pttl = redis::cmd("PTTL");
        pttl.arg(key);
        let (value, ttl) = tokio::join!(
            self.send("get", key, Op::Command(get)),
            self.send("get", key, Op::Command(pttl))
        );
        let value: Option<String> = parse("get", key, value?)?;
        let ttl: i64 = parse("get", key, ttl?)?;
        let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
        Ok(value.map(|value| (value, ttl)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let reply = self
            .send("ping", "", Op::Command(redis::cmd("PING")))
            .await?;
        parse::<String>("ping", "", reply).map(drop)
    }
}
