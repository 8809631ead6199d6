//! Where claims live: the [`Store`] trait, [`RedisStore`] and [`MemoryStore`].
//!
//! ```
//! use std::time::Duration;
//! use amqp_idempotency::store::{ClaimOutcome, MemoryStore, Store, Token};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), amqp_idempotency::StoreError> {
//! let store = MemoryStore::new();
//! let lease = Duration::from_secs(30);
//! let ClaimOutcome::Acquired(claim) = store.claim("idem:orders:42", &Token::new(), "", lease).await? else {
//!     panic!("a fresh key is ours");
//! };
//! // Another consumer sees the message in progress...
//! let other = store.claim("idem:orders:42", &Token::new(), "", lease).await?;
//! assert!(matches!(other, ClaimOutcome::InProgress { .. }));
//! // ...and done once we complete it.
//! assert!(store.complete(&claim, Duration::from_secs(3600)).await?);
//! let again = store.claim("idem:orders:42", &Token::new(), "", lease).await?;
//! assert!(matches!(again, ClaimOutcome::Done { .. }));
//! # Ok(())
//! # }
//! ```
//!
//! # Records
//!
//! One key per message, `<prefix>:<scope>:<fingerprint>` (see
//! [`record_key`](crate::fingerprint::record_key)), holding one of these
//! values. Since 0.3 they are written in a compact binary encoding
//! (version 2, first byte at or above 0x80); the text values of 0.1 and
//! 0.2 (version 1) are still read and honoured.
//!
//! | state | version 2 (bytes) | version 1 (text) | expiry |
//! |---|---|---|---|
//! | in progress | `0x81`, token (8), attempt (varint), payload hash (0 or 6) | `p:<token>+:<attempt>:<payload hash>` | the lease, then [`CRASH_MEMORY`] more |
//! | in progress (0.1.0) | | `p:<token>:<attempt>:<payload hash>` | the lease |
//! | done | `-n`: one negative decimal integer, n = marker (15 bits), token (first 16 bits), payload hash (32 bits), or marker and token (48 bits) when the payload is not checked | `d:<payload hash>:<token>` | the retention |
//! | released | `0x83`, token (8), failed attempts (varint), payload hash (0 or 6) | `f:<attempts>:<payload hash>:<token>` | the retention |
//!
//! Redis keeps an integer inside the value object, with no string
//! allocation: about 135 bytes of memory per done message with a 28-byte
//! key (see the README's Redis Cluster and Valkey section). The payload
//! hash is the first 48 bits of the body's SHA-256 (32 in a done mark;
//! 0.2 kept 128 bits; they compare over their common length).
//!
//! The done and released values name the token that wrote them, so a
//! retried transition can tell its own earlier write from another
//! consumer's. Every write after a claim compares the whole stored value
//! with the claim's ([`Claim::value`]), which is what `SET ... IFEQ`
//! does natively on Valkey 8.1 and Redis 8.4.
//!
//! An in-progress record outlives its lease by [`CRASH_MEMORY`]: when its
//! owner dies mid-handler (kill -9, OOM kill, an abort), the next claim
//! finds the record with its lease over, takes it over (atomically, only if
//! the lease is still over) and counts the dead attempt, so a message that
//! kills its consumer is dead-lettered after the configured attempts
//! instead of looping.
//!
//! A store implements four primitives (insert-if-absent returning the old
//! value, a compare-and-set transition, a read, a ping); the state machine
//! (claim, renew, complete, release) is written once, here, on top of them.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::StoreError;

mod memory;
mod redis;

pub use self::memory::MemoryStore;
pub use self::redis::{RedisStore, redis_client, sentinel_master_url};

/// How often an unanswered insert is retried with the same token.
const AMBIGUOUS_RETRIES: usize = 2;
/// How often a takeover of a released record is retried when raced.
const TAKEOVER_RETRIES: usize = 3;

/// How long an in-progress record is kept after its lease ended, so that the
/// next claim can tell that the previous attempt never finished (its
/// consumer crashed) and count it. The same for every consumer: the lease
/// left is the record's time to live minus this.
pub const CRASH_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// A unique claim token: 64 bits, from a per-process random seed and a
/// counter through a bijective mix, so that no two claims of a process
/// share one and claims of different processes collide with probability
/// 2^-64.
///
/// The token identifies the owner of an in-progress record. Every write
/// after the claim checks it, and a handler can use it as a fencing value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// A new token, unique across processes with overwhelming probability.
    pub fn new() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(|| {
            // Without OS randomness, fall back to time and pid: unique enough
            // for ownership checks, which compare whole tokens.
            getrandom::u64().unwrap_or_else(|_| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                nanos ^ (u64::from(std::process::id()) << 32)
            })
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // SplitMix64: distinct counters give distinct inputs (the gamma is
        // odd) and the finaliser is a bijection, so tokens never repeat
        // within a process.
        let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // 16 lowercase hex digits, as `{:016x}` writes them.
        Self(hex(&(z ^ (z >> 31)).to_be_bytes()))
    }

    /// The token as text: 16 hexadecimal digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Token {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Tags of the compact (version 2) encoding: the first byte of the value.
