//! Opening a connection as a [`Config`](crate::Config) says, with TLS for `amqps://`.

use std::fmt;
use std::sync::Arc;

use lapin::tcp::{AMQPUriTcpExt, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, ErrorKind};

use crate::config::Config;
use crate::error::redact_url;
use crate::tls::{self, Side};

/// Opens a connection to the broker at `config`'s AMQP URL
/// ([`Config::amqp_url`]), with TLS for `amqps://` as
/// [`Config::amqp_tls_ca_file`], [`Config::amqp_tls_cert_file`] and
/// [`Config::amqp_tls_key_file`] say.
///
/// Works like [`lapin::Connection::connect`] otherwise, and supports
/// lapin's automatic recovery (`properties.enable_auto_recover()`), which
/// reconnects with the same TLS settings, reading the files again. An IPv6 address in the URL is
/// connected to as written (lapin alone would connect to `localhost`).
///
/// # Errors
///
/// A malformed URL, unusable TLS files, an unreachable broker, a refused
/// login or a failed TLS handshake; the [`ConnectError`] names the URL with
/// its password hidden, and says what to set.
pub async fn connect(
    config: &Config,
    properties: ConnectionProperties,
) -> Result<Connection, ConnectError> {
    let url = config.amqp_url();
    let shown = redact_url(url);
    let fail = |message: String| ConnectError {
        url: shown.clone(),
        message,
        tls: false,
        source: None,
    };
    let uri = parse(url).map_err(fail)?;
    let files = config.amqp_tls();
    let tls = match uri.scheme {
        AMQPScheme::AMQPS => Some(connector(files).map_err(fail)?),
        AMQPScheme::AMQP => {
            if let Some((var, path)) = files.first_set(Side::Amqp) {
                return Err(fail(format!(
                    "{var}={} is set but the URL has no TLS: use amqps:// (or unset {var})",
                    path.display()
                )));
            }
            None
        }
    };
    let host = uri.authority.host.clone();
    let runtime = lapin::runtime::default_runtime().map_err(|err| fail(err.to_string()))?;
    // The first connection uses the connector built above; lapin's
    // recovery reconnects read the files again, for renewed certificates.
    let first = std::sync::Mutex::new(tls);
    let reloaded = files.clone();
    let connected = Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            // The TCP connection as lapin makes it, TLS as configured here.
            let mut plain = uri.clone();
            plain.scheme = AMQPScheme::AMQP;
            let stream = plain.connect_async(&runtime).await?;
            if uri.scheme != AMQPScheme::AMQPS {
                return Ok(stream);
            }
            let prepared = first.lock().ok().and_then(|mut first| first.take());
            let connector = match prepared {
                Some(connector) => connector,
                None => connector(&reloaded).map_err(std::io::Error::other)?,
            };
            Ok(stream.into_rustls(&connector, &uri.authority.host).await?)
        },
        properties,
    )
    .await;
    connected.map_err(|err| {
        let (message, tls) = explain(&err, files, &host);
        ConnectError {
            url: shown.clone(),
            message,
            tls,
            source: Some(err),
        }
    })
}

/// The TLS connector for `files`: their CA or the platform roots, their
/// client certificate if any.
fn connector(files: &tls::TlsFiles) -> Result<RustlsConnector, String> {
    let material = files.load(Side::Amqp).map_err(|err| err.to_string())?;
    let client = tls::client_config(Side::Amqp, material).map_err(|err| err.to_string())?;
    Ok(RustlsConnector::from(Arc::new(client)))
}

/// Parses `url` without ever echoing it (lapin's parser would, password
/// included), keeping an IPv6 address host as written.
fn parse(url: &str) -> Result<AMQPUri, String> {
    let shown = redact_url(url);
    let invalid = |detail: String| {
        format!(
            "`{shown}` is not a valid AMQP URL ({}); expected \
             amqp://user:password@host:port/vhost or amqps://... (the vhost `/` is written %2f); \
             set AMQP_URL",
            detail.replace(url, &shown)
        )
    };
    let mut uri: AMQPUri = url.parse().map_err(invalid)?;
    // amq-protocol takes the host from `Url::domain`, which is `None` for an
    // IPv6 address (an IPv4 one is an opaque host in an amqp:// URL): it
    // would connect to its default, `localhost`.
    match url::Url::parse(url)
        .map_err(|err| invalid(err.to_string()))?
        .host()
    {
        Some(url::Host::Ipv4(ip)) => uri.authority.host = ip.to_string(),
        Some(url::Host::Ipv6(ip)) => uri.authority.host = ip.to_string(),
        Some(url::Host::Domain(_)) | None => {}
    }
    Ok(uri)
}

