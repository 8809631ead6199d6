//! The report: one JSON line per variant and round, and the summary line
//! (medians over the rounds), written by a tiny JSON writer that keeps the
//! keys in the order given.

use std::sync::atomic::Ordering;

use crate::meter::{Measured, ServerCpu};
use crate::options::Options;
use crate::run::Ctx;
use crate::stats::RunStats;
use crate::variants::Variant;

/// One variant's numbers for one round.
#[derive(Clone, Debug)]
pub struct Row {
    pub variant: Variant,
    pub msgs_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub roundtrips_per_msg: f64,
    /// CPU per message: this process, the Redis server(s), the broker.
    pub consumer_cpu_us_per_msg: Option<f64>,
    pub redis_cpu_us_per_msg: Option<f64>,
    pub broker_cpu_us_per_msg: Option<f64>,
    /// `ours_hold` and `ours_broker`: messages whose id does not fail, per
    /// second from the first handler run to the last one's ack.
    pub healthy_msgs_per_s: Option<f64>,
    pub ok: bool,
}

/// What ours_outbox's handlers published, read from the downstream queue
/// after the drain.
#[derive(Clone, Debug, Default)]
pub struct Outgoing {
    /// Messages received (an id sent again counts again).
    pub received: u64,
    /// Distinct `message_id`s.
    pub distinct: u64,
    /// Messages without a `message_id`.
    pub without_id: u64,
}

/// What the summary says about the run as a whole.
pub struct RunFacts {
    /// `standalone` or `cluster`.
    pub store: &'static str,
    /// Whether `--pin-redis` pinned the processes.
    pub pinned: bool,
    pub bytes_per_done_record: Option<f64>,
    /// Variants asked for but not run (naive and redis_floor on a
    /// cluster), comma-separated.
    pub skipped: String,
    /// `IDEMPOTENCY_MIN_REPLICAS` of the store `ours` used.
    pub min_replicas: u32,
}

pub fn percentile(sorted: &[u32], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(f64::from(sorted[rank - 1]) / 1000.0)
}

