//! TLS for `rediss://` and `amqps://`: the CA to trust and the client
//! certificate to present, read from files.
//!
//! ```
//! use std::path::Path;
//! use amqp_idempotency::Config;
//!
//! let config = Config::default()
//!     .with_redis_url("rediss://idem:secret@redis.internal:6380")
//!     .with_redis_tls_ca_file("/etc/idem/redis-ca.pem");
//! assert_eq!(config.redis_tls_ca_file(), Some(Path::new("/etc/idem/redis-ca.pem")));
//! assert!(config.validate().is_ok());
//!
//! // A client certificate needs its key.
//! let err = config.with_redis_tls_cert_file("/etc/idem/client.pem").validate().unwrap_err();
//! assert_eq!(err.variable(), "REDIS_TLS_KEY_FILE");
//! ```
//!
//! Certificates are always verified. Without a CA file the platform's
//! trusted roots are used (the system store, as `SSL_CERT_FILE` or
//! `SSL_CERT_DIR` may point elsewhere); with one, only the CAs in that file
//! are trusted for that connection. TLS is rustls with the ring provider:
//! no OpenSSL is needed to build or run. Files are read again whenever a
//! connection is made (each reconnect of a `RedisStore`, each call of
//! [`amqp::connect`](crate::amqp::connect) and each of lapin's recovery
//! reconnects), so a renewed client certificate is used from the next
//! reconnect on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, RootCertStore};

use crate::error::ConfigError;

/// The TLS files of one connection: a CA to trust instead of the platform
/// roots, and a client certificate with its key for servers that require
/// one (mutual TLS). All PEM. See [`Config::redis_tls`](crate::Config::redis_tls)
/// and [`Config::amqp_tls`](crate::Config::amqp_tls).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// The CA certificates (PEM) trusted instead of the platform roots.
    pub(crate) fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The client certificate chain (PEM), presented to servers that ask for one.
    pub(crate) fn cert_file(&self) -> Option<&Path> {
        self.cert_file.as_deref()
    }

    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub(crate) fn key_file(&self) -> Option<&Path> {
        self.key_file.as_deref()
    }

    /// True when no file is set: platform roots, no client certificate.
    pub(crate) fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.key_file.is_none()
    }

    /// The first file that is set, with its variable, for error messages.
    pub(crate) fn first_set(&self, side: Side) -> Option<(&'static str, &Path)> {
        [
            (side.ca_var(), self.ca_file()),
            (side.cert_var(), self.cert_file()),
            (side.key_var(), self.key_file()),
        ]
        .into_iter()
        .find_map(|(var, path)| path.map(|path| (var, path)))
    }

    /// A certificate without its key, or a key without its certificate.
    pub(crate) fn check_pairs(&self, side: Side) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(cert), None) => Err(ConfigError::invalid(
                side.key_var(),
                "",
                format!(
                    "the private key (PEM file) of the client certificate {}={}: a client \
                     certificate is only usable with its key; set both or neither",
                    side.cert_var(),
                    cert.display()
                ),
            )),
            (None, Some(key)) => Err(ConfigError::invalid(
                side.cert_var(),
                "",
                format!(
                    "the client certificate (PEM file) that goes with the key {}={}; set both \
                     or neither",
                    side.key_var(),
                    key.display()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Reads and checks every file that is set.
    pub(crate) fn load(&self, side: Side) -> Result<Material, ConfigError> {
        self.check_pairs(side)?;
        let mut material = Material::default();
        if let Some(path) = &self.ca_file {
            let pem = read(side.ca_var(), path)?;
            let certs = certificates(side.ca_var(), path, &pem, "CA certificate")?;
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots.add(cert).map_err(|err| {
                    ConfigError::invalid(
                        side.ca_var(),
                        path.display().to_string(),
                        format!("CA certificates that can anchor a chain; one is not: {err}"),
                    )
                })?;
            }
            material.ca_pem = Some(pem);
            material.roots = Some(roots);
        }
        if let (Some(cert_path), Some(key_path)) = (&self.cert_file, &self.key_file) {
            let cert_pem = read(side.cert_var(), cert_path)?;
            let chain = certificates(side.cert_var(), cert_path, &cert_pem, "client certificate")?;
            let key_pem = read(side.key_var(), key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| {
                ConfigError::invalid(
                    side.key_var(),
                    key_path.display().to_string(),
                    format!(
                        "a PEM file holding a private key (PKCS#8, PKCS#1 or SEC1); reading one \
                         failed: {err}"
                    ),
                )
            })?;
            // Refuses a key that is not the certificate's, here rather
            // than as a handshake failure later.
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|err| {
                    ConfigError::invalid(side.cert_var(), "", format!("usable TLS settings: {err}"))
                })?
                .with_root_certificates(RootCertStore::empty())
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|err| {
                    ConfigError::invalid(
                        side.key_var(),
                        key_path.display().to_string(),
                        format!(
                            "the private key of the certificate in {}={}: {err}",
                            side.cert_var(),
                            cert_path.display()
                        ),
                    )
                })?;
            material.identity = Some(Identity {
                cert_pem,
                key_pem,
                chain,
                key,
            });
        }
        Ok(material)
    }
}

