//! The Redis store: one key per message, token-checked scripts, and every
//! request that is waiting sent together as one pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, RedisError, Script, Value};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Expect, Store};
use crate::config::Config;
use crate::error::{StoreError, redact_url};
use crate::tls::{self, Side, TlsFiles};

/// Compare-and-set on each key. For KEYS[i], ARGV holds five values:
/// `from`, `to`, `ttl` (PX), `mode` and `grace`. The key is written (set to
/// `to` with the ttl, or deleted when `to` is empty) when it holds `from`;
/// with mode `a` also when it is absent; with mode `e` only when, besides,
/// its PTTL is at most `grace` (an in-progress record whose lease is over).
/// A key that already holds its target also answers 1, so a retried
/// transition is harmless. Each key is checked and written on its own, and
/// an error on one key (a key of another type, say) is that key's answer
/// alone, naming the command that failed (an ACL user's missing permission
/// is otherwise reported without it); one call carries the transitions of
/// every request that waited together, so the script's overhead is paid
/// once per round trip.
const TRANSITIONS: &str = r"
local function failed(reply, command)
  if type(reply) == 'table' and reply.err then
    return {err = reply.err .. ' (the transition script\'s \'' .. command .. '\' command)'}
  end
  return nil
end
local answers = {}
for i = 1, #KEYS do
  local at = 5 * (i - 1)
  local from, to, ttl, mode, grace = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5]
  local current = redis.pcall('GET', KEYS[i])
  local answer = failed(current, 'get')
  if not answer then
    local matches = current == from
    if matches and mode == 'e' then
      local left = redis.pcall('PTTL', KEYS[i])
      answer = failed(left, 'pttl')
      matches = not answer and left >= 0 and left <= tonumber(grace)
    elseif not matches and mode == 'a' then
      matches = current == false
    end
    if answer then
      -- PTTL failed: that is the answer.
    elseif matches then
      if to == '' then
        answer = failed(redis.pcall('DEL', KEYS[i]), 'del')
      else
        answer = failed(redis.pcall('SET', KEYS[i], to, 'PX', ttl), 'set')
      end
      answer = answer or 1
    elseif to ~= '' and current == to then
      answer = 1
    else
      answer = 0
    end
  end
  answers[i] = answer
end
return answers
";

/// Most requests sent in one pipeline.
const MAX_BATCH: usize = 512;

/// Most pipelines awaiting their replies at once.
const MAX_IN_FLIGHT: usize = 4;

/// A [`Store`] on Redis 7 or newer (it uses `SET ... NX PX GET`).
///
/// All clones share one multiplexed connection and one writer task. A
/// connection that failed (dropped, timed out, refused our credentials) is
/// replaced by a new one on the next request, whatever the error was, so
/// the store recovers by itself once Redis is reachable and the
/// credentials are right again. The writer task: requests issued while a pipeline is in flight are
/// sent together as the next pipeline, so under load the claims of many
/// deliveries and the done marks of earlier ones share a round trip. No
/// timer is involved: a lone request is sent at once. The token-checked
/// transitions of one pipeline run in a single script call (called by SHA,
/// loaded again after a Redis restart); each key is still checked and
/// written on its own. That call names several keys, so this store is for
/// a standalone Redis (or a primary with replicas), not Redis Cluster.
///
/// ```no_run
/// use amqp_idempotency::{Config, store::RedisStore};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// // With TLS and an ACL user: REDIS_URL=rediss://idem:secret@redis.internal:6380,
/// // REDIS_TLS_CA_FILE=/etc/idem/redis-ca.pem
/// let store = RedisStore::connect_with(&Config::from_env()?).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    requests: mpsc::UnboundedSender<Request>,
    stats: Arc<Stats>,
}

/// The one connection all pipelines share, made again after it failed.
///
/// Each connection carries a generation number, so that a pipeline that
/// failed on an old connection does not throw away the new one.
struct Link {
    client: Source,
    config: AsyncConnectionConfig,
    shown: String,
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generations: AtomicU64,
}

/// Where the client of each new connection comes from.
enum Source {
    /// A client given as it is.
    Fixed(redis::Client),
    /// Built from the URL and TLS files for every connection, so that a
    /// renewed client certificate is used from the next reconnect on.
    Config {
        url: String,
        tls: TlsFiles,
        host: String,
    },
}

