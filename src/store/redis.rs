//! The Redis store: one key per message, compare-and-set on that key alone
//! (natively with `SET ... IFEQ` where the server has it, by a token-checked
//! script elsewhere), and every request that is waiting sent together as
//! one pipeline: to the server, or on Redis Cluster one pipeline to each
//! master, with redis-rs's cluster client following redirections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, RedisError, Script, Value};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Expect, OutboxEntry, Store};
use crate::batch::send_in_batches;
use crate::config::{Config, RedisDeployment, SentinelUrl, is_sentinel_url};
use crate::error::{StoreError, redact_url};
use crate::tls::{self, Side, TlsFiles};

/// Compare-and-set on one key. ARGV: `from`, `to`, `ttl` (PX), `mode` and
/// `grace`. The key is written (set to `to` with the ttl, or deleted when
/// `to` is empty) when it holds `from`; with mode `a` also when it is
/// absent; with mode `e` only when, besides, its PTTL is at most `grace`
/// (an in-progress record whose lease is over). A key that already holds
/// its target also answers 1, so a retried transition is harmless. An
/// error names the command that failed (an ACL user's missing permission
/// is otherwise reported without it).
const TRANSITION: &str = r"
local function failed(reply, command)
  if type(reply) == 'table' and reply.err then
    return {err = reply.err .. ' (the transition script\'s \'' .. command .. '\' command)'}
  end
  return nil
end
local from, to, ttl, mode, grace = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local current = redis.pcall('GET', KEYS[1])
local answer = failed(current, 'get')
if answer then return answer end
local matches = current == from
if matches and mode == 'e' then
  local left = redis.pcall('PTTL', KEYS[1])
  answer = failed(left, 'pttl')
  if answer then return answer end
  matches = left >= 0 and left <= tonumber(grace)
elseif not matches and mode == 'a' then
  matches = current == false
end
if matches then
  if to == '' then
    answer = failed(redis.pcall('DEL', KEYS[1]), 'del')
  else
    answer = failed(redis.pcall('SET', KEYS[1], to, 'PX', ttl), 'set')
  end
  return answer or 1
elseif to ~= '' and current == to then
  -- Already done (a retried transition): write it again, so that a WAIT
  -- on this connection waits until the replicas hold it too.
  return failed(redis.pcall('SET', KEYS[1], to, 'KEEPTTL'), 'set') or 1
end
return 0
";

/// The outbox commit: KEYS[1] the record, KEYS[2] its outbox hash; ARGV
/// from, to, ttl, mode (as [`TRANSITION`]), then the outbox's field/value
/// pairs. Where the record holds `from` (or, with mode `a`, is absent) the
/// outbox is replaced and the done mark written last, so that a refused
/// write leaves no mark without its outbox. A record that already holds
/// `to` (a retried commit) is written again and its outbox left alone:
/// dispatch may have begun.
const COMMIT: &str = r"
local function failed(reply, command)
  if type(reply) == 'table' and reply.err then
    return {err = reply.err .. ' (the outbox commit script\'s \'' .. command .. '\' command)'}
  end
  return nil
end
local from, to, ttl, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local current = redis.pcall('GET', KEYS[1])
local answer = failed(current, 'get')
if answer then return answer end
if current == to then
  return failed(redis.pcall('SET', KEYS[1], to, 'KEEPTTL'), 'set') or 1
end
if current ~= from and not (mode == 'a' and current == false) then
  return 0
end
answer = failed(redis.pcall('DEL', KEYS[2]), 'del')
if answer then return answer end
if #ARGV > 4 then
  for first = 5, #ARGV, 256 do
    answer = failed(redis.pcall('HSET', KEYS[2], unpack(ARGV, first, math.min(first + 255, #ARGV))), 'hset')
    if answer then return answer end
  end
  answer = failed(redis.pcall('PEXPIRE', KEYS[2], ttl), 'pexpire')
  if answer then return answer end
end
return failed(redis.pcall('SET', KEYS[1], to, 'PX', ttl), 'set') or 1
";

/// The scripts loaded again when a server answers `NOSCRIPT`.
const LUA_SCRIPTS: [&str; 2] = [TRANSITION, COMMIT];

/// Most requests sent in one pipeline.
const MAX_BATCH: usize = 512;

/// Most pipelines awaiting their replies at once.
const MAX_IN_FLIGHT: usize = 4;

/// A [`Store`] on Redis 7 or newer, Valkey, or Redis Cluster.
///
/// **Standalone** ([`connect`](Self::connect), `REDIS_URL`): all clones
/// share one multiplexed connection and one writer task. A connection that
/// failed (dropped, timed out, refused our credentials) is replaced by a
/// new one on the next request, whatever the error was, so the store
/// recovers by itself once Redis is reachable and the credentials are
/// right again. The writer task: requests issued while a pipeline is in
/// flight are sent together as the next pipeline, so under load the claims
/// of many deliveries and the done marks of earlier ones share a round
/// trip. No timer is involved: a lone request is sent at once.
///
/// **Cluster** ([`connect`](Self::connect) with `REDIS_CLUSTER_NODES`,
/// or [`connect_cluster`](Self::connect_cluster)): the requests that wait together travel as one
/// pipeline per master, found from the `CLUSTER SLOTS` map. A request
/// redirected meanwhile (MOVED, ASK: a resharded slot, a failed-over
/// master) is sent again alone through redis-rs's cluster client, which
/// follows the redirection, and the map is learnt again. A request that
/// fails during a reshard or failover counts as unanswered and is retried
/// like any other.
///
/// Every request touches one key. The transitions after a claim compare
/// the whole stored value first: natively (`SET key new IFEQ old`) on
/// Valkey 8.1 or newer and Redis 8.4 or newer, detected from `HELLO` on
/// each new connection, or from the first transition's answer where
/// `HELLO` is not granted ([`native_compare_and_set`](Self::native_compare_and_set)),
/// and by a token-checked script (called by SHA, loaded again after a
/// restart) elsewhere, or always with [`scripts_only`](Self::scripts_only).
///
/// ```no_run
/// use amqp_idempotency::{Config, store::RedisStore};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // REDIS_URL; with TLS and an ACL user: REDIS_URL=rediss://idem:secret@redis.internal:6380,
/// // REDIS_TLS_CA_FILE=/etc/idem/redis-ca.pem; or a cluster:
/// // REDIS_CLUSTER_NODES=redis://10.0.0.1:7000,redis://10.0.0.2:7000
/// let store = RedisStore::connect(&Config::from_env()?).await?;
/// // One URL, every other setting left out:
/// let local = RedisStore::connect_url("redis://127.0.0.1:6379").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    /// The writer task: it sends what waits in pipelines (on a cluster,
    /// one pipeline per master).
    requests: mpsc::UnboundedSender<Request>,
    /// The writer groups requests by their keys' cluster slots.
    cluster: bool,
    stats: Arc<Stats>,
    cas: Arc<Cas>,
}

/// Whether transitions use `SET ... IFEQ`.
struct Cas {
    /// What the server offers: [`UNKNOWN`] until `HELLO` answered (a user
    /// without `+hello` never learns it: the first transition tries IFEQ
    /// and falls back on a syntax error), then [`NATIVE`] or [`SCRIPTS`].
    server: AtomicU8,
    /// The user did not ask for scripts only.
    allowed: AtomicBool,
}

const UNKNOWN: u8 = 0;
const NATIVE: u8 = 1;
const SCRIPTS: u8 = 2;

impl Cas {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            server: AtomicU8::new(UNKNOWN),
            allowed: AtomicBool::new(true),
        })
    }

    /// True when the next transition should try `SET ... IFEQ`.
    fn try_native(&self) -> bool {
        self.server.load(Ordering::Relaxed) != SCRIPTS && self.allowed.load(Ordering::Relaxed)
    }

    /// Records what `HELLO` said about the server (`None`: it refused).
    fn detect(&self, hello: Option<&Value>) {
        let Some(hello) = hello else {
            self.server.store(UNKNOWN, Ordering::Relaxed);
            return;
        };
        let native = server_of(hello).is_some_and(|(name, version)| {
            let mut parts = version
                .split('.')
                .map(|part| part.parse::<u32>().unwrap_or(0));
            let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            match name.as_str() {
                "valkey" => (major, minor) >= (8, 1),
                "redis" => (major, minor) >= (8, 4),
                _ => false,
            }
        });
        let server = if native { NATIVE } else { SCRIPTS };
        self.server.store(server, Ordering::Relaxed);
    }
}

