//! The report: progress lines on stderr (stamped with the time since the
//! start), and at the end the numbers (lost messages, duplicate effects and
//! their explanations, dead letters, faults injected, and with `--outbox`
//! the outgoing messages) with the one JSON line on stdout.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::classify::classify_duplicates;
use crate::faults::Fault;
use crate::messages::{Injected, Plan};
use crate::options::{Options, retry_name};
use crate::tally::Tally;
use crate::topology::{DeadLetters, Downstream};

/// Progress on stderr, stamped with the time since the start.
pub struct Clock(Instant);

impl Clock {
    /// Starts counting now.
    pub fn start() -> Self {
        Self(Instant::now())
    }

    pub fn say(&self, message: impl std::fmt::Display) {
        eprintln!("[{:7.1}s] {message}", self.0.elapsed().as_secs_f64());
    }
}

/// What a finished run leaves to judge.
pub struct Findings<'a> {
    pub options: &'a Options,
    pub plan: &'a Plan,
    /// The messages faults published (`handler-timeout`, `poison-abort`).
    pub injected: &'a Injected,
    pub tally: &'a Tally,
    pub dead: &'a DeadLetters,
    /// What the downstream queue held at the end (`--outbox` only).
    pub downstream: Option<&'a Downstream>,
    /// The consumers' idempotency scope (the queue): the first part of the
    /// outbox's `message_id`s.
    pub scope: &'a str,
    /// Messages still in the queue after the consumers stopped.
    pub left: u32,
    /// Consumer processes that exited on their own.
    pub crashes: u64,
    /// Faults injected, by [`Fault::index`].
    pub counts: [u64; Fault::ALL.len()],
    /// Consumers that had to be killed at the end: (pid, log).
    pub forced: &'a [(u32, PathBuf)],
    /// The run directory: removed when the run passed, unless `--keep`.
    pub dir: &'a Path,
}

