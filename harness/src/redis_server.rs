//! A private `redis-server` on a free port of 127.0.0.1: AOF with
//! `appendfsync always` in a directory of the caller's, so that a restart
//! keeps the keys; or, for a replicated pair under Redis Sentinel
//! ([`crate::sentinel`]), without any persistence, so that a killed master
//! really loses what it had not replicated. The suites that kill Redis use
//! it and never touch the shared one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The harness's own redis-server (AOF, `appendfsync always`, or no
/// persistence at all), killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    persistent: bool,
    replica_of: Option<u16>,
    child: Option<Child>,
}

/// A free TCP port on 127.0.0.1 (free when asked: the caller binds it soon after).
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|err| format!("cannot find a free port: {err}"))
}

impl RedisServer {
    /// Starts `redis-server` on a free port with its files (AOF, `redis.log`)
    /// in `dir`, and waits until it answers.
    pub async fn start(dir: &Path) -> Result<Self, String> {
        let mut server = Self {
            port: free_port()?,
            dir: dir.to_owned(),
            persistent: true,
            replica_of: None,
            child: None,
        };
        server.spawn()?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// Starts `redis-server` on a free port without persistence (no AOF, no
    /// RDB snapshots: a restart comes back empty), a replica of the server
    /// on 127.0.0.1:`replica_of` if given, with its log (`redis.log`) and
    /// replication files in `dir`; waits until it answers. Full syncs go
    /// over the socket at once (diskless, no delay).
    pub async fn start_volatile(dir: &Path, replica_of: Option<u16>) -> Result<Self, String> {
        let mut server = Self {
            port: free_port()?,
            dir: dir.to_owned(),
            persistent: false,
            replica_of,
            child: None,
        };
        server.spawn()?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its directory (log, AOF or replication files).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether its process was started and not killed since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whom the next [`spawn`](Self::spawn) replicates: the server on
    /// 127.0.0.1:`port`, or nobody (a plain server, a master until someone
    /// says otherwise).
    pub fn set_replica_of(&mut self, port: Option<u16>) {
        self.replica_of = port;
    }

    /// Starts the process (again, after [`kill`](Self::kill)) on the same
    /// port and directory; does not wait for it to answer.
    pub fn spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new("redis-server");
        command.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"]);
        if self.persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
            command.args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ]);
        }
        if let Some(master) = self.replica_of {
            command.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        let child = command
            .args(["--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| {
                format!(
                    "cannot start redis-server (install Redis 7+, e.g. `apt-get install redis-server`): {err}"
                )
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9` of the process, if it runs, and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the server answers PING (not `-LOADING`), 20s at most.
    pub async fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ping(self.port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {} did not answer within 20s (log: {})",
                    self.port,
                    self.dir.join("redis.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis on 127.0.0.1:`port` answers `PING` with `+PONG` within 500ms.
pub async fn ping(port: u16) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply).await.ok()?;
        Some(reply[..n].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), exchange).await,
        Ok(Some(true))
    )
}
