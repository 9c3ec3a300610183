//! The core's side of catching dishonest workers: scored updates (the loss before and
//! after applying one update alone, judged by `validation::score`) and replay
//! spot-checks (a sampled share of accepted units re-run with `worker::unit::train`,
//! the very function workers train with, and compared with what the worker sent).
//!
//! A spot-check is three steps so that the re-run holds no lock: [`Core::next_check`]
//! hands out a [`CheckJob`], the caller runs it on a backend of its own, and
//! [`Core::finish_check`] compares and commits the outcome: the check's state, the
//! worker's trust and, for a mismatch, the clawback of the unit's credit and the
//! re-queueing of the worker's unchecked units, in one transaction.

use std::sync::Arc;

use engine::train::OwnedBatch;
use engine::{Backend, ModelSpec, Purpose};
use protocol::{SignedUpdate, WorkUnit, WorkerId};
use store::{CheckRow, CheckState};
use validation::score::Score;
use validation::spot_check::Trust;
use validation::{Inspected, Reject, Verdict};

use worker::unit::{RunModel, owned_batch};

use super::{Core, CoreError};
use run::{Class, RunError};

/// What scoring one update needs, taken under the core's lock and run outside it: the
/// decoding of an older base's checkpoint and the version's loss on its random batches
/// happen in [`ScoreTask::run`], not under the lock.
pub struct ScoreTask {
    model: ModelSpec,
    base: Base,
    own: Vec<OwnedBatch>,
    random: Arc<RandomBatches>,
}

/// The weights an update was trained from.
enum Base {
    Current(Arc<Vec<f32>>),
    /// An older version's checkpoint, decoded by the scorer.
    Stored {
        blobs: store::Blobs,
        checkpoint: store::BlobHash,
    },
}

impl Base {
    /// The trainable floats, decoded from the checkpoint if need be (outside the core's
    /// lock).
    fn params(&self, spec: &ModelSpec) -> Result<Arc<Vec<f32>>, RunError> {
        match self {
            Base::Current(params) => Ok(params.clone()),
            Base::Stored { blobs, checkpoint } => {
                let internal = |e: &dyn std::fmt::Display| {
                    RunError::internal(&std::io::Error::other(e.to_string()))
                };
                let bytes = blobs.get(checkpoint).map_err(|e| internal(&e))?;
                let dir = std::path::Path::new(".");
                Ok(Arc::new(
                    engine::checkpoint::trained_from_bytes(dir, &bytes, spec)
                        .map_err(|e| internal(&e))?
                        .trainable,
                ))
            }
        }
    }
}

/// A version's random scoring batches, the same for every update on it, and the
/// version's loss on them, computed by the first scorer that needs it.
pub(super) struct RandomBatches {
    version: u64,
    batches: Vec<OwnedBatch>,
    loss: std::sync::OnceLock<f32>,
}

impl ScoreTask {
    /// The four losses of `delta` (decoded from the update) on `backend`, a backend of
    /// the run's model.
    pub fn run(&self, backend: &mut dyn Backend, delta: &[f32]) -> Result<Score, RunError> {
        let internal =
            |e: &dyn std::fmt::Display| RunError::internal(&std::io::Error::other(e.to_string()));
        let loss = |backend: &mut dyn Backend, batches: &[OwnedBatch]| {
            engine::train::evaluate(backend, batches).map_err(|e| internal(&e))
        };
        let base = self.base.params(&self.model)?;
        backend.set_trainable(&base).map_err(|e| internal(&e))?;
        let random_before = match self.random.loss.get() {
            Some(&l) => l,
            None => {
                // Two scorers may both compute it first: the same bits either way.
                let l = loss(backend, &self.random.batches)?;
                let _ = self.random.loss.set(l);
                l
            }
        };
        let own_before = loss(backend, &self.own)?;
        let trained = worker::unit::apply_delta(&base, delta).map_err(|e| internal(&e))?;
        backend.set_trainable(&trained).map_err(|e| internal(&e))?;
        Ok(Score {
            own_before,
            own_after: loss(backend, &self.own)?,
            random_before,
            random_after: loss(backend, &self.random.batches)?,
        })
    }
}

