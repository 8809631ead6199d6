//! Reading the records the consumers write, from code: look a message up,
//! count the records per state, forget one so that its next copy runs
//! again. The operator CLI is built on this module.
//!
//! ```no_run
//! use amqp_idempotency::Config;
//! use amqp_idempotency::records::{Records, State};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // REDIS_URL or REDIS_CLUSTER_NODES, REDIS_TLS_*, IDEMPOTENCY_KEY_PREFIX
//! let records = Records::connect(&Config::from_env()?).await?;
//! let key = records.key("orders", "order-42");
//! match records.get(&key).await? {
//!     None => println!("never claimed, expired or forgotten"),
//!     Some(record) => match record.state() {
//!         State::Done { .. } => println!("processed; {:?} left", record.ttl()),
//!         State::InProgress { attempt, .. } => println!("attempt {attempt} running"),
//!         State::Released { attempts, .. } => println!("{attempts} failed attempts"),
//!         other => println!("{other:?}"),
//!     },
//! }
//! let stats = records.stats(Some("orders")).await?;
//! println!("{} done of {}", stats.done, stats.total());
//! # Ok(())
//! # }
//! ```
//!
//! The files: `servers` (reaching a standalone server, the master Sentinel
//! names, or every master of a cluster), `lookup` (the script that reads,
//! or deletes, records with their outbox atomically), `view` ([`Record`],
//! [`State`], [`Stats`]); here, [`Records`] and `stats`'s `SCAN`.

mod lookup;
mod servers;
mod view;

use std::collections::HashSet;

use self::lookup::lookup;
use self::servers::{Servers, failure};
pub use self::view::{Record, State, Stats};
use crate::config::Config;
use crate::error::StoreError;
use crate::fingerprint::{PROBE_NAME, record_key};

/// Keys asked for per `SCAN` call.
const SCAN_COUNT: usize = 1000;

/// The records under one key prefix, on the Redis a [`Config`] names.
///
/// Reads go to the servers that hold each key (on a cluster, the master
/// that serves its slot); nothing here runs on the consumers' hot path.
#[derive(Debug)]
pub struct Records {
    servers: Servers,
    prefix: String,
}

impl Records {
    /// Connects to the Redis `config` names, as the consumers do:
    /// `REDIS_URL` (a standalone server, `rediss://` with the
    /// `REDIS_TLS_*` files, or Sentinel's master), or every master of the
    /// cluster of `REDIS_CLUSTER_NODES`; the records are those under
    /// [`Config::key_prefix`].
    ///
    /// # Errors
    ///
    /// A malformed URL or an unreadable TLS file (not
    /// [`is_unavailable`](StoreError::is_unavailable): fix the setting),
    /// or a Redis that does not answer or refuses the connection
    /// (unavailable); the message names the server, password hidden.
    pub async fn connect(config: &Config) -> Result<Self, StoreError> {
        Ok(Self {
            servers: Servers::connect(config).await?,
            prefix: config.key_prefix().to_owned(),
        })
    }

    /// The key prefix the records live under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where the records live, for messages: `Redis at <url>` or the
    /// cluster's seed nodes, passwords hidden.
    pub fn server(&self) -> String {
        self.servers.shown()
    }

    /// The key of the message with `fingerprint` in `scope` (the consumer
    /// group: the queue's name unless `IDEMPOTENCY_SCOPE` says otherwise),
    /// as the consumers build it: `{prefix}:{scope}:{fingerprint}`, with
    /// `:` in the scope escaped and an over-long or unprintable
    /// fingerprint hashed.
    ///
    /// ```no_run
    /// # use amqp_idempotency::{Config, records::Records};
    /// # async fn f(records: Records) {
    /// assert_eq!(records.key("orders", "order-42"), format!("{}:orders:order-42", records.prefix()));
    /// # }
    /// ```
    pub fn key(&self, scope: &str, fingerprint: &str) -> String {
        record_key(&self.prefix, scope, fingerprint)
    }

    /// The record at `key` (see [`key`](Self::key)), with its outbox's
    /// undispatched messages; `None` when there is none (never claimed,
    /// expired, or forgotten).
    ///
    /// # Errors
    ///
    /// Redis unreachable or refusing the lookup (its user needs `EVALSHA`,
    /// `SCRIPT LOAD`, `TYPE`, `STRLEN`, `GETRANGE`, `PTTL`, `HLEN`).
    pub async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.one(key, false).await
    }

    /// Deletes the record at `key` and its outbox in one atomic step, and
    /// returns what they held (`None`: there was nothing). The next copy of
    /// the message is processed as new. Forgetting a record
    /// [`State::InProgress`] whose owner still runs lets a redelivery run
    /// the handler a second time, concurrently.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get), and a user without `DEL`.
    pub async fn forget(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.one(key, true).await
    }

    async fn one(&self, key: &str, delete: bool) -> Result<Option<Record>, StoreError> {
        let server = self.servers.for_key(key).await?;
        let mut found = lookup(
            &server,
            &[key.to_owned()],
            delete,
            self.servers.is_cluster(),
        )
        .await?;
        Ok(found.pop().flatten())
    }

    /// Counts the records under the prefix, or with `scope` under that
    /// scope only, per state: `SCAN ... MATCH` on every server that holds
    /// keys (never `KEYS`), then the lookup of each batch. A key that
    /// expires meanwhile is not counted; the key a paused consumer writes
    /// to test Redis is not a record.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get), and a user without `SCAN`.
    pub async fn stats(&self, scope: Option<&str>) -> Result<Stats, StoreError> {
        let pattern = format!("{}:*", glob_escape(&self.pattern_base(scope)));
        let per_key = self.servers.is_cluster();
        let mut stats = Stats::default();
        // Every master of a cluster holds some of the keys; each is walked.
        for server in self.servers.masters().await? {
            let mut connection = server.connection.clone();
            // SCAN may return a key more than once; count each once.
            let mut seen: HashSet<String> = HashSet::new();
            let mut cursor = String::from("0");
            loop {
                let (next, keys): (String, Vec<String>) = redis::cmd("SCAN")
                    .arg(&cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut connection)
                    .await
                    .map_err(|err| failure("stats", "", &server.shown, &err))?;
                let fresh: Vec<String> = keys
                    .into_iter()
                    .filter(|key| !key.ends_with(PROBE_NAME))
                    .filter(|key| seen.insert(key.clone()))
                    .collect();
                if !fresh.is_empty() {
                    for record in lookup(&server, &fresh, false, per_key)
                        .await?
                        .iter()
                        .flatten()
                    {
                        stats.count(record.state());
                    }
                }
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(stats)
    }

    /// The pattern `stats` matches, unescaped: `{prefix}:*` or
    /// `{prefix}:{scope}:*`, with the scope escaped as keys hold it.
    pub fn pattern(&self, scope: Option<&str>) -> String {
        format!("{}:*", self.pattern_base(scope))
    }

    fn pattern_base(&self, scope: Option<&str>) -> String {
        match scope {
            // `a:b` as `a%3Ab`, as the consumers write it.
            Some(scope) => record_key(&self.prefix, scope, "")
                .trim_end_matches(':')
                .to_owned(),
            None => self.prefix.clone(),
        }
    }
}

/// Escapes the glob characters of SCAN MATCH.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}
