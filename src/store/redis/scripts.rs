//! The Lua scripts of the compare-and-set path: on servers without
//! `SET ... IFEQ` (see `native`), every transition after a claim runs in a
//! script call that compares the whole stored value first; the
//! transitions that wait together share one call.
//!
//! ```ignore
//! let part = transition_args(key, Expect::Value(claimed), Some(&done), retention);
//! let call = transitions_call([&part, &other].into_iter(), Keys::Declared);
//! // EVALSHA <sha> 2 key other claimed done <ms> "" 0 ...; a server that
//! // answers NOSCRIPT gets LUA_SCRIPTS loaded and the call sent again.
//! ```

use std::time::Duration;

use redis::{Arg, Cmd, Script};

use super::{command, millis};
use crate::store::{Expect, OutboxEntry};

/// Compare-and-set on each of several keys, each checked on its own:
/// `KEYS` the keys and `ARGV` five arguments for each (`from`, `to`, `ttl`
/// (PX), `mode` and `grace`), or, with no key declared (keys of several
/// cluster slots on one node, which the `allow-cross-slot-keys` flag lets
/// one call reach), six for each, the key first. A key is written (set to
/// `to` with the ttl, or deleted when `to` is empty) when it holds `from`;
/// with mode `a` also when it is absent; with mode `e` only when, besides,
/// its PTTL is at most `grace` (an in-progress record whose lease is over).
/// A key that already holds its target also answers 1, so a retried
/// transition is harmless. Answers an array with one reply per key: 1
/// (written), 0 (not), or that key's error, which names the command that
/// failed (an ACL user's missing permission is otherwise reported without
/// it); one key's error leaves the others' transitions alone.
pub(super) const TRANSITIONS: &str = r"#!lua flags=allow-cross-slot-keys
local function failed(reply, command)
  if type(reply) == 'table' and reply.err then
    return {err = reply.err .. ' (the transition script\'s \'' .. command .. '\' command)'}
  end
  return nil
end
local function transition(key, from, to, ttl, mode, grace)
  local current = redis.pcall('GET', key)
  local answer = failed(current, 'get')
  if answer then return answer end
  local matches = current == from
  if matches and mode == 'e' then
    local left = redis.pcall('PTTL', key)
    answer = failed(left, 'pttl')
    if answer then return answer end
    matches = left >= 0 and left <= tonumber(grace)
  elseif not matches and mode == 'a' then
    matches = current == false
  end
  if matches then
    if to == '' then
      answer = failed(redis.pcall('DEL', key), 'del')
    else
      answer = failed(redis.pcall('SET', key, to, 'PX', ttl), 'set')
    end
    return answer or 1
  elseif to ~= '' and current == to then
    -- Already done (a retried transition): write it again, so that a WAIT
    -- on this connection waits until the replicas hold it too.
    return failed(redis.pcall('SET', key, to, 'KEEPTTL'), 'set') or 1
  end
  return 0
end
local answers, declared = {}, #KEYS
local width = declared > 0 and 5 or 6
local count = declared > 0 and declared or #ARGV / 6
for i = 1, count do
  local at, key = (i - 1) * width, KEYS[i]
  if declared == 0 then
    key = ARGV[at + 1]
    at = at + 1
  end
  answers[i] = transition(key, ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5])
end
return answers
";

/// The outbox commit: KEYS[1] the record, KEYS[2] its outbox hash; ARGV
/// from, to, ttl, mode (as in [`TRANSITIONS`]), then the outbox's field/value
/// pairs. Where the record holds `from` (or, with mode `a`, is absent) the
/// outbox is replaced and the done mark written last, so that a refused
/// write leaves no mark without its outbox. A record that already holds
/// `to` (a retried commit) is written again and its outbox left alone:
/// dispatch may have begun.
pub(super) const COMMIT: &str = r"
local function failed(reply, command)
  if type(reply) == 'table' and reply.err then
    return {err = reply.err .. ' (the outbox commit script\'s \'' .. command .. '\' command)'}
  end
  return nil
end
local from, to, ttl, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local current = redis.pcall('GET', KEYS[1])
local answer = failed(current, 'get')
if answer then return answer end
if current == to then
  return failed(redis.pcall('SET', KEYS[1], to, 'KEEPTTL'), 'set') or 1
end
if current ~= from and not (mode == 'a' and current == false) then
  return 0