/// One accepted unit to re-run: its spec, its base weights and the run's data.
pub struct CheckJob {
    pub unit: WorkUnit,
    pub worker: WorkerId,
    base: Base,
    train: Arc<data::Examples>,
    n_shards: u32,
    batch: usize,
    seq: usize,
    model: RunModel,
}

impl CheckJob {
    /// A backend for re-runs of this run's model on `device` (`devices.replay`). Re-runs
    /// train, so it holds gradients and optimizer state.
    pub fn backend(&self, device: &str) -> Result<Box<dyn Backend>, RunError> {
        self.model
            .open_empty(device, Purpose::Train)
            .map_err(|e| RunError::internal(&e))
    }

    /// Trains the unit again; the delta it gives.
    pub fn run(&self, backend: &mut dyn Backend) -> Result<Vec<f32>, RunError> {
        let data = worker::unit::UnitData {
            train: &self.train,
            n_shards: self.n_shards,
            batch: self.batch,
            seq: self.seq,
        };
        let base = self.base.params(&self.model.spec)?;
        worker::unit::train(backend, &base, data, &self.unit, &mut |_, _| true)
            .map_err(|e| RunError::internal(&e))?
            .ok_or_else(|| RunError::internal(&std::io::Error::other("re-run stopped")))
    }
}

/// A backend of the run's model to open: for evaluation (no gradients, no optimizer
/// state) on `device`.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub device: String,
    pub model: RunModel,
}

impl BackendSpec {
    /// Allocates it (a while at the larger presets: call it with no lock held).
    pub fn open(&self) -> Result<Box<dyn Backend>, RunError> {
        self.model
            .open_empty(&self.device, Purpose::Eval)
            .map_err(|e| RunError::internal(&e))
    }
}

/// What a spot-check found.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckOutcome {
    pub unit: u64,
    pub worker: WorkerId,
    pub matched: bool,
    /// Relative L2 distance between the update and its re-run (0: the same payload).
    pub distance: f32,
    /// Micro-credits clawed back.
    pub clawed_back: u64,
    /// The worker's unchecked units queued again because this one failed.
    pub requeued: usize,
    /// Micro-credits minted to the volunteer whose check this was (0: the
    /// coordinator's own re-run, or no match).
    pub checker_credit: u64,
}

impl Core {
    /// What scoring an update for `unit` based on `version` needs (`None` when scoring
    /// is off).
    pub(super) fn score_task(
        &mut self,
        unit: &WorkUnit,
        version: u64,
    ) -> Result<Option<ScoreTask>, RunError> {
        if !self.config.scoring.enabled {
            return Ok(None);
        }
        let internal =
            |e: &dyn std::fmt::Display| RunError::internal(&std::io::Error::other(e.to_string()));
        let base = self.base_of(version).map_err(|e| internal(&e))?;
        let batch = self.config.batch as usize;
        // Batches spread evenly over the unit's steps, its last one included.
        let steps = unit.address.steps;
        let n = self.config.scoring.batches.clamp(1, steps.max(1));
        let mut own = Vec::with_capacity(n as usize);
        for i in 0..n {
            let step = steps - 1 - i * steps / n;
            let b = self
                .train
                .batch(
                    &unit.address,
                    self.config.schedule.n_shards,
                    step,
                    batch,
                    self.seq,
                )
                .map_err(|e| internal(&e))?;
            own.push(owned_batch(b));
        }
        let random = match &self.random_loss {
            Some(random) if random.version == version => random.clone(),
            _ => {
                // Random train windows, the same for every update of a version.
                let span = self.train.span(self.seq) as u64;
                let key = self.config.seed ^ version.rotate_left(17);
                let batches: Vec<OwnedBatch> = (0..n as u64)
                    .map(|b| {
                        let starts: Vec<usize> = (0..batch as u64)
                            .map(|i| (run::draw(key, b * batch as u64 + i) % span) as usize)
                            .collect();
                        self.train.batch_at(&starts, self.seq).map(owned_batch)
                    })
                    .collect::<Result<_, _>>()
                    .map_err(|e| internal(&e))?;
                let random = Arc::new(RandomBatches {
                    version,
                    batches,
                    loss: std::sync::OnceLock::new(),
                });
                self.random_loss = Some(random.clone());
                random
            }
        };
        Ok(Some(ScoreTask {
            model: self.model.spec.clone(),
            base,
            own,
            random,
        }))
    }

