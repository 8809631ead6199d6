//! Dead-lettering that cannot lose a message: a copy, with
//! `x-idempotency-*` headers saying why, published on the consumer's
//! channel in confirm mode (mandatory, so an unroutable copy comes back);
//! the original is acked only once the broker confirmed the copy, and
//! requeued otherwise. The default target is a parking queue the runner
//! declares and owns, `{queue}.dead`.
//!
//! Every header added here is bounded ([`MAX_HEADER_BYTES`], cut on a
//! character boundary, with a `…[truncated N bytes]` marker), and the copy
//! as a whole fits the connection's `frame_max`: RabbitMQ closes the whole
//! connection (`FRAME_ERROR`) on a larger content header frame, and every
//! ack in flight on it with it. A copy that cannot fit goes without the
//! original's largest headers, named in `x-idempotency-headers-dropped`.
//!
//! ```no_run
//! use amqp_idempotency::{DeadLetterTarget, ServeOptions};
//! # fn options(channel: lapin::Channel) -> ServeOptions {
//! // The default: park dead letters in `{queue}.dead`; needs the channel.
//! ServeOptions::new().close_channel(channel)
//! # }
//! # fn exchange(channel: lapin::Channel) -> ServeOptions {
//! // Or publish them to an exchange of yours.
//! ServeOptions::new()
//!     .dead_letters(DeadLetterTarget::Exchange { exchange: "errors".into(), routing_key: None })
//!     .close_channel(channel)
//! # }
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::protocol::basic::gen_properties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use crate::amqp::{Published, publish_confirmed};
use crate::config::DeadLetterTarget;
use crate::error::ServeError;
use crate::outcome::Outcome;

/// How long the exchange check, confirm.select and a confirm may take.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

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

pub(crate) struct DeadLetters {
    channel: Channel,
    exchange: String,
    /// `None`: the message's own routing key.
    routing_key: Option<String>,
    /// The consumed queue, named in the copy's `x-idempotency-queue`.
    queue: String,
    /// Where copies go, for logs and errors.
    shown: String,
    /// The connection's negotiated `frame_max`, which every copy fits.
    frame_max: u32,
}

pub(crate) struct DeadLetterCopy {
    pub(crate) routing_key: ShortString,
    pub(crate) properties: BasicProperties,
    pub(crate) data: Vec<u8>,
}

/// An unanswered channel request, as a lapin error.
fn unanswered(what: &'static str) -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
        lapin::ChannelState::Closed,
        what,
    ))
}

