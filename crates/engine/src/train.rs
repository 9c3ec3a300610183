//! The training loop above a [`Backend`]: schedule, batches in, losses out.

use crate::{Backend, Batch, EngineError, LrSchedule, OptimizerConfig, StepStats};

/// A batch that owns its tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedBatch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
}

impl OwnedBatch {
    pub fn as_batch(&self) -> Batch<'_> {
        Batch {
            inputs: &self.inputs,
            targets: &self.targets,
            batch: self.batch,
            seq: self.seq,
        }
    }
}

/// Trains steps `start..start + steps` of `schedule`, asking `next_batch(step)` for each
/// batch and telling `on_step` each result. Returns the losses.
pub fn train(
    backend: &mut dyn Backend,
    optimizer: &OptimizerConfig,
    schedule: &LrSchedule,
    start: usize,
    steps: usize,
    next_batch: &mut dyn FnMut(usize) -> OwnedBatch,
    on_step: &mut dyn FnMut(usize, &StepStats),
) -> Result<Vec<f32>, EngineError> {
    let mut losses = Vec::with_capacity(steps);
    for step in start..start + steps {
        let batch = next_batch(step);
        let stats = backend.train_step(&batch.as_batch(), optimizer, schedule.lr(step))?;
        on_step(step, &stats);
        losses.push(stats.loss);
    }
    Ok(losses)
}

/// Mean loss over several batches (each weighted equally).
pub fn evaluate(backend: &mut dyn Backend, batches: &[OwnedBatch]) -> Result<f32, EngineError> {
    if batches.is_empty() {
        return Ok(f32::NAN);
    }
    let mut total = 0.0f64;
    for batch in batches {
        total += backend.eval_loss(&batch.as_batch())? as f64;
    }
    Ok((total / batches.len() as f64) as f32)
}