    /// The weights of `version`: the current ones, or where its checkpoint is.
    fn base_of(&self, version: u64) -> Result<Base, CoreError> {
        if version == self.current.version {
            return Ok(Base::Current(self.current.params.clone()));
        }
        let row = self
            .store
            .version(version)?
            .ok_or_else(|| CoreError::Inconsistent(format!("no version {version}")))?;
        Ok(Base::Stored {
            blobs: self.store.blobs().clone(),
            checkpoint: row.checkpoint,
        })
    }

    /// A backend of the run's model, for scoring outside the lock: on
    /// `devices.scoring`, forward passes only (no gradients, no optimizer state).
    pub fn scoring_backend(&self) -> Result<Box<dyn Backend>, RunError> {
        self.scoring_backend_spec().open()
    }

    /// What opening a scoring backend needs, to open it outside the lock.
    pub fn scoring_backend_spec(&self) -> BackendSpec {
        BackendSpec {
            device: self.config.devices.scoring.clone(),
            model: self.model.clone(),
        }
    }

    /// Units waiting to be re-run.
    pub fn checks_queued(&self) -> usize {
        self.run.checks().queued()
    }

    /// Checks waiting for volunteers of their workers' classes or leased to them.
    pub fn checks_with_volunteers(&self) -> usize {
        self.run.replicas().len()
    }

    /// The next unit to re-run, if any. Taking it does not change the store: a job that
    /// is never finished stays queued there and is handed out again after a restart.
    pub fn next_check(&mut self) -> Result<Option<CheckJob>, RunError> {
        let internal =
            |e: &dyn std::fmt::Display| RunError::internal(&std::io::Error::other(e.to_string()));
        while let Some(unit) = self.run.take_check() {
            let (Some(u), Some(update)) = (
                self.store.unit(unit).map_err(|e| internal(&e))?,
                self.store.update(unit).map_err(|e| internal(&e))?,
            ) else {
                continue;
            };
            let Some(worker) = WorkerId::parse(&update.worker) else {
                continue;
            };
            if !self
                .rerunnable(&update.blob, u.base_version)
                .map_err(|e| internal(&e))?
            {
                self.skip_check(unit, &update.worker)?;
                continue;
            }
            return Ok(Some(CheckJob {
                unit: u,
                worker,
                base: self.base_of(u.base_version).map_err(|e| internal(&e))?,
                train: self.train.clone(),
                n_shards: self.config.schedule.n_shards,
                batch: self.config.batch as usize,
                seq: self.seq,
                model: self.model.clone(),
            }));
        }
        Ok(None)
    }

    /// Whether a unit can be re-run and compared: its update's blob and its base
    /// version's checkpoint are still on disk (the retention policy keeps them for
    /// queued re-runs and a window of recent rounds; an older unit whose worker is
    /// caught later has neither).
    fn rerunnable(&self, blob: &store::BlobHash, base_version: u64) -> Result<bool, CoreError> {
        if !self.store.blobs().contains(blob) {
            return Ok(false);
        }
        if base_version == self.current.version {
            return Ok(true);
        }
        Ok(self.store.version(base_version)?.is_some_and(|row| {
            row.checkpoint_pruned_ms.is_none() && self.store.blobs().contains(&row.checkpoint)
        }))
    }

    /// Records that `unit` cannot be re-run (its credit and its worker's trust stand).
    fn skip_check(&mut self, unit: u64, worker: &str) -> Result<(), RunError> {
        let row = CheckRow {
            unit,
            worker: worker.to_owned(),
            state: CheckState::Skipped,
            distance: None,
            decided_ms: None,
        };
        self.store
            .write(|tx| {
                tx.set_check(&row)?;
                tx.remove_dispute(unit)
            })
            .map_err(|e| RunError::internal(&e))
    }

