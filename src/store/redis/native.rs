//! Native compare-and-set: `SET key new IFEQ old` on Valkey 8.1+ and
//! Redis 8.4+, found from `HELLO` (or from the first transition's answer
//! where `HELLO` is not granted); the scripts elsewhere.
//!
//! ```ignore
//! let cas = Cas::new();
//! cas.detect(Some(&hello_reply)); // server "valkey", version "8.1.0"
//! assert!(cas.try_native());
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use redis::Value;

use super::errors::{Failure, parse};
use super::{Kind, RedisStore, command, millis};
use crate::error::StoreError;

/// Whether transitions use `SET ... IFEQ`.
pub(super) struct Cas {
    /// What the server offers: [`UNKNOWN`] until `HELLO` answered (a user
    /// without `+hello` never learns it: the first transition tries IFEQ
    /// and falls back on a syntax error), then [`NATIVE`] or [`SCRIPTS`].
    pub(super) server: AtomicU8,
    /// The user did not ask for scripts only.
    pub(super) allowed: AtomicBool,
}

pub(super) const UNKNOWN: u8 = 0;
pub(super) const NATIVE: u8 = 1;
pub(super) const SCRIPTS: u8 = 2;

impl Cas {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            server: AtomicU8::new(UNKNOWN),
            allowed: AtomicBool::new(true),
        })
    }

    /// True when the next transition should try `SET ... IFEQ`.
    pub(super) fn try_native(&self) -> bool {
        self.server.load(Ordering::Relaxed) != SCRIPTS && self.allowed.load(Ordering::Relaxed)
    }

    /// True when transitions use `SET ... IFEQ`: the server has it and
    /// the user did not ask for scripts only.
    pub(super) fn is_native(&self) -> bool {
        self.server.load(Ordering::Relaxed) == NATIVE && self.allowed.load(Ordering::Relaxed)
    }

    /// The server refused `SET ... IFEQ`: scripts from now on.
    pub(super) fn use_scripts(&self) {
        self.server.store(SCRIPTS, Ordering::Relaxed);
    }

    /// A `SET ... IFEQ` was answered: the server has it, unless `HELLO`
    /// already said otherwise.
    pub(super) fn native_confirmed(&self) {
        let _ = self
            .server
            .compare_exchange(UNKNOWN, NATIVE, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Records what `HELLO` said about the server (`None`: it refused).
    pub(super) fn detect(&self, hello: Option<&Value>) {
        let Some(hello) = hello else {
            self.server.store(UNKNOWN, Ordering::Relaxed);
            return;
        };
        let native = server_of(hello).is_some_and(|(name, version)| {
            let mut parts = version
                .split('.')
                .map(|part| part.parse::<u32>().unwrap_or(0));
            let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            match name.as_str() {
                "valkey" => (major, minor) >= (8, 1),
                "redis" => (major, minor) >= (8, 4),
                _ => false,
            }
        });
        let server = if native { NATIVE } else { SCRIPTS };
        self.server.store(server, Ordering::Relaxed);
    }
}

/// `server` and `version` from a `HELLO` reply (a map, or a flat array of
/// names and values in RESP2).
pub(super) fn server_of(hello: &Value) -> Option<(String, String)> {
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    };
    let pairs: Vec<(&Value, &Value)> = match hello {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((k, v)),
                _ => None,
            })
            .collect(),
        _ => return None,
    };
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .and_then(|(_, v)| text(v))
    };
    Some((field("server")?.to_ascii_lowercase(), field("version")?))
}

impl RedisStore {
    /// `transition` with `SET ... IFEQ`: one command when the key holds
    /// `from`, a second one only when it does not (to tell "absent", "ours
    /// already" and "someone else's" apart). `Err(None)`: the server
    /// refused the syntax, use the script.
    pub(super) async fn transition_natively(
        &self,
        key: &str,
        from: &[u8],
        or_absent: bool,
        to: &[u8],
        ttl: Duration,
    ) -> Result<bool, Option<StoreError>> {
        let named = |failure: Failure| {
            (!failure.syntax)
                .then(|| StoreError::new("transition", key, failure.unavailable, failure.message))
        };
        let mut set = command("SET", 7, key.len() + to.len() + from.len());
        set.arg(key)
            .arg(to)
            .arg("IFEQ")
            .arg(from)
            .arg("PX")
            .arg(millis(ttl));
        if self.request(key, set, Kind::Write).await.map_err(named)? != Value::Nil {
            return Ok(true);
        }
        let current: Option<Vec<u8>> = if or_absent {
            // Absent: write it; present: this returns what is there.
            let mut create = redis::cmd("SET");
            create
                .arg(key)
                .arg(to)
                .arg("NX")
                .arg("PX")
                .arg(millis(ttl))
                .arg("GET");
            let reply = self
                .request(key, create, Kind::Write)
                .await
                .map_err(named)?;
            match parse::<Option<Vec<u8>>>("transition", key, reply).map_err(Some)? {
                None => return Ok(true),
                found => found,
            }
        } else {
            let mut get = redis::cmd("GET");
            get.arg(key);
            let reply = self.request(key, get, Kind::Read).await.map_err(named)?;
            parse("transition", key, reply).map_err(Some)?
        };
        if current.as_deref() != Some(to) {
            return Ok(false);
        }
        // Already done (a retried transition): write it again, so that a
        // WAIT on this connection waits until the replicas hold it too.
        let mut again = command("SET", 6, key.len() + 2 * to.len());
        again.arg(key).arg(to).arg("IFEQ").arg(to).arg("KEEPTTL");
        Ok(self.request(key, again, Kind::Write).await.map_err(named)? != Value::Nil)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_tells_native_compare_and_set() {
        let hello = |server: &str, version: &str| {
            Value::Array(vec![
                Value::BulkString(b"server".to_vec()),
                Value::BulkString(server.as_bytes().to_vec()),
                Value::BulkString(b"version".to_vec()),
                Value::BulkString(version.as_bytes().to_vec()),
            ])
        };
        for (server, version, native) in [
            ("valkey", "8.1.8", true),
            ("valkey", "8.0.2", false),
            ("redis", "7.0.15", false),
            ("redis", "8.4.0", true),
            ("keydb", "9.0.0", false),
        ] {
            let cas = Cas::new();
            cas.detect(Some(&hello(server, version)));
            assert_eq!(
                cas.server.load(Ordering::Relaxed) == NATIVE,
                native,
                "{server} {version}"
            );
        }
        let cas = Cas::new();
        cas.detect(None);
        assert!(cas.try_native(), "unknown: the first transition tries IFEQ");
    }
}
