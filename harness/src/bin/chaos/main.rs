//! Fault-injection suite for `amqp-idempotency` (issue 4): proves with
//! numbers that no message is lost and that every duplicate effect falls in
//! one of the windows DESIGN.md admits, while consumers are killed, paused,
//! aborted by a poison message and cut off from Redis and RabbitMQ, Redis
//! refuses writes, and handlers time out while their work goes on.
//!
//! # What it does
//!
//! 1. Starts its own `redis-server` on a free port (AOF with
//!    `appendfsync always` in a temporary directory, so a restart keeps the
//!    keys; the shared Redis on 6379 is never touched), declares a fresh
//!    queue on the real RabbitMQ at `AMQP_URL` with a dead-letter exchange
//!    and queue behind it, and opens two TCP proxies on `127.0.0.1:0`, one
//!    to Redis and one to RabbitMQ.
//! 2. Starts `--consumers` consumer processes: this same binary re-executed
//!    with a hidden `--role consumer`. They reach Redis and RabbitMQ only
//!    through the proxies and run `serve_reconnecting` with the idempotency
//!    layer (lease 2s, handler timeout 1500ms, prefetch 32, 4 attempts,
//!    retry backoff 50ms..400ms, dead letters republished with their
//!    `x-idempotency-*` headers, and retries as `--retry` says, see below).
//!    The handler works 0-1ms, performs its effect (a ledger line), then
//!    works 0-1ms more.
//! 3. Publishes `--messages` unique messages (each with a `message_id`), a
//!    `--duplicates` fraction of them a second time (same `message_id`, same
//!    body; half of the copies right after their original, half anywhere),
//!    `--poison` messages (the handler always fails them, retryable, so they
//!    are dead-lettered after the last attempt), `--transient` messages
//!    `t<i>` (the handler fails them, retryable, on their first run, or
//!    their first two for odd `i`, then they behave like plain ones: each
//!    must take effect exactly once) and `--no-fingerprint`
//!    messages (no `message_id`, empty body: dead-lettered by the default
//!    policy), shuffled. Half of them go out evenly over about one round of
//!    faults (or `N / --rate` seconds if longer), the other half in bursts
//!    released just before each fault, so that faults hit consumers with
//!    full prefetch windows.
//! 4. Meanwhile injects faults, one every `--fault-interval-ms` (jittered),
//!    in rounds that each hold every enabled kind once, ordered by a PRNG
//!    seeded with `--seed`:
//!    - `kill`: `kill -9` of a random consumer; a new one takes its slot;
//!    - `pause`: `SIGSTOP` of a random consumer for the lease plus 1s, then `SIGCONT`;
//!    - `redis-restart`: `kill -9` of the redis-server, restarted on the same
//!      port and directory after a short outage;
//!    - `redis-cut`: every connection through the Redis proxy is dropped;
//!    - `amqp-cut`: every connection through the RabbitMQ proxy is dropped;
//!    - `redis-oom`: `maxmemory 1` with `noeviction` for 0.3-1s, then lifted;
//!    - `redis-password`: `requirepass` set and every consumer connection
//!      killed (reconnects are refused), then the password removed again;
//!    - `redis-readonly`: `REPLICAOF` a port nothing listens on, then
//!      `REPLICAOF NO ONE`;
//!    - `handler-timeout`: publishes `s<i>`, whose first handler run spawns
//!      its work and waits for it past the handler timeout: the layer gives
//!      up, the work goes on and takes effect, and the retry must not run
//!      beside it (each run writes when its work began and ended);
//!    - `poison-abort`: publishes `a<i>`, whose handler aborts its consumer
//!      process; after 4 such runs the message must be dead-lettered as
//!      `crashed` without running again.
//!
//!    The three Redis faults leave `PING` answering: consumers must pause
//!    until a write succeeds, and dead-letter nothing.
//!
//!    With `--failover`, a different Redis and one more fault (see below).
//!    With `--outbox`, the handlers also publish through the outbox (see below).
//!    Every kind of fault runs under either `--retry` mode.
//! 5. Stops injecting once everything is published, every enabled fault
//!    happened at least once and every message is accounted for; waits for
//!    the queue to drain (no ready message, none waiting in a delay queue,
//!    no handler in flight, nothing written to the ledger for a few
//!    seconds); stops the consumers with SIGTERM; reads the dead-letter
//!    queue; deletes the queues (the delay queues once they are empty, at
//!    least 5s after the consumers stopped: RabbitMQ 3.10 can crash its
//!    at-least-once dead-lettering supervisor when such a quorum queue is
//!    deleted right after it was declared).
//!
//! # `--retry broker|hold`: where a failed message waits
//!
//! The consumers get `IDEMPOTENCY_RETRY` set to the mode (default
//! `broker`). With `broker`, the runner of each consumer declares the delay
//! queues `{queue}.retry.50ms`, `.100ms`, `.200ms` and `.400ms` (quorum,
//! dead-lettering back to the queue) and a retryable failure (a poison
//! message, a transient one, a timed-out handler) is retried by a copy
//! confirmed in the delay queue of its backoff step, the original acked
//! only then; a copy that is not confirmed (an `amqp-cut`) leaves the
//! original held and requeued. With `hold`, the consumer holds the delivery
//! for the backoff, then requeues it. Each consumer counts its retries as
//! they happen, from the library's `idempotency_retried_total{via}`
//! metric, into the ledger (`retried` lines): a copy is counted once the
//! broker confirmed it, and a `kill -9` loses no count.
//!
//! # `--failover`: a master, a replica and three sentinels
//!
//! Instead of the single redis-server and its proxy, the suite starts on
//! free ports a master and its replica (`--replicaof`), both without
//! persistence (`--save "" --appendonly no`: a killed master loses what it
//! had not replicated), and three sentinels (`redis-sentinel`, else
//! `redis-server --sentinel`; `sentinel monitor chaos 127.0.0.1 <master> 2`,
//! `down-after-milliseconds 3000`, `failover-timeout 5000`,
//! `parallel-syncs 1`), each in a directory of its own under the run
//! directory, and waits until every sentinel names the master, sees the
//! replica and knows the other sentinels. The consumers get
//! `REDIS_URL=redis-sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3#chaos`
//! and `IDEMPOTENCY_MIN_REPLICAS` (`--min-replicas N`, else that variable
//! of the caller's environment, else 0; at most 1, the pair has one
//! replica).
//!
//! The fault `failover`: `kill -9` of the master the sentinels name; once
//! every sentinel names the other server (60s at most, else the run fails),
//! the killed one is restarted on its old port, empty, as a plain server,
//! and the sentinels turn it into a replica of the new master (60s at
//! most); the next failover waits until it is online and every sentinel
//! sees it, then a jittered `--fault-interval-ms`. Each takes about 15s
//! on Redis 7.0: the 3s down-after and the election, then the sentinels'
//! 10s before they reconfigure a returning master. The down-after is
//! longer than the 2s stall after which a sentinel enters TILT mode, so
//! that a stalled machine does not make the sentinels fail over a master
//! on their own; if they do anyway, the suite says so on stderr with their
//! events, writes the failover it was waiting for to the ledger as ended
//! and follows theirs. The run goes on until `--min-failovers N` \[3\]
//! happened, and the messages are spread over that many; failovers go on
//! while messages are published, not after that once there were enough.
//! With `IDEMPOTENCY_MIN_REPLICAS=1` consumption stops from each kill until
//! the restarted server is a replica again (the pair has no other). The default
//! `--faults` is then `failover`; `kill`, `pause`, `amqp-cut`,
//! `handler-timeout` and `poison-abort` may be mixed in (e.g.
//! `--faults failover,kill,pause`); the other Redis faults act on the
//! single redis-server and are refused.
//!
//! A duplicate effect whose earlier execution returned `processed` (done
//! mark written, delivery acked) and whose mark was lost with the killed
//! master is *not* explained (see [`classify`]): without
//! `IDEMPOTENCY_MIN_REPLICAS` a few may show up, with it there must be none.
//!
//! # `--outbox`: what the handlers publish
//!
//! The suite also declares `{queue}.downstream`, and the consumers wrap
//! their handler with `IdempotencyLayer::with_outbox(OutboxPublisher::connect)`
//! (whose connection goes through the RabbitMQ proxy as well, so `amqp-cut`
//! cuts it too). Each handler run stages one message for the downstream
//! queue through the default exchange (body and `x-chaos-id`: the incoming
//! message's id): a plain message right after its effect; a poison message
//! before it fails (a failed run must publish nothing); an `s<i>` message
//! at the end of its work, which on the first run comes after the layer gave
//! up on the handler, so the outbox refuses it. Under the same faults, the
//! outbox commits each message's outgoing message with its done mark and
//! publishes it with `message_id` `{queue}:{id}:0` before the ack.
//!
//! At the end the suite empties the downstream queue and counts it by
//! `message_id`: every plain and `s<i>` message that was not dead-lettered
//! must have sent exactly its one id (extra copies of an id are the
//! outbox's at-least-once; they are counted on stderr, not failed), and no
//! other id may be there.
//!
//! # Running it
//!
//! ```text
//! cargo run --release -p harness --bin chaos -- --messages 20000 --duplicates 0.2 --consumers 4 --seed 1
//! cargo run --release -p harness --bin chaos -- --faults kill,pause --fault-interval-ms 800
//! cargo run --release -p harness --bin chaos -- --failover --messages 20000 --min-replicas 1
//! cargo run --release -p harness --bin chaos -- --outbox --seed 1
//! ```
//!
//! Options (defaults in brackets): `--messages N` \[2000\], `--duplicates R`
//! \[0.2\], `--consumers C` \[3\], `--seed S` \[1\], `--poison F` \[0.01\],
//! `--transient F` \[0.02\], `--no-fingerprint F` \[0.005\],
//! `--retry broker|hold` \[broker\], `--faults LIST` \[kill,pause,redis-restart,
//! redis-cut,amqp-cut,redis-oom,redis-password,redis-readonly,handler-timeout,
//! poison-abort; `none` for no faults\], `--fault-interval-ms MS`
//! \[1500\], `--rate R` \[800 messages/s at most on average; 0 publishes
//! everything at once\], `--timeout-secs S` \[600, the whole run\], `--keep`
//! (keep the run directory even when the run passes), `--failover`,
//! `--min-replicas N` \[0\], `--min-failovers N` \[3\], `--outbox`.
//! `chaos --analyse <run dir>/ledger.log` classifies a kept ledger again.
//! Environment: `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; start the broker with
//! `rabbitmq-server -detached`), `CHAOS_CONSUMER_LOG` (the consumers'
//! `RUST_LOG`, default `warn`), `IDEMPOTENCY_MIN_REPLICAS` (see
//! `--failover`), `IDEMPOTENCY_REPLICA_TIMEOUT` (passed on to the
//! consumers as is). Needs `redis-server` 7+ and `kill` on the PATH: Linux
//! and other Unixes only. SIGINT or SIGTERM stops the run and every process
//! it started.
//!
//! # Reading the output
//!
//! Progress goes to stderr. The last line on stdout is one JSON object:
//!
//! ```text
//! {"messages":N,"retry":"broker"|"hold","unique":U,"executions":E,"lost":L,"duplicate_effects":D,
//!  "explained_duplicates":X,"unexplained_duplicates":Y,"dead_lettered":Q,
//!  "faults":{"kills":..,"pauses":..,"redis_restarts":..,"redis_cuts":..,"amqp_cuts":..,
//!            "redis_ooms":..,"redis_password_flips":..,"redis_readonly":..,
//!            "handler_timeouts":..,"poison_aborts":..,"failovers":..},
//!  "overlapping_runs":O,"plain_dead_lettered":P,"min_replicas":M,
//!  "outgoing_expected":OE,"outgoing_distinct":OD,"outgoing_lost":OL,
//!  "transient":T,"retried_through_broker":B}
//! ```
//!
//! - `messages`: `--messages`; `retry`: `--retry`; `unique`: distinct
//!   messages published (plain, poison, transient, fingerprint-less, and
//!   those of `handler-timeout` and `poison-abort`; duplicates are extra
//!   copies of plain ones).
//! - `executions`: handler runs (effects plus failed poison and transient runs).
//! - `lost`: plain, transient, fingerprint-less and timed-out messages that neither
//!   took effect nor reached the dead-letter queue, and aborting ones that
//!   did not reach it. Must be 0.
//! - `duplicate_effects`: effects beyond the first for the same message.
//!   Each is `explained` when the ledger shows one of the windows DESIGN.md
//!   admits (a crash after the effect but before the done mark, a pause
//!   longer than the lease): every earlier execution of that message was cut
//!   off between its effect and its done mark (its process was killed
//!   before it wrote an outcome; its outcome was `lease_lost`, `unrecorded`
//!   or `dropped`; or its process was stopped past the lease while it ran,
//!   so that its claim expired and its handler timed out after the effect),
//!   or the later execution itself was stopped past the lease between its
//!   start and its effect (its claim expired under it); also when the
//!   earlier execution's process aborted (a `poison-abort` message beside
//!   it), or its outcome was `retry` after its effect (a handler that timed
//!   out while its work went on and took effect). The pause of the later
//!   execution explains nothing once an earlier one returned `processed`
//!   before the later one began (a done mark lost in a failover). Anything
//!   else is `unexplained` and must be 0. Progress lists the explanations
//!   found, and how many unexplained ones followed a failover.
//! - `dead_lettered`: messages found in the dead-letter queue at the end
//!   (poison and fingerprint-less ones, plus any re-dead-lettered copy).
//! - `faults`: how many of each were injected (`failovers`: masters killed).
//! - `overlapping_runs`: pairs of runs of one `handler-timeout` message
//!   whose work overlapped in time (no kill or pause of their processes
//!   explaining it). Must be 0.
//! - `plain_dead_lettered`: plain (and transient) messages found in the dead-letter queue.
//!   Must be 0, except for `crashed` ones when a `poison-abort` message was
//!   published (a message in flight beside it can run out of attempts with
//!   it); a store fault must never dead-letter one.
//! - `min_replicas`: the consumers' `IDEMPOTENCY_MIN_REPLICAS`.
//! - `outgoing_expected` (`--outbox`; `null` without it, like the next two):
//!   plain, transient and `s<i>` messages not dead-lettered, whose handler succeeded
//!   and so must have sent one outgoing message.
//! - `outgoing_distinct`: distinct `message_id`s found downstream. Must
//!   equal `outgoing_expected`.
//! - `outgoing_lost`: expected `message_id`s never found downstream. Must be 0.
//! - `transient`: transient messages `t<i>` published.
//! - `retried_through_broker`: retry copies the broker confirmed in a delay
//!   queue (each one's original then acked), summed over every consumer
//!   process, killed ones included (the `retried ... broker` ledger lines);
//!   0 with `--retry hold`. Progress also shows the deliveries held, then
//!   requeued (with `broker`: those whose copy was not confirmed).
//!
//! Exit status: 0 when `lost`, `unexplained_duplicates`, `overlapping_runs`
//! and unexplained plain dead letters are 0 (and, with `--outbox`,
//! `outgoing_lost` is 0, `outgoing_distinct` equals `outgoing_expected`
//! and every downstream message has a `message_id`), 1 when
//! not, 2 when the suite could not run (e.g. RabbitMQ unreachable). The run
//! directory (ledger, one log per consumer process, redis log) is printed
//! and kept when the run fails or with `--keep`. Lines starting with
//! `WARNING` point at trouble that does not fail the run by itself, such as
//! a consumer that did not stop within 15s of SIGTERM.
//!
//! # The ledger
//!
//! `<run dir>/ledger.log`, appended with `O_APPEND`, one line per event in a
//! single `write` (so it survives `kill -9` and Redis restarts); times are
//! microseconds since the Unix epoch:
//!
//! ```text
//! begin   <id> <pid> <nonce> <t>          the delivery entered the idempotent service
//! effect  <id> <pid> <nonce> <t>          the handler performed its effect
//! fail    <id> <pid> <nonce> <t>          the handler failed a poison or transient message
//! abort   <id> <pid> <nonce> <t>          the handler is about to abort its process
//! work    <id> <pid> <nonce> <t0> <t1>    when a run of an `s<i>` message worked
//! outcome <id> <pid> <nonce> <t> <kind>   the layer returned (processed, duplicate, lease_lost, ...)
//! start <pid> <t> | kill <pid> <t> | pause <pid> <t0> <t1> | exit <pid> <t>
//! redis-restart <t0> <t1> | redis-cut <t> <n> | amqp-cut <t> <n>
//! redis-oom <t0> <t1> | redis-password <t0> <t1> | redis-readonly <t0> <t1>
//! failover <killed> <promoted> <rejoined> <old port> <new port> [unplanned]
//!                                         `unplanned`: the sentinels started it on their own
//! inject <id> <t>                         a fault published `s<i>` or `a<i>`
//! retried <pid> <via> <t>                 a retry: `broker` (copy confirmed) or `hold`
//! ```
//!
//! The nonce is shared by the wrapper that writes `begin`/`outcome` and the
//! handler through a delivery header (`x-chaos-nonce`): the layer runs the
//! handler in a task of its own, where a task-local would not be visible.
//!
//! # Where things are
//!
//! - [`options`]: the orchestrator's command line;
//! - [`orchestrate`](mod@orchestrate): the run, phase by phase;
//! - [`supervisor`]: the consumer processes;
//! - [`consumer`]: what runs inside each of them (`--role consumer`);
//! - [`faults`]: the fault injectors;
//! - [`messages`]: what is published, and how fast;
//! - [`topology`]: the queues, and the dead letters (and with `--outbox`
//!   the downstream messages) at the end;
//! - [`ledger`]: the ledger, written; [`tally`]: the ledger, read back;
//! - [`retried`]: the consumers' retry counts, into the ledger;
//! - [`classify`]: duplicate effects, explained or not (and `--analyse`);
//! - [`report`]: progress lines, the numbers and the JSON line;
//! - [`rng`]: the seeded PRNG.
//!
//! The redis-server on a free port, the master, replica and sentinels of
//! `--failover`, the TCP proxies, the AMQP URL helpers and the delay
//! queues' names and removal come from the `harness` library.

