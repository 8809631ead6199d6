//! Which Redis a configuration names: standalone, Sentinel or a cluster.

use crate::error::{redact_nodes, redact_url};

/// Which Redis a [`Config`] names, from [`Config::redis`]. Only a
/// standalone server comes with a URL to open a plain connection on: a
/// Sentinel URL must be resolved to the master first
/// ([`store::sentinel_master_url`](crate::store::sentinel_master_url)), and
/// a cluster is reached through its nodes. `Debug` hides the passwords.
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
