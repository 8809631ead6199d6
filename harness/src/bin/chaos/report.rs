//! The report: progress lines on stderr (stamped with the time since the
//! start), and at the end the numbers (lost messages, duplicate effects and
//! their explanations, dead letters, faults injected) with the one JSON line
//! on stdout.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::classify::classify_duplicates;
use crate::faults::Fault;
use crate::messages::{Injected, Plan};
use crate::options::Options;
use crate::tally::Tally;
use crate::topology::DeadLetters;

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
    let executions = tally.effect_lines + tally.fail_lines;

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
            "failovers: {} ({} completed); min_replicas {}; unexplained duplicates after a done mark lost in a failover: {}",
            counts[Fault::Failover.index()],
            tally.failovers.len(),
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
    let unexpected_crashes = crashes.saturating_sub(tally.abort_lines);
    if unexpected_crashes > 0 {
        clock.say(format!(
            "WARNING: {unexpected_crashes} consumer processes exited on their own (besides the poison aborts)"
        ));
    }

    let passed = lost_ids.is_empty()
        && duplicates.unexplained == 0
        && overlaps.is_empty()
        && plain_dead_unexplained.is_empty();
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
    println!(
        "{{\"messages\":{},\"unique\":{unique},\"executions\":{executions},\"lost\":{},\"duplicate_effects\":{},\"explained_duplicates\":{},\"unexplained_duplicates\":{},\"dead_lettered\":{},\"faults\":{{{faults}}},\"overlapping_runs\":{},\"plain_dead_lettered\":{},\"min_replicas\":{}}}",
        options.messages,
        lost_ids.len(),
        duplicates.total,
        duplicates.explained,
        duplicates.unexplained,
        dead.total,
        overlaps.len(),
        plain_dead.len(),
        options.min_replicas,
    );
    passed
}