impl DeadLetters {
    /// Readies `target` for dead letters of `queue` on `channel`: declares
    /// the parking queue (durable, no arguments) or checks that the
    /// exchange exists, then puts the channel in confirm mode. `Ok(None)`
    /// means the broker's own dead-lettering (reject without requeue).
    /// Found out at start: a publish to a missing exchange would close the
    /// consumer's channel (404) on the first dead letter.
    pub(crate) async fn prepare(
        target: &DeadLetterTarget,
        channel: Option<&Channel>,
        queue: &str,
        frame_max: u32,
    ) -> Result<Option<Arc<Self>>, ServeError> {
        let (exchange, routing_key, shown) = match target {
            DeadLetterTarget::Broker => return Ok(None),
            DeadLetterTarget::ParkingQueue(name) => {
                let name = name.clone().unwrap_or_else(|| format!("{queue}.dead"));
                let shown = format!("the parking queue `{name}`");
                (String::new(), Some(name), shown)
            }
            DeadLetterTarget::Exchange {
                exchange,
                routing_key,
            } => {
                let shown = format!("the exchange `{exchange}`");
                (exchange.clone(), routing_key.clone(), shown)
            }
        };
        let problem = |problem: String| ServeError::DeadLetters {
            target: shown.clone(),
            problem,
        };
        let Some(channel) = channel else {
            return Err(problem(
                "the runner publishes dead letters on the consumer's channel: pass it with \
                 ServeOptions::channel or ServeOptions::close_channel, or opt into the broker's \
                 own dead-lettering (DeadLetterTarget::Broker, IDEMPOTENCY_DEAD_LETTERS=broker) \
                 for a queue with x-dead-letter-exchange"
                    .into(),
            ));
        };
        if exchange.is_empty() {
            let name = routing_key.as_deref().unwrap_or_default();
            let declare = channel.queue_declare(
                name.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            );
            match tokio::time::timeout(CONFIRM_TIMEOUT, declare).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    return Err(problem(format!(
                        "cannot declare it (durable, no arguments): {error}; if a queue of that \
                         name exists with other arguments, choose another name with \
                         IDEMPOTENCY_DEAD_LETTER_QUEUE (your own queue is never redeclared)"
                    )));
                }
                Err(_) => return Err(problem(unanswered("queue.declare").to_string())),
            }
        } else {
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            let check = channel.exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                passive,
                FieldTable::default(),
            );
            match tokio::time::timeout(CONFIRM_TIMEOUT, check).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    return Err(problem(format!(
                        "{error}; declare it, or fix IDEMPOTENCY_DEAD_LETTER_EXCHANGE"
                    )));
                }
                Err(_) => return Err(problem(unanswered("exchange.declare").to_string())),
            }
        }
        let confirm = channel.confirm_select(ConfirmSelectOptions::default());
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(())) => Ok(Some(Arc::new(Self {
                channel: channel.clone(),
                exchange,
                routing_key,
                queue: queue.to_owned(),
                shown,
                frame_max,
            }))),
            Ok(Err(error)) => Err(problem(format!(
                "cannot put the channel in confirm mode: {error}"
            ))),
            Err(_) => Err(problem(unanswered("confirm.select").to_string())),
        }
    }

    /// Publishes the copy with its reason; true once the broker confirmed
    /// it and did not return it as unroutable.
    pub(crate) async fn publish(&self, copy: DeadLetterCopy, outcome: &Outcome) -> bool {
        let mut headers: BTreeMap<ShortString, AMQPValue> = copy
            .properties
            .headers()
            .as_ref()
            .map(|headers| headers.inner().clone())
            .unwrap_or_default();
        // The copy carries the sender's trace context: ours replaces it.
        outcome.trace().write(&mut headers);
        let reason = outcome.reason().unwrap_or(outcome.kind().as_str());
        let text = |value: &str| {
            AMQPValue::LongString(LongString::from(bounded_header(value).into_owned()))
        };
        headers.insert(
            "x-idempotency-outcome".into(),
            text(outcome.kind().as_str()),
        );
        headers.insert("x-idempotency-reason".into(), text(reason));
        headers.insert(
            "x-idempotency-attempts".into(),
            AMQPValue::LongLongInt(i64::from(outcome.attempt())),
        );
        headers.insert("x-idempotency-queue".into(), text(&self.queue));
        let (properties, dropped) = fit_frame(copy.properties, headers, self.frame_max);
        if !dropped.is_empty() {
            tracing::warn!(
                target = %self.shown,
                frame_max = self.frame_max,
                dropped = %dropped.join(", "),
                "the dead-letter copy would not fit the connection's frame_max with all its headers: parked without the largest (named in x-idempotency-headers-dropped)"
            );
        }
        let routing_key = match &self.routing_key {
            Some(key) => key.as_str(),
            None => copy.routing_key.as_str(),
        };
        let published = publish_confirmed(
            &self.channel,
            &self.exchange,
            routing_key,
            &copy.data,
            properties,
            CONFIRM_TIMEOUT,
        )
        .await;
        match &published {
            Published::Confirmed => {}
            Published::Returned => {
                tracing::error!(target = %self.shown, "the dead-letter copy could not be routed (was the parking queue deleted?): requeueing the original");
            }
            other => {
                tracing::warn!(target = %self.shown, problem = %other, "the dead-letter copy was not confirmed: requeueing the original");
            }
        }
        published.is_confirmed()
    }
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
