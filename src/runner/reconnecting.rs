//! [`serve_reconnecting`](super::serve_reconnecting): serving across lost broker connections.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::watch;
use tower::Service;

use super::CLOSE_TIMEOUT;
use super::consume::run;
use super::options::ServeOptions;
use super::shutdown::stop_signal;
use crate::backoff::Backoff;
use crate::error::{BoxError, ServeError};
use crate::outcome::Outcome;
use crate::report::{ServeReport, Tally};

/// A consumer and what keeps it alive, as returned by the `connect`
/// closure of [`serve_reconnecting`](super::serve_reconnecting).
#[derive(Debug)]
pub struct Session {
    /// The connection; closed when the session ends.
    pub connection: Connection,
    /// The channel the consumer runs on; closed when the session ends.
    pub channel: Channel,
    /// The consumer to serve.
    pub consumer: Consumer,
}

/// Like [`serve`](super::serve), but survives the loss of the broker connection.
///
/// `connect` opens a connection and a channel, sets QoS and starts the
/// consumer (the queue is yours: it need not be declared here); it is called
/// again, with a growing delay (100ms doubling up to 10s), whenever the
/// connection or channel fails. Handlers still running when their channel
/// died get the shutdown deadline to finish and write their Redis state,
/// but their deliveries are not acked on the new channel (their tags are
/// invalid there): the broker redelivers them, and the redelivered copies
/// are recognised as done.
///
/// ```no_run
/// use std::convert::Infallible;
/// use amqp_idempotency::{serve_reconnecting, Config, IdempotencyLayer, ServeOptions, Session, store::RedisStore};
/// use lapin::{options::*, types::FieldTable, Connection, ConnectionProperties};
/// use tower::{Layer, service_fn};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::from_env()?;
/// let store = RedisStore::connect(&config).await?;
/// let service = IdempotencyLayer::new(store, "orders", config.clone())?
///     .layer(service_fn(|_delivery| async { Ok::<_, Infallible>(()) }));
/// let url = config.amqp_url().to_owned();
/// let prefetch = config.prefetch();
/// serve_reconnecting(
///     move || {
///         let url = url.clone();
///         async move {
///             let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
///             let channel = connection.create_channel().await?;
///             channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
///             let consumer = channel.basic_consume("orders".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
///             Ok(Session { connection, channel, consumer })
///         }
///     },
///     service,
///     ServeOptions::from_config(&config),
/// )
/// .await?;
/// # Ok(())
/// # }
/// ```
pub async fn serve_reconnecting<C, Fut, S>(
    mut connect: C,
    service: S,
    options: ServeOptions,
) -> Result<ServeReport, ServeError>
where
    C: FnMut() -> Fut + Send,
    Fut: std::future::Future<Output = Result<Session, lapin::Error>> + Send,
    S: Service<Delivery, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let reconnecting = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let ServeOptions {
        concurrency,
        shutdown,
        signals,
        shutdown_deadline,
        dead_letters,
        channel: _,
        close_channel: _,
        frame_max: _,
        retry,
        retry_schedule,
    } = options;
    let shutdown = stop_signal(shutdown, signals);
    // One stop signal shared by every session.
    let (stop_tx, stop) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    // One tally for every session, so that handlers of a lost session that
    // finish in the background still count.
    let tally = Arc::new(Tally::default());
    let mut finishing = Vec::new();
    let mut backoff = reconnecting;
    let mut sessions = 0u64;
    let outcome = loop {
        if *stop.borrow() {
            break Ok(());
        }
        let session = tokio::select! {
            session = connect() => session,
            () = stopped(stop.clone()) => break Ok(()),
        };
        let Session {
            connection,
            channel,
            consumer,
        } = match session {
            Ok(session) => session,
            Err(err) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %err, ?retry_in, "cannot connect to RabbitMQ or declare the topology; retrying");
                tokio::select! {
                    () = tokio::time::sleep(retry_in) => {}
                    () = stopped(stop.clone()) => break Ok(()),
                }
                continue;
            }
        };
        if sessions > 0 {
            tally.add(|r| r.reconnects += 1);
            tracing::info!("reconnected to RabbitMQ: consuming again");
        }
        sessions += 1;
        backoff = reconnecting;
        let options = ServeOptions {
            concurrency,
            shutdown: Some(Box::pin(stopped(stop.clone()))),
            signals: false,
            shutdown_deadline,
            dead_letters: dead_letters.clone(),
            channel: Some(channel),
            close_channel: true,
            frame_max: Some(connection.configuration().frame_max()),
            retry,
            retry_schedule: retry_schedule.clone(),
        };
        let (result, background) =
            run(consumer, service.clone(), options, Arc::clone(&tally)).await;
        finishing.extend(background);
        // A dead connection may never answer the close: bounded.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "OK".into())).await;
        let retry_in = backoff.next_delay();
        match result {
            Ok(()) if *stop.borrow() => break Ok(()),
            Ok(()) => tracing::warn!("the broker cancelled the consumer; reconnecting"),
            Err(ServeError::Consumer(err)) => {
                tracing::warn!(error = %err, ?retry_in, "lost the RabbitMQ connection; reconnecting");
            }
            Err(err) => break Err(err),
        }
        tokio::select! {
            () = tokio::time::sleep(retry_in) => {}
            () = stopped(stop.clone()) => break Ok(()),
        }
    };
    watcher.abort();
    // Handlers of lost sessions finish (each within the shutdown deadline).
    for background in finishing {
        let _ = background.await;
    }
    outcome.map(|()| tally.snapshot())
}
