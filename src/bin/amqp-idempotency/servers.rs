//! Reaching Redis the way the library does, for each deployment the
//! configuration names: a standalone server (`rediss://` with the
//! `REDIS_TLS_*` files), the master Sentinel names, or every master of a
//! cluster. Each connection is a plain one from
//! [`redis_client`](amqp_idempotency::store::redis_client), so TLS is set up
//! by the library, once.

use std::time::Duration;

use amqp_idempotency::store::{redis_client, sentinel_master_url};
use amqp_idempotency::{Config, RedisDeployment, redact_url};
use redis::{Connection, RedisError, Value};

use crate::Failure;
use crate::settings::Settings;

const START_REDIS: &str = "redis-server --daemonize yes --port 6379";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One Redis server and a connection to it.
pub(crate) struct Server {
    /// Its URL, password hidden, for messages.
    pub(crate) shown: String,
    pub(crate) connection: Connection,
}

/// The servers that hold the records.
pub(crate) enum Servers {
    /// A standalone server, or the master Sentinel named.
    One(Server),
    /// A cluster.
    Cluster(Box<Cluster>),
}

/// A cluster: a connection to a seed node, and each master with the slots
/// it serves.
pub(crate) struct Cluster {
    seed: Server,
    seed_url: String,
    masters: Vec<Master>,
    config: Config,
}

/// A master of a cluster.
pub(crate) struct Master {
    url: String,
    /// Inclusive slot ranges.
    slots: Vec<(u16, u16)>,
}

impl Servers {
    /// Connects as `settings.config` says, with timeouts; a failure says
    /// what to do.
    pub(crate) fn connect(settings: &Settings) -> Result<Self, Failure> {
        let config = &settings.config;
        match config.redis_deployment() {
            RedisDeployment::Cluster(nodes) => cluster(config, nodes),
            RedisDeployment::Sentinel(url) => {
                // Through Sentinel: the master it names now.
                let master = sentinel_master_url(url, CONNECT_TIMEOUT)
                    .map_err(|err| Failure::Redis(err.to_string()))?
                    .ok_or_else(|| {
                        Failure::Usage(format!(
                            "`{}` is not a Sentinel URL; set REDIS_URL to \
                             redis-sentinel://host:port[,host:port...]#master",
                            redact_url(url)
                        ))
                    })?;
                Ok(Self::One(open(
                    config,
                    &master,
                    "REDIS_URL (through Sentinel)",
                )?))
            }
            RedisDeployment::Standalone(url) => {
                let source = if settings.url_flag {
                    "--redis-url"
                } else {
                    "REDIS_URL"
                };
                Ok(Self::One(open(config, url, source)?))
            }
            other => Err(Failure::Usage(format!(
                "{other} is a kind of deployment this amqp-idempotency CLI cannot reach; use \
                 REDIS_URL or REDIS_CLUSTER_NODES"
            ))),
        }
    }

    /// What the records live on, for messages: `Redis at <url>` or the
    /// cluster's nodes.
    pub(crate) fn shown(&self) -> String {
        match self {
            Self::One(server) => server.shown.clone(),
            Self::Cluster(cluster) => cluster.config.redis_deployment().to_string(),
        }
    }

    /// The server that holds `key`: the only one, or the master serving
    /// its slot (`CLUSTER KEYSLOT` on the seed node).
    pub(crate) fn for_key(self, key: &str) -> Result<Server, Failure> {
        match self {
            Self::One(server) => Ok(server),
            Self::Cluster(cluster) => {
                let Cluster {
                    mut seed,
                    seed_url,
                    masters,
                    config,
                } = *cluster;
                let slot: u16 = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query(&mut seed.connection)
                    .map_err(|err| redis_failure(&seed.shown, &err))?;
                let master = masters
                    .iter()
                    .find(|master| {
                        master
                            .slots
                            .iter()
                            .any(|(from, to)| (*from..=*to).contains(&slot))
                    })
                    .ok_or_else(|| {
                        Failure::Redis(format!(
                            "no master of the cluster of {} serves slot {slot} (of `{key}`): \
                             the cluster is not ready; check `redis-cli --cluster check`",
                            seed.shown
                        ))
                    })?;
                open(&config, &master.url, "REDIS_CLUSTER_NODES")
                    .map_err(|failure| from_seed(failure, &seed_url))
            }
        }
    }

