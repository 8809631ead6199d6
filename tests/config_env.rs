//! `Config::from_env` against a real process environment. A test cannot
//! change its own environment safely (`std::env::set_var` is unsafe in
//! edition 2024, and the crate forbids unsafe code), so each case runs this
//! test binary again as a child process, with the environment it needs,
//! where the ignored test `reads_its_own_environment` reports what
//! `Config::from_env` said.

use std::process::Command;

/// Set in the child's environment so the ignored test knows it was started
/// by one of the tests below (not under one of the reserved prefixes).
const CHILD: &str = "AMQP_IDEMPOTENCY_TEST_CHILD";

/// The prefixes whose variables the child must not inherit from whoever
/// runs the tests, so that it sees exactly the case's environment.
const RESERVED: [&str; 5] = [
    "IDEMPOTENCY_",
    "REDIS_TLS_",
    "AMQP_TLS_",
    "REDIS_CLUSTER_",
    "REDIS_SENTINEL_",
];

/// Runs `reads_its_own_environment` in a child with `env` added (and every
/// inherited configuration variable removed); returns its exit success and
/// what it printed.
fn from_env_with(env: &[(&str, &str)]) -> (bool, String) {
    let exe = std::env::current_exe().expect("the test binary's own path");
    let mut command = Command::new(&exe);
    command.args([
        "reads_its_own_environment",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if RESERVED.iter().any(|prefix| name.starts_with(prefix))
            || name == "REDIS_URL"
            || name == "AMQP_URL"
        {
            command.env_remove(name.as_ref());
        }
    }
    command.env(CHILD, "1");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", exe.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The line the child printed about `Config::from_env`'s answer.
fn verdict(text: &str) -> &str {
    text.lines()
        .find(|line| line.starts_with("from_env: "))
        .unwrap_or_else(|| panic!("the child printed no verdict:\n{text}"))
}

#[test]
#[ignore = "run by the other tests of this file, in a child process with the environment they set"]
fn reads_its_own_environment() {
    assert!(
        std::env::var_os(CHILD).is_some(),
        "started directly: this test only reports what Config::from_env says in an environment \
         the other tests of tests/config_env.rs set up"
    );
    match amqp_idempotency::Config::from_env() {
        // On a line of its own: the test harness printed the test's name
        // without a line break.
        Ok(config) => println!(
            "\nfrom_env: ok {:?}",
            (config.min_replicas(), config.replica_timeout())
        ),
        Err(err) => println!("\nfrom_env: refused {} ({err})", err.variable()),
    }
}

#[test]
fn from_env_refuses_a_misspelt_variable_and_names_the_one_meant() {
    let (ran, text) = from_env_with(&[("IDEMPOTENCY_MIN_REPLICA", "1")]);
    assert!(ran, "the child failed:\n{text}");
    let verdict = verdict(&text);
    assert!(
        verdict.starts_with("from_env: refused IDEMPOTENCY_MIN_REPLICA "),
        "IDEMPOTENCY_MIN_REPLICA was accepted without a word: {verdict}"
    );
    assert!(verdict.contains("IDEMPOTENCY_MIN_REPLICAS"), "{verdict}");
}

#[test]
fn from_env_reads_the_variable_spelt_right() {
    let (ran, text) = from_env_with(&[("IDEMPOTENCY_MIN_REPLICAS", "1")]);
    assert!(ran, "the child failed:\n{text}");
    assert_eq!(verdict(&text), "from_env: ok (1, 1s)", "{text}");
}
