//! Integration tests of the engine through its public API.

mod checkpoint;
mod determinism;
mod generate;
mod golden;
mod gradcheck;
mod purpose;

use engine::train::OwnedBatch;
use engine::{Backend, GptConfig};

/// A model small enough for finite differences but with every part present.
pub(crate) fn micro_config() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        n_ctx: 8,
        vocab_size: 37,
    }
}

/// Deterministic pseudo-random tokens.
pub(crate) fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((((i + salt) * 2_654_435_761usize) >> 7) % vocab) as u32)
        .collect()
}

pub(crate) fn batch(config: &GptConfig, b: usize, t: usize, salt: usize) -> OwnedBatch {
    let all = tokens(b * t + 1, config.vocab_size, salt);
    OwnedBatch {
        inputs: all[..b * t].to_vec(),
        targets: all[1..].to_vec(),
        batch: b,
        seq: t,
    }
}

pub(crate) fn backend(config: GptConfig, params: Vec<f32>, threads: usize) -> Box<dyn Backend> {
    engine::open_backend(&format!("cpu:{threads}"), config, params).expect("cpu backend")
}