/// `server` and `version` from a `HELLO` reply (a map, or a flat array of
/// names and values in RESP2).
fn server_of(hello: &Value) -> Option<(String, String)> {
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    };
    let pairs: Vec<(&Value, &Value)> = match hello {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((k, v)),
                _ => None,
            })
            .collect(),
        _ => return None,
    };
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .and_then(|(_, v)| text(v))
    };
    Some((field("server")?.to_ascii_lowercase(), field("version")?))
}

/// The one connection all pipelines share, made again after it failed.
///
/// Each connection carries a generation number, so that a pipeline that
/// failed on an old connection does not throw away the new one.
struct Link {
    client: Source,
    replication: Replication,
    config: AsyncConnectionConfig,
    shown: String,
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generations: AtomicU64,
    cas: Arc<Cas>,
}

/// The cluster client's connection, made again after it failed.
struct ClusterLink {
    client: redis::cluster::ClusterClient,
    replication: Replication,
    /// Which master serves which slots (`CLUSTER SLOTS`), learnt again
    /// after a redirection or a failed pipeline.
    slots: std::sync::Mutex<Option<Arc<SlotMap>>>,
    /// The first seed URL: the scheme and credentials for every node.
    seed: String,
    tls: TlsFiles,
    /// A plain connection to each master the pipelines go to: a redirect
    /// comes back as an answer there, never followed behind our back.
    direct: Mutex<std::collections::HashMap<(String, u16), MultiplexedConnection>>,
    shown: String,
    current: Mutex<Option<ClusterConnection>>,
    cas: Arc<Cas>,
}

impl ClusterLink {
    async fn get(&self) -> Result<ClusterConnection, Failure> {
        let mut current = self.current.lock().await;
        if let Some(connection) = &*current {
            return Ok(connection.clone());
        }
        let connecting = async {
            let mut connection = self.client.get_async_connection().await?;
            let hello = redis::cmd("HELLO")
                .query_async::<Value>(&mut connection)
                .await
                .ok();
            Ok::<_, RedisError>((connection, hello))
        };
        let (connection, hello) =
            match tokio::time::timeout(2 * RedisStore::RESPONSE_TIMEOUT, connecting).await {
                Ok(Ok(connected)) => connected,
                Ok(Err(err)) => {
                    let mut failure = failure(err);
                    failure.message = format!(
                        "cannot connect to the Redis Cluster at {}: {}; are the nodes up and \
                         the cluster created (CLUSTER INFO says cluster_state:ok)? Check \
                         REDIS_CLUSTER_NODES",
                        self.shown, failure.message
                    );
                    return Err(failure);
                }
                Err(_) => {
                    return Err(Failure::unavailable(format!(
                        "cannot connect to the Redis Cluster at {}: no answer within {:?}; \
                         are the nodes up? Check REDIS_CLUSTER_NODES",
                        self.shown,
                        2 * RedisStore::RESPONSE_TIMEOUT
                    )));
                }
            };
        self.cas.detect(hello.as_ref());
        *current = Some(connection.clone());
        Ok(connection)
    }

    async fn discard(&self) {
        *self.current.lock().await = None;
    }

    async fn query(&self, cmd: &Cmd, write: bool) -> Result<Value, Failure> {
        let mut connection = self.get().await?;
        let wait = self.replication.wait().filter(|_| write);
        let sent = tokio::time::timeout(
            2 * RedisStore::RESPONSE_TIMEOUT + self.replication.timeout,
            async {
                let Some(wait) = wait else {
                    return cmd.query_async::<Value>(&mut connection).await.map(Ok);
                };
                // WAIT goes to the node of the write, as the pipeline's route.
                let mut pipe = redis::pipe();
                pipe.ignore_errors()
                    .add_command(cmd.clone())
                    .add_command(wait);
                let mut replies: Vec<redis::RedisResult<Value>> =
                    pipe.query_async(&mut connection).await?;
                let waited = replies.pop().unwrap_or(Ok(Value::Nil));
                let reply = replies.pop().unwrap_or(Ok(Value::Nil))?;
                Ok(match self.replication.shortfall(&waited) {
                    Some(failure) => Err(failure),
                    None => Ok(reply),
                })
            },
        )
        .await;
        match sent {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(failure))) => Err(failure),
            Ok(Err(err)) => {
                if breaks_connection(&err) && !err.is_timeout() {
                    self.discard().await;
                }
                Err(failure(err))
            }
            Err(_) => Err(Failure::unavailable(format!(
                "the Redis Cluster at {} did not answer within {:?}",
                self.shown,
                2 * RedisStore::RESPONSE_TIMEOUT
            ))),
        }
    }
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
    /// The master that Redis Sentinel names, asked again for every
    /// connection, so that a failover is followed.
    Sentinel(SentinelUrl),
}

impl SentinelUrl {
    /// `SENTINEL get-master-addr-by-name <master>`.
    fn question(&self) -> Cmd {
        let mut question = redis::cmd("SENTINEL");
        question.arg("get-master-addr-by-name").arg(&self.master);
        question
    }

    /// The master's URL from one sentinel's `reply`, or a problem naming
    /// that sentinel.
    fn answer(
        &self,
        sentinel: &str,
        reply: Result<Option<(String, u16)>, String>,
    ) -> Result<String, String> {
        match reply {
            Ok(Some((host, port))) => Ok(self.master_url(&host, port)),
            Ok(None) => Err(format!(
                "{}: it monitors no master named `{}`",
                redact_url(sentinel),
                self.master
            )),
            Err(problem) => Err(format!("{}: {problem}", redact_url(sentinel))),
        }
    }

    /// What to say when no sentinel named the master.
    fn unanswered(&self, problems: &[String]) -> String {
        format!(
            "no sentinel named the master `{}` ({}); are the sentinels up, and is the name \
             after `#` in REDIS_URL the one in their `sentinel monitor` line?",
            self.master,
            problems.join("; ")
        )
    }

    /// Asks each sentinel in turn where the master is; the first answer wins.
    async fn master(&self, config: &AsyncConnectionConfig) -> Result<String, String> {
        let mut problems = Vec::new();
        for sentinel in &self.sentinels {
            let reply = async {
                let client = client_for(sentinel, &self.tls_files)?;
                let mut connection = client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
                    .map_err(|err| err.to_string())?;
                self.question()
                    .query_async(&mut connection)
                    .await
                    .map_err(|err| err.to_string())
            };
            match self.answer(sentinel, reply.await) {
                Ok(url) => return Ok(url),
                Err(problem) => problems.push(problem),
            }
        }
        Err(self.unanswered(&problems))
    }
}

