//! The standalone (and Sentinel-followed) server: the writer task, which
//! owns its connection (see `wire`), sends what waits as one pipeline and
//! reads the replies itself; a failed connection is replaced by a new one
//! for the next batch.
//!
//! ```ignore
//! let link = Link::new(Source::Fixed(client), shown, cas, Replication::default());
//! let first = link.connect().await?;  // fails fast at startup
//! tokio::spawn(serve(link, Some(first), queue, stats));
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError, RedisResult, Value};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::connect::{client_for, host_of, tls_config};
use super::errors::{Failure, breaks_connection, failure, remedy};
use super::native::Cas;
use super::pipeline::Packed;
use super::replication::Replication;
use super::scripts::{Keys, LUA_SCRIPTS};
use super::wire::{Reader, Wire, Writer};
use super::{MAX_BATCH, MAX_IN_FLIGHT, RedisStore, Request, Stats};
use crate::batch::next_batch;
use crate::config::SentinelUrl;
use crate::tls::{self, Side, TlsFiles};

/// Where the connections go, and what every new one is checked for.
pub(super) struct Link {
    client: Source,
    replication: Replication,
    config: AsyncConnectionConfig,
    shown: String,
    cas: Arc<Cas>,
}

/// Where the address of each new connection comes from.
pub(super) enum Source {
    /// A client given as it is (`rediss://` verified against the
    /// platform's trusted roots).
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
            cas,
        }
    }

    /// A new connection, checked: to a master (Sentinel), and asked which
    /// compare-and-set the server offers (`HELLO`).
    pub(super) async fn connect(&self) -> Result<Wire, Failure> {
        let cannot = |err: String| {
            Failure::unavailable(format!("cannot connect to Redis at {}: {err}", self.shown))
        };
        let sentinel_master;
        let (info, tls_files, host) = match &self.client {
            Source::Fixed(client) => {
                let info = client.get_connection_info().clone();
                (info, None, String::new())
            }
            Source::Sentinel(sentinel) => {
                let url = sentinel.master(&self.config).await.map_err(cannot)?;
                client_for(&url, &sentinel.tls_files).map_err(cannot)?;
                sentinel_master = url;
                let info = sentinel_master
                    .as_str()
                    .into_connection_info()
                    .map_err(|err| cannot(err.to_string()))?;
                (info, Some(&sentinel.tls_files), host_of(&sentinel_master))
            }
            Source::Config { url, tls, host } => {
                let info = url
                    .as_str()
                    .into_connection_info()
                    .map_err(|err| cannot(err.to_string()))?;
                (info, Some(tls), host.clone())
            }
        };
        let secure = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        let tls = match secure {
            true => Some(tls_config(tls_files.unwrap_or(&TlsFiles::default())).map_err(cannot)?),
            false => None,
        };
        let mut wire = Wire::connect(&info, tls, RedisStore::RESPONSE_TIMEOUT)
            .await
            .map_err(|err| self.unreachable(err, tls_files, &host))?;
        if matches!(self.client, Source::Sentinel(_)) {
            // Right after a failover a sentinel may still name the old
            // master, now a replica: writing there would fail, so look again.
            let role = wire.call(&redis::cmd("ROLE")).await.map_err(failure)?;
            let master = matches!(&role, Value::Array(fields)
                if matches!(fields.first(), Some(Value::BulkString(role)) if role == b"master"));
            if !master {
                return Err(Failure::unavailable(format!(
                    "the server the sentinels named for {} is not a master (a failover is under \
                     way); trying again",
                    self.shown
                )));
            }
        }
        // Which compare-and-set this server offers: a server that does not
        // know HELLO (or refuses it) gets the scripts.
        // A connection refused only now (TLS 1.3 checks a client
        // certificate after the handshake; a password that is needed)
        // fails here, with what to do.
        let hello = match wire.call(&redis::cmd("HELLO")).await {
            Ok(hello) => Some(hello),
            Err(err) if breaks_connection(&err) => {
                return Err(self.unreachable(err, tls_files, &host));
            }
            Err(_) => None,
        };
        self.cas.detect(hello.as_ref());
        Ok(wire)
    }

    /// The failure of a connection that could not be made, with what to do.
    fn unreachable(&self, err: RedisError, tls_files: Option<&TlsFiles>, host: &str) -> Failure {
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
    }
}

