//! Fingerprints: what makes two deliveries "the same message".
//!
//! ```
//! use amqp_idempotency::fingerprint::{Composite, Fingerprint, Header, MessageIdOrBodyHash};
//! use lapin::{message::Delivery, BasicProperties};
//!
//! let mut delivery = Delivery::mock(1, "".into(), "orders".into(), false, b"{}".to_vec());
//! delivery.properties = BasicProperties::default().with_message_id("order-42".into());
//! assert_eq!(MessageIdOrBodyHash.fingerprint(&delivery).as_deref(), Some("order-42"));
//!
//! // The seed's scheme: business id plus a code that makes the operation unique.
//! let register = Composite::new(Header::new("user-id"), |_: &Delivery| Some("register".to_string()));
//! assert_eq!(register.fingerprint(&delivery), None); // no `user-id` header
//! ```

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use sha2::{Digest, Sha256};

/// Longest fingerprint kept verbatim in a key; longer ones are hashed.
const MAX_VERBATIM_LEN: usize = 200;

/// Derives the fingerprint of a delivery: the identity that duplicates share.
///
/// `None` means the delivery has no usable fingerprint; the
/// [`NoFingerprintPolicy`](crate::NoFingerprintPolicy) decides what happens to it.
/// Closures `Fn(&Delivery) -> Option<String>` are fingerprints too.
pub trait Fingerprint: Send + Sync + 'static {
    /// The fingerprint of `delivery`, or `None` if it has none.
    fn fingerprint(&self, delivery: &Delivery) -> Option<String>;
}

impl<F> Fingerprint for F
where
    F: Fn(&Delivery) -> Option<String> + Send + Sync + 'static,
{
    fn fingerprint(&self, delivery: &Delivery) -> Option<String> {
        self(delivery)
    }
}

/// The AMQP `message_id` property.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageId;

impl Fingerprint for MessageId {
    fn fingerprint(&self, delivery: &Delivery) -> Option<String> {
        let id = delivery.properties.message_id().as_ref()?.as_str();
        non_empty(id)
    }
}

/// A named message header. String and integer values are used as they
/// are; other header types (tables, arrays, floats) are not usable.
#[derive(Clone, Debug)]
pub struct Header {
    name: String,
}

impl Header {
    /// Fingerprint by the header called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

impl Fingerprint for Header {
    fn fingerprint(&self, delivery: &Delivery) -> Option<String> {
        let headers = delivery.properties.headers().as_ref()?;
        let value = headers
            .inner()
            .iter()
            .find(|(name, _)| name.as_str() == self.name)
            .map(|(_, value)| value)?;
        let text = match value {
            AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
            AMQPValue::ShortString(s) => s.as_str().to_owned(),
            AMQPValue::ShortShortInt(n) => n.to_string(),
            AMQPValue::ShortShortUInt(n) => n.to_string(),
            AMQPValue::ShortInt(n) => n.to_string(),
            AMQPValue::ShortUInt(n) => n.to_string(),
            AMQPValue::LongInt(n) => n.to_string(),
            AMQPValue::LongUInt(n) => n.to_string(),
            AMQPValue::LongLongInt(n) => n.to_string(),
            AMQPValue::Timestamp(n) => n.to_string(),
            _ => return None,
        };
        non_empty(&text)
    }
}

/// A 128-bit hash (truncated SHA-256) of the body: identical bodies are
/// duplicates. An empty body has no fingerprint.
#[derive(Clone, Copy, Debug, Default)]
pub struct BodyHash;

impl Fingerprint for BodyHash {
    fn fingerprint(&self, delivery: &Delivery) -> Option<String> {
        if delivery.data.is_empty() {
            return None;
        }
        Some(format!("body-{}", hash128(&delivery.data)))
    }
}

/// `message_id` when present, otherwise [`BodyHash`]: the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageIdOrBodyHash;

impl Fingerprint for MessageIdOrBodyHash {
    fn fingerprint(&self, delivery: &Delivery) -> Option<String> {
        MessageId
            .fingerprint(delivery)
            .or_else(|| BodyHash.fingerprint(delivery))
    }
}

/// A business id plus a code that makes the operation unique (the seed's
/// scheme: user id + "register"). Both parts must be present.
#[derive(Clone, Debug)]
pub struct Composite<B, C> {
    business_id: B,
    code: C,
}

impl<B: Fingerprint, C: Fingerprint> Composite<B, C> {
    /// Fingerprint as `{business_id}:{code}`.
    pub fn new(business_id: B, code: C) -> Self {
        Self { business_id, code }
    }
}

impl<B: Fingerprint, C: Fingerprint> Fingerprint for Composite<B, C> {
    fn fingerprint(&self, delivery: &Delivery) -> Option<String> {
        let id = self.business_id.fingerprint(delivery)?;
        let code = self.code.fingerprint(delivery)?;
        // Escaped so that ("a:b", "c") and ("a", "b:c") stay apart.
        Some(format!("{}:{}", escape_colons(&id), escape_colons(&code)))
    }
}

/// `%` as `%25` and `:` as `%3A`, so a part cannot imitate a separator.
fn escape_colons(part: &str) -> std::borrow::Cow<'_, str> {
    if part.contains([':', '%']) {
        part.replace('%', "%25").replace(':', "%3A").into()
    } else {
        part.into()
    }
}

