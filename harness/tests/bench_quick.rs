//! The benchmark (`src/bin/bench`) in its quick mode: it runs,
//! and its counts are right (no message lost, none processed twice).
//! Timing is never asserted. Needs the local RabbitMQ and Redis.

use std::process::Command;

use serde_json::Value;

/// Runs the benchmark (the binary Cargo built for these tests, debug) with
/// `args` after `--quick` and returns its JSON lines; fails with its stderr
/// if it exits non-zero.
fn bench(args: &[&str]) -> Vec<Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--quick")
        .args(args)
        .output()
        .expect("cannot run the bench binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the harness failed ({}); it needs RabbitMQ (AMQP_URL) and Redis (REDIS_URL)\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line}\nstderr:\n{stderr}"))
        })
        .collect()
}

fn count(line: &Value, key: &str) -> u64 {
    line[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a count in {line}"))
}

/// Checks every variant line and returns (variant names, summary).
fn check(lines: &[Value], published: u64, unique: u64) -> (Vec<String>, Value) {
    let (summary, variants) = lines.split_last().expect("at least the summary line");
    for line in variants {
        let variant = line["variant"].as_str().expect("a variant name");
        assert_eq!(count(line, "published"), published, "{line}");
        assert_eq!(count(line, "unique"), unique, "{line}");
        assert_eq!(count(line, "processed"), unique, "lost messages: {line}");
        let executions = count(line, "executions");
        if variant.starts_with("raw") {
            // No deduplication: every delivery runs once.
            assert_eq!(executions, published, "{line}");
        } else {
            assert_eq!(executions, unique, "double-processed: {line}");
        }
        assert_eq!(count(line, "duplicates"), published - unique, "{line}");
        assert_eq!(line["ok"], Value::Bool(true), "{line}");
        if variant == "ours_outbox" {
            // One outgoing message per unique message, each id once at
            // least (a duplicate may send a not-yet-marked one again).
            assert_eq!(count(line, "outgoing_distinct"), unique, "{line}");
            assert!(count(line, "outgoing_received") >= unique, "{line}");
        } else {
            assert!(line["outgoing_distinct"].is_null(), "{line}");
        }
    }
    for key in [
        "raw_msgs_per_s",
        "ours_msgs_per_s",
        "naive_msgs_per_s",
        "ratio",
        "redis_roundtrips_per_msg",
        "p99_ms",
    ] {
        assert!(summary.get(key).is_some(), "`{key}` missing in {summary}");
    }
    // Added with --pin-redis and bytes_per_done_record: present in every run
    // (null when a figure cannot be had), `pinned` false without the flag.
    for key in [
        "store",
        "pinned",
        "consumer_overhead_us_per_msg",
        "redis_cpu_us_per_msg",
        "broker_cpu_us_per_msg",
        "bytes_per_done_record",
        "outbox_msgs_per_s",
        "outbox_redis_roundtrips_per_msg",
        "raw_consumer_cpu_us_per_msg",
        "redis_floor_cpu_us_per_msg",
    ] {
        assert!(summary.get(key).is_some(), "`{key}` missing in {summary}");
    }
    assert_eq!(summary["pinned"], Value::Bool(false), "{summary}");
    let store = if std::env::var("REDIS_CLUSTER_NODES").is_ok_and(|v| !v.trim().is_empty()) {
        "cluster"
    } else {
        "standalone"
    };
    assert_eq!(summary["store"], Value::String(store.into()), "{summary}");
    for line in variants {
        for key in [
            "consumer_cpu_us_per_msg",
            "redis_server_cpu_us_per_msg",
            "broker_cpu_us_per_msg",
        ] {
            assert!(line.get(key).is_some(), "`{key}` missing in {line}");
        }
    }
    assert_eq!(summary["ok"], Value::Bool(true), "{summary}");
    let names = variants
        .iter()
        .map(|line| line["variant"].as_str().unwrap_or_default().to_owned())
        .collect();
    (names, summary.clone())
}

#[test]
fn quick_run_counts_every_message_once() {
    let lines = bench(&["--messages", "1000"]);
    let (names, summary) = check(&lines, 1000, 1000);
    assert_eq!(
        names,
        [
            "raw_single",
            "raw_multi",
            "naive",
            "redis_floor",
            "ours",
            "ours_outbox"
        ]
    );
    // The consumer CPU of raw multiple-ack and the Redis CPU of the floor
    // variant, both measured in this run: a real count of CPU time, so
    // above zero (1000 messages cost well over a clock tick).
    for key in ["raw_consumer_cpu_us_per_msg", "redis_floor_cpu_us_per_msg"] {
        let value = summary[key]
            .as_f64()
            .unwrap_or_else(|| panic!("`{key}` is not a number in {summary}"));
        assert!(value > 0.0, "`{key}` is not positive in {summary}");
    }
    for key in [
        "raw_msgs_per_s",
        "ours_msgs_per_s",
        "naive_msgs_per_s",
        "outbox_msgs_per_s",
        "outbox_redis_roundtrips_per_msg",
    ] {
        assert!(summary[key].as_f64().is_some(), "{summary}");
    }
}

#[test]
fn quick_run_with_duplicates_suppresses_them() {
    // 10% of the publishes repeat an earlier message id with the same body.
    let lines = bench(&[
        "--messages",
        "1000",
        "--duplicates",
        "0.1",
        "--variants",
        "naive,redis_floor,ours,ours_outbox",
    ]);
    let (names, summary) = check(&lines, 1000, 900);
    assert_eq!(names, ["naive", "redis_floor", "ours", "ours_outbox"]);
    // raw_multi did not run: its figure is there, and null.
    assert!(
        summary["raw_consumer_cpu_us_per_msg"].is_null(),
        "{summary}"
    );
}
