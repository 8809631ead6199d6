//! Runs the fault-injection suite (`src/bin/chaos`) in its CI
//! configuration: 2000 messages, 20% duplicates, 3 consumer processes,
//! seed 7, every fault enabled; debug build.
//!
//! Needs RabbitMQ at `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`)
//! and `redis-server` on the PATH: the suite starts its own Redis on a free
//! port and never touches the shared one.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::amqp::split_amqp_url;
use harness::env::{DEFAULT_AMQP_URL, env_or};

/// Well under the 3 minutes CI allows (Cargo built the binary beforehand).
const LIMIT: Duration = Duration::from_secs(170);

/// Fails (never skips) when the broker does not answer.
fn require_rabbitmq() {
    let url = env_or("AMQP_URL", DEFAULT_AMQP_URL).unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned());
    let address = match split_amqp_url(&url) {
        Ok((address, _, _)) => address,
        Err(err) => panic!("the chaos suite cannot run against this broker: {err}"),
    };
    let reachable = address
        .to_socket_addrs()
        .map_err(|err| err.to_string())
        .and_then(|mut addrs| {
            addrs
                .next()
                .ok_or_else(|| "no address".to_owned())
                .and_then(|addr| {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                        .map_err(|err| err.to_string())
                })
        });
    if let Err(err) = reachable {
        panic!(
            "the chaos suite needs RabbitMQ at {url} ({address} does not answer: {err}); \
             start it with `rabbitmq-server -detached` or set AMQP_URL"
        );
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = pipe.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    })
}

#[test]
fn chaos_suite_loses_nothing_and_explains_every_duplicate() {
    require_rabbitmq();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args([
            "--messages",
            "2000",
            "--duplicates",
            "0.2",
            "--consumers",
            "3",
            "--seed",
            "7",
        ])
        // Its own process group: the suite, its consumers and its
        // redis-server, to kill together if it overruns.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run the chaos binary");
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let status = loop {
        if let Some(status) = child.try_wait().expect("cannot wait for the chaos suite") {
            break status;
        }
        if started.elapsed() > LIMIT {
            // SIGKILL to the whole group: a killed suite cannot stop its
            // consumers and its redis-server itself.
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!("the chaos suite did not finish within {LIMIT:?}\n--- stderr ---\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let context = format!("--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}");
    assert!(
        status.success(),
        "the chaos suite exited with {status}\n{context}"
    );

    let last = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_else(|| panic!("the chaos suite printed nothing on stdout\n{context}"));
    let report: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|err| panic!("the last line is not JSON ({err}): {last}\n{context}"));
    let number = |value: &serde_json::Value, name: &str| {
        value[name]
            .as_u64()
            .unwrap_or_else(|| panic!("`{name}` is missing or not a number in {last}"))
    };
    assert_eq!(number(&report, "messages"), 2000, "{last}");
    assert_eq!(
        number(&report, "lost"),
        0,
        "messages were lost: {last}\n{context}"
    );
    assert_eq!(
        number(&report, "unexplained_duplicates"),
        0,
        "duplicate effects outside the admitted windows: {last}\n{context}"
    );
    assert_eq!(
        number(&report, "duplicate_effects"),
        number(&report, "explained_duplicates") + number(&report, "unexplained_duplicates"),
        "{last}"
    );
    assert!(
        number(&report, "dead_lettered") >= 30,
        "20 poison and 10 fingerprint-less messages must be dead-lettered: {last}"
    );
    assert_eq!(
        number(&report, "overlapping_runs"),
        0,
        "a retry ran beside a timed-out run's work: {last}\n{context}"
    );
    // A plain message dead-lettered for any reason but `crashed` beside a
    // poison-abort message (a store fault, say) fails the suite's exit
    // status, checked above; `plain_dead_lettered` counts them all.
    assert!(report["plain_dead_lettered"].is_u64(), "{last}");
    for kind in [
        "kills",
        "pauses",
        "redis_restarts",
        "redis_cuts",
        "amqp_cuts",
        "redis_ooms",
        "redis_password_flips",
        "redis_readonly",
        "handler_timeouts",
        "poison_aborts",
    ] {
        assert!(
            number(&report["faults"], kind) >= 1,
            "no `{kind}` fault was injected: {last}"
        );
    }
    eprintln!(
        "chaos suite passed in {:.1}s: {last}",
        started.elapsed().as_secs_f64()
    );
}
