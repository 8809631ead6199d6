//! `amqp-idempotency`: the operator command line for the Redis records that
//! the `amqp-idempotency` library writes.
//!
//! - `inspect <fingerprint|key>` shows one record: its state, owner token and
//!   attempt (in progress), payload hash and time to live;
//! - `forget <fingerprint|key> --yes` deletes one record, so the next delivery
//!   of that message is processed again;
//! - `stats` counts the records under a prefix (and scope) per state, with
//!   `SCAN ... MATCH ... COUNT`, never `KEYS`;
//! - `replay <PARKING_QUEUE> --yes` moves dead-lettered messages back to
//!   the queue they came from, after the fix (a dry run without `--yes`).
//!
//! Keys are `{prefix}:{scope}:{fingerprint}`. An argument that starts with
//! `{prefix}:` is a full key, anything else a fingerprint that needs a scope.
//! Exit codes: 0 ok, 1 no such key or refused, 2 usage error, 3 Redis
//! error, 4 RabbitMQ error.
//! Run `amqp-idempotency --help` for the details.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use amqp_idempotency::fingerprint::{PROBE_NAME, record_key};
use amqp_idempotency::redact_url;
use amqp_idempotency::store::{CRASH_MEMORY, Record};
use redis::{Connection, RedisError};

mod replay;

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const DEFAULT_PREFIX: &str = "idem";
const START_REDIS: &str = "redis-server --daemonize yes --port 6379";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys asked for per SCAN call.
const SCAN_COUNT: usize = 1000;
/// At most this much of a value is read; library records are far shorter,
/// so a longer value is unrecognized.
const MAX_VALUE_BYTES: usize = 4096;
/// At most this much of an unrecognized value is printed.
const SHOWN_VALUE_BYTES: usize = 200;

const HELP: &str = "\
amqp-idempotency: inspect and repair the Redis records of amqp-idempotency consumers

USAGE:
    amqp-idempotency [OPTIONS] inspect <FINGERPRINT|KEY>
    amqp-idempotency [OPTIONS] forget <FINGERPRINT|KEY> --yes
    amqp-idempotency [OPTIONS] stats
    amqp-idempotency [OPTIONS] replay <PARKING_QUEUE> [--to <QUEUE>] [--count <N>] [--yes]
    amqp-idempotency help | --help

COMMANDS:
    inspect <FINGERPRINT|KEY>
        Shows the record of one message: its state (in progress, done,
        released after N failed attempts, or absent), the owner token and
        attempt of an in-progress claim, the payload hash and the time to
        live. A value this library did not write is reported as
        unrecognized and shown as is, never parsed. Exits 1 when the key
        does not exist.

    forget <FINGERPRINT|KEY> --yes
        Deletes the record, so the next delivery of the message is
        processed again. Without --yes nothing is deleted: it shows what
        would be deleted and exits 1. Forgetting an in-progress record lets
        a redelivery run while its owner may still be working on it.
        Exits 1 when the key does not exist.

    stats
        Counts the records under --prefix (and under --scope, if given) by
        state: in_progress, done, released, unrecognized, total. It walks
        the keys with SCAN MATCH COUNT, never KEYS, so it does not block a
        busy server; records written or expiring meanwhile may or may not
        be counted.

    replay <PARKING_QUEUE>
        Moves dead-lettered messages from a parking queue (the runner's
        `<queue>.dead` by default) back to the queue each came from (its
        x-idempotency-queue header, or --to <QUEUE>), once the cause is
        fixed. At most --count messages (default 100). Without --yes it is
        a dry run: it lists what would move, changes nothing and exits 1.
        Each message is republished with publisher confirms, without its
        x-idempotency-* reason headers, and removed from the parking queue
        only once the broker confirmed the copy. Their records were deleted
        when they were dead-lettered, so they are processed afresh.

    help
        Shows this text.

FINGERPRINT OR KEY:
    Records live at <prefix>:<scope>:<fingerprint>. An argument that starts
    with <prefix>: (idem: by default) is a full key and is used as is.
    Anything else is a fingerprint and needs a scope (--scope or
    IDEMPOTENCY_SCOPE; consumers use the queue name unless IDEMPOTENCY_SCOPE
    is set). --key or --fingerprint force either reading. Like the library,
    a fingerprint longer than 200 bytes or with control characters is
    looked up as hashed-<hash>. Put -- before an argument starting with -.

