//! What a claim returns: the [`Claim`] we own and the [`ClaimOutcome`].
//!
//! ```
//! use std::time::Duration;
//! use amqp_idempotency::store::{ClaimOutcome, MemoryStore, Token, machine};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), amqp_idempotency::StoreError> {
//! let store = MemoryStore::new();
//! let outcome = machine::claim(&store, "idem:orders:7", &Token::new(), "", Duration::from_secs(30)).await?;
//! let ClaimOutcome::Acquired(claim) = outcome else { panic!("a fresh key is ours") };
//! assert_eq!(claim.attempt(), 1);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use super::record::{
    DONE_HASH_DIGITS, DONE_TOKEN_DIGITS, DONE_UNCHECKED_TOKEN_DIGITS, Record, TAG_IN_PROGRESS,
    compact_done, encode_attempt,
};

/// An in-progress record we own. Pass it back to renew, complete or release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    key: String,
    token: String,
    attempt: u32,
    payload_hash: String,
    /// Set by the machine when it adopts our own earlier claim.
    pub(super) value: Vec<u8>,
    /// Set by the machine when it took over a crashed attempt.
    pub(super) after_crash: bool,
}

impl Claim {
    pub(super) fn new(key: &str, token: &str, attempt: u32, payload_hash: &str) -> Self {
        // On every delivery's path: the compact value is written in one
        // allocation; other tokens or hashes take the general encoding.
        let value =
            encode_attempt(TAG_IN_PROGRESS, token, attempt, payload_hash).unwrap_or_else(|| {
                Record::InProgress {
                    token: token.to_owned(),
                    attempt,
                    payload_hash: payload_hash.to_owned(),
                    lingers: true,
                }
                .encode()
            });
        Self {
            key: key.to_owned(),
            token: token.to_owned(),
            attempt,
            payload_hash: payload_hash.to_owned(),
            value,
            after_crash: false,
        }
    }

    /// True when the previous attempt never reached an outcome: its lease
    /// ran out with nobody completing or releasing it (its consumer
    /// crashed, was killed, or hung), and this claim took the record over.
    pub fn after_crash(&self) -> bool {
        self.after_crash
    }

    /// The Redis key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner token: usable as a fencing value by the handler.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Which attempt this is, starting at 1: handler runs, counted in the
    /// record (failed ones and ones that never finished), not deliveries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The stored in-progress value, which every later write compares
    /// against (whole, as `SET ... IFEQ` does).
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    pub(super) fn done_value(&self) -> Vec<u8> {
        if let Some(value) = compact_done(&self.token, &self.payload_hash) {
            return value;
        }
        // A done mark stays for the whole retention, so it is one integer:
        // 32 bits of the payload hash, and of the token what is left (16
        // bits, or 48 unchecked), enough to tell a retried completion of
        // ours from another consumer's.
        let prefix = |text: &str, digits: usize| text.get(..digits).unwrap_or(text).to_owned();
        let (payload_hash, token) = if self.payload_hash.is_empty() {
            (
                String::new(),
                prefix(&self.token, DONE_UNCHECKED_TOKEN_DIGITS),
            )
        } else {
            (
                prefix(&self.payload_hash, DONE_HASH_DIGITS),
                prefix(&self.token, DONE_TOKEN_DIGITS),
            )
        };
        Record::Done {
            payload_hash,
            token,
        }
        .encode()
    }

    pub(super) fn released_value(&self) -> Vec<u8> {
        Record::Released {
            attempts: self.attempt,
            payload_hash: self.payload_hash.clone(),
            token: self.token.clone(),
        }
        .encode()
    }
}

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key is ours: run the handler, then complete or release.
    Acquired(Claim),
    /// Another consumer holds the key.
    InProgress {
        /// How long its lease has left, if the store could tell.
        remaining: Option<Duration>,
    },
    /// The message was already processed.
    Done,
    /// The key holds a record for a different payload (same fingerprint,
    /// different body): a producer bug or a fingerprint collision.
    PayloadMismatch {
        /// The payload hash stored in the record.
        stored: String,
    },
    /// The key holds a value this library did not write.
    Unrecognized {
        /// The value found (bytes that are not UTF-8 shown as U+FFFD).
        value: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Token;

    #[test]
    fn the_fast_encodings_match_the_records() {
        let token = Token::new();
        for hash in ["", "a1b2c3d4e5f6"] {
            for attempt in [1, 2, 300] {
                let claim = Claim::new("k", token.as_str(), attempt, hash);
                let record = Record::InProgress {
                    token: token.as_str().to_owned(),
                    attempt,
                    payload_hash: hash.to_owned(),
                    lingers: true,
                };
                assert_eq!(claim.value(), &record.encode()[..]);
                let done = if hash.is_empty() {
                    Record::Done {
                        payload_hash: String::new(),
                        token: token.as_str()[..DONE_UNCHECKED_TOKEN_DIGITS].to_owned(),
                    }
                } else {
                    Record::Done {
                        payload_hash: hash[..DONE_HASH_DIGITS].to_owned(),
                        token: token.as_str()[..DONE_TOKEN_DIGITS].to_owned(),
                    }
                };
                assert_eq!(claim.done_value(), done.encode());
            }
        }
        // A token of another shape takes the general encoding.
        let odd = Claim::new("k", "not-hex", 1, "");
        assert_eq!(
            Record::parse(odd.value()).map(|r| r.payload_hash().to_owned()),
            Some(String::new())
        );
    }

    #[test]
    fn compact_records_round_trip_and_stay_small() {
        let token = Token::new();
        let fresh = Claim::new("k", token.as_str(), 1, "0123456789ab");
        let record = Record::parse(fresh.value()).unwrap();
        assert_eq!(
            record,
            Record::InProgress {
                token: token.as_str().to_owned(),
                attempt: 1,
                payload_hash: "0123456789ab".into(),
                lingers: true,
            }
        );
        assert_eq!(fresh.value()[0], TAG_IN_PROGRESS);
        let done = fresh.done_value();
        let number: i64 = std::str::from_utf8(&done).unwrap().parse().unwrap();
        assert!(
            number < 0,
            "a done mark is an integer, stored without a string"
        );
        assert_eq!(
            Record::parse(&done),
            Some(Record::Done {
                payload_hash: "01234567".into(),
                token: token.as_str()[..4].to_owned(),
            })
        );
        let unchecked = Claim::new("k", token.as_str(), 300, "");
        assert_eq!(
            Record::parse(&unchecked.done_value()),
            Some(Record::Done {
                payload_hash: String::new(),
                token: token.as_str()[..12].to_owned(),
            })
        );
        // A foreign integer is not a done mark.
        assert_eq!(Record::parse(b"-42"), None);
        assert_eq!(
            Record::parse(&unchecked.released_value()),
            Some(Record::Released {
                attempts: 300,
                payload_hash: String::new(),
                token: token.as_str().to_owned(),
            })
        );
    }
}
