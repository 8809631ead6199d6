//! From committed entries to messages on their way: each decoded, given its
//! deterministic `message_id`, in the order staged, and the reply addressed
//! to the `reply_to` and `correlation_id` of the copy being answered; all
//! of them in that copy's trace.
//!
//! ```ignore
//! let target = ReplyTarget::of(&delivery, trace);
//! let ready = ready(entries, "orders", "order-7", &target)?;
//! let dispatched = publisher.dispatch(&ready).await;
//! ```

use std::sync::Arc;

use lapin::message::Delivery;
use lapin::types::ShortString;

use super::codec::{Outgoing, decode};
use super::ids::{message_id, reply_tail};
use super::staging::{COMMITTED_FIELD, REPLY_FIELD};
use crate::store::OutboxEntry;
use crate::trace::TraceContext;

/// Where the reply of a delivery goes: its `reply_to`, with its
/// `correlation_id`; and the trace context that the reply and every other
/// message sent for the delivery carry.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplyTarget {
    reply_to: Option<ShortString>,
    correlation_id: Option<ShortString>,
    trace: TraceContext,
}

impl ReplyTarget {
    /// The target of `delivery`, whose messages carry `trace`.
    pub(crate) fn of(delivery: &Delivery, trace: TraceContext) -> Self {
        Self {
            reply_to: delivery.properties.reply_to().clone(),
            correlation_id: delivery.properties.correlation_id().clone(),
            trace,
        }
    }
}

/// A message on its way: its outbox field, whether it is the reply, and
/// the message with its `message_id` (and, for the reply, its target).
#[derive(Clone, Debug)]
pub(crate) struct Ready {
    pub(super) field: Vec<u8>,
    pub(super) reply: bool,
    pub(super) message: Arc<Outgoing>,
}

impl Ready {
    pub(crate) fn is_reply(&self) -> bool {
        self.reply
    }

    pub(crate) fn field(&self) -> &[u8] {
        &self.field
    }
}

