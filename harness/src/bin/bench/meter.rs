//! Clocks and CPU meters: the harness's own clock (the open-loop publish
//! timestamps), and the CPU a drain costs in this process, in Redis and in
//! the local RabbitMQ node (`/proc/<pid>/stat`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the harness started (the open-loop publish timestamp).
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// utime + stime of this process, in clock ticks.
pub fn cpu_ticks() -> Option<u64> {
    stat_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// utime + stime from the text of a `/proc/<pid>/stat`.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces: fields after the last ')'
    // start with field 3 (state); utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `getconf CLK_TCK`, read once; 100 (the usual value on Linux) if that fails.
pub fn clock_ticks_per_s() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Wall clock and CPU time of a drain.
pub struct Meter {
    started: Instant,
    cpu: Option<u64>,
}

pub struct Measured {
    pub elapsed: Duration,
    pub cpu_us: Option<f64>,
}

impl Meter {
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            cpu: cpu_ticks(),
        }
    }

    pub fn stop(&self) -> Measured {
        let elapsed = self.started.elapsed();
        let cpu_us = match (self.cpu, cpu_ticks()) {
            (Some(before), Some(after)) => {
                Some(after.saturating_sub(before) as f64 * 1e6 / clock_ticks_per_s())
            }
            _ => None,
        };
        Measured { elapsed, cpu_us }
    }
}

/// Server-side CPU during a drain: Redis and the RabbitMQ node. Both are
/// shared with whatever else runs on the machine.
pub struct ServerCpu {
    pub redis_us: Option<f64>,
    pub broker_us: Option<f64>,
}

/// The local RabbitMQ node's processes (`beam.smp`).
pub fn broker_pids() -> Vec<u32> {
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = proc_dir
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// utime + stime of the local RabbitMQ node (`beam.smp` processes), in
/// clock ticks; `None` when it is not on this machine or not readable.
pub fn broker_cpu_ticks() -> Option<u64> {
    let mut total = None;
    for pid in broker_pids() {
        if let Some(ticks) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat_ticks(&stat))
        {
            total = Some(total.unwrap_or(0) + ticks);
        }
    }
    total
}