impl Link {
    fn new(client: Source, shown: String) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RedisStore::RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RedisStore::RESPONSE_TIMEOUT));
        Self {
            client,
            config,
            shown,
            current: Mutex::new(None),
            generations: AtomicU64::new(0),
        }
    }

    /// The current connection, or a new one if there is none.
    async fn get(&self) -> Result<(u64, MultiplexedConnection), Failure> {
        let mut current = self.current.lock().await;
        if let Some((generation, connection)) = &*current {
            return Ok((*generation, connection.clone()));
        }
        let built;
        let (client, tls_files, host) = match &self.client {
            Source::Fixed(client) => (client, None, ""),
            Source::Config { url, tls, host } => {
                built = client_for(url, tls).map_err(|err| Failure {
                    unavailable: true,
                    message: format!("cannot connect to Redis at {}: {err}", self.shown),
                })?;
                (&built, Some(tls), host.as_str())
            }
        };
        let connection = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(|err| {
                let tls_advice = tls_files.and_then(|files| {
                    let err: &(dyn std::error::Error + 'static) = &err;
                    tls::explain(Side::Redis, files, host, err)
                });
                let unreachable = tls_advice.is_none()
                    && remedy(&err).is_none()
                    && (err.is_connection_refusal()
                        || err.is_io_error()
                        || err.is_timeout()
                        || err.is_connection_dropped());
                let mut failure = failure(err);
                if let Some(advice) = tls_advice {
                    failure.message = advice;
                } else if unreachable {
                    failure.message.push_str(
                        "; is it running? Start it (for example `redis-server --port 6379`) \
                         or fix REDIS_URL",
                    );
                } else if !failure.message.contains("REDIS_URL") {
                    failure.message.push_str("; check REDIS_URL");
                }
                failure.message = format!(
                    "cannot connect to Redis at {}: {}",
                    self.shown, failure.message
                );
                failure
            })?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        *current = Some((generation, connection.clone()));
        Ok((generation, connection))
    }

    /// Forgets connection `generation` after it failed; the next request
    /// connects anew.
    async fn discard(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }
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
    Transition(Transition),
}

struct Transition {
    key: String,
    from: String,
    to: String,
    ttl_ms: u64,
    mode: &'static str,
    grace_ms: u64,
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

