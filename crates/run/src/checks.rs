//! Replay spot-checks as the run decides them: which accepted units are re-run (BOINC's
//! adaptive replication, `validation::spot_check`, over a seeded draw per unit), in what
//! order, and what a re-run's distance means: a match raises the worker's trust; a
//! mismatch claws the unit's credit back, resets the worker's trust, keeps the unit out
//! of any aggregate not yet formed, and puts the worker's unchecked units at the front of
//! the queue (they may be lies too).
//!
//! The driver re-runs the unit (engine work), measures the distance, commits what
//! [`SpotChecks::judge`] says (the check row, the trust row, the requeued rows, the
//! clawback entry) and then calls [`SpotChecks::decided`]; it never decides itself.

use std::collections::{HashMap, HashSet, VecDeque};

use protocol::WorkerId;
use validation::spot_check::{SpotCheckPolicy, Trust};

/// The run's settings for spot-checks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CheckRules {
    /// Re-run sampled units at all.
    pub enabled: bool,
    /// Consecutive verified units after which a worker's units thin out.
    pub trusted_after: u64,
    /// Largest relative distance between an update and its re-run that still matches,
    /// when the worker is of the checker's determinism class.
    pub tolerance: f32,
    /// The same when the worker is of another class or reported none (another CPU's
    /// `gemm` kernels, a GPU): the measured honest difference between classes, with
    /// margin (`engine::CROSS_CLASS_REPLAY_TOLERANCE` by default). The larger of the two
    /// applies.
    pub cross_class_tolerance: f32,
    /// The same when the worker trained on a GPU (a `cuda/...` class) and the checker
    /// re-runs on a CPU: bf16 against f32 (`engine::GPU_CPU_REPLAY_TOLERANCE` by
    /// default). The larger of it and `tolerance` applies.
    pub gpu_tolerance: f32,
    /// Most units waiting; units sampled beyond it stay unchecked.
    pub max_backlog: u32,
    /// The run's seed: each unit's draw is a function of it and the unit's id.
    pub seed: u64,
}

/// How a re-run's checker stands to the worker whose unit it re-runs, which sets the
/// tolerance it is judged within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayClass {
    /// The worker reported the checker's determinism class: bit for bit by default.
    Same,
    /// Another CPU class, or no report: within the cross-class tolerance.
    OtherCpu,
    /// A GPU class, re-run on a CPU: within the GPU tolerance.
    Gpu,
}

impl ReplayClass {
    /// How a worker that reported `class` (or nothing) stands to a checker of
    /// `checker`'s class.
    pub fn of(class: Option<&str>, checker: &str) -> ReplayClass {
        match class {
            Some(c) if c == checker => ReplayClass::Same,
            Some(c) if c.starts_with("cuda/") => ReplayClass::Gpu,
            _ => ReplayClass::OtherCpu,
        }
    }
}

/// What becomes of a unit just accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sample {
    /// Waiting to be re-run.
    Queued,
    /// Not sampled (or the backlog was full): re-run only if its worker is caught later.
    Unchecked,
    /// Waiting for a volunteer of its worker's class ([`crate::replicas`]); stored as
    /// queued, so a restart hands it to the coordinator's own re-run.
    Replicated,
}

/// What a re-run's distance decides.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub matched: bool,
    /// The worker's record after this check.
    pub trust: Trust,
    /// Units queued again, in the order they go to the front of the queue: the
    /// worker's unchecked units, on a mismatch.
    pub requeue: Vec<u64>,
    /// The unit's mint is to be clawed back (on a mismatch; the driver skips a clawback
    /// the ledger already holds).
    pub claw_back: bool,
    /// The credit of the volunteer whose check this was (a match by a volunteer, or a
    /// dispute this re-run upholds).
    pub checker_mint: Option<ledger::Draft>,
    /// A volunteer whose dispute this bit-for-bit re-run refutes, with its record after
    /// it: a false check counts as a failed unit of its own.
    pub accuser: Option<(WorkerId, Trust)>,
    /// The credit of the first volunteer of a disputed unit when a third volunteer's
    /// check agrees with it (the unit fails two to one): both volunteers are paid.
    pub disputer_mint: Option<ledger::Draft>,
}

/// The state spot-checks keep between requests: trust per worker, the queue of units to
/// re-run, and the units whose re-run failed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpotChecks {
    trust: HashMap<WorkerId, Trust>,
    queue: VecDeque<u64>,
    failed: HashSet<u64>,
}

