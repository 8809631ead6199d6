//! The record wire format: what one key holds, in every encoding this
//! library ever wrote.
//!
//! **This file is a compatibility contract.** Consumers of different
//! versions share the same keys during a rolling upgrade, and a done mark
//! lives for the whole retention: what 0.1 and 0.2 wrote (the text values,
//! version 1) is still read and honoured, and what this version writes
//! must stay readable by the next. Change an encoding only by adding one
//! (a new tag above 0x80), never by changing what a byte means.
//!
//! Code outside the crate reads records through
//! [`records::Record`](crate::records::Record), built on this file:
//!
//! ```
//! use amqp_idempotency::records::{Record, State};
//!
//! // A done mark of 0.1 or 0.2 still reads as done.
//! let old = Record::decode("idem:orders:42", (b"d:00112233:0123456789abcdef".to_vec(), None));
//! assert!(matches!(old.state(), State::Done { .. }));
//! ```
//!
//! The encodings are tabled on [`Record`].

/// Tags of the compact (version 2) encoding: the first byte of the value.
/// Version 1 values are text and start with `p`, `d` or `f`, so the two
/// never meet; a later version takes other bytes above 0x80.
pub(super) const TAG_IN_PROGRESS: u8 = 0x81;
const TAG_RELEASED: u8 = 0x83;
/// Bytes of a payload hash in a compact record (48 bits).
const HASH_BYTES: usize = 6;
/// Bytes of an owner token in a compact in-progress or released record.
const TOKEN_BYTES: usize = 8;
/// A compact done mark is a negative decimal integer, which Redis stores
/// in the value object itself (no string allocation): `-n`, where the top
/// 15 of n's 63 bits are one of these marks and the low 48 bits hold a
/// 16-bit token prefix and a 32-bit payload hash, or, for an unchecked
/// payload, a 48-bit token prefix.
const DONE_CHECKED: u64 = 0x6d0c;
const DONE_UNCHECKED: u64 = 0x6d0e;
/// Hexadecimal digits of the token and the hash in a checked done mark.
pub(super) const DONE_TOKEN_DIGITS: usize = 4;
pub(super) const DONE_HASH_DIGITS: usize = 8;
/// Hexadecimal digits of the token in an unchecked done mark.
pub(super) const DONE_UNCHECKED_TOKEN_DIGITS: usize = 12;

/// A parsed record: one key's value, in whichever encoding it was written.
///
/// # Encodings
///
/// One key per message, `<prefix>:<scope>:<fingerprint>` (see
/// [`record_key`](crate::fingerprint::record_key)), holding one of these
/// values. Since 0.3 they are written in a compact binary encoding
/// (version 2, first byte at or above 0x80); the text values of 0.1 and
/// 0.2 (version 1) are still read and honoured.
///
/// | state | version 2 (bytes) | version 1 (text) | expiry |
/// |---|---|---|---|
/// | in progress | `0x81`, token (8), attempt (varint), payload hash (0 or 6) | `p:<token>+:<attempt>:<payload hash>` | the lease, then [`CRASH_MEMORY`](super::CRASH_MEMORY) more |
/// | in progress (0.1.0) | | `p:<token>:<attempt>:<payload hash>` | the lease |
/// | done | `-n`: one negative decimal integer, n = marker (15 bits), token (first 16 bits), payload hash (32 bits), or marker and token (48 bits) when the payload is not checked | `d:<payload hash>:<token>` | the retention |
/// | released | `0x83`, token (8), failed attempts (varint), payload hash (0 or 6) | `f:<attempts>:<payload hash>:<token>` | the retention |
///
/// Redis keeps an integer inside the value object, with no string
/// allocation: about 135 bytes of memory per done message with a 28-byte
/// key (see docs/performance.md, Memory). The payload
/// hash is the first 48 bits of the body's SHA-256 (32 in a done mark;
/// 0.2 kept 128 bits; they compare over their common length).
///
/// The done and released values name the token that wrote them, so a
/// retried transition can tell its own earlier write from another
/// consumer's. Every write after a claim compares the whole stored value
/// with the claim's ([`Claim::value`](super::Claim::value)), which is what `SET ... IFEQ`
/// does natively on Valkey 8.1 and Redis 8.4.
///
/// An in-progress record outlives its lease by [`CRASH_MEMORY`](super::CRASH_MEMORY): when its
/// owner dies mid-handler (kill -9, OOM kill, an abort), the next claim
/// finds the record with its lease over, takes it over (atomically, only if
/// the lease is still over) and counts the dead attempt, so a message that
/// kills its consumer is dead-lettered after the configured attempts
/// instead of looping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// Claimed by `token`, in its `attempt`-th attempt.
    InProgress {
        /// The owner's token.
        token: String,
        /// 1 for the first attempt.
        attempt: u32,
        /// Hash of the payload being processed ("" when not checked).
        payload_hash: String,
        /// True when the record is kept [`CRASH_MEMORY`](super::CRASH_MEMORY) past its lease;
        /// false for 0.1.0's records, which expire with their lease.
        lingers: bool,
    },
    /// Processed.
    Done {
        /// Hash of the payload that was processed ("" when not checked).
        payload_hash: String,
        /// The token of the claim that completed it ("" if unknown); a
        /// compact done mark keeps its first 4 hexadecimal digits (12 when
        /// the payload is not checked).
        token: String,
    },
    /// Released after failed attempts; the next claim takes it over.
    Released {
        /// How many attempts failed so far.
        attempts: u32,
        /// Hash of the payload that failed ("" when not checked).
        payload_hash: String,
        /// The token of the claim that released it ("" if unknown).
        token: String,
    },
}