/// The writer task: takes what waits as one batch, sends it as one
/// pipeline on its connection (up to [`MAX_IN_FLIGHT`] pipelines awaiting
/// their replies), reads the replies and answers each request. A failed
/// connection fails the batches on it (their callers try again, with the
/// same values) and is replaced for the next batch. Ends when every
/// [`RedisStore`] clone is gone.
pub(super) async fn serve(
    link: Link,
    mut wire: Option<Wire>,
    mut queue: mpsc::UnboundedReceiver<Request>,
    stats: Arc<Stats>,
) {
    loop {
        let Some(batch) = next_batch(&mut queue, MAX_BATCH).await else {
            return;
        };
        let connected = match wire.take() {
            Some(wire) => wire,
            None => match link.connect().await {
                Ok(wire) => wire,
                Err(failure) => {
                    Packed::new(batch, Keys::Declared).fail(&failure);
                    continue;
                }
            },
        };
        if Session::new(&link, &stats)
            .run(connected, batch, &mut queue)
            .await
        {
            return;
        }
    }
}

/// A pipeline on its way: its requests, and what else it carries.
struct Sent {
    packed: Packed,
    /// `SCRIPT LOAD`s ahead of its commands (after a `NOSCRIPT`).
    loads: usize,
    /// A `WAIT` after its commands.
    wait: bool,
    /// When its replies count as lost.
    deadline: Instant,
}

impl Sent {
    fn replies(&self) -> usize {
        self.loads + self.packed.len() + usize::from(self.wait)
    }
}

/// One connection's life: the batches written on it and not yet answered.
struct Session<'a> {
    link: &'a Link,
    stats: &'a Stats,
    in_flight: std::sync::Mutex<VecDeque<Sent>>,
    /// A batch was written.
    written: Notify,
    /// A batch was answered.
    answered: Notify,
    /// A script call found the script missing: the next batch loads it.
    load_scripts: std::sync::atomic::AtomicBool,
    /// The calls that found the script missing, to send again after it.
    retries: std::sync::Mutex<Vec<Request>>,
    /// Some calls wait in `retries`.
    retry: Notify,
}

/// Why a session ended.
enum Ended {
    /// Every store clone is gone.
    Closed,
    /// The connection failed, or must not be used any more.
    Failed(Failure),
}

impl<'a> Session<'a> {
    fn new(link: &'a Link, stats: &'a Stats) -> Self {
        Self {
            link,
            stats,
            in_flight: std::sync::Mutex::new(VecDeque::new()),
            written: Notify::new(),
            answered: Notify::new(),
            load_scripts: std::sync::atomic::AtomicBool::new(false),
            retries: std::sync::Mutex::new(Vec::new()),
            retry: Notify::new(),
        }
    }

