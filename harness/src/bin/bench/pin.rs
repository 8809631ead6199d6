//! `--pin-redis`: Redis on CPU 1, the RabbitMQ node and the benchmark on
//! CPU 0, as if Redis had a host of its own, with `taskset` (util-linux).
//!
//! Every thread's affinity is saved first (`/proc/<pid>/task/<tid>/status`
//! `Cpus_allowed_list`: the RabbitMQ node binds some of its schedulers to a
//! CPU each) and restored when the [`Pinned`] guard is dropped: at the end of
//! the run, on an error, and on Ctrl-C or SIGTERM (`main` drops the run,
//! guard included). Only a SIGKILL leaves them pinned; the guard prints the
//! commands that undo it when it pins.

use std::process::Command;

/// The CPU Redis gets to itself.
pub const REDIS_CPU: u32 = 1;
/// The CPU the broker and the benchmark share.
pub const CONSUMER_CPU: u32 = 0;

/// A process to pin.
pub struct Target {
    /// What it is, for messages: `redis-server redis://127.0.0.1:6379`.
    pub label: String,
    pub pid: u32,
    pub cpu: u32,
}

/// The affinities of one process, before pinning.
struct Saved {
    label: String,
    pid: u32,
    /// The main thread's, which threads started since take.
    leader: String,
    /// (thread id, CPU list) of every thread.
    threads: Vec<(u32, String)>,
}

impl Saved {
    fn uniform(&self) -> bool {
        self.threads.iter().all(|(_, cpus)| *cpus == self.leader)
    }
}

/// Pinned processes; their affinities come back when this is dropped.
pub struct Pinned {
    saved: Vec<Saved>,
}

impl Pinned {
    /// Saves the affinities of `targets` and pins each to its CPU. Fails
    /// without `taskset`, on a machine with fewer than 2 CPUs, or when
    /// `taskset` refuses; whatever was pinned by then is restored.
    pub fn pin(targets: &[Target]) -> Result<Self, String> {
        check_taskset()?;
        check_cpus()?;
        let mut pinned = Self { saved: Vec::new() };
        for target in targets {
            pinned.saved.push(save(target)?);
        }
        for target in targets {
            // On failure, `pinned` is dropped and restores what was saved.
            taskset(&[
                "-a",
                "-p",
                "-c",
                &target.cpu.to_string(),
                &target.pid.to_string(),
            ])
            .map_err(|err| format!("--pin-redis: cannot pin {}: {err}", target.label))?;
        }
        let undo: Vec<String> = pinned
            .saved
            .iter()
            .map(|s| format!("taskset -a -p -c {} {}", s.leader, s.pid))
            .collect();
        eprintln!(
            "bench: pinned {}; the affinities are restored when the run ends (by hand, if it is killed: {})",
            targets
                .iter()
                .map(|t| format!("{} (pid {}) to CPU {}", t.label, t.pid, t.cpu))
                .collect::<Vec<_>>()
                .join(", "),
            undo.join("; ")
        );
        Ok(pinned)
    }

    /// Puts every saved affinity back (idempotent).
    pub fn restore(&mut self) {
        for saved in std::mem::take(&mut self.saved) {
            let pid = saved.pid;
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!(
                    "bench: {} (pid {pid}) is gone; nothing to restore",
                    saved.label
                );
                continue;
            }
            let result = if saved.uniform() {
                taskset(&["-a", "-p", "-c", &saved.leader, &pid.to_string()])
            } else {
                // Per thread: the saved list, or the main thread's for a
                // thread started since.
                threads(pid).into_iter().try_for_each(|tid| {
                    let cpus = saved
                        .threads
                        .iter()
                        .find(|(t, _)| *t == tid)
                        .map_or(&saved.leader, |(_, cpus)| cpus);
                    match taskset(&["-p", "-c", cpus, &tid.to_string()]) {
                        // A thread that ended meanwhile needs nothing.
                        Err(_)
                            if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}"))
                                .exists() =>
                        {
                            Ok(())
                        }
                        other => other,
                    }
                })
            };
            match result {
                Ok(()) => eprintln!(
                    "bench: restored the CPU affinity of {} (pid {pid}): {}",
                    saved.label,
                    if saved.uniform() {
                        saved.leader.clone()
                    } else {
                        format!("{} per thread", saved.threads.len())
                    }
                ),
                Err(err) => eprintln!(
                    "bench: cannot restore the CPU affinity of {} (pid {pid}): {err}; run `taskset -a -p -c {} {pid}`",
                    saved.label, saved.leader
                ),
            }
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Runs `taskset` with `args`, its output captured (stdout is the JSON).
fn taskset(args: &[&str]) -> Result<(), String> {
    let output = Command::new("taskset")
        .args(args)
        .output()
        .map_err(|err| format!("cannot run taskset: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`taskset {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn check_taskset() -> Result<(), String> {
    match Command::new("taskset").arg("--version").output() {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(
            "--pin-redis needs `taskset`, which is not installed: it comes with util-linux (Debian: `apt-get install util-linux`)"
                .into(),
        ),
        Err(err) => Err(format!("--pin-redis: cannot run taskset: {err}")),
    }
}

/// CPUs 0 and 1 must be online (`/sys/devices/system/cpu/online`).
fn check_cpus() -> Result<(), String> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map_err(|err| format!("--pin-redis: cannot read the online CPUs: {err}"))?;
    let cpus = parse_cpu_list(online.trim()).ok_or_else(|| {
        format!(
            "--pin-redis: cannot parse the online CPU list `{}`",
            online.trim()
        )
    })?;
    if cpus.len() < 2 || !cpus.contains(&REDIS_CPU) || !cpus.contains(&CONSUMER_CPU) {
        return Err(format!(
            "--pin-redis needs 2 CPUs (Redis on CPU {REDIS_CPU}, the broker and the benchmark on CPU {CONSUMER_CPU}); this machine has {} online ({})",
            cpus.len(),
            online.trim()
        ));
    }
    Ok(())
}

/// `0-3,6,8-9` as the CPUs it names.
pub fn parse_cpu_list(list: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// The thread ids of `pid`.
fn threads(pid: u32) -> Vec<u32> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    tids
}

/// `Cpus_allowed_list` of `/proc/<pid>/task/<tid>/status`.
fn allowed(pid: u32, tid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map(|cpus| cpus.trim().to_owned())
}

fn save(target: &Target) -> Result<Saved, String> {
    let pid = target.pid;
    let leader = allowed(pid, pid).ok_or_else(|| {
        format!(
            "--pin-redis: cannot read the CPU affinity of {} (pid {pid}) from /proc/{pid}/status",
            target.label
        )
    })?;
    let threads = threads(pid)
        .into_iter()
        .filter_map(|tid| Some((tid, allowed(pid, tid)?)))
        .collect();
    Ok(Saved {
        label: target.label.clone(),
        pid,
        leader,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_cpu_list("x"), None);
    }
}
