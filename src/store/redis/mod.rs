//! The Redis store: one key per message, compare-and-set on that key alone
//! (natively with `SET ... IFEQ` where the server has it, by a token-checked
//! script elsewhere), and every request that is waiting sent together as
//! one pipeline: to the server, or on Redis Cluster one pipeline to each
//! master, with redis-rs's cluster client following redirections.
//!
//! ```no_run
//! use amqp_idempotency::store::RedisStore;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::connect_url("redis://127.0.0.1:6379").await?;
//! # Ok(())
//! # }
//! ```
//!
//! The files: `connect` (building clients and the store), `link` (a
//! standalone server's writer task, which owns its connection), `wire`
//! (that connection: TCP or TLS, commands packed and replies parsed by
//! redis-rs), `pipeline` (a batch as one pipeline, its transitions as one
//! script call), `cluster` (slot map and a pipeline per master),
//! `sentinel` (asking where the master is), `replication` (`WAIT`),
//! `native` (`SET ... IFEQ`), `scripts` (the Lua compare-and-set),
//! `errors` (classification and remedies); here, the store and its
//! [`Store`] primitives.

mod cluster;
mod connect;
mod errors;
mod link;
mod native;
mod pipeline;
mod replication;
mod scripts;
mod sentinel;
mod wire;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
#[cfg(feature = "testing")]
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{Cmd, Value};
use tokio::sync::{mpsc, oneshot};

pub(crate) use self::connect::client_for;
use self::errors::{Failure, parse};
use self::native::Cas;
use super::{Expect, OutboxEntry, Store};
use crate::error::StoreError;

/// Most requests sent in one pipeline.
const MAX_BATCH: usize = 512;

/// Most pipelines awaiting their replies at once.
const MAX_IN_FLIGHT: usize = 4;

/// A [`Store`] on Redis 7 or newer, Valkey, or Redis Cluster.
///
/// **Standalone** ([`connect`](Self::connect), `REDIS_URL`): all clones
/// share one writer task, which owns one connection: it writes the
/// pipelines and reads their replies itself. A connection that failed
/// (dropped, timed out, refused our credentials) is replaced by a new one
/// for the next batch, whatever the error was, so the store recovers by
/// itself once Redis is reachable and the credentials are right again.
/// Requests issued while a pipeline is in flight are sent together as the
/// next pipeline, so under load the claims of many deliveries and the done
/// marks of earlier ones share a round trip, and their token-checked
/// transitions share one script call. No timer is involved: a lone
/// request is sent at once.
///
/// **Cluster** ([`connect`](Self::connect) with `REDIS_CLUSTER_NODES`):
/// the requests that wait together travel as one pipeline per master,
/// found from the `CLUSTER SLOTS` map. A request
/// redirected meanwhile (MOVED, ASK: a resharded slot, a failed-over
/// master) is sent again alone through redis-rs's cluster client, which
/// follows the redirection, and the map is learnt again. The transitions
/// of one pipeline to a master share one script call, which reaches the
/// keys of every slot that master serves. A request that
/// fails during a reshard or failover counts as unanswered and is retried
/// like any other.
///
/// Every request touches one key. The transitions after a claim compare
/// the whole stored value first: natively (`SET key new IFEQ old`) on
/// Valkey 8.1 or newer and Redis 8.4 or newer, detected from `HELLO` on
/// each new connection, or from the first transition's answer where
/// `HELLO` is not granted ([`native_compare_and_set`](Self::native_compare_and_set)),
/// and by a token-checked script (called by SHA, loaded again after a
/// restart) elsewhere, or always with `scripts_only` (a `testing` hook).
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

/// What the benchmark reads: shared by the writer task and every clone.
#[derive(Default)]
struct Stats {
    round_trips: AtomicU64,
    commands: AtomicU64,
}

/// One command on its way to the writer task, and where its answer goes.
struct Request {
    /// The command; for a transition, its part of the script call.
    cmd: Cmd,
    /// The cluster slot of its key (unused on a standalone server).
    slot: u16,
    kind: Kind,
    reply: oneshot::Sender<Result<Value, Failure>>,
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Reads only.
    Read,
    /// Writes, so `WAIT` must see it replicated (when asked to).
    Write,
    /// A token-checked transition by the script: the transitions that wait
    /// together share one script call (see `pipeline`).
    Transition,
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
            .field(
                "round_trips",
                &self
                    .stats
                    .round_trips
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// How long a pipeline may wait for its replies before its requests count as unanswered.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

    /// This store (and its clones) compare-and-set with the token-checked
    /// scripts only, even on a server with `SET ... IFEQ`: for servers that
    /// announce a version they do not fully implement, and for tests.
    #[cfg(feature = "testing")]
    pub fn scripts_only(self) -> Self {
        self.cas.allowed.store(false, Ordering::Relaxed);
        self
    }

    /// True when transitions use `SET ... IFEQ` (Valkey 8.1+, Redis 8.4+,
    /// unless `scripts_only`, a `testing` hook); known once connected.
    pub fn native_compare_and_set(&self) -> bool {
        self.cas.is_native()
    }

    /// Requests sent to Redis so far, by all clones: pipelines on a
    /// standalone server (each is one round trip), commands on a cluster.
    #[cfg(feature = "testing")]
    pub fn round_trips(&self) -> u64 {
        self.stats.round_trips.load(Ordering::Relaxed)
    }

    /// Commands sent to Redis so far, by all clones.
    #[cfg(feature = "testing")]
    pub fn commands(&self) -> u64 {
        self.stats.commands.load(Ordering::Relaxed)
    }

    async fn request(&self, key: &str, cmd: Cmd, kind: Kind) -> Result<Value, Failure> {
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
                kind,
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
        let kind = match operation {
            "get" | "outbox" => Kind::Read,
            "transition" => Kind::Transition,
            _ => Kind::Write,
        };
        self.request(key, cmd, kind).await.map_err(|failure| {
            StoreError::new(operation, key, failure.unavailable, failure.message)
        })
    }
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
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
                    self.cas.use_scripts();
                }
                Err(Some(err)) => return Err(err),
                Ok(done) => {
                    self.cas.native_confirmed();
                    return Ok(done);
                }
            }
        }
        let reply = self
            .send(
                "transition",
                key,
                scripts::transition_args(key, from, to, ttl),
            )
            .await?;
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
        let cmd = scripts::commit_call(key, from, to, ttl, outbox_key, entries);
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
