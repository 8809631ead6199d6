//! Clocks and CPU meters: the harness's own clock (the open-loop publish
//! timestamps), and the CPU a drain costs in this process, in Redis and in
//! the local RabbitMQ node (`/proc/<pid>/stat`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use harness::cpu::{process_ticks, stat_ticks, ticks_us};

pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the harness started (the open-loop publish timestamp).
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
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
            cpu: process_ticks(),
        }
    }

    pub fn stop(&self) -> Measured {
        let elapsed = self.started.elapsed();
        Measured {
            elapsed,
            cpu_us: ticks_us(self.cpu, process_ticks()),
        }
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