    /// Every server whose keys count: the only one, or each master.
    pub(crate) fn masters(self) -> Result<Vec<Server>, Failure> {
        match self {
            Self::One(server) => Ok(vec![server]),
            Self::Cluster(cluster) => cluster
                .masters
                .iter()
                .map(|master| {
                    open(&cluster.config, &master.url, "REDIS_CLUSTER_NODES")
                        .map_err(|failure| from_seed(failure, &cluster.seed_url))
                })
                .collect(),
        }
    }

    /// Whether keys of different slots must go in separate script calls.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

/// A master's URL is derived from a seed's: say so when it fails.
fn from_seed(failure: Failure, seed_url: &str) -> Failure {
    match failure {
        Failure::Redis(message) => Failure::Redis(format!(
            "{message} (a master the cluster announced, reached with the scheme and \
             credentials of {})",
            redact_url(seed_url)
        )),
        other => other,
    }
}

/// The first seed node that answers, and the masters it lists.
fn cluster(config: &Config, nodes: &[String]) -> Result<Servers, Failure> {
    let mut problems = Vec::new();
    for url in nodes {
        let mut seed = match open(config, url, "REDIS_CLUSTER_NODES") {
            Ok(seed) => seed,
            Err(Failure::Redis(message)) => {
                problems.push(message);
                continue;
            }
            Err(other) => return Err(other),
        };
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut seed.connection)
            .map_err(|err| redis_failure(&seed.shown, &err))?;
        let masters = masters_of(&slots, url).map_err(|problem| {
            Failure::Redis(format!(
                "CLUSTER SLOTS on {} gave an answer this CLI cannot read ({problem}); is it a \
                 Redis Cluster node? REDIS_CLUSTER_NODES names cluster nodes only",
                seed.shown
            ))
        })?;
        if masters.is_empty() {
            return Err(Failure::Redis(format!(
                "{} serves no slot: the cluster is not set up (run `redis-cli --cluster create`)",
                seed.shown
            )));
        }
        return Ok(Servers::Cluster(Box::new(Cluster {
            seed,
            seed_url: url.clone(),
            masters,
            config: config.clone(),
        })));
    }
    Err(Failure::Redis(format!(
        "no node of REDIS_CLUSTER_NODES answered: {}",
        problems.join("; ")
    )))
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

/// A connection to the server at `url` (set by `source`), with the
/// configuration's TLS files, built by the library's `redis_client`.
fn open(config: &Config, url: &str, source: &str) -> Result<Server, Failure> {
    let shown = redact_url(url);
    let mut one = Config::default().with_redis_url(url);
    if let Some(path) = config.redis_tls_ca_file() {
        one = one.with_redis_tls_ca_file(path);
    }
    if let Some(path) = config.redis_tls_cert_file() {
        one = one.with_redis_tls_cert_file(path);
    }
    if let Some(path) = config.redis_tls_key_file() {
        one = one.with_redis_tls_key_file(path);
    }
    let client = redis_client(&one).map_err(|err| {
        Failure::Usage(format!(
            "`{shown}` (from {source}) cannot be used: {err}; expected \
             redis://[[user]:password@]host[:port][/db], or rediss://... with REDIS_TLS_CA_FILE \
             for TLS"
        ))
    })?;
    let shown = format!("Redis at {shown}");
    let connection = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|err| redis_failure(&shown, &err))?;
    connection
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| connection.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|err| redis_failure(&shown, &err))?;
    Ok(Server { shown, connection })
}

/// `shown` is what failed, e.g. `Redis at redis://host:6379`.
pub(crate) fn redis_failure(shown: &str, err: &RedisError) -> Failure {
    if err.is_connection_refusal()
        || err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
    {
        Failure::Redis(format!(
            "cannot reach {shown}: {err}. Is it running? Start a local one with \
             `{START_REDIS}`, or point --redis-url (or REDIS_URL, or REDIS_CLUSTER_NODES) at a \
             running server; for rediss://, REDIS_TLS_CA_FILE names the CA that signed its \
             certificate."
        ))
    } else {
        Failure::Redis(format!(
            "{shown} answered with an error: {err}. Check the user, password and database in \
             the URL, and that this user may run the commands the README lists under \"Least \
             privilege\" (SCAN, EVALSHA, SCRIPT LOAD, TYPE, STRLEN, GETRANGE, PTTL, DEL; on a \
             cluster also CLUSTER SLOTS and CLUSTER KEYSLOT)."
        ))
    }
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
