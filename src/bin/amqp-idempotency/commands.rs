//! The commands that read Redis: inspect, forget and stats.

use std::collections::HashSet;

use amqp_idempotency::fingerprint::{PROBE_NAME, record_key};
use amqp_idempotency::store::Record;

use crate::Failure;
use crate::lookup::{Found, State, lookup};
use crate::output::{describe, eprint_text, print_text, shell_quote};
use crate::servers::{Server, Servers, redis_failure};
use crate::settings::Settings;

/// Keys asked for per SCAN call.
const SCAN_COUNT: usize = 1000;

fn no_such_key(key: &str, shown: &str) -> Failure {
    Failure::NotFound(format!(
        "no such key: `{key}` does not exist on {shown} (never claimed, already expired or \
         forgotten; check --prefix and --scope, or run `amqp-idempotency stats`)"
    ))
}

/// The record at `key`, read (and with `delete`, deleted) on the server
/// that holds it.
fn look_up_one(settings: &Settings, key: &str, delete: bool) -> Result<(Found, String), Failure> {
    let servers = Servers::connect(settings)?;
    let per_key = servers.is_cluster();
    let mut server = servers.for_key(key)?;
    let found = lookup(&mut server, &[key.as_bytes().to_vec()], delete, per_key)?;
    match found.into_iter().next() {
        Some(found) => Ok((found, server.shown)),
        None => Err(Failure::Redis(format!(
            "{} returned no answer for `{key}`",
            server.shown
        ))),
    }
}

pub(crate) fn inspect(settings: &Settings, key: &str) -> Result<(), Failure> {
    let (found, shown) = look_up_one(settings, key, false)?;
    print_text(&describe(key, &found));
    if matches!(found.state, State::Absent) {
        return Err(no_such_key(key, &shown));
    }
    Ok(())
}

pub(crate) fn forget(settings: &Settings, key: &str, yes: bool) -> Result<(), Failure> {
    let (found, shown) = look_up_one(settings, key, yes)?;
    if matches!(found.state, State::Absent) {
        return Err(no_such_key(key, &shown));
    }
    let in_progress = matches!(found.state, State::Record(Record::InProgress { .. }));
    let warning = "warning: the record is in progress: if its owner is still running, a \
                   redelivery of this message may now be processed a second time.\n";
    if !yes {
        print_text(&format!("would delete:\n{}", describe(key, &found)));
        if in_progress {
            eprint_text(warning);
        }
        let same_url = if settings.url_flag {
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

pub(crate) fn stats(settings: &Settings) -> Result<(), Failure> {
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
    let servers = Servers::connect(settings)?;
    let shown = servers.shown();
    let per_key = servers.is_cluster();
    let mut counts = Counts::default();
    // Every master of a cluster holds some of the keys; each is walked.
    for mut server in servers.masters()? {
        count_on(&mut server, &pattern, per_key, &mut counts)?;
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

/// Adds the records of `server` under `pattern` to `counts`.
fn count_on(
    server: &mut Server,
    pattern: &str,
    per_key: bool,
    counts: &mut Counts,
) -> Result<(), Failure> {
    // SCAN may return a key more than once; count each once.
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut cursor = String::from("0");
    loop {
        let (next, keys): (String, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(&cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query(&mut server.connection)
            .map_err(|err| redis_failure(&server.shown, &err))?;
        // The key a paused consumer writes to test Redis is not a record.
        let fresh: Vec<Vec<u8>> = keys
            .into_iter()
            .filter(|key| !key.ends_with(PROBE_NAME.as_bytes()))
            .filter(|key| seen.insert(key.clone()))
            .collect();
        if !fresh.is_empty() {
            for found in lookup(server, &fresh, false, per_key)? {
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
            return Ok(());
        }
        cursor = next;
    }
}
