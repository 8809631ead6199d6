//! Reading (and deleting) records with one script call per server, or per
//! key on a cluster: each record with its outbox, in one atomic step.

use std::time::Duration;

use super::servers::{Server, failure};
use super::view::{KEPT_VALUE_BYTES, Record};
use crate::error::StoreError;
use crate::outbox::outbox_key;

/// For each record key (KEYS in pairs: the record, then its outbox), in
/// one atomic step, and with ARGV[1] == 'delete' deleting both: {type,
/// value start ('' unless a string), full length, PTTL, outbox messages}.
/// Values are read with GETRANGE, so a huge foreign value is never
/// transferred whole.
const LOOKUP: &str = r"
local out = {}
for i = 1, #KEYS, 2 do
  local key, outbox = KEYS[i], KEYS[i + 1]
  local kind = redis.call('TYPE', key)['ok']
  local value = ''
  local len = 0
  if kind == 'string' then
    len = redis.call('STRLEN', key)
    value = redis.call('GETRANGE', key, 0, tonumber(ARGV[2]) - 1)
  end
  local ttl = redis.call('PTTL', key)
  local messages = 0
  if redis.call('TYPE', outbox)['ok'] == 'hash' then
    messages = redis.call('HLEN', outbox)
  end
  if ARGV[1] == 'delete' and kind ~= 'none' then
    redis.call('DEL', key, outbox)
  end
  out[#out + 1] = {kind, value, len, ttl, messages}
end
return out
";

/// The script's answer for one key.
type Reply = (String, Vec<u8>, i64, i64, i64);

/// The records at `keys` of `server` (`None` for an absent key), deleted
/// with them when `delete` is set: in one call, or with `per_key` (a
/// cluster, where keys of different slots cannot share a call) one call
/// a key, pipelined.
pub(super) async fn lookup(
    server: &Server,
    keys: &[String],
    delete: bool,
    per_key: bool,
) -> Result<Vec<Option<Record>>, StoreError> {
    let operation = if delete { "forget" } else { "lookup" };
    let mode = if delete { "delete" } else { "read" };
    let first = keys.first().map_or("", String::as_str);
    let fail = |err: redis::RedisError| {
        let key = if keys.len() == 1 { first } else { "" };
        failure(operation, key, &server.shown, &err)
    };
    let script = redis::Script::new(LOOKUP);
    let mut connection = server.connection.clone();
    let replies: Vec<Reply> = if per_key {
        let hash = script
            .prepare_invoke()
            .load_async(&mut connection)
            .await
            .map_err(fail)?;
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("EVALSHA")
                .arg(&hash)
                .arg(2)
                .arg(key)
                .arg(outbox_key(key))
                .arg(mode)
                .arg(KEPT_VALUE_BYTES);
        }
        let replies: Vec<Vec<Reply>> = pipe.query_async(&mut connection).await.map_err(fail)?;
        replies.into_iter().flatten().collect()
    } else {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key).key(outbox_key(key));
        }
        invocation
            .arg(mode)
            .arg(KEPT_VALUE_BYTES)
            .invoke_async(&mut connection)
            .await
            .map_err(fail)?
    };
    if replies.len() != keys.len() {
        return Err(StoreError::new(
            operation,
            first,
            true,
            format!(
                "{} answered {} records for {} keys; is something rewriting replies between \
                 here and Redis?",
                server.shown,
                replies.len(),
                keys.len()
            ),
        ));
    }
    Ok(keys
        .iter()
        .zip(replies)
        .map(|(key, (kind, value, len, pttl, messages))| {
            (kind != "none").then(|| {
                let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
                let len = usize::try_from(len).unwrap_or(0);
                let messages = usize::try_from(messages).unwrap_or(0);
                Record::from_parts(key, &kind, value, len, ttl, messages)
            })
        })
        .collect())
}
