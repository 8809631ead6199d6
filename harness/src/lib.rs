//! The test harness of `amqp-idempotency`: a benchmark and a fault-injection
//! suite, run against a real RabbitMQ and a real Redis. Not published.
//!
//! ```text
//! cargo run --release -p harness --bin bench -- --messages 100000 --prefetch 256 --payload 64
//! cargo run --release -p harness --bin chaos -- --messages 20000 --duplicates 0.2 --consumers 4 --seed 1
//! ```
//!
//! Each binary documents its options and its JSON output at the top of its
//! `main.rs` (`src/bin/bench/`, `src/bin/chaos/`), and answers `--help`.
//! This library holds what they have in common, the plumbing around the two
//! services:
//!
//! - [`env`](mod@env): the service URLs from the environment, with their defaults;
//! - [`cpu`]: the CPU time of a process, from `/proc/<pid>/stat`;
//! - [`amqp`]: connecting to RabbitMQ, publisher confirms, pointing an AMQP
//!   URL somewhere else;
//! - [`redis_server`]: a private `redis-server` on a free port, which can be
//!   killed and restarted;
//! - [`sentinel`]: a master, its replica and three sentinels on free ports,
//!   and failovers of them;
//! - [`redis_admin`]: `INFO` counters and key clean-up on a Redis in use;
//! - [`proxy`]: a TCP proxy whose connections can all be cut at once;
//! - [`delay_queues`]: the runner's retry delay queues (`{queue}.retry.<delay>`):
//!   their names, what waits in them, their removal after a run.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

pub mod amqp;
pub mod cpu;
pub mod delay_queues;
pub mod env;
pub mod proxy;
pub mod redis_admin;
pub mod redis_server;
pub mod sentinel;

use std::time::Duration;

/// How long connecting to a service may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
