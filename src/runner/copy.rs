//! A copy of a delivery that the runner publishes in its place (a parked
//! dead letter, a retry waiting in a delay queue): the original's body,
//! properties and headers, plus `x-idempotency-*` headers saying why, sent
//! mandatory on the consumer's channel in confirm mode. The original is
//! acked only once the broker confirmed the copy.
//!
//! Every header added here is bounded ([`MAX_HEADER_BYTES`], cut on a
//! character boundary, with a `…[truncated N bytes]` marker), and the copy
//! as a whole fits the connection's `frame_max`: RabbitMQ closes the whole
//! connection (`FRAME_ERROR`) on a larger content header frame, and every
//! ack in flight on it with it. A copy that cannot fit goes without the
//! original's largest headers, named in `x-idempotency-headers-dropped`.
//!
//! ```ignore
//! let published = copy::publish(Target { channel: &channel, exchange: "", routing_key: Some("orders.dead"),
//!     queue: "orders", shown: "the parking queue `orders.dead`", frame_max: 131_072 }, copy, &outcome).await;
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use lapin::protocol::basic::gen_properties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};

use crate::amqp::{Published, publish_confirmed};
use crate::outcome::Outcome;

/// How long the broker may take to confirm a copy.
pub(super) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes of a header value the library adds to a copy it publishes,
/// marker included.
pub(crate) const MAX_HEADER_BYTES: usize = 1024;

/// Names the headers a copy goes without because it could not fit the
/// connection's `frame_max` with them.
pub(crate) const HEADERS_DROPPED: &str = "x-idempotency-headers-dropped";

/// The headers this module adds: never dropped to make a copy fit (they
/// are bounded, and replay needs them), except the reason, last.
const OWN_HEADERS: [&str; 5] = [
    "x-idempotency-outcome",
    "x-idempotency-reason",
    "x-idempotency-attempts",
    "x-idempotency-queue",
    HEADERS_DROPPED,
];

/// `value`, or, past [`MAX_HEADER_BYTES`], its start cut on a character
/// boundary and `…[truncated N bytes]` (N: the bytes cut), in at most
/// [`MAX_HEADER_BYTES`] bytes all told.
pub(crate) fn bounded_header(value: &str) -> Cow<'_, str> {
    if value.len() <= MAX_HEADER_BYTES {
        return Cow::Borrowed(value);
    }
    // The marker's length with the most digits N can have.
    let marker_max = format!("…[truncated {} bytes]", value.len()).len();
    let mut cut = MAX_HEADER_BYTES.saturating_sub(marker_max);
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!(
        "{}…[truncated {} bytes]",
        &value[..cut],
        value.len() - cut
    ))
}

/// The bytes of the content header frame that carries `properties`: 7 of
/// frame header, 12 of class, weight and body size, the properties in
/// their wire encoding (flags included), 1 of frame end. `None` when they
/// cannot be encoded.
fn header_frame_bytes(properties: &BasicProperties) -> Option<usize> {
    let encoded = cookie_factory::gen_simple(gen_properties(properties), Vec::new()).ok()?;
    Some(encoded.len() + 20)
}

/// The bytes one header adds to the encoded properties.
fn header_entry_bytes(name: &ShortString, value: &AMQPValue) -> usize {
    let mut alone = FieldTable::default();
    alone.insert(name.clone(), value.clone());
    let empty = BasicProperties::default().with_headers(FieldTable::default());
    let with = BasicProperties::default().with_headers(alone);
    match (header_frame_bytes(&with), header_frame_bytes(&empty)) {
        (Some(with), Some(empty)) => with.saturating_sub(empty),
        // Unencodable: count it as too large to keep.
        _ => usize::MAX,
    }
}

