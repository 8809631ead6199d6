//! Reaching the servers that hold the records, for each deployment a
//! [`Config`] names: a standalone server (`rediss://` with the
//! `REDIS_TLS_*` files), the master Sentinel names now, or every master
//! of a cluster (from `CLUSTER SLOTS`). The clients are built by the
//! store's one client builder, so TLS is set up in one place.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};

use crate::config::{Config, RedisDeployment, SentinelUrl};
use crate::error::{StoreError, redact_url};
use crate::fingerprint::cluster_slot;
use crate::store::client_for;
use crate::tls::TlsFiles;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// One Redis server and a connection to it.
#[derive(Clone)]
pub(super) struct Server {
    /// `Redis at <url>`, password hidden, for messages.
    pub(super) shown: String,
    pub(super) connection: MultiplexedConnection,
}

/// The servers that hold the records.
pub(super) enum Servers {
    /// A standalone server, or the master Sentinel named.
    One(Server),
    /// A cluster's masters, each with the slots it serves.
    Cluster {
        /// The cluster's seed nodes, password hidden, for messages.
        shown: String,
        seed_url: String,
        masters: Vec<Master>,
        tls: TlsFiles,
    },
}

/// A master of a cluster.
#[derive(Debug)]
pub(super) struct Master {
    url: String,
    /// Inclusive slot ranges.
    slots: Vec<(u16, u16)>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

fn timeouts() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// A failure of `operation` on `shown` (e.g. `Redis at redis://host`):
/// unreachable, or an answer that refused the request.
pub(super) fn failure(
    operation: &'static str,
    key: &str,
    shown: &str,
    err: &RedisError,
) -> StoreError {
    let unreachable = err.is_connection_refusal()
        || err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped();
    let message = if unreachable {
        format!("cannot reach {shown}: {err}")
    } else {
        format!(
            "{shown} answered with an error: {err}; check the user, password and database in \
             the URL, and that this user may run SCAN, EVALSHA, SCRIPT LOAD, TYPE, STRLEN, \
             GETRANGE, PTTL, HLEN and DEL (on a cluster also CLUSTER SLOTS)"
        )
    };
    StoreError::new(operation, key, true, message)
}

impl Servers {
    /// Connects as `config` says.
    pub(super) async fn connect(config: &Config) -> Result<Self, StoreError> {
        let tls = config.redis_tls();
        match config.redis_deployment() {
            deployment @ RedisDeployment::Cluster(nodes) => {
                cluster(deployment.to_string(), nodes, tls).await
            }
            RedisDeployment::Sentinel(url) => {
                let mut sentinel = SentinelUrl::parse(url)
                    .map_err(|message| StoreError::new("connect", "", false, message))?;
                sentinel.tls_files = tls.clone();
                let master = sentinel
                    .master(&timeouts())
                    .await
                    .map_err(|message| StoreError::new("connect", "", true, message))?;
                Ok(Self::One(open(&master, tls).await?))
            }
            RedisDeployment::Standalone(url) => Ok(Self::One(open(url, tls).await?)),
        }
    }

    /// What the records live on, for messages: `Redis at <url>` or the
    /// cluster's seed nodes.
    pub(super) fn shown(&self) -> String {
        match self {
            Self::One(server) => server.shown.clone(),
            Self::Cluster { shown, .. } => shown.clone(),
        }
    }

    /// Whether keys of different slots must go in separate script calls.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// The server that holds `key`: the only one, or the master serving
    /// its slot.
    pub(super) async fn for_key(&self, key: &str) -> Result<Server, StoreError> {
        match self {
            Self::One(server) => Ok(server.clone()),
            Self::Cluster {
                shown,
                seed_url,
                masters,
                tls,
            } => {
                let slot = cluster_slot(key);
                let master = masters
                    .iter()
                    .find(|master| {
                        master
                            .slots
                            .iter()
                            .any(|(from, to)| (*from..=*to).contains(&slot))
                    })
                    .ok_or_else(|| {
                        StoreError::new(
                            "connect",
                            key,
                            true,
                            format!(
                                "no master of {shown} serves slot {slot}: the cluster is not \
                                 ready; check `redis-cli --cluster check`"
                            ),
                        )
                    })?;
                open(&master.url, tls)
                    .await
                    .map_err(|err| from_seed(err, seed_url))
            }
        }
    }