/// Which connection a [`TlsFiles`] is for; it names the variables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Redis,
    Amqp,
}

impl Side {
    pub(crate) fn url_var(self) -> &'static str {
        match self {
            Side::Redis => "REDIS_URL",
            Side::Amqp => "AMQP_URL",
        }
    }

    pub(crate) fn ca_var(self) -> &'static str {
        match self {
            Side::Redis => "REDIS_TLS_CA_FILE",
            Side::Amqp => "AMQP_TLS_CA_FILE",
        }
    }

    pub(crate) fn cert_var(self) -> &'static str {
        match self {
            Side::Redis => "REDIS_TLS_CERT_FILE",
            Side::Amqp => "AMQP_TLS_CERT_FILE",
        }
    }

    pub(crate) fn key_var(self) -> &'static str {
        match self {
            Side::Redis => "REDIS_TLS_KEY_FILE",
            Side::Amqp => "AMQP_TLS_KEY_FILE",
        }
    }

    /// The URL scheme with TLS.
    pub(crate) fn tls_scheme(self) -> &'static str {
        match self {
            Side::Redis => "rediss",
            Side::Amqp => "amqps",
        }
    }

    /// Whether `url` asks for TLS (`valkeys://` is redis-rs's other name
    /// for `rediss://`).
    pub(crate) fn is_tls_url(self, url: &str) -> bool {
        let url = url.trim_start().to_ascii_lowercase();
        match self {
            Side::Redis => {
                url.starts_with("rediss://")
                    || url.starts_with("valkeys://")
                    || url.starts_with("rediss-sentinel://")
            }
            Side::Amqp => url.starts_with("amqps://"),
        }
    }

    fn server(self) -> &'static str {
        match self {
            Side::Redis => "Redis (tls-ca-cert-file)",
            Side::Amqp => "the broker (ssl_options.cacertfile, or the TLS proxy in front of it)",
        }
    }
}

/// The contents of the files, read and checked.
#[derive(Default)]
pub(crate) struct Material {
    pub(crate) ca_pem: Option<Vec<u8>>,
    pub(crate) roots: Option<RootCertStore>,
    pub(crate) identity: Option<Identity>,
}

/// A client certificate chain and its key, as PEM and parsed.
pub(crate) struct Identity {
    pub(crate) cert_pem: Vec<u8>,
    pub(crate) key_pem: Vec<u8>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

// Never prints key material.
impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("roots", &self.roots.as_ref().map(RootCertStore::len))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn read(var: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|err| {
        ConfigError::invalid(
            var,
            path.display().to_string(),
            format!("a readable PEM file; reading it failed: {err}"),
        )
    })
}

