//! An in-process store with the same semantics as Redis, expiry included.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{Expect, OutboxEntry, Store};
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
    /// Outbox hashes, by key.
    outboxes: HashMap<String, Outboxed>,
}

#[derive(Debug)]
struct Outboxed {
    fields: Vec<OutboxEntry>,
    expires_at: Instant,
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
/// What a conditional write found at its key.
enum Check {
    /// What it expects: write.
    Matches,
    /// Already its target (a retried write): report success, write nothing.
    AlreadyThere,
    /// Something else: refuse.
    Other,
}

impl MemoryStore {
    fn check(
        entries: &mut HashMap<String, Entry>,
        key: &str,
        from: Expect<'_>,
        to: Option<&[u8]>,
    ) -> Check {
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
        if matches {
            Check::Matches
        } else if to
            .is_some_and(|to| Self::live(entries, key).is_some_and(|entry| entry.value[..] == *to))
        {
            Check::AlreadyThere
        } else {
            Check::Other
        }
    }
}

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
        let Entries {
            map,
            sweep_at,
            outboxes,
        } = &mut *guard;
        if let Some(entry) = Self::live(map, key) {
            return Ok(Some(entry.value.clone()));
        }
        if map.len() >= (*sweep_at).max(1024) {
            let now = Instant::now();
            map.retain(|_, entry| entry.expires_at > now);
            outboxes.retain(|_, outbox| outbox.expires_at > now);
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
        match Self::check(entries, key, from, to) {
            Check::Matches => {}
            Check::AlreadyThere => return Ok(true),
            Check::Other => return Ok(false),
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

    async fn commit_outbox(
        &self,
        key: &str,
        from: Expect<'_>,
        to: &[u8],
        ttl: Duration,
        outbox_key: &str,
        fields: &[OutboxEntry],
    ) -> Result<bool, StoreError> {
        let mut guard = self.lock();
        match Self::check(&mut guard.map, key, from, Some(to)) {
            Check::Matches => {}
            Check::AlreadyThere => return Ok(true),
            Check::Other => return Ok(false),
        }
        let expires_at = expiry(ttl);
        guard.map.insert(
            key.to_owned(),
            Entry {
                value: to.to_vec(),
                expires_at,
            },
        );
        if fields.is_empty() {
            guard.outboxes.remove(outbox_key);
        } else {
            guard.outboxes.insert(
                outbox_key.to_owned(),
                Outboxed {
                    fields: fields.to_vec(),
                    expires_at,
                },
            );
        }
        Ok(true)
    }

    async fn outbox(&self, outbox_key: &str) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut guard = self.lock();
        let now = Instant::now();
        if guard
            .outboxes
            .get(outbox_key)
            .is_some_and(|outbox| outbox.expires_at <= now)
        {
            guard.outboxes.remove(outbox_key);
        }
        Ok(guard
            .outboxes
            .get(outbox_key)
            .map(|outbox| outbox.fields.clone())
            .unwrap_or_default())
    }

    async fn outbox_remove(&self, outbox_key: &str, fields: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut guard = self.lock();
        if let Some(outbox) = guard.outboxes.get_mut(outbox_key) {
            outbox.fields.retain(|(field, _)| !fields.contains(field));
            if outbox.fields.is_empty() {
                guard.outboxes.remove(outbox_key);
            }
        }
        Ok(())
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
