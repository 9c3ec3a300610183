//! The run as one value: [`Run::step`] takes the time and one input (a lease request, a
//! heartbeat, an update with its score, a re-run's distance, an aggregated round, a
//! tick) and returns what the driver must persist and answer, in the shape of Psyche's
//! `Coordinator::tick` and TigerBeetle's state machines.
//!
//! The driver steps a copy (`run.clone()`), persists the [`Output`] (rows, the
//! scheduler's state, ledger drafts it signs) in one transaction, and only then keeps
//! the copy: memory never runs ahead of the disk. After every step the run asserts its
//! invariants; one that breaks panics, which the coordinator turns into a stop (its
//! memory no longer matches what it committed; a restart resumes from the last commit).

use std::sync::Arc;

use protocol::{WorkUnit, WorkerId};
use scheduler::{Effect, Event, Scheduler, UnitStatus};
use validation::score::Score;
use validation::{Inspected, LeaseState, Verdict};

use crate::checks::{CheckRules, Outcome, ReplayClass, Sample, SpotChecks};
use crate::replicas::{
    ClassPeers, LeasedCheck, PendingCheck, ReplicaRules, Replicas, Route, coordinator_runs,
};
use crate::{Acceptance, Decision, Rules, RunError};

/// The run's settings, fixed for its life.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The run's seed: scheduling, spot-check draws.
    pub seed: u64,
    pub acceptance: Rules,
    pub checks: CheckRules,
    /// Checks by volunteers of the worker's class ([`crate::replicas`]).
    pub replicas: ReplicaRules,
    /// Tokens one step trains (batch times sequence): a unit's weight in the aggregate
    /// and the base of its credit are its steps times this, so units sized per worker
    /// (`schedule.unit_ms`) weigh and earn what they trained, per FLOP.
    pub step_tokens: u64,
    /// The model specification's training FLOPs per token.
    pub flops_per_token: u64,
}

/// One input to [`Run::step`].
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// Time passes: leases expire, rounds time out.
    Tick,
    /// A worker asks for work; `expected_ms` is what a unit should take it by the speed
    /// it reported ([`crate::tier::unit_ms`]; `None`: no report), which sizes the
    /// lease's hard deadline until the worker's arrivals are measured.
    /// `class` is the determinism class the worker reported (`None`: no report); a
    /// worker of a class with a check waiting may be leased the check instead of a unit.
    Lease {
        worker: WorkerId,
        expected_ms: Option<u64>,
        class: Option<&'a str>,
    },
    /// A worker is still on its unit.
    Heartbeat { worker: WorkerId, unit: u64 },
    /// The worker's update for its unit arrived in time and is being judged: its lease
    /// holds while the driver scores it ([`scheduler::Event::Arrived`]).
    Arrived { worker: WorkerId, unit: u64 },
    /// The driver refused the worker's update for a reason that sends the unit to
    /// another worker (`Reject::releases_unit`).
    Refused { worker: WorkerId, unit: u64 },
    /// An update, judged and decided now: `copy_of` is the unit already accepted with
    /// the same payload hash (the driver looks it up), `score` its measured score
    /// (required when scoring is on), `class` the determinism class its worker reported
    /// (where a sampled unit's re-run goes).
    Update {
        update: &'a Inspected,
        copy_of: Option<u64>,
        score: Option<&'a Score>,
        class: Option<&'a str>,
    },
    /// A unit's re-run finished at `distance` from its update; `same_class`: its worker
    /// reported the checker's determinism class; `unchecked` are its worker's units never
    /// sampled (from the store); `replica`: the re-run is a volunteer's check (its
    /// upload), else the coordinator's own; `disputed`: the volunteer's check whose
    /// mismatch sent the unit to this re-run (from the store), paid if the worker fails.
    /// `tokens`: the unit's weight as accepted (its update's row), what a check is paid.
    Replayed {
        unit: u64,
        worker: WorkerId,
        tokens: u64,
        distance: f32,
        class: crate::checks::ReplayClass,
        unchecked: &'a [u64],
        replica: Option<Replica>,
        disputed: Option<Replica>,
    },
    /// The driver aggregated `round` into `version`.
    Aggregated { round: u64, version: u64 },
}

