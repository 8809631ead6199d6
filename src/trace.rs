//! The W3C trace context of a delivery, and carrying it onto every message
//! the library publishes for it (outbox messages, replies, parked and retry
//! copies): the one home of both.
//!
//! ```ignore
//! let span = tracing::info_span!("delivery");
//! // Under the `opentelemetry` feature, the span's parent becomes the
//! // incoming context; the context returned is what we publish with.
//! let trace = TraceContext::join(&span, &delivery.properties);
//! let properties = trace.onto(properties); // an outbox message, a reply
//! trace.write(&mut headers); // a parked or retry copy
//! ```
//!
//! Without the feature, or without an OpenTelemetry tracer installed, the
//! context is the delivery's own `traceparent` and `tracestate` headers,
//! forwarded unchanged. With a tracer, it is the delivery span's: the same
//! trace, the span as parent, the incoming `tracestate`.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// The W3C header that names the trace and the parent span.
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The W3C header of vendor-specific trace data.
pub(crate) const TRACESTATE: &str = "tracestate";

/// Longest header value forwarded: a longer one is not a trace context
/// (a `traceparent` has 55 bytes; W3C asks a `tracestate` to be kept to
/// 512), and every header the library adds stays bounded. Cutting one
/// would corrupt it, so it is left out instead.
const MAX_VALUE_BYTES: usize = 1024;

/// The trace context the messages published for one delivery carry.
/// Empty when the delivery had none (and no tracer made one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TraceContext {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl TraceContext {
    /// The `traceparent` and `tracestate` headers of a delivery, as they
    /// came (long or short strings, at most [`MAX_VALUE_BYTES`] each).
    pub(crate) fn incoming(properties: &BasicProperties) -> Self {
        let Some(headers) = properties.headers() else {
            return Self::default();
        };
        let traceparent = text(headers, TRACEPARENT);
        let tracestate = traceparent.as_ref().and_then(|_| text(headers, TRACESTATE));
        Self {
            traceparent,
            tracestate,
        }
    }

    /// The context of a delivery with `properties`, handled in `span`.
    /// Under the `opentelemetry` feature, the span's parent becomes the
    /// incoming context, and when a tracer records the span, the span's
    /// own context is returned; otherwise the incoming one.
    pub(crate) fn join(span: &tracing::Span, properties: &BasicProperties) -> Self {
        let incoming = Self::incoming(properties);
        #[cfg(feature = "opentelemetry")]
        if let Some(own) = otel::join(span, &incoming) {
            return own;
        }
        #[cfg(not(feature = "opentelemetry"))]
        let _ = span;
        incoming
    }

    /// True when there is nothing to carry.
    pub(crate) fn is_empty(&self) -> bool {
        self.traceparent.is_none()
    }

    /// Writes the context into `headers`, replacing one already there (a
    /// copy of the delivery carries the sender's; it gets ours). An empty
    /// context leaves `headers` alone.
    pub(crate) fn write(&self, headers: &mut BTreeMap<ShortString, AMQPValue>) {
        let Some(traceparent) = &self.traceparent else {
            return;
        };
        headers.insert(TRACEPARENT.into(), long(traceparent));
        match &self.tracestate {
            Some(tracestate) => headers.insert(TRACESTATE.into(), long(tracestate)),
            None => headers.remove(TRACESTATE),
        };
    }

    /// `properties` with the context in their headers, unless they carry a
    /// `traceparent` already: a handler that set one on a message it
    /// staged (a span of its own, say) keeps it.
    pub(crate) fn onto(&self, properties: BasicProperties) -> BasicProperties {
        if self.is_empty() {
            return properties;
        }
        let mut headers = properties
            .headers()
            .as_ref()
            .map(|headers| headers.inner().clone())
            .unwrap_or_default();
        if headers.contains_key(TRACEPARENT) {
            return properties;
        }
        self.write(&mut headers);
        properties.with_headers(FieldTable::from(headers))
    }
}

fn text(headers: &FieldTable, name: &str) -> Option<String> {
    let value = match headers.inner().get(name)? {
        AMQPValue::LongString(value) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
        AMQPValue::ShortString(value) => value.to_string(),
        _ => return None,
    };
    (!value.is_empty() && value.len() <= MAX_VALUE_BYTES).then_some(value)
}

fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.to_owned()))
}