    /// Compares unit `unit`'s accepted update with its re-run `replayed` and commits the
    /// outcome. A mismatch claws the unit's credit back, resets its worker's trust,
    /// keeps the update out of its round if that round has not aggregated, and queues
    /// the worker's unchecked units again.
    pub fn finish_check(
        &mut self,
        unit: u64,
        replayed: &[f32],
        now_ms: u64,
    ) -> Result<CheckOutcome, RunError> {
        let internal =
            |e: &dyn std::fmt::Display| RunError::internal(&std::io::Error::other(e.to_string()));
        let update = self
            .store
            .update(unit)
            .map_err(|e| internal(&e))?
            .ok_or_else(|| {
                RunError::new(
                    Class::NotFound,
                    "not_found",
                    format!("no accepted update for unit {unit}"),
                )
            })?;
        let worker = WorkerId::parse(&update.worker)
            .ok_or_else(|| internal(&format!("bad worker id {}", update.worker)))?;
        if !self.store.blobs().contains(&update.blob) {
            self.skip_check(unit, &update.worker)?;
            return Err(RunError::new(
                Class::Gone,
                "check_skipped",
                format!(
                    "unit {unit}'s update was pruned before its re-run finished; its check is skipped"
                ),
            ));
        }
        let bytes = self.update_bytes(&update.blob).map_err(|e| internal(&e))?;
        let signed = SignedUpdate::parse(&bytes, &self.config.limits).map_err(|e| internal(&e))?;
        let ours = signed.header.codec.encode(replayed);
        // Compared as sent: both through the codec (a re-run on another CPU may differ in
        // the last bits, which the tolerance is for).
        let distance = if ours == signed.payload() {
            0.0
        } else {
            let sent = signed.decode().map_err(|e| internal(&e))?;
            let ours = signed
                .header
                .codec
                .decode(&ours, signed.header.n_params)
                .map_err(|e| internal(&e))?;
            relative_distance(&sent, &ours)
        };
        // The re-run is on this coordinator's CPU: bit for bit only for a worker that
        // reported this CPU's class; a GPU's unit within the GPU tolerance.
        let reported = self
            .store
            .worker(&update.worker)
            .map_err(|e| internal(&e))?
            .and_then(|w| w.machine)
            .map(|m| m.class);
        let class = run::ReplayClass::of(reported.as_deref(), &engine::cpu_class());
        let unchecked = self.unchecked_of(&update.worker)?;
        let disputed = self
            .store
            .dispute(unit)
            .map_err(|e| internal(&e))?
            .and_then(|(check, checker)| {
                WorkerId::parse(&checker).map(|checker| run::Replica { check, checker })
            });
        let (next, output) = self.stepped(
            now_ms,
            run::Input::Replayed {
                unit,
                worker,
                tokens: update.weight,
                distance,
                class,
                unchecked: &unchecked,
                replica: None,
                disputed,
            },
        )?;
        let Some(run::Decided::Checked(outcome)) = output.decided else {
            return Err(RunError::broken(format!(
                "a re-run's step decided {:?}",
                output.decided
            )));
        };
        self.commit_check(next, unit, worker, distance, outcome, now_ms)
    }

    /// The worker's units never sampled (what a failed check queues again).
    fn unchecked_of(&self, worker: &str) -> Result<Vec<u64>, RunError> {
        Ok(self
            .store
            .checks(Some(CheckState::Unchecked))
            .map_err(|e| RunError::internal(&e))?
            .into_iter()
            .filter(|c| c.worker == worker)
            .map(|c| c.unit)
            .collect())
    }