OPTIONS:
    --redis-url <URL>  Redis to use, redis://[[user]:password@]host[:port][/db]
                       [env: REDIS_URL; default: redis://127.0.0.1:6379]
    --prefix <P>       key prefix [env: IDEMPOTENCY_KEY_PREFIX; default: idem]
    --scope <S>        scope (consumer group) [env: IDEMPOTENCY_SCOPE]
    --amqp-url <URL>   RabbitMQ for replay, amqp://user:password@host:port/vhost
                       [env: AMQP_URL; default: amqp://guest:guest@127.0.0.1:5672/%2f]
    --to <QUEUE>       replay into this queue instead of each message's own
    --count <N>        replay at most N messages [default: 100]
    --key              read the argument as a full key
    --fingerprint      read the argument as a fingerprint
    -y, --yes          confirm forget or replay
    -h, --help         show this text
    Options may come before or after the command; --name=value also works.

EXIT STATUS:
    0  success
    1  no such key, or forget refused without --yes
    2  usage error: unknown command or option, missing argument or scope,
       malformed Redis URL (no arguments at all also exits 2)
    3  Redis error: unreachable, timed out, or refused a command
    4  RabbitMQ error: unreachable, or refused a request

EXAMPLES:
    amqp-idempotency inspect idem:orders:42
    amqp-idempotency --scope orders inspect 42
    amqp-idempotency forget idem:orders:42 --yes
    amqp-idempotency stats --prefix idem --scope orders
    amqp-idempotency --redis-url redis://10.0.0.5:6379/2 stats
    amqp-idempotency replay orders.dead              # what would move back
    amqp-idempotency replay orders.dead --count 10 --yes
";

/// Reads keys in one atomic step and, with ARGV[1] == 'delete', deletes
/// them. For each key: {type, value prefix ('' unless a string), full
/// length, PTTL}. Values are read with GETRANGE so a huge foreign value is
/// never transferred whole.
const LOOKUP: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  local value = ''
  local len = 0
  if kind == 'string' then
    len = redis.call('STRLEN', key)
    value = redis.call('GETRANGE', key, 0, tonumber(ARGV[2]) - 1)
  end
  local ttl = redis.call('PTTL', key)
  if ARGV[1] == 'delete' and kind ~= 'none' then
    redis.call('DEL', key)
  end
  out[i] = {kind, value, len, ttl}
end
return out
";

/// Why a command did not succeed; each kind has its exit code.
#[derive(Debug)]
enum Failure {
    /// No such key, or a forget without --yes: exit 1.
    NotFound(String),
    /// A bad command line, setting or URL: exit 2.
    Usage(String),
    /// Redis unreachable or refusing a command: exit 3.
    Redis(String),
    /// RabbitMQ unreachable or refusing a request: exit 4.
    Amqp(String),
}

fn main() -> ExitCode {
    match run(std::env::args_os().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::NotFound(message)) => {
            eprint_text(&format!("{message}\n"));
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            eprint_text(&format!(
                "error: {message}\nRun `amqp-idempotency --help` for usage.\n"
            ));
            ExitCode::from(2)
        }
        Err(Failure::Redis(message)) => {
            eprint_text(&format!("error: {message}\n"));
            ExitCode::from(3)
        }
        Err(Failure::Amqp(message)) => {
            eprint_text(&format!("error: {message}\n"));
            ExitCode::from(4)
        }
    }
}

/// Writes to stdout; a closed pipe is not worth a panic.
fn print_text(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Writes to stderr, ignoring failures.
fn eprint_text(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// How to read the positional argument of inspect and forget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetKind {
    Key,
    Fingerprint,
}

/// The parsed command line, before it is checked against a command.
#[derive(Debug, Default)]
struct Args {
    redis_url: Option<String>,
    prefix: Option<String>,
    scope: Option<String>,
    amqp_url: Option<String>,
    to: Option<String>,
    count: Option<String>,
    yes: bool,
    target_kind: Option<TargetKind>,
    help: bool,
    positionals: Vec<String>,
}

fn parse_args(raw: Vec<OsString>) -> Result<Args, Failure> {
    let mut args = Args::default();
    let mut iter = raw.into_iter();
    let mut only_positionals = false;
    while let Some(arg) = iter.next() {
        let arg = utf8(arg)?;
        if only_positionals || !arg.starts_with('-') || arg == "-" {
            args.positionals.push(arg);
            continue;
        }
        if arg == "--" {
            only_positionals = true;
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let slot = match name {
            "--redis-url" => Some(&mut args.redis_url),
            "--prefix" => Some(&mut args.prefix),
            "--scope" => Some(&mut args.scope),
            "--amqp-url" => Some(&mut args.amqp_url),
            "--to" => Some(&mut args.to),
            "--count" => Some(&mut args.count),
            _ => None,
        };
        if let Some(slot) = slot {
            let value = match inline {
                Some(value) => value,
                None => match iter.next() {
                    Some(value) => utf8(value)?,
                    None => {
                        return Err(Failure::Usage(format!(
                            "option {name} needs a value, e.g. {name} <value> or {name}=<value>"
                        )));
                    }
                },
            };
            *slot = Some(value);
            continue;
        }
        if inline.is_some() {
            return Err(Failure::Usage(format!(
                "option {name} takes no value (got `{arg}`)"
            )));
        }
        match name {
            "-h" | "--help" => args.help = true,
            "-y" | "--yes" => args.yes = true,
            "--key" | "--fingerprint" => {
                let kind = if name == "--key" {
                    TargetKind::Key
                } else {
                    TargetKind::Fingerprint
                };
                if args.target_kind.is_some_and(|k| k != kind) {
                    return Err(Failure::Usage(
                        "--key and --fingerprint exclude each other".into(),
                    ));
                }
                args.target_kind = Some(kind);
            }
            _ => {
                return Err(Failure::Usage(format!(
                    "unknown option `{arg}` (to pass an argument starting with `-`, put `--` before it)"
                )));
            }
        }
    }
    Ok(args)
}

fn utf8(arg: OsString) -> Result<String, Failure> {
    arg.into_string().map_err(|raw| {
        Failure::Usage(format!(
            "argument {} is not valid UTF-8",
            raw.to_string_lossy()
        ))
    })
}

/// Resolved settings: command line first, then environment, then defaults.
#[derive(Debug)]
struct Settings {
    redis_url: String,
    /// Where the URL came from, for error messages.
    url_source: &'static str,
    prefix: String,
    scope: Option<String>,
}

/// An environment variable; unset, empty or blank counts as unset.
fn env_var(name: &str) -> Result<Option<String>, Failure> {
    match std::env::var(name) {
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(raw)) => Err(Failure::Usage(format!(
            "{name} is not valid UTF-8 ({}); unset it or fix it",
            raw.to_string_lossy()
        ))),
    }
}

fn settings(args: &Args) -> Result<Settings, Failure> {
    let (redis_url, url_source) = match &args.redis_url {
        Some(url) => (url.clone(), "--redis-url"),
        None => match env_var("REDIS_URL")? {
            Some(url) => (url, "REDIS_URL"),
            None => (DEFAULT_REDIS_URL.to_owned(), "the default"),
        },
    };
    let (prefix, prefix_source) = match &args.prefix {
        Some(prefix) => (prefix.clone(), "--prefix"),
        None => match env_var("IDEMPOTENCY_KEY_PREFIX")? {
            Some(prefix) => (prefix, "IDEMPOTENCY_KEY_PREFIX"),
            None => (DEFAULT_PREFIX.to_owned(), "the default"),
        },
    };
    check_name(&prefix, prefix_source, "a key prefix such as `idem`")?;
    let scope = match &args.scope {
        Some(scope) => {
            check_name(scope, "--scope", "a consumer group such as `orders`")?;
            Some(scope.clone())
        }
        None => {
            let scope = env_var("IDEMPOTENCY_SCOPE")?;
            if let Some(scope) = &scope {
                check_name(
                    scope,
                    "IDEMPOTENCY_SCOPE",
                    "a consumer group such as `orders`",
                )?;
            }
            scope
        }
    };
    Ok(Settings {
        redis_url,
        url_source,
        prefix,
        scope,
    })
}

/// Prefixes and scopes are non-empty and without spaces, as the library requires.
fn check_name(value: &str, source: &str, expected: &str) -> Result<(), Failure> {
    if value.is_empty() || value.contains(char::is_whitespace) {
        return Err(Failure::Usage(format!(
            "{source} is `{value}`; expected {expected}, non-empty and without spaces"
        )));
    }
    Ok(())
}

fn run(raw: Vec<OsString>) -> Result<(), Failure> {
    if raw.is_empty() {
        eprint_text(HELP);
        return Err(Failure::Usage("no command given".into()));
    }
    let args = parse_args(raw)?;
    if args.help {
        print_text(HELP);
        return Ok(());
    }
    let Some((command, rest)) = args.positionals.split_first() else {
        return Err(Failure::Usage(
            "no command given; expected inspect, forget, stats, replay or help".into(),
        ));
    };
    match command.as_str() {
        "help" => {
            print_text(HELP);
            Ok(())
        }
        "inspect" | "forget" => {
            let target = match rest {
                [target] => target,
                [] => {
                    return Err(Failure::Usage(format!(
                        "{command} needs a fingerprint or key, e.g. `amqp-idempotency {command} idem:orders:42`"
                    )));
                }
                [_, extra, ..] => {
                    return Err(Failure::Usage(format!(
                        "{command} takes one fingerprint or key; unexpected `{extra}`"
                    )));
                }
            };
            if command == "inspect" && args.yes {
                return Err(Failure::Usage(
                    "--yes only applies to forget; inspect never changes anything".into(),
                ));
            }
            let settings = settings(&args)?;
            let key = resolve_key(target, &settings, args.target_kind)?;
            if command == "inspect" {
                inspect(&settings, &key)
            } else {
                forget(&settings, &key, args.yes)
            }
        }
        "stats" => {
            if let Some(extra) = rest.first() {
                return Err(Failure::Usage(format!(
                    "stats takes no argument; unexpected `{extra}` (use --prefix and --scope)"
                )));
            }
            if args.yes || args.target_kind.is_some() {
                return Err(Failure::Usage(
                    "--yes, --key and --fingerprint do not apply to stats".into(),
                ));
            }
            let settings = settings(&args)?;
            stats(&settings)
        }
        "replay" => {
            let from = match rest {
                [from] => from.clone(),
                [] => {
                    return Err(Failure::Usage(
                        "replay needs the parking queue, e.g. `amqp-idempotency replay orders.dead`"
                            .into(),
                    ));
                }
                [_, extra, ..] => {
                    return Err(Failure::Usage(format!(
                        "replay takes one parking queue; unexpected `{extra}`"
                    )));
                }
            };
            let count = match &args.count {
                None => 100,
                Some(text) => text
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or_else(|| {
                        Failure::Usage(format!(
                            "--count is `{text}`; expected a number of messages from 1 to 100000"
                        ))
                    })?,
            };
            let amqp_url = match &args.amqp_url {
                Some(url) => url.clone(),
                None => env_var("AMQP_URL")?
                    .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            };
            let replay = replay::Replay {
                amqp_url,
                from,
                to: args.to.clone(),
                count,
                yes: args.yes,
            };
            let done = replay::run(&replay)?;
            print_text(&done.report);
            if done.would_move > 0 {
                return Err(Failure::NotFound(format!(
                    "dry run: nothing was moved. To move these {} message(s), run again with --yes",
                    done.would_move
                )));
            }
            Ok(())
        }
        other => Err(Failure::Usage(format!(
            "unknown command `{other}`; expected inspect, forget, stats, replay or help"
        ))),
    }
}

/// Turns the argument into a key: `<prefix>:...` is a key, anything else a
/// fingerprint completed with the prefix and scope.
fn resolve_key(
    target: &str,
    settings: &Settings,
    forced: Option<TargetKind>,
) -> Result<String, Failure> {
    if target.is_empty() {
        return Err(Failure::Usage("the fingerprint or key is empty".into()));
    }
    let prefix = &settings.prefix;
    let is_key = match forced {
        Some(kind) => kind == TargetKind::Key,
        None => target.starts_with(&format!("{prefix}:")),
    };
    if is_key {
        return Ok(target.to_owned());
    }
    let Some(scope) = &settings.scope else {
        return Err(Failure::Usage(format!(
            "`{target}` does not start with `{prefix}:`, so it is read as a fingerprint, and a \
             fingerprint needs a scope: pass --scope <consumer group> (the queue name, unless the \
             consumers set IDEMPOTENCY_SCOPE) or set IDEMPOTENCY_SCOPE, or pass the full key \
             `{prefix}:<scope>:{target}`"
        )));
    };
    Ok(record_key(prefix, scope, target))
}

/// Connects with timeouts, turning failures into messages that say what to do.
fn connect(settings: &Settings) -> Result<Connection, Failure> {
    let shown = redact_url(&settings.redis_url);
    // Through Sentinel: the master it names now.
    let url = amqp_idempotency::store::sentinel_master_url(&settings.redis_url, CONNECT_TIMEOUT)
        .map_err(|err| Failure::Redis(err.to_string()))?
        .unwrap_or_else(|| settings.redis_url.clone());
    let client = redis::Client::open(url.as_str()).map_err(|err| {
        Failure::Usage(format!(
            "`{shown}` (from {}) is not a valid Redis URL: {err}; expected \
             redis://[[user]:password@]host[:port][/db], for example {DEFAULT_REDIS_URL}; \
             pass it with --redis-url or REDIS_URL",
            settings.url_source
        ))
    })?;
    let connection = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|err| redis_failure(&shown, &err))?;
    connection
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| connection.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|err| redis_failure(&shown, &err))?;
    Ok(connection)
}