impl Record {
    /// Parses a stored value, in either encoding; `None` if this library
    /// did not write it.
    pub(crate) fn parse(value: &[u8]) -> Option<Self> {
        match value.first() {
            Some(&tag) if tag >= 0x80 => Self::parse_compact(value),
            Some(b'-') => Self::parse_done_mark(value),
            _ => Self::parse_text(std::str::from_utf8(value).ok()?),
        }
    }

    /// A compact done mark: `-n` in canonical decimal (see [`DONE_CHECKED`]).
    fn parse_done_mark(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        let number: i64 = text.parse().ok()?;
        if number >= 0 || number.to_string() != text {
            return None;
        }
        let n = number.unsigned_abs();
        let payload = n & ((1 << 48) - 1);
        match n >> 48 {
            DONE_CHECKED => Some(Self::Done {
                token: format!("{:04x}", payload >> 32),
                payload_hash: format!("{:08x}", payload & 0xffff_ffff),
            }),
            DONE_UNCHECKED => Some(Self::Done {
                token: format!("{payload:012x}"),
                payload_hash: String::new(),
            }),
            _ => None,
        }
    }

    /// Version 2: `tag, token, [attempt varint], [payload hash]`.
    fn parse_compact(value: &[u8]) -> Option<Self> {
        let (&tag, rest) = value.split_first()?;
        let hash = |bytes: &[u8]| match bytes.len() {
            0 => Some(String::new()),
            HASH_BYTES => Some(hex(bytes)),
            _ => None,
        };
        match tag {
            TAG_IN_PROGRESS | TAG_RELEASED => {
                let (token, rest) = rest.split_at_checked(TOKEN_BYTES)?;
                let (count, rest) = read_varint(rest)?;
                let (token, payload_hash) = (hex(token), hash(rest)?);
                Some(if tag == TAG_IN_PROGRESS {
                    Self::InProgress {
                        token,
                        attempt: count,
                        payload_hash,
                        lingers: true,
                    }
                } else {
                    Self::Released {
                        attempts: count,
                        payload_hash,
                        token,
                    }
                })
            }
            _ => None,
        }
    }

