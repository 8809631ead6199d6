//! `bytes_per_done_record`: what one done record costs in Redis memory,
//! measured once per run on the store the run uses.
//!
//! 50,000 records go through the library's public API, as the layer writes
//! them: [`machine::claim`] then [`machine::complete`] with the default lease
//! and retention, under the default key prefix `idem`, a 6-character scope
//! (`bench1`) and 16-character message ids, i.e. the keys
//! [`record_key`]`("idem", "bench1", id)`, each with a payload hash as long
//! as the layer's (32 hex digits). `INFO memory` `used_memory` (summed over
//! the masters of a cluster) is read before and after, each time after a
//! pause so that lazy frees settle; the difference over 50,000 is the
//! figure. The ids start at a number unique to the run (still 16 hex
//! digits), so that two runs at once do not share records, and exactly
//! these keys are deleted afterwards.
//!
//! Other clients of the same Redis change `used_memory` too: on a busy
//! server the figure is noisy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use amqp_idempotency::Config;
use amqp_idempotency::fingerprint::record_key;
use amqp_idempotency::store::{ClaimOutcome, RedisStore, Token, machine};
use futures_util::StreamExt;

use crate::servers::Servers;

/// How many done records are written.
pub const RECORDS: u64 = 50_000;
/// Claims and completes in flight at once.
const IN_FLIGHT: usize = 512;
/// The library's default key prefix.
const PREFIX: &str = "idem";
/// A 6-character scope (a queue name).
const SCOPE: &str = "bench1";
/// The retention of a done record: `Config`'s default (`IDEMPOTENCY_DONE_TTL`,
/// 24 h), which `Config` has no getter for. It sets the expiry only, not
/// the size.
const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Before each `used_memory` reading.
const SETTLE: Duration = Duration::from_secs(1);

/// Writes [`RECORDS`] done records through `store`, reads the memory they
/// take on `servers`, deletes them, and returns the bytes per record.
pub async fn bytes_per_done_record(
    store: &RedisStore,
    servers: &mut Servers,
) -> Result<f64, String> {
    let base = run_unique_base();
    let keys: Vec<String> = (0..RECORDS)
        .map(|i| record_key(PREFIX, SCOPE, &format!("{:016x}", base.wrapping_add(i))))
        .collect();
    let common_prefix = format!("{PREFIX}:{SCOPE}:");
    let lease = Config::default().lease_ttl();
    tokio::time::sleep(SETTLE).await;
    let before = servers.used_memory().await?;
    let unexpected = AtomicU64::new(0);
    let mut failure = None;
    let mut writes = futures_util::stream::iter(keys.iter().enumerate())
        .map(|(i, key)| {
            let unexpected = &unexpected;
            async move {
                // As long as the layer's payload hash (128 bits in hex).
                let payload_hash = format!("{base:016x}{i:016x}");
                match machine::claim(store, key, &Token::new(), &payload_hash, lease).await {
                    Ok(ClaimOutcome::Acquired(claim)) => {
                        if !machine::complete(store, &claim, RETENTION).await? {
                            unexpected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {
                        unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => return Err(err),
                }
                Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT);
    while let Some(result) = writes.next().await {
        if let Err(err) = result {
            failure.get_or_insert(err);
        }
    }
    drop(writes);
    tokio::time::sleep(SETTLE).await;
    let after = servers.used_memory().await;
    let removed = servers.unlink_keys(&keys, &common_prefix).await;
    if let Some(err) = failure {
        return Err(format!("writing the records failed: {err}"));
    }
    let after = after?;
    let removed = removed.map_err(|err| format!("cannot delete the {RECORDS} records: {err}"))?;
    let unexpected = unexpected.into_inner();
    if unexpected > 0 {
        return Err(format!(
            "{unexpected} of the {RECORDS} keys were not fresh or not ours to complete"
        ));
    }
    if removed != RECORDS {
        return Err(format!(
            "found {removed} of the {RECORDS} records on the {} afterwards{}",
            servers.kind(),
            if servers.cluster {
                ": the store wrote elsewhere (does this amqp-idempotency connect RedisStore::connect to REDIS_CLUSTER_NODES?)"
            } else {
                ""
            }
        ));
    }
    let grown = after as f64 - before as f64;
    if grown <= 0.0 {
        return Err(format!(
            "used_memory did not grow ({before} B before, {after} B after): other clients freed memory meanwhile"
        ));
    }
    Ok(grown / RECORDS as f64)
}

/// A start for the message ids, unique to this run: the clock's
/// nanoseconds and the process id.
fn run_unique_base() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (nanos ^ (u64::from(std::process::id()) << 40)) & !0xf_ffff
}
