//! The seed's `basic_nack.php` consumer, with the idempotency middleware in front.
//!
//! Exactly the PHP demo's topology: a durable direct exchange `router`, a
//! durable queue `msgs` without arguments bound to it with an empty routing
//! key, and the consumer tag `consumer`, declared the way the seed's
//! `amqp_publisher.php` declares them, so the two start in either order.
//! An existing `msgs` is used as it is, whatever its arguments. A message
//! that keeps failing is parked in `msgs.dead`, a queue the runner owns, so
//! it ends up somewhere instead of spinning forever or being dropped.
//!
//! What each body does:
//!
//! - `good` is processed (printed) and acked. A second `good` with the same
//!   fingerprint is acked **without running the handler**. The default
//!   fingerprint is the AMQP `message_id` when present, otherwise a hash of
//!   the body: so two bodies `good` published without a message id ARE
//!   duplicates of each other (for the retention, `IDEMPOTENCY_DONE_TTL`,
//!   24h by default). Give each publish its own `--message-id` to have them
//!   processed separately.
//! - any other body fails as a retryable error: the claim is released and the
//!   message requeued after a growing backoff; after `IDEMPOTENCY_MAX_ATTEMPTS`
//!   attempts (5 by default) it is parked in `msgs.dead`, with headers
//!   saying why (`x-idempotency-reason`; see them in the management UI,
//!   Queues > msgs.dead > Get messages, and move them back with
//!   `amqp-idempotency replay --queue msgs` once fixed).
//! - `quit` is acked as processed, then the consumer is cancelled and the
//!   process exits cleanly (Ctrl-C does the same).
//!
//! Run it, with RabbitMQ and Redis up (`docker-compose up -d redis rabbitmq`,
//! or the local services of DESIGN.md):
//!
//! ```text
//! cargo run --example basic_nack
//! # in another terminal:
//! cargo run --example publisher -- good
//! cargo run --example publisher -- good        # duplicate: acked, handler not run
//! cargo run --example publisher -- bad         # retried, then parked in msgs.dead
//! cargo run --example publisher -- quit
//! # or with the seed's own PHP publisher (Debian: php-cli php-amqplib):
//! php amqp_publisher.php good
//! ```
//!
//! Settings come from the environment (`AMQP_URL`, `REDIS_URL`, with
//! `AMQP_TLS_*` and `REDIS_TLS_*` for `amqps://` and `rediss://`,
//! `IDEMPOTENCY_*`, see the README); `RUST_LOG` tunes the logs, which go to
//! stderr (default `warn,amqp_idempotency=info`).

use std::future::Future;
use std::io::IsTerminal;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use amqp_idempotency::{
    Config, Disposition, HandlerError, IdempotencyLayer, Outcome, OutcomeKind, ServeOptions, serve,
    store::RedisStore,
};
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use tokio::sync::Notify;
use tower::{Layer, Service, service_fn};

const EXCHANGE: &str = "router";
const QUEUE: &str = "msgs";
const CONSUMER_TAG: &str = "consumer";
/// The runner's parking queue for `msgs`: `{queue}.dead`, the default.
const DEAD_LETTER_QUEUE: &str = "msgs.dead";

#[tokio::main]
async fn main() -> ExitCode {
    init_logs();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let config = Config::from_env().map_err(|err| {
        format!("{err}\n       fix or unset that variable (see DESIGN.md for the settings)")
    })?;

    let connection = connect_amqp(&config).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| format!("cannot open a RabbitMQ channel: {err}"))?;
    declare_topology(&connection, &channel).await?;
    channel
        .basic_qos(config.prefetch(), BasicQosOptions::default())
        .await
        .map_err(|err| format!("cannot set the prefetch (basic.qos): {err}"))?;

    let store = RedisStore::connect(&config)
        .await
        .map_err(|err| err.to_string())?;

    // The business handler: the PHP demo's process_message, minus the acks.
    // It never acks or nacks: it says how it went, and the middleware and the
    // runner turn that into ack / requeue / dead-letter after Redis is updated.
    let handler = service_fn(|delivery: Delivery| async move {
        let body = String::from_utf8_lossy(&delivery.data).into_owned();
        match body.as_str() {
            "good" => {
                println!("handler: processing {body:?}");
                Ok(())
            }
            "quit" => {
                println!("handler: {body:?} received, stopping after it is acked");
                Ok(())
            }
            _ => {
                println!("handler: {body:?} is not good: failing, it will be retried");
                Err(HandlerError::retryable(format!(
                    "cannot process {body:?} (only `good` succeeds)"
                )))
            }
        }
    });
    let layer = IdempotencyLayer::new(store, QUEUE, config.clone())
        .map_err(|err| format!("{err}\n       fix or unset that variable"))?;

    // `quit` is watched around the middleware rather than in the handler: a
    // `quit` whose fingerprint is already done (say, from an earlier run of
    // this demo) is acked as a duplicate without running the handler, and it
    // must stop the process all the same.
    let quit = Arc::new(Notify::new());
    let service = Watch {
        inner: layer.layer(handler),
        quit: Arc::clone(&quit),
    };

    let consumer = channel
        .basic_consume(
            QUEUE.into(),
            CONSUMER_TAG.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("cannot consume from queue `{QUEUE}`: {err}"))?;
    println!(
        "waiting for messages on `{QUEUE}` (exchange `{EXCHANGE}`); publish with \
         `cargo run --example publisher -- good`, stop with `quit` or Ctrl-C"
    );

    let stop = async move {
        tokio::select! {
            () = quit.notified() => {}
            _ = tokio::signal::ctrl_c() => println!("Ctrl-C: stopping"),
        }
    };
    // Dead letters are parked in `msgs.dead` (the default, `{queue}.dead`)
    // with headers saying why (x-idempotency-outcome, x-idempotency-reason,
    // x-idempotency-attempts), each at most 1 KiB, the copy within the
    // connection's frame_max; if the broker does not confirm the copy, the
    // original is requeued, never dropped.
    let options = ServeOptions::from_config(&config)
        .shutdown_on(stop)
        .frame_max(connection.configuration().frame_max())
        .close_channel(channel);
    let report = serve(consumer, service, options)
        .await
        .map_err(|err| err.to_string())?;
    println!(
        "stopped: acked {}, requeued {}, dead-lettered {}, unsettled {}, abandoned {}",
        report.acked, report.requeued, report.dead_lettered, report.unsettled, report.abandoned
    );
    if let Err(err) = connection.close(200, "OK".into()).await {
        eprintln!("warning: closing the RabbitMQ connection failed: {err}");
    }
    Ok(())
}

