//! The stored form of an outgoing message: a format byte, the exchange and
//! routing key, the AMQP properties in their wire encoding (lapin's own
//! generator and parser, so every property and header survives), the body.
//! What a consumer of one version commits, a consumer of the next must
//! read: change the format only with a new format byte.
//!
//! ```ignore
//! let encoded = encode("payments", "charge", &BasicProperties::default(), b"{}")?;
//! assert_eq!(decode(&encoded).map(|out| out.routing_key), Some("charge".to_owned()));
//! ```

use lapin::BasicProperties;
use lapin::protocol::basic::{AMQPProperties, gen_properties, parse_properties};

use crate::error::HandlerError;

/// The first byte of an encoded outgoing message: its format version.
const FORMAT: u8 = 1;

/// `FORMAT`, the exchange and routing key (a length byte each), the AMQP
/// properties (a 4-byte length, then their wire encoding), the body.
pub(super) fn encode(
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    body: &[u8],
) -> Result<Vec<u8>, HandlerError> {
    let too_long = |what: &str, value: &str| {
        HandlerError::permanent(format!(
            "the outgoing message's {what} `{value}` is longer than AMQP's 255 bytes"
        ))
    };
    let exchange_len = u8::try_from(exchange.len()).map_err(|_| too_long("exchange", exchange))?;
    let key_len =
        u8::try_from(routing_key.len()).map_err(|_| too_long("routing key", routing_key))?;
    let props =
        cookie_factory::gen_simple(gen_properties(properties), Vec::new()).map_err(|err| {
            HandlerError::permanent(format!(
                "the outgoing message's properties cannot be encoded: {err:?}"
            ))
        })?;
    let props_len = u32::try_from(props.len())
        .map_err(|_| HandlerError::permanent("the outgoing message's properties are too large"))?;
    let mut out =
        Vec::with_capacity(7 + exchange.len() + routing_key.len() + props.len() + body.len());
    out.push(FORMAT);
    out.push(exchange_len);
    out.extend_from_slice(exchange.as_bytes());
    out.push(key_len);
    out.extend_from_slice(routing_key.as_bytes());
    out.extend_from_slice(&props_len.to_be_bytes());
    out.extend_from_slice(&props);
    out.extend_from_slice(body);
    Ok(out)
}

/// An outgoing message read back from the outbox.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Outgoing {
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) properties: AMQPProperties,
    pub(super) body: Vec<u8>,
}

pub(super) fn decode(encoded: &[u8]) -> Option<Outgoing> {
    let (&format, rest) = encoded.split_first()?;
    if format != FORMAT {
        return None;
    }
    let short = |bytes: &[u8]| -> Option<(String, usize)> {
        let (&len, rest) = bytes.split_first()?;
        let text = std::str::from_utf8(rest.get(..usize::from(len))?).ok()?;
        Some((text.to_owned(), 1 + usize::from(len)))
    };
    let (exchange, used) = short(rest)?;
    let rest = &rest[used..];
    let (routing_key, used) = short(rest)?;
    let rest = &rest[used..];
    let props_len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let rest = &rest[4..];
    let props = rest.get(..props_len)?;
    let (_, properties) = parse_properties(props).ok()?;
    Some(Outgoing {
        exchange,
        routing_key,
        properties,
        body: rest[props_len..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable};

    #[test]
    fn messages_round_trip_through_their_encoding() {
        let mut headers = FieldTable::default();
        headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers)
            .with_delivery_mode(2);
        let encoded = encode("payments", "charge", &properties, b"{\"cents\":100}").unwrap();
        let decoded = decode(&encoded).unwrap();
        assert_eq!(decoded.exchange, "payments");
        assert_eq!(decoded.routing_key, "charge");
        assert_eq!(decoded.properties, properties);
        assert_eq!(decoded.body, b"{\"cents\":100}");
        assert!(decode(&encoded[..5]).is_none());
        assert!(decode(b"\x02rest").is_none());
    }
}
