//! The Redis server(s) a run uses, each on a plain admin connection: one
//! standalone server (`REDIS_URL`), or the nodes of a cluster
//! (`REDIS_CLUSTER_NODES`). `INFO` counters summed over them, the local
//! process of each (for `--pin-redis`), and deleting keys.

use std::collections::HashSet;

use amqp_idempotency::redact_url;
use harness::CONNECT_TIMEOUT;
use harness::redis_admin::{redis_commands, redis_cpu_s, unlink_prefix};
use redis::aio::MultiplexedConnection;

use crate::run::REDIS_HINT;

/// One Redis server.
pub struct Node {
    /// Its URL, password hidden.
    pub shown: String,
    /// The TCP port of its URL (`None` for a Unix socket).
    pub port: Option<u16>,
    pub conn: MultiplexedConnection,
    /// A master (`INFO replication` `role:master`); replicas count for
    /// CPU only, not for commands or memory.
    pub master: bool,
}

/// The servers of the store the run uses.
pub struct Servers {
    pub cluster: bool,
    pub nodes: Vec<Node>,
}

/// The value of `name` in the text of an `INFO` reply.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

async fn info(conn: &mut MultiplexedConnection, section: &str) -> Result<String, String> {
    redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .map_err(|err| format!("INFO {section} failed: {err}"))
}