end
answer = failed(redis.pcall('DEL', KEYS[2]), 'del')
if answer then return answer end
if #ARGV > 4 then
  for first = 5, #ARGV, 256 do
    answer = failed(redis.pcall('HSET', KEYS[2], unpack(ARGV, first, math.min(first + 255, #ARGV))), 'hset')
    if answer then return answer end
  end
  answer = failed(redis.pcall('PEXPIRE', KEYS[2], ttl), 'pexpire')
  if answer then return answer end
end
return failed(redis.pcall('SET', KEYS[1], to, 'PX', ttl), 'set') or 1
";

/// The scripts loaded again when a server answers `NOSCRIPT`.
pub(super) const LUA_SCRIPTS: [&str; 2] = [TRANSITIONS, COMMIT];

/// The SHA1 of [`COMMIT`], computed once.
fn commit_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| Script::new(COMMIT).get_hash().to_owned())
}

/// The SHA1 of [`TRANSITIONS`], computed once.
fn transitions_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| Script::new(TRANSITIONS).get_hash().to_owned())
}

/// One key's part of a [`TRANSITIONS`] call: the key, then its five
/// arguments, from what `from` expects to `to` (deleted when `None`) with
/// `ttl`. Transitions that wait together are sent as one call
/// ([`transitions_call`]).
pub(super) fn transition_args(
    key: &str,
    from: Expect<'_>,
    to: Option<&[u8]>,
    ttl: Duration,
) -> Cmd {
    let (mode, grace_ms) = match from {
        Expect::Value(_) => ("", 0),
        Expect::ValueOrAbsent(_) => ("a", 0),
        Expect::Expired { grace, .. } => ("e", millis(grace)),
    };
    let mut cmd = Cmd::with_capacity(
        6,
        key.len() + from.value().len() + to.map_or(0, <[u8]>::len) + 48,
    );
    cmd.arg(key)
        .arg(from.value())
        .arg(to.unwrap_or(b""))
        .arg(millis(ttl))
        .arg(mode)
        .arg(grace_ms);
    cmd
}

/// How a [`TRANSITIONS`] call names its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Keys {
    /// As `KEYS`: a standalone server, or keys of one cluster slot.
    Declared,
    /// In `ARGV` only: keys of several slots served by one cluster node.
    Undeclared,
}

/// One [`TRANSITIONS`] call over the keys' parts (from [`transition_args`]).
pub(super) fn transitions_call<'a>(
    parts: impl Iterator<Item = &'a Cmd> + Clone,
    keys: Keys,
) -> Cmd {
    let (count, bytes) = parts.clone().fold((0, 0), |(count, bytes), part| {
        let size: usize = part.args_iter().map(|arg| arg_bytes(&arg).len()).sum();
        (count + 1, bytes + size)
    });
    let mut cmd = command("EVALSHA", 3 + 6 * count, bytes + 16);
    cmd.arg(transitions_sha());
    match keys {
        Keys::Declared => {
            cmd.arg(count);
            for part in parts.clone() {
                if let Some(key) = part.args_iter().next() {
                    cmd.arg(arg_bytes(&key));
                }
            }
            for part in parts {
                for arg in part.args_iter().skip(1) {
                    cmd.arg(arg_bytes(&arg));
                }
            }
        }
        Keys::Undeclared => {
            cmd.arg(0);
            for part in parts {
                for arg in part.args_iter() {
                    cmd.arg(arg_bytes(&arg));
                }
            }
        }
    }
    cmd
}

fn arg_bytes<'a>(arg: &Arg<&'a [u8]>) -> &'a [u8] {
    match arg {
        Arg::Simple(bytes) => bytes,
        // Cursors (SCAN-like commands) and whatever comes later: none in
        // the parts `transition_args` makes.
        _ => b"0",
    }
}

/// The [`COMMIT`] call: the done mark `to` at `key` and the outbox
/// `entries` at `outbox_key`, both with `ttl`.
pub(super) fn commit_call(
    key: &str,
    from: Expect<'_>,
    to: &[u8],
    ttl: Duration,
    outbox_key: &str,
    entries: &[OutboxEntry],
) -> Cmd {
    let mode = match from {
        Expect::ValueOrAbsent(_) => "a",
        Expect::Value(_) | Expect::Expired { .. } => "",
    };
    let bytes: usize = entries
        .iter()
        .map(|(field, value)| field.len() + value.len())
        .sum();
    let mut cmd = command(
        "EVALSHA",
        9 + 2 * entries.len(),
        key.len() + outbox_key.len() + from.value().len() + to.len() + bytes,
    );
    cmd.arg(commit_sha())
        .arg(2)
        .arg(key)
        .arg(outbox_key)
        .arg(from.value())
        .arg(to)
        .arg(millis(ttl))
        .arg(mode);
    for (field, value) in entries {
        cmd.arg(&field[..]).arg(&value[..]);
    }
    cmd
}
