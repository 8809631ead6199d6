//! The standalone (and Sentinel-followed) server: one multiplexed
//! connection that every pipeline shares, made again after it failed, and
//! the sending of one batch of requests as one pipeline.
//!
//! ```ignore
//! let link = Link::new(Source::Fixed(client), shown, cas, Replication::default());
//! let (generation, connection) = link.get().await?;
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, Value};
use tokio::sync::Mutex;

use super::connect::{client_for, host_of};
use super::errors::{Failure, breaks_connection, failure, remedy};
use super::native::Cas;
use super::pipeline::Packed;
use super::replication::Replication;
use super::scripts::{Keys, LUA_SCRIPTS};
use super::{Request, Stats};
use crate::config::SentinelUrl;
use crate::tls::{self, Side, TlsFiles};

/// The one connection all pipelines share, made again after it failed.
///
/// Each connection carries a generation number, so that a pipeline that
/// failed on an old connection does not throw away the new one.
pub(super) struct Link {
    client: Source,
    replication: Replication,
    config: AsyncConnectionConfig,
    shown: String,
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generations: AtomicU64,
    cas: Arc<Cas>,
}

/// Where the client of each new connection comes from.
pub(super) enum Source {
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

impl Link {
    pub(super) fn new(
        client: Source,
        shown: String,
        cas: Arc<Cas>,
        replication: Replication,
    ) -> Self {
        let config = replication.connection_config();
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
    pub(super) async fn get(&self) -> Result<(u64, MultiplexedConnection), Failure> {
        let mut current = self.current.lock().await;
        if let Some((generation, connection)) = &*current {
            return Ok((*generation, connection.clone()));
        }
        let cannot = |err: String| {
            Failure::unavailable(format!("cannot connect to Redis at {}: {err}", self.shown))
        };
        let built;
        let sentinel_master;
        let (client, tls_files, host) = match &self.client {
            Source::Fixed(client) => (client, None, ""),
            Source::Sentinel(sentinel) => {
                let url = sentinel.master(&self.config).await.map_err(cannot)?;
                built = client_for(&url, &sentinel.tls_files).map_err(cannot)?;
                sentinel_master = host_of(&url);
                (&built, Some(&sentinel.tls_files), sentinel_master.as_str())
            }
            Source::Config { url, tls, host } => {
                built = client_for(url, tls).map_err(cannot)?;
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
    pub(super) async fn discard(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }
}

/// Sends one batch as one pipeline (its transitions as one script call)
/// and answers each request.
pub(super) async fn send_batch(link: Arc<Link>, batch: Vec<Request>, stats: Arc<Stats>) {
    let packed = Packed::new(batch, Keys::Declared);
    let mut pipe = redis::Pipeline::with_capacity(packed.len() + 1);
    pipe.ignore_errors();
    for command in packed.commands() {
        pipe.add_command(command.clone());
    }
    // One WAIT after the writes of the pipeline covers them all.
    let wait = link.replication.wait().filter(|_| packed.writes);
    if let Some(wait) = &wait {
        pipe.add_command(wait.clone());
    }
    let (generation, mut connection) = match link.get().await {
        Ok(connection) => connection,
        Err(failure) => return packed.fail(&failure),
    };
    stats.round_trips.fetch_add(1, Ordering::Relaxed);
    stats
        .commands
        .fetch_add(pipe.len() as u64, Ordering::Relaxed);
    let answers: Result<Vec<redis::RedisResult<Value>>, RedisError> =
        pipe.query_async(&mut connection).await;
    let expected = pipe.len();
    let mut answers = match answers {
        Ok(answers) if answers.len() == expected => answers,
        Ok(answers) => {
            let failure = Failure::unavailable(format!(
                "Redis answered {} replies to a pipeline of {} commands",
                answers.len(),
                expected
            ));
            link.discard(generation).await;
            return packed.fail(&failure);
        }
        Err(err) => {
            if breaks_connection(&err) {
                link.discard(generation).await;
            }
            return packed.fail(&failure(err));
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
    packed.answer(answers, shortfall.as_ref(), |request, answer| {
        let _ = request.reply.send(answer.map_err(failure));
    });
}