    /// Commits what a re-run of `unit` decided (`outcome`, stepped into `next`): the
    /// check, the worker's trust and, on a mismatch, the clawback and the re-queued
    /// units; for a volunteer's matching check, the checker's mint. One transaction.
    fn commit_check(
        &mut self,
        next: run::Run,
        unit: u64,
        worker: WorkerId,
        distance: f32,
        outcome: run::checks::Outcome,
        now_ms: u64,
    ) -> Result<CheckOutcome, RunError> {
        let internal =
            |e: &dyn std::fmt::Display| RunError::internal(&std::io::Error::other(e.to_string()));
        let worker_id = worker.to_string();
        let (matched, trust) = (outcome.matched, outcome.trust);
        let clawback = if outcome.claw_back {
            self.clawback_entry(unit, now_ms)?
        } else {
            None
        };
        // A volunteer is paid for a match, or for a dispute this re-run upholds (and a
        // third replica that upholds a dispute pays both volunteers), which claws the
        // unit back first: the mints are then prepared in turn after the clawback, on a
        // copy of the ledger (rare: a liar caught by volunteers).
        let drafts: Vec<ledger::Draft> = [&outcome.checker_mint, &outcome.disputer_mint]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let mut scratch = if clawback.is_some() && !drafts.is_empty() || drafts.len() > 1 {
            let mut next = self.ledger.read().clone();
            if let Some(entry) = &clawback {
                next.commit(entry.clone()).map_err(|e| internal(&e))?;
            }
            Some(next)
        } else {
            None
        };
        let mut mints = Vec::with_capacity(drafts.len());
        for draft in drafts {
            let prepared = match &scratch {
                Some(ledger) => ledger.prepare(draft, now_ms, &self.authority),
                None => self.ledger.prepare(draft, now_ms, &self.authority),
            };
            let entry = match prepared {
                Ok(ledger::Prepared::New(entry)) => *entry,
                Ok(ledger::Prepared::Existing(seq)) => {
                    return Err(RunError::internal(&super::CoreError::Inconsistent(
                        format!("unit {unit}'s check already has its mint, entry {seq}"),
                    )));
                }
                Err(e) => return Err(RunError::internal(&e)),
            };
            if let Some(ledger) = scratch.as_mut() {
                ledger.commit(entry.clone()).map_err(|e| internal(&e))?;
            }
            mints.push(entry);
        }
        let row = CheckRow {
            unit,
            worker: worker_id.clone(),
            state: if matched {
                CheckState::Verified
            } else {
                CheckState::Failed
            },
            distance: Some(distance),
            decided_ms: Some(now_ms),
        };
        let replicas_moved = next.replicas() != self.run.replicas();
        self.store
            .write(|tx| {
                tx.set_check(&row)?;
                tx.set_trust(&worker_id, trust.verified, trust.failed_unit)?;
                if let Some((accuser, t)) = outcome.accuser {
                    tx.set_trust(&accuser.to_string(), t.verified, t.failed_unit)?;
                }
                tx.remove_dispute(unit)?;
                if replicas_moved {
                    tx.replace_replicas(&super::replica_rows(&next))?;
                }
                for &requeued in &outcome.requeue {
                    tx.set_check(&CheckRow {
                        unit: requeued,
                        worker: worker_id.clone(),
                        state: CheckState::Queued,
                        distance: None,
                        decided_ms: None,
                    })?;
                }
                if let Some(entry) = &clawback {
                    tx.insert_entry(entry)?;
                }
                for entry in &mints {
                    tx.insert_entry(entry)?;
                }
                Ok(())
            })
            .map_err(|e| internal(&e))?;
        let clawed_back = clawback.as_ref().map_or(0, |e| e.amount);
        if let Some(entry) = clawback {
            self.ledger_committed(entry);
        }
        // What the volunteer whose check this is earned (the first mint; a disputer's
        // comes after it).
        let checker_credit = mints.first().map_or(0, |e| e.amount);
        for entry in mints {
            self.ledger_committed(entry);
        }
        self.run = next;
        Ok(CheckOutcome {
            unit,
            worker,
            matched,
            distance,
            clawed_back,
            requeued: outcome.requeue.len(),
            checker_credit,
        })
    }

