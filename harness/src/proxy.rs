//! A TCP proxy on 127.0.0.1:0 in front of a service, whose connections can
//! all be cut at once: how the fault suite drops a consumer's link to Redis
//! or RabbitMQ without touching the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy on 127.0.0.1:0 whose connections can all be cut at once.
/// Dropping it stops accepting and cuts every connection.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    cut: Arc<watch::Sender<u64>>,
    live: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to
    /// `upstream` (`host:port`); a client whose upstream does not answer
    /// within 2s is dropped.
    pub async fn start(upstream: String) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|err| format!("cannot open a proxy port: {err}"))?;
        let addr = listener
            .local_addr()
            .map_err(|err| format!("cannot read the proxy address: {err}"))?;
        let cut = Arc::new(watch::channel(0u64).0);
        let live = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn({
            let cut = Arc::clone(&cut);
            let live = Arc::clone(&live);
            async move {
                loop {
                    let mut client = match listener.accept().await {
                        Ok((client, _)) => client,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    // Subscribed now: only cuts after this moment apply.
                    let mut cuts = cut.subscribe();
                    let upstream = upstream.clone();
                    let live = Arc::clone(&live);
                    tokio::spawn(async move {
                        let connect = TcpStream::connect(upstream.as_str());
                        let Ok(Ok(mut server)) =
                            tokio::time::timeout(Duration::from_secs(2), connect).await
                        else {
                            return; // Upstream down (Redis restarting): drop the client.
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        live.fetch_add(1, Ordering::SeqCst);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cuts.changed() => {}
                        }
                        live.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Ok(Self {
            addr,
            cut,
            live,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every current connection; returns how many there were.
    pub fn cut(&self) -> usize {
        let live = self.live.load(Ordering::SeqCst);
        self.cut.send_modify(|generation| *generation += 1);
        live
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut.send_modify(|generation| *generation += 1);
    }
}