fn redis_failure(shown_url: &str, err: &RedisError) -> Failure {
    if err.is_connection_refusal()
        || err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
    {
        Failure::Redis(format!(
            "cannot reach Redis at {shown_url}: {err}. Is it running? Start a local one with \
             `{START_REDIS}`, or point --redis-url (or REDIS_URL) at a running server."
        ))
    } else {
        Failure::Redis(format!(
            "Redis at {shown_url} answered with an error: {err}. Check the user, password and \
             database in the URL, and that this user may run the commands the README lists under \"Least privilege\" (SCAN, EVALSHA, SCRIPT LOAD, TYPE, STRLEN, GETRANGE, PTTL, DEL)."
        ))
    }
}

/// What a key holds.
#[derive(Debug)]
enum State {
    Absent,
    Record(Record),
    /// Not written by this library.
    Foreign {
        kind: String,
        value: Vec<u8>,
        len: usize,
    },
}

/// One key as the lookup script saw it.
#[derive(Debug)]
struct Found {
    state: State,
    /// Milliseconds to live; -1 when the key never expires.
    pttl: i64,
}

/// Runs the lookup script on `keys`, deleting them when `delete` is true.
fn lookup(
    connection: &mut Connection,
    shown_url: &str,
    keys: &[Vec<u8>],
    delete: bool,
) -> Result<Vec<Found>, Failure> {
    let script = redis::Script::new(LOOKUP);
    let replies: Vec<(String, Vec<u8>, i64, i64)> = script
        .key(keys)
        .arg(if delete { "delete" } else { "read" })
        .arg(MAX_VALUE_BYTES)
        .invoke(connection)
        .map_err(|err| redis_failure(shown_url, &err))?;
    Ok(replies
        .into_iter()
        .map(|(kind, value, len, pttl)| Found {
            state: classify(kind, value, len),
            pttl,
        })
        .collect())
}

