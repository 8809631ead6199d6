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
//! Redis is reached as the library reaches it, from the same variables
//! (`Config::from_env`): `REDIS_URL` (`rediss://` with `REDIS_TLS_*`, or
//! Sentinel), or `REDIS_CLUSTER_NODES`, whose masters are each walked.
//!
//! Keys are `{prefix}:{scope}:{fingerprint}`. An argument that starts with
//! `{prefix}:` is a full key, anything else a fingerprint that needs a scope.
//! Exit codes: 0 ok, 1 no such key or refused, 2 usage error, 3 Redis
//! error, 4 RabbitMQ error.
//! Run `amqp-idempotency --help` for the details.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::ffi::OsString;
use std::process::ExitCode;

use args::{HELP, parse_args};
use output::{eprint_text, print_text};
use settings::{resolve_target, settings};

mod args;
mod commands;
mod output;
mod records;
mod replay;
mod settings;

/// Why a command did not succeed; each kind has its exit code.
#[derive(Debug)]
pub(crate) enum Failure {
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
            let target = resolve_target(target, &settings, args.target_kind)?;
            if command == "inspect" {
                commands::inspect(&settings, &target)
            } else {
                commands::forget(&settings, &target, args.yes)
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
            commands::stats(&settings)
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
            // AMQP_URL and AMQP_TLS_* as the library reads them, or --amqp-url.
            let config = settings(&args)?.config;
            let replay = replay::Replay {
                config,
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