fn certificates(
    var: &str,
    path: &Path,
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let invalid = |detail: String| {
        ConfigError::invalid(
            var,
            path.display().to_string(),
            format!(
                "a PEM file holding at least one {what} (-----BEGIN CERTIFICATE-----); {detail}"
            ),
        )
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(format!("reading it failed: {err}")))?;
    if certs.is_empty() {
        return Err(invalid("it holds none".into()));
    }
    Ok(certs)
}

/// The crypto provider of every TLS connection made here.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// redis-rs builds its TLS settings with the process-wide rustls provider:
/// make sure there is one, so that a program whose other dependencies
/// compile in a second provider does not panic. One already installed is kept.
pub(crate) fn ensure_process_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The rustls settings of a client connection: `material`'s CA or the
/// platform roots, and its client certificate if any.
pub(crate) fn client_config(
    side: Side,
    material: Material,
) -> Result<rustls::ClientConfig, ConfigError> {
    let roots = match material.roots {
        Some(roots) => roots,
        None => platform_roots(side)?,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| {
            ConfigError::invalid(side.ca_var(), "", format!("usable TLS settings: {err}"))
        })?
        .with_root_certificates(roots);
    match material.identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain, identity.key)
            .map_err(|err| {
                ConfigError::invalid(
                    side.key_var(),
                    "",
                    format!("the private key of the client certificate: {err}"),
                )
            }),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The platform's trusted roots; an empty or unreadable store is an error
/// that says how to fix it.
fn platform_roots(side: Side) -> Result<RootCertStore, ConfigError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if roots.is_empty() {
        let why = match loaded.errors.first() {
            Some(err) => format!("loading them failed: {err}"),
            None => "none were found".to_owned(),
        };
        return Err(ConfigError::invalid(
            side.ca_var(),
            "",
            format!(
                "the CA that signed the server's certificate, as the platform's trusted roots \
                 cannot be used ({why}): set {} to a PEM file, or install the ca-certificates \
                 package (or point SSL_CERT_FILE at a bundle)",
                side.ca_var()
            ),
        ));
    }
    Ok(roots)
}

/// The rustls error somewhere in `err`'s chain, looking inside I/O errors
/// (whose `source` skips the error they wrap).
pub(crate) fn find_rustls_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        // redis-rs keeps the error in an `Arc<dyn Error>`, lapin in an
        // `Arc<io::Error>`; either hides what it holds from `downcast_ref`.
        if let Some(shared) = err.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
            let inner: &(dyn std::error::Error + 'static) = &**shared;
            if let Some(found) = find_rustls_error(inner) {
                return Some(found);
            }
        }
        let io = err
            .downcast_ref::<std::io::Error>()
            .or_else(|| err.downcast_ref::<Arc<std::io::Error>>().map(|arc| &**arc));
        if let Some(inner) = io.and_then(std::io::Error::get_ref) {
            let inner: &(dyn std::error::Error + 'static) = inner;
            if let Some(found) = find_rustls_error(inner) {
                return Some(found);
            }
        }
        next = err.source();
    }
    None
}