/// A uniform draw over all of `u64` for `n` (a unit's id, a batch's index) of the run
/// seeded `seed`: the run's one source of seeded choices (which units are re-run, which
/// batches score an update), the same on every machine.
pub fn draw(seed: u64, unit: u64) -> u64 {
    protocol::splitmix64(seed ^ unit.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

impl SpotChecks {
    /// The state a stored run had: its workers' trust, its queued units (in order) and
    /// its failed ones.
    pub fn resume(
        trust: impl IntoIterator<Item = (WorkerId, Trust)>,
        queued: impl IntoIterator<Item = u64>,
        failed: impl IntoIterator<Item = u64>,
    ) -> SpotChecks {
        let failed: HashSet<u64> = failed.into_iter().collect();
        let mut queue = VecDeque::new();
        for unit in queued {
            if !failed.contains(&unit) && !queue.contains(&unit) {
                queue.push_back(unit);
            }
        }
        let checks = SpotChecks {
            trust: trust.into_iter().collect(),
            queue,
            failed,
        };
        checks.assert_invariants();
        checks
    }

    /// A worker's record (a new worker has verified nothing).
    pub fn trust(&self, worker: WorkerId) -> Trust {
        self.trust.get(&worker).copied().unwrap_or_default()
    }

    /// Units waiting to be re-run.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The units waiting for the coordinator's re-run, in order.
    pub fn queue(&self) -> impl Iterator<Item = u64> + '_ {
        self.queue.iter().copied()
    }

    /// Whether the unit's re-run did not match (it stays out of any aggregate not yet
    /// formed).
    pub fn failed(&self, unit: u64) -> bool {
        self.failed.contains(&unit)
    }

    /// What becomes of `unit`, just accepted from `worker`: queued if the policy samples
    /// it and the backlog has room, or if `force`d (agreement); `None` when spot-checks
    /// are off.
    pub fn sample(
        &self,
        rules: &CheckRules,
        unit: u64,
        worker: WorkerId,
        force: bool,
    ) -> Option<Sample> {
        if !rules.enabled {
            return None;
        }
        let policy = SpotCheckPolicy {
            trusted_after: rules.trusted_after,
        };
        let sampled = policy.should_check(self.trust(worker), draw(rules.seed, unit));
        let room = self.queue.len() < rules.max_backlog as usize;
        Some(if force || (sampled && room) {
            Sample::Queued
        } else {
            Sample::Unchecked
        })
    }

    /// Records the sample of `unit` once its row is committed.
    /// (A [`Sample::Replicated`] unit is held by [`crate::replicas::Replicas`] instead.)
    pub fn sampled(&mut self, unit: u64, sample: Sample) {
        if sample == Sample::Queued && !self.queue.contains(&unit) {
            self.queue.push_back(unit);
        }
        self.assert_invariants();
    }

    /// The next unit to re-run. Taking it changes nothing stored: a unit never judged
    /// stays queued in the store and comes back after a restart.
    pub fn take(&mut self) -> Option<u64> {
        let unit = self.queue.pop_front();
        self.assert_invariants();
        unit
    }

    /// What the re-run of `unit` (accepted from `worker`) at `distance` from its update
    /// decides; `class`: how the worker's reported class stands to the checker's;
    /// `unchecked` are the worker's units never sampled, from the store.
    pub fn judge(
        &self,
        rules: &CheckRules,
        unit: u64,
        worker: WorkerId,
        distance: f32,
        class: ReplayClass,
        unchecked: &[u64],
    ) -> Outcome {
        let tolerance = match class {
            ReplayClass::Same => rules.tolerance,
            ReplayClass::OtherCpu => rules.tolerance.max(rules.cross_class_tolerance),
            ReplayClass::Gpu => rules.tolerance.max(rules.gpu_tolerance),
        };
        // A NaN distance (a re-run gone wrong) is no match.
        let matched = distance <= tolerance;
        let policy = SpotCheckPolicy {
            trusted_after: rules.trusted_after,
        };
        let trust = policy.after(self.trust(worker), unit, matched);
        let requeue = if matched {
            Vec::new()
        } else {
            unchecked
                .iter()
                .copied()
                .filter(|&u| u != unit && !self.failed.contains(&u))
                .collect()
        };
        Outcome {
            matched,
            trust,
            requeue,
            claw_back: !matched,
            checker_mint: None,
            accuser: None,
            disputer_mint: None,
        }
    }

    /// `worker`'s record after its check leased as `check` was refuted: as after a
    /// failed unit of that id (check ids come from the units' sequence).
    pub fn refuted(&self, rules: &CheckRules, worker: WorkerId, check: u64) -> Trust {
        let policy = SpotCheckPolicy {
            trusted_after: rules.trusted_after,
        };
        policy.after(self.trust(worker), check, false)
    }

    /// Records `outcome` of `unit`'s check once the driver committed it.
    pub fn decided(&mut self, unit: u64, worker: WorkerId, outcome: &Outcome) {
        self.trust.insert(worker, outcome.trust);
        if let Some((accuser, trust)) = outcome.accuser {
            self.trust.insert(accuser, trust);
        }
        if !outcome.matched {
            self.failed.insert(unit);
            self.queue.retain(|&u| u != unit);
            for &u in outcome.requeue.iter().rev() {
                if !self.queue.contains(&u) {
                    self.queue.push_front(u);
                }
            }
        }
        self.assert_invariants();
    }

    /// Holds after every change (TigerBeetle's way: checked in production, since a
    /// broken one means memory no longer matches what was committed): a unit is queued
    /// at most once, and never once its re-run failed.
    fn assert_invariants(&self) {
        let mut seen = HashSet::with_capacity(self.queue.len());
        for unit in &self.queue {
            assert!(seen.insert(*unit), "unit {unit} is queued twice");
            assert!(
                !self.failed.contains(unit),
                "unit {unit} is queued after its re-run failed"
            );
        }
    }
}

#[cfg(test)]
mod tests;