fn classify(kind: String, value: Vec<u8>, len: i64) -> State {
    let len = usize::try_from(len).unwrap_or(0);
    match kind.as_str() {
        "none" => State::Absent,
        "string" => {
            let record = (len == value.len())
                .then(|| Record::parse(&value))
                .flatten();
            match record {
                Some(record) => State::Record(record),
                None => State::Foreign { kind, value, len },
            }
        }
        _ => State::Foreign {
            kind,
            value: Vec::new(),
            len: 0,
        },
    }
}

/// The lines that describe a key, for inspect and forget.
fn describe(key: &str, found: &Found) -> String {
    let mut lines = vec![("key", key.to_owned())];
    let hash = |hash: &str| {
        if hash.is_empty() {
            "(none: the payload was not checked)".to_owned()
        } else {
            hash.to_owned()
        }
    };
    match &found.state {
        State::Absent => lines.push(("state", "absent".into())),
        State::Record(Record::InProgress {
            token,
            attempt,
            payload_hash,
            lingers,
        }) => {
            let crash_memory = i64::try_from(CRASH_MEMORY.as_millis()).unwrap_or(i64::MAX);
            let lease_over = *lingers && found.pttl >= 0 && found.pttl <= crash_memory;
            if lease_over {
                lines.push((
                    "state",
                    "in progress, lease over: the attempt never finished (its consumer died or \
                     hung); the next copy takes it over as the next attempt"
                        .into(),
                ));
            } else {
                lines.push(("state", "in progress".into()));
            }
            lines.push(("owner token", token.clone()));
            lines.push(("attempt", attempt.to_string()));
            lines.push(("payload hash", hash(payload_hash)));
            if *lingers && !lease_over && found.pttl >= 0 {
                lines.push(("lease left", format_ttl(found.pttl - crash_memory)));
            }
        }
        State::Record(Record::Done {
            payload_hash,
            token,
        }) => {
            lines.push(("state", "done".into()));
            if !token.is_empty() {
                lines.push(("completed by", token.clone()));
            }
            lines.push(("payload hash", hash(payload_hash)));
        }
        State::Record(Record::Released {
            attempts,
            payload_hash,
            token,
        }) => {
            let plural = if *attempts == 1 { "" } else { "s" };
            lines.push((
                "state",
                format!("released after {attempts} failed attempt{plural}"),
            ));
            if !token.is_empty() {
                lines.push(("released by", token.clone()));
            }
            lines.push(("payload hash", hash(payload_hash)));
        }
        State::Foreign { kind, value, len } if kind == "string" => {
            lines.push((
                "state",
                "unrecognized: this value was not written by amqp-idempotency (not parsed)".into(),
            ));
            let shown = &value[..value.len().min(SHOWN_VALUE_BYTES)];
            let mut text = format!("\"{}\"", shown.escape_ascii());
            if *len > shown.len() {
                text.push_str(&format!(" ... ({len} bytes, first {} shown)", shown.len()));
            }
            lines.push(("value", text));
        }
        State::Foreign { kind, .. } => lines.push((
            "state",
            format!("unrecognized: a Redis {kind}, not a value written by amqp-idempotency"),
        )),
    }
    if !matches!(found.state, State::Absent) {
        lines.push(("time to live", format_ttl(found.pttl)));
    }
    let width = lines.iter().map(|(name, _)| name.len()).max().unwrap_or(0) + 1;
    lines
        .iter()
        .map(|(name, value)| format!("{:<width$} {value}\n", format!("{name}:")))
        .collect()
}