/// Prints the numbers and the JSON line; returns whether the run passed
/// (nothing lost, every duplicate effect explained).
pub fn conclude(findings: Findings<'_>, clock: &Clock) -> bool {
    let Findings {
        options,
        plan,
        injected,
        tally,
        dead,
        downstream,
        scope,
        left,
        crashes,
        counts,
        forced,
        dir,
    } = findings;
    let unique = plan.unique() + injected.count();
    let mut lost_ids = Vec::new();
    for id in plan
        .plain
        .iter()
        .chain(&plan.transient)
        .chain(&plan.no_fingerprint)
        .chain(&injected.slow)
    {
        if !tally.effects.contains_key(id) && !dead.ids.contains_key(id) {
            lost_ids.push(id.clone());
        }
    }
    // A message that aborts its consumer ends in the dead-letter queue.
    for id in &injected.abort {
        if !dead.ids.contains_key(id) {
            lost_ids.push(id.clone());
        }
    }
    let poison_missing: Vec<&String> = plan
        .poison
        .iter()
        .filter(|id| !dead.ids.contains_key(*id))
        .collect();
    let plain_dead: Vec<&String> = plan
        .plain
        .iter()
        .chain(&plan.transient)
        .chain(&injected.slow)
        .filter(|id| dead.ids.contains_key(*id))
        .collect();
    // A plain message in flight beside a poison message that aborted its
    // consumer can run out of attempts with it (`crashed`): explained. Any
    // other plain dead letter (a store fault dead-lettering, say) fails.
    let plain_dead_unexplained: Vec<&String> = plain_dead
        .iter()
        .copied()
        .filter(|id| {
            dead.outcome_of.get(*id).map(String::as_str) != Some("crashed")
                || injected.abort.is_empty()
        })
        .collect();
    let overlaps = tally.overlapping_work();
    let duplicates = classify_duplicates(tally);
    let outgoing = downstream.map(|downstream| {
        // Every plain and timed-out message that was not dead-lettered had
        // a handler run that succeeded: exactly one outgoing message each.
        let must_succeed = plan
            .plain
            .iter()
            .chain(&plan.transient)
            .chain(&injected.slow)
            .filter(|id| !dead.ids.contains_key(*id));
        Outgoing::count(downstream, scope, must_succeed)
    });
    let executions = tally.effect_lines + tally.fail_lines;
    let retried = |via: &str| tally.retried.get(via).copied().unwrap_or(0);
    let retried_through_broker = retried("broker");
    // Transient messages that took effect, and how many of them failed first.
    let transient_done = plan
        .transient
        .iter()
        .filter(|id| tally.effects.contains_key(*id))
        .count();

    clock.say(format!(
        "ledger: {} consumer processes, {} effects, {} poison failures, outcomes {:?}, {} unreadable lines",
        tally.processes, tally.effect_lines, tally.fail_lines, tally.outcome_kinds, tally.garbled
    ));
    clock.say(format!(
        "dead-letter queue: {} messages ({} poison of {}, {} without fingerprint of {}, {} plain), by outcome {:?}",
        dead.total,
        plan.poison.iter().filter(|id| dead.ids.contains_key(*id)).count(),
        plan.poison.len(),
        plan.no_fingerprint
            .iter()
            .filter(|id| dead.ids.contains_key(*id))
            .count(),
        plan.no_fingerprint.len(),
        plain_dead.len(),
        dead.outcomes
    ));
    clock.say(format!(
        "retries ({}): {retried_through_broker} copies confirmed in the delay queues, {} deliveries held then requeued; transient messages: {transient_done} of {} took effect",
        retry_name(options.retry),
        retried("hold"),
        plan.transient.len(),
    ));
    if options.retry == amqp_idempotency::RetryMode::Hold && retried_through_broker > 0 {
        clock.say(format!(
            "WARNING: {retried_through_broker} retry copies went through the broker although the consumers hold"
        ));
    }
    if left > 0 {
        clock.say(format!(
            "WARNING: {left} messages were left in the queue after the consumers stopped"
        ));
    }
    if !poison_missing.is_empty() {
        clock.say(format!(
            "WARNING: {} poison messages never reached the dead-letter queue: {:?}",
            poison_missing.len(),
            &poison_missing[..poison_missing.len().min(10)]
        ));
    }
    if !plain_dead.is_empty() {
        clock.say(format!(
            "note: plain messages dead-lettered: {:?}",
            &plain_dead[..plain_dead.len().min(10)]
        ));
    }
    if !plain_dead_unexplained.is_empty() {
        clock.say(format!(
            "FAILED: {} plain messages dead-lettered with no poison to explain it, e.g. {:?}",
            plain_dead_unexplained.len(),
            &plain_dead_unexplained[..plain_dead_unexplained.len().min(10)]
        ));
    }
    if !injected.slow.is_empty() {
        clock.say(format!(
            "handler timeouts: {} messages timed out with their work going on; {} overlapping runs",
            injected.slow.len(),
            overlaps.len()
        ));
    }
    for overlap in overlaps.iter().take(10) {
        clock.say(format!("OVERLAP {overlap}"));
    }
    if !injected.abort.is_empty() {
        clock.say(format!(
            "poison aborts: {} messages aborted {} consumer runs, {} of them dead-lettered as crashed",
            injected.abort.len(),
            tally.abort_lines,
            injected
                .abort
                .iter()
                .filter(|id| dead.outcome_of.get(*id).map(String::as_str) == Some("crashed"))
                .count()
        ));
    }
    if !lost_ids.is_empty() {
        clock.say(format!(
            "LOST {} messages, e.g. {:?}",
            lost_ids.len(),
            &lost_ids[..lost_ids.len().min(10)]
        ));
    }
    clock.say(format!(
        "duplicate effects: {} ({} explained: {:?}; {} unexplained)",
        duplicates.total, duplicates.explained, duplicates.reasons, duplicates.unexplained
    ));
    if options.failover {
        clock.say(format!(
            "failovers: {} ({} completed, {} of them started by the sentinels on their own); min_replicas {}; unexplained duplicates after a done mark lost in a failover: {}",
            counts[Fault::Failover.index()],
            tally.failovers.len(),
            tally.unplanned_failovers,
            options.min_replicas,
            duplicates.lost_in_failover
        ));
    }
    if duplicates.misreported > 0 {
        clock.say(format!(
            "note: {} executions were reported `processed` although their process was stopped past the lease between effect and done mark",
            duplicates.misreported
        ));
    }
    for example in &duplicates.examples {
        clock.say(format!("UNEXPLAINED duplicate {example}"));
    }
    if duplicates.unmatched > 0 {
        clock.say(format!(
            "WARNING: {} duplicates are explained by a lost lease or an unwritten done mark although no pause or Redis outage overlapped that execution, e.g. {:?}",
            duplicates.unmatched, duplicates.unmatched_examples
        ));
    }
    if let Some(outgoing) = &outgoing {
        outgoing.say(clock);
    }
    let unexpected_crashes = crashes.saturating_sub(tally.abort_lines);
    if unexpected_crashes > 0 {
        clock.say(format!(
            "WARNING: {unexpected_crashes} consumer processes exited on their own (besides the poison aborts)"
        ));
    }

    let passed = lost_ids.is_empty()
        && duplicates.unexplained == 0
        && overlaps.is_empty()
        && plain_dead_unexplained.is_empty()
        && outgoing.as_ref().is_none_or(Outgoing::complete);
    if passed && !options.keep && forced.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        clock.say(format!("run directory kept: {}", dir.display()));
    }
    clock.say(format!(
        "{} in {:.1}s",
        if passed { "PASSED" } else { "FAILED" },
        clock.0.elapsed().as_secs_f64()
    ));
    let faults = Fault::ALL
        .iter()
        .map(|f| format!("\"{}\":{}", f.json_name(), counts[f.index()]))
        .collect::<Vec<_>>()
        .join(",");
    let count = |field: fn(&Outgoing) -> usize| {
        outgoing
            .as_ref()
            .map_or_else(|| "null".to_owned(), |o| field(o).to_string())
    };
    println!(
        "{{\"messages\":{},\"retry\":\"{}\",\"unique\":{unique},\"executions\":{executions},\"lost\":{},\"duplicate_effects\":{},\"explained_duplicates\":{},\"unexplained_duplicates\":{},\"dead_lettered\":{},\"faults\":{{{faults}}},\"overlapping_runs\":{},\"plain_dead_lettered\":{},\"min_replicas\":{},\"outgoing_expected\":{},\"outgoing_distinct\":{},\"outgoing_lost\":{},\"transient\":{},\"retried_through_broker\":{retried_through_broker}}}",
        options.messages,
        retry_name(options.retry),
        lost_ids.len(),
        duplicates.total,
        duplicates.explained,
        duplicates.unexplained,
        dead.total,
        overlaps.len(),
        plain_dead.len(),
        options.min_replicas,
        count(|o| o.expected),
        count(|o| o.distinct),
        count(|o| o.lost.len()),
        plan.transient.len(),
    );
    passed
}

