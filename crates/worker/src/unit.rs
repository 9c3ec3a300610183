//! One work unit's training, as a function of nothing but its inputs: the base weights,
//! the run's train examples and shape, and the unit (data address, steps, learning rate).
//! The worker runs it; a validator re-runs it to check a worker's update, which CPU
//! training's determinism makes a bit-for-bit comparison.

use std::sync::Arc;

use engine::train::OwnedBatch;
use engine::{Backend, EngineError, ModelSpec, OptimizerConfig, Purpose};
use protocol::WorkUnit;

use crate::WorkerError;

/// A run's model with its frozen floats: what opens a backend of the run from a
/// trainable vector (a version's weights, as checkpoints and deltas carry them).
///
/// When every tensor trains nothing is frozen; with a LoRA adapter the frozen floats are
/// the pretrained base, the same for every version of the run, held once and shared.
#[derive(Clone)]
pub struct RunModel {
    pub spec: ModelSpec,
    frozen: Arc<Vec<f32>>,
}

impl std::fmt::Debug for RunModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunModel")
            .field("spec", &self.spec.id())
            .field("frozen", &self.frozen.len())
            .finish()
    }
}

impl RunModel {
    /// `spec` with `frozen`, the floats before its trainable ones in the full vector.
    pub fn new(spec: ModelSpec, frozen: Arc<Vec<f32>>) -> Result<RunModel, EngineError> {
        let want = spec.n_params() - spec.trainable_len();
        if frozen.len() != want {
            return Err(EngineError::from(engine::SpecError::Length {
                what: "the frozen base",
                layout: "frozen",
                got: frozen.len(),
                want,
            }));
        }
        Ok(RunModel { spec, frozen })
    }

    /// A model with nothing frozen (every tensor trains).
    pub fn trained_in_full(spec: ModelSpec) -> Result<RunModel, EngineError> {
        RunModel::new(spec, Arc::new(Vec::new()))
    }

    /// Opens a backend on `device` holding the version whose trainable floats are
    /// `trainable`; it shares the frozen base with this model rather than copying it.
    pub fn open(
        &self,
        device: &str,
        trainable: &[f32],
        purpose: Purpose,
    ) -> Result<Box<dyn Backend>, EngineError> {
        if trainable.len() != self.spec.trainable_len() {
            return Err(EngineError::from(engine::SpecError::Length {
                what: "the trainable vector",
                layout: "trainable",
                got: trainable.len(),
                want: self.spec.trainable_len(),
            }));
        }
        engine::open_model_frozen(
            device,
            &self.spec,
            self.frozen.clone(),
            trainable.to_vec(),
            purpose,
        )
    }

    /// Opens a backend on `device` whose trainable floats are zeros, to be set.
    pub fn open_empty(
        &self,
        device: &str,
        purpose: Purpose,
    ) -> Result<Box<dyn Backend>, EngineError> {
        self.open(device, &vec![0.0; self.spec.trainable_len()], purpose)
    }
}

/// `base - delta`, element by element: a delta applied to the trainable floats it was
/// taken from.
pub fn apply_delta(base: &[f32], delta: &[f32]) -> Result<Vec<f32>, EngineError> {
    if base.len() != delta.len() {
        return Err(EngineError::from(engine::SpecError::Length {
            what: "the delta",
            layout: "trainable",
            got: delta.len(),
            want: base.len(),
        }));
    }
    Ok(base.iter().zip(delta).map(|(b, d)| b - d).collect())
}

/// The run's data and shape, as a unit needs them.
#[derive(Clone, Copy, Debug)]
pub struct UnitData<'a> {
    /// The train split.
    pub train: &'a data::Examples,
    pub n_shards: u32,
    pub batch: usize,
    pub seq: usize,
}

/// Trains `unit` from `base` (the trainable floats of its base version) on `backend` (a
/// fresh AdamW; the backend's trainable floats are set to `base`, its frozen ones are the
/// run's), calling `on_step(step, loss)` after each step; `on_step` returning false stops
/// early. Returns the delta `base - trained` over the trainable floats, or `None` when
/// stopped.
pub fn train(
    backend: &mut dyn Backend,
    base: &[f32],
    data: UnitData<'_>,
    unit: &WorkUnit,
    on_step: &mut dyn FnMut(u32, f32) -> bool,
) -> Result<Option<Vec<f32>>, WorkerError> {
    backend.set_trainable(base)?;
    backend.reset_optimizer();
    let optimizer = OptimizerConfig::default();
    for step in 0..unit.address.steps {
        let b = data
            .train
            .batch(&unit.address, data.n_shards, step, data.batch, data.seq)?;
        let stats = backend.train_step(&owned_batch(b).as_batch(), &optimizer, unit.lr)?;
        if !on_step(step + 1, stats.loss) {
            return Ok(None);
        }
    }
    let trained = backend.trainable();
    let delta = base.iter().zip(&trained).map(|(b, t)| b - t).collect();
    Ok(Some(delta))
}

/// A data batch as the engine takes it. It lives here because this is the first crate
/// above both: `data` does not depend on `engine`, and `engine` knows no tokenizer.
pub fn owned_batch(b: data::TokenBatch) -> OwnedBatch {
    OwnedBatch {
        inputs: b.inputs,
        targets: b.targets,
        batch: b.batch,
        seq: b.seq,
    }
}
