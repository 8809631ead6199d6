//! The classification of duplicate effects: each effect beyond the first
//! for a message is explained when the ledger shows one of the windows
//! DESIGN.md admits, else unexplained; and `chaos --analyse`, which runs it
//! again on a kept ledger.
//!
//! A duplicate is explained when every earlier execution of the message was
//! cut off between its effect and its done mark ([`Tally::cut_off`]), or
//! when the later execution was stopped past the lease between its start
//! and its effect, but only if it began before any earlier execution
//! returned `processed`.
//!
//! Done marks lost in a failover: an earlier execution returned
//! `processed` (its done mark written, acknowledged by the store, and the
//! delivery acked), the master died before the mark reached the replica,
//! and a later copy of the message ran again on the promoted replica. None
//! of the rules above explains that, and no rule looks at how close a Redis
//! fault or a failover was: such a duplicate is unexplained, which is what
//! `IDEMPOTENCY_MIN_REPLICAS=1` must bring to 0. That is why the pause
//! rule does not hold once an earlier execution returned `processed` before
//! the later one began: the later one then found no done mark, and its
//! pause has nothing to do with it. Unexplained duplicates whose later
//! execution began after such a `processed`, with a master killed in
//! between, are counted apart (`lost_in_failover`) for the progress lines.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use crate::tally::{MISREPORTED, Tally};

#[derive(Default)]
pub struct Duplicates {
    pub total: usize,
    pub explained: usize,
    pub unexplained: usize,
    pub reasons: BTreeMap<&'static str, usize>,
    /// Earlier executions reported `processed` although stopped past the lease.
    pub misreported: usize,
    /// Explained by `lease_lost` or `unrecorded` without a pause of that
    /// process or a Redis outage during the execution.
    pub unmatched: usize,
    pub unmatched_examples: Vec<String>,
    pub examples: Vec<String>,
    /// Unexplained duplicates whose later execution began after an earlier
    /// one returned `processed`, with a master killed in between: done
    /// marks lost in a failover.
    pub lost_in_failover: usize,
}

pub fn classify_duplicates(tally: &Tally) -> Duplicates {
    let mut result = Duplicates::default();
    let mut ids: Vec<&String> = tally.effects.keys().collect();
    ids.sort();
    for id in ids {
        let effects = &tally.effects[id];
        for later in 1..effects.len() {
            result.total += 1;
            let earlier: Vec<Option<&'static str>> = effects[..later]
                .iter()
                .map(|key| tally.cut_off(*key))
                .collect();
            // The first `processed` among the earlier executions that
            // returned before the later one began: its done mark was in
            // place when the later one asked, unless it was lost.
            let begun = tally.began_at(effects[later]);
            let done_before = effects[..later]
                .iter()
                .filter_map(|key| tally.processed_at(*key))
                .filter(|at| begun.is_some_and(|begun| *at < begun))
                .min();
            let reason = if earlier.iter().all(Option::is_some) {
                earlier.last().copied().flatten()
            } else if done_before.is_none() && tally.paused_before_effect(effects[later]) {
                Some("later execution paused past the lease before its effect")
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    result.explained += 1;
                    *result.reasons.entry(reason).or_default() += 1;
                    if reason == MISREPORTED {
                        result.misreported += 1;
                    }
                    // A lost lease or an unwritten done mark needs a pause
                    // or a Redis outage while the execution ran.
                    let unmatched = effects[..later].iter().find(|key| {
                        matches!(tally.cut_off(**key), Some("lease_lost" | "unrecorded"))
                            && !tally.faulted_during(**key)
                    });
                    if let Some(key) = unmatched {
                        result.unmatched += 1;
                        if result.unmatched_examples.len() < 10 {
                            result
                                .unmatched_examples
                                .push(format!("{id}: {}", tally.describe(*key)));
                        }
                    }
                }
                None => {
                    result.unexplained += 1;
                    if let (Some(done), Some(begun)) = (done_before, begun)
                        && tally.failover_between(done, begun)
                    {
                        result.lost_in_failover += 1;
                    }
                    if result.examples.len() < 10 {
                        let history: Vec<String> = effects[..=later]
                            .iter()
                            .map(|k| tally.describe(*k))
                            .collect();
                        result
                            .examples
                            .push(format!("{id}: [{}]", history.join("] then [")));
                    }
                }
            }
        }
    }
    result
}

/// `--analyse LEDGER`: classifies the duplicate effects of a kept run's ledger again.
pub fn analyse_main(path: Option<&String>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("usage: chaos --analyse <run dir>/ledger.log");
        return ExitCode::from(2);
    };
    let mut tally = Tally::new(Path::new(path));
    if let Err(message) = tally.tail() {
        eprintln!("{message}");
        return ExitCode::from(2);
    }
    let duplicates = classify_duplicates(&tally);
    println!(
        "{} effects, outcomes {:?}; duplicate effects {} ({} explained: {:?}; {} unexplained, \
         {} of them done marks lost in a failover)",
        tally.effect_lines,
        tally.outcome_kinds,
        duplicates.total,
        duplicates.explained,
        duplicates.reasons,
        duplicates.unexplained,
        duplicates.lost_in_failover
    );
    for example in &duplicates.examples {
        println!("UNEXPLAINED duplicate {example}");
    }
    for example in &duplicates.unmatched_examples {
        println!("WARNING: no pause or Redis outage during {example}");
    }
    if duplicates.unexplained == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