/// A volunteer's check that was uploaded: the fresh id it was leased under and who sent it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Replica {
    pub check: u64,
    pub checker: WorkerId,
}

/// An update the run accepted: what the driver commits for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    pub unit: u64,
    pub worker: WorkerId,
    /// The round it counts in.
    pub round: u64,
    pub norm: f32,
    /// Its weight in the aggregate (tokens trained).
    pub weight: u64,
    /// Its credit, as the mint the driver signs and commits with the update's row
    /// ([`crate::credit::mint`]: the unit's FLOPs, under the unit's reference).
    pub mint: ledger::Draft,
    /// Whether it is re-run (`None`: spot-checks are off).
    pub sample: Option<Sample>,
}

/// What a step decided beyond scheduling.
#[derive(Clone, Debug, PartialEq)]
pub enum Decided {
    Accepted(Accepted),
    /// The update is refused with this verdict; the driver records it, and sends
    /// [`Input::Refused`] if the refusal releases the unit.
    Refused(Verdict),
    /// A re-run's outcome (a volunteer's check that matched carries the checker's mint).
    Checked(Outcome),
    /// A check is leased to a volunteer: the driver answers the lease with `unit`, which
    /// carries the original's training inputs under a fresh id and names neither the
    /// original unit nor its worker.
    CheckLeased {
        worker: WorkerId,
        unit: WorkUnit,
        deadline_ms: u64,
    },
    /// A volunteer's check did not match: neither side is believed on the other's word.
    /// The checker earns nothing now; the unit goes to the coordinator's own re-run
    /// (`rerun`: the driver keeps the dispute, and the checker is paid if that re-run
    /// fails the worker), or, for a unit the coordinator cannot run, to a third
    /// volunteer of the class (`third`: its check, stored with the run's replicas,
    /// decides two to one), or, with no room for that check, is left unchecked.
    Disputed {
        unit: u64,
        worker: WorkerId,
        checker: WorkerId,
        distance: f32,
        rerun: bool,
        third: bool,
    },
}

/// What the driver must persist and answer after a step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Output {
    /// The scheduler's effects: leases to grant, rounds started, a round to aggregate.
    pub effects: Vec<Effect>,
    pub decided: Option<Decided>,
}

/// Everything a training run decides, as one value.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    settings: Settings,
    scheduler: Scheduler,
    // Shared until changed: a driver clones the run for every step, and most steps
    // (leases, heartbeats, ticks) change the scheduler only.
    acceptance: Arc<Acceptance>,
    checks: Arc<SpotChecks>,
    /// Checks waiting for volunteers and leased to them (stored by the driver).
    replicas: Arc<Replicas>,
    /// Who leased lately, by class (soft state: not stored, refilled by leases).
    peers: Arc<ClassPeers>,
}

