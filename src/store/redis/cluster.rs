//! Redis Cluster: the cluster client's connection, the slot map
//! (`CLUSTER SLOTS`), one plain connection per master, and a batch sent as
//! one pipeline per master, with redirected requests sent again alone
//! through redis-rs's cluster client, which follows the redirection.
//!
//! ```ignore
//! let store = RedisStore::cluster(&nodes, &tls, Replication::default()).await?;
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, RedisError, RedisResult, Value};
use tokio::sync::{Mutex, mpsc};

use super::connect::{tls_certificates, tls_config};
use super::errors::{Failure, breaks_connection, failure};
use super::native::Cas;
use super::pipeline::{Packed, alone};
use super::replication::Replication;
use super::scripts::{Keys, LUA_SCRIPTS, transitions_call};
use super::wire::Wire;
use super::{Kind, MAX_BATCH, MAX_IN_FLIGHT, RedisStore, Request, Stats};
use crate::batch::send_in_batches;
use crate::error::{StoreError, redact_url};
use crate::tls::{Side, TlsFiles};

/// The cluster client's connection, made again after it failed.
impl RedisStore {
    /// A store on the cluster that seed `nodes` belong to, its writer
    /// sending a pipeline per master.
    pub(super) async fn cluster(
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
}

/// A master's connection, while there is one.
pub(super) struct Node(Mutex<Option<Wire>>);

pub(super) struct ClusterLink {
    client: redis::cluster::ClusterClient,
    replication: Replication,
    /// Which master serves which slots (`CLUSTER SLOTS`), learnt again
    /// after a redirection or a failed pipeline.
    slots: std::sync::Mutex<Option<Arc<SlotMap>>>,
    /// The first seed URL: the scheme and credentials for every node.
    seed: String,
    tls: TlsFiles,
    /// A connection of our own to each master the pipelines go to (see
    /// `wire`): a redirect comes back as an answer there, never followed
    /// behind our back. One pipeline at a time on each.
    direct: Mutex<std::collections::HashMap<(String, u16), Arc<Node>>>,
    shown: String,
    current: Mutex<Option<ClusterConnection>>,
    cas: Arc<Cas>,
}

impl ClusterLink {
    pub(super) async fn get(&self) -> Result<ClusterConnection, Failure> {
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

    pub(super) async fn discard(&self) {
        *self.current.lock().await = None;
    }

    pub(super) async fn query(&self, cmd: &Cmd, write: bool) -> Result<Value, Failure> {
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

/// The masters of a cluster by slot range: `(first, last, host, port)`.
pub(super) struct SlotMap(Vec<(u16, u16, String, u16)>);

impl SlotMap {
    /// Parses a `CLUSTER SLOTS` reply (masters only; a range whose master
    /// has no usable address is left out: its requests travel alone).
    pub(super) fn parse(reply: &Value) -> Option<Self> {
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

    pub(super) fn node(&self, slot: u16) -> Option<(&str, u16)> {
        self.0
            .iter()
            .find(|(first, last, ..)| (*first..=*last).contains(&slot))
            .map(|(_, _, host, port)| (host.as_str(), *port))
    }
}

impl ClusterLink {
    /// The slot map, asked for when unknown; `None` when the cluster does
    /// not answer (requests then travel alone, routed by the client).
    pub(super) async fn slot_map(&self) -> Option<Arc<SlotMap>> {
        if let Some(map) = self.slots.lock().ok()?.as_ref() {
            return Some(Arc::clone(map));
        }
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        let map = Arc::new(SlotMap::parse(&self.query(&slots, false).await.ok()?)?);
        *self.slots.lock().ok()? = Some(Arc::clone(&map));
        Some(map)
    }

    /// The connection to the master at `host:port` (made when first
    /// used).
    pub(super) async fn node(&self, host: &str, port: u16) -> Arc<Node> {
        let mut direct = self.direct.lock().await;
        Arc::clone(
            direct
                .entry((host.to_owned(), port))
                .or_insert_with(|| Arc::new(Node(Mutex::new(None)))),
        )
    }

    /// A new connection to the master at `host:port`, with the seed URL's
    /// scheme and credentials.
    async fn connect_node(&self, host: &str, port: u16) -> Result<Wire, Failure> {
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
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|err| unavailable(err.to_string()))?;
        let tls = match Side::Redis.is_tls_url(url.as_str()) {
            true => Some(tls_config(&self.tls).map_err(unavailable)?),
            false => None,
        };
        Wire::connect(&info, tls, RedisStore::RESPONSE_TIMEOUT)
            .await
            .map_err(|err| unavailable(failure(err).message))
    }

    /// Sends `bytes` (`count` commands) to the master at `host:port` and
    /// reads their replies: one pipeline at a time on its connection, which
    /// is made when missing and dropped when it fails.
    async fn exchange(
        &self,
        host: &str,
        port: u16,
        bytes: &[u8],
        count: usize,
    ) -> Result<Vec<Value>, Failure> {
        let node = self.node(host, port).await;
        let mut wire = node.0.lock().await;
        let connected = match wire.as_mut() {
            Some(connected) => connected,
            None => wire.insert(self.connect_node(host, port).await?),
        };
        let limit = RedisStore::RESPONSE_TIMEOUT + self.replication.timeout;
        match tokio::time::timeout(limit, connected.exchange(bytes, count)).await {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(err)) => {
                *wire = None;
                Err(failure(err))
            }
            Err(_) => {
                *wire = None;
                Err(Failure::unavailable(format!(
                    "the Redis Cluster node {host}:{port} did not answer within {limit:?}"
                )))
            }
        }
    }

    /// Forgets the slot map after a redirection or a failed node.
    pub(super) fn forget_slots(&self) {
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
pub(super) async fn send_cluster_batch(
    link: Arc<ClusterLink>,
    batch: Vec<Request>,
    stats: Arc<Stats>,
) {
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

/// One request through the cluster client's own routing (a transition as
/// a script call of its own, over its one key).
pub(super) async fn send_alone(
    link: &ClusterLink,
    request: &Request,
    stats: &Stats,
) -> Result<Value, Failure> {
    stats.round_trips.fetch_add(1, Ordering::Relaxed);
    stats.commands.fetch_add(1, Ordering::Relaxed);
    let single;
    let cmd = if request.kind == Kind::Transition {
        single = transitions_call(std::iter::once(&request.cmd), Keys::Declared);
        &single
    } else {
        &request.cmd
    };
    let write = request.kind != Kind::Read;
    let answer = match link.query(cmd, write).await {
        Err(failure) if failure.noscript => {
            // A node restarted, or a new master after a failover: load the
            // script everywhere and try again.
            for script in LUA_SCRIPTS {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(script);
                link.query(&load, false).await?;
            }
            link.query(cmd, write).await
        }
        other => other,
    }?;
    if request.kind == Kind::Transition {
        return alone(Ok(answer)).map_err(failure);
    }
    Ok(answer)
}

/// True when `err` says the request did not run on that node because its
/// key is served elsewhere now, or not at the moment (a reshard, a
/// failover), or the node lost the script: alone, through the cluster
/// client, it follows the redirection (or loads the script).
fn redirected(err: &RedisError) -> bool {
    if matches!(
        err.code(),
        Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "READONLY" | "NOSCRIPT")
    ) {
        return true;
    }
    // A key of the script call that this node does not serve (any more).
    let text = err.to_string();
    text.contains("non local key") || text.contains("cluster is down")
}

/// The requests whose keys `host:port` serves, as one pipeline on a plain
/// connection to that master, their transitions as one script call.
pub(super) async fn send_to_node(
    link: Arc<ClusterLink>,
    host: String,
    port: u16,
    requests: Vec<Request>,
    stats: Arc<Stats>,
) {
    let packed = Packed::new(requests, Keys::Undeclared);
    let wait = link.replication.wait().filter(|_| packed.writes);
    let mut bytes = Vec::with_capacity(256 * packed.len());
    for command in packed.commands().chain(wait.as_ref()) {
        command.write_packed_command(&mut bytes);
    }
    let expected = packed.len() + usize::from(wait.is_some());
    stats.round_trips.fetch_add(1, Ordering::Relaxed);
    stats.commands.fetch_add(expected as u64, Ordering::Relaxed);
    let mut answers: Vec<RedisResult<Value>> =
        match link.exchange(&host, port, &bytes, expected).await {
            Ok(replies) => replies
                .into_iter()
                .map(|reply| match reply {
                    Value::ServerError(err) => Err(RedisError::from(err)),
                    reply => Ok(reply),
                })
                .collect(),
            Err(_) => {
                // The node failed (a failover under way?): forget the map,
                // and let the client route each request.
                link.forget_slots();
                send_each_alone(&link, packed.into_requests().collect(), &stats).await;
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
    packed.answer(
        answers,
        shortfall.as_ref(),
        |request, answer| match answer {
            Err(err) if redirected(&err) => {
                if err.code() != Some("NOSCRIPT") {
                    link.forget_slots();
                }
                moved.push(request);
            }
            answer => {
                let _ = request.reply.send(answer.map_err(failure));
            }
        },
    );
    send_each_alone(&link, moved, &stats).await;
}

/// Sends `requests` each alone, at once, and answers each.
async fn send_each_alone(link: &ClusterLink, requests: Vec<Request>, stats: &Stats) {
    let resent = requests.into_iter().map(|request| async move {
        let answer = send_alone(link, &request, stats).await;
        let _ = request.reply.send(answer);
    });
    futures_util::future::join_all(resent).await;
}

/// The cluster client for seed `nodes`, with TLS for `rediss://` as
/// `files` say, or a message saying what is wrong.
pub(super) fn cluster_client(
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
    if tls_urls != 0
        && let Some(certificates) = tls_certificates(files)?
    {
        builder = builder.certs(certificates);
    }
    builder
        .build()
        .map_err(|err| format!("cannot use REDIS_CLUSTER_NODES `{}`: {err}", shown()))
}
