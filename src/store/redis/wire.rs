//! A connection the store owns: one TCP (or TLS) stream to one server,
//! commands packed by redis-rs and replies read by its parser, driven by
//! the writer task itself (no driver task in between).
//!
//! ```ignore
//! let mut wire = Wire::connect(client.get_connection_info(), tls, timeout).await?;
//! let hello = wire.call(&redis::cmd("HELLO")).await?;
//! let (mut reader, mut writer) = wire.split();
//! ```

use std::sync::Arc;
use std::time::Duration;

use combine::parser::combinator::AnySendSyncPartialState;
use combine::stream::{Decoder, PointerOffset};
use redis::{Cmd, ConnectionAddr, ConnectionInfo, RedisError, RedisResult, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// What a connection runs on: a TCP stream, or TLS over one.
pub(super) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

type Boxed = Box<dyn Stream>;

/// One connection to one server, authenticated and on its database.
pub(super) struct Wire {
    reader: Reader,
    writer: Writer,
}

/// The reading half: replies, in the order of the commands.
pub(super) struct Reader {
    half: ReadHalf<Boxed>,
    decoder: Decoder<AnySendSyncPartialState, PointerOffset<[u8]>>,
}

/// The writing half: packed commands.
pub(super) struct Writer {
    half: WriteHalf<Boxed>,
}

impl Wire {
    /// Connects to the server `info` names (TLS with `tls` for a
    /// `rediss://` address), within `timeout`, and authenticates and
    /// selects its database as `info` says.
    pub(super) async fn connect(
        info: &ConnectionInfo,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> RedisResult<Self> {
        let timed_out = || {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            ))
        };
        let stream = match tokio::time::timeout(timeout, open(info.addr(), tls)).await {
            Ok(opened) => opened?,
            Err(_) => return Err(timed_out()),
        };
        let (read, write) = tokio::io::split(stream);
        let mut wire = Self {
            reader: Reader {
                half: read,
                decoder: Decoder::new(),
            },
            writer: Writer { half: write },
        };
        let settings = info.redis_settings();
        let setup = async {
            if let Some(password) = settings.password() {
                let mut auth = redis::cmd("AUTH");
                if let Some(user) = settings.username() {
                    auth.arg(user);
                }
                auth.arg(password);
                wire.call(&auth).await?;
            }
            if settings.db() != 0 {
                let mut select = redis::cmd("SELECT");
                select.arg(settings.db());
                wire.call(&select).await?;
            }
            Ok::<_, RedisError>(())
        };
        match tokio::time::timeout(timeout, setup).await {
            Ok(set_up) => set_up?,
            Err(_) => return Err(timed_out()),
        }
        Ok(wire)
    }

    /// Sends `cmd` alone and reads its reply (a server error as `Err`).
    pub(super) async fn call(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        self.writer.send(&cmd.get_packed_command()).await?;
        self.reader.read().await?.extract_error()
    }

    /// Sends `bytes` (`count` packed commands) and reads their `count`
    /// replies, server errors among them as values.
    pub(super) async fn exchange(&mut self, bytes: &[u8], count: usize) -> RedisResult<Vec<Value>> {
        self.writer.send(bytes).await?;
        let mut replies = Vec::with_capacity(count);
        for _ in 0..count {
            replies.push(self.reader.read().await?);
        }
        Ok(replies)
    }

    pub(super) fn split(self) -> (Reader, Writer) {
        (self.reader, self.writer)
    }
}

impl Reader {
    /// The next reply: a server error as a value ([`Value::ServerError`]),
    /// `Err` when the connection failed or sent what is not a reply.
    pub(super) async fn read(&mut self) -> RedisResult<Value> {
        redis::parse_redis_value_async(&mut self.decoder, &mut self.half).await
    }
}

impl Writer {
    /// Writes `bytes` (packed commands) and flushes them (TLS buffers).
    pub(super) async fn send(&mut self, bytes: &[u8]) -> RedisResult<()> {
        self.half.write_all(bytes).await?;
        self.half.flush().await?;
        Ok(())
    }
}

/// The stream to `addr`.
async fn open(addr: &ConnectionAddr, tls: Option<Arc<rustls::ClientConfig>>) -> RedisResult<Boxed> {
    let (host, port, secure) = match addr {
        ConnectionAddr::Tcp(host, port) => (host, *port, false),
        ConnectionAddr::TcpTls { host, port, .. } => (host, *port, true),
        other => {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("{other} is not a TCP address: use redis:// or rediss://"),
            )));
        }
    };
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
    tcp.set_nodelay(true)?;
    if !secure {
        return Ok(Box::new(tcp));
    }
    let config = match tls {
        Some(config) => config,
        None => {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a rediss:// address without TLS settings",
            )));
        }
    };
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .map_err(|err| {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{host}` is not a host name for TLS: {err}"),
            ))
        })?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(Box::new(stream))
}
