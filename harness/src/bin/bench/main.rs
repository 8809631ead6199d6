//! Benchmark harness (issue 5): what does the idempotency middleware cost
//! compared with a plain lapin consumer on the same broker, in the same run?
//!
//! It pre-fills a fresh queue on the local RabbitMQ (publisher confirms,
//! pipelined in batches) and drains it with each variant, interleaved
//! (A B C A B C ...) for several rounds:
//!
//! - `raw_single`: plain lapin consume + one `basic.ack` per message;
//! - `raw_multi`: plain lapin consume + `basic.ack(multiple=true)` over the
//!   contiguous prefix of finished delivery tags. The faster of the two
//!   `raw` sub-variants is the ceiling (`raw_msgs_per_s` in the summary);
//! - `naive`: the obvious implementation: a deadpool-redis pool, one
//!   connection checked out per command, `SET key 1 NX EX 86400` to claim,
//!   then `SET key done EX 86400` to mark done, one ack per message;
//! - `redis_floor`: the Redis CPU any claim-then-mark design pays: per
//!   message `SET key p NX PX 30000` before the handler and
//!   `SET key d PX 86400000` after it, with no other logic (a key that
//!   exists is a duplicate), the requests that wait together sent as one
//!   pipeline with the store's limits (512 a pipeline, 4 under way), and the
//!   deliveries acked like `raw_multi`;
//! - `ours`: the crate's [`serve`] runner + [`IdempotencyLayer`] on a
//!   [`RedisStore`], default [`Config`] apart from the prefetch and a key
//!   prefix unique to the run;
//! - `ours_outbox`: `ours` with an outbox
//!   ([`IdempotencyLayer::with_outbox`] with `OutboxPublisher::connect`, a
//!   connection of its own): the handler also stages one message per
//!   delivery (its body, transient) for `{queue}.downstream`, which the
//!   bench declares, then reads after the drain (outside the measured time)
//!   and deletes. Each message costs the commit of the done mark with its
//!   outbox, a publish awaited on a confirm channel, and the mark that it
//!   was dispatched, before the ack;
//! - `ours_hold` and `ours_broker` (with `--failing F` > 0; never by
//!   default otherwise): `ours` whose handler always fails (retryably) a
//!   share F of the message ids, chosen pseudo-randomly and the same in
//!   every round, so each of them runs `IDEMPOTENCY_MAX_ATTEMPTS` (5)
//!   times and is parked in `{queue}.dead`. `ours_hold` retries them with
//!   `IDEMPOTENCY_RETRY=hold` (held in the consumer for the backoff, then
//!   requeued), `ours_broker` with `broker` (a confirmed copy waits in the
//!   delay queue `{queue}.retry.<delay>`, the original acked at once). The
//!   backoff is `--failing-backoff-ms` (100) doubling up to 8 times that
//!   (100, 200, 400, 800 ms: 1.5 s of waiting per failing message), short
//!   enough for a run of a few minutes and long enough to matter: with
//!   `hold` every wait keeps one of the `--prefetch` slots, so the slots
//!   fill with failing messages and the healthy ones behind them stall,
//!   which is what issue 21 set out to fix; with `broker` the slots stay
//!   free. The default backoff (500ms doubling to 30s, 7.5 s of waiting per
//!   failing message over 5 attempts) would make the gap larger still.
//!
//! [`serve`]: amqp_idempotency::serve
//! [`IdempotencyLayer`]: amqp_idempotency::IdempotencyLayer
//! [`IdempotencyLayer::with_outbox`]: amqp_idempotency::IdempotencyLayer::with_outbox
//! [`RedisStore`]: amqp_idempotency::store::RedisStore
//! [`Config`]: amqp_idempotency::Config
//!
//! Every variant processes up to `--prefetch` deliveries at once (spawned
//! tasks bounded by a semaphore, like the runner), and its handler does the
//! same thing: sleep `--handler-delay-ms` when it is above zero, then count
//! one execution for the message id.
//!
//! Per variant and round it prints one JSON line:
//!
//! - `msgs_per_s`: published messages / time from `basic.consume` to the last ack;
//! - `p50_ms`, `p99_ms`: delivery-to-ack latency. Pre-filled: from the moment
//!   the consumer got the delivery to the return of the ack call. Open loop
//!   (`--open-loop-rate`): from the publish timestamp (header
//!   `x-bench-sent-ns`, nanoseconds since the harness started) to the ack.
//!   For `ours` the runner acks internally, so the end point is the moment
//!   the service returned its `Outcome`; the runner issues the ack right after;
//! - `redis_roundtrips_per_msg`: client-side count (naive: commands sent
//!   plus pool checkouts, each of which costs deadpool-redis's recycle
//!   `UNWATCH`+`PING` round trip; ours: pipelines sent, from
//!   `RedisStore::round_trips`, since requests that wait together share one;
//!   ours_mem: calls to the store primitives, through `CountingStore`);
//! - `redis_cmds_per_msg`: from `INFO commandstats` (sum of `calls=`) before
//!   and after the drain. Server-wide: commands run inside Lua scripts count
//!   too, and so do other clients of the same Redis (noise);
//! - `ack_frames_per_msg`: ack/nack/reject calls issued by the consumer;
//! - `consumer_cpu_us_per_msg`: utime + stime of this process
//!   (`/proc/self/stat`, converted with `getconf CLK_TCK`, 100 if unknown)
//!   during the drain, per message. In open-loop mode it includes the publisher;
//! - `redis_server_cpu_us_per_msg` (`INFO cpu`, summed over the nodes of a
//!   cluster) and `broker_cpu_us_per_msg` (the local `beam.smp`'s
//!   `/proc/<pid>/stat`): server-side CPU during the drain, per message,
//!   `null` when unavailable. Both servers are shared, so other load on the
//!   machine shows up here;
//! - `processed` (distinct ids executed), `duplicates` (deliveries suppressed
//!   as duplicates; for raw, executions beyond the first), plus `published`,
//!   `unique`, `executions`, `ok`;
//! - `outgoing_received`, `outgoing_distinct` (ours_outbox; `null` for the
//!   others): messages found downstream, and their distinct `message_id`s,
//!   which must number `unique`;
//! - `healthy_msgs_per_s` (ours_hold and ours_broker; `null` for the
//!   others): published messages whose id does not fail, divided by the
//!   time from the first handler run to the ack of the last of them (the
//!   start, such as declaring the delay queues, and the failing messages'
//!   tail are left out); `parked` (failing deliveries parked after their
//!   last attempt: all of them), `retries` (failed runs retried) and
//!   `retried_via_broker` (copies confirmed in a delay queue: the runner's
//!   `ServeReport::retried`; 0 with hold).
//!
//! The last line is the summary (medians over rounds):
//! `{"raw_msgs_per_s":..,"ours_msgs_per_s":..,"naive_msgs_per_s":..,"ratio":ours/raw,"redis_roundtrips_per_msg":..,"p99_ms":..}`
//! (round trips and p99 are `ours`'; extra keys follow). In open-loop mode
//! every variant runs at the publish rate, so look at the latencies, not the ratio.
//! Among the extra keys:
//!
//! - `store`: `standalone` (`REDIS_URL`) or `cluster` (`REDIS_CLUSTER_NODES`);
//! - `pinned`: whether `--pin-redis` pinned the processes;
//! - `consumer_overhead_us_per_msg`: median `consumer_cpu_us_per_msg` of
//!   `ours` minus that of `raw_multi`, in the same run (`null` unless both ran);
//! - `raw_consumer_cpu_us_per_msg`: `raw_multi`'s median
//!   `consumer_cpu_us_per_msg`, the base of that overhead (`null` when it
//!   did not run);
//! - `redis_floor_cpu_us_per_msg`: `redis_floor`'s median
//!   `redis_server_cpu_us_per_msg`, to hold `redis_cpu_us_per_msg` against
//!   (`null` when it did not run);
//! - `redis_cpu_us_per_msg`, `broker_cpu_us_per_msg`: `ours`' medians of
//!   `redis_server_cpu_us_per_msg` and `broker_cpu_us_per_msg`;
//! - `bytes_per_done_record`: `INFO memory` `used_memory` growth (summed
//!   over the masters of a cluster) over 50,000 done records written
//!   through `RedisStore` (`machine::claim` then `machine::complete`, default
//!   lease and retention, keys `idem:bench1:<16 hex digits>`, deleted
//!   afterwards), measured once per run before the rounds; `null`, with the
//!   reason on stderr, when it cannot be measured. Other clients of the
//!   same Redis make it noisy;
//! - `skipped`: variants asked for but not run (`naive` and `redis_floor`
//!   on a cluster);
//! - `outbox_msgs_per_s`, `outbox_redis_roundtrips_per_msg`: `ours_outbox`'s
//!   medians of `msgs_per_s` and `redis_roundtrips_per_msg` (pipelines, from
//!   `RedisStore::round_trips`, as for `ours`), `null` when it did not run;
//! - `failing`: `--failing`; `failing_retry_backoff`: the delays the failing
//!   messages wait between their attempts (`null` without `--failing`);
//! - `healthy_msgs_per_sec_hold`, `healthy_msgs_per_sec_broker`: the
//!   medians of `ours_hold`'s and `ours_broker`'s `healthy_msgs_per_s`, side
//!   by side (`null` when they did not run).
//!
//! `--pin-redis` puts the Redis server(s) of the store on CPU 1 and the
//! local RabbitMQ node (`beam.smp`) and the benchmark itself (every
//! thread) on CPU 0 with `taskset`, as if Redis had a host of its own, and
//! restores every saved affinity when the run ends, fails or is
//! interrupted (Ctrl-C, SIGTERM). It needs `taskset` (util-linux), CPUs 0
//! and 1, and a Redis on this machine (`INFO server` `process_id` naming a
//! local `redis-server` or `valkey-server` whose `tcp_port` is the URL's).
//!
//! The process exits non-zero when a variant lost a message or ran one twice
//! (`processed != unique`, or, for naive and ours, `executions != unique`;
//! for ours_hold and ours_broker, each healthy id once and every failing
//! delivery parked),
//! or when ours_outbox's downstream queue does not hold `unique` distinct
//! message ids. Queues and Redis keys of the run are deleted at the end;
//! each variant consumes a queue of the same name in every round, and the
//! retry delay queues the runner declares for it (for `ours`, `ours_outbox`
//! and `ours_mem` too: `broker` is the library's default) are deleted once
//! the rounds are over and they are empty (not right after their declare,
//! which can crash RabbitMQ 3.10's at-least-once dead-lettering).
//!
//! ```text
//! cargo run --release -p harness --bin bench -- --messages 100000 --prefetch 256 --payload 64 --rounds 3
//! cargo run --release -p harness --bin bench -- --open-loop-rate 10000 --variants raw,ours
//! cargo run --release -p harness --bin bench -- --pin-redis   # Redis on a CPU of its own
//! cargo run -p harness --bin bench -- --quick          # 2000 messages, 1 round: for CI
//! cargo run --release -p harness --bin bench -- --pin-redis --failing 0.1 --messages 20000
//! ```
//!
//! Options: `--messages N` (100000), `--payload BYTES` (64), `--prefetch P`
//! (256), `--duplicates F` (fraction of the messages that re-publish an
//! earlier message id with the same body, 0), `--handler-delay-ms D` (0),
//! `--rounds R` (3), `--variants raw,naive,redis_floor,ours,ours_outbox` (all; `raw_single` and
//! `raw_multi` select one raw sub-variant; `ours_mem`, never run by default,
//! is ours over a plain in-process map instead of Redis: what the runner and
//! layer cost by themselves; `ours_hold` and `ours_broker` are added by
//! `--failing`), `--failing F` (0: a share of always-failing message ids,
//! see above), `--failing-backoff-ms B` (100), `--open-loop-rate MSGS_PER_S`
//! (publish concurrently at that rate instead of pre-filling), `--pin-redis`
//! (see above), `--quick`
//! (2000 messages and 1 round unless given explicitly).
//!
//! Services: `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`)
//! and `REDIS_URL` (default `redis://127.0.0.1:6379`). Queues are
//! non-durable and messages transient, so the numbers measure the consumer
//! side rather than the broker's disk. With `REDIS_CLUSTER_NODES`
//! (comma-separated `redis://` URLs of the cluster's nodes) set, `ours`'
//! store is built from `Config::from_env()` and must write to that cluster
//! (checked with one record first), the `INFO` counters are read on those
//! nodes, and `naive` and `redis_floor`, which send plain `SET`s to one
//! server, are skipped.
//!
//! # Where things are
//!
//! - [`options`]: the command line;
//! - [`plan`]: the message ids to publish and their bodies;
//! - [`publish`]: pre-filling a queue, or publishing in open loop;
//! - [`variants`]: the consumers under test (`raw`, `naive`, `redis_floor`, `ours`, `ours_outbox`);
//! - [`stats`]: what a drain counts, and when it is done;
//! - [`meter`]: wall clock and CPU (this process, Redis, the broker);
//! - [`servers`]: the Redis server(s) of the store: `INFO`, their processes, clean-up;
//! - [`footprint`]: the memory a done record takes (`bytes_per_done_record`);
//! - [`pin`]: the CPU pinning of `--pin-redis`, and its undoing;
//! - [`run`](mod@run): the rounds, one fresh queue per variant and round;
//! - [`report`]: the JSON lines.
//!
//! Connecting to the services and the Redis `INFO` counters come from the
//! `harness` library.

