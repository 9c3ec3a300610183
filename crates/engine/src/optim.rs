//! AdamW hyperparameters and the learning-rate schedule (warmup, then cosine decay).

use serde::{Deserialize, Serialize};

/// AdamW with global gradient-norm clipping, as nanoGPT trains GPT-2.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay, applied to matrices and embeddings only.
    pub weight_decay: f32,
    /// Largest global L2 norm of the gradient; 0 disables clipping.
    pub grad_clip: f32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// Linear warmup to `max_lr`, then cosine decay to `min_lr` at `total_steps`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    pub max_lr: f32,
    pub min_lr: f32,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// A schedule for `total_steps` with 5% warmup (at least one step) and min_lr = max_lr / 10.
    pub fn cosine(max_lr: f32, total_steps: usize) -> LrSchedule {
        LrSchedule {
            max_lr,
            min_lr: max_lr / 10.0,
            warmup_steps: (total_steps / 20).max(1),
            total_steps,
        }
    }

    /// The learning rate of step `step` (counting from 0).
    pub fn lr(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            return self.max_lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        let span = (self.total_steps - self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (self.min_lr as f64 + cosine * (self.max_lr - self.min_lr) as f64) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(schedule: LrSchedule, steps: &[usize], expect: expect_test::Expect) {
        let got: Vec<String> = steps
            .iter()
            .map(|&s| format!("{s}:{:.6}", schedule.lr(s)))
            .collect();
        expect.assert_eq(&got.join(" "));
    }

    #[test]
    fn warmup_then_cosine() {
        check(
            LrSchedule::cosine(1e-3, 100),
            &[0, 1, 4, 5, 52, 99, 100, 1000],
            expect_test::expect![
                "0:0.000200 1:0.000400 4:0.001000 5:0.001000 52:0.000557 99:0.000100 100:0.000100 1000:0.000100"
            ],
        );
    }
}
