//! Runs `examples/order_pipeline.rs` end to end against the real RabbitMQ
//! and Redis (`AMQP_URL`, `REDIS_URL`, defaults on 127.0.0.1), through
//! `cargo run --example`, and checks what it prints: every order placed
//! and charged once although each was sent twice, and every quote request
//! answered twice from one computation.

mod common;

use std::process::Command;

#[test]
fn the_order_pipeline_places_charges_and_quotes_effectively_once() {
    let prefix = common::unique("order_pipeline");
    let output = Command::new(env!("CARGO"))
        .args([
            "run",
            "--quiet",
            "--example",
            "order_pipeline",
            "--",
            "--orders",
            "12",
            "--quotes",
            "4",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ORDER_PIPELINE_PREFIX", &prefix)
        .env("IDEMPOTENCY_DONE_TTL", "10m")
        // Its queues are new on every run: no delay queues to leave behind
        // (tests/retry.rs covers retries through the broker).
        .env("IDEMPOTENCY_RETRY", "hold")
        .output()
        .unwrap_or_else(|err| panic!("cannot run the example: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Leave nothing behind, whatever the result.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the clean-up");
    runtime.block_on(async {
        let connection = common::amqp().await;
        if let Ok(channel) = connection.create_channel().await {
            for queue in ["orders", "payments", "quotes"] {
                let _ = channel
                    .queue_delete(
                        format!("{prefix}.{queue}").as_str().into(),
                        Default::default(),
                    )
                    .await;
            }
        }
        let _ = connection.close(200, "OK".into()).await;
    });
    assert!(
        output.status.success(),
        "the example failed ({:?}); it needs RabbitMQ at AMQP_URL and Redis at REDIS_URL.\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status.code()
    );
    assert!(
        stdout.contains("orders: sent 12 twice each, placed 12 (0 more than once)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("payments: 12 requests charged, 0 charged more than once"),
        "{stdout}"
    );
    assert!(
        stdout.contains("computed 4 times, 8 of 8 replies received, each pair identical"),
        "{stdout}"
    );
    assert!(stdout.contains("ok: effectively once"), "{stdout}");
}