/// `properties` with `headers`, made to fit a content header frame of
/// `frame_max` bytes (0: no limit): when they do not, the original's
/// largest headers go first, then our reason, and
/// [`HEADERS_DROPPED`] names them (bounded too). Returns the names dropped.
fn fit_frame(
    properties: BasicProperties,
    mut headers: BTreeMap<ShortString, AMQPValue>,
    frame_max: u32,
) -> (BasicProperties, Vec<String>) {
    let limit = usize::try_from(frame_max).unwrap_or(usize::MAX);
    let fits = |properties: &BasicProperties| {
        header_frame_bytes(properties).is_some_and(|bytes| bytes <= limit)
    };
    let whole = properties
        .clone()
        .with_headers(FieldTable::from(headers.clone()));
    // Unencodable counts as too large.
    let total = header_frame_bytes(&whole).unwrap_or(usize::MAX);
    if frame_max == 0 || total <= limit {
        return (whole, Vec::new());
    }
    // Theirs, largest first, then our reason.
    let mut candidates: Vec<(bool, usize, ShortString)> = headers
        .iter()
        .filter(|(name, _)| {
            !OWN_HEADERS.contains(&name.as_str()) || name.as_str() == "x-idempotency-reason"
        })
        .map(|(name, value)| {
            let ours = OWN_HEADERS.contains(&name.as_str());
            (ours, header_entry_bytes(name, value), name.clone())
        })
        .collect();
    candidates.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    // A message parked before (and replayed) keeps naming what it lost.
    let mut dropped: Vec<String> = match headers.get(HEADERS_DROPPED) {
        Some(AMQPValue::LongString(earlier)) => {
            vec![String::from_utf8_lossy(earlier.as_bytes()).into_owned()]
        }
        _ => Vec::new(),
    };
    let earlier = dropped.len();
    // The earlier note is counted in `total`, and again in the new one.
    let mut freed = headers
        .get(HEADERS_DROPPED)
        .map_or(0, |note| header_entry_bytes(&HEADERS_DROPPED.into(), note));
    for (_, bytes, name) in candidates {
        headers.remove(&name);
        dropped.push(name.to_string());
        freed = freed.saturating_add(bytes);
        let note = dropped_note(&dropped);
        let note_bytes = header_entry_bytes(&HEADERS_DROPPED.into(), &note);
        if total.saturating_sub(freed).saturating_add(note_bytes) <= limit {
            break;
        }
    }
    headers.insert(HEADERS_DROPPED.into(), dropped_note(&dropped));
    let dropped = dropped.split_off(earlier);
    let mut fitted = properties.clone().with_headers(FieldTable::from(headers));
    if !fits(&fitted) {
        // Only the other properties are left to blame (they are short
        // strings, so this cannot happen at lapin's smallest frame_max).
        let mut ours = FieldTable::default();
        if let Some(table) = fitted.headers() {
            for (name, value) in table.inner() {
                if OWN_HEADERS.contains(&name.as_str()) {
                    ours.insert(name.clone(), value.clone());
                }
            }
        }
        fitted = properties.with_headers(ours);
    }
    (fitted, dropped)
}

fn dropped_note(dropped: &[String]) -> AMQPValue {
    AMQPValue::LongString(LongString::from(
        bounded_header(&dropped.join(", ")).into_owned(),
    ))
}

/// What the runner keeps of a delivery to publish a copy of it.
pub(crate) struct MessageCopy {
    pub(crate) routing_key: ShortString,
    pub(crate) properties: BasicProperties,
    pub(crate) data: Vec<u8>,
}

/// Where a copy goes.
pub(super) struct Target<'a> {
    pub(super) channel: &'a Channel,
    pub(super) exchange: &'a str,
    /// `None`: the message's own routing key.
    pub(super) routing_key: Option<&'a str>,
    /// The consumed queue, named in the copy's `x-idempotency-queue`.
    pub(super) queue: &'a str,
    /// Where copies go, for logs.
    pub(super) shown: &'a str,
    /// The connection's negotiated `frame_max`, which every copy fits.
    pub(super) frame_max: u32,
}