pub_for_testing! {
    /// The Redis key of a fingerprint: `{prefix}:{scope}:{fingerprint}`, with
    /// `:` in the scope escaped as `%3A` (a queue named `a:b` cannot collide
    /// with scope `a`; `{` and `}` become `%7B` and `%7D`), and the fingerprint
    /// normalised as the layer does (over 200 bytes, or with control
    /// characters, it is replaced by `hashed-<128-bit hash>`). Tools that look
    /// records up, like the operator CLI, use this to find the same key.
    ///
    /// The record key carries no hash tag of its own, so on Redis Cluster
    /// the whole key picks its slot and messages spread over every master;
    /// a companion key (an outbox's) names the whole record key as its
    /// tag and lands in the same slot. A fingerprint that would leave a `}`
    /// in the key without a complete tag (which would defeat that) is hashed
    /// too.
    ///
    /// ```ignore
    /// use amqp_idempotency::fingerprint::record_key;
    /// assert_eq!(record_key("idem", "orders", "order-42"), "idem:orders:order-42");
    /// assert!(record_key("idem", "orders", "a\nb").starts_with("idem:orders:hashed-"));
    /// ```
    fn record_key(prefix: &str, scope: &str, fingerprint: &str) -> String {
        let scope = escape_scope(scope);
        // On every delivery's path: built in one allocation, without the
        // formatting machinery.
        let joined = |last: &str| {
            let mut key = String::with_capacity(prefix.len() + scope.len() + last.len() + 9);
            key.push_str(prefix);
            key.push(':');
            key.push_str(&scope);
            key.push(':');
            key
        };
        if is_key_safe(fingerprint) {
            let mut key = joined(fingerprint);
            key.push_str(fingerprint);
            if !key.contains('}') || hash_tag(&key).is_some() {
                return key;
            }
        }
        let hashed = hash128(fingerprint.as_bytes());
        let mut key = joined(&hashed);
        key.push_str("hashed-");
        key.push_str(&hashed);
        key
    }
}

/// The key of a record that belongs with `record_key` (a later feature's
/// outbox, say): `{<record key>}:<suffix>`, whose hash tag is the record
/// key itself, so Redis Cluster keeps both in one slot and one script can
/// write both. When the record key has a hash tag of its own (a
/// fingerprint like `{user-7}:register`), `<record key>:<suffix>` keeps
/// that tag.
pub(crate) fn companion_key(record_key: &str, suffix: &str) -> String {
    if hash_tag(record_key).is_some() {
        format!("{record_key}:{suffix}")
    } else {
        format!("{{{record_key}}}:{suffix}")
    }
}

/// The part of `key` that Redis Cluster hashes when it is not the whole
/// key: between the first `{` and the first `}` after it, when not empty.
pub(crate) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// True when Redis Cluster puts `a` and `b` in the same slot, so that one
/// script may touch both. A record and its
/// [`companion_key`] always do, except for a record key
/// with a `}` but no complete `{...}` tag before it.
pub(crate) fn same_slot(a: &str, b: &str) -> bool {
    cluster_slot(a) == cluster_slot(b)
}

