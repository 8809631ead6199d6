//! `naive`: the obvious implementation, a deadpool-redis connection checked
//! out per command, `SET key 1 NX EX 86400` to claim, `SET key done EX 86400`
//! to mark done, one ack per message.

use lapin::message::Delivery;
use lapin::options::BasicNackOptions;

use crate::stats::{RunStats, message_id};
use crate::variants::ack_one;

/// Retention of the naive variant's keys, as the issue describes it.
const NAIVE_TTL_SECS: u64 = 86_400;

/// A pool checkout. deadpool-redis recycles an idle connection with a
/// pipelined `UNWATCH` + `PING` before handing it out (and a new connection
/// starts with a handshake), so every checkout is one more round trip: it is
/// counted in `redis_roundtrips_per_msg` along with the commands themselves.
pub async fn checkout(
    pool: &deadpool_redis::Pool,
    stats: &RunStats,
) -> Result<deadpool_redis::Connection, String> {
    RunStats::count(&stats.redis_roundtrips);
    pool.get().await.map_err(|err| err.to_string())
}

/// The obvious implementation: a pool checkout per command, claim with
/// `SET NX EX`, mark done with a second `SET`, one ack per message. A key
/// that already exists is taken as a duplicate and acked.
pub async fn naive(
    pool: &deadpool_redis::Pool,
    key_prefix: &str,
    delivery: &Delivery,
    stats: &RunStats,
    start: u64,
) {
    let id = message_id(delivery);
    let key = match &delivery.properties.message_id() {
        Some(message_id) => format!("{key_prefix}:{}", message_id.as_str()),
        None => format!("{key_prefix}:none"),
    };
    let claimed: Result<bool, String> = async {
        let mut conn = checkout(pool, stats).await?;
        RunStats::count(&stats.redis_roundtrips);
        let reply: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(NAIVE_TTL_SECS)
            .query_async(&mut conn)
            .await
            .map_err(|err| err.to_string())?;
        Ok(reply.is_some())
    }
    .await;
    let marked: Result<(), String> = match claimed {
        Ok(true) => {
            stats.handle(id).await;
            async {
                let mut conn = checkout(pool, stats).await?;
                RunStats::count(&stats.redis_roundtrips);
                redis::cmd("SET")
                    .arg(&key)
                    .arg("done")
                    .arg("EX")
                    .arg(NAIVE_TTL_SECS)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|err| err.to_string())
            }
            .await
        }
        Ok(false) => {
            RunStats::count(&stats.duplicates);
            Ok(())
        }
        Err(err) => Err(err),
    };
    match marked {
        Ok(()) => ack_one(delivery, stats, start).await,
        Err(err) => {
            eprintln!("bench: naive: Redis failed for {key}: {err}; requeueing");
            RunStats::count(&stats.errors);
            RunStats::count(&stats.requeued);
            RunStats::count(&stats.ack_calls);
            let options = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            let _ = delivery.acker.nack(options).await;
        }
    }
}