mod classify;
mod consumer;
mod faults;
mod ledger;
mod messages;
mod options;
mod orchestrate;
mod report;
mod retried;
mod rng;
mod supervisor;
mod tally;
mod topology;

use std::process::ExitCode;

use crate::classify::analyse_main;
use crate::consumer::consumer_main;
use crate::options::parse_options;
use crate::orchestrate::orchestrate;

const USAGE: &str = "usage: chaos [--messages N] [--duplicates R] [--consumers C] [--seed S]
             [--poison F] [--transient F] [--no-fingerprint F] [--retry broker|hold]
             [--faults kill,pause,redis-restart,redis-cut,amqp-cut,redis-oom,redis-password,
                       redis-readonly,handler-timeout,poison-abort|none]
             [--fault-interval-ms MS] [--rate R] [--timeout-secs S] [--keep] [--outbox]
       chaos --failover [--min-replicas 0|1] [--min-failovers N]
             [--faults failover,kill,pause,amqp-cut,handler-timeout,poison-abort] [...]
       chaos --analyse <run dir>/ledger.log
fault-injection suite: see the doc comment of harness/src/bin/chaos/main.rs";

#[tokio::main]
async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--role") {
        return consumer_main(&argv).await;
    }
    if argv.first().map(String::as_str) == Some("--analyse") {
        return analyse_main(argv.get(1));
    }
    let options = match parse_options(&argv) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // On SIGINT or SIGTERM the run is dropped where it is: the consumers,
    // the redis-servers and the sentinels are killed as their handles go.
    tokio::select! {
        result = orchestrate(options) => match result {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(message) => {
                eprintln!("chaos: error: {message}");
                ExitCode::from(2)
            }
        },
        signal = interrupted() => {
            eprintln!("chaos: {signal}: stopped, with every process it started");
            ExitCode::from(2)
        }
    }
}

/// Resolves on SIGINT or SIGTERM, with the signal's name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