#[allow(clippy::too_many_arguments)]
pub fn report(
    ctx: &Ctx,
    variant: Variant,
    round: u32,
    stats: &RunStats,
    measured: &Measured,
    redis_cmds: u64,
    server_cpu: &ServerCpu,
    outgoing: Option<&Outgoing>,
) -> (Row, String) {
    let published = ctx.plan.published();
    let unique = u64::from(ctx.plan.unique);
    let per_msg = |n: f64| n / published as f64;
    let mut latencies = std::mem::take(
        &mut *stats
            .latencies_us
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    latencies.sort_unstable();
    let executions: u64 = stats
        .executions
        .iter()
        .map(|c| u64::from(c.load(Ordering::Relaxed)))
        .sum();
    // The variants that fail the `--failing` ids are held to the rest:
    // each healthy id once; each failing delivery parked.
    let fails = variant.retry().is_some();
    let healthy = |id: usize| !fails || !ctx.plan.fails(id as u32);
    let healthy_executions: u64 = stats
        .executions
        .iter()
        .enumerate()
        .filter(|(id, _)| healthy(*id))
        .map(|(_, c)| u64::from(c.load(Ordering::Relaxed)))
        .sum();
    let (healthy_published, healthy_unique) = if fails {
        (ctx.plan.healthy_published(), ctx.plan.healthy_unique())
    } else {
        (published, unique)
    };
    let parked = stats.parked.load(Ordering::Relaxed);
    let processed = stats
        .executions
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) > 0)
        .count() as u64;
    let duplicates = if variant.deduplicates() {
        stats.duplicates.load(Ordering::Relaxed)
    } else {
        executions.saturating_sub(processed)
    };
    let errors = stats.errors.load(Ordering::Relaxed);
    let foreign = stats.foreign.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    if processed != unique {
        problems.push(format!(
            "{} message ids never processed",
            unique - processed.min(unique)
        ));
    }
    let expected_executions = if variant.deduplicates() {
        healthy_unique
    } else {
        healthy_published
    };
    if healthy_executions != expected_executions {
        problems.push(format!(
            "{healthy_executions} executions{}, expected {expected_executions}",
            if fails { " of healthy ids" } else { "" }
        ));
    }
    if duplicates != healthy_published - healthy_unique {
        problems.push(format!(
            "{duplicates} duplicates, expected {}",
            healthy_published - healthy_unique
        ));
    }
    if fails && parked != published - healthy_published {
        problems.push(format!(
            "{parked} failing messages parked, expected {}",
            published - healthy_published
        ));
    }
    if errors > 0 {
        problems.push(format!("{errors} errors"));
    }
    if foreign > 0 {
        problems.push(format!("{foreign} deliveries with a foreign message id"));
    }
    if let Some(outgoing) = outgoing {
        // One outgoing message per unique message, each with its own id.
        if outgoing.distinct != unique {
            problems.push(format!(
                "{} distinct outgoing message ids downstream, expected {unique}",
                outgoing.distinct
            ));
        }
        if outgoing.without_id > 0 {
            problems.push(format!(
                "{} outgoing messages without a message id",
                outgoing.without_id
            ));
        }
    } else if variant == Variant::OursOutbox {
        problems.push("the downstream queue was not read".into());
    }
    let secs = measured.elapsed.as_secs_f64();
    let row = Row {
        variant,
        msgs_per_s: published as f64 / secs.max(1e-9),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        roundtrips_per_msg: per_msg(stats.redis_roundtrips.load(Ordering::Relaxed) as f64),
        consumer_cpu_us_per_msg: measured.cpu_us.map(per_msg),
        redis_cpu_us_per_msg: server_cpu.redis_us.map(per_msg),
        broker_cpu_us_per_msg: server_cpu.broker_us.map(per_msg),
        healthy_msgs_per_s: if fails { stats.healthy_rate() } else { None },
        ok: problems.is_empty(),
    };
    let counted = |n: &std::sync::atomic::AtomicU64| {
        if fails {
            Json::Int(n.load(Ordering::Relaxed))
        } else {
            Json::Null
        }
    };
    let line = json_object(&[
        ("variant", Json::Str(variant.name().into())),
        ("round", Json::Int(u64::from(round))),
        ("msgs_per_s", Json::num(row.msgs_per_s, 1)),
        ("p50_ms", Json::opt(row.p50_ms, 3)),
        ("p99_ms", Json::opt(row.p99_ms, 3)),
        (
            "redis_roundtrips_per_msg",
            Json::num(row.roundtrips_per_msg, 3),
        ),
        (
            "redis_cmds_per_msg",
            Json::num(per_msg(redis_cmds as f64), 3),
        ),
        (
            "ack_frames_per_msg",
            Json::num(per_msg(stats.ack_calls.load(Ordering::Relaxed) as f64), 4),
        ),
        (
            "consumer_cpu_us_per_msg",
            Json::opt(row.consumer_cpu_us_per_msg, 2),
        ),
        (
            "redis_server_cpu_us_per_msg",
            Json::opt(row.redis_cpu_us_per_msg, 2),
        ),
        (
            "broker_cpu_us_per_msg",
            Json::opt(row.broker_cpu_us_per_msg, 2),
        ),
        ("processed", Json::Int(processed)),
        ("duplicates", Json::Int(duplicates)),
        ("published", Json::Int(published)),
        ("unique", Json::Int(unique)),
        ("executions", Json::Int(executions)),
        (
            "requeued",
            Json::Int(stats.requeued.load(Ordering::Relaxed)),
        ),
        ("elapsed_s", Json::num(secs, 3)),
        ("healthy_msgs_per_s", Json::opt(row.healthy_msgs_per_s, 1)),
        ("parked", counted(&stats.parked)),
        ("retries", counted(&stats.retries)),
        ("retried_via_broker", counted(&stats.retried_via_broker)),
        (
            "outgoing_received",
            outgoing.map_or(Json::Null, |o| Json::Int(o.received)),
        ),
        (
            "outgoing_distinct",
            outgoing.map_or(Json::Null, |o| Json::Int(o.distinct)),
        ),
        ("ok", Json::Bool(row.ok)),
        ("problems", Json::Str(problems.join("; "))),
    ]);
    (row, line)
}

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

