//! The process supervisor: the consumer processes, one per slot, started
//! with the suite's settings and their own log file, reaped when they exit
//! on their own, killed on demand, and stopped with SIGTERM at the end.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The consumers' settings (every `IDEMPOTENCY_*` of the caller is replaced).
pub const CONSUMER_ENV: &[(&str, &str)] = &[
    ("IDEMPOTENCY_KEY_PREFIX", "chaos"),
    ("IDEMPOTENCY_LEASE_TTL", "2s"),
    ("IDEMPOTENCY_HANDLER_TIMEOUT", "1500ms"),
    ("IDEMPOTENCY_PREFETCH", "32"),
    ("IDEMPOTENCY_IN_PROGRESS_WAIT", "3s"),
    ("IDEMPOTENCY_MAX_ATTEMPTS", "4"),
    ("IDEMPOTENCY_RETRY_BACKOFF", "50ms"),
    ("IDEMPOTENCY_RETRY_BACKOFF_MAX", "400ms"),
    ("IDEMPOTENCY_DONE_TTL", "1h"),
    ("IDEMPOTENCY_ON_STORE_ERROR", "fail-closed"),
    ("IDEMPOTENCY_ON_MISSING_FINGERPRINT", "dead-letter"),
    ("IDEMPOTENCY_VERIFY_PAYLOAD", "true"),
];
/// Removed from the consumers' environment: the scope is the queue name.
pub const CLEARED_ENV: &[&str] = &["IDEMPOTENCY_SCOPE"];

/// `kill -s SIGNAL PID` through the `kill` command; true if it was sent.
pub fn signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// The consumer processes, one per slot.
pub struct Consumers {
    pub exe: PathBuf,
    pub queue: String,
    pub ledger: PathBuf,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    /// `--outbox`: the consumers' handlers publish through the outbox.
    pub outbox: bool,
    /// Per slot: the process, its pid and its log file.
    pub slots: Vec<Option<(Child, u32, PathBuf)>>,
    pub spawned: u64,
}

impl Consumers {
    pub fn spawn(&mut self, slot: usize) -> Result<u32, String> {
        self.spawned += 1;
        let log_path = self
            .dir
            .join(format!("consumer-{slot}-{}.log", self.spawned));
        let log = File::create(&log_path)
            .map_err(|err| format!("cannot create {}: {err}", log_path.display()))?;
        let mut command = Command::new(&self.exe);
        command
            .args(["--role", "consumer", "--queue", &self.queue, "--ledger"])
            .arg(&self.ledger)
            .args(self.outbox.then_some("--outbox"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for name in CLEARED_ENV {
            command.env_remove(name);
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = command
            .spawn()
            .map_err(|err| format!("cannot start a consumer process: {err}"))?;
        let pid = child.id();
        if let Some(entry) = self.slots.get_mut(slot) {
            *entry = Some((child, pid, log_path));
        }
        Ok(pid)
    }

    pub fn live(&self) -> Vec<(usize, u32)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, entry)| entry.as_ref().map(|(_, pid, _)| (slot, *pid)))
            .collect()
    }

    /// Consumers that exited on their own: (slot, pid, status).
    pub fn reap(&mut self) -> Vec<(usize, u32, String)> {
        let mut exited = Vec::new();
        for (slot, entry) in self.slots.iter_mut().enumerate() {
            let status = match entry {
                Some((child, _, _)) => match child.try_wait() {
                    Ok(Some(status)) => status.to_string(),
                    Ok(None) => continue,
                    Err(err) => err.to_string(),
                },
                None => continue,
            };
            if let Some((_, pid, _)) = entry.take() {
                exited.push((slot, pid, status));
            }
        }
        exited
    }

    /// `kill -9` of the consumer in `slot`; returns its pid.
    pub fn kill(&mut self, slot: usize) -> Option<u32> {
        let (mut child, pid, _) = self.slots.get_mut(slot)?.take()?;
        if !signal(pid, "KILL") {
            let _ = child.kill();
        }
        let _ = child.wait();
        Some(pid)
    }

    /// SIGTERM to all, wait for them to stop; SIGKILL after `limit`.
    /// Returns how many stopped gracefully, and the (pid, log) of those killed.
    pub async fn terminate(&mut self, limit: Duration) -> (usize, Vec<(u32, PathBuf)>) {
        for (_, pid) in self.live() {
            signal(pid, "TERM");
        }
        let deadline = Instant::now() + limit;
        let mut graceful = 0;
        loop {
            for (slot, status) in self.reap().into_iter().map(|(s, _, st)| (s, st)) {
                if status.contains("exit status: 0") {
                    graceful += 1;
                } else {
                    eprintln!("consumer in slot {slot} stopped with {status}");
                }
            }
            if self.live().is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut killed = Vec::new();
        for (slot, pid) in self.live() {
            let log = self
                .slots
                .get(slot)
                .and_then(|entry| entry.as_ref().map(|(_, _, log)| log.clone()))
                .unwrap_or_default();
            if self.kill(slot).is_some() {
                killed.push((pid, log));
            }
        }
        (graceful, killed)
    }
}

impl Drop for Consumers {
    fn drop(&mut self) {
        for entry in &mut self.slots {
            if let Some((mut child, pid, _)) = entry.take() {
                signal(pid, "CONT");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