/// Publishes `copy` to `target` with `outcome`'s reason, mandatory, and
/// waits for the broker's confirm.
pub(super) async fn publish(target: Target<'_>, copy: MessageCopy, outcome: &Outcome) -> Published {
    let mut headers: BTreeMap<ShortString, AMQPValue> = copy
        .properties
        .headers()
        .as_ref()
        .map(|headers| headers.inner().clone())
        .unwrap_or_default();
    // The copy carries the sender's trace context: the delivery's replaces it.
    outcome.trace().write(&mut headers);
    let reason = outcome.reason().unwrap_or(outcome.kind().as_str());
    let text =
        |value: &str| AMQPValue::LongString(LongString::from(bounded_header(value).into_owned()));
    headers.insert(
        "x-idempotency-outcome".into(),
        text(outcome.kind().as_str()),
    );
    headers.insert("x-idempotency-reason".into(), text(reason));
    headers.insert(
        "x-idempotency-attempts".into(),
        AMQPValue::LongLongInt(i64::from(outcome.attempt())),
    );
    headers.insert("x-idempotency-queue".into(), text(target.queue));
    let (properties, dropped) = fit_frame(copy.properties, headers, target.frame_max);
    if !dropped.is_empty() {
        tracing::warn!(
            target = %target.shown,
            frame_max = target.frame_max,
            dropped = %dropped.join(", "),
            "the copy would not fit the connection's frame_max with all its headers: sent without the largest (named in x-idempotency-headers-dropped)"
        );
    }
    let routing_key = target.routing_key.unwrap_or(copy.routing_key.as_str());
    publish_confirmed(
        target.channel,
        target.exchange,
        routing_key,
        &copy.data,
        properties,
        CONFIRM_TIMEOUT,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_value_is_bounded_on_a_char_boundary_with_a_marker() {
        assert_eq!(bounded_header("short"), "short");
        let exact = "a".repeat(MAX_HEADER_BYTES);
        assert_eq!(
            bounded_header(&exact),
            exact.as_str(),
            "1 KiB is kept whole"
        );
        for text in [
            "a".repeat(150_000),
            "é".repeat(75_000),
            "日本".repeat(1_000),
            format!("x{}", "🦀".repeat(400)),
        ] {
            let bounded = bounded_header(&text);
            assert!(bounded.len() <= MAX_HEADER_BYTES, "{} bytes", bounded.len());
            let (kept, marker) = bounded
                .rsplit_once("…[truncated ")
                .expect("a truncation marker");
            assert!(text.starts_with(kept), "the start of the value is kept");
            let cut: usize = marker
                .strip_suffix(" bytes]")
                .and_then(|n| n.parse().ok())
                .expect("the bytes cut");
            assert_eq!(kept.len() + cut, text.len(), "N counts the bytes cut");
            assert!(
                kept.len() > MAX_HEADER_BYTES - 40,
                "not cut shorter than needed"
            );
        }
    }

    fn long(text: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(text))
    }

    fn names(properties: &BasicProperties) -> Vec<String> {
        properties
            .headers()
            .as_ref()
            .map(|h| h.inner().keys().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_copy_that_fits_keeps_every_header() {
        let mut headers = BTreeMap::new();
        headers.insert("tenant".into(), long("acme"));
        headers.insert("x-idempotency-reason".into(), long("bad"));
        let (properties, dropped) = fit_frame(BasicProperties::default(), headers, 8192);
        assert!(dropped.is_empty());
        assert_eq!(names(&properties), ["tenant", "x-idempotency-reason"]);
    }

    #[test]
    fn a_copy_too_large_for_frame_max_drops_the_largest_of_the_originals_first() {
        let mut headers = BTreeMap::new();
        headers.insert("big".into(), long(&"b".repeat(6_000)));
        headers.insert("bigger".into(), long(&"c".repeat(7_000)));
        headers.insert("tenant".into(), long("acme"));
        headers.insert("x-idempotency-outcome".into(), long("failed"));
        headers.insert("x-idempotency-reason".into(), long(&"r".repeat(1_000)));
        headers.insert("x-idempotency-queue".into(), long("orders"));
        let properties = BasicProperties::default().with_message_id("m-1".into());
        let (fitted, dropped) = fit_frame(properties.clone(), headers.clone(), 6_000);
        assert_eq!(dropped, ["bigger", "big"], "largest first");
        assert!(header_frame_bytes(&fitted).unwrap() <= 6_000);
        assert_eq!(
            names(&fitted),
            [
                "tenant",
                HEADERS_DROPPED,
                "x-idempotency-outcome",
                "x-idempotency-queue",
                "x-idempotency-reason"
            ]
        );
        let note = fitted.headers().as_ref().unwrap().inner()[HEADERS_DROPPED].clone();
        assert_eq!(note, long("bigger, big"));
        assert_eq!(fitted.message_id(), properties.message_id());
        // With room for one of them, only the larger goes.
        let (fitted, dropped) = fit_frame(properties.clone(), headers.clone(), 8192);
        assert_eq!(dropped, ["bigger"], "only as many as needed");
        assert!(header_frame_bytes(&fitted).unwrap() <= 8192);
        assert!(names(&fitted).contains(&"big".to_owned()));
        // Past every original header, our reason goes too; the rest stay.
        let (fitted, dropped) = fit_frame(properties, headers, 500);
        assert_eq!(dropped, ["bigger", "big", "tenant", "x-idempotency-reason"]);
        assert!(header_frame_bytes(&fitted).unwrap() <= 500);
        assert!(names(&fitted).contains(&"x-idempotency-queue".to_owned()));
    }

    #[test]
    fn a_replayed_copy_keeps_naming_what_it_lost_before() {
        let mut headers = BTreeMap::new();
        headers.insert(HEADERS_DROPPED.into(), long("x-old"));
        headers.insert("big".into(), long(&"b".repeat(9_000)));
        let (fitted, dropped) = fit_frame(BasicProperties::default(), headers.clone(), 8192);
        assert_eq!(dropped, ["big"]);
        let note = fitted.headers().as_ref().unwrap().inner()[HEADERS_DROPPED].clone();
        assert_eq!(note, long("x-old, big"));
        headers.remove("big");
        let (fitted, dropped) = fit_frame(BasicProperties::default(), headers, 8192);
        assert!(dropped.is_empty());
        let note = fitted.headers().as_ref().unwrap().inner()[HEADERS_DROPPED].clone();
        assert_eq!(note, long("x-old"), "kept as it was");
    }

    #[test]
    fn the_frame_size_is_what_lapin_sends() {
        // 8 bytes of frame overhead and 12 of class, weight and body size
        // around the properties: an empty set is 2 bytes of flags.
        assert_eq!(header_frame_bytes(&BasicProperties::default()), Some(22));
        let mut table = FieldTable::default();
        table.insert("k".into(), long("v"));
        let with = BasicProperties::default().with_headers(table);
        // flags 2, table length 4, key 1+1, type 1, length 4, value 1.
        assert_eq!(header_frame_bytes(&with), Some(20 + 2 + 4 + 2 + 1 + 4 + 1));
        assert_eq!(header_entry_bytes(&"k".into(), &long("v")), 8);
    }
}