/// Redis Cluster's slot of `key`: CRC16 (XMODEM) of its hash tag, or of
/// the whole key, modulo 16384.
pub(crate) fn cluster_slot(key: &str) -> u16 {
    let bytes = hash_tag(key).unwrap_or(key).as_bytes();
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// A scope as it appears in a key: `%`, `:`, `{` and `}` escaped.
fn escape_scope(scope: &str) -> std::borrow::Cow<'_, str> {
    if scope.contains(['{', '}']) {
        escape_colons(scope)
            .replace('{', "%7B")
            .replace('}', "%7D")
            .into()
    } else {
        escape_colons(scope)
    }
}

/// The key a paused consumer writes to learn that the store accepts writes
/// again: under the scope like every record, so the same ACL key pattern
/// covers it, and ending in [`PROBE_NAME`], which no normalised
/// fingerprint can take (they never hold control characters).
pub(crate) fn probe_key(prefix: &str, scope: &str) -> String {
    format!("{prefix}:{}:{PROBE_NAME}", escape_scope(scope))
}

/// The key a held delivery's write probe uses after its claim of
/// `record_key` was refused: `{prefix}:{<record key>}:\0probe`, in the
/// record's cluster slot (so that on a cluster the probe asks the master
/// that refused the claim) and under the prefix (so that an ACL granting
/// `~{prefix}:*` covers it): the record's [`companion_key`] under the
/// prefix, whose own segment holds no brace.
pub(crate) fn record_probe_key(prefix: &str, record_key: &str) -> String {
    format!("{prefix}:{}", companion_key(record_key, PROBE_NAME))
}

/// The last segment of the key a paused consumer writes to learn that
/// Redis accepts writes again (`{prefix}:{scope}:\0probe`): a NUL byte
/// leads it, so no fingerprint can take it. Tools that list records skip it.
pub(crate) const PROBE_NAME: &str = "\u{0}probe";

/// Makes a fingerprint safe and bounded for use inside a Redis key:
/// control characters and over-long values are replaced by their hash.
pub(crate) fn normalize(fingerprint: String) -> String {
    if is_key_safe(&fingerprint) {
        fingerprint
    } else {
        format!("hashed-{}", hash128(fingerprint.as_bytes()))
    }
}

/// Short enough and printable: kept verbatim in a key.
fn is_key_safe(fingerprint: &str) -> bool {
    fingerprint.len() <= MAX_VERBATIM_LEN && !fingerprint.contains(char::is_control)
}

/// Hex of the first 128 bits of SHA-256.
pub(crate) fn hash128(bytes: &[u8]) -> String {
    hash_hex(bytes, 16)
}

/// The payload hash kept in records: the first 48 bits of the body's
/// SHA-256, in hexadecimal. It tells a reused message id with another body
/// from a redelivery; 48 bits keep done marks small.
pub(crate) fn payload_hash(bytes: &[u8]) -> String {
    hash_hex(bytes, 6)
}

fn hash_hex(bytes: &[u8], len: usize) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(2 * len);
    for byte in &digest[..len] {
        hex.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
        hex.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
    }
    hex
}

