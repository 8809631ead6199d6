//! Connecting: [`RedisStore::connect`] and its shorter forms, and the one
//! place a `redis::Client` is built from a URL and TLS files.
//!
//! ```no_run
//! use amqp_idempotency::{Config, store::RedisStore};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::connect(&Config::from_env()?).await?;
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use redis::RedisError;
use tokio::sync::mpsc;

use super::link::{Link, Source, serve};
use super::native::Cas;
use super::replication::Replication;
use super::wire::Wire;
use super::{RedisStore, Stats};
use crate::config::{Config, RedisDeployment, SentinelUrl, is_sentinel_url};
use crate::error::{StoreError, redact_url};
use crate::tls::{self, Side, TlsFiles};

impl RedisStore {
    /// Connects to the Redis that `config` names, with all of its Redis
    /// settings: a Redis Cluster when it has seed nodes
    /// ([`Config::redis_cluster_nodes`], `REDIS_CLUSTER_NODES`), else its URL
    /// ([`Config::redis_url`], `REDIS_URL`: a standalone server, or the
    /// master Sentinel names for `redis-sentinel://`); for `rediss://`, its
    /// TLS files ([`Config::redis_tls_ca_file`]: `REDIS_TLS_CA_FILE`,
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
        let url = match config.redis_deployment() {
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
            let first = link
                .connect()
                .await
                .map_err(|failure| StoreError::new("connect", "", true, failure.message))?;
            return Ok(Self::start(link, Some(first), cas));
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
        let first = link
            .connect()
            .await
            .map_err(|failure| StoreError::new("connect", "", true, failure.message))?;
        Ok(Self::start(link, Some(first), cas))
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
        Self::connect(&Config::default().with_redis_url(url)).await
    }

    /// A store on `client` that connects on its first request. Must be
    /// called within a Tokio runtime: it starts the writer task. Like
    /// [`connect_url`](Self::connect_url), it takes no other setting (no
    /// replicas to wait for, and for `rediss://` the platform's trusted
    /// roots); [`connect`](Self::connect) takes a `Config`.
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
            None,
            cas,
        )
    }

    /// The store whose writer task serves `link`, starting on `first`.
    fn start(link: Link, first: Option<Wire>, cas: Arc<Cas>) -> Self {
        let stats = Arc::new(Stats::default());
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(serve(link, first, queue, Arc::clone(&stats)));
        Self {
            requests,
            cluster: false,
            stats,
            cas,
        }
    }
}

/// The client for `url` with `files`, or a message saying what is wrong.
pub(crate) fn client_for(url: &str, files: &TlsFiles) -> Result<redis::Client, String> {
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
    match tls_certificates(files)? {
        Some(certificates) => redis::Client::build_with_tls(url, certificates).map_err(invalid),
        None => redis::Client::open(url).map_err(invalid),
    }
}

/// The TLS material of a `rediss://` connection, standalone or cluster:
/// the CA and client identity from `files`, read now (so a renewed
/// certificate is used from the next connection on); `None` when no file
/// is set and the platform's trusted roots apply. Installs the process's
/// TLS provider first, which every TLS client needs.
pub(super) fn tls_certificates(files: &TlsFiles) -> Result<Option<redis::TlsCertificates>, String> {
    tls::ensure_process_provider();
    if files.is_empty() {
        return Ok(None);
    }
    let material = files.load(Side::Redis).map_err(|err| err.to_string())?;
    Ok(Some(redis::TlsCertificates {
        client_tls: material.identity.map(|identity| redis::ClientTlsConfig {
            client_cert: identity.cert_pem,
            client_key: identity.key_pem,
        }),
        root_cert: material.ca_pem,
    }))
}

/// The rustls settings of a `rediss://` connection of the writer's own:
/// the CA and client identity from `files`, read now (so a renewed
/// certificate is used from the next connection on), or the platform's
/// trusted roots.
pub(super) fn tls_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, String> {
    let material = files.load(Side::Redis).map_err(|err| err.to_string())?;
    tls::client_config(Side::Redis, material)
        .map(Arc::new)
        .map_err(|err| err.to_string())
}

/// The host of `url`, for error messages about its certificate.
pub(super) fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_owned))
        .unwrap_or_default()
}
