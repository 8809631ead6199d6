//! The ledger, read back: the orchestrator tails it while the run goes on
//! (what is accounted for, what is in flight) and keeps every execution,
//! kill, pause, Redis outage and failover for [`crate::classify`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::ledger::now_us;

/// Outcome kinds whose disposition is the dead-letter exchange.
pub const DEAD_LETTER_KINDS: &[&str] = &[
    "failed",
    "attempts_exhausted",
    "no_fingerprint",
    "payload_mismatch",
    "unrecognized_record",
    "crashed",
];
/// Why a duplicate is explained when the earlier execution says `processed`
/// although its process was stopped past the lease while it ran.
pub const MISREPORTED: &str = "stopped past the lease, yet reported processed";
/// A `begin` without an outcome older than this is not waited for.
const STALE_BEGIN: Duration = Duration::from_secs(30);

/// One run's work on an `s<i>` message: (pid, nonce), from, to.
pub type WorkRun = ((u32, u64), u64, u64);

#[derive(Default)]
pub struct Execution {
    pub id: String,
    pub begin: Option<u64>,
    pub effect: Option<u64>,
    pub outcome: Option<(u64, String)>,
}

/// Everything the ledger said so far; fed incrementally by [`Tally::tail`].
pub struct Tally {
    pub path: PathBuf,
    pub offset: u64,
    pub partial: Vec<u8>,
    pub last_growth: Instant,
    pub garbled: u64,
    pub executions: HashMap<(u32, u64), Execution>,
    /// Effects per message, in ledger order.
    pub effects: HashMap<String, Vec<(u32, u64)>>,
    pub effect_lines: u64,
    pub fail_lines: u64,
    /// Handler runs that aborted their process (`a<i>` messages).
    pub abort_lines: u64,
    /// When each run of an `s<i>` message worked: (execution, from, to).
    pub work: HashMap<String, Vec<WorkRun>>,
    pub outcome_kinds: BTreeMap<String, u64>,
    /// Retries the consumers' runners made, by `via` (`broker`: a retry
    /// copy confirmed in a delay queue; `hold`: held, then requeued).
    pub retried: BTreeMap<String, u64>,
    /// Messages whose fate is known: an effect, or a dead-letter outcome.
    pub accounted: HashSet<String>,
    /// `begin` lines without an outcome yet: (pid, nonce) -> time.
    pub open: HashMap<(u32, u64), u64>,
    pub killed: HashMap<u32, u64>,
    pub exited: HashSet<u32>,
    pub pauses: HashMap<u32, Vec<(u64, u64)>>,
    /// Redis restarts (down, up) and cuts (at, at).
    pub outages: Vec<(u64, u64)>,
    /// Failovers: (master killed, replica promoted, killed server an online replica again).
    pub failovers: Vec<(u64, u64, u64)>,
    /// How many of them the sentinels started on their own.
    pub unplanned_failovers: usize,
    pub processes: u64,
}

