//! Which Redis a configuration names: standalone, Sentinel or a cluster.

use crate::error::{redact_nodes, redact_url};
use crate::tls::TlsFiles;

/// Which Redis a [`Config`](super::Config) names, from
/// [`Config::redis_url`](super::Config::redis_url) and
/// [`Config::redis_cluster_nodes`](super::Config::redis_cluster_nodes). Only a
/// standalone server comes with a URL to open a plain connection on: a
/// Sentinel URL names the sentinels that know the master, and a cluster is
/// reached through its nodes ([`RedisStore::connect`](crate::store::RedisStore::connect)
/// and [`Records::connect`](crate::records::Records::connect) reach each kind). `Debug` hides the passwords.
#[derive(Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisDeployment<'a> {
    /// One server (a standalone Redis or Valkey, or a primary) at this
    /// `redis://` or `rediss://` URL (`REDIS_URL`).
    Standalone(&'a str),
    /// The master that Redis Sentinel names, from this
    /// `redis-sentinel://` or `rediss-sentinel://` URL (`REDIS_URL`).
    Sentinel(&'a str),
    /// A Redis Cluster, from these seed nodes (`REDIS_CLUSTER_NODES`).
    Cluster(&'a [String]),
}

impl<'a> RedisDeployment<'a> {
    /// The URL of a standalone server; `None` for Sentinel or a cluster,
    /// whose URLs are not a server to connect to directly.
    pub fn standalone_url(&self) -> Option<&'a str> {
        match *self {
            Self::Standalone(url) => Some(url),
            Self::Sentinel(_) | Self::Cluster(_) => None,
        }
    }
}

impl std::fmt::Display for RedisDeployment<'_> {
    /// What to show in a message: the URL or the nodes, passwords hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standalone(url) => write!(f, "Redis at {}", redact_url(url)),
            Self::Sentinel(url) => write!(f, "Redis through Sentinel at {}", redact_url(url)),
            Self::Cluster(nodes) => {
                write!(f, "the Redis Cluster of {}", redact_nodes(&nodes.join(",")))
            }
        }
    }
}

impl std::fmt::Debug for RedisDeployment<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standalone(url) => f.debug_tuple("Standalone").field(&redact_url(url)).finish(),
            Self::Sentinel(url) => f.debug_tuple("Sentinel").field(&redact_url(url)).finish(),
            Self::Cluster(nodes) => f
                .debug_tuple("Cluster")
                .field(
                    &nodes
                        .iter()
                        .map(|node| redact_url(node))
                        .collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
}

/// True for a `redis-sentinel://` or `rediss-sentinel://` URL.
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("redis-sentinel://") || url.starts_with("rediss-sentinel://")
}

/// A `redis-sentinel://` URL, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SentinelUrl {
    /// `redis://host:port` (or `rediss://`) of each sentinel.
    pub(crate) sentinels: Vec<String>,
    /// The monitored master's name.
    pub(crate) master: String,
    /// `user:password@` for the master, or "".
    pub(crate) userinfo: String,
    /// `/db`, or "".
    pub(crate) db: String,
    pub(crate) tls: bool,
    pub(crate) tls_files: TlsFiles,
}

impl SentinelUrl {
    /// Parses `redis-sentinel://[user:password@]host:port[,host:port...][/db]#master`
    /// (`rediss-sentinel://` for TLS); the message says what is wrong.
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let shown = redact_url(url);
        let expected = "expected redis-sentinel://[user:password@]host:port[,host:port...][/db]#master-name \
                        (rediss-sentinel:// for TLS); set REDIS_URL";
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis-sentinel://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("rediss-sentinel://") {
            (true, rest)
        } else {
            return Err(format!("`{shown}` is not a Sentinel URL; {expected}"));
        };
        // Credentials end at the last `@` (a password may hold `#`); the
        // master's name follows the first `#` after them.
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (format!("{userinfo}@"), rest),
            None => (String::new(), rest),
        };
        let (hosts, master) = rest
            .split_once('#')
            .filter(|(_, master)| !master.is_empty())
            .ok_or_else(|| format!("`{shown}` names no master after `#`; {expected}"))?;
        let (hosts, db) = match hosts.split_once('/') {
            Some((hosts, "")) => (hosts, String::new()),
            Some((hosts, db)) if db.parse::<u16>().is_ok() => (hosts, format!("/{db}")),
            Some(_) => {
                return Err(format!(
                    "`{shown}` has a database that is not a number; {expected}"
                ));
            }
            None => (hosts, String::new()),
        };
        let scheme = if tls { "rediss" } else { "redis" };
        let mut sentinels = Vec::new();
        for host in hosts
            .split(',')
            .map(str::trim)
            .filter(|host| !host.is_empty())
        {
            let has_port = host
                .rsplit_once(':')
                .is_some_and(|(name, port)| !name.ends_with(':') && port.parse::<u16>().is_ok())
                && !host.ends_with(']');
            let sentinel = if has_port {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}:26379")
            };
            redis::IntoConnectionInfo::into_connection_info(sentinel.as_str()).map_err(|err| {
                format!("`{host}` in `{shown}` is not a host:port ({err}); {expected}")
            })?;
            sentinels.push(sentinel);
        }
        if sentinels.is_empty() {
            return Err(format!("`{shown}` names no sentinel; {expected}"));
        }
        Ok(Self {
            sentinels,
            master: master.to_owned(),
            userinfo,
            db,
            tls,
            tls_files: TlsFiles::default(),
        })
    }

    /// The URL of the master at `host:port`, with the credentials and database.
    pub(crate) fn master_url(&self, host: &str, port: u16) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        format!("{scheme}://{}{host}:{port}{}", self.userinfo, self.db)
    }
}
