//! The command line: `--messages`, `--variants`, `--runtime` and the rest,
//! with the service URLs from the environment.

use std::time::Duration;

use harness::env::{DEFAULT_AMQP_URL, DEFAULT_REDIS_URL, env_or};

use crate::variants::Variant;

#[derive(Clone, Debug)]
pub struct Options {
    pub messages: u64,
    pub payload: usize,
    pub prefetch: u16,
    pub duplicates: f64,
    pub handler_delay: Duration,
    pub rounds: u32,
    pub variants: Vec<Variant>,
    pub open_loop_rate: Option<f64>,
    pub multi_thread: bool,
    pub amqp_url: String,
    pub redis_url: String,
    /// `REDIS_CLUSTER_NODES`: when set, the store is this cluster.
    pub cluster_nodes: Option<Vec<String>>,
    /// `--pin-redis`: Redis on CPU 1, the broker and the bench on CPU 0.
    pub pin_redis: bool,
    /// `--failing F`: the share of message ids that the handlers of
    /// `ours_hold` and `ours_broker` always fail (0: none, and those two
    /// variants are not run unless named).
    pub failing: f64,
    /// `--failing-backoff-ms B`: their `IDEMPOTENCY_RETRY_BACKOFF`; the
    /// backoff doubles up to 8 B (`IDEMPOTENCY_RETRY_BACKOFF_MAX`).
    pub failing_backoff: Duration,
}

/// The default `--failing-backoff-ms`: with the default 5 attempts, a
/// failing message waits 100 + 200 + 400 + 800 ms = 1.5 s before it is
/// parked, which `hold` spends in a prefetch slot.
pub const FAILING_BACKOFF_MS: u64 = 100;
/// `IDEMPOTENCY_RETRY_BACKOFF_MAX` of the failing variants, as a multiple of the backoff.
pub const FAILING_BACKOFF_CAP: u32 = 8;

