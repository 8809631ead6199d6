//! Questions to a Redis in use, on an admin connection: how many commands
//! it ran and how much CPU it used (`INFO`), and deleting the keys of a run.

use redis::aio::MultiplexedConnection;

/// Sum of `calls=` over the `cmdstat_*` lines of `INFO commandstats`.
pub async fn redis_commands(admin: &mut MultiplexedConnection) -> Result<u64, String> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .map_err(|err| format!("INFO commandstats failed: {err}"))?;
    Ok(info
        .lines()
        .filter(|line| line.starts_with("cmdstat_"))
        .filter_map(|line| {
            let calls = line.split_once("calls=")?.1;
            calls.split(',').next()?.trim().parse::<u64>().ok()
        })
        .sum())
}

/// Redis server CPU (`used_cpu_user` + `used_cpu_sys` of `INFO cpu`), seconds.
pub async fn redis_cpu_s(admin: &mut MultiplexedConnection) -> Option<f64> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(admin)
        .await
        .ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// Deletes the keys that start with `prefix` (SCAN MATCH + UNLINK in batches).
pub async fn unlink_prefix(admin: &mut MultiplexedConnection, prefix: &str) -> Result<u64, String> {
    let pattern = format!("{prefix}*");
    let mut cursor = 0_u64;
    let mut removed = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(admin)
            .await
            .map_err(|err| format!("SCAN {pattern} failed: {err}"))?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(admin)
                .await
                .map_err(|err| format!("UNLINK failed: {err}"))?;
            removed += n;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}