/// The OpenTelemetry side: the incoming context as the span's parent, and
/// the span's context in W3C form.
#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    /// Parents `span` on `incoming` (when it parses) and returns the span's
    /// context, or `None` when no tracer records the span.
    pub(super) fn join(span: &tracing::Span, incoming: &TraceContext) -> Option<TraceContext> {
        if let Some(remote) = remote(incoming) {
            // Fails only without an OpenTelemetry layer: nothing to parent.
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let context = span.context();
        let own = context.span().span_context().clone();
        if !own.is_valid() {
            return None;
        }
        let tracestate = own.trace_state().header();
        Some(TraceContext {
            traceparent: Some(format!(
                "00-{}-{}-{:02x}",
                own.trace_id(),
                own.span_id(),
                own.trace_flags().to_u8()
            )),
            tracestate: (!tracestate.is_empty()).then_some(tracestate),
        })
    }

    /// The incoming `traceparent` (and `tracestate`) as a remote span
    /// context; `None` when it is not a valid W3C `traceparent`.
    pub(super) fn remote(incoming: &TraceContext) -> Option<SpanContext> {
        let mut parts = incoming.traceparent.as_deref()?.split('-');
        let version = parts.next().filter(|v| hex(v, 2) && *v != "ff")?;
        let trace_id = parts.next().filter(|t| hex(t, 32))?;
        let span_id = parts.next().filter(|s| hex(s, 16))?;
        let flags = parts.next().filter(|f| hex(f, 2))?;
        // Version 00 has exactly four fields; later ones may add more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = TraceId::from_hex(trace_id).ok()?;
        let span_id = SpanId::from_hex(span_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let state = incoming
            .tracestate
            .as_deref()
            .and_then(|state| state.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = SpanContext::new(trace_id, span_id, TraceFlags::new(flags & 1), true, state);
        context.is_valid().then_some(context)
    }

    /// `value` is `len` lowercase hex digits.
    fn hex(value: &str, len: usize) -> bool {
        value.len() == len
            && value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert((*name).into(), value.clone());
        }
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn the_incoming_context_is_read_as_it_came_and_bounded() {
        let properties = with(&[
            (TRACEPARENT, long(PARENT)),
            (TRACESTATE, AMQPValue::ShortString("a=1".into())),
        ]);
        let trace = TraceContext::incoming(&properties);
        assert_eq!(trace.traceparent.as_deref(), Some(PARENT));
        assert_eq!(trace.tracestate.as_deref(), Some("a=1"));
        assert!(TraceContext::incoming(&BasicProperties::default()).is_empty());
        // A tracestate alone is no context; a huge or non-string value is none.
        assert!(TraceContext::incoming(&with(&[(TRACESTATE, long("a=1"))])).is_empty());
        let huge = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(TraceContext::incoming(&with(&[(TRACEPARENT, long(&huge))])).is_empty());
        let number = with(&[(TRACEPARENT, AMQPValue::LongLongInt(1))]);
        assert!(TraceContext::incoming(&number).is_empty());
    }

    #[test]
    fn a_copy_gets_ours_and_a_staged_message_keeps_its_own() {
        let trace = TraceContext {
            traceparent: Some(PARENT.into()),
            tracestate: None,
        };
        let mut headers = BTreeMap::new();
        headers.insert(ShortString::from(TRACEPARENT), long("00-sender"));
        headers.insert(ShortString::from(TRACESTATE), long("sender=1"));
        headers.insert(ShortString::from("tenant"), long("acme"));
        trace.write(&mut headers);
        assert_eq!(headers[TRACEPARENT], long(PARENT));
        assert!(!headers.contains_key(TRACESTATE), "no stale tracestate");
        assert_eq!(headers["tenant"], long("acme"));

        let staged = trace.onto(BasicProperties::default());
        let staged_headers = staged.headers().as_ref().map(FieldTable::inner);
        assert_eq!(staged_headers.map(|h| &h[TRACEPARENT]), Some(&long(PARENT)));
        let own = with(&[(TRACEPARENT, long("00-own"))]);
        assert_eq!(trace.onto(own.clone()), own);
        let empty = TraceContext::default();
        assert_eq!(
            empty.onto(BasicProperties::default()),
            BasicProperties::default()
        );
    }

    #[cfg(feature = "opentelemetry")]
    #[test]
    fn only_a_valid_traceparent_becomes_a_parent() {
        let parse = |traceparent: &str| {
            otel::remote(&TraceContext {
                traceparent: Some(traceparent.into()),
                tracestate: Some("a=1".into()),
            })
        };
        let remote = parse(PARENT).expect("a valid traceparent");
        assert_eq!(
            remote.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(remote.span_id().to_string(), "00f067aa0ba902b7");
        assert!(remote.is_sampled() && remote.is_remote());
        assert_eq!(remote.trace_state().header(), "a=1");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later").is_some());
    }
}