fn non_empty(text: &str) -> Option<String> {
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;
    use lapin::types::{FieldTable, LongString};

    fn delivery(body: &[u8]) -> Delivery {
        Delivery::mock(1, "".into(), "q".into(), false, body.to_vec())
    }

    #[test]
    fn message_id_is_used_when_present() {
        let mut d = delivery(b"x");
        d.properties = BasicProperties::default().with_message_id("m-1".into());
        assert_eq!(MessageId.fingerprint(&d).as_deref(), Some("m-1"));
        assert_eq!(MessageIdOrBodyHash.fingerprint(&d).as_deref(), Some("m-1"));
    }

    #[test]
    fn blank_message_id_falls_back_to_the_body_hash() {
        let mut d = delivery(b"good");
        d.properties = BasicProperties::default().with_message_id("  ".into());
        assert_eq!(MessageId.fingerprint(&d), None);
        let fp = MessageIdOrBodyHash.fingerprint(&d).unwrap();
        assert_eq!(fp, BodyHash.fingerprint(&delivery(b"good")).unwrap());
        assert_eq!(fp.len(), "body-".len() + 32, "128 bits as hex");
    }

    #[test]
    fn body_hash_separates_bodies_and_refuses_empty_ones() {
        assert_ne!(
            BodyHash.fingerprint(&delivery(b"a")),
            BodyHash.fingerprint(&delivery(b"b"))
        );
        assert_eq!(BodyHash.fingerprint(&delivery(b"")), None);
    }

    #[test]
    fn header_reads_strings_and_integers_only() {
        let mut headers = FieldTable::default();
        headers.insert(
            "user-id".into(),
            AMQPValue::LongString(LongString::from("u7")),
        );
        headers.insert("seq".into(), AMQPValue::LongLongInt(12));
        headers.insert("ratio".into(), AMQPValue::Double(0.5));
        let mut d = delivery(b"x");
        d.properties = BasicProperties::default().with_headers(headers);
        assert_eq!(
            Header::new("user-id").fingerprint(&d).as_deref(),
            Some("u7")
        );
        assert_eq!(Header::new("seq").fingerprint(&d).as_deref(), Some("12"));
        assert_eq!(Header::new("ratio").fingerprint(&d), None);
        assert_eq!(Header::new("missing").fingerprint(&d), None);
    }

    #[test]
    fn composite_needs_both_parts() {
        let mut headers = FieldTable::default();
        headers.insert(
            "user-id".into(),
            AMQPValue::LongString(LongString::from("u7")),
        );
        let mut d = delivery(b"x");
        d.properties = BasicProperties::default().with_headers(headers);
        let fp = Composite::new(Header::new("user-id"), |_: &Delivery| {
            Some("register".to_owned())
        });
        assert_eq!(fp.fingerprint(&d).as_deref(), Some("u7:register"));
        let missing = Composite::new(Header::new("user-id"), Header::new("code"));
        assert_eq!(missing.fingerprint(&d), None);
    }

    #[test]
    fn composite_parts_cannot_imitate_the_separator() {
        let mut headers = FieldTable::default();
        headers.insert("a".into(), AMQPValue::LongString(LongString::from("x:y")));
        headers.insert("b".into(), AMQPValue::LongString(LongString::from("z")));
        headers.insert("c".into(), AMQPValue::LongString(LongString::from("x")));
        headers.insert("d".into(), AMQPValue::LongString(LongString::from("y:z")));
        let mut d = delivery(b"x");
        d.properties = BasicProperties::default().with_headers(headers);
        let left = Composite::new(Header::new("a"), Header::new("b")).fingerprint(&d);
        let right = Composite::new(Header::new("c"), Header::new("d")).fingerprint(&d);
        assert_ne!(left, right);
        assert_eq!(left.as_deref(), Some("x%3Ay:z"));
        assert_eq!(record_key("idem", "q:1", "f"), "idem:q%3A1:f");
    }

    #[test]
    fn companion_keys_share_the_record_slot() {
        for fingerprint in [
            "order-42",
            "{user-7}:register",
            "a{b",
            "x{}y",
            "}z",
            "a}{b}",
        ] {
            let key = record_key("idem", "orders", fingerprint);
            let companion = companion_key(&key, "outbox");
            assert_eq!(
                slot_of(&key),
                slot_of(&companion),
                "{fingerprint:?}: {key} and {companion}"
            );
        }
        assert_eq!(record_key("idem", "q{1}", "f"), "idem:q%7B1%7D:f");
        assert!(record_key("idem", "orders", "}z").starts_with("idem:orders:hashed-"));
        // The slots Redis documents.
        assert_eq!(cluster_slot("foo"), 12182);
        assert_eq!(
            cluster_slot("{user1000}.following"),
            cluster_slot("user1000")
        );
    }

    fn slot_of(key: &str) -> u16 {
        cluster_slot(key)
    }

    #[test]
    fn a_record_probe_shares_the_record_slot_and_prefix() {
        for fingerprint in ["order-42", "{user-7}:register", "a}b"] {
            let record = record_key("idem", "orders", fingerprint);
            let probe = record_probe_key("idem", &record);
            assert!(same_slot(&record, &probe), "{record} and {probe}");
            assert!(probe.starts_with("idem:"), "{probe}");
            assert!(probe.ends_with(PROBE_NAME), "{probe}");
            assert_ne!(probe, record);
        }
    }

    #[test]
    fn normalize_hashes_long_or_control_fingerprints() {
        assert_eq!(normalize("order-1".into()), "order-1");
        let long = "x".repeat(MAX_VERBATIM_LEN + 1);
        assert!(normalize(long).starts_with("hashed-"));
        assert!(normalize("a\nb".into()).starts_with("hashed-"));
    }
}