pub fn summary(options: &Options, rows: &[Row], facts: &RunFacts) -> String {
    let med = |variant: Variant, field: fn(&Row) -> Option<f64>| {
        median(
            rows.iter()
                .filter(|r| r.variant == variant)
                .filter_map(field)
                .collect(),
        )
    };
    let rate = |r: &Row| Some(r.msgs_per_s);
    let single = med(Variant::RawSingle, rate);
    let multi = med(Variant::RawMulti, rate);
    let (raw, ceiling) = match (single, multi) {
        (Some(s), Some(m)) if m > s => (Some(m), "raw_multi"),
        (Some(s), _) => (Some(s), "raw_single"),
        (None, Some(m)) => (Some(m), "raw_multi"),
        (None, None) => (None, ""),
    };
    let ours = med(Variant::Ours, rate);
    let ratio = match (ours, raw) {
        (Some(o), Some(r)) if r > 0.0 => Some(o / r),
        _ => None,
    };
    // What the middleware adds in the consumer: ours against the raw
    // consumer with `multiple=true` acks, in the same run.
    let consumer_cpu = |r: &Row| r.consumer_cpu_us_per_msg;
    let overhead = match (
        med(Variant::Ours, consumer_cpu),
        med(Variant::RawMulti, consumer_cpu),
    ) {
        (Some(o), Some(r)) => Some(o - r),
        _ => None,
    };
    json_object(&[
        ("raw_msgs_per_s", Json::opt(raw, 1)),
        ("ours_msgs_per_s", Json::opt(ours, 1)),
        ("naive_msgs_per_s", Json::opt(med(Variant::Naive, rate), 1)),
        ("ratio", Json::opt(ratio, 3)),
        (
            "redis_roundtrips_per_msg",
            Json::opt(med(Variant::Ours, |r| Some(r.roundtrips_per_msg)), 3),
        ),
        ("p99_ms", Json::opt(med(Variant::Ours, |r| r.p99_ms), 3)),
        ("raw_ceiling", Json::Str(ceiling.into())),
        ("raw_single_msgs_per_s", Json::opt(single, 1)),
        ("raw_multi_msgs_per_s", Json::opt(multi, 1)),
        (
            "naive_p99_ms",
            Json::opt(med(Variant::Naive, |r| r.p99_ms), 3),
        ),
        (
            "raw_p99_ms",
            Json::opt(
                med(
                    if ceiling == "raw_multi" {
                        Variant::RawMulti
                    } else {
                        Variant::RawSingle
                    },
                    |r| r.p99_ms,
                ),
                3,
            ),
        ),
        ("messages", Json::Int(options.messages)),
        ("prefetch", Json::Int(u64::from(options.prefetch))),
        ("payload", Json::Int(options.payload as u64)),
        ("rounds", Json::Int(u64::from(options.rounds))),
        ("open_loop_rate", Json::opt(options.open_loop_rate, 1)),
        (
            "runtime",
            Json::Str(
                if options.multi_thread {
                    "multi"
                } else {
                    "current"
                }
                .into(),
            ),
        ),
        ("store", Json::Str(facts.store.into())),
        ("pinned", Json::Bool(facts.pinned)),
        ("min_replicas", Json::Int(u64::from(facts.min_replicas))),
        ("consumer_overhead_us_per_msg", Json::opt(overhead, 2)),
        (
            "raw_consumer_cpu_us_per_msg",
            Json::opt(med(Variant::RawMulti, consumer_cpu), 2),
        ),
        (
            "redis_cpu_us_per_msg",
            Json::opt(med(Variant::Ours, |r| r.redis_cpu_us_per_msg), 2),
        ),
        (
            "broker_cpu_us_per_msg",
            Json::opt(med(Variant::Ours, |r| r.broker_cpu_us_per_msg), 2),
        ),
        (
            "redis_floor_cpu_us_per_msg",
            Json::opt(med(Variant::RedisFloor, |r| r.redis_cpu_us_per_msg), 2),
        ),
        (
            "bytes_per_done_record",
            Json::opt(facts.bytes_per_done_record, 1),
        ),
        ("skipped", Json::Str(facts.skipped.clone())),
        (
            "outbox_msgs_per_s",
            Json::opt(med(Variant::OursOutbox, rate), 1),
        ),
        (
            "outbox_redis_roundtrips_per_msg",
            Json::opt(med(Variant::OursOutbox, |r| Some(r.roundtrips_per_msg)), 3),
        ),
        ("failing", Json::num(options.failing, 4)),
        (
            "failing_retry_backoff",
            if options.failing > 0.0 {
                let (backoff, max) = crate::run::failing_schedule(options);
                Json::Str(
                    harness::delay_queues::schedule(backoff, max)
                        .into_iter()
                        .map(harness::delay_queues::format_delay)
                        .collect::<Vec<_>>()
                        .join(","),
                )
            } else {
                Json::Null
            },
        ),
        (
            "healthy_msgs_per_sec_hold",
            Json::opt(med(Variant::OursHold, |r| r.healthy_msgs_per_s), 1),
        ),
        (
            "healthy_msgs_per_sec_broker",
            Json::opt(med(Variant::OursBroker, |r| r.healthy_msgs_per_s), 1),
        ),
        ("ok", Json::Bool(rows.iter().all(|r| r.ok))),
    ])
}

/// A tiny JSON writer that keeps the keys in the order given.
pub enum Json {
    Num(f64, i32),
    Int(u64),
    Str(String),
    Bool(bool),
    Null,
}

impl Json {
    pub fn num(value: f64, decimals: i32) -> Self {
        Self::Num(value, decimals)
    }

    pub fn opt(value: Option<f64>, decimals: i32) -> Self {
        value.map_or(Self::Null, |v| Self::Num(v, decimals))
    }
}

pub fn json_object(fields: &[(&str, Json)]) -> String {
    let mut out = String::from("{");
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, key);
        out.push(':');
        match value {
            Json::Num(v, decimals) if v.is_finite() => {
                let scale = 10_f64.powi(*decimals);
                out.push_str(&((v * scale).round() / scale).to_string());
            }
            Json::Num(..) | Json::Null => out.push_str("null"),
            Json::Int(v) => out.push_str(&v.to_string()),
            Json::Str(s) => push_json_str(&mut out, s),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
    out.push('}');
    out
}

pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}