/// The messages of an outbox to send now, for the delivery of `fingerprint`
/// in `scope`: every message still there, in the order staged, then the
/// reply when `target` has a `reply_to`; each in `target`'s trace (unless
/// the handler gave it a `traceparent` of its own). `Err` names an entry
/// this version cannot read (written by a newer one, say).
pub(crate) fn ready(
    entries: Vec<OutboxEntry>,
    scope: &str,
    fingerprint: &str,
    target: &ReplyTarget,
) -> Result<Vec<Ready>, String> {
    let mut ready = Vec::with_capacity(entries.len());
    for (field, value) in entries {
        if field == COMMITTED_FIELD {
            continue;
        }
        let reply = field == REPLY_FIELD;
        let position = field
            .strip_prefix(b"m")
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok());
        let (Some(mut message), true) = (decode(&value), reply || position.is_some()) else {
            return Err(format!(
                "the outbox entry `{}` is in a format this version cannot read: run the version that wrote it",
                String::from_utf8_lossy(&field)
            ));
        };
        let tail = match position {
            Some(n) => n.to_string(),
            None => reply_tail(target.correlation_id.as_ref()),
        };
        message.properties = target
            .trace
            .onto(message.properties)
            .with_message_id(message_id(scope, fingerprint, &tail));
        if reply {
            let Some(reply_to) = &target.reply_to else {
                continue;
            };
            message.exchange = String::new();
            message.routing_key = reply_to.to_string();
            if let Some(correlation_id) = &target.correlation_id {
                message.properties = message
                    .properties
                    .with_correlation_id(correlation_id.clone());
            }
        }
        ready.push((
            position.unwrap_or(usize::MAX),
            Ready {
                field,
                reply,
                message: Arc::new(message),
            },
        ));
    }
    ready.sort_by_key(|(position, _)| *position);
    Ok(ready.into_iter().map(|(_, ready)| ready).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;
    use lapin::BasicProperties;

    #[test]
    fn ready_keeps_the_staged_order_and_refuses_what_it_cannot_read() {
        let outbox = Outbox::new(100_000);
        for n in 0..12 {
            outbox
                .publish("", "q", BasicProperties::default(), format!("{n}"))
                .unwrap();
        }
        let mut entries = outbox.seal().unwrap();
        // As a store returns them: sorted by field bytes (m0, m1, m10, m11, m2...).
        entries.sort_unstable();
        let ready = ready(entries.clone(), "s", "f", &ReplyTarget::default()).unwrap();
        let bodies: Vec<String> = ready
            .iter()
            .map(|r| String::from_utf8_lossy(&r.message.body).into_owned())
            .collect();
        let staged: Vec<String> = (0..12).map(|n| n.to_string()).collect();
        assert_eq!(bodies, staged);
        entries.push((b"m12".to_vec(), b"\x02from a newer version".to_vec()));
        let err = super::ready(entries, "s", "f", &ReplyTarget::default()).unwrap_err();
        assert!(err.contains("`m12`"), "{err}");
    }

    #[test]
    fn reply_ids_are_one_per_correlation_id() {
        let outbox = Outbox::new(1000);
        outbox.reply(BasicProperties::default(), "r").unwrap();
        let entries = outbox.seal().unwrap();
        let reply_id = |correlation_id: Option<&str>| {
            let target = ReplyTarget {
                reply_to: Some("asker".into()),
                correlation_id: correlation_id.map(Into::into),
                ..ReplyTarget::default()
            };
            let ready = ready(entries.clone(), "quotes", "q-1", &target).unwrap();
            ready[0].message.properties.message_id().clone().unwrap()
        };
        let first = reply_id(Some("c-1"));
        assert!(first.as_str().starts_with("quotes:q-1:reply:"), "{first}");
        assert_eq!(first.as_str().len(), "quotes:q-1:reply:".len() + 16);
        assert_eq!(first, reply_id(Some("c-1")), "deterministic");
        assert_ne!(first, reply_id(Some("c-2")), "one per correlation id");
        assert_eq!(reply_id(None).as_str(), "quotes:q-1:reply");
        // A long correlation id still makes a short id.
        let long = "c".repeat(255);
        assert!(reply_id(Some(&long)).as_str().len() < 64);
        let long_fingerprint = "f".repeat(300);
        let target = ReplyTarget {
            reply_to: Some("asker".into()),
            correlation_id: Some("c-1".into()),
            ..ReplyTarget::default()
        };
        let ready = ready(entries, "quotes", &long_fingerprint, &target).unwrap();
        let id = ready[0].message.properties.message_id().clone().unwrap();
        assert!(id.as_str().len() <= 255, "{id}");
        assert!(
            id.as_str()
                .ends_with(&first.as_str()["quotes:q-1:".len()..]),
            "{id}"
        );
    }

    #[test]
    fn ready_sets_ids_and_sends_the_reply_to_the_asker() {
        let outbox = Outbox::new(1000);
        outbox
            .publish("x", "a", BasicProperties::default(), "1")
            .unwrap();
        outbox
            .reply(
                BasicProperties::default().with_content_type("text/plain".into()),
                "r",
            )
            .unwrap();
        let entries = outbox.seal().unwrap();
        let target = ReplyTarget {
            reply_to: Some("amq.rabbitmq.reply-to.abc".into()),
            correlation_id: Some("c-1".into()),
            ..ReplyTarget::default()
        };
        let ready = ready(entries.clone(), "quotes", "q-1", &target).unwrap();
        assert_eq!(ready.len(), 2);
        assert_eq!(
            ready[0]
                .message
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
            Some("quotes:q-1:0")
        );
        let reply = &ready[1];
        assert!(reply.reply);
        assert_eq!(reply.message.routing_key, "amq.rabbitmq.reply-to.abc");
        assert_eq!(
            reply
                .message
                .properties
                .correlation_id()
                .as_ref()
                .map(ShortString::as_str),
            Some("c-1")
        );
        // Without a reply_to, the reply stays in the outbox unsent.
        assert_eq!(
            super::ready(entries, "quotes", "q-1", &ReplyTarget::default())
                .unwrap()
                .len(),
            1
        );
    }
}