    /// Serves `queue` on `wire`, starting with `first`, until the
    /// connection fails (false) or the queue closes (true).
    async fn run(
        &self,
        wire: Wire,
        first: Vec<Request>,
        queue: &mut mpsc::UnboundedReceiver<Request>,
    ) -> bool {
        let (reader, writer) = wire.split();
        let ended = tokio::select! {
            ended = self.write(writer, first, queue) => ended,
            ended = self.read(reader) => ended,
        };
        let failure = match ended {
            Ended::Closed => return true,
            Ended::Failed(failure) => failure,
        };
        let stranded = std::mem::take(&mut *self.in_flight());
        for sent in stranded {
            sent.packed.fail(&failure);
        }
        let retries = std::mem::take(
            &mut *self
                .retries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for request in retries {
            let _ = request.reply.send(Err(failure.clone()));
        }
        false
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, VecDeque<Sent>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes batches as they come, while fewer than [`MAX_IN_FLIGHT`]
    /// await their replies.
    async fn write(
        &self,
        mut writer: Writer,
        first: Vec<Request>,
        queue: &mut mpsc::UnboundedReceiver<Request>,
    ) -> Ended {
        let mut first = Some(first);
        let mut bytes = Vec::with_capacity(4096);
        loop {
            while self.in_flight().len() >= MAX_IN_FLIGHT {
                self.answered.notified().await;
            }
            let retries = std::mem::take(
                &mut *self
                    .retries
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            let batch = match first.take() {
                Some(batch) => batch,
                None if !retries.is_empty() => retries,
                None => tokio::select! {
                    batch = next_batch(queue, MAX_BATCH) => match batch {
                        Some(batch) => batch,
                        None => return Ended::Closed,
                    },
                    () = self.retry.notified() => continue,
                },
            };
            let packed = Packed::new(batch, Keys::Declared);
            let wait = self.link.replication.wait().filter(|_| packed.writes);
            let loads = if self.load_scripts.swap(false, Ordering::Relaxed) {
                LUA_SCRIPTS.len()
            } else {
                0
            };
            bytes.clear();
            for script in LUA_SCRIPTS.iter().take(loads) {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(*script)
                    .write_packed_command(&mut bytes);
            }
            for command in packed.commands() {
                command.write_packed_command(&mut bytes);
            }
            if let Some(wait) = &wait {
                wait.write_packed_command(&mut bytes);
            }
            let sent = Sent {
                loads,
                wait: wait.is_some(),
                deadline: Instant::now()
                    + RedisStore::RESPONSE_TIMEOUT
                    + self.link.replication.timeout,
                packed,
            };
            self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
            self.stats
                .commands
                .fetch_add((sent.replies() - loads) as u64, Ordering::Relaxed);
            // In flight before it is written: a failed write fails it too.
            self.in_flight().push_back(sent);
            self.written.notify_one();
            if let Err(err) = writer.send(&bytes).await {
                return Ended::Failed(failure(err));
            }
        }
    }

    /// Reads the replies of each batch written, in order, and answers it.
    async fn read(&self, mut reader: Reader) -> Ended {
        let mut replies = Vec::new();
        loop {
            let (count, deadline) = loop {
                if let Some(sent) = self.in_flight().front() {
                    break (sent.replies(), sent.deadline);
                }
                self.written.notified().await;
            };
            replies.clear();
            let read = tokio::time::timeout_at(deadline, async {
                for _ in 0..count {
                    replies.push(reader.read().await?);
                }
                Ok::<_, RedisError>(())
            })
            .await;
            match read {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Ended::Failed(failure(err)),
                Err(_) => {
                    return Ended::Failed(failure(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "Redis at {} did not answer within {:?}",
                            self.link.shown,
                            RedisStore::RESPONSE_TIMEOUT + self.link.replication.timeout
                        ),
                    ))));
                }
            }
            let Some(sent) = self.in_flight().pop_front() else {
                continue;
            };
            self.answered.notify_one();
            if let Some(broken) = self.answer(sent, replies.drain(..)) {
                // NOAUTH and the like: this connection is no longer usable.
                return Ended::Failed(broken);
            }
        }
    }

    /// Answers `sent`'s requests from its `replies`; the failure that ends
    /// the connection, if one says so.
    fn answer(&self, sent: Sent, replies: impl Iterator<Item = Value>) -> Option<Failure> {
        let mut replies = replies.map(|reply| match reply {
            Value::ServerError(err) => Err(RedisError::from(err)),
            reply => Ok(reply),
        });
        let refused_load = (&mut replies).take(sent.loads).find_map(RedisResult::err);
        let mut answers: Vec<RedisResult<Value>> = replies.collect();
        let shortfall = match sent.wait {
            true => answers
                .pop()
                .and_then(|waited| self.link.replication.shortfall(&waited)),
            false => None,
        };
        let mut broken = None;
        sent.packed
            .answer(answers, shortfall.as_ref(), |request, answer| {
                let answer = match answer {
                    Err(err) if err.code() == Some("NOSCRIPT") && sent.loads == 0 => {
                        // Redis restarted or flushed its scripts: the next
                        // batch loads them, and carries this call (which
                        // did not run) again.
                        self.load_scripts.store(true, Ordering::Relaxed);
                        self.retries
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(request);
                        self.retry.notify_one();
                        return;
                    }
                    // A refused load (an ACL without `script|load`) is the
                    // answer: it says what to grant.
                    Err(err) if err.code() == Some("NOSCRIPT") => {
                        Err(refused_load.clone().unwrap_or(err))
                    }
                    answer => answer,
                };
                if let Err(err) = &answer
                    && breaks_connection(err)
                {
                    broken = Some(failure(err.clone()));
                }
                let _ = request.reply.send(answer.map_err(failure));
            });
        broken
    }
}
