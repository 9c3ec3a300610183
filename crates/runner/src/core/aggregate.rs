//! A round's aggregation in three steps, so that a driver holds no lock across it:
//! [`Core::aggregation_job`] takes what the round needs (its units' blobs, the weights,
//! the outer optimizer and the evaluator) under the lock; [`AggregationJob::run`]
//! decodes the updates, takes the outer step, evaluates the holdout and writes the two
//! fsynced blobs with no lock; [`Core::finish_aggregation`] judges the result again
//! against the round as it stands then (an update accepted late or a re-run that failed
//! meanwhile changes what the round aggregates: the job is run again) and commits the
//! version in one transaction.
//!
//! Aggregation is deterministic, so a job run twice, or again after a restart, gives the
//! same version.

use std::sync::Arc;

use aggregation::{OuterOptimizer, WeightedDelta};
use engine::train::OwnedBatch;
use engine::{Backend, ModelSpec};
use protocol::SignedUpdate;
use store::{BlobHash, VersionRow};

use super::{Core, CoreError, Current, checkpoint_bytes, persist_effects, retention};

/// One round to aggregate, with everything it needs; run it with no lock held.
pub struct AggregationJob {
    round: u64,
    base_version: u64,
    /// The units the round aggregates, in id order, with their blob and weight.
    inputs: Vec<(u64, BlobHash, u64)>,
    params: Arc<Vec<f32>>,
    outer: Box<dyn OuterOptimizer>,
    /// The optimizer's state before the step, to restore when the result is not kept.
    saved: Vec<f32>,
    evaluator: Box<dyn Backend>,
    holdout: Arc<Vec<OwnedBatch>>,
    model: ModelSpec,
    /// A fine-tune's base file hash, named in each checkpoint.
    base_sha256: Option<String>,
    blobs: store::Blobs,
    limits: protocol::Limits,
}

/// A finished [`AggregationJob`]: the parts it borrowed from the core and its result.
pub struct Aggregated {
    round: u64,
    base_version: u64,
    units: Vec<u64>,
    outer: Box<dyn OuterOptimizer>,
    saved: Vec<f32>,
    evaluator: Box<dyn Backend>,
    outcome: Result<Stepped, CoreError>,
}

/// The next version, its blobs already durable.
struct Stepped {
    params: Vec<f32>,
    loss: f32,
    checkpoint: Vec<u8>,
    checkpoint_hash: BlobHash,
    optimizer_hash: BlobHash,
}

impl std::fmt::Debug for AggregationJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregationJob")
            .field("round", &self.round)
            .field("units", &self.inputs.len())
            .finish()
    }
}

impl AggregationJob {
    /// The round this job aggregates.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Decodes the round's updates, takes the outer step, evaluates the new weights on
    /// the holdout and writes the checkpoint and the optimizer's state as blobs.
    pub fn run(mut self) -> Aggregated {
        let outcome = self.step();
        Aggregated {
            round: self.round,
            base_version: self.base_version,
            units: self.inputs.iter().map(|(unit, _, _)| *unit).collect(),
            outer: self.outer,
            saved: self.saved,
            evaluator: self.evaluator,
            outcome,
        }
    }

    fn step(&mut self) -> Result<Stepped, CoreError> {
        let mut deltas = Vec::with_capacity(self.inputs.len());
        for (unit, blob, weight) in &self.inputs {
            let bytes = self
                .blobs
                .get_checked(blob, |b| super::update_intact(b, blob))?;
            let delta = SignedUpdate::parse(&bytes, &self.limits)
                .and_then(|u| u.decode())
                .map_err(|e| CoreError::Inconsistent(format!("stored update {unit}: {e}")))?;
            deltas.push((delta, *weight));
        }
        let updates: Vec<WeightedDelta<'_>> = deltas
            .iter()
            .map(|(delta, weight)| WeightedDelta {
                delta,
                weight: *weight,
            })
            .collect();
        let mut params = (*self.params).clone();
        self.outer.step(&mut params, &updates)?;
        drop(deltas);
        self.evaluator.set_trainable(&params)?;
        let loss = engine::train::evaluate(self.evaluator.as_mut(), &self.holdout)?;
        // A diverged model (only a run with unchecked values can make one) scores as
        // infinitely bad: SQLite keeps no NaN.
        let loss = if loss.is_nan() { f32::INFINITY } else { loss };
        let version = self.base_version + 1;
        let checkpoint = checkpoint_bytes(
            &self.model,
            &params,
            version,
            Some(self.round),
            self.base_sha256.as_deref(),
        )?;
        let checkpoint_hash = self.blobs.put(&checkpoint)?;
        let state: Vec<u8> = self
            .outer
            .state()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let optimizer_hash = self.blobs.put(&state)?;
        Ok(Stepped {
            params,
            loss,
            checkpoint,
            checkpoint_hash,
            optimizer_hash,
        })
    }
}

impl Core {
    /// Leaves due aggregations to the caller, who runs them outside its lock with
    /// [`Core::aggregation_job`] and [`Core::finish_aggregation`] (the HTTP driver does).
    /// Without it, the core aggregates a due round at once, inside the call that closed
    /// it (the simulator and tests that drive the core by hand).
    pub fn defer_aggregation(&mut self) {
        self.deferred = true;
    }

    /// Whether an [`AggregationJob`] is out, not yet finished.
    pub fn aggregating(&self) -> bool {
        self.outer.is_none()
    }

