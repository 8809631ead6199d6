//! Consume, then publish, effectively once: an order service that asks a
//! payment service to charge, and a quote service that answers requests,
//! both publishing through the outbox.
//!
//! The program declares its queues (`{prefix}.orders`, `{prefix}.payments`,
//! `{prefix}.quotes`, and a reply queue for its own requests), then runs
//! three idempotent consumers in one process:
//!
//! - **orders**: "places" the order and stages a payment request for
//!   `{prefix}.payments` in its outbox. The request is published only once
//!   the order's done mark is written, with the `message_id`
//!   `{prefix}.orders:{order id}:0`, whatever crashes or duplicates happen.
//! - **payments**: an ordinary consumer of this crate: it deduplicates by
//!   `message_id`, so a payment request that was re-sent is charged once.
//! - **quotes**: an RPC-style service: it stages its answer with
//!   `outbox.reply`; a duplicate request (a client that retried) gets the
//!   stored answer, at its own `reply_to` with its own `correlation_id`,
//!   without computing it again.
//!
//! Then it plays the clients: it sends N orders, **each twice** (a double
//! click), and M quote requests, each twice with a new correlation id (a
//! client retrying after a timeout), and prints what happened. It exits 0
//! when every order was placed once, charged once, and every request was
//! answered twice from one computation.
//!
//! ```text
//! cargo run --example order_pipeline
//! cargo run --example order_pipeline -- --orders 100 --quotes 20
//! ```
//!
//! Options: `--orders N` (default 20), `--quotes M` (default 5),
//! `--timeout SECS` (default 60). Environment: `ORDER_PIPELINE_PREFIX`
//! (default `order_pipeline`), plus `AMQP_URL`, `REDIS_URL`, their TLS files
//! and the `IDEMPOTENCY_*` settings of the README
//! (`IDEMPOTENCY_OUTBOX_MAX_BYTES` among them). Logs go to stderr
//! (`RUST_LOG`, default `warn`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_idempotency::outbox::{OutboxDelivery, OutboxPublisher};
use amqp_idempotency::store::RedisStore;
use amqp_idempotency::{Config, HandlerError, IdempotencyLayer, ServeOptions, amqp, serve};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tower::{Layer, service_fn};

const USAGE: &str = "usage: order_pipeline [--orders N] [--quotes M] [--timeout SECS]";

struct Args {
    orders: u32,
    quotes: u32,
    timeout: Duration,
}