/// `Ok(None)`: `--help`.
pub fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut messages = None;
    let mut rounds = None;
    let mut payload = 64;
    let mut prefetch = 256;
    let mut duplicates = 0.0;
    let mut handler_delay = Duration::ZERO;
    let mut variants = vec![
        Variant::RawSingle,
        Variant::RawMulti,
        Variant::Naive,
        Variant::RedisFloor,
        Variant::Ours,
        Variant::OursOutbox,
    ];
    let mut open_loop_rate = None;
    let mut quick = false;
    let mut multi_thread = false;
    let mut pin_redis = false;
    let mut failing = 0.0;
    let mut failing_backoff = Duration::from_millis(FAILING_BACKOFF_MS);
    let mut named_variants = false;
    while let Some(arg) = argv.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_owned(), Some(value.into())),
            _ => (arg.clone(), None),
        };
        let mut value = |expected: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{name} needs a value ({expected})"))
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(None),
            "--quick" => quick = true,
            "--pin-redis" => pin_redis = true,
            "--runtime" => {
                let value = argv.next().ok_or("--runtime needs `current` or `multi`")?;
                multi_thread = match value.as_str() {
                    "current" => false,
                    "multi" => true,
                    _ => {
                        return Err(format!(
                            "--runtime expects `current` or `multi`, got {value:?}"
                        ));
                    }
                };
            }
            "--messages" => messages = Some(parse_num(&name, &value("a count")?, 1..=u64::MAX)?),
            "--payload" => payload = parse_num(&name, &value("bytes")?, 0..=16 * 1024 * 1024)?,
            "--prefetch" => prefetch = parse_num(&name, &value("1 to 65535")?, 1..=u16::MAX)?,
            "--rounds" => rounds = Some(parse_num(&name, &value("a count")?, 1..=1000)?),
            "--handler-delay-ms" => {
                handler_delay =
                    Duration::from_millis(parse_num(&name, &value("milliseconds")?, 0..=60_000)?)
            }
            "--failing" => {
                let raw = value("a fraction in [0, 1)")?;
                failing = raw
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| (0.0..1.0).contains(f))
                    .ok_or_else(|| {
                        format!("--failing: `{raw}` is not a fraction in [0, 1), e.g. 0.1")
                    })?;
            }
            "--failing-backoff-ms" => {
                failing_backoff =
                    Duration::from_millis(parse_num(&name, &value("milliseconds")?, 1..=60_000)?)
            }
            "--duplicates" => {
                let raw = value("a fraction in [0, 1)")?;
                duplicates = raw
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| (0.0..1.0).contains(f))
                    .ok_or_else(|| {
                        format!("--duplicates: `{raw}` is not a fraction in [0, 1), e.g. 0.1")
                    })?;
            }
            "--open-loop-rate" => {
                let raw = value("messages per second")?;
                open_loop_rate = Some(
                    raw.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or_else(|| {
                            format!("--open-loop-rate: `{raw}` is not a positive rate (msgs/s)")
                        })?,
                );
            }
            "--variants" => {
                let raw = value("a list such as raw,naive,ours,ours_outbox")?;
                let mut chosen = Vec::new();
                for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let add: &[Variant] = match part {
                        "raw" => &[Variant::RawSingle, Variant::RawMulti],
                        "raw_single" => &[Variant::RawSingle],
                        "raw_multi" => &[Variant::RawMulti],
                        "naive" => &[Variant::Naive],
                        "redis_floor" => &[Variant::RedisFloor],
                        "ours" => &[Variant::Ours],
                        "ours_outbox" => &[Variant::OursOutbox],
                        "ours_mem" => &[Variant::OursMemory],
                        "ours_hold" => &[Variant::OursHold],
                        "ours_broker" => &[Variant::OursBroker],
                        other => {
                            return Err(format!(
                                "--variants: unknown variant `{other}` (expected raw, raw_single, raw_multi, naive, redis_floor, ours, ours_outbox, ours_hold, ours_broker, ours_mem)"
                            ));
                        }
                    };
                    for v in add {
                        if !chosen.contains(v) {
                            chosen.push(*v);
                        }
                    }
                }
                if chosen.is_empty() {
                    return Err("--variants: name at least one of raw, naive, ours".into());
                }
                variants = chosen;
                named_variants = true;
            }
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    // With failing messages, ours with `hold` and with `broker`, side by
    // side (also when --variants named neither).
    if failing > 0.0 {
        for retrying in [Variant::OursHold, Variant::OursBroker] {
            if !variants.contains(&retrying) {
                if named_variants {
                    eprintln!(
                        "bench: --failing {failing}: running {} as well",
                        retrying.name()
                    );
                }
                variants.push(retrying);
            }
        }
    }
    Ok(Some(Options {
        messages: messages.unwrap_or(if quick { 2000 } else { 100_000 }),
        payload,
        prefetch,
        duplicates,
        handler_delay,
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        variants,
        open_loop_rate,
        multi_thread,
        amqp_url: env_or("AMQP_URL", DEFAULT_AMQP_URL)?,
        redis_url: env_or("REDIS_URL", DEFAULT_REDIS_URL)?,
        cluster_nodes: cluster_nodes(&env_or("REDIS_CLUSTER_NODES", "")?)?,
        pin_redis,
        failing,
        failing_backoff,
    }))
}

/// `REDIS_CLUSTER_NODES`: comma-separated `redis://` (or `rediss://`) URLs
/// of cluster nodes; `None` when unset or blank.
pub fn cluster_nodes(raw: &str) -> Result<Option<Vec<String>>, String> {
    let nodes: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(bad) = nodes
        .iter()
        .find(|node| !node.starts_with("redis://") && !node.starts_with("rediss://"))
    {
        return Err(format!(
            "REDIS_CLUSTER_NODES: `{}` is not a redis:// or rediss:// URL (expected a comma-separated list such as redis://127.0.0.1:7000,redis://127.0.0.1:7001)",
            amqp_idempotency::redact_url(bad)
        ));
    }
    Ok((!nodes.is_empty()).then_some(nodes))
}

pub fn parse_num<T>(name: &str, raw: &str, range: std::ops::RangeInclusive<T>) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    raw.trim()
        .parse::<T>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            format!(
                "{name}: `{raw}` is not an integer from {} to {}",
                range.start(),
                range.end()
            )
        })
}
