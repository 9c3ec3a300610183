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
//! same lease requests (each member, in committee order) and so computes the same units.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use aggregation::{Combine, OuterConfig, WeightedDelta};
use agree::{Counted, Value};
use protocol::{SignedUpdate, WorkUnit, WorkerId};
use run::{Decided, Input, Run};
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

    /// Units leased in the round under way (one a member not punished).
    pub fn units(&self) -> usize {
        self.leases.len()
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
    /// proven to have equivocated, and past the first [`SEAT_WINDOW`] versions only those
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
                self.version < SEAT_WINDOW
                    || self
                        .worked
                        .get(m)
                        .is_some_and(|v| v + SEAT_WINDOW > self.version)
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

    /// Whether `update` (inspected) is the update of a unit this version leased: what a
    /// proposer collects and what a member expects a proposal to count.
    pub fn expects(&self, update: &validation::Inspected) -> bool {
        self.leases
            .get(&update.header.worker)
            .is_some_and(|u| u.id == update.header.work_unit && u.base_version == self.version)
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
            let output = next.run.step(
                start,
                Input::Update {
                    update: &update,
                    copy_of: None,
                    score: None,
                    class: None,
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

    /// Every member asks for work at `now_ms`, in committee order: the units of the
    /// round on this version.
    fn lease_all(&mut self, spec: &RunSpec, now_ms: u64) -> Result<(), PeerError> {
        self.leases.clear();
        for worker in spec.members.iter().filter(|m| !self.punished.contains(m)) {
            let output = self.run.step(
                now_ms,
                Input::Lease {
                    worker: *worker,
                    expected_ms: None,
                    class: None,
                },
            )?;
            for effect in output.effects {
                if let Effect::Lease {
                    worker: w, unit, ..
                } = effect
                    && w == *worker
                {
                    self.leases.insert(w, unit);
                }
            }
        }
        Ok(())
    }
}