    /// Every server whose keys count: the only one, or each master.
    pub(super) async fn masters(&self) -> Result<Vec<Server>, StoreError> {
        match self {
            Self::One(server) => Ok(vec![server.clone()]),
            Self::Cluster {
                seed_url,
                masters,
                tls,
                ..
            } => {
                let mut servers = Vec::with_capacity(masters.len());
                for master in masters {
                    servers.push(
                        open(&master.url, tls)
                            .await
                            .map_err(|err| from_seed(err, seed_url))?,
                    );
                }
                Ok(servers)
            }
        }
    }
}

/// A master's URL is derived from a seed's: say so when it fails.
fn from_seed(err: StoreError, seed_url: &str) -> StoreError {
    let message = format!(
        "{} (a master the cluster announced, reached with the scheme and credentials of {})",
        std::error::Error::source(&err).map_or_else(|| err.to_string(), ToString::to_string),
        redact_url(seed_url)
    );
    StoreError::new(err.operation(), err.key(), err.is_unavailable(), message)
}

/// The first seed node that answers, and the masters it lists.
async fn cluster(shown: String, nodes: &[String], tls: &TlsFiles) -> Result<Servers, StoreError> {
    let mut problems = Vec::new();
    for url in nodes {
        let mut seed = match open(url, tls).await {
            Ok(seed) => seed,
            Err(err) if err.is_unavailable() => {
                problems.push(
                    std::error::Error::source(&err)
                        .map_or_else(|| err.to_string(), ToString::to_string),
                );
                continue;
            }
            Err(err) => return Err(err),
        };
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut seed.connection)
            .await
            .map_err(|err| failure("connect", "", &seed.shown, &err))?;
        let masters = masters_of(&slots, url).map_err(|problem| {
            StoreError::new(
                "connect",
                "",
                false,
                format!(
                    "CLUSTER SLOTS on {} gave an answer that cannot be read ({problem}); is it a \
                     Redis Cluster node? REDIS_CLUSTER_NODES names cluster nodes only",
                    seed.shown
                ),
            )
        })?;
        if masters.is_empty() {
            return Err(StoreError::new(
                "connect",
                "",
                true,
                format!(
                    "{} serves no slot: the cluster is not set up (run `redis-cli --cluster create`)",
                    seed.shown
                ),
            ));
        }
        return Ok(Servers::Cluster {
            shown,
            seed_url: url.clone(),
            masters,
            tls: tls.clone(),
        });
    }
    Err(StoreError::new(
        "connect",
        "",
        true,
        format!(
            "no node of REDIS_CLUSTER_NODES answered: {}",
            problems.join("; ")
        ),
    ))
}

/// The masters in a `CLUSTER SLOTS` reply, each with its slot ranges and
/// a URL like `seed_url` (scheme, credentials, database) at its address.
fn masters_of(slots: &Value, seed_url: &str) -> Result<Vec<Master>, String> {
    let Value::Array(ranges) = slots else {
        return Err("not an array".into());
    };
    let mut masters: Vec<Master> = Vec::new();
    for range in ranges {
        let Value::Array(fields) = range else {
            return Err("a range is not an array".into());
        };
        let (Some(from), Some(to), Some(Value::Array(node))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return Err("a range has no master".into());
        };
        let (from, to) = (slot_number(from)?, slot_number(to)?);
        let host = match node.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            _ => return Err("a master has no address".into()),
        };
        let port = match node.get(1) {
            Some(Value::Int(port)) => u16::try_from(*port).map_err(|_| "a bad port")?,
            _ => return Err("a master has no port".into()),
        };
        let url = at_address(seed_url, &host, port);
        match masters.iter_mut().find(|master| master.url == url) {
            Some(master) => master.slots.push((from, to)),
            None => masters.push(Master {
                url,
                slots: vec![(from, to)],
            }),
        }
    }
    Ok(masters)
}

fn slot_number(value: &Value) -> Result<u16, String> {
    match value {
        Value::Int(n) => u16::try_from(*n).map_err(|_| format!("slot {n} out of range")),
        other => Err(format!("a slot is {other:?}")),
    }
}

/// `url` with its host and port replaced: `scheme://[userinfo@]host:port[/db]`.
/// An empty `host` (a node that does not know its own address) keeps the
/// seed's host.
fn at_address(url: &str, host: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let (userinfo, address) = match authority.rsplit_once('@') {
        Some((userinfo, address)) => (format!("{userinfo}@"), address),
        None => (String::new(), authority),
    };
    let host = if host.is_empty() {
        // The seed's host: `[v6]:port` or `name:port`.
        match address.rsplit_once(':') {
            Some((host, _)) => host.to_owned(),
            None => address.to_owned(),
        }
    } else if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    format!("{scheme}://{userinfo}{host}:{port}{tail}")
}

/// A connection to the server at `url`, with `tls`'s files.
async fn open(url: &str, tls: &TlsFiles) -> Result<Server, StoreError> {
    let client =
        client_for(url, tls).map_err(|message| StoreError::new("connect", "", false, message))?;
    let shown = format!("Redis at {}", redact_url(url));
    let connection = client
        .get_multiplexed_async_connection_with_config(&timeouts())
        .await
        .map_err(|err| failure("connect", "", &shown, &err))?;
    Ok(Server { shown, connection })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_url_keeps_the_seeds_scheme_credentials_and_database() {
        let seed = "rediss://user:pw@node-a:7000/0";
        assert_eq!(
            at_address(seed, "10.0.0.2", 7001),
            "rediss://user:pw@10.0.0.2:7001/0"
        );
        assert_eq!(
            at_address("redis://127.0.0.1:7000", "::1", 7002),
            "redis://[::1]:7002"
        );
        // A node that does not know its address: the seed's host.
        assert_eq!(
            at_address("redis://:pw@[::1]:7000", "", 7003),
            "redis://:pw@[::1]:7003"
        );
    }

    #[test]
    fn cluster_slots_give_each_master_once_with_all_its_ranges() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |from: i64, to: i64, master: Value| {
            Value::Array(vec![Value::Int(from), Value::Int(to), master])
        };
        let slots = Value::Array(vec![
            range(0, 5460, node("127.0.0.1", 7000)),
            range(5461, 10922, node("127.0.0.1", 7001)),
            range(10923, 16383, node("127.0.0.1", 7000)),
        ]);
        let masters = masters_of(&slots, "redis://127.0.0.1:7000")
            .unwrap_or_else(|err| panic!("a well-formed reply: {err}"));
        assert_eq!(masters.len(), 2);
        assert_eq!(masters[0].url, "redis://127.0.0.1:7000");
        assert_eq!(masters[0].slots, [(0, 5460), (10923, 16383)]);
        assert_eq!(masters[1].url, "redis://127.0.0.1:7001");
        assert!(masters_of(&Value::Nil, "redis://127.0.0.1:7000").is_err());
    }
}
