//! The layer's own cost per delivery, without a broker or a Redis server:
//! `IdempotencyLayer` over `MemoryStore`, a handler that returns at once,
//! and N fresh deliveries (unique message ids, 64-byte bodies) on one
//! current-thread runtime. It prints the wall time per delivery; under
//! callgrind the instruction count per delivery is repeatable, which the
//! full benchmark (broker, Redis and two shared cores) is not:
//!
//! ```sh
//! cargo run --release -p harness --example layer_cost -- 300000
//! valgrind --tool=callgrind target/release/examples/layer_cost 20000
//! ```
//!
//! `LAYER_COST_LOG=<filter>` (an `EnvFilter`, e.g. `info`) installs a
//! `tracing` fmt subscriber writing to nowhere, to measure what the
//! layer's spans and events cost a deployment that records them.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Instant;

use amqp_idempotency::{Config, IdempotencyLayer, OutcomeKind, store::MemoryStore};
use lapin::BasicProperties;
use lapin::message::Delivery;
use tower::{Layer, Service, ServiceExt, service_fn};

fn main() -> ExitCode {
    if let Ok(directives) = std::env::var("LAYER_COST_LOG") {
        match tracing_subscriber::EnvFilter::try_new(&directives) {
            Ok(filter) => tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::sink)
                .init(),
            Err(err) => {
                eprintln!(
                    "layer_cost: LAYER_COST_LOG=`{directives}` is not a tracing filter ({err}); use e.g. `info`"
                );
                return ExitCode::from(2);
            }
        }
    }
    let deliveries = match std::env::args().nth(1) {
        None => 200_000,
        Some(text) => match text.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("layer_cost: expected a number of deliveries (> 0), got `{text}`");
                return ExitCode::from(2);
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("layer_cost: cannot start a Tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(deliveries)) {
        Ok(per_delivery_us) => {
            println!("{deliveries} deliveries: {per_delivery_us:.2} µs each");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("layer_cost: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(deliveries: u64) -> Result<f64, amqp_idempotency::BoxError> {
    let layer = IdempotencyLayer::new(MemoryStore::new(), "orders", Config::default())?;
    let mut service = layer.layer(service_fn(|_: Delivery| async { Ok::<_, Infallible>(()) }));
    let started = Instant::now();
    for tag in 1..=deliveries {
        let mut delivery = Delivery::mock(tag, "".into(), "orders".into(), false, vec![b'x'; 64]);
        delivery.properties =
            BasicProperties::default().with_message_id(format!("msg-{tag:012}").into());
        let outcome = service.ready().await?.call(delivery).await?;
        if outcome.kind() != OutcomeKind::Processed {
            return Err(format!(
                "delivery {tag} ended as {:?}, not processed",
                outcome.kind()
            )
            .into());
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / deliveries as f64)
}
