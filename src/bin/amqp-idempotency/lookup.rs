//! Reading (and deleting) records with one script call, and what a key holds.

use amqp_idempotency::store::Record;

use crate::Failure;
use crate::servers::{Server, redis_failure};

/// At most this much of a value is read; library records are far shorter,
/// so a longer value is unrecognized.
const MAX_VALUE_BYTES: usize = 4096;

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

/// What a key holds.
#[derive(Debug)]
pub(crate) enum State {
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
pub(crate) struct Found {
    pub(crate) state: State,
    /// Milliseconds to live; -1 when the key never expires.
    pub(crate) pttl: i64,
}

/// The script's answer for one key: type, value prefix, length, PTTL.
type Reply = (String, Vec<u8>, i64, i64);

/// Runs the lookup script on `keys` of `server`, deleting them when
/// `delete` is true: in one call, or with `per_key` (a cluster, where keys
/// of different slots cannot share a call) one call a key, pipelined.
pub(crate) fn lookup(
    server: &mut Server,
    keys: &[Vec<u8>],
    delete: bool,
    per_key: bool,
) -> Result<Vec<Found>, Failure> {
    let script = redis::Script::new(LOOKUP);
    let mode = if delete { "delete" } else { "read" };
    let fail = |err: redis::RedisError| redis_failure(&server.shown, &err);
    let replies: Vec<Reply> = if per_key {
        let hash = script
            .prepare_invoke()
            .load(&mut server.connection)
            .map_err(fail)?;
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("EVALSHA")
                .arg(&hash)
                .arg(1)
                .arg(key)
                .arg(mode)
                .arg(MAX_VALUE_BYTES);
        }
        let replies: Vec<Vec<Reply>> = pipe.query(&mut server.connection).map_err(fail)?;
        replies.into_iter().flatten().collect()
    } else {
        script
            .key(keys)
            .arg(mode)
            .arg(MAX_VALUE_BYTES)
            .invoke(&mut server.connection)
            .map_err(fail)?
    };
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
