//! The layer's own cost per delivery, without a broker: `IdempotencyLayer`
//! and a handler that returns at once, over N fresh deliveries (unique
//! message ids, 64-byte bodies) on one current-thread runtime.
//!
//! - By default the store is `MemoryStore` and the deliveries run one at a
//!   time: the layer alone. Under callgrind its instruction count per
//!   delivery is repeatable, which the full benchmark (broker, Redis and
//!   two shared cores) is not.
//! - With `--redis`, the store is `RedisStore` on `REDIS_URL` (default
//!   `redis://127.0.0.1:6379`) and 256 deliveries run at once, as under a
//!   prefetch of 256, so that requests share pipelines: the layer plus the
//!   Redis client, still without a broker. Its records live under the key
//!   prefix `layer-cost-<pid>` and expire after a minute.
//!
//! It prints the wall time and this process's CPU time per delivery:
//!
//! ```sh
//! cargo run --release -p harness --example layer_cost -- 300000
//! cargo run --release -p harness --example layer_cost -- 300000 --redis
//! valgrind --tool=callgrind target/release/examples/layer_cost 20000
//! ```
//!
//! `LAYER_COST_LOG=<filter>` (an `EnvFilter`, e.g. `info`) installs a
//! `tracing` fmt subscriber writing to nowhere, to measure what the
//! layer's spans and events cost a deployment that records them.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use amqp_idempotency::store::{MemoryStore, RedisStore, Store};
use amqp_idempotency::{BoxError, Config, IdempotencyLayer, OutcomeKind};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use harness::cpu::{process_ticks, ticks_us};
use lapin::BasicProperties;
use lapin::message::Delivery;
use tower::{Layer, Service, ServiceExt, service_fn};

/// Deliveries under way at once with `--redis`.
const IN_FLIGHT: u64 = 256;

fn main() -> ExitCode {
    let mut deliveries = 200_000;
    let mut redis = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--redis" => redis = true,
            text => match text.parse::<u64>() {
                Ok(n) if n > 0 => deliveries = n,
                _ => {
                    eprintln!(
                        "layer_cost: expected a number of deliveries (> 0) or --redis, got `{text}`"
                    );
                    return ExitCode::from(2);
                }
            },
        }
    }
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
    let measured = runtime.block_on(async {
        if redis {
            let url =
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
            let store = RedisStore::connect_url(&url)
                .await
                .map_err(|err| format!("cannot use REDIS_URL={url}: {err}"))?;
            let config = Config::default()
                .with_key_prefix(format!("layer-cost-{}", std::process::id()))
                .with_done_ttl(Duration::from_secs(60));
            run(store, config, deliveries, IN_FLIGHT).await
        } else {
            run(MemoryStore::new(), Config::default(), deliveries, 1).await
        }
    });
    match measured {
        Ok((wall_us, cpu_us)) => {
            let cpu = cpu_us.map_or_else(|| "unknown".to_owned(), |us| format!("{us:.2} µs"));
            println!("{deliveries} deliveries: {wall_us:.2} µs each, CPU {cpu} each");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("layer_cost: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `deliveries` through the layer, `in_flight` at a time; the wall
/// time and the process's CPU time per delivery, in µs.
async fn run<St: Store + Clone>(
    store: St,
    config: Config,
    deliveries: u64,
    in_flight: u64,
) -> Result<(f64, Option<f64>), BoxError> {
    let layer = IdempotencyLayer::new(store, "orders", config)?;
    let mut service = layer.layer(service_fn(|_: Delivery| async { Ok::<_, Infallible>(()) }));
    let cpu_before = process_ticks();
    let started = Instant::now();
    let mut running = FuturesUnordered::new();
    let mut next = 1;
    while next <= deliveries || !running.is_empty() {
        while next <= deliveries && (running.len() as u64) < in_flight {
            let tag = next;
            next += 1;
            let mut delivery =
                Delivery::mock(tag, "".into(), "orders".into(), false, vec![b'x'; 64]);
            delivery.properties =
                BasicProperties::default().with_message_id(format!("msg-{tag:012}").into());
            let call = service.ready().await?.call(delivery);
            if tag == 1 {
                // What each delivery's future weighs: it is boxed, and
                // moved and polled for the delivery's whole life.
                println!(
                    "one delivery's future: {} bytes (a Delivery: {} bytes)",
                    std::mem::size_of_val(&*call),
                    std::mem::size_of::<Delivery>()
                );
            }
            running.push(async move { (tag, call.await) });
        }
        if let Some((tag, outcome)) = running.next().await {
            let kind = outcome?.kind();
            if kind != OutcomeKind::Processed {
                return Err(format!("delivery {tag} ended as {kind:?}, not processed").into());
            }
        }
    }
    let wall_us = started.elapsed().as_secs_f64() * 1e6 / deliveries as f64;
    let cpu_us = ticks_us(cpu_before, process_ticks()).map(|us| us / deliveries as f64);
    Ok((wall_us, cpu_us))
}
