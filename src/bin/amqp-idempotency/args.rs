//! The command line: the help text and the parsed arguments, before they
//! are checked against a command.

use std::ffi::OsString;

use crate::Failure;

pub(crate) const HELP: &str = "\
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
    --redis-url <URL>  Redis to use, redis://[[user]:password@]host[:port][/db],
                       rediss://... for TLS, or redis-sentinel://host:port#master
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

ENVIRONMENT:
    The same variables as the consumers, read and checked the same way
    (a malformed or misspelt one is a usage error that names it):
    REDIS_URL, REDIS_CLUSTER_NODES (a Redis Cluster: stats walks every
    master, inspect and forget use the master of the key's slot),
    REDIS_TLS_CA_FILE, REDIS_TLS_CERT_FILE, REDIS_TLS_KEY_FILE (for
    rediss://), AMQP_URL and AMQP_TLS_* (for replay over amqps://),
    IDEMPOTENCY_KEY_PREFIX, IDEMPOTENCY_SCOPE.

EXIT STATUS:
    0  success
    1  no such key, or forget refused without --yes
    2  usage error: unknown command or option, missing argument or scope,
       malformed Redis URL or environment variable (no arguments at all
       also exits 2)
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

/// How to read the positional argument of inspect and forget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetKind {
    Key,
    Fingerprint,
}

/// The parsed command line, before it is checked against a command.
#[derive(Debug, Default)]
pub(crate) struct Args {
    pub(crate) redis_url: Option<String>,
    pub(crate) prefix: Option<String>,
    pub(crate) scope: Option<String>,
    pub(crate) amqp_url: Option<String>,
    pub(crate) to: Option<String>,
    pub(crate) count: Option<String>,
    pub(crate) yes: bool,
    pub(crate) target_kind: Option<TargetKind>,
    pub(crate) help: bool,
    pub(crate) positionals: Vec<String>,
}

pub(crate) fn parse_args(raw: Vec<OsString>) -> Result<Args, Failure> {
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