    /// Version 1 (0.1 and 0.2): colon-separated text.
    fn parse_text(value: &str) -> Option<Self> {
        let mut parts = value.splitn(4, ':');
        let kind = parts.next()?;
        let mut field = || parts.next();
        let clean = |text: &str| !text.contains(':');
        match kind {
            "p" => {
                let token = field()?;
                let (token, lingers) = match token.strip_suffix('+') {
                    Some(token) => (token.to_owned(), true),
                    None => (token.to_owned(), false),
                };
                let attempt = field()?.parse().ok()?;
                let payload_hash = field()?.to_owned();
                (!token.is_empty() && !token.contains('+') && clean(&payload_hash)).then_some(
                    Self::InProgress {
                        token,
                        attempt,
                        payload_hash,
                        lingers,
                    },
                )
            }
            "d" => {
                let payload_hash = field()?.to_owned();
                let token = field().unwrap_or("").to_owned();
                (field().is_none() && clean(&token)).then_some(Self::Done {
                    payload_hash,
                    token,
                })
            }
            "f" => {
                let attempts = field()?.parse().ok()?;
                let payload_hash = field()?.to_owned();
                let token = field().unwrap_or("").to_owned();
                clean(&token).then_some(Self::Released {
                    attempts,
                    payload_hash,
                    token,
                })
            }
            _ => None,
        }
    }

    /// The stored value for this record: the compact encoding when its
    /// fields fit it (tokens and hashes as this version makes them), the
    /// text encoding of 0.1 and 0.2 otherwise.
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.encode_compact()
            .unwrap_or_else(|| self.encode_text().into_bytes())
    }

    fn encode_compact(&self) -> Option<Vec<u8>> {
        match self {
            Self::InProgress {
                token,
                attempt,
                payload_hash,
                lingers: true,
            } => encode_attempt(TAG_IN_PROGRESS, token, *attempt, payload_hash),
            Self::InProgress { lingers: false, .. } => None,
            Self::Done {
                payload_hash,
                token,
            } => encode_done(token, payload_hash),
            Self::Released {
                attempts,
                payload_hash,
                token,
            } => encode_attempt(TAG_RELEASED, token, *attempts, payload_hash),
        }
    }

    fn encode_text(&self) -> String {
        match self {
            Self::InProgress {
                token,
                attempt,
                payload_hash,
                lingers,
            } => {
                let mark = if *lingers { "+" } else { "" };
                format!("p:{token}{mark}:{attempt}:{payload_hash}")
            }
            Self::Done {
                payload_hash,
                token,
            } => format!("d:{payload_hash}:{token}"),
            Self::Released {
                attempts,
                payload_hash,
                token,
            } => format!("f:{attempts}:{payload_hash}:{token}"),
        }
    }

    /// The payload hash the record was written with.
    pub(crate) fn payload_hash(&self) -> &str {
        match self {
            Self::InProgress { payload_hash, .. }
            | Self::Done { payload_hash, .. }
            | Self::Released { payload_hash, .. } => payload_hash,
        }
    }
}

/// True when two payload hashes (hexadecimal, of the same digest) may
/// belong to the same payload: equal over their common length, so the
/// 128-bit hashes of 0.1 and 0.2 compare with today's 48-bit ones.
pub(super) fn same_payload(a: &str, b: &str) -> bool {
    a.is_empty() || b.is_empty() || a.starts_with(b) || b.starts_with(a)
}

pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// A compact in-progress or released record: `tag`, the token's bytes,
/// the attempt count as a varint, then the payload hash's bytes; `None`
/// when the token or hash is not of this version's shape.
pub(super) fn encode_attempt(
    tag: u8,
    token: &str,
    attempts: u32,
    payload_hash: &str,
) -> Option<Vec<u8>> {
    if token.len() != 2 * TOKEN_BYTES
        || !(payload_hash.is_empty() || payload_hash.len() == 2 * HASH_BYTES)
    {
        return None;
    }
    let mut out = Vec::with_capacity(1 + TOKEN_BYTES + 5 + HASH_BYTES);
    out.push(tag);
    push_hex(&mut out, token)?;
    write_varint(&mut out, attempts);
    push_hex(&mut out, payload_hash)?;
    Some(out)
}

/// The compact done mark of a claim's full token and payload hash: the
/// prefixes a done mark keeps, encoded as [`Record::encode`] does.
pub(super) fn compact_done(token: &str, payload_hash: &str) -> Option<Vec<u8>> {
    if payload_hash.is_empty() {
        encode_done(token.get(..DONE_UNCHECKED_TOKEN_DIGITS)?, "")
    } else {
        encode_done(
            token.get(..DONE_TOKEN_DIGITS)?,
            payload_hash.get(..DONE_HASH_DIGITS)?,
        )
    }
}