impl Run {
    /// A run as it stands: a new one, or one rebuilt from what its driver stored. A
    /// stored run whose parts break the invariants [`Run::step`] keeps (a store edited
    /// by hand, or written by a bug) is refused with an internal error that says which
    /// one, rather than run on.
    pub fn new(
        settings: Settings,
        scheduler: Scheduler,
        acceptance: Acceptance,
        checks: SpotChecks,
        replicas: Replicas,
    ) -> Result<Run, RunError> {
        let run = Run {
            settings,
            scheduler,
            acceptance: Arc::new(acceptance),
            checks: Arc::new(checks),
            replicas: Arc::new(replicas),
            peers: Arc::default(),
        };
        match run.violation() {
            None => Ok(run),
            Some(what) => Err(RunError::broken(format!(
                "the stored run does not hold together: {what}"
            ))),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Tokens of a unit of `schedule.steps_per_unit` steps: what a worker's reported
    /// speed is turned into a unit's expected time with ([`crate::tier`]).
    pub fn unit_tokens(&self) -> u64 {
        let steps = u64::from(self.scheduler.config().steps_per_unit);
        self.settings.step_tokens.saturating_mul(steps)
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn checks(&self) -> &SpotChecks {
        &self.checks
    }

    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    /// The check leased to a volunteer under the fresh id `id`.
    pub fn check_lease(&self, id: u64) -> Option<&LeasedCheck> {
        self.replicas.leased(id)
    }

    /// The version the current round trains on.
    pub fn version(&self) -> u64 {
        self.scheduler.version()
    }

    /// The median norm the next update is held to.
    pub fn median_norm(&self) -> Option<f32> {
        self.acceptance.median_norm()
    }

    /// The verdict on `update` as the run stands, before its score: what the driver asks
    /// before it spends a score on an update, and to tell a resent accepted update from
    /// a refusal. Changes nothing.
    pub fn judge(&self, update: &Inspected, copy_of: Option<u64>) -> Verdict {
        let lease = self
            .scheduler
            .lease_view(update.header.work_unit)
            .map(|l| LeaseState {
                work_unit: l.unit,
                worker: l.worker,
                base_version: l.base_version,
                submitted: l.submitted,
            });
        self.acceptance.judge(
            update,
            &self.settings.acceptance,
            self.scheduler.version(),
            lease.as_ref(),
            self.unit_scale(update.header.work_unit),
            copy_of,
        )
    }

    /// The steps of unit `unit` over the run's steps per unit (1 for a unit not known):
    /// what its update's norm is divided by before the norm bounds.
    fn unit_scale(&self, unit: u64) -> f32 {
        let base = self.scheduler.config().steps_per_unit.max(1);
        self.scheduler
            .unit(unit)
            .map_or(1.0, |u| u.address.steps.max(1) as f32 / base as f32)
    }

    /// Takes one input at `now_ms`. An `Err` is a driver's bug (an update unscored with
    /// scoring on, an aggregate of another round); the run is then unchanged only if
    /// the driver drops this copy, as it must.
    pub fn step(&mut self, now_ms: u64, input: Input<'_>) -> Result<Output, RunError> {
        let seed = self.settings.seed;
        self.expire_checks(now_ms);
        if let Input::Lease {
            worker,
            class: Some(class),
            ..
        } = &input
        {
            Arc::make_mut(&mut self.peers).saw(*worker, class, now_ms);
        }
        let output = match input {
            Input::Tick => self.schedule(now_ms, &[]),
            Input::Lease {
                worker,
                expected_ms,
                class,
            } => match self.lease_check(now_ms, worker, expected_ms, class) {
                Some(output) => output,
                None => {
                    // With spot-checks on, a GPU's units stay short enough for the
                    // coordinator's CPU to re-run them within the GPU tolerance, unless
                    // another volunteer of its class is active to re-run them.
                    let window_ms = self.scheduler.config().lease_max_ms;
                    let steps_max = class
                        .filter(|_| self.settings.checks.enabled)
                        .and_then(|c| {
                            let peer = self.peers.other_active(worker, c, now_ms, window_ms);
                            crate::replicas::checkable_steps_max(c, peer)
                        });
                    self.schedule(
                        now_ms,
                        &[Event::LeaseRequest {
                            worker,
                            expected_ms,
                            steps_max,
                        }],
                    )
                }
            },
            Input::Heartbeat { worker, unit } => {
                self.schedule(now_ms, &[Event::Heartbeat { worker, unit }])
            }
            Input::Arrived { worker, unit } => {
                self.schedule(now_ms, &[Event::Arrived { worker, unit }])
            }
            Input::Refused { worker, unit } => {
                self.schedule(now_ms, &[Event::UpdateRefused { worker, unit }])
            }
            Input::Update {
                update,
                copy_of,
                score,
                class,
            } => self.update(now_ms, update, copy_of, score, class)?,
            Input::Replayed {
                unit,
                worker,
                tokens,
                distance,
                unchecked,
                replica: Some(replica),
                ..
            } => self.replicated(now_ms, unit, worker, tokens, distance, unchecked, replica)?,
            Input::Replayed {
                unit,
                worker,
                tokens,
                distance,
                class,
                unchecked,
                replica: None,
                disputed,
            } => {
                let mut outcome = self.checks.judge(
                    &self.settings.checks,
                    unit,
                    worker,
                    distance,
                    class,
                    unchecked,
                );
                match (disputed, outcome.matched) {
                    // The volunteer who disputed the unit was right: it is paid its check.
                    (Some(d), false) => {
                        outcome.checker_mint = Some(crate::credit::check_mint(
                            d.checker,
                            d.check,
                            crate::credit::unit_credit(self.settings.flops_per_token, tokens),
                        ));
                    }
                    // It was wrong, and provably so when this re-run is of the worker's
                    // class, which the volunteer claimed too: bit for bit, the worker's
                    // bytes are the unit's. Its check counts as a failed unit of its own
                    // (its trust reset, so its units are checked again).
                    (Some(d), true) if class == crate::checks::ReplayClass::Same => {
                        let trust = self
                            .checks
                            .refuted(&self.settings.checks, d.checker, d.check);
                        outcome.accuser = Some((d.checker, trust));
                    }
                    _ => {}
                }
                Arc::make_mut(&mut self.checks).decided(unit, worker, &outcome);
                Output {
                    effects: Vec::new(),
                    decided: Some(Decided::Checked(outcome)),
                }
            }
            Input::Aggregated { round, version } => {
                let due = self.scheduler.pending_aggregate();
                if due.map(|(r, _)| r) != Some(round) || version != self.scheduler.version() + 1 {
                    return Err(RunError::broken(format!(
                        "round {round} aggregated into version {version}, but the run awaits {due:?} on version {}",
                        self.scheduler.version()
                    )));
                }
                let effects =
                    self.scheduler
                        .tick(now_ms, seed, &[Event::Aggregated { round, version }]);
                Arc::make_mut(&mut self.acceptance).round_closed();
                // Paired with the precondition above: the next round trains on it.
                assert_eq!(
                    self.scheduler.version(),
                    version,
                    "the scheduler did not move to the aggregated version"
                );
                Output {
                    effects,
                    decided: None,
                }
            }
        };
        self.assert_invariants();
        Ok(output)
    }

    /// Time passes for checks by volunteers: an expired lease is offered again, and a
    /// check that waited `replicas.wait_ms` goes to the coordinator's own re-run.
    fn expire_checks(&mut self, now_ms: u64) {
        if self.replicas.is_empty() {
            return;
        }
        let fallen = Arc::make_mut(&mut self.replicas).expire(now_ms, &self.settings.replicas);
        for check in fallen {
            if !self.checks.failed(check.unit.id) {
                Arc::make_mut(&mut self.checks).sampled(check.unit.id, Sample::Queued);
            }
        }
    }

    /// A check for `worker` of `class`, if one waits that it may take (of its class,
    /// not its own unit): leased under a fresh unit id from the scheduler's sequence,
    /// with the hard deadline an ordinary unit of this worker would get.
    fn lease_check(
        &mut self,
        now_ms: u64,
        worker: WorkerId,
        expected_ms: Option<u64>,
        class: Option<&str>,
    ) -> Option<Output> {
        let index = self.replicas.offer(worker, class?)?;
        let id = self.scheduler.reserve_unit_id();
        let deadline_ms = now_ms.saturating_add(self.scheduler.config().hard_lease_ms(expected_ms));
        let round = self.scheduler.round();
        let unit =
            Arc::make_mut(&mut self.replicas).lease(index, id, round, worker, deadline_ms)?;
        Some(Output {
            effects: self.scheduler.tick(now_ms, self.settings.seed, &[]),
            decided: Some(Decided::CheckLeased {
                worker,
                unit,
                deadline_ms,
            }),
        })
    }

    /// A volunteer's check of `unit` (from `worker`) came at `distance`: a match is the
    /// worker's verified re-run and the checker's credit; a mismatch believes neither
    /// and sends the unit to the coordinator's own re-run (which pays the checker if it
    /// fails the worker: `Input::Replayed::disputed`), or, when the coordinator cannot
    /// run it, to a third volunteer, whose check then decides two to one.
    #[allow(clippy::too_many_arguments)]
    fn replicated(
        &mut self,
        now_ms: u64,
        unit: u64,
        worker: WorkerId,
        tokens: u64,
        distance: f32,
        unchecked: &[u64],
        replica: Replica,
    ) -> Result<Output, RunError> {
        let held = self.replicas.leased(replica.check).is_some_and(|l| {
            l.checker == replica.checker && l.check.unit.id == unit && l.check.worker == worker
        });
        if !held {
            return Err(RunError::broken(format!(
                "check {} of unit {unit} is not leased to {}",
                replica.check, replica.checker
            )));
        }
        let Some(leased) = Arc::make_mut(&mut self.replicas).finish(replica.check) else {
            return Err(RunError::broken(format!(
                "check {} vanished",
                replica.check
            )));
        };
        let rules = &self.settings.checks;
        let credit = crate::credit::unit_credit(self.settings.flops_per_token, tokens);
        // A NaN distance is no match.
        let matched = distance <= rules.tolerance;
        let decided = match (matched, leased.check.disputed) {
            // A match, or the third replica of a disputed unit, which decides it two to
            // one: agreeing with the worker, it clears the unit and refutes the first
            // volunteer (its check counts as a failed unit of its own); agreeing with
            // the first volunteer, the unit fails and both volunteers are paid.
            (true, _) | (false, Some(_)) => {
                let mut outcome =
                    self.checks
                        .judge(rules, unit, worker, distance, ReplayClass::Same, unchecked);
                outcome.checker_mint = Some(crate::credit::check_mint(
                    replica.checker,
                    replica.check,
                    credit,
                ));
                match leased.check.disputed {
                    Some(first) if matched => {
                        let trust = self.checks.refuted(rules, first.checker, first.check);
                        outcome.accuser = Some((first.checker, trust));
                    }
                    Some(first) => {
                        outcome.disputer_mint = Some(crate::credit::check_mint(
                            first.checker,
                            first.check,
                            credit,
                        ));
                    }
                    None => {}
                }
                Arc::make_mut(&mut self.checks).decided(unit, worker, &outcome);
                Decided::Checked(outcome)
            }
            (false, None) => {
                let rerun = self.settings.replicas.own_reruns
                    && coordinator_runs(&leased.check.class, leased.check.unit.address.steps)
                    && !self.checks.failed(unit);
                // The coordinator cannot judge it: a third volunteer of the class does,
                // while there is room for its check.
                let third = !rerun
                    && !self.checks.failed(unit)
                    && self.replicas.len() < crate::replicas::PENDING_CHECKS_MAX;
                if rerun {
                    Arc::make_mut(&mut self.checks).sampled(unit, Sample::Queued);
                }
                if third {
                    Arc::make_mut(&mut self.replicas).push(PendingCheck {
                        queued_ms: now_ms,
                        disputed: Some(replica),
                        ..leased.check.clone()
                    });
                }
                Decided::Disputed {
                    unit,
                    worker,
                    checker: replica.checker,
                    distance,
                    rerun,
                    third,
                }
            }
        };
        Ok(Output {
            effects: Vec::new(),
            decided: Some(decided),
        })
    }

    fn schedule(&mut self, now_ms: u64, events: &[Event]) -> Output {
        Output {
            effects: self.scheduler.tick(now_ms, self.settings.seed, events),
            decided: None,
        }
    }

    /// Judges `update` against the round as it stands and decides it on its score; an
    /// accepted one is leased no more, joins the median bars, is sampled for a re-run
    /// and gets its credit.
    fn update(
        &mut self,
        now_ms: u64,
        update: &Inspected,
        copy_of: Option<u64>,
        score: Option<&Score>,
        class: Option<&str>,
    ) -> Result<Output, RunError> {
        let verdict = self.judge(update, copy_of);
        let decision = Arc::make_mut(&mut self.acceptance)
            .decide(update, verdict, score, &self.settings.acceptance)
            .map_err(|e| RunError::broken(e.to_string()))?;
        let (unit, worker, norm, force_check, gain) = match decision {
            Decision::Refuse(verdict) => {
                return Ok(Output {
                    effects: Vec::new(),
                    decided: Some(Decided::Refused(verdict)),
                });
            }
            Decision::Accept {
                work_unit,
                worker,
                norm,
                force_check,
                gain,
            } => (work_unit, worker, norm, force_check, gain),
        };
        let round = self.scheduler.round();
        let version = self.scheduler.version();
        let sample = self
            .checks
            .sample(&self.settings.checks, unit, worker, force_check);
        // Where a sampled unit's re-run goes: a volunteer of the worker's class takes it
        // from the coordinator's CPU unless the worker is of that CPU's class.
        let original = self.scheduler.unit(unit).copied();
        let (sample, pending) = match (sample, original) {
            (Some(Sample::Queued), Some(original)) => {
                match self
                    .replicas
                    .route(&self.settings.replicas, class, original.address.steps)
                {
                    Route::Coordinator => (sample, None),
                    Route::Nobody => (Some(Sample::Unchecked), None),
                    Route::Volunteer => (
                        Some(Sample::Replicated),
                        Some(PendingCheck {
                            unit: original,
                            worker,
                            class: class.unwrap_or_default().to_owned(),
                            queued_ms: now_ms,
                            disputed: None,
                        }),
                    ),
                }
            }
            _ => (sample, None),
        };
        let effects = self.scheduler.tick(
            now_ms,
            self.settings.seed,
            &[Event::UpdateAccepted { worker, unit }],
        );
        let scaled = norm / self.unit_scale(unit);
        Arc::make_mut(&mut self.acceptance).accepted(unit, scaled, gain, version);
        match (sample, pending) {
            (Some(Sample::Replicated), Some(pending)) => {
                Arc::make_mut(&mut self.replicas).push(pending)
            }
            (Some(sample), _) => Arc::make_mut(&mut self.checks).sampled(unit, sample),
            (None, _) => {}
        }
        let steps = original.map_or(self.scheduler.config().steps_per_unit, |u| u.address.steps);
        let weight = self.settings.step_tokens.saturating_mul(u64::from(steps));
        Ok(Output {
            effects,
            decided: Some(Decided::Accepted(Accepted {
                unit,
                worker,
                round,
                norm,
                weight,
                mint: crate::credit::mint(
                    worker,
                    unit,
                    crate::credit::unit_credit(self.settings.flops_per_token, weight),
                ),
                sample,
            })),
        })
    }

    /// Holds after every step: every unit the scheduler counts as accepted in this round
    /// has its norm in the median bar, so the bar is over exactly the round's updates.
    fn assert_invariants(&self) {
        if let Some(what) = self.violation() {
            panic!("{what}");
        }
    }

    /// The first invariant that does not hold, in words.
    fn violation(&self) -> Option<String> {
        // At most `PENDING_CHECKS_MAX` units to look for, and none in the usual case.
        let both = if self.replicas.is_empty() {
            None
        } else {
            self.checks.queue().find(|&u| self.replicas.holds(u))
        };
        if let Some(unit) = both {
            return Some(format!(
                "unit {unit} waits for the coordinator's re-run and a volunteer's at once"
            ));
        }
        self.scheduler
            .units()
            .find(|(unit, status)| {
                matches!(status, UnitStatus::Accepted { .. }) && !self.acceptance.holds(unit.id)
            })
            .map(|(unit, _)| {
                format!(
                    "unit {} is accepted in round {} but its norm is not in the median bar",
                    unit.id,
                    self.scheduler.round()
                )
            })
    }

    /// The next unit to re-run. Taking it changes nothing the driver stores (a unit
    /// never judged stays queued there and comes back after a restart), so it is no step.
    pub fn take_check(&mut self) -> Option<u64> {
        Arc::make_mut(&mut self.checks).take()
    }

    /// The unit `id` of the current round.
    pub fn unit(&self, id: u64) -> Option<&WorkUnit> {
        self.scheduler.unit(id)
    }
}

#[cfg(test)]
mod tests;
