//! The Lua scripts of the compare-and-set path: on servers without
//! `SET ... IFEQ` (see `native`), every transition after a claim runs as
//! one script call that compares the whole stored value first.
//!
//! ```ignore
//! let call = transition_call(key, Expect::Value(claimed), Some(&done), retention);
//! // EVALSHA <sha> 1 key claimed done <ms> "" 0; a server that answers
//! // NOSCRIPT gets LUA_SCRIPTS loaded and the call sent again.
//! ```

use std::time::Duration;

use redis::{Cmd, Script};

use super::{command, millis};
use crate::store::{Expect, OutboxEntry};

/// Compare-and-set on one key. ARGV: `from`, `to`, `ttl` (PX), `mode` and
/// `grace`. The key is written (set to `to` with the ttl, or deleted when
/// `to` is empty) when it holds `from`; with mode `a` also when it is
/// absent; with mode `e` only when, besides, its PTTL is at most `grace`
/// (an in-progress record whose lease is over). A key that already holds
/// its target also answers 1, so a retried transition is harmless. An
/// error names the command that failed (an ACL user's missing permission
/// is otherwise reported without it).
pub(super) const TRANSITION: &str = r"
local function failed(reply, command)
  if type(reply) == 'table' and reply.err then
    return {err = reply.err .. ' (the transition script\'s \'' .. command .. '\' command)'}
  end
  return nil
end
local from, to, ttl, mode, grace = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local current = redis.pcall('GET', KEYS[1])
local answer = failed(current, 'get')
if answer then return answer end
local matches = current == from
if matches and mode == 'e' then
  local left = redis.pcall('PTTL', KEYS[1])
  answer = failed(left, 'pttl')
  if answer then return answer end
  matches = left >= 0 and left <= tonumber(grace)
elseif not matches and mode == 'a' then
  matches = current == false
end
if matches then
  if to == '' then
    answer = failed(redis.pcall('DEL', KEYS[1]), 'del')
  else
    answer = failed(redis.pcall('SET', KEYS[1], to, 'PX', ttl), 'set')
  end
  return answer or 1
elseif to ~= '' and current == to then
  -- Already done (a retried transition): write it again, so that a WAIT
  -- on this connection waits until the replicas hold it too.
  return failed(redis.pcall('SET', KEYS[1], to, 'KEEPTTL'), 'set') or 1
end
return 0
";

/// The outbox commit: KEYS[1] the record, KEYS[2] its outbox hash; ARGV
/// from, to, ttl, mode (as [`TRANSITION`]), then the outbox's field/value
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
pub(super) const LUA_SCRIPTS: [&str; 2] = [TRANSITION, COMMIT];

/// The SHA1 of [`COMMIT`], computed once.
fn commit_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| Script::new(COMMIT).get_hash().to_owned())
}

/// The SHA1 of [`TRANSITION`], computed once.
fn transition_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| Script::new(TRANSITION).get_hash().to_owned())
}

/// The [`TRANSITION`] call for `key`: from what `from` expects to `to`
/// (deleted when `None`) with `ttl`.
pub(super) fn transition_call(
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
    let mut cmd = command(
        "EVALSHA",
        9,
        key.len() + from.value().len() + to.map_or(0, <[u8]>::len),
    );
    cmd.arg(transition_sha())
        .arg(1)
        .arg(key)
        .arg(from.value())
        .arg(to.unwrap_or(b""))
        .arg(millis(ttl))
        .arg(mode)
        .arg(grace_ms);
    cmd
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
