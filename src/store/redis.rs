//! The Redis store: one key per message, token-checked scripts.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::Store;
use crate::error::StoreError;

/// Compare-and-set: if KEYS[1] holds ARGV[1], set it to ARGV[2] with a
/// PX of ARGV[3] (or delete it when ARGV[2] is empty). A key that already
/// holds ARGV[2] also answers 1, so a retried transition is harmless.
const TRANSITION: &str = r"
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  if ARGV[2] == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
  return 1
end
if ARGV[2] ~= '' and current == ARGV[2] then
  return 1
end
return 0
";

/// A [`Store`] on Redis 7 or newer (it uses `SET ... NX PX GET`).
///
/// It holds one multiplexed connection that reconnects by itself; clones
/// share it. Scripts are sent by SHA and loaded on first use.
///
/// ```no_run
/// use amqp_idempotency::store::RedisStore;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), amqp_idempotency::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    transition: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// How long a command may wait for its reply before it counts as unanswered.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

    /// Connects to Redis at `url` (`redis://host:port/db`).
    ///
    /// Fails when the URL is malformed or Redis does not answer; the error
    /// names the URL. Once connected, a dropped connection is re-established
    /// in the background and commands in between fail as unavailable.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|err| {
            StoreError::new(
                "connect",
                "",
                false,
                format!("`{url}` is not a valid Redis URL (expected redis://host:port/db): {err}"),
            )
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Self::RESPONSE_TIMEOUT))
            .set_response_timeout(Some(Self::RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|err| {
                StoreError::new(
                    "connect",
                    "",
                    true,
                    format!(
                        "cannot reach Redis at {url}: {err}; start it (for example \
                         `redis-server --port 6379`) or set REDIS_URL"
                    ),
                )
            })?;
        Ok(Self::from_connection(connection))
    }

    /// Wraps an existing connection manager.
    pub fn from_connection(connection: ConnectionManager) -> Self {
        Self {
            connection,
            transition: Script::new(TRANSITION),
        }
    }
}

fn store_error(operation: &'static str, key: &str, err: RedisError) -> StoreError {
    let unavailable = err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_io_error()
        || err.is_unrecoverable_error();
    StoreError::new(operation, key, unavailable, err)
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Store for RedisStore {
    async fn insert_or_get(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .arg("GET")
            .query_async(&mut connection)
            .await
            .map_err(|err| store_error("claim", key, err))
    }

    async fn transition(
        &self,
        key: &str,
        from: &str,
        to: Option<&str>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let changed: i64 = self
            .transition
            .key(key)
            .arg(from)
            .arg(to.unwrap_or(""))
            .arg(millis(ttl))
            .invoke_async(&mut connection)
            .await
            .map_err(|err| store_error("transition", key, err))?;
        Ok(changed == 1)
    }

    async fn get(&self, key: &str) -> Result<Option<(String, Option<Duration>)>, StoreError> {
        let mut connection = self.connection.clone();
        let (value, pttl): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(key)
            .cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .map_err(|err| store_error("get", key, err))?;
        let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
        Ok(value.map(|value| (value, ttl)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(drop)
            .map_err(|err| store_error("ping", "", err))
    }
}
