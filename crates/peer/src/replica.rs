//! The run as every peer holds it: the run core ([`run::Run`], the one the coordinator's
//! `runner::Core` and the simulator drive, unchanged), the current version's trainable
//! floats and the outer optimizer's state, all in memory, stepped on a clock of the
//! run's own (a height's time is a function of the height) so that every peer that
//! executes the same updates reaches the same state, bit for bit. That clock is logical:
//! each height's updates are stepped 1 ms after the last step of the height before, and
//! it moves by the round's timeout only when a round closes without all its units.
//!
//! A height's execution ([`Replica::execute`]) is what a proposer runs to build its value
//! and what every other member runs to check it before it votes: each update is stepped in the value's order (judged by the run
//! core: signature, shape, values, norms, lease, staleness); the round closes on its
//! last unit or by the height's timeout tick; its accepted updates are decoded and
//! aggregated by the run's outer optimizer into the next version; and every member is
//! leased its unit of the next round. Leases are not agreed on: every peer steps the
//! same lease requests (each member, in an order drawn for the height) and so computes
//! the same units.
//!
//! Re-runs (spot-checks) go through the run core's checks by volunteers
//! ([`run::replicas`], BOINC's replication): a sampled accepted unit waits for a member
//! other than its worker, who is leased it under a fresh id beside its own unit, trains
//! it from the same version and data, and sends the result as an ordinary signed update.
//! Every peer compares the two payloads itself (bit for bit within the run's class), so
//! no one takes the checker's word for the distance; a mismatch believes neither and goes
//! to a third member, whose re-run decides two to one. A failed unit's credit is clawed
//! back and its worker's trust reset (its next units are all re-run); the checker of a
//! match, or of an upheld dispute, is paid its check. Until a check is sent, the peer
//! keeps the checked update's bytes and its version's floats ([`Replica::base_of`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use aggregation::{Combine, OuterConfig, WeightedDelta};
use agree::{Counted, Value};
use protocol::{SignedUpdate, WorkUnit, WorkerId};
use run::{Decided, Input, Run, Sample};
use scheduler::{Effect, ScheduleConfig, Scheduler};

use crate::PeerError;

/// What a run's peers fix before it starts and never change: the run core's settings,
/// the schedule, the outer optimizer and the members.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub settings: run::Settings,
    pub schedule: ScheduleConfig,
    pub outer: OuterConfig,
    pub combine: Combine,
    pub limits: protocol::Limits,
    /// How members encode their updates.
    pub codec: protocol::Codec,
    /// The trainable floats' count.
    pub n_params: usize,
    /// Who trains and votes, in committee order (by key).
    pub members: Vec<WorkerId>,
    /// The run's determinism class (the ticket's): every member trains and re-runs as
    /// one, compared within `settings.checks.tolerance`.
    pub class: String,
}

impl RunSpec {
    /// The exact size of a member's update: the bound on one in a message.
    pub fn update_bytes(&self) -> usize {
        protocol::update_len(self.codec, self.n_params as u32) as usize
    }
}

/// One version of the run as a peer holds it.
#[derive(Clone, Debug)]
pub struct Replica {
    run: Run,
    version: u64,
    params: Arc<Vec<f32>>,
    outer_state: Arc<Vec<f32>>,
    hash: [u8; 32],
    /// The run's logical clock: the time of the last step.
    clock_ms: u64,
    /// Each member's unit of the round under way.
    leases: BTreeMap<WorkerId, WorkUnit>,
    /// Micro-credits minted to each worker by the accepted updates of every version.
    credit: BTreeMap<WorkerId, u64>,
    /// Members proven to have equivocated: their credit forfeited, no unit leased to
    /// them again, no seat on the committee.
    punished: BTreeSet<WorkerId>,
    /// The last version each member's update was accepted in (its verified work).
    worked: BTreeMap<WorkerId, u64>,
    /// The check each member holds (a sampled unit's training inputs under a fresh id),
    /// beside its unit: at most one a member.
    checks: BTreeMap<WorkerId, WorkUnit>,
    /// The accepted updates of units waiting for a check or leased for one (at most
    /// `run::PENDING_CHECKS_MAX`), to compare the re-runs with.
    originals: BTreeMap<u64, Original>,
    /// The floats of the versions those units trained on: what a checker trains from.
    bases: BTreeMap<u64, Arc<Vec<f32>>>,
    /// What the run's checks found so far.
    tally: Tally,
    /// Workers whose unit failed a check (its credit clawed back).
    caught: BTreeSet<WorkerId>,
    /// The last version in which each member's unit failed a check: no seat for
    /// [`SEAT_WINDOW`] versions after it.
    failed_at: BTreeMap<WorkerId, u64>,
}