    /// Connects to Redis at `url` (`redis://host:port/db`, with
    /// `redis://user:password@host:port/db` for an ACL user, `rediss://`
    /// for TLS verified against the platform's trusted roots).
    ///
    /// Fails when the URL is malformed, Redis does not answer or refuses the
    /// credentials; the error names the URL (password hidden) and what to
    /// fix. Once connected, a failed connection is replaced on the next
    /// request, and requests in between fail as unavailable. For a CA file
    /// or a client certificate, use [`connect_with`](Self::connect_with).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(&Config::default().redis_url(url)).await
    }

    /// Connects to Redis as `config` says: its URL ([`Config::redis`]) and,
    /// for `rediss://`, its TLS files ([`Config::redis_tls`]:
    /// `REDIS_TLS_CA_FILE`, `REDIS_TLS_CERT_FILE`, `REDIS_TLS_KEY_FILE`).
    ///
    /// Fails like [`connect`](Self::connect), and also when a TLS file is
    /// unreadable or the server's certificate is not trusted or not valid
    /// for its host name; the error names the URL (password hidden) and the
    /// variable to set. The files are read again for each new connection.
    pub async fn connect_with(config: &Config) -> Result<Self, StoreError> {
        let url = config.redis();
        let shown = redact_url(url);
        let source = match client_for(url, config.redis_tls()) {
            Ok(_) if Side::Redis.is_tls_url(url) => Source::Config {
                url: url.to_owned(),
                tls: config.redis_tls().clone(),
                host: host_of(url),
            },
            Ok(client) => Source::Fixed(client),
            Err(err) => return Err(StoreError::new("connect", "", false, err)),
        };
        let link = Link::new(source, shown.clone());
        link.get()
            .await
            .map_err(|failure| StoreError::new("connect", "", true, failure.message))?;
        Ok(Self::start(link))
    }

    /// A store on `client` that connects on its first request. Must be
    /// called within a Tokio runtime: it starts the writer task.
    pub fn from_client(client: redis::Client) -> Self {
        let shown = format!("redis at {}", client.get_connection_info().addr());
        Self::start(Link::new(Source::Fixed(client), shown))
    }

    fn start(link: Link) -> Self {
        let stats = Arc::new(Stats::default());
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(Arc::new(link), queue, Arc::clone(&stats)));
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
    link: Arc<Link>,
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
                    Arc::clone(&link),
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
async fn send_batch(link: Arc<Link>, batch: Vec<Request>, script: Arc<Script>, stats: Arc<Stats>) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut command_replies = Vec::with_capacity(batch.len());
    let mut transition_replies = Vec::new();
    for request in batch {
        match request.op {
            Op::Command(cmd) => {
                pipe.add_command(cmd);
                command_replies.push(request.reply);
            }
            Op::Transition(transition) => transition_replies.push((transition, request.reply)),
        }
    }
    let mut transitions = redis::cmd("EVALSHA");
    if !transition_replies.is_empty() {
        transitions
            .arg(script.get_hash())
            .arg(transition_replies.len());
        for (t, _) in &transition_replies {
            transitions.arg(&t.key);
        }
        for (t, _) in &transition_replies {
            transitions
                .arg(&t.from)
                .arg(&t.to)
                .arg(t.ttl_ms)
                .arg(t.mode)
                .arg(t.grace_ms);
        }
        pipe.add_command(transitions.clone());
    }
    let (generation, mut connection) = match link.get().await {
        Ok(connection) => connection,
        Err(failure) => {
            answer_all(command_replies, transition_replies, &failure);
            return;
        }
    };
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
            link.discard(generation).await;
            answer_all(command_replies, transition_replies, &failure);
            return;
        }
        Err(err) => {
            if breaks_connection(&err) {
                link.discard(generation).await;
            }
            answer_all(command_replies, transition_replies, &failure(err));
            return;
        }
    };
    if replies
        .iter()
        .any(|reply| reply.as_ref().is_err_and(breaks_connection))
    {
        // NOAUTH and the like: this connection is no longer usable as it is.
        link.discard(generation).await;
    }
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
            for ((_, reply), answer) in transition_replies.into_iter().zip(answers) {
                let answer = match answer {
                    Value::ServerError(err) => Err(failure(RedisError::from(err))),
                    answer => Ok(answer),
                };
                let _ = reply.send(answer);
            }
        }
        Ok(other) => {
            let failure = Failure {
                unavailable: true,
                message: format!(
                    "unexpected reply to the transition script: {other:?}; is REDIS_URL a Redis 7 (or newer) server?"
                ),
            };
            answer_all(Vec::new(), transition_replies, &failure);
        }
        Err(failure) => answer_all(Vec::new(), transition_replies, &failure),
    }
}

type Reply = oneshot::Sender<Result<Value, Failure>>;

fn answer_all(commands: Vec<Reply>, transitions: Vec<(Transition, Reply)>, failure: &Failure) {
    let replies = commands
        .into_iter()
        .chain(transitions.into_iter().map(|(_, reply)| reply));
    for reply in replies {
        let _ = reply.send(Err(Failure {
            unavailable: failure.unavailable,
            message: failure.message.clone(),
        }));
    }
}

/// True for the errors that are about one key and nothing else: only those
/// may dead-letter a message. Everything else (an outage, refused
/// credentials, a missing permission, a full, read-only or loading server,
/// a cluster redirect, an old server) is systemic: consumption pauses until
/// a write succeeds.
fn is_about_the_key(err: &RedisError) -> bool {
    err.code() == Some("WRONGTYPE")
}

/// True when the connection that produced `err` cannot be used any more:
/// it broke, or the server no longer accepts it as authenticated.
fn breaks_connection(err: &RedisError) -> bool {
    err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_io_error()
        || err.is_unrecoverable_error()
        || err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// What an operator should do about a systemic error, if we can tell.
fn remedy(err: &RedisError) -> Option<&'static str> {
    let text = err.to_string();
    let code = err.code().unwrap_or("");
    let remedy = if err.kind() == ErrorKind::AuthenticationFailed
        || matches!(code, "NOAUTH" | "WRONGPASS")
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
    {
        "Redis refused the credentials: put the right user and password in REDIS_URL \
         (redis://user:password@host:port)"
    } else if code == "NOPERM"
        || text.contains("NOPERM")
        || text.contains("The user executing the script can't")
    {
        "the Redis ACL user lacks a permission: grant the commands and key pattern listed \
         in the README (Least privilege)"
    } else if matches!(code, "MOVED" | "ASK" | "CLUSTERDOWN" | "CROSSSLOT") {
        "REDIS_URL points at a Redis Cluster node, which this standalone client cannot use: \
         give it a standalone Redis (or primary) instead"
    } else if code == "OOM" {
        "Redis is out of memory (maxmemory with noeviction): raise maxmemory or lower \
         IDEMPOTENCY_DONE_TTL; consumption resumes once a write succeeds"
    } else if code == "READONLY" {
        "Redis is a read-only replica (after a failover?): point REDIS_URL at the primary"
    } else if code == "MISCONF" {
        "Redis refuses writes because it cannot persist (stop-writes-on-bgsave-error): \
         fix its disk or persistence settings"
    } else if code == "NOREPLICAS" {
        "Redis has fewer replicas than min-replicas-to-write: bring the replicas back"
    } else if code == "LOADING" {
        "Redis is loading its dataset: consumption resumes when it is done"
    } else if code == "BUSY" {
        "Redis is busy running a slow script: wait, or SCRIPT KILL it"
    } else if code == "ERR" && (text.contains("syntax error") || text.contains("unknown command")) {
        "the server does not support `SET key value NX PX ms GET`: amqp-idempotency needs \
         Redis 7.0 or newer (or Valkey)"
    } else {
        return None;
    };
    Some(remedy)
}

