//! Inputs of the golden-value test: the tiny model (vocabulary 512), a few batches of
//! fixed tokens, three AdamW steps. scripts/torch_gpt.py computes the expected loss,
//! gradients and losses in float64; crates/engine/tests/it/golden.rs compares.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, ensure};
use engine::{LrSchedule, OptimizerConfig, Preset};

use crate::bench::{RunSpec, dump};

/// Seed of the golden model's weights.
pub(crate) const SEED: u64 = 1234;

pub(crate) fn run(root: &Path, python: &str) -> anyhow::Result<()> {
    let dir = root.join("crates/engine/tests/golden");
    let config = Preset::Tiny.config(512);
    let params = engine::init_params(&config, SEED)?;
    let (steps, batch, seq) = (3, 4, config.n_ctx);
    let tokens: Vec<u32> = (0..4096u64)
        .map(|i| (((i * 2_654_435_761) >> 11) % 512) as u32)
        .collect();
    let offsets: Vec<u32> = (0..(steps * batch) as u32)
        .map(|i| (i * 257) % (4096 - seq as u32 - 1))
        .collect();
    let spec = RunSpec {
        config,
        optimizer: OptimizerConfig::default(),
        schedule: LrSchedule::cosine(1e-2, steps),
        steps,
        batch,
        seq,
        warmup_untimed: 0,
    };
    dump(&dir, &spec, &params, &tokens, &offsets)?;
    let status = Command::new(python)
        .arg(root.join("scripts/torch_gpt.py"))
        .arg("golden")
        .arg(&dir)
        .status()
        .with_context(|| format!("running {python} scripts/torch_gpt.py golden"))?;
    ensure!(status.success(), "the PyTorch golden script failed");
    Ok(())
}