impl Link {
    fn new(client: Source, shown: String, cas: Arc<Cas>, replication: Replication) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RedisStore::RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RedisStore::RESPONSE_TIMEOUT + replication.timeout));
        Self {
            client,
            replication,
            config,
            shown,
            current: Mutex::new(None),
            generations: AtomicU64::new(0),
            cas,
        }
    }

    /// The current connection, or a new one if there is none.
    async fn get(&self) -> Result<(u64, MultiplexedConnection), Failure> {
        let mut current = self.current.lock().await;
        if let Some((generation, connection)) = &*current {
            return Ok((*generation, connection.clone()));
        }
        let built;
        let sentinel_master;
        let (client, tls_files, host) = match &self.client {
            Source::Fixed(client) => (client, None, ""),
            Source::Sentinel(sentinel) => {
                let url = sentinel.master(&self.config).await.map_err(|err| {
                    Failure::unavailable(format!(
                        "cannot connect to Redis at {}: {err}",
                        self.shown
                    ))
                })?;
                built = client_for(&url, &sentinel.tls_files).map_err(|err| {
                    Failure::unavailable(format!(
                        "cannot connect to Redis at {}: {err}",
                        self.shown
                    ))
                })?;
                sentinel_master = host_of(&url);
                (&built, Some(&sentinel.tls_files), sentinel_master.as_str())
            }
            Source::Config { url, tls, host } => {
                built = client_for(url, tls).map_err(|err| {
                    Failure::unavailable(format!(
                        "cannot connect to Redis at {}: {err}",
                        self.shown
                    ))
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
        let mut probe = connection.clone();
        if matches!(self.client, Source::Sentinel(_)) {
            // Right after a failover a sentinel may still name the old
            // master, now a replica: writing there would fail, so look again.
            let role: Vec<Value> = redis::cmd("ROLE")
                .query_async(&mut probe)
                .await
                .map_err(failure)?;
            if !matches!(role.first(), Some(Value::BulkString(role)) if role == b"master") {
                return Err(Failure::unavailable(format!(
                    "the server the sentinels named for {} is not a master (a failover is under \
                     way); trying again",
                    self.shown
                )));
            }
        }
        // Which compare-and-set this server offers: a server that does not
        // know HELLO (or refuses it) gets the scripts.
        let hello = redis::cmd("HELLO")
            .query_async::<Value>(&mut probe)
            .await
            .ok();
        self.cas.detect(hello.as_ref());
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
    cmd: Cmd,
    /// The cluster slot of its key (unused on a standalone server).
    slot: u16,
    /// A write, which `WAIT` must see replicated (when asked to).
    write: bool,
    reply: oneshot::Sender<Result<Value, Failure>>,
}

/// How many replicas must acknowledge each write (`WAIT`), and for how long
/// to wait for them.
#[derive(Clone, Copy, Debug, Default)]
struct Replication {
    replicas: u32,
    timeout: Duration,
}

impl Replication {
    fn of(config: &Config) -> Self {
        let (replicas, timeout) = config.replication();
        Self { replicas, timeout }
    }

    /// `WAIT replicas timeout`, or nothing when no replica is asked for.
    fn wait(&self) -> Option<Cmd> {
        (self.replicas > 0).then(|| {
            let mut wait = redis::cmd("WAIT");
            wait.arg(self.replicas).arg(millis(self.timeout));
            wait
        })
    }

    /// The answer of a write that `WAIT` answered with `reply`: `None` when
    /// enough replicas have it.
    fn shortfall(&self, reply: &redis::RedisResult<Value>) -> Option<Failure> {
        let confirmed = match reply {
            Ok(Value::Int(n)) => *n,
            Ok(_) | Err(_) => -1,
        };
        if confirmed >= i64::from(self.replicas) {
            return None;
        }
        crate::metrics::unreplicated();
        let found = match reply {
            Err(err) => format!("WAIT failed: {err}"),
            _ => format!("{} confirmed", confirmed.max(0)),
        };
        tracing::warn!(
            replicas = self.replicas,
            confirmed,
            "a write was not confirmed by enough replicas; it is retried and its message held"
        );
        Some(Failure::unavailable(format!(
            "the write reached fewer replicas than IDEMPOTENCY_MIN_REPLICAS={} within \
             IDEMPOTENCY_REPLICA_TIMEOUT ({:?}; {found}): a failover could lose it, so the \
             message is held and the write retried until they confirm; bring the replicas back \
             or lower IDEMPOTENCY_MIN_REPLICAS",
            self.replicas, self.timeout
        )))
    }
}

/// A request's failure, before it is named after its operation and key.
#[derive(Clone)]
struct Failure {
    unavailable: bool,
    /// The server did not understand the command (`ERR syntax error`).
    syntax: bool,
    /// The server does not know the script (`NOSCRIPT`).
    noscript: bool,
    message: String,
}

impl Failure {
    fn unavailable(message: String) -> Self {
        Self {
            unavailable: true,
            syntax: false,
            noscript: false,
            message,
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "deployment",
                &if self.cluster {
                    "cluster"
                } else {
                    "standalone"
                },
            )
            .field("native_compare_and_set", &self.native_compare_and_set())
            .field("round_trips", &self.round_trips())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// How long a pipeline may wait for its replies before its requests count as unanswered.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

    /// Connects to the Redis that `config` names, with all of its Redis
    /// settings: a Redis Cluster when it has seed nodes
    /// ([`Config::redis_cluster`], `REDIS_CLUSTER_NODES`), else its URL
    /// ([`Config::redis_url`], `REDIS_URL`: a standalone server, or the
    /// master Sentinel names for `redis-sentinel://`); for `rediss://`, its
    /// TLS files ([`Config::redis_tls`]: `REDIS_TLS_CA_FILE`,
    /// `REDIS_TLS_CERT_FILE`, `REDIS_TLS_KEY_FILE`); and the replicas each
    /// write must reach ([`Config::min_replicas`], `IDEMPOTENCY_MIN_REPLICAS`).
    ///
    /// ```no_run
    /// use amqp_idempotency::{Config, store::RedisStore};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::connect(&Config::from_env()?).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Fails when a URL is malformed, Redis does not answer or refuses the
    /// credentials, a TLS file is unreadable, or the server's certificate is
    /// not trusted or not valid for its host name; the error names the URL
    /// (password hidden) and the variable to set. Once connected, a failed
    /// connection is replaced on the next request, and requests in between
    /// fail as unavailable. The TLS files are read again for each new
    /// connection.
    pub async fn connect(config: &Config) -> Result<Self, StoreError> {
        let replication = Replication::of(config);
        let url = match config.redis() {
            RedisDeployment::Cluster(nodes) => {
                return Self::cluster(nodes, config.redis_tls(), replication).await;
            }
            RedisDeployment::Standalone(url) | RedisDeployment::Sentinel(url) => url,
        };
        let shown = redact_url(url);
        if is_sentinel_url(url) {
            let mut sentinel = SentinelUrl::parse(url)
                .map_err(|message| StoreError::new("connect", "", false, message))?;
            sentinel.tls_files = config.redis_tls().clone();
            let cas = Cas::new();
            let link = Link::new(
                Source::Sentinel(sentinel),
                shown,
                Arc::clone(&cas),
                replication,
            );
            link.get()
                .await
                .map_err(|failure| StoreError::new("connect", "", true, failure.message))?;
            return Ok(Self::start(link, cas));
        }
        let source = match client_for(url, config.redis_tls()) {
            Ok(_) if Side::Redis.is_tls_url(url) => Source::Config {
                url: url.to_owned(),
                tls: config.redis_tls().clone(),
                host: host_of(url),
            },
            Ok(client) => Source::Fixed(client),
            Err(err) => return Err(StoreError::new("connect", "", false, err)),
        };
        let cas = Cas::new();
        let link = Link::new(source, shown.clone(), Arc::clone(&cas), replication);
        link.get()
            .await
            .map_err(|failure| StoreError::new("connect", "", true, failure.message))?;
        Ok(Self::start(link, cas))
    }

    /// Connects to the Redis at `url` and nothing else: `redis://host:port/db`
    /// (`redis://user:password@host:port/db` for an ACL user), `rediss://`
    /// verified against the platform's trusted roots, or
    /// `redis-sentinel://host:port,...#master`. Every other setting is
    /// ignored: no cluster, no TLS files, no replicas to wait for. To
    /// connect as a [`Config`] says (`REDIS_CLUSTER_NODES`, `REDIS_TLS_*`,
    /// `IDEMPOTENCY_MIN_REPLICAS`), use [`connect`](Self::connect).
    ///
    /// Fails like [`connect`](Self::connect).
    pub async fn connect_url(url: &str) -> Result<Self, StoreError> {
        Self::connect(&Config::default().redis_url(url)).await
    }

    /// Connects to the Redis Cluster (or cluster-mode Valkey) that `nodes`
    /// belong to: `redis://` or `rediss://` URLs of some of its nodes, from
    /// which the client learns the rest; credentials in the first URL apply
    /// to every node, and `tls` as for [`connect`](Self::connect). Waits
    /// for no replica: [`connect`](Self::connect) with
    /// [`Config::redis_cluster`] takes every setting.
    ///
    /// Fails when a URL is malformed, no node answers, or the cluster is
    /// not ready; the error names the nodes (passwords hidden).
    pub async fn connect_cluster(nodes: &[String], tls: &TlsFiles) -> Result<Self, StoreError> {
        Self::cluster(nodes, tls, Replication::default()).await
    }

    async fn cluster(
        nodes: &[String],
        tls: &TlsFiles,
        replication: Replication,
    ) -> Result<Self, StoreError> {
        let client = cluster_client(nodes, tls, replication)
            .map_err(|message| StoreError::new("connect", "", false, message))?;
        let cas = Cas::new();
        let link = ClusterLink {
            client,
            replication,
            seed: nodes.first().cloned().unwrap_or_default(),
            tls: tls.clone(),
            direct: Mutex::new(std::collections::HashMap::new()),
            shown: nodes
                .iter()
                .map(|node| redact_url(node))
                .collect::<Vec<_>>()
                .join(","),
            current: Mutex::new(None),
            cas: Arc::clone(&cas),
            slots: std::sync::Mutex::new(None),
        };
        link.get()
            .await
            .map_err(|failure| StoreError::new("connect", "", true, failure.message))?;
        let link = Arc::new(link);
        let stats = Arc::new(Stats::default());
        let (requests, queue) = mpsc::unbounded_channel();
        let (writer, counted) = (Arc::clone(&link), Arc::clone(&stats));
        tokio::spawn(send_in_batches(
            queue,
            MAX_BATCH,
            MAX_IN_FLIGHT,
            move |batch| send_cluster_batch(Arc::clone(&writer), batch, Arc::clone(&counted)),
        ));
        Ok(Self {
            requests,
            cluster: true,
            stats,
            cas,
        })
    }

    /// A store on `client` that connects on its first request. Must be
    /// called within a Tokio runtime: it starts the writer task. Like
    /// [`connect_url`](Self::connect_url), it takes no other setting (no
    /// replicas to wait for); [`connect`](Self::connect) takes a `Config`.
    pub fn from_client(client: redis::Client) -> Self {
        let shown = format!("redis at {}", client.get_connection_info().addr());
        let cas = Cas::new();
        Self::start(
            Link::new(
                Source::Fixed(client),
                shown,
                Arc::clone(&cas),
                Replication::default(),
            ),
            cas,
        )
    }

    fn start(link: Link, cas: Arc<Cas>) -> Self {
        let stats = Arc::new(Stats::default());
        let (requests, queue) = mpsc::unbounded_channel();
        let (writer, counted) = (Arc::new(link), Arc::clone(&stats));
        tokio::spawn(send_in_batches(
            queue,
            MAX_BATCH,
            MAX_IN_FLIGHT,
            move |batch| send_batch(Arc::clone(&writer), batch, Arc::clone(&counted)),
        ));
        Self {
            requests,
            cluster: false,
            stats,
            cas,
        }
    }

    /// This store (and its clones) compare-and-set with the token-checked
    /// scripts only, even on a server with `SET ... IFEQ`: for servers that
    /// announce a version they do not fully implement, and for tests.
    pub fn scripts_only(self) -> Self {
        self.cas.allowed.store(false, Ordering::Relaxed);
        self
    }

    /// True when transitions use `SET ... IFEQ` (Valkey 8.1+, Redis 8.4+,
    /// unless [`scripts_only`](Self::scripts_only)); known once connected.
    pub fn native_compare_and_set(&self) -> bool {
        self.cas.server.load(Ordering::Relaxed) == NATIVE
            && self.cas.allowed.load(Ordering::Relaxed)
    }

    /// Requests sent to Redis so far, by all clones: pipelines on a
    /// standalone server (each is one round trip), commands on a cluster.
    pub fn round_trips(&self) -> u64 {
        self.stats.round_trips.load(Ordering::Relaxed)
    }

    /// Commands sent to Redis so far, by all clones.
    pub fn commands(&self) -> u64 {
        self.stats.commands.load(Ordering::Relaxed)
    }

    async fn request(&self, key: &str, cmd: Cmd, write: bool) -> Result<Value, Failure> {
        let slot = if self.cluster {
            crate::fingerprint::cluster_slot(key)
        } else {
            0
        };
        let (reply, answer) = oneshot::channel();
        let gone = || {
            Failure::unavailable(
                "the Redis writer task stopped (was the runtime shut down?)".into(),
            )
        };
        self.requests
            .send(Request {
                cmd,
                slot,
                write,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn send(
        &self,
        operation: &'static str,
        key: &str,
        cmd: Cmd,
    ) -> Result<Value, StoreError> {
        let write = !matches!(operation, "get" | "outbox");
        self.request(key, cmd, write).await.map_err(|failure| {
            StoreError::new(operation, key, failure.unavailable, failure.message)
        })
    }

    /// `transition` with `SET ... IFEQ`: one command when the key holds
    /// `from`, a second one only when it does not (to tell "absent", "ours
    /// already" and "someone else's" apart). `Err(None)`: the server
    /// refused the syntax, use the script.
    async fn transition_natively(
        &self,
        key: &str,
        from: &[u8],
        or_absent: bool,
        to: &[u8],
        ttl: Duration,
    ) -> Result<bool, Option<StoreError>> {
        let named = |failure: Failure| {
            (!failure.syntax)
                .then(|| StoreError::new("transition", key, failure.unavailable, failure.message))
        };
        let mut set = command("SET", 7, key.len() + to.len() + from.len());
        set.arg(key)
            .arg(to)
            .arg("IFEQ")
            .arg(from)
            .arg("PX")
            .arg(millis(ttl));
        if self.request(key, set, true).await.map_err(named)? != Value::Nil {
            return Ok(true);
        }
        let current: Option<Vec<u8>> = if or_absent {
            // Absent: write it; present: this returns what is there.
            let mut create = redis::cmd("SET");
            create
                .arg(key)
                .arg(to)
                .arg("NX")
                .arg("PX")
                .arg(millis(ttl))
                .arg("GET");
            let reply = self.request(key, create, true).await.map_err(named)?;
            match parse::<Option<Vec<u8>>>("transition", key, reply).map_err(Some)? {
                None => return Ok(true),
                found => found,
            }
        } else {
            let mut get = redis::cmd("GET");
            get.arg(key);
            let reply = self.request(key, get, false).await.map_err(named)?;
            parse("transition", key, reply).map_err(Some)?
        };
        if current.as_deref() != Some(to) {
            return Ok(false);
        }
        // Already done (a retried transition): write it again, so that a
        // WAIT on this connection waits until the replicas hold it too.
        let mut again = command("SET", 6, key.len() + 2 * to.len());
        again.arg(key).arg(to).arg("IFEQ").arg(to).arg("KEEPTTL");
        Ok(self.request(key, again, true).await.map_err(named)? != Value::Nil)
    }
}

/// Sends one batch as one pipeline and answers each request.
async fn send_batch(link: Arc<Link>, batch: Vec<Request>, stats: Arc<Stats>) {
    let mut pipe = redis::Pipeline::with_capacity(batch.len() + 1);
    pipe.ignore_errors();
    let mut replies = Vec::with_capacity(batch.len());
    let mut writes = Vec::with_capacity(batch.len());
    for request in batch {
        pipe.add_command(request.cmd);
        writes.push(request.write);
        replies.push(request.reply);
    }
    // One WAIT after the writes of the pipeline covers them all.
    let wait = link
        .replication
        .wait()
        .filter(|_| writes.iter().any(|write| *write));
    if let Some(wait) = &wait {
        pipe.add_command(wait.clone());
    }
    let (generation, mut connection) = match link.get().await {
        Ok(connection) => connection,
        Err(failure) => return answer_all(replies, &failure),
    };
    stats.round_trips.fetch_add(1, Ordering::Relaxed);
    stats
        .commands
        .fetch_add(pipe.len() as u64, Ordering::Relaxed);
    let answers: Result<Vec<redis::RedisResult<Value>>, RedisError> =
        pipe.query_async(&mut connection).await;
    let expected = replies.len() + usize::from(wait.is_some());
    let mut answers = match answers {
        Ok(answers) if answers.len() == expected => answers,
        Ok(answers) => {
            let failure = Failure::unavailable(format!(
                "Redis answered {} replies to a pipeline of {} commands",
                answers.len(),
                expected
            ));
            link.discard(generation).await;
            return answer_all(replies, &failure);
        }
        Err(err) => {
            if breaks_connection(&err) {
                link.discard(generation).await;
            }
            return answer_all(replies, &failure(err));
        }
    };
    if answers
        .iter()
        .any(|answer| answer.as_ref().is_err_and(breaks_connection))
    {
        // NOAUTH and the like: this connection is no longer usable as it is.
        link.discard(generation).await;
    }
    let unknown_script: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, answer)| {
            answer
                .as_ref()
                .is_err_and(|err| err.code() == Some("NOSCRIPT"))
        })
        .map(|(i, _)| i)
        .collect();
    if !unknown_script.is_empty() {
        // Redis restarted or flushed its scripts: load it and send those
        // calls again (safe: none of them ran).
        let mut retry = redis::pipe();
        retry.ignore_errors();
        for script in LUA_SCRIPTS {
            retry.cmd("SCRIPT").arg("LOAD").arg(script);
        }
        for command in pipe
            .cmd_iter()
            .enumerate()
            .filter(|(i, _)| unknown_script.contains(i))
            .map(|(_, command)| command.clone())
        {
            retry.add_command(command);
        }
        if let Some(wait) = &wait {
            retry.add_command(wait.clone());
        }
        stats.round_trips.fetch_add(1, Ordering::Relaxed);
        let again: Result<Vec<redis::RedisResult<Value>>, RedisError> =
            retry.query_async(&mut connection).await;
        let expected_again = unknown_script.len() + LUA_SCRIPTS.len() + usize::from(wait.is_some());
        match again {
            Ok(mut again) if again.len() == expected_again => {
                let short = match wait {
                    Some(_) => again
                        .pop()
                        .and_then(|waited| link.replication.shortfall(&waited)),
                    None => None,
                };
                if let Some(short) = short {
                    for answer in again.iter_mut().skip(LUA_SCRIPTS.len()) {
                        if answer.is_ok() {
                            *answer = Err(RedisError::from((
                                ErrorKind::Io,
                                "not confirmed by enough replicas",
                                short.message.clone(),
                            )));
                        }
                    }
                }
                let mut again = again.into_iter();
                let loads: Vec<_> = (&mut again).take(LUA_SCRIPTS.len()).collect();
                let loaded = loads.into_iter().find(Result::is_err);
                for (&i, answer) in unknown_script.iter().zip(again) {
                    // A refused load (an ACL without `script|load`) is the
                    // answer: it says what to grant.
                    answers[i] = match &loaded {
                        Some(Err(err)) => Err(err.clone()),
                        _ => answer,
                    };
                }
            }
            Ok(_) => {}
            Err(err) => {
                for &i in &unknown_script {
                    answers[i] = Err(RedisError::from((
                        ErrorKind::Io,
                        "reloading the transition script failed",
                        err.to_string(),
                    )));
                }
            }
        }
    }
    let shortfall = match wait {
        Some(_) => answers
            .pop()
            .and_then(|waited| link.replication.shortfall(&waited)),
        None => None,
    };
    for ((reply, answer), write) in replies.into_iter().zip(answers).zip(writes) {
        let answer = match (answer, &shortfall) {
            (Ok(_), Some(short)) if write => Err(short.clone()),
            (answer, _) => answer.map_err(failure),
        };
        let _ = reply.send(answer);
    }
}

/// The masters of a cluster by slot range: `(first, last, host, port)`.
struct SlotMap(Vec<(u16, u16, String, u16)>);

impl SlotMap {
    /// Parses a `CLUSTER SLOTS` reply (masters only; a range whose master
    /// has no usable address is left out: its requests travel alone).
    fn parse(reply: &Value) -> Option<Self> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut map = Vec::with_capacity(ranges.len());
        for range in ranges {
            let Value::Array(fields) = range else {
                continue;
            };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                continue;
            };
            let host = match master.first() {
                Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
                Some(Value::SimpleString(host)) => host.clone(),
                _ => continue,
            };
            let (Ok(first), Ok(last), Some(Value::Int(port))) =
                (u16::try_from(*first), u16::try_from(*last), master.get(1))
            else {
                continue;
            };
            if host.is_empty() || host == "?" {
                continue;
            }
            if let Ok(port) = u16::try_from(*port) {
                map.push((first, last, host, port));
            }
        }
        Some(Self(map))
    }

    fn node(&self, slot: u16) -> Option<(&str, u16)> {
        self.0
            .iter()
            .find(|(first, last, ..)| (*first..=*last).contains(&slot))
            .map(|(_, _, host, port)| (host.as_str(), *port))
    }
}

impl ClusterLink {
    /// The slot map, asked for when unknown; `None` when the cluster does
    /// not answer (requests then travel alone, routed by the client).
    async fn slot_map(&self) -> Option<Arc<SlotMap>> {
        if let Some(map) = self.slots.lock().ok()?.as_ref() {
            return Some(Arc::clone(map));
        }
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        let map = Arc::new(SlotMap::parse(&self.query(&slots, false).await.ok()?)?);
        *self.slots.lock().ok()? = Some(Arc::clone(&map));
        Some(map)
    }

    /// The plain connection to the master at `host:port`, made when
    /// missing, with the seed URL's scheme and credentials.
    async fn direct(&self, host: &str, port: u16) -> Result<MultiplexedConnection, Failure> {
        let mut direct = self.direct.lock().await;
        if let Some(connection) = direct.get(&(host.to_owned(), port)) {
            return Ok(connection.clone());
        }
        let unavailable = |err: String| {
            Failure::unavailable(format!(
                "cannot connect to the Redis Cluster node {host}:{port}: {err}"
            ))
        };
        let mut url = url::Url::parse(&self.seed).map_err(|err| unavailable(err.to_string()))?;
        let host_set = if host.contains(':') && !host.starts_with('[') {
            url.set_host(Some(&format!("[{host}]")))
        } else {
            url.set_host(Some(host))
        };
        host_set.map_err(|err| unavailable(err.to_string()))?;
        url.set_port(Some(port))
            .map_err(|()| unavailable("not a port".into()))?;
        let client = client_for(url.as_str(), &self.tls).map_err(unavailable)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RedisStore::RESPONSE_TIMEOUT))
            .set_response_timeout(Some(
                RedisStore::RESPONSE_TIMEOUT + self.replication.timeout,
            ));
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|err| unavailable(failure(err).message))?;
        direct.insert((host.to_owned(), port), connection.clone());
        Ok(connection)
    }

    /// Forgets the connection to `host:port` after it failed.
    async fn drop_direct(&self, host: &str, port: u16) {
        self.direct.lock().await.remove(&(host.to_owned(), port));
    }

    /// Forgets the slot map after a redirection or a failed node.
    fn forget_slots(&self) {
        if let Ok(mut slots) = self.slots.lock() {
            *slots = None;
        }
    }
}

/// Sends a cluster batch: one pipeline per master (its writes followed by
/// one `WAIT` when replicas are asked for), requests whose master is not
/// known alone. A request redirected meanwhile (MOVED, ASK: a reshard or a
/// failover) is sent again alone, which follows the redirection, and the
/// slot map is learnt again.
async fn send_cluster_batch(link: Arc<ClusterLink>, batch: Vec<Request>, stats: Arc<Stats>) {
    let map = link.slot_map().await;
    let mut groups: Vec<((String, u16), Vec<Request>)> = Vec::new();
    let mut alone = Vec::new();
    for request in batch {
        match map.as_ref().and_then(|map| map.node(request.slot)) {
            Some((host, port)) => match groups
                .iter_mut()
                .find(|((h, p), _)| h == host && *p == port)
            {
                Some((_, group)) => group.push(request),
                None => groups.push(((host.to_owned(), port), vec![request])),
            },
            None => alone.push(request),
        }
    }
    let mut sends: FuturesUnordered<
        std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    > = FuturesUnordered::new();
    for ((host, port), requests) in groups {
        sends.push(Box::pin(send_to_node(
            Arc::clone(&link),
            host,
            port,
            requests,
            Arc::clone(&stats),
        )));
    }
    for request in alone {
        let (link, stats) = (Arc::clone(&link), Arc::clone(&stats));
        sends.push(Box::pin(async move {
            let answer = send_alone(&link, &request, &stats).await;
            let _ = request.reply.send(answer);
        }));
    }
    while sends.next().await.is_some() {}
}

/// One request through the cluster client's own routing.
async fn send_alone(
    link: &ClusterLink,
    request: &Request,
    stats: &Stats,
) -> Result<Value, Failure> {
    stats.round_trips.fetch_add(1, Ordering::Relaxed);
    stats.commands.fetch_add(1, Ordering::Relaxed);
    match link.query(&request.cmd, request.write).await {
        Err(failure) if failure.noscript => {
            // A node restarted, or a new master after a failover: load the
            // script everywhere and try again.
            for script in LUA_SCRIPTS {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(script);
                link.query(&load, false).await?;
            }
            link.query(&request.cmd, request.write).await
        }
        other => other,
    }
}

/// The requests whose keys `host:port` serves, as one pipeline on a plain
/// connection to that master.
async fn send_to_node(
    link: Arc<ClusterLink>,
    host: String,
    port: u16,
    requests: Vec<Request>,
    stats: Arc<Stats>,
) {
    let mut pipe = redis::Pipeline::with_capacity(requests.len() + 1);
    pipe.ignore_errors();
    for request in &requests {
        pipe.add_command(request.cmd.clone());
    }
    let wait = link
        .replication
        .wait()
        .filter(|_| requests.iter().any(|request| request.write));
    if let Some(wait) = &wait {
        pipe.add_command(wait.clone());
    }
    let expected = pipe.len();
    stats.round_trips.fetch_add(1, Ordering::Relaxed);
    stats.commands.fetch_add(expected as u64, Ordering::Relaxed);
    let sent = async {
        let mut connection = link.direct(&host, port).await?;
        pipe.query_async::<Vec<redis::RedisResult<Value>>>(&mut connection)
            .await
            .map_err(failure)
    };
    let mut answers = match sent.await {
        Ok(answers) if answers.len() == expected => answers,
        Ok(_) | Err(_) => {
            // The node failed (a failover under way?), or answered oddly:
            // forget it and the map, and let the client route each request.
            link.drop_direct(&host, port).await;
            link.forget_slots();
            let resent = requests.into_iter().map(|request| {
                let (link, stats) = (Arc::clone(&link), Arc::clone(&stats));
                async move {
                    let answer = send_alone(&link, &request, &stats).await;
                    let _ = request.reply.send(answer);
                }
            });
            futures_util::future::join_all(resent).await;
            return;
        }
    };
    let shortfall = match wait {
        Some(_) => answers
            .pop()
            .and_then(|waited| link.replication.shortfall(&waited)),
        None => None,
    };
    let mut moved = Vec::new();
    for (request, answer) in requests.into_iter().zip(answers) {
        let answer = match answer {
            Err(err)
                if matches!(
                    err.code(),
                    Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY" | "NOSCRIPT")
                ) =>
            {
                // Not run here: the slot moved (a reshard, a failover), or
                // the node lost the script. Alone, the client follows the
                // redirection (or loads the script).
                if err.code() != Some("NOSCRIPT") {
                    link.forget_slots();
                }
                moved.push(request);
                continue;
            }
            Err(err) => Err(failure(err)),
            Ok(answer) => match &shortfall {
                Some(short) if request.write => Err(short.clone()),
                _ => Ok(answer),
            },
        };
        let _ = request.reply.send(answer);
    }
    let resent = moved.into_iter().map(|request| {
        let (link, stats) = (Arc::clone(&link), Arc::clone(&stats));
        async move {
            let answer = send_alone(&link, &request, &stats).await;
            let _ = request.reply.send(answer);
        }
    });
    futures_util::future::join_all(resent).await;
}

type Reply = oneshot::Sender<Result<Value, Failure>>;

fn answer_all(replies: Vec<Reply>, failure: &Failure) {
    for reply in replies {
        let _ = reply.send(Err(failure.clone()));
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
        || matches!(err.code(), Some("NOAUTH" | "WRONGPASS" | "READONLY"))
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
    } else if matches!(code, "MOVED" | "ASK" | "CROSSSLOT") {
        "REDIS_URL points at a Redis Cluster node: give the cluster's nodes in \
         REDIS_CLUSTER_NODES (and unset REDIS_URL) instead"
    } else if matches!(code, "CLUSTERDOWN" | "TRYAGAIN") {
        "the Redis Cluster is down or resharding: consumption resumes once it serves \
         the slot again"
    } else if code == "OOM" {
        "Redis is out of memory (maxmemory with noeviction): raise maxmemory or lower \
         IDEMPOTENCY_DONE_TTL; consumption resumes once a write succeeds"
    } else if code == "READONLY" {
        "Redis is a read-only replica (after a failover?): point REDIS_URL at the primary, \
         or at the sentinels (redis-sentinel://host:port,...#master) to follow failovers"
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
        syntax: err.code() == Some("ERR") && err.to_string().contains("syntax error"),
        noscript: err.code() == Some("NOSCRIPT"),
        message,
    }
}

/// A client for `config`'s standalone Redis, with TLS for `rediss://` as
/// [`Config::redis_tls`] says: for code of your own that talks to the same
/// Redis (a maintenance job, a test).
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
/// variable and path. A `Config` that names a Redis Cluster or Sentinel
/// is refused too: a `redis::Client` talks to one server, and that is not
/// one (for Sentinel, ask [`sentinel_master_url`] for the master's URL).
pub fn redis_client(config: &Config) -> Result<redis::Client, StoreError> {
    let url = match config.redis() {
        RedisDeployment::Standalone(url) => url,
        deployment @ RedisDeployment::Cluster(_) => {
            return Err(StoreError::new(
                "connect",
                "",
                false,
                format!(
                    "{deployment} is named (REDIS_CLUSTER_NODES), and a redis::Client talks to \
                     one server: use redis::cluster::ClusterClient with these nodes, or \
                     RedisStore::connect(&config)"
                ),
            ));
        }
        deployment @ RedisDeployment::Sentinel(_) => {
            return Err(StoreError::new(
                "connect",
                "",
                false,
                format!(
                    "{deployment} is named (REDIS_URL), which is not a server's URL: ask the \
                     sentinels for the master's with store::sentinel_master_url, or use \
                     RedisStore::connect(&config)"
                ),
            ));
        }
    };
    client_for(url, config.redis_tls())
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

/// For a `redis-sentinel://` URL, the URL of the master that its sentinels
/// name now (asked in turn, with `timeout` for each); `None` for any other
/// URL. For code of your own that wants a plain connection to the same
/// Redis, like the operator CLI.
///
/// ```no_run
/// use std::time::Duration;
/// use amqp_idempotency::store::sentinel_master_url;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let url = "redis-sentinel://10.0.0.5:26379,10.0.0.6:26379#orders";
/// let master = sentinel_master_url(url, Duration::from_secs(2))?;
/// assert!(master.is_some_and(|url| url.starts_with("redis://")));
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// A malformed Sentinel URL, or no sentinel naming the master; the message
/// names the sentinels (passwords hidden) and what to check.
pub fn sentinel_master_url(url: &str, timeout: Duration) -> Result<Option<String>, StoreError> {
    if !is_sentinel_url(url) {
        return Ok(None);
    }
    let sentinel = SentinelUrl::parse(url)
        .map_err(|message| StoreError::new("connect", "", false, message))?;
    let mut problems = Vec::new();
    for address in &sentinel.sentinels {
        let reply = (|| {
            let client = client_for(address, &TlsFiles::default())?;
            let mut connection = client
                .get_connection_with_timeout(timeout)
                .map_err(|err| err.to_string())?;
            connection
                .set_read_timeout(Some(timeout))
                .map_err(|err| err.to_string())?;
            sentinel
                .question()
                .query(&mut connection)
                .map_err(|err| err.to_string())
        })();
        match sentinel.answer(address, reply) {
            Ok(url) => return Ok(Some(url)),
            Err(problem) => problems.push(problem),
        }
    }
    Err(StoreError::new(
        "connect",
        "",
        true,
        sentinel.unanswered(&problems),
    ))
}

/// The cluster client for seed `nodes`, with TLS for `rediss://` as
/// `files` say, or a message saying what is wrong.
fn cluster_client(
    nodes: &[String],
    files: &TlsFiles,
    replication: Replication,
) -> Result<redis::cluster::ClusterClient, String> {
    let shown = || {
        nodes
            .iter()
            .map(|node| redact_url(node))
            .collect::<Vec<_>>()
            .join(",")
    };
    if nodes.is_empty() {
        return Err(
            "REDIS_CLUSTER_NODES names no node: give redis://host:port URLs, comma-separated"
                .into(),
        );
    }
    let tls_urls = nodes
        .iter()
        .filter(|node| Side::Redis.is_tls_url(node))
        .count();
    if tls_urls != 0 && tls_urls != nodes.len() {
        return Err(format!(
            "REDIS_CLUSTER_NODES `{}` mixes redis:// and rediss:// URLs: use one scheme for every node",
            shown()
        ));
    }
    if tls_urls == 0
        && let Some((var, path)) = files.first_set(Side::Redis)
    {
        return Err(format!(
            "{var}={} is set but REDIS_CLUSTER_NODES `{}` has no TLS: use rediss:// (or unset {var})",
            path.display(),
            shown()
        ));
    }
    let mut infos = Vec::with_capacity(nodes.len());
    for node in nodes {
        let info =
            redis::IntoConnectionInfo::into_connection_info(node.as_str()).map_err(|err| {
                format!(
                    "`{}` in REDIS_CLUSTER_NODES is not a valid Redis URL ({err}); expected \
                 redis://[user:password@]host:port, or rediss://... for TLS",
                    redact_url(node)
                )
            })?;
        infos.push(info);
    }
    let mut builder = redis::cluster::ClusterClientBuilder::new(infos)
        .connection_timeout(RedisStore::RESPONSE_TIMEOUT)
        .response_timeout(RedisStore::RESPONSE_TIMEOUT + replication.timeout)
        .retries(4);
    if tls_urls != 0 {
        tls::ensure_process_provider();
        if !files.is_empty() {
            let material = files.load(Side::Redis).map_err(|err| err.to_string())?;
            builder = builder.certs(redis::TlsCertificates {
                client_tls: material.identity.map(|identity| redis::ClientTlsConfig {
                    client_cert: identity.cert_pem,
                    client_key: identity.key_pem,
                }),
                root_cert: material.ca_pem,
            });
        }
    }
    builder
        .build()
        .map_err(|err| format!("cannot use REDIS_CLUSTER_NODES `{}`: {err}", shown()))
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
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut cmd = command("SET", 7, key.len() + value.len());
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
        from: Expect<'_>,
        to: Option<&[u8]>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        if let (Some(to), Expect::Value(value) | Expect::ValueOrAbsent(value)) = (to, from)
            && self.cas.try_native()
        {
            let or_absent = matches!(from, Expect::ValueOrAbsent(_));
            match self
                .transition_natively(key, value, or_absent, to, ttl)
                .await
            {
                Err(None) => {
                    // A server without IFEQ (one that would not say which it
                    // is, or a mixed-version cluster mid-upgrade): scripts
                    // from now on.
                    tracing::debug!(%key, "the server refused SET ... IFEQ; using the transition script");
                    self.cas.server.store(SCRIPTS, Ordering::Relaxed);
                }
                Err(Some(err)) => return Err(err),
                Ok(done) => {
                    let _ = self.cas.server.compare_exchange(
                        UNKNOWN,
                        NATIVE,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    return Ok(done);
                }
            }
        }
        let (mode, grace_ms) = match from {
            Expect::Value(_) => ("", 0),
            Expect::ValueOrAbsent(_) => ("a", 0),
            Expect::Expired { grace, .. } => ("e", millis(grace)),
        };
        let mut cmd = command(
            "EVALSHA",
            9,
            key.len() + from.value().len() + to.map_or(0, <[u8]>::len),
        );
        cmd.arg(transition_sha())
            .arg(1)
            .arg(key)
            .arg(from.value())
            .arg(to.unwrap_or(b""))
            .arg(millis(ttl))
            .arg(mode)
            .arg(grace_ms);
        let reply = self.send("transition", key, cmd).await?;
        Ok(parse::<i64>("transition", key, reply)? == 1)
    }

    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Duration>)>, StoreError> {
        // Two requests queued together travel in the same pipeline.
        let mut get = redis::cmd("GET");
        get.arg(key);
        let mut pttl = redis::cmd("PTTL");
        pttl.arg(key);
        let (value, ttl) = tokio::join!(self.send("get", key, get), self.send("get", key, pttl));
        let value: Option<Vec<u8>> = parse("get", key, value?)?;
        let ttl: i64 = parse("get", key, ttl?)?;
        let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
        Ok(value.map(|value| (value, ttl)))
    }

    async fn commit_outbox(
        &self,
        key: &str,
        from: Expect<'_>,
        to: &[u8],
        ttl: Duration,
        outbox_key: &str,
        entries: &[OutboxEntry],
    ) -> Result<bool, StoreError> {
        if self.cluster && !crate::fingerprint::same_slot(key, outbox_key) {
            return Err(StoreError::new(
                "commit",
                key,
                false,
                format!(
                    "the record and its outbox `{outbox_key}` fall in different cluster slots (the fingerprint holds a `}}` without a `{{` before it): use a fingerprint without braces for a consumer with an outbox"
                ),
            ));
        }
        let mode = match from {
            Expect::ValueOrAbsent(_) => "a",
            Expect::Value(_) | Expect::Expired { .. } => "",
        };
        let bytes: usize = entries
            .iter()
            .map(|(field, value)| field.len() + value.len())
            .sum();
        let mut cmd = command(
            "EVALSHA",
            9 + 2 * entries.len(),
            key.len() + outbox_key.len() + from.value().len() + to.len() + bytes,
        );
        cmd.arg(commit_sha())
            .arg(2)
            .arg(key)
            .arg(outbox_key)
            .arg(from.value())
            .arg(to)
            .arg(millis(ttl))
            .arg(mode);
        for (field, value) in entries {
            cmd.arg(&field[..]).arg(&value[..]);
        }
        let reply = self.send("commit", key, cmd).await?;
        Ok(parse::<i64>("commit", key, reply)? == 1)
    }

    async fn outbox(&self, outbox_key: &str) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(outbox_key);
        let reply = self.send("outbox", outbox_key, cmd).await?;
        let fields: std::collections::HashMap<Vec<u8>, Vec<u8>> =
            parse("outbox", outbox_key, reply)?;
        let mut fields: Vec<OutboxEntry> = fields.into_iter().collect();
        fields.sort_unstable();
        Ok(fields)
    }

    async fn outbox_remove(&self, outbox_key: &str, fields: &[Vec<u8>]) -> Result<(), StoreError> {
        if fields.is_empty() {
            return Ok(());
        }
        let mut cmd = command(
            "HDEL",
            fields.len() + 1,
            outbox_key.len() + fields.len() * 4,
        );
        cmd.arg(outbox_key);
        for field in fields {
            cmd.arg(&field[..]);
        }
        let reply = self.send("outbox_remove", outbox_key, cmd).await?;
        parse::<i64>("outbox_remove", outbox_key, reply).map(drop)
    }

    async fn probe(&self, key: &str) -> Result<(), StoreError> {
        // Shaped like a claim (`SET ... NX PX ms GET`), so that whatever
        // refuses claims (a full or read-only server, an ACL without read
        // access to the keys) refuses the probe too.
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg("probe")
            .arg("NX")
            .arg("PX")
            .arg(10_000)
            .arg("GET");
        let reply = self.send("probe", key, cmd).await?;
        parse::<Option<Vec<u8>>>("probe", key, reply).map(drop)
    }
}