/// Version 1 values are text and start with `p`, `d` or `f`, so the two
/// never meet; a later version takes other bytes above 0x80.
const TAG_IN_PROGRESS: u8 = 0x81;
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
const DONE_TOKEN_DIGITS: usize = 4;
const DONE_HASH_DIGITS: usize = 8;
/// Hexadecimal digits of the token in an unchecked done mark.
const DONE_UNCHECKED_TOKEN_DIGITS: usize = 12;

/// A parsed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Claimed by `token`, in its `attempt`-th attempt.
    InProgress {
        /// The owner's token.
        token: String,
        /// 1 for the first attempt.
        attempt: u32,
        /// Hash of the payload being processed ("" when not checked).
        payload_hash: String,
        /// True when the record is kept [`CRASH_MEMORY`] past its lease;
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
    pub fn parse(value: &[u8]) -> Option<Self> {
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
    pub fn encode(&self) -> Vec<u8> {
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
    pub fn payload_hash(&self) -> &str {
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
fn same_payload(a: &str, b: &str) -> bool {
    a.is_empty() || b.is_empty() || a.starts_with(b) || b.starts_with(a)
}

fn hex(bytes: &[u8]) -> String {
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
fn encode_attempt(tag: u8, token: &str, attempts: u32, payload_hash: &str) -> Option<Vec<u8>> {
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
fn compact_done(token: &str, payload_hash: &str) -> Option<Vec<u8>> {
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

/// An in-progress record we own. Pass it back to renew, complete or release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    key: String,
    token: String,
    attempt: u32,
    payload_hash: String,
    value: Vec<u8>,
    after_crash: bool,
}

impl Claim {
    fn new(key: &str, token: &str, attempt: u32, payload_hash: &str) -> Self {
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

    fn done_value(&self) -> Vec<u8> {
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

    fn released_value(&self) -> Vec<u8> {
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

/// What a [`Store::transition`] must find at the key before it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect<'a> {
    /// Exactly this value.
    Value(&'a [u8]),
    /// This value, or no key at all: a done mark may be written where our
    /// lease expired with nobody taking the key over.
    ValueOrAbsent(&'a [u8]),
    /// This value with at most `grace` left to live: an in-progress record
    /// whose lease is over (see [`CRASH_MEMORY`]). Checked in the same
    /// atomic step as the write, so a renewal that lands first wins.
    Expired {
        /// The in-progress value.
        value: &'a [u8],
        /// The time to live at or below which the lease is over.
        grace: Duration,
    },
}

impl Expect<'_> {
    /// The value expected at the key.
    pub fn value(&self) -> &[u8] {
        match self {
            Self::Value(value) | Self::ValueOrAbsent(value) | Self::Expired { value, .. } => value,
        }
    }
}

/// A stored value and its remaining time to live (`None`: no expiry).
pub type Stored = (Vec<u8>, Option<Duration>);

/// A key/value store with expiry that can hold idempotency records.
///
/// Implementors provide four primitives; the claim/renew/complete/release
/// transitions are provided methods built on them, so every store follows
/// the same state machine. Every write after a claim is a
/// [`transition`](Self::transition) that checks the current value first.
///
/// Errors: a [`StoreError`] that [`is_unavailable`](StoreError::is_unavailable)
/// pauses consumption (fail-closed) until [`probe`](Self::probe) succeeds;
/// any other error is about that one key (a key of another type, say) and
/// dead-letters that one message. So a store returns unavailable for
/// anything that is not about the key: outages, timeouts, but also refused
/// credentials, missing permissions, a full or read-only server.
pub trait Store: Send + Sync + 'static {
    /// Sets `key` to `value` with a `ttl` only if it is absent, and returns
    /// the previous value (`None`: the write happened). One round trip:
    /// `SET key value NX PX ttl GET`.
    fn insert_or_get(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// If `key` holds what `from` expects, replaces it with `to` (with a
    /// `ttl`), or deletes it when `to` is `None`, and returns true. Also
    /// returns true when `key` already holds `to`, so a retried transition
    /// is safe. Otherwise changes nothing and returns false.
    fn transition(
        &self,
        key: &str,
        from: Expect<'_>,
        to: Option<&[u8]>,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The value of `key` and its remaining time to live.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Stored>, StoreError>> + Send;

    /// Proves that the store accepts a write, by writing a short-lived
    /// `key` that no record uses, with the same kind of request as
    /// [`insert_or_get`](Self::insert_or_get) (a `SET ... NX PX ms GET`
    /// on Redis). A `PING` is not enough: a Redis that is full, read-only
    /// or unable to persist answers it while refusing every write, and an
    /// ACL may allow a plain `SET` but not a claim. After a refused claim,
    /// `key` lies in the record's cluster slot. A passing probe lets a held
    /// delivery claim again; the pause ends when a claim succeeds.
    fn probe(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes `to` where `key` holds what `from` expects, like
    /// [`transition`](Self::transition), and in the same atomic step
    /// replaces the hash at `outbox_key` with `entries` (field, value),
    /// expiring with the record. True when written, and when `key` already
    /// holds `to` (a retried commit: the outbox is left as it is, since its
    /// dispatch may have begun). Both keys share a hash tag, so a cluster
    /// can run this on one node.
    ///
    /// The default refuses: a store that keeps no outbox cannot serve
    /// [`OutboxLayer`](crate::outbox::OutboxLayer).
    fn commit_outbox(
        &self,
        key: &str,
        from: Expect<'_>,
        to: &[u8],
        ttl: Duration,
        outbox_key: &str,
        entries: &[OutboxEntry],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (from, to, ttl, outbox_key, entries);
        async move { Err(no_outbox("commit", key)) }
    }

    /// The entries of the outbox hash at `outbox_key` (none when it is absent).
    fn outbox(
        &self,
        outbox_key: &str,
    ) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + Send {
        async move { Err(no_outbox("outbox", outbox_key)) }
    }

    /// Removes `fields` from the outbox hash at `outbox_key`: their
    /// messages were dispatched. Removing what is gone is no error.
    fn outbox_remove(
        &self,
        outbox_key: &str,
        fields: &[Vec<u8>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = fields;
        async move { Err(no_outbox("outbox_remove", outbox_key)) }
    }

    /// Claims `key` for `token` with a `lease`.
    ///
    /// `payload_hash` is compared with the hash stored in an existing
    /// record; pass `""` to skip that check. An unanswered request is
    /// retried with the same token, and finding our own token counts as
    /// acquired, never as a duplicate. A record whose lease ran out without
    /// an outcome is taken over, as the next attempt
    /// ([`Claim::after_crash`]).
    fn claim(
        &self,
        key: &str,
        token: &Token,
        payload_hash: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send {
        async move {
            let ttl = lease.saturating_add(CRASH_MEMORY);
            let fresh = Claim::new(key, token.as_str(), 1, payload_hash);
            for _ in 0..TAKEOVER_RETRIES {
                let previous =
                    retry_ambiguous(|| self.insert_or_get(key, fresh.value(), ttl)).await?;
                let Some(previous) = previous else {
                    return Ok(ClaimOutcome::Acquired(fresh));
                };
                let Some(record) = Record::parse(&previous) else {
                    let value = String::from_utf8_lossy(&previous).into_owned();
                    return Ok(ClaimOutcome::Unrecognized { value });
                };
                let stored = record.payload_hash();
                if !same_payload(stored, payload_hash) {
                    return Ok(ClaimOutcome::PayloadMismatch {
                        stored: stored.to_owned(),
                    });
                }
                let (from, next) = match record {
                    Record::InProgress {
                        token: owner,
                        attempt,
                        ..
                    } if owner == token.as_str() => {
                        let mut ours = Claim::new(key, token.as_str(), attempt, payload_hash);
                        // Our own earlier claim, whose reply was lost: the
                        // stored value is the one every later write checks.
                        // Renewed now, so that the claim is written on this
                        // connection (a WAIT for replicas then covers it).
                        let renewed = retry_ambiguous(|| {
                            self.transition(key, Expect::Value(&previous), Some(&previous[..]), ttl)
                        })
                        .await?;
                        if !renewed {
                            continue;
                        }
                        ours.value = previous;
                        return Ok(ClaimOutcome::Acquired(ours));
                    }
                    Record::InProgress {
                        attempt, lingers, ..
                    } => {
                        // The lease left tells waiting from taking over; a
                        // failure to read it must not fail the claim.
                        let ttl_left = match self.get(key).await {
                            Ok(Some((value, ttl))) if value == previous => ttl,
                            Ok(_) => continue,
                            Err(_) => None,
                        };
                        let remaining = match (lingers, ttl_left) {
                            (true, Some(left)) => left.saturating_sub(CRASH_MEMORY),
                            (false, Some(left)) => left,
                            (_, None) => return Ok(ClaimOutcome::InProgress { remaining: None }),
                        };
                        if !lingers || !remaining.is_zero() {
                            return Ok(ClaimOutcome::InProgress {
                                remaining: Some(remaining),
                            });
                        }
                        let mut next = Claim::new(
                            key,
                            token.as_str(),
                            attempt.saturating_add(1),
                            payload_hash,
                        );
                        next.after_crash = true;
                        let from = Expect::Expired {
                            value: &previous,
                            grace: CRASH_MEMORY,
                        };
                        (from, next)
                    }
                    Record::Done { .. } => return Ok(ClaimOutcome::Done),
                    Record::Released { attempts, .. } => {
                        let next = Claim::new(
                            key,
                            token.as_str(),
                            attempts.saturating_add(1),
                            payload_hash,
                        );
                        (Expect::Value(&previous), next)
                    }
                };
                let taken =
                    retry_ambiguous(|| self.transition(key, from, Some(next.value()), ttl)).await?;
                if taken {
                    return Ok(ClaimOutcome::Acquired(next));
                }
                // Someone else changed the record meanwhile: look again.
            }
            Ok(ClaimOutcome::InProgress { remaining: None })
        }
    }

    /// Extends our lease; false if the key is no longer ours.
    fn renew(
        &self,
        claim: &Claim,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            let ttl = lease.saturating_add(CRASH_MEMORY);
            let from = Expect::Value(claim.value());
            retry_ambiguous(|| self.transition(claim.key(), from, Some(claim.value()), ttl)).await
        }
    }

    /// Marks the message done for `retention`; false if the key is no
    /// longer ours. Also writes the mark where the key is gone (our lease
    /// expired and nobody took over), so the effect that happened is
    /// recorded and a later duplicate is recognised.
    fn complete(
        &self,
        claim: &Claim,
        retention: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            let done = claim.done_value();
            let from = Expect::ValueOrAbsent(claim.value());
            retry_ambiguous(|| self.transition(claim.key(), from, Some(&done[..]), retention)).await
        }
    }

    /// Like [`complete`](Self::complete), and commits the staged outgoing
    /// messages at `outbox_key` in the same atomic step
    /// ([`commit_outbox`](Self::commit_outbox)).
    fn complete_with_outbox(
        &self,
        claim: &Claim,
        retention: Duration,
        outbox_key: &str,
        entries: &[OutboxEntry],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            let done = claim.done_value();
            let from = Expect::ValueOrAbsent(claim.value());
            retry_ambiguous(|| {
                self.commit_outbox(claim.key(), from, &done, retention, outbox_key, entries)
            })
            .await
        }
    }

    /// Gives the key up after a failure so that a redelivery can claim it.
    /// The record keeps the attempt count for `retention`, which bounds
    /// retries on queues that do not count deliveries. False if the key is
    /// no longer ours.
    fn release(
        &self,
        claim: &Claim,
        retention: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            let released = claim.released_value();
            let from = Expect::Value(claim.value());
            retry_ambiguous(|| self.transition(claim.key(), from, Some(&released[..]), retention))
                .await
        }
    }

    /// Deletes our record after the message was dead-lettered, so that a later
    /// copy (say, replayed from the dead-letter queue) starts from attempt 1.
    /// False if the key is no longer ours.
    fn discard(&self, claim: &Claim) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            let from = Expect::Value(claim.value());
            retry_ambiguous(|| self.transition(claim.key(), from, None, Duration::ZERO)).await
        }
    }
}

/// One field of an outbox hash and its value.
pub type OutboxEntry = (Vec<u8>, Vec<u8>);

fn no_outbox(operation: &'static str, key: &str) -> StoreError {
    StoreError::new(
        operation,
        key,
        false,
        "this store keeps no outbox: implement Store::commit_outbox, outbox and outbox_remove, or use RedisStore or MemoryStore",
    )
}

/// Retries an operation whose outcome is unknown (timeout, dropped
/// connection). Only for operations that are safe to repeat.
async fn retry_ambiguous<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut tries = 0;
    loop {
        match op().await {
            Err(err) if err.is_unavailable() && tries < AMBIGUOUS_RETRIES => {
                tries += 1;
                tracing::debug!(error = %err, tries, "retrying an unanswered store request");
            }
            other => return other,
        }
    }
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
    fn tokens_are_unique() {
        let a = Token::new();
        let b = Token::new();
        assert_ne!(a, b);
        for token in [a, b] {
            assert_eq!(token.as_str().len(), 16);
            let parsed = u64::from_str_radix(token.as_str(), 16).expect("a token is hexadecimal");
            assert_eq!(format!("{parsed:016x}"), token.as_str());
        }
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
