//! Names that must come out the same on every consumer and every run: the
//! `message_id` of each outgoing message and reply (so that a message sent
//! twice after a crash is deduplicated by its receiver), and the key of a
//! record's outbox.
//!
//! ```ignore
//! assert_eq!(message_id("orders", "o-7", "0").as_str(), "orders:o-7:0");
//! assert_eq!(outbox_key("idem:orders:o-7"), "{idem:orders:o-7}:\0outbox");
//! ```

use lapin::types::ShortString;
use sha2::{Digest, Sha256};

/// The `message_id` of an outgoing message: `{scope}:{fingerprint}:{tail}`,
/// or, past AMQP's 255 bytes, a SHA-256 of it (hex, 32 bytes) and the tail.
pub(super) fn message_id(scope: &str, fingerprint: &str, tail: &str) -> ShortString {
    let id = format!("{scope}:{fingerprint}:{tail}");
    if id.len() <= 255 {
        return id.into();
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}:{tail}").into()
}

/// The `message_id` tail of a reply: `reply:{h}`, where `h` is the first
/// 16 hex digits of the SHA-256 of the request's `correlation_id`, so
/// that the replies to a request and to its retry (another
/// `correlation_id`) have different ids, and the same `correlation_id`
/// always gets the same one; `reply` for a request without one.
pub(super) fn reply_tail(correlation_id: Option<&ShortString>) -> String {
    let Some(correlation_id) = correlation_id else {
        return "reply".to_owned();
    };
    let digest = Sha256::digest(correlation_id.as_str().as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("reply:{hex}")
}

pub_for_testing! {
    /// The key of the outbox of the record at `record_key`: a companion key
    /// (same cluster slot) whose suffix holds a control character, which no
    /// record key does, so that it can never be another message's record.
    ///
    /// ```ignore
    /// use amqp_idempotency::outbox::outbox_key;
    /// assert_eq!(outbox_key("idem:orders:order-42"), "{idem:orders:order-42}:\0outbox");
    /// ```
    fn outbox_key(record_key: &str) -> String {
        crate::fingerprint::companion_key(record_key, "\0outbox")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_deterministic_and_fit_amqp() {
        assert_eq!(message_id("orders", "o-7", "0").as_str(), "orders:o-7:0");
        let long = "f".repeat(300);
        let id = message_id("orders", &long, "reply");
        assert!(id.as_str().len() <= 255);
        assert_eq!(id, message_id("orders", &long, "reply"));
        assert_ne!(id, message_id("orders", &long, "0"));
    }
}