    /// Why the upload `update` of the check leased under its unit id is refused, if it
    /// is: sent by another key than the volunteer's, on another base, of another shape.
    pub(super) fn check_refusal(&self, update: &Inspected) -> Option<Verdict> {
        let leased = self.run.check_lease(update.header.work_unit)?;
        let h = &update.header;
        if leased.checker != h.worker {
            return Some(Verdict::reject(
                Reject::NotYourLease,
                format!("work unit {} is leased to another worker", h.work_unit),
            ));
        }
        if leased.check.unit.base_version != h.base_version {
            return Some(Verdict::reject(
                Reject::WrongBase,
                format!(
                    "work unit {} trains on version {}, not {}",
                    h.work_unit, leased.check.unit.base_version, h.base_version
                ),
            ));
        }
        if h.n_params != self.run.settings().acceptance.n_params {
            return Some(Verdict::reject(
                Reject::WrongShape,
                format!(
                    "the update has {} values; this run's model has {}",
                    h.n_params,
                    self.run.settings().acceptance.n_params
                ),
            ));
        }
        None
    }

    /// A volunteer's upload of the check leased under its unit id (blob `blob`, durable):
    /// compared with the checked unit's update exactly as the coordinator's own re-run
    /// is, judged bit for bit (`spot_check.tolerance`: the volunteer is of the worker's
    /// class), committed, and answered as an ordinary accepted update. It never joins an
    /// aggregate, and no row names its blob, which is removed.
    pub(super) fn finish_replica(
        &mut self,
        update: &Inspected,
        blob: &store::BlobHash,
        now_ms: u64,
    ) -> Result<protocol::api::SubmitReply, RunError> {
        let internal =
            |e: &dyn std::fmt::Display| RunError::internal(&std::io::Error::other(e.to_string()));
        let check = update.header.work_unit;
        let Some(leased) = self.run.check_lease(check).cloned() else {
            return Err(RunError::broken(format!("check {check} is not leased")));
        };
        let remove_blob = |core: &Core| -> Result<(), RunError> {
            let named = core.store.blob_referenced(blob).map_err(|e| internal(&e))?;
            if !named {
                core.store.blobs().remove(blob).map_err(|e| internal(&e))?;
            }
            Ok(())
        };
        if let Some(verdict) = self.check_refusal(update) {
            remove_blob(self)?;
            return self
                .reject(verdict, Some(&update.header), None, now_ms)
                .map(|never| match never {});
        }
        let unit = leased.check.unit.id;
        let worker = leased.check.worker;
        let original = self
            .store
            .update(unit)
            .map_err(|e| internal(&e))?
            .ok_or_else(|| internal(&format!("no accepted update for checked unit {unit}")))?;
        let sent_bytes = self
            .update_bytes(&original.blob)
            .map_err(|e| internal(&e))?;
        let sent =
            SignedUpdate::parse(&sent_bytes, &self.config.limits).map_err(|e| internal(&e))?;
        let check_bytes = self.update_bytes(blob).map_err(|e| internal(&e))?;
        let checked =
            SignedUpdate::parse(&check_bytes, &self.config.limits).map_err(|e| internal(&e))?;
        let rerun = checked.decode().map_err(|e| internal(&e))?;
        // As the coordinator's own re-run: payloads as sent, equal bytes distance 0,
        // else the relative distance over the re-run's norm.
        let distance = payload_distance(&sent, &checked).map_err(|e| internal(&e))?;
        let norm = rerun
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt() as f32;
        let unchecked = self.unchecked_of(&original.worker)?;
        let (next, output) = self.stepped(
            now_ms,
            run::Input::Replayed {
                unit,
                worker,
                tokens: original.weight,
                distance,
                class: run::ReplayClass::Same,
                unchecked: &unchecked,
                replica: Some(run::Replica {
                    check,
                    checker: leased.checker,
                }),
                disputed: None,
            },
        )?;
        let credit = match output.decided {
            Some(run::Decided::Checked(outcome)) => {
                let outcome = self.commit_check(next, unit, worker, distance, outcome, now_ms)?;
                tracing::info!(
                    unit,
                    worker = %worker,
                    check,
                    checker = %leased.checker,
                    credit = outcome.checker_credit,
                    "spot-check: a volunteer's check matches the unit"
                );
                outcome.checker_credit
            }
            Some(run::Decided::Disputed { rerun, third, .. }) => {
                let checker = leased.checker.to_string();
                self.store
                    .write(|tx| {
                        // A third replica is one of the replicas' rows; the unit's check
                        // row stays queued for it.
                        tx.replace_replicas(&super::replica_rows(&next))?;
                        if rerun {
                            tx.insert_dispute(unit, check, &checker)?;
                        } else if !third {
                            tx.set_check(&CheckRow {
                                unit,
                                worker: original.worker.clone(),
                                state: CheckState::Unchecked,
                                distance: None,
                                decided_ms: None,
                            })?;
                        }
                        Ok(())
                    })
                    .map_err(|e| internal(&e))?;
                self.run = next;
                tracing::warn!(
                    unit,
                    worker = %worker,
                    check,
                    checker = %leased.checker,
                    distance,
                    rerun,
                    third,
                    "spot-check: a volunteer's check does not match the unit; the coordinator re-runs it (rerun) or a third volunteer checks it (third), and the checker is paid if the unit fails"
                );
                0
            }
            other => {
                return Err(RunError::broken(format!(
                    "a check's step decided {other:?}"
                )));
            }
        };
        remove_blob(self)?;
        Ok(protocol::api::SubmitReply {
            unit: check,
            norm,
            round_accepted: self.accepted.len() as u32,
            credit,
        })
    }