/// What went wrong and what to do about it, and whether it was TLS.
fn explain(err: &lapin::Error, files: &tls::TlsFiles, host: &str) -> (String, bool) {
    if let Some(advice) = tls::explain(Side::Amqp, files, host, err) {
        return (advice, true);
    }
    if let ErrorKind::IOError(io) = err.kind()
        && let Some(advice) = tls::explain(Side::Amqp, files, host, &**io)
    {
        return (advice, true);
    }
    (advise(err), false)
}

fn advise(err: &lapin::Error) -> String {
    let text = err.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("access_refused") || lower.contains("access refused") {
        format!(
            "{text}; the broker refused the login: put the right user and password in AMQP_URL \
             (amqp://user:password@host:port/vhost)"
        )
    } else if matches!(err.kind(), ErrorKind::IOError(_)) {
        format!(
            "{text}; is RabbitMQ running and listening there? Start it (for example \
             `rabbitmq-server -detached`) or fix AMQP_URL"
        )
    } else {
        format!("{text}; check AMQP_URL")
    }
}

/// Connecting to the broker failed.
///
/// Its message names the URL (password hidden), what failed and what to
/// do: for a certificate that is not trusted, to set `AMQP_TLS_CA_FILE` to
/// the CA that signed it.
#[derive(Debug)]
pub struct ConnectError {
    url: String,
    message: String,
    tls: bool,
    source: Option<lapin::Error>,
}

impl ConnectError {
    /// The broker URL, with its password replaced by `***`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True when the TLS handshake failed (a certificate that is not
    /// trusted or not valid for the host, a client certificate missing or
    /// refused): retrying will not help until the settings change.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// True when the broker could not be reached or the connection broke
    /// (not a TLS failure, not a refused login): worth retrying while a
    /// broker starts.
    pub fn is_io(&self) -> bool {
        !self.tls && self.source.as_ref().is_some_and(lapin::Error::is_io_error)
    }

    /// lapin's error, if the failure came from connecting rather than from
    /// the settings.
    pub fn lapin_error(&self) -> Option<&lapin::Error> {
        self.source.as_ref()
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot connect to RabbitMQ at {}: {}",
            self.url, self.message
        )
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|err| err as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_address_host_is_kept() {
        let uri = parse("amqp://u:p@10.1.2.3:5673/%2f").unwrap();
        assert_eq!(uri.authority.host, "10.1.2.3");
        assert_eq!(uri.authority.port, 5673);
        let uri = parse("amqps://u:p@[::1]:5671/%2f").unwrap();
        assert_eq!(uri.authority.host, "::1");
        assert_eq!(uri.scheme, AMQPScheme::AMQPS);
        let uri = parse("amqps://u:p@rabbit.internal/%2f").unwrap();
        assert_eq!(uri.authority.host, "rabbit.internal");
        assert_eq!(uri.authority.port, 5671);
    }

    #[test]
    fn a_malformed_url_is_reported_without_its_password() {
        for url in ["amqp:guest:hunter2@host", "http://guest:hunter2@host/"] {
            let err = parse(url).unwrap_err();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("AMQP_URL"), "{err}");
        }
    }

    #[tokio::test]
    async fn tls_files_with_a_plain_url_are_refused() {
        let config = Config::default().with_amqp_tls_ca_file("/etc/ca.pem");
        let err = connect(&config, ConnectionProperties::default())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("AMQP_TLS_CA_FILE=/etc/ca.pem"), "{text}");
        assert!(text.contains("amqps://"), "{text}");
        assert!(!text.contains("guest:guest"), "{text}");
    }
}