fn format_ttl(pttl: i64) -> String {
    let Ok(ms) = u64::try_from(pttl) else {
        return "none (the key never expires)".into();
    };
    let (days, rest) = (ms / 86_400_000, ms % 86_400_000);
    let (hours, rest) = (rest / 3_600_000, rest % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, millis) = (rest / 1000, rest % 1000);
    let mut parts = Vec::new();
    for (n, unit) in [(days, "d"), (hours, "h"), (minutes, "m")] {
        if n > 0 {
            parts.push(format!("{n}{unit}"));
        }
    }
    if millis > 0 {
        parts.push(format!("{seconds}.{millis:03}s"));
    } else if seconds > 0 || parts.is_empty() {
        parts.push(format!("{seconds}s"));
    }
    parts.join(" ")
}

/// Quotes `text` for a shell command line, if it needs it.
fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@%+=,".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn no_such_key(key: &str, settings: &Settings) -> Failure {
    Failure::NotFound(format!(
        "no such key: `{key}` does not exist on {} (never claimed, already expired or \
         forgotten; check --prefix and --scope, or run `amqp-idempotency stats`)",
        redact_url(&settings.redis_url)
    ))
}

fn inspect(settings: &Settings, key: &str) -> Result<(), Failure> {
    let shown = redact_url(&settings.redis_url);
    let mut connection = connect(settings)?;
    let found = lookup(&mut connection, &shown, &[key.as_bytes().to_vec()], false)?;
    let Some(found) = found.into_iter().next() else {
        return Err(Failure::Redis(format!(
            "Redis at {shown} returned no answer for `{key}`"
        )));
    };
    print_text(&describe(key, &found));
    if matches!(found.state, State::Absent) {
        return Err(no_such_key(key, settings));
    }
    Ok(())
}

