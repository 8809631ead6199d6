//! Staging: the messages and the reply a handler hands to its [`Outbox`]
//! while it runs, kept to `IDEMPOTENCY_OUTBOX_MAX_BYTES` and sealed when it
//! returns, as the entries its done mark commits.
//!
//! ```ignore
//! let outbox = Outbox::new(1000);
//! outbox.publish("payments", "charge", BasicProperties::default(), "{}")?;
//! let entries = outbox.seal()?; // [(b"m0", ..), (b"t", commit time)]
//! assert!(outbox.publish("payments", "late", BasicProperties::default(), "").is_err());
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;

use super::codec;
use crate::config::Config;
use crate::error::HandlerError;
use crate::store::OutboxEntry;

/// What a handler behind [`OutboxLayer`](super::OutboxLayer) receives: the delivery, and the
/// outbox it publishes through.
#[derive(Debug)]
pub struct OutboxDelivery {
    /// The incoming message (the runner settles it; do not ack it).
    pub delivery: Delivery,
    /// Where the handler stages what it publishes.
    pub outbox: Outbox,
}

/// The staging area of one delivery's outgoing messages.
///
/// Cloning it gives another handle on the same staging area. Staging after
/// the handler returned fails: what the handler left is what is committed.
#[derive(Clone, Debug)]
pub struct Outbox {
    staging: Arc<Mutex<Staging>>,
}

#[derive(Debug, Default)]
struct Staging {
    messages: Vec<Vec<u8>>,
    reply: Option<Vec<u8>>,
    bytes: usize,
    limit: usize,
    sealed: bool,
    /// Set once the limit was passed: the run fails, whatever the handler
    /// does with the error.
    overflow: Option<String>,
}