mod footprint;
mod meter;
mod options;
mod pin;
mod plan;
mod publish;
mod report;
mod run;
mod servers;
mod stats;
mod variants;

use std::process::ExitCode;

use tokio::sync::watch;

use crate::options::parse_args;
use crate::run::{INTERRUPTED, run};

const USAGE: &str = "usage: bench [--messages N] [--payload BYTES] [--prefetch P] [--duplicates F]
             [--handler-delay-ms D] [--rounds R] [--variants raw,naive,redis_floor,ours,ours_outbox]
             [--failing F] [--failing-backoff-ms B]
             [--open-loop-rate MSGS_PER_S] [--runtime current|multi] [--pin-redis] [--quick]
--runtime: the tokio runtime every variant runs on (default current: one thread,
           fewer wakeups, the faster choice on a small machine)
--failing: a share F of the message ids always fails in the variants ours_hold and
           ours_broker, added to the run: ours retrying with IDEMPOTENCY_RETRY=hold and
           =broker, backoff B ms (100) doubling to 8 B; their healthy messages'
           throughput is reported side by side (20000 messages keep it to minutes)
--pin-redis: Redis on CPU 1, the RabbitMQ node and the benchmark on CPU 0 (taskset;
           needs 2 CPUs and a local Redis; the affinities are restored at the end)
