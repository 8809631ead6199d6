//! An in-process store with the same semantics as Redis, expiry included.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{Expect, Store};
use crate::error::StoreError;

/// An in-process [`Store`]: for tests and single-process consumers.
///
/// Expiry follows `tokio::time`, so tests can pause and advance the clock
/// instead of sleeping. Clones share the same records.
///
/// ```
/// use amqp_idempotency::store::{MemoryStore, Store};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), amqp_idempotency::StoreError> {
/// let store = MemoryStore::new();
/// assert_eq!(store.insert_or_get("k", b"v", std::time::Duration::from_secs(1)).await?, None);
/// assert_eq!(store.len(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    entries: Arc<Mutex<Entries>>,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<String, Entry>,
    /// Expired entries are swept when the map grows past this size, which
    /// then doubles: sweeping costs O(1) per insert on average.
    sweep_at: usize,
}

#[derive(Debug)]
struct Entry {
    value: Vec<u8>,
    expires_at: Instant,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of live records.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .map
            .values()
            .filter(|entry| entry.expires_at > now)
            .count()
    }

    /// True when no live record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // A panic while holding the lock cannot leave a half-written entry
        // (every update is a single insert or remove), so poisoning is ignored.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn live<'a>(entries: &'a mut HashMap<String, Entry>, key: &str) -> Option<&'a mut Entry> {
        let now = Instant::now();
        if entries
            .get(key)
            .is_some_and(|entry| entry.expires_at <= now)
        {
            entries.remove(key);
        }
        entries.get_mut(key)
    }
}

/// `now + ttl`, saturating far in the future instead of overflowing.
fn expiry(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Store for MemoryStore {
    async fn insert_or_get(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut guard = self.lock();
        let Entries { map, sweep_at } = &mut *guard;
        if let Some(entry) = Self::live(map, key) {
            return Ok(Some(entry.value.clone()));
        }
        if map.len() >= (*sweep_at).max(1024) {
            let now = Instant::now();
            map.retain(|_, entry| entry.expires_at > now);
            *sweep_at = map.len().saturating_mul(2);
        }
        map.insert(
            key.to_owned(),
            Entry {
                value: value.to_vec(),
                expires_at: expiry(ttl),
            },
        );
        Ok(None)
    }

    async fn transition(
        &self,
        key: &str,
        from: Expect<'_>,
        to: Option<&[u8]>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut guard = self.lock();
        let entries = &mut guard.map;
        let now = Instant::now();
        let matches = match (Self::live(entries, key), from) {
            (None, Expect::ValueOrAbsent(_)) => true,
            (None, _) => false,
            (Some(entry), Expect::Value(value) | Expect::ValueOrAbsent(value)) => {
                entry.value[..] == *value
            }
            (Some(entry), Expect::Expired { value, grace }) => {
                entry.value[..] == *value && entry.expires_at - now <= grace
            }
        };
        if !matches {
            return Ok(to.is_some_and(|to| {
                Self::live(entries, key).is_some_and(|entry| entry.value[..] == *to)
            }));
        }
        match to {
            Some(to) => {
                entries.insert(
                    key.to_owned(),
                    Entry {
                        value: to.to_vec(),
                        expires_at: expiry(ttl),
                    },
                );
            }
            None => {
                entries.remove(key);
            }
        }
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Duration>)>, StoreError> {
        let mut guard = self.lock();
        let now = Instant::now();
        Ok(Self::live(&mut guard.map, key)
            .map(|entry| (entry.value.clone(), Some(entry.expires_at - now))))
    }

    async fn probe(&self, _key: &str) -> Result<(), StoreError> {
        Ok(())
    }
}