fn forget(settings: &Settings, key: &str, yes: bool) -> Result<(), Failure> {
    let shown = redact_url(&settings.redis_url);
    let mut connection = connect(settings)?;
    let found = lookup(&mut connection, &shown, &[key.as_bytes().to_vec()], yes)?;
    let Some(found) = found.into_iter().next() else {
        return Err(Failure::Redis(format!(
            "Redis at {shown} returned no answer for `{key}`"
        )));
    };
    if matches!(found.state, State::Absent) {
        return Err(no_such_key(key, settings));
    }
    let in_progress = matches!(found.state, State::Record(Record::InProgress { .. }));
    let warning = "warning: the record is in progress: if its owner is still running, a \
                   redelivery of this message may now be processed a second time.\n";
    if !yes {
        print_text(&format!("would delete:\n{}", describe(key, &found)));
        if in_progress {
            eprint_text(warning);
        }
        let same_url = if settings.url_source == "--redis-url" {
            " (with the same --redis-url)"
        } else {
            ""
        };
        return Err(Failure::NotFound(format!(
            "refusing to delete without --yes; nothing was changed. To delete it, run:\n    \
             amqp-idempotency forget {} --yes{same_url}",
            shell_quote(key)
        )));
    }
    print_text(&format!("deleted:\n{}", describe(key, &found)));
    if in_progress {
        eprint_text(&warning.replace("is in progress", "was in progress"));
    }
    Ok(())
}