env: AMQP_URL (amqp://guest:guest@127.0.0.1:5672/%2f), REDIS_URL (redis://127.0.0.1:6379),
     REDIS_CLUSTER_NODES (redis://host:port,...: the store is that cluster; naive and redis_floor are skipped)";

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("bench: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = if options.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bench: error: cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // The first Ctrl-C (or SIGTERM) stops the run, which deletes its queue
    // and keys and restores `--pin-redis`'s CPU affinities; a second one
    // drops the run at once (its pinning guard still restores them).
    let result = runtime.block_on(async {
        let (stop_tx, stop_rx) = watch::channel(false);
        let run = run(options, stop_rx);
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => return Some(result),
            () = interrupted() => {}
        }
        eprintln!("bench: interrupted; cleaning up (Ctrl-C again to stop at once)");
        let _ = stop_tx.send(true);
        tokio::select! {
            result = &mut run => Some(result),
            () = interrupted() => None,
        }
    });
    match result {
        Some(Ok(true)) => ExitCode::SUCCESS,
        Some(Ok(false)) => ExitCode::FAILURE,
        Some(Err(message)) if message == INTERRUPTED => ExitCode::from(130),
        Some(Err(message)) => {
            eprintln!("bench: error: {message}");
            ExitCode::FAILURE
        }
        None => {
            eprintln!("bench: stopped; the run's queue and Redis keys may be left behind");
            ExitCode::from(130)
        }
    }
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM; never, if neither
/// handler can be installed.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        (Err(err), _) | (_, Err(err)) => {
            eprintln!(
                "bench: cannot watch for Ctrl-C ({err}); an interrupted run leaves its state behind"
            );
            std::future::pending::<()>().await;
        }
    }
}
