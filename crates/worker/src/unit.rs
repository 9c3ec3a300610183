//! One work unit's training, as a function of nothing but its inputs: the base weights,
//! the run's train tokens and shape, and the unit (data address, steps, learning rate).
//! The worker runs it; a validator re-runs it to check a worker's update, which CPU
//! training's determinism makes a bit-for-bit comparison.

use engine::train::OwnedBatch;
use engine::{Backend, OptimizerConfig};
use protocol::WorkUnit;

use crate::WorkerError;

/// The run's data and shape, as a unit needs them.
#[derive(Clone, Copy, Debug)]
pub struct UnitData<'a> {
    /// The run's model: what the delta carries.
    pub model: &'a engine::ModelSpec,
    /// The train split's tokens.
    pub train: &'a [u32],
    pub n_shards: u32,
    pub batch: usize,
    pub seq: usize,
}

/// Trains `unit` from `base` on `backend` (a fresh AdamW; the backend's weights are set
/// to `base`), calling `on_step(step, loss)` after each step; `on_step` returning false
/// stops early. Returns the delta `base - trained` over the model's trainable tensors
/// (`data.model.trainable_len()` floats), or `None` when stopped.
pub fn train(
    backend: &mut dyn Backend,
    base: &[f32],
    data: UnitData<'_>,
    unit: &WorkUnit,
    on_step: &mut dyn FnMut(u32, f32) -> bool,
) -> Result<Option<Vec<f32>>, WorkerError> {
    backend.set_params(base)?;
    backend.reset_optimizer();
    let optimizer = OptimizerConfig::default();
    for step in 0..unit.address.steps {
        let b = data::address::batch(
            &unit.address,
            data.train,
            data.n_shards,
            step,
            data.batch,
            data.seq,
        )?;
        let stats = backend.train_step(&owned_batch(b).as_batch(), &optimizer, unit.lr)?;
        if !on_step(step + 1, stats.loss) {
            return Ok(None);
        }
    }
    let trained = backend.params();
    let delta = data
        .model
        .delta(base, &trained)
        .map_err(engine::EngineError::from)?;
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