impl Servers {
    /// Connects to `REDIS_URL` (`cluster_nodes` `None`), or to every node
    /// of `REDIS_CLUSTER_NODES`, each of which must run in cluster mode.
    pub async fn connect(
        redis_url: &str,
        cluster_nodes: Option<&[String]>,
    ) -> Result<Self, String> {
        let cluster = cluster_nodes.is_some();
        let urls = cluster_nodes.map_or_else(|| vec![redis_url.to_owned()], <[String]>::to_vec);
        let mut nodes = Vec::new();
        let mut run_ids = HashSet::new();
        for url in &urls {
            let shown = redact_url(url);
            let variable = if cluster {
                "REDIS_CLUSTER_NODES"
            } else {
                "REDIS_URL"
            };
            let client = redis::Client::open(url.as_str())
                .map_err(|err| format!("{variable}: `{shown}` is not a valid Redis URL: {err}"))?;
            let port = match &client.get_connection_info().addr() {
                redis::ConnectionAddr::Tcp(_, port)
                | redis::ConnectionAddr::TcpTls { port, .. } => Some(*port),
                _ => None,
            };
            let fail = |err: String| format!("cannot reach Redis at {shown}: {REDIS_HINT} ({err})");
            let mut conn =
                tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| fail(format!("no answer within {CONNECT_TIMEOUT:?}")))?
                    .map_err(|err| fail(err.to_string()))?;
            let server = info(&mut conn, "server")
                .await
                .map_err(|err| format!("{shown}: {err}"))?;
            let mode = info_field(&server, "redis_mode").unwrap_or("standalone");
            if cluster && mode != "cluster" {
                return Err(format!(
                    "REDIS_CLUSTER_NODES names {shown}, which runs in {mode} mode, not as a cluster node"
                ));
            }
            if let Some(run_id) = info_field(&server, "run_id")
                && !run_ids.insert(run_id.to_owned())
            {
                eprintln!(
                    "bench: {shown} is a server named twice in REDIS_CLUSTER_NODES; counted once"
                );
                continue;
            }
            let replication = info(&mut conn, "replication")
                .await
                .map_err(|err| format!("{shown}: {err}"))?;
            let master = info_field(&replication, "role").is_none_or(|role| role == "master");
            nodes.push(Node {
                shown,
                port,
                conn,
                master,
            });
        }
        if !nodes.iter().any(|node| node.master) {
            return Err("REDIS_CLUSTER_NODES names no master, only replicas".into());
        }
        Ok(Self { cluster, nodes })
    }

    pub fn kind(&self) -> &'static str {
        if self.cluster {
            "cluster"
        } else {
            "standalone"
        }
    }

    pub fn masters(&self) -> u64 {
        self.nodes.iter().filter(|node| node.master).count() as u64
    }

    fn masters_mut(&mut self) -> impl Iterator<Item = &mut Node> {
        self.nodes.iter_mut().filter(|node| node.master)
    }

    /// Commands run so far (`INFO commandstats`), summed over the masters.
    pub async fn commands(&mut self) -> Result<u64, String> {
        let mut total = 0;
        for node in self.masters_mut() {
            total += redis_commands(&mut node.conn)
                .await
                .map_err(|err| format!("{}: {err}", node.shown))?;
        }
        Ok(total)
    }

    /// Server CPU so far (`INFO cpu`), seconds, summed over every node
    /// (replicas too: replaying the writes is part of the cost); `None`
    /// when a node does not say.
    pub async fn cpu_s(&mut self) -> Option<f64> {
        let mut total = 0.0;
        for node in &mut self.nodes {
            total += redis_cpu_s(&mut node.conn).await?;
        }
        Some(total)
    }

    /// `INFO memory` `used_memory`, bytes, summed over the masters.
    pub async fn used_memory(&mut self) -> Result<u64, String> {
        let mut total = 0;
        for node in self.masters_mut() {
            let memory = info(&mut node.conn, "memory")
                .await
                .map_err(|err| format!("{}: {err}", node.shown))?;
            total += info_field(&memory, "used_memory")
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("{}: INFO memory has no used_memory", node.shown))?;
        }
        Ok(total)
    }

    /// The process id of `node`'s server, if that server runs on this
    /// machine: `INFO server` `process_id` names a `redis-server` or
    /// `valkey-server` process here, and its `tcp_port` is the URL's.
    pub async fn local_pid(node: &mut Node) -> Result<u32, String> {
        let server = info(&mut node.conn, "server")
            .await
            .map_err(|err| format!("{}: {err}", node.shown))?;
        let pid: u32 = info_field(&server, "process_id")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{}: INFO server has no process_id", node.shown))?;
        let tcp_port: Option<u16> = info_field(&server, "tcp_port").and_then(|v| v.parse().ok());
        let not_local = |why: String| {
            format!(
                "--pin-redis needs a local Redis: {} {why}; run the benchmark on the Redis host, or without --pin-redis",
                node.shown
            )
        };
        if let (Some(url_port), Some(tcp_port)) = (node.port, tcp_port)
            && url_port != tcp_port
        {
            return Err(not_local(format!(
                "listens on port {tcp_port}, not on its URL's port {url_port} (a proxy, a container, another host?)"
            )));
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm != "redis-server" && comm != "valkey-server" {
            return Err(not_local(format!(
                "reports process id {pid}, and no redis-server or valkey-server runs with that id on this machine{}",
                if comm.is_empty() {
                    String::new()
                } else {
                    format!(" (it is `{comm}`)")
                }
            )));
        }
        Ok(pid)
    }

    /// Deletes the keys that start with `prefix`, on every master.
    pub async fn unlink_prefix(&mut self, prefix: &str) -> Result<u64, String> {
        let cluster = self.cluster;
        let mut removed = 0;
        for node in self.masters_mut() {
            removed += if cluster {
                scan_unlink(&mut node.conn, &format!("{prefix}*"), |_| true).await
            } else {
                unlink_prefix(&mut node.conn, prefix).await
            }
            .map_err(|err| format!("{}: {err}", node.shown))?;
        }
        Ok(removed)
    }

    /// Deletes exactly `keys`, all of which start with `common_prefix`
    /// (on a cluster, each master is scanned for them, since a key's slot
    /// decides its node). Returns how many existed.
    pub async fn unlink_keys(
        &mut self,
        keys: &[String],
        common_prefix: &str,
    ) -> Result<u64, String> {
        let mut removed = 0;
        if self.cluster {
            let wanted: HashSet<&str> = keys.iter().map(String::as_str).collect();
            let pattern = format!("{common_prefix}*");
            for node in self.masters_mut() {
                removed += scan_unlink(&mut node.conn, &pattern, |key| wanted.contains(key))
                    .await
                    .map_err(|err| format!("{}: {err}", node.shown))?;
            }
        } else {
            let node = &mut self.nodes[0];
            for chunk in keys.chunks(1000) {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(chunk)
                    .query_async(&mut node.conn)
                    .await
                    .map_err(|err| format!("{}: UNLINK failed: {err}", node.shown))?;
                removed += n;
            }
        }
        Ok(removed)
    }
}

/// SCAN MATCH `pattern` on one node, and UNLINK the keys `keep` accepts,
/// one key per command (the keys of one node may lie in different slots).
async fn scan_unlink(
    conn: &mut MultiplexedConnection,
    pattern: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<u64, String> {
    let mut cursor = 0_u64;
    let mut removed = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(|err| format!("SCAN {pattern} failed: {err}"))?;
        let mut pipe = redis::pipe();
        let mut any = false;
        for key in keys.iter().filter(|key| keep(key)) {
            pipe.cmd("UNLINK").arg(key);
            any = true;
        }
        if any {
            let counts: Vec<u64> = pipe
                .query_async(conn)
                .await
                .map_err(|err| format!("UNLINK failed: {err}"))?;
            removed += counts.iter().sum::<u64>();
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}