/// A done mark as one integer, `-{n}` in decimal: its kind, the token
/// prefix and the payload hash prefix (exactly as many hex digits as a
/// done mark keeps, else `None`).
fn encode_done(token: &str, payload_hash: &str) -> Option<Vec<u8>> {
    let number = |text: &str, digits: usize| {
        (text.len() == digits)
            .then(|| u64::from_str_radix(text, 16).ok())
            .flatten()
    };
    let n = if payload_hash.is_empty() {
        DONE_UNCHECKED << 48 | number(token, DONE_UNCHECKED_TOKEN_DIGITS)?
    } else {
        DONE_CHECKED << 48
            | number(token, DONE_TOKEN_DIGITS)? << 32
            | number(payload_hash, DONE_HASH_DIGITS)?
    };
    Some(format!("-{n}").into_bytes())
}

/// Appends the bytes of lowercase hex `text`; `None` on anything else.
fn push_hex(out: &mut Vec<u8>, text: &str) -> Option<()> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for pair in text.as_bytes().chunks(2) {
        match pair {
            [high, low] => out.push(digit(*high)? << 4 | digit(*low)?),
            _ => return None,
        }
    }
    Some(())
}

fn write_varint(out: &mut Vec<u8>, mut n: u32) {
    while n >= 0x80 {
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn read_varint(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let mut n: u64 = 0;
    for (i, byte) in bytes.iter().enumerate().take(5) {
        n |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // One encoding per number: no trailing zero groups.
            let canonical = i == 0 || *byte != 0;
            return canonical.then_some((u32::try_from(n).ok()?, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for record in [
            Record::InProgress {
                token: "ab".into(),
                attempt: 3,
                payload_hash: "ff".into(),
                lingers: true,
            },
            Record::InProgress {
                token: "ab".into(),
                attempt: 1,
                payload_hash: String::new(),
                lingers: false,
            },
            Record::Done {
                payload_hash: String::new(),
                token: "ab".into(),
            },
            Record::Released {
                attempts: 2,
                payload_hash: "00".into(),
                token: "cd".into(),
            },
        ] {
            assert_eq!(Record::parse(&record.encode()), Some(record));
        }
    }

    #[test]
    fn foreign_values_do_not_parse() {
        for value in [
            "",
            "hello",
            "p::1:x",
            "p:t:one:x",
            "p:t:1:x:y",
            "p:t++:1:x",
            "p:+:1:x",
            "d:a:b:c",
            "x:1",
        ] {
            assert_eq!(Record::parse(value.as_bytes()), None, "{value}");
        }
    }

    #[test]
    fn text_records_of_earlier_versions_still_parse() {
        let hash = "00112233445566778899aabbccddeeff";
        let token = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            Record::parse(format!("d:{hash}:{token}").as_bytes()),
            Some(Record::Done {
                payload_hash: hash.into(),
                token: token.into(),
            })
        );
        assert_eq!(
            Record::parse(format!("p:{token}+:2:{hash}").as_bytes()),
            Some(Record::InProgress {
                token: token.into(),
                attempt: 2,
                payload_hash: hash.into(),
                lingers: true,
            })
        );
        // An old 128-bit hash and today's 48-bit one of the same payload agree.
        assert!(same_payload(hash, &hash[..12]));
        assert!(!same_payload(hash, "ffffffffffff"));
    }

    #[test]
    fn malformed_compact_values_do_not_parse() {
        for value in [
            &b"-"[..],
            &b"-0"[..],
            &b"-0123"[..],
            &b"-123"[..],
            &b"-9223372036854775808"[..],
            &[TAG_IN_PROGRESS, 0, 0, 0, 0, 0, 0, 0, 0][..],
            &[TAG_IN_PROGRESS, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0][..],
            &[
                TAG_RELEASED,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0xff,
                0xff,
                0xff,
                0xff,
                0x7f,
            ][..],
            &[0x90, 1][..],
        ] {
            assert_eq!(Record::parse(value), None, "{value:?}");
        }
    }
}