    /// Runs every queued check here and now on `backend` (the simulator and tests; the
    /// server runs them on a thread of their own).
    pub fn run_checks(
        &mut self,
        backend: &mut dyn Backend,
        now_ms: u64,
    ) -> Result<Vec<CheckOutcome>, RunError> {
        let mut out = Vec::new();
        while let Some(job) = self.next_check()? {
            let replayed = job.run(backend)?;
            out.push(self.finish_check(job.unit.id, &replayed, now_ms)?);
        }
        Ok(out)
    }

    /// The run's model: architecture, shape and trainable layout.
    pub fn model_spec(&self) -> &ModelSpec {
        &self.model.spec
    }

    /// The run's model with its frozen floats (what opens a backend of the run).
    pub fn run_model(&self) -> &RunModel {
        &self.model
    }

    /// The train split (what units are trained on).
    pub fn train_examples(&self) -> Arc<data::Examples> {
        self.train.clone()
    }

    /// The holdout batches every version's loss is measured on.
    pub fn holdout_batches(&self) -> Arc<Vec<OwnedBatch>> {
        self.holdout.clone()
    }

    /// The holdout loss of the current version.
    pub fn holdout_loss(&self) -> Result<f32, RunError> {
        self.store
            .version(self.current.version)
            .map_err(|e| RunError::internal(&e))?
            .map(|v| v.holdout_loss)
            .ok_or_else(|| RunError::internal(&std::io::Error::other("no current version row")))
    }

    /// A worker's count of consecutive verified units.
    pub fn trust(&self, worker: WorkerId) -> Trust {
        self.run.checks().trust(worker)
    }
}

/// How far a volunteer's re-run (`rerun`) is from the update it checks (`sent`), as
/// sent: 0 for equal payloads of one codec, else [`relative_distance`] of the decoded
/// values (the coordinator's and every peer's comparison).
pub fn payload_distance(
    sent: &SignedUpdate,
    rerun: &SignedUpdate,
) -> Result<f32, protocol::DecodeError> {
    if sent.header.codec == rerun.header.codec && sent.payload() == rerun.payload() {
        return Ok(0.0);
    }
    Ok(relative_distance(&sent.decode()?, &rerun.decode()?))
}

/// `|a - b| / |b|` in f64 (1 when `b` is zero and `a` is not): how far a re-run is from
/// what was sent.
pub fn relative_distance(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = f64::from(x) - f64::from(y);
        diff += d * d;
        norm += f64::from(y) * f64::from(y);
    }
    if !diff.is_finite() {
        return f32::INFINITY;
    }
    if norm == 0.0 {
        return if diff == 0.0 { 0.0 } else { 1.0 };
    }
    (diff / norm).sqrt() as f32
}