/// The outgoing messages of an `--outbox` run, counted by `message_id`.
struct Outgoing {
    /// Messages whose handler succeeded: each must have sent one.
    expected: usize,
    /// Distinct `message_id`s received downstream.
    distinct: usize,
    /// Copies received, all ids together.
    received: usize,
    /// Expected ids never received.
    lost: Vec<String>,
    /// Ids received that no successful handler run staged (a failed run's
    /// message, or one staged after the handler returned).
    unexpected: Vec<String>,
    /// Messages received without a `message_id`.
    without_id: usize,
}

impl Outgoing {
    /// The outbox names the first message a delivery staged
    /// `{scope}:{fingerprint}:0`; the suite's fingerprint is its id (the
    /// incoming `message_id`, kept verbatim).
    fn count<'a>(
        downstream: &Downstream,
        scope: &str,
        must_succeed: impl Iterator<Item = &'a String>,
    ) -> Self {
        let expected: HashSet<String> = must_succeed.map(|id| format!("{scope}:{id}:0")).collect();
        let mut lost: Vec<String> = expected
            .iter()
            .filter(|id| !downstream.ids.contains_key(*id))
            .cloned()
            .collect();
        lost.sort();
        let mut unexpected: Vec<String> = downstream
            .ids
            .keys()
            .filter(|id| !expected.contains(*id))
            .cloned()
            .collect();
        unexpected.sort();
        Self {
            expected: expected.len(),
            distinct: downstream.ids.len(),
            received: downstream.total,
            lost,
            unexpected,
            without_id: downstream.without_id,
        }
    }

    /// Every expected message arrived, and nothing else did.
    fn complete(&self) -> bool {
        self.lost.is_empty() && self.distinct == self.expected && self.without_id == 0
    }

    fn say(&self, clock: &Clock) {
        clock.say(format!(
            "outbox: {} messages downstream, {} distinct message ids ({} copies beyond the first), {} expected",
            self.received,
            self.distinct,
            self.received - self.distinct.min(self.received) - self.without_id.min(self.received),
            self.expected
        ));
        if !self.lost.is_empty() {
            clock.say(format!(
                "LOST {} outgoing messages, e.g. {:?}",
                self.lost.len(),
                &self.lost[..self.lost.len().min(10)]
            ));
        }
        if !self.unexpected.is_empty() {
            clock.say(format!(
                "FAILED: {} outgoing messages that no successful handler run staged, e.g. {:?}",
                self.unexpected.len(),
                &self.unexpected[..self.unexpected.len().min(10)]
            ));
        }
        if self.without_id > 0 {
            clock.say(format!(
                "FAILED: {} downstream messages without a message_id",
                self.without_id
            ));
        }
    }
}