impl Tally {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            offset: 0,
            partial: Vec::new(),
            last_growth: Instant::now(),
            garbled: 0,
            executions: HashMap::new(),
            effects: HashMap::new(),
            effect_lines: 0,
            fail_lines: 0,
            abort_lines: 0,
            work: HashMap::new(),
            outcome_kinds: BTreeMap::new(),
            retried: BTreeMap::new(),
            accounted: HashSet::new(),
            open: HashMap::new(),
            killed: HashMap::new(),
            exited: HashSet::new(),
            pauses: HashMap::new(),
            outages: Vec::new(),
            failovers: Vec::new(),
            unplanned_failovers: 0,
            processes: 0,
        }
    }

    /// Reads the lines appended since the last call.
    pub fn tail(&mut self) -> Result<(), String> {
        let mut file = File::open(&self.path)
            .map_err(|err| format!("cannot read the ledger {}: {err}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))
            .map_err(|err| format!("cannot seek in the ledger: {err}"))?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh)
            .map_err(|err| format!("cannot read the ledger: {err}"))?;
        if fresh.is_empty() {
            return Ok(());
        }
        self.offset += fresh.len() as u64;
        self.last_growth = Instant::now();
        self.partial.extend_from_slice(&fresh);
        if let Some(last) = self.partial.iter().rposition(|b| *b == b'\n') {
            let complete: Vec<u8> = self.partial.drain(..=last).collect();
            for line in complete.split(|b| *b == b'\n') {
                if !line.is_empty() {
                    let line = String::from_utf8_lossy(line).into_owned();
                    if self.apply(&line).is_none() {
                        self.garbled += 1;
                        eprintln!("ledger: unreadable line `{line}`");
                    }
                }
            }
        }
        Ok(())
    }

    pub fn apply(&mut self, line: &str) -> Option<()> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let pid = |i: usize| fields.get(i).and_then(|f| f.parse::<u32>().ok());
        match *fields.first()? {
            "work" => {
                let id = (*fields.get(1)?).to_owned();
                let key = (pid(2)?, num(3)?);
                let window = (num(4)?, num(5)?);
                self.work
                    .entry(id)
                    .or_default()
                    .push((key, window.0, window.1));
            }
            "begin" | "effect" | "fail" | "abort" | "outcome" => {
                let id = (*fields.get(1)?).to_owned();
                let key = (pid(2)?, num(3)?);
                let at = num(4)?;
                let execution = self.executions.entry(key).or_default();
                execution.id.clone_from(&id);
                match fields[0] {
                    "begin" => {
                        execution.begin = Some(at);
                        self.open.insert(key, at);
                    }
                    "effect" => {
                        execution.effect = Some(at);
                        self.effect_lines += 1;
                        self.effects.entry(id.clone()).or_default().push(key);
                        if id.starts_with(['m', 's', 't']) {
                            self.accounted.insert(id);
                        }
                    }
                    "fail" => self.fail_lines += 1,
                    "abort" => self.abort_lines += 1,
                    _ => {
                        let kind = (*fields.get(5)?).to_owned();
                        self.open.remove(&key);
                        *self.outcome_kinds.entry(kind.clone()).or_default() += 1;
                        if DEAD_LETTER_KINDS.contains(&kind.as_str()) {
                            self.accounted.insert(id);
                        }
                        execution.outcome = Some((at, kind));
                    }
                }
            }
            // `retried <pid> <via> <t>`
            "retried" => {
                pid(1)?;
                num(3)?;
                *self
                    .retried
                    .entry((*fields.get(2)?).to_owned())
                    .or_default() += 1;
            }
            "start" => {
                pid(1)?;
                self.processes += 1;
            }
            "kill" => {
                self.killed.insert(pid(1)?, num(2)?);
            }
            "exit" => {
                self.exited.insert(pid(1)?);
            }
            "pause" => {
                let window = (num(2)?, num(3)?);
                self.pauses.entry(pid(1)?).or_default().push(window);
            }
            "redis-restart" => {
                let window = (num(1)?, num(2)?);
                self.outages.push(window);
            }
            "redis-cut" => {
                let at = num(1)?;
                self.outages.push((at, at));
            }
            // Redis refused writes for a while (PING still answered).
            "redis-oom" | "redis-password" | "redis-readonly" => {
                let window = (num(1)?, num(2)?);
                self.outages.push(window);
            }
            // `failover <killed> <promoted> <rejoined> <old port> <new port> [unplanned]`
            "failover" => {
                let window = (num(1)?, num(2)?, num(3)?);
                self.failovers.push(window);
                if fields.get(6) == Some(&"unplanned") {
                    self.unplanned_failovers += 1;
                }
            }
            "amqp-cut" | "inject" => {}
            _ => return None,
        }
        Some(())
    }

    /// Deliveries being handled by live consumers.
    pub fn in_flight(&self) -> usize {
        let stale = now_us().saturating_sub(STALE_BEGIN.as_micros() as u64);
        self.open
            .iter()
            .filter(|((pid, _), at)| {
                **at >= stale && !self.killed.contains_key(pid) && !self.exited.contains(pid)
            })
            .count()
    }

    /// Deliveries being handled by `pid`.
    pub fn in_flight_of(&self, pid: u32) -> usize {
        self.open.keys().filter(|(p, _)| *p == pid).count()
    }

    /// Whether `pid` was stopped (SIGSTOP) at some point between `from` and `to`.
    pub fn paused_between(&self, pid: u32, from: u64, to: u64) -> bool {
        self.pauses
            .get(&pid)
            .is_some_and(|windows| windows.iter().any(|(t0, t1)| *t0 <= to && *t1 >= from))
    }

    /// Why an execution that took effect did not leave a done mark, if the
    /// ledger shows it was cut off between its effect and its done mark.
    pub fn cut_off(&self, key: (u32, u64)) -> Option<&'static str> {
        let execution = self.executions.get(&key)?;
        let effect = execution.effect?;
        let begin = execution.begin.unwrap_or(effect);
        match &execution.outcome {
            Some((_, kind)) if kind == "lease_lost" => Some("lease_lost"),
            Some((_, kind)) if kind == "unrecorded" => Some("unrecorded"),
            Some((_, kind)) if kind == "dropped" => Some("dropped"),
            // Stopped past the lease while it ran: the claim expired, and
            // the handler timeout elapsed too, so whatever came after the
            // effect no longer counted.
            Some((at, kind)) if self.paused_between(key.0, begin, *at) => {
                Some(if kind == "processed" {
                    MISREPORTED
                } else {
                    "stopped past the lease, then timed out after its effect"
                })
            }
            // A failure after the effect: the handler timed out while the
            // work it had started went on and took effect.
            Some((_, kind)) if kind == "retry" => Some("timed out after its work took effect"),
            Some(_) => None,
            None if self.killed.contains_key(&key.0) => Some("killed"),
            None if self.exited.contains(&key.0) => Some("its process aborted"),
            None => None,
        }
    }

    /// Whether the process of an execution was paused, or Redis was
    /// restarted, cut or failed over, while it ran (give or take half a
    /// second). This only tells whether a lost lease or an unwritten done
    /// mark has a fault to go with it; it explains no duplicate.
    pub fn faulted_during(&self, key: (u32, u64)) -> bool {
        let Some(execution) = self.executions.get(&key) else {
            return false;
        };
        let Some(begin) = execution.begin.or(execution.effect) else {
            return false;
        };
        let end = execution.outcome.as_ref().map_or(u64::MAX, |(at, _)| *at);
        let (from, to) = (begin.saturating_sub(500_000), end.saturating_add(500_000));
        self.paused_between(key.0, from, to)
            || self.outages.iter().any(|(t0, t1)| *t0 <= to && *t1 >= from)
            || self
                .failovers
                .iter()
                .any(|(t0, _, t2)| *t0 <= to && *t2 >= from)
    }

    /// When an execution's layer returned `processed`: its done mark was
    /// written (and, with `IDEMPOTENCY_MIN_REPLICAS`, replicated) and the
    /// delivery acknowledged.
    pub fn processed_at(&self, key: (u32, u64)) -> Option<u64> {
        match &self.executions.get(&key)?.outcome {
            Some((at, kind)) if kind == "processed" => Some(*at),
            _ => None,
        }
    }

    /// When an execution began (its `begin` line, else its effect).
    pub fn began_at(&self, key: (u32, u64)) -> Option<u64> {
        let execution = self.executions.get(&key)?;
        execution.begin.or(execution.effect)
    }

    /// Whether a master was killed between `from` and `to`.
    pub fn failover_between(&self, from: u64, to: u64) -> bool {
        self.failovers
            .iter()
            .any(|(killed, _, _)| *killed >= from && *killed <= to)
    }

    /// Whether an execution was stopped past the lease after it began and
    /// before its effect: its claim expired under it.
    pub fn paused_before_effect(&self, key: (u32, u64)) -> bool {
        self.executions.get(&key).is_some_and(|execution| {
            match (execution.begin, execution.effect) {
                (Some(begin), Some(effect)) => self.paused_between(key.0, begin, effect),
                _ => false,
            }
        })
    }

    /// Runs of one `s<i>` message whose work overlapped in time, although
    /// no pause or kill of the earlier run's process explains it: the layer
    /// must keep a timed-out run's claim until its lease ends.
    pub fn overlapping_work(&self) -> Vec<String> {
        let mut overlaps = Vec::new();
        for (id, runs) in &self.work {
            for (i, (a, a0, a1)) in runs.iter().enumerate() {
                for (b, b0, b1) in &runs[i + 1..] {
                    let excused = [a, b].iter().any(|(pid, _)| {
                        self.killed.contains_key(pid)
                            || self.exited.contains(pid)
                            || self.pauses.contains_key(pid)
                    });
                    if a0 <= b1 && b0 <= a1 && !excused {
                        overlaps.push(format!("{id}: {a:?} {a0}..{a1} and {b:?} {b0}..{b1}"));
                    }
                }
            }
        }
        overlaps
    }

    pub fn describe(&self, key: (u32, u64)) -> String {
        let Some(execution) = self.executions.get(&key) else {
            return format!("pid {} nonce {} (unknown)", key.0, key.1);
        };
        let outcome = execution
            .outcome
            .as_ref()
            .map_or("no outcome", |(_, kind)| kind.as_str());
        let fate = if self.killed.contains_key(&key.0) {
            ", process killed"
        } else {
            ""
        };
        let paused = if self.pauses.contains_key(&key.0) {
            ", process paused at some point"
        } else {
            ""
        };
        format!(
            "pid {} nonce {} begin {:?} effect {:?} outcome {outcome}{fate}{paused}",
            key.0, key.1, execution.begin, execution.effect
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_lines_open_windows_and_count_the_unplanned_ones() {
        let mut tally = Tally::new(Path::new("unused.log"));
        // A kill at 10, a promotion at 20, the sentinels' own failover
        // seen at 40 and its rejoin at 50.
        assert_eq!(tally.apply("failover 10 20 40 6379 6380"), Some(()));
        assert_eq!(
            tally.apply("failover 40 40 50 6380 6379 unplanned"),
            Some(())
        );
        assert_eq!(
            tally.apply("failover 60 70"),
            None,
            "a line without its rejoin time"
        );
        assert_eq!(tally.failovers, [(10, 20, 40), (40, 40, 50)]);
        assert_eq!(tally.unplanned_failovers, 1);
        assert!(
            tally.failover_between(25, 45),
            "a done mark at 25 may be lost in the failover seen at 40"
        );
        assert!(!tally.failover_between(41, 100));
    }
}