/// Per-state counts for `stats`.
#[derive(Debug, Default)]
struct Counts {
    in_progress: u64,
    done: u64,
    released: u64,
    unrecognized: u64,
}

/// Escapes the glob characters of SCAN MATCH.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn stats(settings: &Settings) -> Result<(), Failure> {
    let shown = redact_url(&settings.redis_url);
    // Keys hold the scope escaped as the library writes it (`a:b` as `a%3Ab`).
    let scope_prefix = settings.scope.as_ref().map(|scope| {
        record_key(&settings.prefix, scope, "")
            .trim_end_matches(':')
            .to_owned()
    });
    let shown_pattern = match &scope_prefix {
        Some(prefix) => format!("{prefix}:*"),
        None => format!("{}:*", settings.prefix),
    };
    let pattern = match &scope_prefix {
        Some(prefix) => format!("{}:*", glob_escape(prefix)),
        None => format!("{}:*", glob_escape(&settings.prefix)),
    };
    let mut connection = connect(settings)?;
    let mut counts = Counts::default();
    // SCAN may return a key more than once; count each once.
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut cursor = String::from("0");
    loop {
        let (next, keys): (String, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(&cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query(&mut connection)
            .map_err(|err| redis_failure(&shown, &err))?;
        // The key a paused consumer writes to test Redis is not a record.
        let fresh: Vec<Vec<u8>> = keys
            .into_iter()
            .filter(|key| !key.ends_with(PROBE_NAME.as_bytes()))
            .filter(|key| seen.insert(key.clone()))
            .collect();
        if !fresh.is_empty() {
            for found in lookup(&mut connection, &shown, &fresh, false)? {
                match found.state {
                    // Expired between SCAN and the lookup.
                    State::Absent => {}
                    State::Record(Record::InProgress { .. }) => counts.in_progress += 1,
                    State::Record(Record::Done { .. }) => counts.done += 1,
                    State::Record(Record::Released { .. }) => counts.released += 1,
                    State::Foreign { .. } => counts.unrecognized += 1,
                }
            }
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    let total = counts.in_progress + counts.done + counts.released + counts.unrecognized;
    print_text(&format!(
        "keys matching {shown_pattern} on {shown}\n\
         in_progress   {}\n\
         done          {}\n\
         released      {}\n\
         unrecognized  {}\n\
         total         {total}\n",
        counts.in_progress, counts.done, counts.released, counts.unrecognized
    ));
    Ok(())
}
