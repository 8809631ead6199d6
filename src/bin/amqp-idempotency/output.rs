//! What the commands print: a record's description, times to live, and
//! text written without panicking on a closed pipe.

use std::io::Write;

use amqp_idempotency::records::{Record, State};

/// At most this much of an unrecognized value is printed.
const SHOWN_VALUE_BYTES: usize = 200;

/// Writes to stdout; a closed pipe is not worth a panic.
pub(crate) fn print_text(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Writes to stderr, ignoring failures.
pub(crate) fn eprint_text(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// The lines that describe a key (`None`: absent), for inspect and forget.
pub(crate) fn describe(key: &str, record: Option<&Record>) -> String {
    let mut lines = vec![("key", key.to_owned())];
    let hash = |hash: &str| {
        if hash.is_empty() {
            "(none: the payload was not checked)".to_owned()
        } else {
            hash.to_owned()
        }
    };
    let Some(record) = record else {
        lines.push(("state", "absent".into()));
        return aligned(&lines);
    };
    match record.state() {
        State::InProgress {
            token,
            attempt,
            payload_hash,
            lease_left,
        } => {
            if lease_left.is_some_and(|left| left.is_zero()) {
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
            if let Some(left) = lease_left.filter(|left| !left.is_zero()) {
                lines.push(("lease left", format_ttl(Some(left))));
            }
        }
        State::Done {
            payload_hash,
            token,
        } => {
            lines.push(("state", "done".into()));
            if !token.is_empty() {
                lines.push(("completed by", token.clone()));
            }
            lines.push(("payload hash", hash(payload_hash)));
        }
        State::Released {
            attempts,
            payload_hash,
            token,
        } => {
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
        State::Unrecognized { kind, value, len } if kind == "string" => {
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
        State::Unrecognized { kind, .. } => lines.push((
            "state",
            format!("unrecognized: a Redis {kind}, not a value written by amqp-idempotency"),
        )),
        other => lines.push(("state", format!("{other:?}"))),
    }
    if record.outbox_messages() > 0 {
        lines.push((
            "outbox",
            format!(
                "{} message(s) not yet confirmed by the broker",
                record.outbox_messages()
            ),
        ));
    }
    lines.push(("time to live", format_ttl(record.ttl())));
    aligned(&lines)
}

fn aligned(lines: &[(&str, String)]) -> String {
    let width = lines.iter().map(|(name, _)| name.len()).max().unwrap_or(0) + 1;
    lines
        .iter()
        .map(|(name, value)| format!("{:<width$} {value}\n", format!("{name}:")))
        .collect()
}

fn format_ttl(ttl: Option<std::time::Duration>) -> String {
    let Some(ttl) = ttl else {
        return "none (the key never expires)".into();
    };
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
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
pub(crate) fn shell_quote(text: &str) -> String {
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
