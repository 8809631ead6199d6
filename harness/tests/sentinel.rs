//! The replicated Redis of the `--failover` suite (`harness::sentinel`)
//! against real servers: a failover that the sentinels start themselves,
//! while the suite waits for one of its own to end, is followed, not
//! waited out until the suite gives up.
//!
//! Needs `redis-server` on the PATH (`redis-sentinel` too, or a
//! `redis-server` that runs as a sentinel with `--sentinel`).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::sentinel::{Failover, FailoverStep, ReplicatedRedis};

fn run_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!("harness-sentinel-{}-{nanos:x}", std::process::id()))
}

#[tokio::test]
async fn a_failover_the_sentinels_start_on_their_own_is_followed_to_its_end() {
    if let Err(err) = harness::sentinel::check_installed() {
        panic!("this test cannot run: {err}");
    }
    let dir = run_dir();
    let mut pair = ReplicatedRedis::start(&dir, "unplanned")
        .await
        .unwrap_or_else(|err| panic!("cannot start the replicated Redis: {err}"));
    let master = pair
        .agreed_master()
        .await
        .unwrap_or_else(|err| panic!("no master after start: {err}"));
    let replica = pair
        .server_ports()
        .into_iter()
        .find(|port| *port != master)
        .expect("a pair has two servers");

    // The suite thinks `master` was just promoted and waits for `replica`
    // to become its replica, while the sentinels fail `master` over
    // themselves (as they do when it stops answering for down-after).
    let mut failover = Failover {
        old: replica,
        new: Some(master),
        killed: Instant::now(),
        promoted: Some(Instant::now()),
    };
    let sentinel = pair.sentinel_ports()[0];
    let client = redis::Client::open(format!("redis://127.0.0.1:{sentinel}"))
        .unwrap_or_else(|err| panic!("sentinel URL: {err}"));
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|err| panic!("cannot reach the sentinel on port {sentinel}: {err}"));
    let () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg("unplanned")
        .query_async(&mut connection)
        .await
        .unwrap_or_else(|err| panic!("SENTINEL FAILOVER refused: {err}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while pair.agreed_master().await != Ok(replica) {
        assert!(
            Instant::now() < deadline,
            "the sentinels did not all name 127.0.0.1:{replica} within 30s of SENTINEL FAILOVER: \
             {:?}; their events: {}",
            pair.masters().await,
            pair.events()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut steps = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let step = pair
            .advance(&mut failover)
            .await
            .unwrap_or_else(|err| panic!("after steps {steps:?}: {err}"));
        if step != FailoverStep::Waiting {
            steps.push(step);
        }
        if step == FailoverStep::Rejoined {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failover did not end within 90s: steps {steps:?}, events {}",
            pair.events()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        steps,
        [FailoverStep::Unplanned(replica), FailoverStep::Rejoined],
        "events: {}",
        pair.events()
    );
    assert_eq!(
        (failover.old, failover.new),
        (master, Some(replica)),
        "the failover names the master the sentinels left and the one they promoted"
    );
    let events = pair.events();
    assert!(
        events.contains("+switch-master unplanned"),
        "the sentinels' events name the switch: {events}"
    );
    pair.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