/// What the services did, counted as they do it.
#[derive(Default)]
struct Counts {
    /// Order handler runs, by order id.
    placed: Mutex<BTreeMap<String, u32>>,
    /// Payment handler runs, by payment request id.
    charged: Mutex<BTreeMap<String, u32>>,
    /// Quote computations.
    quoted: AtomicU64,
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logs();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("order_pipeline: {err}");
            ExitCode::from(3)
        }
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        orders: 20,
        quotes: 5,
        timeout: Duration::from_secs(60),
    };
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<u32, String> {
            let value = args
                .next()
                .ok_or_else(|| format!("{name} needs a number"))?;
            value
                .parse()
                .map_err(|_| format!("{name} {value}: not a whole number"))
        };
        match arg.as_str() {
            "--orders" => parsed.orders = number("--orders")?,
            "--quotes" => parsed.quotes = number("--quotes")?,
            "--timeout" => parsed.timeout = Duration::from_secs(u64::from(number("--timeout")?)),
            "-h" | "--help" => return Err("Consume, then publish, effectively once.".into()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(parsed)
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let config = Config::from_env()?;
    let prefix = std::env::var("ORDER_PIPELINE_PREFIX").unwrap_or_else(|_| "order_pipeline".into());
    let (orders, payments, quotes) = (
        format!("{prefix}.orders"),
        format!("{prefix}.payments"),
        format!("{prefix}.quotes"),
    );
    let connection = amqp::connect(&config, ConnectionProperties::default())
        .await
        .map_err(|err| format!("cannot connect to RabbitMQ at {}: {err}", config.amqp_url()))?;
    let client = connection.create_channel().await?;
    for queue in [&orders, &payments, &quotes] {
        client
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        // What an earlier, interrupted run left would blur the counts.
        client
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await?;
    }
    let replies = client
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .name()
        .to_string();
    let store = RedisStore::connect(&config)
        .await
        .map_err(|err| format!("cannot use Redis: {err}"))?;
    let counts = Arc::new(Counts::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);

    // The order service: places the order, stages the payment request.
    let placed = Arc::clone(&counts);
    let payments_queue = payments.clone();
    let order_service = IdempotencyLayer::new(store.clone(), &orders, config.clone())?
        .with_outbox(OutboxPublisher::connect(&config))
        .layer(service_fn(move |incoming: OutboxDelivery| {
            let counts = Arc::clone(&placed);
            let payments = payments_queue.clone();
            async move {
                let order = incoming
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                if let Ok(mut placed) = counts.placed.lock() {
                    *placed.entry(order.clone()).or_default() += 1;
                }
                let request = format!("{{\"order\":\"{order}\",\"cents\":1999}}");
                incoming.outbox.publish(
                    "",
                    &payments,
                    BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                    request,
                )?;
                Ok::<_, HandlerError>(())
            }
        }));

    // The payment service: an ordinary idempotent consumer.
    let charged = Arc::clone(&counts);
    let payment_service = IdempotencyLayer::new(store.clone(), &payments, config.clone())?.layer(
        service_fn(move |delivery: Delivery| {
            let counts = Arc::clone(&charged);
            async move {
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                if let Ok(mut charged) = counts.charged.lock() {
                    *charged.entry(id).or_default() += 1;
                }
                Ok::<_, HandlerError>(())
            }
        }),
    );

    // The quote service: answers requests through the outbox.
    let quoted = Arc::clone(&counts);
    let quote_service = IdempotencyLayer::new(store, &quotes, config.clone())?
        .with_outbox(OutboxPublisher::connect(&config))
        .layer(service_fn(move |incoming: OutboxDelivery| {
            let counts = Arc::clone(&quoted);
            async move {
                counts.quoted.fetch_add(1, Ordering::SeqCst);
                let item = String::from_utf8_lossy(&incoming.delivery.data).into_owned();
                let cents = 100 * item.len();
                incoming.outbox.reply(
                    BasicProperties::default().with_content_type("text/plain".into()),
                    format!("{item}: {cents} cents"),
                )?;
                Ok::<_, HandlerError>(())
            }
        }));

    let mut services = Vec::new();
    for (queue, service) in [
        (orders.clone(), Box::new(order_service) as Box<dyn Runnable>),
        (payments.clone(), Box::new(payment_service)),
        (quotes.clone(), Box::new(quote_service)),
    ] {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(config.prefetch(), BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let options = ServeOptions::from_config(&config)
            .shutdown_on(stopped(stop.clone()))
            .close_channel(channel);
        services.push(service.serve(consumer, options));
    }

    // The clients: every order twice, every quote request twice.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    client
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for n in 0..args.orders {
        let id = format!("order-{run}-{n}");
        for _ in 0..2 {
            let properties = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2);
            publish(&client, &orders, properties, b"{\"item\":\"book\"}").await?;
        }
    }
    let mut asked = BTreeMap::new();
    for n in 0..args.quotes {
        let id = format!("quote-{run}-{n}");
        for attempt in 0..2 {
            let correlation = format!("{id}/try-{attempt}");
            asked.insert(correlation.clone(), id.clone());
            let properties = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_reply_to(replies.as_str().into())
                .with_correlation_id(correlation.as_str().into());
            publish(&client, &quotes, properties, format!("item {n}").as_bytes()).await?;
        }
    }

    // Wait for the replies, then for every order to be charged.
    let answers = collect_replies(&connection, &replies, asked.len(), args.timeout).await?;
    let deadline = Instant::now() + args.timeout;
    while Instant::now() < deadline {
        let charged = counts.charged.lock().map(|c| c.len()).unwrap_or(0);
        if charged >= args.orders as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let late duplicates (there should be none) show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    for service in services {
        let _ = service.await;
    }
    let _ = connection.close(200, "OK".into()).await;

    let placed = counts.placed.lock().map(|p| p.clone()).unwrap_or_default();
    let charged = counts.charged.lock().map(|c| c.clone()).unwrap_or_default();
    let quoted = counts.quoted.load(Ordering::SeqCst);
    let answered: BTreeSet<&String> = answers.iter().map(|(correlation, _)| correlation).collect();
    let same_answer = answers.iter().all(|(correlation, body)| {
        let Some(id) = asked.get(correlation) else {
            return false;
        };
        answers
            .iter()
            .filter(|(other, _)| asked.get(other) == Some(id))
            .all(|(_, other_body)| other_body == body)
    });
    let orders_ok = placed.len() == args.orders as usize && placed.values().all(|n| *n == 1);
    let charges_ok = charged.len() == args.orders as usize && charged.values().all(|n| *n == 1);
    let quotes_ok =
        quoted == u64::from(args.quotes) && answered.len() == asked.len() && same_answer;
    println!(
        "orders: sent {} twice each, placed {} ({} more than once)",
        args.orders,
        placed.len(),
        placed.values().filter(|n| **n > 1).count()
    );
    println!(
        "payments: {} requests charged, {} charged more than once",
        charged.len(),
        charged.values().filter(|n| **n > 1).count()
    );
    println!(
        "quotes: {} requests sent twice each, computed {} times, {} of {} replies received{}",
        args.quotes,
        quoted,
        answered.len(),
        asked.len(),
        if same_answer {
            ", each pair identical"
        } else {
            ", some pairs differ"
        }
    );
    let ok = orders_ok && charges_ok && quotes_ok;
    println!("{}", if ok { "ok: effectively once" } else { "FAILED" });
    Ok(ok)
}

/// A service the runner can serve, boxed so that the three fit one list.
trait Runnable {
    fn serve(
        self: Box<Self>,
        consumer: lapin::Consumer,
        options: ServeOptions,
    ) -> tokio::task::JoinHandle<()>;
}

impl<S> Runnable for S
where
    S: tower::Service<Delivery, Response = amqp_idempotency::Outcome> + Send + 'static,
    S::Error: Into<amqp_idempotency::BoxError>,
    S::Future: Send + 'static,
{
    fn serve(
        self: Box<Self>,
        consumer: lapin::Consumer,
        options: ServeOptions,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if let Err(err) = serve(consumer, *self, options).await {
                eprintln!("a consumer stopped: {err}");
            }
        })
    }
}

async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn publish(
    channel: &Channel,
    queue: &str,
    properties: BasicProperties,
    body: &[u8],
) -> Result<(), Box<dyn std::error::Error>> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?
        .await?;
    Ok(())
}

/// The replies (correlation id, body) that reach `queue`, until `expected`
/// came or `timeout` passed.
async fn collect_replies(
    connection: &Connection,
    queue: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<(String, String)>, Box<dyn std::error::Error>> {
    let channel = connection.create_channel().await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut replies = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while replies.len() < expected {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let Ok(Some(Ok(delivery))) = next else {
            break;
        };
        let correlation = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        replies.push((
            correlation,
            String::from_utf8_lossy(&delivery.data).into_owned(),
        ));
        delivery.ack(BasicAckOptions::default()).await?;
    }
    Ok(replies)
}

fn init_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