    /// The round waiting to be aggregated, if any and none is being aggregated already.
    pub fn aggregation_job(&mut self) -> Result<Option<AggregationJob>, CoreError> {
        let Some((round, base_version)) = self.run.scheduler().pending_aggregate() else {
            return Ok(None);
        };
        if base_version != self.current.version {
            return Err(CoreError::Inconsistent(format!(
                "round {round} is based on version {base_version}, the model is at {}",
                self.current.version
            )));
        }
        let inputs = self.round_inputs(round)?;
        if self.outer.is_none() || self.evaluator.is_none() {
            // Both are out with the job under way; it commits or hands them back.
            return Ok(None);
        }
        let (Some(outer), Some(evaluator)) = (self.outer.take(), self.evaluator.take()) else {
            unreachable!("both were just seen");
        };
        let saved = outer.state();
        Ok(Some(AggregationJob {
            round,
            base_version,
            inputs,
            params: self.current.params.clone(),
            outer,
            saved,
            evaluator,
            holdout: self.holdout.clone(),
            model: self.model.spec.clone(),
            base_sha256: self.run_info.base.as_ref().map(|b| b.sha256.clone()),
            blobs: self.store.blobs().clone(),
            limits: self.config.limits,
        }))
    }

    /// What round `round` aggregates: the units the scheduler counts in it (its own
    /// accepted units and late ones of earlier rounds accepted during it), less those
    /// whose spot-check already failed, with their blobs and weights.
    fn round_inputs(&self, round: u64) -> Result<Vec<(u64, BlobHash, u64)>, CoreError> {
        self.run
            .scheduler()
            .round_updates()
            .into_iter()
            .filter(|&u| !self.run.checks().failed(u))
            .map(|unit| {
                let a = self.accepted.get(&unit).ok_or_else(|| {
                    CoreError::Inconsistent(format!(
                        "round {round} counts unit {unit} as accepted but holds no update for it"
                    ))
                })?;
                Ok((unit, a.blob.clone(), a.weight))
            })
            .collect()
    }

    /// Commits a finished job's version if the round still aggregates what the job did;
    /// `Ok(false)` when it does not (the job's blobs go, and the caller takes the job
    /// again). Either way the optimizer and the evaluator are back in the core.
    pub fn finish_aggregation(&mut self, done: Aggregated, now_ms: u64) -> Result<bool, CoreError> {
        let Aggregated {
            round,
            base_version,
            units,
            mut outer,
            saved,
            evaluator,
            outcome,
        } = done;
        self.evaluator = Some(evaluator);
        let current = self.run.scheduler().pending_aggregate() == Some((round, base_version))
            && base_version == self.current.version
            && self
                .round_inputs(round)
                .is_ok_and(|inputs| inputs.iter().map(|(u, _, _)| *u).eq(units.iter().copied()));
        let stepped = match outcome {
            Ok(stepped) if current => stepped,
            other => {
                outer.load_state(&saved)?;
                self.outer = Some(outer);
                let stepped = other?;
                self.forget_blobs(&[&stepped.checkpoint_hash, &stepped.optimizer_hash]);
                tracing::info!(
                    round,
                    "the round changed while it aggregated (an update accepted late or a failed re-run); aggregating it again"
                );
                return Ok(false);
            }
        };
        let committed = self.commit_version(round, units, stepped, now_ms);
        if committed.is_err() {
            outer.load_state(&saved)?;
        }
        self.outer = Some(outer);
        committed.map(|()| true)
    }

    /// Removes blobs written for a result that was not kept, unless a row names them
    /// (a checkpoint can be byte-equal to a kept one).
    fn forget_blobs(&self, blobs: &[&BlobHash]) {
        for blob in blobs {
            if let Ok(false) = self.store.blob_referenced(blob) {
                let _ = self.store.blobs().remove(blob);
            }
        }
    }

    /// Aggregates the round the scheduler waits on, if any, into the next version, here
    /// and now.
    pub(super) fn aggregate_if_pending(&mut self, now_ms: u64) -> Result<(), CoreError> {
        while let Some(job) = self.aggregation_job()? {
            if self.finish_aggregation(job.run(), now_ms)? {
                break;
            }
        }
        Ok(())
    }

    fn commit_version(
        &mut self,
        round: u64,
        units: Vec<u64>,
        stepped: Stepped,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let version = self.current.version + 1;
        let row = VersionRow {
            version,
            parent: Some(self.current.version),
            round: Some(round),
            checkpoint: stepped.checkpoint_hash.clone(),
            optimizer: Some(stepped.optimizer_hash),
            holdout_loss: stepped.loss,
            created_ms: now_ms,
            updates: units,
            checkpoint_pruned_ms: None,
            optimizer_pruned_ms: None,
        };
        let (next, output) = self
            .stepped(now_ms, run::Input::Aggregated { round, version })
            .map_err(|e| CoreError::Inconsistent(e.message))?;
        let effects = output.effects;
        // What the new version makes unneeded is marked with it, and removed after.
        let prune = self.retention_plan(&row, next.scheduler().round())?;
        let replicas_moved = next.replicas() != self.run.replicas();
        self.store.write(|tx| {
            tx.insert_version(&row)?;
            retention::mark(tx, &prune, now_ms)?;
            if replicas_moved {
                tx.replace_replicas(&super::replica_rows(&next))?;
            }
            persist_effects(tx, next.scheduler(), &effects, now_ms)
        })?;
        self.run = next;
        self.unsaved_since_ms = None;
        self.current = Current {
            version,
            params: Arc::new(stepped.params),
            checkpoint: Arc::new(stepped.checkpoint),
            checkpoint_hash: stepped.checkpoint_hash,
        };
        self.accepted.clear();
        self.remove_pruned(&prune);
        Ok(())
    }
}
