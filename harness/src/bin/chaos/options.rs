//! The command line of the orchestrator: `--messages`, `--faults`,
//! `--fault-interval-ms`, `--failover` and the rest, with their defaults.

use std::time::Duration;

use amqp_idempotency::RetryMode;

use crate::faults::Fault;

#[derive(Clone, Debug)]
pub struct Options {
    pub messages: usize,
    pub duplicates: f64,
    pub consumers: usize,
    pub seed: u64,
    pub poison: f64,
    pub no_fingerprint: f64,
    /// Messages `t<i>` whose handler fails (retryably) on its first one or
    /// two runs, then succeeds.
    pub transient: f64,
    /// How the consumers retry a retryable failure (`IDEMPOTENCY_RETRY`).
    pub retry: RetryMode,
    pub faults: Vec<Fault>,
    pub fault_interval: Duration,
    pub rate: usize,
    pub timeout: Duration,
    pub keep: bool,
    /// Redis as a master, a replica and three sentinels, failed over by the
    /// `failover` fault, instead of the single redis-server.
    pub failover: bool,
    /// `IDEMPOTENCY_MIN_REPLICAS` for the consumers (0 or, with
    /// `--failover`, 1: the pair has one replica).
    pub min_replicas: usize,
    /// With the `failover` fault: the run goes on until this many happened,
    /// and the messages flow over about this many.
    pub min_failovers: usize,
    /// The handler also stages one outgoing message per incoming one in
    /// the outbox, to the run's `{queue}.downstream` queue, which is read
    /// back at the end.
    pub outbox: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            messages: 2000,
            duplicates: 0.2,
            consumers: 3,
            seed: 1,
            poison: 0.01,
            no_fingerprint: 0.005,
            transient: 0.02,
            retry: RetryMode::Broker,
            faults: Fault::SINGLE.to_vec(),
            fault_interval: Duration::from_millis(1500),
            rate: 800,
            timeout: Duration::from_secs(600),
            keep: false,
            failover: false,
            min_replicas: 0,
            min_failovers: 3,
            outbox: false,
        }
    }
}

/// `Ok(None)` means `--help`. Without `--min-replicas`, the minimum comes
/// from `IDEMPOTENCY_MIN_REPLICAS` in this process's environment (else 0).
pub fn parse_options(argv: &[String]) -> Result<Option<Options>, String> {
    let mut options = Options::default();
    let mut faults = None;
    let mut min_replicas = None;
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "-h" | "--help" => return Ok(None),
            "--messages" => options.messages = parse_int(name, &value()?, 1)?,
            "--consumers" => options.consumers = parse_int(name, &value()?, 1)?,
            "--seed" => {
                let text = value()?;
                options.seed = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("--seed: `{text}` is not an unsigned integer"))?;
            }
            "--duplicates" => options.duplicates = parse_fraction(name, &value()?)?,
            "--poison" => options.poison = parse_fraction(name, &value()?)?,
            "--no-fingerprint" => options.no_fingerprint = parse_fraction(name, &value()?)?,
            "--transient" => options.transient = parse_fraction(name, &value()?)?,
            "--retry" => options.retry = parse_retry(&value()?)?,
            "--faults" => faults = Some(parse_faults(&value()?)?),
            "--fault-interval-ms" => {
                let ms = parse_int(name, &value()?, 10)?;
                options.fault_interval = Duration::from_millis(ms as u64);
            }
            "--rate" => options.rate = parse_int(name, &value()?, 0)?,
            "--timeout-secs" => {
                let secs = parse_int(name, &value()?, 10)?;
                options.timeout = Duration::from_secs(secs as u64);
            }
            "--keep" => options.keep = true,
            "--failover" => options.failover = true,
            "--outbox" => options.outbox = true,
            "--min-replicas" => min_replicas = Some(parse_int(name, &value()?, 0)?),
            "--min-failovers" => options.min_failovers = parse_int(name, &value()?, 1)?,
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    let min_replicas = match min_replicas {
        Some(n) => n,
        None => match std::env::var("IDEMPOTENCY_MIN_REPLICAS") {
            Ok(text) if !text.trim().is_empty() => parse_int("IDEMPOTENCY_MIN_REPLICAS", &text, 0)?,
            _ => 0,
        },
    };
    options.min_replicas = min_replicas;
    if options.failover {
        options.faults = faults.unwrap_or_else(|| vec![Fault::Failover]);
        if let Some(fault) = options
            .faults
            .iter()
            .find(|f| !Fault::WITH_FAILOVER.contains(f))
        {
            return Err(format!(
                "--faults: `{}` acts on the single redis-server, which --failover does not run \
                 (with --failover: {})",
                fault.name(),
                Fault::WITH_FAILOVER.map(Fault::name).join(", ")
            ));
        }
        if min_replicas > 1 {
            return Err(format!(
                "--min-replicas {min_replicas}: the --failover pair has one replica, so at most 1"
            ));
        }
    } else {
        options.faults = faults.unwrap_or_else(|| Fault::SINGLE.to_vec());
        if options.faults.contains(&Fault::Failover) {
            return Err("--faults: `failover` needs --failover".into());
        }
        if min_replicas > 0 {
            return Err(format!(
                "--min-replicas {min_replicas} (or IDEMPOTENCY_MIN_REPLICAS) needs --failover: \
                 the single redis-server has no replica"
            ));
        }
    }
    Ok(Some(options))
}

pub fn parse_retry(text: &str) -> Result<RetryMode, String> {
    match text.trim() {
        "broker" => Ok(RetryMode::Broker),
        "hold" => Ok(RetryMode::Hold),
        other => Err(format!("--retry: `{other}` is neither `broker` nor `hold`")),
    }
}

/// The value of `IDEMPOTENCY_RETRY` for `mode`.
pub fn retry_name(mode: RetryMode) -> &'static str {
    match mode {
        RetryMode::Hold => "hold",
        RetryMode::Broker => "broker",
    }
}

pub fn parse_int(name: &str, text: &str, min: usize) -> Result<usize, String> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= min)
        .ok_or_else(|| format!("{name}: `{text}` is not an integer >= {min}"))
}

pub fn parse_fraction(name: &str, text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("{name}: `{text}` is not a fraction between 0 and 1"))
}

pub fn parse_faults(text: &str) -> Result<Vec<Fault>, String> {
    let text = text.trim();
    if text.is_empty() || text == "none" {
        return Ok(Vec::new());
    }
    let mut faults = Vec::new();
    for name in text.split(',').map(str::trim) {
        let fault = Fault::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                format!(
                    "--faults: unknown fault `{name}` (expected a comma-separated list of {} or none)",
                    Fault::ALL.map(Fault::name).join(", ")
                )
            })?;
        if !faults.contains(&fault) {
            faults.push(fault);
        }
    }
    Ok(faults)
}