/// What went wrong in a TLS handshake and what to set, or `None` when `err`
/// is not about TLS. `files` are the settings the connection used.
pub(crate) fn explain(
    side: Side,
    files: &TlsFiles,
    host: &str,
    err: &(dyn std::error::Error + 'static),
) -> Option<String> {
    let tls = find_rustls_error(err)?;
    let ca_hint = match files.ca_file() {
        Some(path) => format!(
            "{}={} did not sign it: point {} at the CA that signed the server's certificate",
            side.ca_var(),
            path.display(),
            side.ca_var()
        ),
        None => format!(
            "it is not signed by a CA in the platform's trusted roots: set {} to the CA that \
             signed the server's certificate (a PEM file)",
            side.ca_var()
        ),
    };
    let advice = match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                format!("the server's certificate is not trusted: {ca_hint}")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the server's certificate is not valid for the host `{host}`: put a host \
                     name the certificate names in {}, or reissue the certificate with `{host}` \
                     in its subjectAltName",
                    side.url_var()
                )
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate has expired or is not valid yet: renew it, or check \
                 this machine's clock"
                    .to_owned()
            }
            other => format!("the server's certificate was refused ({other:?}): {ca_hint}"),
        },
        rustls::Error::AlertReceived(alert) => match (alert, files.cert_file()) {
            (AlertDescription::CertificateRequired, None) => format!(
                "the server requires a client certificate: set {} and {} to a certificate \
                 it trusts and its key",
                side.cert_var(),
                side.key_var()
            ),
            (AlertDescription::HandshakeFailure, None) => format!(
                "the server refused the handshake: if it requires client certificates, set {} \
                 and {} to a certificate it trusts and its key; otherwise it offers no TLS \
                 version or cipher this client accepts (TLS 1.2 or 1.3)",
                side.cert_var(),
                side.key_var()
            ),
            (
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::DecryptError
                | AlertDescription::HandshakeFailure,
                Some(cert),
            ) => format!(
                "the server refused the client certificate {}={}: it must be signed by a CA \
                 that {} trusts",
                side.cert_var(),
                cert.display(),
                side.server()
            ),
            (AlertDescription::ProtocolVersion, _) => {
                "the server offers no TLS version this client accepts (TLS 1.2 or 1.3)".to_owned()
            }
            (other, _) => format!("the server ended the TLS handshake ({other:?})"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "the server did not answer with TLS: is this its TLS port? Use a plain {}:// URL for \
             a port without TLS",
            match side {
                Side::Redis => "redis",
                Side::Amqp => "amqp",
            }
        ),
        other => format!("TLS failed: {other}"),
    };
    Some(format!("TLS handshake failed: {tls}; {advice}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_without_its_key_names_the_missing_variable() {
        let files = TlsFiles {
            cert_file: Some("/c.pem".into()),
            ..TlsFiles::default()
        };
        let err = files.check_pairs(Side::Amqp).unwrap_err();
        assert_eq!(err.variable(), "AMQP_TLS_KEY_FILE");
        assert!(
            err.expected().contains("AMQP_TLS_CERT_FILE=/c.pem"),
            "{err}"
        );
        let files = TlsFiles {
            key_file: Some("/k.pem".into()),
            ..TlsFiles::default()
        };
        assert_eq!(
            files.check_pairs(Side::Redis).unwrap_err().variable(),
            "REDIS_TLS_CERT_FILE"
        );
    }

    #[test]
    fn an_unreadable_file_names_the_variable_and_the_path() {
        let files = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let err = files.load(Side::Redis).unwrap_err();
        assert_eq!(err.variable(), "REDIS_TLS_CA_FILE");
        assert_eq!(err.value(), "/nonexistent/ca.pem");
        assert!(err.expected().contains("readable"), "{err}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let path = std::env::temp_dir().join(format!("not-a-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "hello").unwrap();
        let files = TlsFiles {
            ca_file: Some(path.clone()),
            ..TlsFiles::default()
        };
        let err = files.load(Side::Amqp).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert_eq!(err.variable(), "AMQP_TLS_CA_FILE");
        assert!(err.expected().contains("holds none"), "{err}");
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let text = explain(Side::Redis, &TlsFiles::default(), "h", &io).unwrap();
        assert!(text.contains("set REDIS_TLS_CA_FILE"), "{text}");
        let arc: Arc<std::io::Error> = Arc::new(io);
        assert!(find_rustls_error(&arc).is_some());
        let shared: Arc<dyn std::error::Error + Send + Sync> = Arc::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        ));
        let text = explain(Side::Amqp, &TlsFiles::default(), "h", &shared).unwrap();
        assert!(
            text.contains("set AMQP_TLS_CERT_FILE and AMQP_TLS_KEY_FILE"),
            "{text}"
        );
        let plain = std::io::Error::other("connection refused");
        assert!(explain(Side::Redis, &TlsFiles::default(), "h", &plain).is_none());
    }
}