fn failure(err: RedisError) -> Failure {
    let message = match remedy(&err) {
        Some(remedy) => format!("{err} ({remedy})"),
        None => err.to_string(),
    };
    Failure {
        unavailable: !is_about_the_key(&err),
        message,
    }
}

/// A client for `config`'s Redis URL, with TLS for `rediss://` as
/// [`Config::redis_tls`] says: for code of your own that talks to the same
/// Redis (the operator CLI, a maintenance job).
///
/// ```no_run
/// use amqp_idempotency::{Config, store::redis_client};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis_client(&Config::from_env()?)?;
/// let mut connection = client.get_connection()?;
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// A malformed URL, TLS files with a `redis://` URL, or an unreadable or
/// malformed TLS file; the message names the URL (password hidden) or the
/// variable and path.
pub fn redis_client(config: &Config) -> Result<redis::Client, StoreError> {
    client_for(config.redis(), config.redis_tls())
        .map_err(|message| StoreError::new("connect", "", false, message))
}

/// The client for `url` with `files`, or a message saying what is wrong.
fn client_for(url: &str, files: &TlsFiles) -> Result<redis::Client, String> {
    let shown = redact_url(url);
    let invalid = |err: RedisError| {
        format!(
            "`{shown}` is not a valid Redis URL ({err}); expected redis://[user:password@]host:port/db, \
             or rediss://... for TLS; set REDIS_URL"
        )
    };
    if !Side::Redis.is_tls_url(url) {
        if let Some((var, path)) = files.first_set(Side::Redis) {
            return Err(format!(
                "{var}={} is set but REDIS_URL `{shown}` has no TLS: use rediss:// (or unset {var})",
                path.display()
            ));
        }
        return redis::Client::open(url).map_err(invalid);
    }
    tls::ensure_process_provider();
    if files.is_empty() {
        return redis::Client::open(url).map_err(invalid);
    }
    let material = files.load(Side::Redis).map_err(|err| err.to_string())?;
    let certificates = redis::TlsCertificates {
        client_tls: material.identity.map(|identity| redis::ClientTlsConfig {
            client_cert: identity.cert_pem,
            client_key: identity.key_pem,
        }),
        root_cert: material.ca_pem,
    };
    redis::Client::build_with_tls(url, certificates).map_err(invalid)
}

/// The host of `url`, for error messages about its certificate.
fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_owned))
        .unwrap_or_default()
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
            true,
            format!(
                "unexpected reply from Redis: {err}; is REDIS_URL a Redis 7 (or newer) server?"
            ),
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
        from: Expect<'_>,
        to: Option<&str>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (mode, grace_ms) = match from {
            Expect::Value(_) => ("", 0),
            Expect::ValueOrAbsent(_) => ("a", 0),
            Expect::Expired { grace, .. } => ("e", millis(grace)),
        };
        let op = Op::Transition(Transition {
            key: key.to_owned(),
            from: from.value().to_owned(),
            to: to.unwrap_or("").to_owned(),
            ttl_ms: millis(ttl),
            mode,
            grace_ms,
        });
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

    async fn probe(&self, key: &str) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg("probe").arg("PX").arg(10_000);
        let reply = self.send("probe", key, Op::Command(cmd)).await?;
        parse::<String>("probe", key, reply).map(drop)
    }
}
