//! RabbitMQ plumbing: connecting with a timeout and a hint, channels,
//! publisher confirms, and the parts of an AMQP URL.

use amqp_idempotency::redact_url;
use lapin::{Channel, Connection, ConnectionProperties};

use crate::CONNECT_TIMEOUT;

/// Connects to RabbitMQ at `url` within [`CONNECT_TIMEOUT`]; the error says
/// how to start the broker, with the password of `url` hidden.
pub async fn connect(url: &str) -> Result<Connection, String> {
    let hint = || {
        format!(
            "cannot reach RabbitMQ at {}: start it with `rabbitmq-server -detached` or set AMQP_URL",
            redact_url(url)
        )
    };
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(format!("{} ({err})", hint())),
        Err(_) => Err(format!("{} (no answer within {CONNECT_TIMEOUT:?})", hint())),
    }
}

/// Opens a channel on `conn`.
pub async fn new_channel(conn: &Connection) -> Result<Channel, String> {
    conn.create_channel()
        .await
        .map_err(|err| format!("cannot open a RabbitMQ channel: {err}"))
}

/// Turns a publisher confirm into an error unless the broker acked the message.
pub fn check_confirm(confirm: Result<lapin::Confirmation, lapin::Error>) -> Result<(), String> {
    match confirm {
        Ok(confirmation) if confirmation.is_ack() => Ok(()),
        Ok(confirmation) => Err(format!(
            "the broker did not confirm a publish: {confirmation:?}"
        )),
        Err(err) => Err(format!("publisher confirm failed: {err}")),
    }
}

/// Splits an AMQP URL into the broker's `host:port`, what comes before it
/// (`amqp://user:pass@`) and what follows (`/vhost?query`), so that the URL
/// can be pointed at a proxy.
pub fn split_amqp_url(url: &str) -> Result<(String, String, String), String> {
    let shown = amqp_idempotency::redact_url(url);
    let bad = || format!("AMQP_URL `{shown}` is not an amqp://user:pass@host:port/vhost URL");
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    if scheme != "amqp" {
        return Err(format!(
            "AMQP_URL `{shown}`: only amqp:// is supported by the suite's TCP proxy"
        ));
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let has_port = match hostport.rfind(':') {
        Some(colon) => !hostport[colon..].contains(']'),
        None => false,
    };
    let upstream = match (hostport.is_empty(), has_port) {
        (true, _) => "127.0.0.1:5672".to_owned(),
        (false, true) => hostport.to_owned(),
        (false, false) => format!("{hostport}:5672"),
    };
    Ok((upstream, format!("amqp://{userinfo}"), tail.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::split_amqp_url;

    fn split(url: &str) -> (String, String, String) {
        split_amqp_url(url).unwrap_or_else(|err| panic!("{err}"))
    }

    #[test]
    fn splits_around_the_broker_address() {
        assert_eq!(
            split("amqp://guest:guest@127.0.0.1:5672/%2f"),
            (
                "127.0.0.1:5672".into(),
                "amqp://guest:guest@".into(),
                "/%2f".into()
            )
        );
        assert_eq!(
            split("amqp://rabbit?heartbeat=5"),
            (
                "rabbit:5672".into(),
                "amqp://".into(),
                "?heartbeat=5".into()
            )
        );
        assert_eq!(
            split("amqp://u:p@[::1]/vhost"),
            ("[::1]:5672".into(), "amqp://u:p@".into(), "/vhost".into())
        );
        assert_eq!(
            split("amqp://"),
            ("127.0.0.1:5672".into(), "amqp://".into(), String::new())
        );
    }

    #[test]
    fn rejects_what_the_proxy_cannot_carry() {
        assert!(split_amqp_url("amqps://host/").is_err());
        assert!(split_amqp_url("host:5672").is_err());
    }
}
