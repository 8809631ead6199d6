//! CPU time of processes, from `/proc/<pid>/stat`: what the benchmark
//! charges to the consumer, Redis and the broker, and what the
//! `layer_cost` example charges to the layer.
//!
//! ```no_run
//! let before = harness::cpu::process_ticks();
//! // ... the work to measure ...
//! if let Some(us) = harness::cpu::ticks_us(before, harness::cpu::process_ticks()) {
//!     println!("{us:.0} µs of CPU");
//! }
//! ```

use std::sync::OnceLock;

/// utime + stime of this process, in clock ticks.
pub fn process_ticks() -> Option<u64> {
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

/// The CPU time between two tick readings, in µs; `None` when either
/// reading failed.
pub fn ticks_us(before: Option<u64>, after: Option<u64>) -> Option<f64> {
    Some(after?.saturating_sub(before?) as f64 * 1e6 / clock_ticks_per_s())
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