/// An accepted update kept until its check comes.
#[derive(Clone, Debug)]
struct Original {
    bytes: Arc<Vec<u8>>,
    /// Its tokens: its weight and the base of its credit.
    weight: u64,
}

/// What the run's checks found, counted over its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Checks that reproduced their unit (within the run's tolerance).
    pub matched: u64,
    /// Units that failed a check: a re-run that did not match and a third that agreed
    /// with it.
    pub failed: u64,
    /// Checks that did not match, sent to a third member.
    pub disputed: u64,
    /// Checks a third member's re-run proved false (the checker lied, or erred).
    pub refuted: u64,
    /// Micro-credits clawed back from failed units.
    pub clawed_back: u64,
}

/// Versions a seat lasts without verified work: past the first `SEAT_WINDOW` versions, a
/// member votes only if an update of its was accepted in one of the last `SEAT_WINDOW`.
pub const SEAT_WINDOW: u64 = 4;

/// A height executed: the next version and the value that names it.
#[derive(Clone, Debug)]
pub struct Executed {
    pub replica: Replica,
    pub value: Value,
}

/// The hash of a version: its number and its trainable floats, bit for bit.
pub fn version_hash(version: u64, params: &[f32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"hivetrain/peer/version/v1");
    h.update(&version.to_le_bytes());
    for x in params {
        h.update(&x.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

impl Replica {
    /// Version 0 of a run: `initial` the trainable floats every peer makes from the
    /// run's seed; each member leased its first unit.
    pub fn genesis(spec: &RunSpec, initial: Vec<f32>) -> Result<Replica, PeerError> {
        if initial.len() != spec.n_params {
            return Err(PeerError::Invalid(
                "the initial weights are not the run's size",
            ));
        }
        if spec.schedule.lease_ms <= spec.schedule.round_timeout_ms.saturating_add(2) {
            return Err(PeerError::Invalid(
                "a lease must outlast the round timeout, or a round that waited for a unit would lose the others",
            ));
        }
        let scheduler = Scheduler::new(spec.schedule, 0);
        let run = Run::new(
            spec.settings.clone(),
            scheduler,
            run::Acceptance::default(),
            run::SpotChecks::default(),
            run::Replicas::default(),
        )?;
        let outer = spec.outer.build_with(spec.combine, spec.n_params);
        let mut replica = Replica {
            run,
            version: 0,
            hash: version_hash(0, &initial),
            params: Arc::new(initial),
            outer_state: Arc::new(outer.state()),
            clock_ms: 1,
            leases: BTreeMap::new(),
            credit: BTreeMap::new(),
            punished: BTreeSet::new(),
            worked: BTreeMap::new(),
            checks: BTreeMap::new(),
            originals: BTreeMap::new(),
            bases: BTreeMap::new(),
            tally: Tally::default(),
            caught: BTreeSet::new(),
            failed_at: BTreeMap::new(),
        };
        replica.run.step(0, Input::Tick)?;
        replica.lease_all(spec, 1)?;
        Ok(replica)
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn params(&self) -> &Arc<Vec<f32>> {
        &self.params
    }

    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// `worker`'s unit of the round under way (trained on this version).
    pub fn unit_of(&self, worker: &WorkerId) -> Option<&WorkUnit> {
        self.leases.get(worker)
    }

    /// The check `worker` holds, if any: a sampled unit's training inputs under a fresh
    /// id, on the version [`Replica::base_of`] gives.
    pub fn check_of(&self, worker: &WorkerId) -> Option<&WorkUnit> {
        self.checks.get(worker)
    }

    /// The floats of `version`, if this replica holds them: the current version, or one a
    /// leased or waiting check trains on.
    pub fn base_of(&self, version: u64) -> Option<&Arc<Vec<f32>>> {
        if version == self.version {
            Some(&self.params)
        } else {
            self.bases.get(&version)
        }
    }

    /// Units leased in the round under way (one a member not punished): the updates a
    /// proposer waits for.
    pub fn units(&self) -> usize {
        self.leases.len()
    }

    /// Whether `unit` is a unit of the round under way (not a check's fresh id).
    pub fn is_round_unit(&self, unit: u64) -> bool {
        self.leases.values().any(|u| u.id == unit)
    }

    /// What the run's checks found so far.
    pub fn tally(&self) -> Tally {
        self.tally
    }

    /// Workers whose unit failed a check.
    pub fn caught(&self) -> &BTreeSet<WorkerId> {
        &self.caught
    }

    /// Checks waiting for a member to take them (all members hold one, or only the
    /// unit's own worker is free).
    pub fn checks_waiting(&self) -> usize {
        self.run.replicas().pending().count()
    }

    /// Micro-credits each worker earned, every accepted update's mint summed.
    pub fn credit(&self) -> &BTreeMap<WorkerId, u64> {
        &self.credit
    }

    /// Members proven to have equivocated (credit forfeited, no more units).
    pub fn punished(&self) -> &BTreeSet<WorkerId> {
        &self.punished
    }

    /// The member `proof` (as `agree::wire::equivocation_to_bytes`) proves signed two
    /// values for one slot, if it does and that member is not punished yet: what a value
    /// may carry as evidence.
    pub fn culprit(&self, spec: &RunSpec, proof: &[u8]) -> Option<WorkerId> {
        let proof = agree::wire::equivocation_from_bytes(proof).ok()?;
        let keys: Vec<_> = spec
            .members
            .iter()
            .filter_map(|m| ed25519_dalek::VerifyingKey::from_bytes(&m.0).ok())
            .collect();
        let committee = agree::Committee::new(&keys)?;
        let culprit = WorkerId(proof.culprit(&committee)?.0);
        (!self.punished.contains(&culprit)).then_some(culprit)
    }

    /// Who votes on the next version, in key order: the members admitted, less those
    /// proven to have equivocated and those whose unit failed a re-run in the last
    /// [`SEAT_WINDOW`] versions, and past the first `SEAT_WINDOW` versions only those
    /// whose update was accepted in one of the last `SEAT_WINDOW` (a seat is kept by
    /// verified work: a member gone, or withholding its work, stops counting toward
    /// the quorum, and one that comes back earns its seat again with its next accepted
    /// update). Never empty: if no one has worked, every unpunished member.
    pub fn seats(&self, spec: &RunSpec) -> Vec<WorkerId> {
        let unpunished: Vec<WorkerId> = spec
            .members
            .iter()
            .filter(|m| !self.punished.contains(m))
            .copied()
            .collect();
        let working: Vec<WorkerId> = unpunished
            .iter()
            .filter(|m| {
                let honest = self
                    .failed_at
                    .get(m)
                    .is_none_or(|v| v + SEAT_WINDOW <= self.version);
                let working = self.version < SEAT_WINDOW
                    || self
                        .worked
                        .get(m)
                        .is_some_and(|v| v + SEAT_WINDOW > self.version);
                honest && working
            })
            .copied()
            .collect();
        match (working.is_empty(), unpunished.is_empty()) {
            (false, _) => working,
            (true, false) => unpunished,
            (true, true) => spec.members.clone(),
        }
    }

    /// The committee of [`Replica::seats`]: who certifies the next version.
    pub fn committee(&self, spec: &RunSpec) -> Result<agree::Committee, PeerError> {
        let keys: Vec<_> = self
            .seats(spec)
            .iter()
            .filter_map(|m| ed25519_dalek::VerifyingKey::from_bytes(&m.0).ok())
            .collect();
        agree::Committee::new(&keys).ok_or(PeerError::Invalid("the seats are not a committee"))
    }

    /// Whether `update` (inspected) is the update of a unit this version leased, or of a
    /// check its sender holds: what a proposer collects and what a member expects a
    /// proposal to count.
    pub fn expects(&self, update: &validation::Inspected) -> bool {
        let h = &update.header;
        let of = |u: &WorkUnit| u.id == h.work_unit && u.base_version == h.base_version;
        self.leases
            .get(&h.worker)
            .is_some_and(|u| of(u) && u.base_version == self.version)
            || self.checks.get(&h.worker).is_some_and(of)
    }

    /// Executes height `version + 1` on `updates` (signed update bytes, in order): the
    /// next version, and the value naming it. The same updates give the same value on
    /// every peer. `Err` if any is not a well-formed signed update, or the round
    /// aggregates nothing (no update accepted): no version comes of it.
    pub fn execute(
        &self,
        spec: &RunSpec,
        updates: &[&[u8]],
        evidence: &[Vec<u8>],
    ) -> Result<Executed, PeerError> {
        if updates.len() > agree::ACCEPTED_MAX || evidence.len() > agree::EVIDENCE_MAX {
            return Err(PeerError::Invalid(
                "more updates or proofs than a value names",
            ));
        }
        let start = self.clock_ms + 1;
        let mut next = self.clone();
        // A proven equivocator is acted on first, as on a failed re-run: its credit is
        // forfeited, and it is leased no unit again (its updates of this round still count:
        // they were judged on their own).
        for proof in evidence {
            let culprit = next
                .culprit(spec, proof)
                .ok_or(PeerError::Invalid("evidence that proves nothing new"))?;
            next.punished.insert(culprit);
            next.credit.remove(&culprit);
        }
        let mut value = Value {
            base_version: self.version,
            updates: Vec::with_capacity(updates.len()),
            accepted: Vec::new(),
            evidence: evidence.to_vec(),
            version_hash: [0; 32],
        };
        // Each accepted unit's delta and weight, until the round aggregates.
        let mut deltas: BTreeMap<u64, (Vec<f32>, u64)> = BTreeMap::new();
        let mut aggregated = false;
        next.run.step(start, Input::Tick)?;
        for bytes in updates {
            let update = validation::inspect(bytes, &spec.limits)
                .map_err(|_| PeerError::Invalid("a named update is not a signed update"))?;
            value.updates.push(update.address);
            if let Some(leased) = next.run.check_lease(update.header.work_unit).cloned() {
                next.replayed(spec, &update, bytes, &leased, start)?;
                continue;
            }
            let output = next.run.step(
                start,
                Input::Update {
                    update: &update,
                    copy_of: None,
                    score: None,
                    class: Some(&spec.class),
                },
            )?;
            match output.decided {
                Some(Decided::Accepted(accepted)) => {
                    let delta = SignedUpdate::parse(bytes, &spec.limits)
                        .and_then(|u| u.decode())
                        .map_err(|_| PeerError::Invalid("an accepted update does not decode"))?;
                    deltas.insert(accepted.unit, (delta, accepted.weight));
                    value.accepted.push(Counted {
                        unit: accepted.unit,
                        weight: accepted.weight,
                    });
                    next.worked.insert(update.header.worker, self.version + 1);
                    if accepted.sample == Some(Sample::Replicated) {
                        next.originals.insert(
                            accepted.unit,
                            Original {
                                bytes: Arc::new(bytes.to_vec()),
                                weight: accepted.weight,
                            },
                        );
                        next.bases.insert(self.version, self.params.clone());
                    }
                    if let Some(ledger::Account::Wallet(to)) = accepted.mint.to
                        && !next.punished.contains(&to)
                    {
                        let c = next.credit.entry(to).or_default();
                        *c = c.saturating_add(accepted.mint.amount);
                    }
                }
                Some(Decided::Refused(verdict)) => {
                    if let validation::Verdict::Rejected { reason, .. } = verdict
                        && reason.releases_unit()
                    {
                        next.run.step(
                            start,
                            Input::Refused {
                                worker: update.header.worker,
                                unit: update.header.work_unit,
                            },
                        )?;
                    }
                }
                _ => {}
            }
            aggregated |= next.aggregate_if_due(spec, &output.effects, &mut deltas, start)?;
        }
        let mut last = start;
        if !aggregated {
            // The round waits no longer: its timeout passes, and it closes with what it has.
            last = start + spec.schedule.round_timeout_ms + 1;
            let output = next.run.step(last, Input::Tick)?;
            aggregated = next.aggregate_if_due(spec, &output.effects, &mut deltas, last)?;
        }
        if !aggregated {
            return Err(PeerError::Invalid("the round aggregated no update"));
        }
        next.clock_ms = last + 1;
        next.lease_all(spec, next.clock_ms)?;
        next.forget_checked();
        value.version_hash = next.hash;
        Ok(Executed {
            replica: next,
            value,
        })
    }

    /// Takes the outer step if `effects` say the round is due: the accepted deltas in
    /// unit order (the order the coordinator's core aggregates them in), then the run
    /// moves to the new version. Whether it did.
    fn aggregate_if_due(
        &mut self,
        spec: &RunSpec,
        effects: &[Effect],
        deltas: &mut BTreeMap<u64, (Vec<f32>, u64)>,
        now_ms: u64,
    ) -> Result<bool, PeerError> {
        let Some(round) = effects.iter().find_map(|e| match e {
            Effect::Aggregate { round, .. } => Some(*round),
            _ => None,
        }) else {
            return Ok(false);
        };
        let units = self.run.scheduler().round_updates();
        let mut updates = Vec::with_capacity(units.len());
        for unit in &units {
            let (delta, weight) = deltas.get(unit).ok_or(PeerError::Invalid(
                "the round aggregates a unit never accepted",
            ))?;
            updates.push(WeightedDelta {
                delta,
                weight: *weight,
            });
        }
        let mut outer = spec.outer.build_with(spec.combine, spec.n_params);
        outer.load_state(&self.outer_state)?;
        let mut params = (*self.params).clone();
        outer.step(&mut params, &updates)?;
        let version = self.version + 1;
        self.run
            .step(now_ms, Input::Aggregated { round, version })?;
        self.version = version;
        self.hash = version_hash(version, &params);
        self.params = Arc::new(params);
        self.outer_state = Arc::new(outer.state());
        deltas.clear();
        Ok(true)
    }

    /// Every member asks for work at `now_ms`, in an order drawn from the run's seed and
    /// the version (so no member is always first to a waiting check, and no worker picks
    /// its checker): a member that holds no check may be leased one, and is then leased
    /// its unit of the round on this version as well.
    fn lease_all(&mut self, spec: &RunSpec, now_ms: u64) -> Result<(), PeerError> {
        self.leases.clear();
        let run = &self.run;
        self.checks.retain(|_, u| run.check_lease(u.id).is_some());
        let n = spec.members.len().max(1);
        let first = (run::draw(spec.settings.seed, self.version) % n as u64) as usize;
        for i in 0..n {
            let worker = spec.members[(first + i) % n];
            if self.punished.contains(&worker) {
                continue;
            }
            for _ in 0..2 {
                let output = self.run.step(
                    now_ms,
                    Input::Lease {
                        worker,
                        expected_ms: None,
                        class: Some(&spec.class),
                    },
                )?;
                if let Some(Decided::CheckLeased {
                    worker: w, unit, ..
                }) = output.decided
                {
                    self.checks.insert(w, unit);
                    // And its unit of the round, with the next request.
                    continue;
                }
                for effect in output.effects {
                    if let Effect::Lease {
                        worker: w, unit, ..
                    } = effect
                        && w == worker
                    {
                        self.leases.insert(w, unit);
                    }
                }
                break;
            }
        }
        Ok(())
    }

    /// Drops the updates and versions no check waits for any more.
    fn forget_checked(&mut self) {
        let replicas = self.run.replicas();
        let units: BTreeSet<u64> = replicas
            .pending()
            .map(|p| p.unit.id)
            .chain(replicas.leases().map(|l| l.check.unit.id))
            .collect();
        let versions: BTreeSet<u64> = replicas
            .pending()
            .map(|p| p.unit.base_version)
            .chain(replicas.leases().map(|l| l.check.unit.base_version))
            .collect();
        self.originals.retain(|u, _| units.contains(u));
        self.bases.retain(|v, _| versions.contains(v));
    }

    /// Member `leased.checker`'s re-run of a sampled unit (`update`, its signed bytes
    /// `bytes`), stepped at `now_ms`: compared with the unit's accepted update bit for bit
    /// (payloads as sent; else the relative distance), judged by the run core, and its
    /// outcome applied: the checker's pay, the worker's clawback, a dispute. An upload
    /// that is not the check's (another sender, base or shape) is ignored.
    fn replayed(
        &mut self,
        spec: &RunSpec,
        update: &validation::Inspected,
        bytes: &[u8],
        leased: &run::replicas::LeasedCheck,
        now_ms: u64,
    ) -> Result<(), PeerError> {
        let h = &update.header;
        if h.worker != leased.checker
            || h.base_version != leased.check.unit.base_version
            || h.n_params as usize != spec.n_params
        {
            return Ok(());
        }
        let unit = leased.check.unit.id;
        let worker = leased.check.worker;
        let original = self
            .originals
            .get(&unit)
            .cloned()
            .ok_or(PeerError::Invalid("a check of a unit whose update is gone"))?;
        let malformed = |_| PeerError::Invalid("a named update is not a signed update");
        let sent = SignedUpdate::parse(&original.bytes, &spec.limits).map_err(malformed)?;
        let rerun = SignedUpdate::parse(bytes, &spec.limits).map_err(malformed)?;
        let distance =
            runner::core::checks::payload_distance(&sent, &rerun).unwrap_or(f32::INFINITY);
        let output = self.run.step(
            now_ms,
            Input::Replayed {
                unit,
                worker,
                tokens: original.weight,
                distance,
                class: run::ReplayClass::Same,
                // A caught worker's earlier units are not re-run: their updates are in
                // the chain, not in memory.
                unchecked: &[],
                replica: Some(run::Replica {
                    check: leased.id,
                    checker: leased.checker,
                }),
                disputed: None,
            },
        )?;
        match output.decided {
            Some(Decided::Checked(outcome)) => {
                if outcome.claw_back {
                    let minted =
                        run::credit::unit_credit(spec.settings.flops_per_token, original.weight);
                    if let Some(c) = self.credit.get_mut(&worker) {
                        self.tally.clawed_back += minted.min(*c);
                        *c = c.saturating_sub(minted);
                    }
                    self.caught.insert(worker);
                    self.failed_at.insert(worker, self.version);
                    self.tally.failed += 1;
                } else {
                    self.tally.matched += 1;
                }
                if outcome.accuser.is_some() {
                    self.tally.refuted += 1;
                }
                for mint in [outcome.checker_mint, outcome.disputer_mint]
                    .into_iter()
                    .flatten()
                {
                    if let Some(ledger::Account::Wallet(to)) = mint.to
                        && !self.punished.contains(&to)
                    {
                        let c = self.credit.entry(to).or_default();
                        *c = c.saturating_add(mint.amount);
                    }
                }
            }
            Some(Decided::Disputed { .. }) => self.tally.disputed += 1,
            _ => {}
        }
        Ok(())
    }
}
