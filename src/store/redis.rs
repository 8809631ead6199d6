//! The Redis store: one key per message, token-checked scripts, and every
//! request that is waiting sent together as one pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, RedisError, Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::Store;
use crate::error::StoreError;

/// Compare-and-set: if KEYS[1] holds ARGV[1], set it to ARGV[2] with a
/// PX of ARGV[3] (or delete it when ARGV[2] is empty). A key that already
/// holds ARGV[2] also answers 1, so a retried transition is harmless.
const TRANSITION: &str = r"
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  if ARGV[2] == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
  return 1
end
if ARGV[2] ~= '' and current == ARGV[2] then
  return 1
end
return 0
";

/// Most requests sent in one pipeline.
const MAX_BATCH: usize = 512;

/// A [`Store`] on Redis 7 or newer (it uses `SET ... NX PX GET`).
///
/// All clones share one multiplexed connection that reconnects by itself,
/// and one writer task: requests issued while a pipeline is in flight are
/// sent together as the next pipeline, so under load the claims of many
/// deliveries and the done marks of earlier ones share a round trip. No
/// timer is involved: a lone request is sent at once. Scripts are loaded
/// once and called by SHA.
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
    transition_sha: Arc<str>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    round_trips: AtomicU64,
    commands: AtomicU64,
}

struct Request {
    cmd: Cmd,
    reply: oneshot::Sender<Result<Value, Failure>>,
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
        let shown = redact(url);
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
        let script = Script::new(TRANSITION);
        let transition_sha: Arc<str> = Arc::from(script.get_hash());
        let stats = Arc::new(Stats::default());
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(connection, queue, Arc::clone(&stats)));
        Self {
            requests,
            transition_sha,
            stats,
        }
    }

    /// Pipelines sent to Redis so far (each is one round trip), by all clones.
    pub fn round_trips(&self) -> u64 {
        self.stats.round_trips.load(Ordering::Relaxed)
    }

    /// Commands sent to Redis so far, by all clones.
    pub fn commands(&self) -> u64 {
        self.stats.commands.load(Ordering::Relaxed)
    }

    async fn send(
        &self,
        operation: &'static str,
        key: &str,
        cmd: Cmd,
    ) -> Result<Value, StoreError> {
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
            .send(Request { cmd, reply })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?.map_err(|failure| {
            StoreError::new(operation, key, failure.unavailable, failure.message)
        })
    }
}

/// Sends every waiting request as one pipeline, one pipeline at a time.
async fn write_batches(
    mut connection: ConnectionManager,
    mut queue: mpsc::UnboundedReceiver<Request>,
    stats: Arc<Stats>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for request in &mut batch {
            // Moved, not cloned: after a NOSCRIPT the pipeline's copy is resent.
            pipe.add_command(std::mem::replace(&mut request.cmd, Cmd::new()));
        }
        stats.round_trips.fetch_add(1, Ordering::Relaxed);
        stats
            .commands
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let replies: Result<Vec<redis::RedisResult<Value>>, RedisError> =
            pipe.query_async(&mut connection).await;
        match replies {
            Ok(replies) if replies.len() == batch.len() => {
                let mut missing_script = Vec::new();
                for ((request, reply), sent) in batch.drain(..).zip(replies).zip(pipe.cmd_iter()) {
                    match reply {
                        Err(err) if err.code() == Some("NOSCRIPT") => {
                            missing_script.push(Request {
                                cmd: sent.clone(),
                                reply: request.reply,
                            });
                        }
                        reply => {
                            let _ = request.reply.send(reply.map_err(failure));
                        }
                    }
                }
                if !missing_script.is_empty() {
                    // Redis restarted or flushed its scripts: load it, then
                    // send those requests again (safe: nothing ran).
                    retry_after_loading(&mut connection, missing_script, &stats).await;
                }
            }
            Ok(replies) => {
                let message = format!(
                    "Redis answered {} replies to a pipeline of {} commands",
                    replies.len(),
                    batch.len()
                );
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(Failure {
                        unavailable: true,
                        message: message.clone(),
                    }));
                }
            }
            Err(err) => {
                let unavailable = is_unavailable(&err);
                let message = err.to_string();
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(Failure {
                        unavailable,
                        message: message.clone(),
                    }));
                }
            }
        }
    }
}

async fn retry_after_loading(
    connection: &mut ConnectionManager,
    requests: Vec<Request>,
    stats: &Stats,
) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe.cmd("SCRIPT").arg("LOAD").arg(TRANSITION);
    for request in &requests {
        pipe.add_command(request.cmd.clone());
    }
    stats.round_trips.fetch_add(1, Ordering::Relaxed);
    let replies: Result<Vec<redis::RedisResult<Value>>, RedisError> =
        pipe.query_async(connection).await;
    match replies {
        Ok(mut replies) if replies.len() == requests.len() + 1 => {
            let _script_loaded = replies.remove(0);
            for (request, reply) in requests.into_iter().zip(replies) {
                let _ = request.reply.send(reply.map_err(failure));
            }
        }
        Ok(_) | Err(_) => {
            for request in requests {
                let _ = request.reply.send(Err(Failure {
                    unavailable: true,
                    message: "could not load the transition script into Redis".into(),
                }));
            }
        }
    }
}

/// The URL with its password replaced by `***`, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

fn is_unavailable(err: &RedisError) -> bool {
    err.is_timeout()
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
        let reply = self.send("claim", key, cmd).await?;
        parse("claim", key, reply)
    }

    async fn transition(
        &self,
        key: &str,
        from: &str,
        to: Option<&str>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&*self.transition_sha)
            .arg(1)
            .arg(key)
            .arg(from)
            .arg(to.unwrap_or(""))
            .arg(millis(ttl));
        let reply = self.send("transition", key, cmd).await?;
        Ok(parse::<i64>("transition", key, reply)? == 1)
    }

    async fn get(&self, key: &str) -> Result<Option<(String, Option<Duration>)>, StoreError> {
        // Two requests queued together travel in the same pipeline.
        let mut get = redis::cmd("GET");
        get.arg(key);
        let mut pttl = redis::cmd("PTTL");
        pttl.arg(key);
        let (value, ttl) = tokio::join!(self.send("get", key, get), self.send("get", key, pttl));
        let value: Option<String> = parse("get", key, value?)?;
        let ttl: i64 = parse("get", key, ttl?)?;
        let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
        Ok(value.map(|value| (value, ttl)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let reply = self.send("ping", "", redis::cmd("PING")).await?;
        parse::<String>("ping", "", reply).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_hidden_in_messages() {
        assert_eq!(
            redact("redis://:s3cret@db:6379/0"),
            "redis://:***@db:6379/0"
        );
        assert_eq!(redact("redis://app:s3cret@db"), "redis://app:***@db");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