impl Outbox {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            staging: Arc::new(Mutex::new(Staging {
                limit,
                ..Staging::default()
            })),
        }
    }

    /// Stages a message for `exchange` (`""`: the default exchange) with
    /// `routing_key`. It is published only after the handler succeeded and
    /// its done mark was written; its `message_id` is set by the outbox.
    ///
    /// Fails (permanently: the message is dead-lettered, nothing is
    /// published) when the staged messages would pass
    /// `IDEMPOTENCY_OUTBOX_MAX_BYTES`, or when the handler already returned.
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: impl Into<Vec<u8>>,
    ) -> Result<(), HandlerError> {
        let encoded = codec::encode(exchange, routing_key, &properties, &body.into())?;
        self.stage(encoded, false)
    }

    /// Stages the reply to a request: published to the delivery's
    /// `reply_to` with its `correlation_id` once the done mark is written,
    /// and kept for the done mark's retention so that a duplicate request
    /// gets it again without running the handler. A second reply replaces
    /// the first. Same limits as [`publish`](Self::publish).
    pub fn reply(
        &self,
        properties: BasicProperties,
        body: impl Into<Vec<u8>>,
    ) -> Result<(), HandlerError> {
        let encoded = codec::encode("", "", &properties, &body.into())?;
        self.stage(encoded, true)
    }

    /// How many messages are staged (the reply not counted).
    pub fn len(&self) -> usize {
        self.lock().messages.len()
    }

    /// True when nothing is staged, reply included.
    pub fn is_empty(&self) -> bool {
        let staging = self.lock();
        staging.messages.is_empty() && staging.reply.is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Staging> {
        self.staging
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stage(&self, encoded: Vec<u8>, reply: bool) -> Result<(), HandlerError> {
        let mut staging = self.lock();
        if staging.sealed {
            return Err(HandlerError::permanent(
                "staged in the outbox after the handler returned: only what is staged while it runs is published (await the work inside the handler)",
            ));
        }
        let replaced = if reply {
            staging.reply.as_ref().map_or(0, Vec::len)
        } else {
            0
        };
        let bytes = staging.bytes - replaced + encoded.len();
        if bytes > staging.limit {
            let message = format!(
                "the outbox would hold {bytes} bytes, over IDEMPOTENCY_OUTBOX_MAX_BYTES={}: nothing is published; stage less per message or raise the limit",
                staging.limit
            );
            staging.overflow = Some(message.clone());
            return Err(HandlerError::permanent(message));
        }
        staging.bytes = bytes;
        if reply {
            staging.reply = Some(encoded);
        } else {
            staging.messages.push(encoded);
        }
        Ok(())
    }

    /// Ends staging: the entries to commit (field, encoded message), or
    /// the limit that was passed.
    pub(crate) fn seal(&self) -> Result<Vec<OutboxEntry>, HandlerError> {
        let mut staging = self.lock();
        staging.sealed = true;
        if let Some(overflow) = &staging.overflow {
            return Err(HandlerError::permanent(overflow.clone()));
        }
        let mut entries: Vec<OutboxEntry> = std::mem::take(&mut staging.messages)
            .into_iter()
            .enumerate()
            .map(|(position, message)| (message_field(position), message))
            .collect();
        if let Some(reply) = staging.reply.take() {
            entries.push((REPLY_FIELD.to_vec(), reply));
        }
        if !entries.is_empty() {
            entries.push((
                COMMITTED_FIELD.to_vec(),
                unix_millis().to_string().into_bytes(),
            ));
        }
        Ok(entries)
    }
}

/// The outbox field of the reply.
pub(super) const REPLY_FIELD: &[u8] = b"r";

/// The outbox field that holds when it was committed (Unix milliseconds,
/// by the committing consumer's clock).
pub(super) const COMMITTED_FIELD: &[u8] = b"t";

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// How long ago the outbox of `entries` was committed, when it says.
pub(crate) fn since_commit(entries: &[OutboxEntry]) -> Option<Duration> {
    let (_, value) = entries.iter().find(|(field, _)| field == COMMITTED_FIELD)?;
    let at: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    Some(Duration::from_millis(unix_millis().saturating_sub(at)))
}

/// True when `entries` still hold a message not marked dispatched.
pub(crate) fn undispatched(entries: &[OutboxEntry]) -> bool {
    entries.iter().any(|(field, _)| field.starts_with(b"m"))
}

/// The outbox field of the message staged at `position`.
fn message_field(position: usize) -> Vec<u8> {
    format!("m{position}").into_bytes()
}

/// A fresh staging area with the configured limit.
pub(crate) fn staging(config: &Config) -> Outbox {
    Outbox::new(config.outbox_max_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_keeps_to_its_limit_and_ends_with_the_handler() {
        let outbox = Outbox::new(200);
        outbox
            .publish("", "q", BasicProperties::default(), vec![0; 50])
            .unwrap();
        outbox
            .reply(BasicProperties::default(), vec![1; 50])
            .unwrap();
        // A second reply replaces the first, and counts once.
        outbox
            .reply(BasicProperties::default(), vec![2; 50])
            .unwrap();
        let err = outbox
            .publish("", "q", BasicProperties::default(), vec![0; 150])
            .unwrap_err();
        assert!(
            err.to_string().contains("IDEMPOTENCY_OUTBOX_MAX_BYTES=200"),
            "{err}"
        );
        // Passing the limit fails the run even when the handler ignores it.
        assert!(outbox.seal().is_err());

        let outbox = Outbox::new(1000);
        outbox
            .publish("x", "a", BasicProperties::default(), "1")
            .unwrap();
        outbox
            .publish("x", "b", BasicProperties::default(), "2")
            .unwrap();
        outbox.reply(BasicProperties::default(), "r").unwrap();
        let entries = outbox.seal().unwrap();
        let fields: Vec<&[u8]> = entries.iter().map(|(f, _)| &f[..]).collect();
        assert_eq!(fields, [&b"m0"[..], b"m1", b"r", b"t"]);
        assert!(undispatched(&entries));
        assert!(since_commit(&entries).is_some_and(|age| age < Duration::from_secs(60)));
        assert!(!undispatched(&entries[2..]));
        assert!(
            outbox
                .publish("x", "c", BasicProperties::default(), "3")
                .is_err()
        );
    }
}
