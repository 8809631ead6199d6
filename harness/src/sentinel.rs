//! A replicated Redis under Redis Sentinel, on free ports of 127.0.0.1:
//! two `redis-server`s without persistence (a master and its replica) and
//! three sentinels watching them (quorum 2, a master is down after 3s
//! without an answer), each in a directory of its own under the caller's.
//! [`ReplicatedRedis::kill_master`] and [`ReplicatedRedis::advance`] drive
//! a failover: `kill -9` of the master, the sentinels promote the replica,
//! the killed server comes back empty on its old port as a plain server,
//! and the sentinels turn it into a replica of the new master. When the
//! sentinels fail the pair over on their own meanwhile, [`ReplicatedRedis::advance`]
//! says so ([`FailoverStep::Unplanned`]) and follows them.
//!
//! Sentinels run as `redis-sentinel <conf>` (Debian's `redis-sentinel`
//! package) or, where that is not installed, `redis-server <conf> --sentinel`
//! (the same program). Everything is killed when dropped.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis_server::{RedisServer, free_port, ping};

/// How many sentinels watch the pair.
pub const SENTINELS: usize = 3;
/// How many sentinels must agree that the master is down.
pub const QUORUM: usize = 2;
/// `sentinel down-after-milliseconds`. With 1s, a CI run on 2 busy cores
/// saw the sentinels fail over a master nobody killed (most likely one
/// PING answered more than a second late by a starved `redis-server`):
/// 3s makes that much rarer, and is longer than the 2s stall of a
/// sentinel's own timer that puts it in TILT mode (acting on nothing for
/// 30s) rather than judging a master it could not watch.
pub const DOWN_AFTER_MS: u64 = 3000;
/// `sentinel failover-timeout`.
pub const FAILOVER_TIMEOUT_MS: u64 = 5000;
/// How long the sentinels may take to promote the replica once the master
/// is killed: down-after, the election, and a TILT period (30s) that a
/// stalled machine may have started.
pub const PROMOTION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the killed server may take, once restarted, to be an online
/// replica of the new master that every sentinel sees. The sentinels turn a
/// returning master into a replica only after about 10s (their `INFO` period
/// for replicas).
pub const REJOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`ReplicatedRedis::start`] waits for the sentinels to agree.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How many of each sentinel's last events [`ReplicatedRedis::events`] gives.
pub const EVENTS_KEPT: usize = 12;
/// One question to a server or a sentinel, connection included.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether a sentinel can run here: `redis-sentinel` (Debian's package,
/// `redis-server` under another name) or `redis-server`, which runs as a
/// sentinel with `--sentinel`, answers `--version`. The error says what to
/// install.
pub fn check_installed() -> Result<(), String> {
    let runs = |program: &str| {
        Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if runs("redis-sentinel") || runs("redis-server") {
        Ok(())
    } else {
        Err(
            "Redis Sentinel is needed: neither `redis-sentinel` nor `redis-server` (which runs \
             as a sentinel with --sentinel) is on the PATH; install them with \
             `apt-get install redis-server redis-sentinel`"
                .to_owned(),
        )
    }
}

/// One sentinel process, killed when dropped.
#[derive(Debug)]
struct Sentinel {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Sentinel {
    /// Writes its own config file in `dir` (sentinels rewrite it) and starts it.
    fn start(dir: &Path, name: &str, master: u16) -> Result<Self, String> {
        std::fs::create_dir_all(dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        let port = free_port()?;
        let conf = dir.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {log}\n\
             sentinel monitor {name} 127.0.0.1 {master} {QUORUM}\n\
             sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n\
             sentinel parallel-syncs {name} 1\n",
            dir = dir.display(),
            log = dir.join("sentinel.log").display(),
        );
        std::fs::write(&conf, text)
            .map_err(|err| format!("cannot write {}: {err}", conf.display()))?;
        let stderr = |path: PathBuf| {
            File::create(&path)
                .map(Stdio::from)
                .map_err(|err| format!("cannot create {}: {err}", path.display()))
        };
        let spawn = |program: &str, sentinel_flag: bool| -> Result<Child, std::io::Error> {
            let mut command = Command::new(program);
            command.arg(&conf);
            if sentinel_flag {
                command.arg("--sentinel");
            }
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr(dir.join("stderr.log")).map_err(std::io::Error::other)?)
                .spawn()
        };
        let child = match spawn("redis-sentinel", false) {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => spawn("redis-server", true)
                .map_err(|err| {
                format!(
                    "cannot start a Redis Sentinel: `redis-sentinel` is not installed and \
                         `redis-server --sentinel` failed ({err}); install Redis 7+ \
                         (`apt-get install redis-server redis-sentinel`)"
                )
            })?,
            Err(err) => return Err(format!("cannot start redis-sentinel: {err}")),
        };
        Ok(Self {
            port,
            dir: dir.to_owned(),
            child: Some(child),
        })
    }

    /// Waits until it answers PING; fails at once if it exited.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ping(self.port).await {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                let said = std::fs::read_to_string(self.dir.join("stderr.log"))
                    .unwrap_or_default()
                    .chars()
                    .take(2000)
                    .collect::<String>();
                let log =
                    std::fs::read_to_string(self.dir.join("sentinel.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!(
                    "the sentinel on port {} exited at once ({status}): is Redis Sentinel \
                     available (`apt-get install redis-sentinel`)? {}{}",
                    self.port,
                    said.trim(),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the sentinel on port {} did not answer within 20s (log: {})",
                    self.port,
                    self.dir.join("sentinel.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A master, its replica and three sentinels; everything killed when dropped.
#[derive(Debug)]
pub struct ReplicatedRedis {
    name: String,
    dir: PathBuf,
    servers: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
}

/// A failover under way: see [`ReplicatedRedis::advance`].
#[derive(Debug)]
pub struct Failover {
    /// The port of the master that was killed (or, after
    /// [`FailoverStep::Unplanned`], the one the sentinels left).
    pub old: u16,
    /// The port of the server the sentinels promoted, once they agree on it.
    pub new: Option<u16>,
    /// When the master was killed.
    pub killed: Instant,
    /// When every sentinel named the new master (the latest one, after
    /// [`FailoverStep::Unplanned`]).
    pub promoted: Option<Instant>,
}

/// How far a failover got: see [`ReplicatedRedis::advance`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverStep {
    /// Nothing new since the last call.
    Waiting,
    /// Every sentinel names the master on this port; the killed server was
    /// restarted, empty and as a plain server, on its old port.
    Promoted(u16),
    /// The restarted server is an online replica of the new master, and
    /// every sentinel sees it so: the pair can fail over again.
    Rejoined,
    /// Before that, the sentinels failed the new master over on their own
    /// to the server on this port (nobody killed it: see [`ReplicatedRedis::events`]
    /// for why they did). The failover goes on with the roles swapped: the
    /// master they left, still running, is to become a replica of this one.
    Unplanned(u16),
}

impl ReplicatedRedis {
    /// Starts the master, its replica and the sentinels (master name `name`),
    /// with their files in subdirectories of `dir` (`redis-a`, `redis-b`,
    /// `sentinel-1`..), and waits until every sentinel names the master,
    /// sees the replica online and knows the other sentinels.
    pub async fn start(dir: &Path, name: &str) -> Result<Self, String> {
        let mut pair = Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
            servers: Vec::new(),
            sentinels: Vec::new(),
        };
        for (label, replica_of) in [("a", None), ("b", Some(()))] {
            let server_dir = dir.join(format!("redis-{label}"));
            std::fs::create_dir_all(&server_dir)
                .map_err(|err| format!("cannot create {}: {err}", server_dir.display()))?;
            let master = replica_of.and_then(|()| pair.servers.first().map(RedisServer::port));
            pair.servers
                .push(RedisServer::start_volatile(&server_dir, master).await?);
        }
        let (master, replica) = (pair.servers[0].port(), pair.servers[1].port());
        for i in 1..=SENTINELS {
            let sentinel = Sentinel::start(&dir.join(format!("sentinel-{i}")), name, master)?;
            pair.sentinels.push(sentinel);
        }
        for sentinel in &mut pair.sentinels {
            sentinel.wait_ready().await?;
        }
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let reason = match pair.settled(master, replica).await {
                Ok(()) => return Ok(pair),
                Err(reason) => reason,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "the sentinels did not settle on master 127.0.0.1:{master} with replica \
                     127.0.0.1:{replica} within {SETTLE_TIMEOUT:?}: {reason} (logs in {})",
                    dir.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The master name the sentinels monitor.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The ports of the two data servers.
    pub fn server_ports(&self) -> Vec<u16> {
        self.servers.iter().map(RedisServer::port).collect()
    }

    /// The ports of the sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// `redis-sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3#name`.
    pub fn url(&self) -> String {
        let hosts = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",");
        format!("redis-sentinel://{hosts}#{}", self.name)
    }

    /// What each sentinel answers to `SENTINEL get-master-addr-by-name`:
    /// the master's port, or why there is none.
    pub async fn masters(&self) -> Vec<Result<u16, String>> {
        let mut answers = Vec::new();
        for sentinel in &self.sentinels {
            answers.push(self.master_of(sentinel.port).await);
        }
        answers
    }

    async fn master_of(&self, sentinel: u16) -> Result<u16, String> {
        let reply: Option<Vec<String>> = query(
            sentinel,
            &["SENTINEL", "get-master-addr-by-name", &self.name],
        )
        .await?;
        let reply = reply.ok_or_else(|| format!("sentinel {sentinel} knows no master"))?;
        reply
            .get(1)
            .and_then(|port| port.parse().ok())
            .ok_or_else(|| format!("sentinel {sentinel} answered {reply:?}"))
    }

    /// Whether at least [`QUORUM`] sentinels name 127.0.0.1:`port` as the
    /// master (the others may lag behind, or be in TILT mode).
    async fn majority_names(&self, port: u16) -> bool {
        let answers = self.masters().await;
        answers.iter().filter(|a| a.as_ref() == Ok(&port)).count() >= QUORUM
    }

    /// The master's port when every sentinel names the same one.
    pub async fn agreed_master(&self) -> Result<u16, String> {
        let answers = self.masters().await;
        match answers.first() {
            Some(Ok(first)) if answers.iter().all(|a| a.as_ref() == Ok(first)) => Ok(*first),
            _ => Err(format!("the sentinels answer {answers:?}")),
        }
    }

    /// Ok when `master` is a master with `replica` online (in sync), and
    /// every sentinel names `master`, sees it up, knows the other sentinels
    /// and knows `replica` as a replica that is up; else what is not so.
    /// What the sentinels cache of the replica's own `INFO` (its role, its
    /// link) is not waited for: they refresh it only every 10s, and every
    /// second once the master is down, before they choose whom to promote.
    pub async fn settled(&self, master: u16, replica: u16) -> Result<(), String> {
        let info: String = query(master, &["INFO", "replication"]).await?;
        let online = info.lines().any(|line| {
            line.starts_with("slave")
                && line.contains(&format!("port={replica},"))
                && line.contains("state=online")
        });
        if !info.lines().any(|line| line.trim() == "role:master") || !online {
            return Err(format!(
                "127.0.0.1:{master} is not a master with 127.0.0.1:{replica} online: {}",
                info.lines()
                    .filter(|l| l.starts_with("role") || l.starts_with("slave"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        for sentinel in &self.sentinels {
            let port = sentinel.port;
            let named = self.master_of(port).await?;
            if named != master {
                return Err(format!("sentinel {port} names 127.0.0.1:{named}"));
            }
            let fields: HashMap<String, String> =
                query(port, &["SENTINEL", "master", &self.name]).await?;
            let field = |name: &str| fields.get(name).map_or("?", String::as_str);
            if field("flags") != "master" || field("num-other-sentinels") != "2" {
                return Err(format!(
                    "sentinel {port} sees the master with flags {} and {} other sentinels",
                    field("flags"),
                    field("num-other-sentinels")
                ));
            }
            let replicas: Vec<HashMap<String, String>> =
                query(port, &["SENTINEL", "replicas", &self.name]).await?;
            let seen = replicas
                .iter()
                .find(|r| r.get("port").map(String::as_str) == Some(replica.to_string().as_str()));
            let healthy = seen.is_some_and(|r| {
                let flags: Vec<&str> = r
                    .get("flags")
                    .map_or("", String::as_str)
                    .split(',')
                    .collect();
                flags.contains(&"slave")
                    && !flags
                        .iter()
                        .any(|f| matches!(*f, "s_down" | "o_down" | "disconnected"))
            });
            if !healthy {
                return Err(format!(
                    "sentinel {port} sees replica 127.0.0.1:{replica} as {}",
                    seen.map_or("unknown".to_owned(), |r| format!(
                        "flags {:?}, link {:?}, master port {:?}",
                        r.get("flags"),
                        r.get("master-link-status"),
                        r.get("master-port")
                    ))
                ));
            }
        }
        Ok(())
    }

    /// `kill -9` of the master every sentinel names: a failover begins.
    pub async fn kill_master(&mut self) -> Result<Failover, String> {
        let master = self
            .agreed_master()
            .await
            .map_err(|err| format!("no master to kill: {err}"))?;
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.port() == master)
            .ok_or_else(|| format!("the sentinels name 127.0.0.1:{master}, not one of ours"))?;
        server.kill();
        Ok(Failover {
            old: master,
            new: None,
            killed: Instant::now(),
            promoted: None,
        })
    }

    /// Advances `failover` as far as it goes now, without waiting: once
    /// every sentinel names another master, restarts the killed server on
    /// its old port, empty and as a plain server (the sentinels make it a
    /// replica); then reports when it is an online replica that every
    /// sentinel sees. Fails when the promotion takes longer than
    /// [`PROMOTION_TIMEOUT`] or the rejoin longer than [`REJOIN_TIMEOUT`].
    pub async fn advance(&mut self, failover: &mut Failover) -> Result<FailoverStep, String> {
        let old = failover.old;
        match (failover.new, failover.promoted) {
            (Some(new), Some(promoted)) => match self.settled(new, old).await {
                Ok(()) => Ok(FailoverStep::Rejoined),
                Err(reason) => match self.majority_names(old).await {
                    // A quorum of sentinels names the other server: they
                    // failed `new` over themselves. Follow them.
                    true => {
                        failover.old = new;
                        failover.new = Some(old);
                        failover.promoted = Some(Instant::now());
                        Ok(FailoverStep::Unplanned(old))
                    }
                    false if promoted.elapsed() > REJOIN_TIMEOUT => Err(format!(
                        "failover: 127.0.0.1:{old} did not become an online replica of \
                         127.0.0.1:{new} seen by every sentinel within {REJOIN_TIMEOUT:?}: \
                         {reason}; the sentinels' events: {} (logs in {})",
                        self.events(),
                        self.dir.display()
                    )),
                    false => Ok(FailoverStep::Waiting),
                },
            },
            _ => match self.agreed_master().await {
                Ok(new) if new != old => {
                    failover.new = Some(new);
                    failover.promoted = Some(Instant::now());
                    let server = self
                        .servers
                        .iter_mut()
                        .find(|s| s.port() == old)
                        .ok_or_else(|| format!("127.0.0.1:{old} is not one of ours"))?;
                    server.set_replica_of(None);
                    server.spawn()?;
                    server.wait_ready().await?;
                    Ok(FailoverStep::Promoted(new))
                }
                answer if failover.killed.elapsed() > PROMOTION_TIMEOUT => Err(format!(
                    "failover: the sentinels did not promote a new master within \
                     {PROMOTION_TIMEOUT:?} of killing 127.0.0.1:{old} ({}; their events: {}; \
                     logs in {})",
                    match answer {
                        Ok(port) => format!("they still name 127.0.0.1:{port}"),
                        Err(err) => err,
                    },
                    self.events(),
                    self.dir.display()
                )),
                _ => Ok(FailoverStep::Waiting),
            },
        }
    }

    /// What the sentinels logged about who is up and who is master: their
    /// `+sdown`, `-sdown`, `+odown`, `+tilt`, `-tilt`, `+switch-master`, `+convert-to-slave`,
    /// `+promoted-slave` and `-failover-abort-*` events, the last
    /// [`EVENTS_KEPT`] of each, as `sentinel <port>: <time> <event> | ...`.
    /// For error messages: a failover that went wrong says why.
    pub fn events(&self) -> String {
        const WATCHED: [&str; 9] = [
            "+sdown",
            "-sdown",
            "+odown",
            "+tilt",
            "-tilt",
            "+switch-master",
            "+convert-to-slave",
            "+promoted-slave",
            "-failover-abort",
        ];
        self.sentinels
            .iter()
            .map(|sentinel| {
                let path = sentinel.dir.join("sentinel.log");
                let log = match std::fs::read_to_string(&path) {
                    Ok(log) => log,
                    Err(err) => {
                        return format!("sentinel {}: ({}: {err})", sentinel.port, path.display());
                    }
                };
                // `pid:X 26 Nov 2026 23:41:58.683 # +sdown master chaos ...`:
                // the time and what follows the level mark.
                let lines: Vec<String> = log
                    .lines()
                    .filter(|line| WATCHED.iter().any(|event| line.contains(event)))
                    .map(|line| {
                        let fields = line.split_whitespace().skip(4);
                        let kept: Vec<&str> = fields.filter(|f| !matches!(*f, "#" | "*")).collect();
                        kept.join(" ")
                    })
                    .collect();
                let kept = &lines[lines.len().saturating_sub(EVENTS_KEPT)..];
                format!("sentinel {}: {}", sentinel.port, kept.join(" | "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Kills every process (also done when dropped).
    pub fn kill(&mut self) {
        for sentinel in &mut self.sentinels {
            sentinel.kill();
        }
        for server in &mut self.servers {
            server.kill();
        }
    }
}

impl Drop for ReplicatedRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One command to 127.0.0.1:`port` on a connection of its own, within [`QUERY_TIMEOUT`].
async fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> Result<T, String> {
    let exchange = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .map_err(|err| err.to_string())?;
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|err| err.to_string())?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async::<T>(&mut connection)
            .await
            .map_err(|err| err.to_string())
    };
    match tokio::time::timeout(QUERY_TIMEOUT, exchange).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(format!("127.0.0.1:{port} {}: {err}", args.join(" "))),
        Err(_) => Err(format!(
            "127.0.0.1:{port} {}: no answer within {QUERY_TIMEOUT:?}",
            args.join(" ")
        )),
    }
}