/// The seed's topology, declared as `amqp_publisher.php` declares it. An
/// existing `msgs` is left as it is: it is looked up first (passively, on a
/// channel of its own, since a miss closes the channel) and only declared
/// when absent.
async fn declare_topology(connection: &Connection, channel: &lapin::Channel) -> Result<(), String> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(|err| declare_error("exchange", EXCHANGE, &err))?;
    let probe = connection
        .create_channel()
        .await
        .map_err(|err| format!("cannot open a RabbitMQ channel: {err}"))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let exists = probe
        .queue_declare(QUEUE.into(), passive, FieldTable::default())
        .await
        .is_ok();
    if probe.status().connected() {
        let _ = probe.close(200, "OK".into()).await;
    }
    if !exists {
        channel
            .queue_declare(
                QUEUE.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| declare_error("queue", QUEUE, &err))?;
    }
    channel
        .queue_bind(
            QUEUE.into(),
            EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| format!("cannot bind `{QUEUE}` to `{EXCHANGE}`: {err}"))?;
    Ok(())
}

fn is_precondition_failed(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

fn declare_error(what: &str, name: &str, err: &lapin::Error) -> String {
    if is_precondition_failed(err) {
        format!(
            "{what} `{name}` already exists with other settings: {err}; this demo uses the \
             seed's (durable, direct): point it at another virtual host in AMQP_URL, or \
             compare the settings with `rabbitmqctl list_exchanges name type durable`"
        )
    } else {
        format!("cannot declare {what} `{name}`: {err}")
    }
}

/// Wraps the idempotency service: prints what happened to each delivery and
/// asks for shutdown once a `quit` message is settled for good.
#[derive(Clone)]
struct Watch<S> {
    inner: S,
    quit: Arc<Notify>,
}

impl<S> Service<Delivery> for Watch<S>
where
    S: Service<Delivery, Response = Outcome>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Keeps the middleware's back-pressure: while Redis is down it is not
        // ready, and the runner stops taking deliveries.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let body = String::from_utf8_lossy(&delivery.data).into_owned();
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string());
        let redelivered = delivery.redelivered;
        let call = self.inner.call(delivery);
        let quit = Arc::clone(&self.quit);
        Box::pin(async move {
            let result = call.await;
            if let Ok(outcome) = &result {
                report(&body, message_id.as_deref(), redelivered, outcome);
                let acked = outcome.disposition() == Disposition::Ack;
                if body == "quit" && acked {
                    // notify_one keeps the permit if the runner is not waiting yet.
                    quit.notify_one();
                }
            }
            result
        })
    }
}

fn report(body: &str, message_id: Option<&str>, redelivered: bool, outcome: &Outcome) {
    let action = match outcome.disposition() {
        Disposition::Ack => "ack".to_string(),
        Disposition::Requeue { after } => format!("requeue in {}", human(after)),
        Disposition::DeadLetter => {
            format!("dead-letter -> parked in {DEAD_LETTER_QUEUE}")
        }
    };
    let note = match outcome.kind() {
        OutcomeKind::Processed => "handler ran, done mark written",
        OutcomeKind::Duplicate => "duplicate of a processed message, handler NOT run",
        OutcomeKind::Retry => "handler failed, claim released",
        OutcomeKind::AttemptsExhausted => "handler kept failing (IDEMPOTENCY_MAX_ATTEMPTS)",
        OutcomeKind::InProgressElsewhere => "another consumer is processing it",
        OutcomeKind::StoreUnavailable => "Redis unreachable, handler NOT run",
        _ => "",
    };
    let id = message_id.map_or_else(String::new, |id| format!(" message_id={id:?}"));
    let again = if redelivered { " (redelivered)" } else { "" };
    let attempt = match outcome.attempt() {
        0 => String::new(),
        n => format!(" attempt {n}"),
    };
    let reason = outcome
        .reason()
        .map_or_else(String::new, |reason| format!(": {reason}"));
    println!(
        "{body:?}{id}{again}: {kind}{attempt} -> {action} ({note}){reason}",
        kind = outcome.kind()
    );
}

fn human(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// Connects as `AMQP_URL` says, with `AMQP_TLS_*` for `amqps://`.
async fn connect_amqp(config: &Config) -> Result<Connection, String> {
    let connect = amqp_idempotency::amqp::connect(config, ConnectionProperties::default());
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) if err.is_io() => Err(format!(
            "{err}\n       start it (`rabbitmq-server -detached`, or \
             `docker-compose up -d rabbitmq`) or set AMQP_URL"
        )),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("RabbitMQ (AMQP_URL) did not answer within 10s; check AMQP_URL and that the broker is up".to_owned()),
    }
}

fn init_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,amqp_idempotency=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