/// A command named `name` with room for `args` arguments and `bytes` of
/// keys and values besides the short ones: one allocation each instead of
/// one per argument.
fn command(name: &str, args: usize, bytes: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(args, bytes + 64);
    cmd.arg(name);
    cmd
}

/// The SHA1 of [`COMMIT`], computed once.
fn commit_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| Script::new(COMMIT).get_hash().to_owned())
}

/// The SHA1 of [`TRANSITION`], computed once.
fn transition_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| Script::new(TRANSITION).get_hash().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let url = SentinelUrl::parse("redis-sentinel://u:p@a:26380,b,[::1]:5/2#orders").unwrap();
        assert_eq!(
            url.sentinels,
            ["redis://a:26380", "redis://b:26379", "redis://[::1]:5"]
        );
        assert_eq!(url.master, "orders");
        assert_eq!(
            url.master_url("10.0.0.9", 6380),
            "redis://u:p@10.0.0.9:6380/2"
        );
        let tls = SentinelUrl::parse("rediss-sentinel://s1:26379#m").unwrap();
        assert_eq!(tls.sentinels, ["rediss://s1:26379"]);
        assert_eq!(tls.master_url("::1", 1), "rediss://[::1]:1");
        for bad in [
            "redis://a:1#m",
            "redis-sentinel://a:1",
            "redis-sentinel://a:1#",
            "redis-sentinel://#m",
            "redis-sentinel://a:1/x#m",
        ] {
            assert!(SentinelUrl::parse(bad).is_err(), "{bad}");
        }
        let err = SentinelUrl::parse("redis-sentinel://u:secret@a:1").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        let err = SentinelUrl::parse("redis-sentinel://idem:s3cr#t@s1:26379").unwrap_err();
        assert!(!err.contains("s3cr"), "{err}");
        let hashed = SentinelUrl::parse("redis-sentinel://idem:s3cr#t@s1:26379#m").unwrap();
        assert_eq!(hashed.master, "m");
        assert_eq!(hashed.sentinels, ["redis://s1:26379"]);
    }

    #[test]
    fn hello_tells_native_compare_and_set() {
        let hello = |server: &str, version: &str| {
            Value::Array(vec![
                Value::BulkString(b"server".to_vec()),
                Value::BulkString(server.as_bytes().to_vec()),
                Value::BulkString(b"version".to_vec()),
                Value::BulkString(version.as_bytes().to_vec()),
            ])
        };
        for (server, version, native) in [
            ("valkey", "8.1.8", true),
            ("valkey", "8.0.2", false),
            ("redis", "7.0.15", false),
            ("redis", "8.4.0", true),
            ("keydb", "9.0.0", false),
        ] {
            let cas = Cas::new();
            cas.detect(Some(&hello(server, version)));
            assert_eq!(
                cas.server.load(Ordering::Relaxed) == NATIVE,
                native,
                "{server} {version}"
            );
        }
        let cas = Cas::new();
        cas.detect(None);
        assert!(cas.try_native(), "unknown: the first transition tries IFEQ");
    }
}
