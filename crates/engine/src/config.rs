//! The model's shape: one struct, with the presets hivetrain ships.

use serde::{Deserialize, Serialize};

/// The shape of a GPT-2 style decoder. Everything else (parameter layout, buffer sizes,
/// checkpoint tensor shapes) is derived from these five numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads; must divide `n_embd`.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Longest sequence the model sees (learned positions).
    pub n_ctx: usize,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
}

/// A named preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// For tests: about 0.3M parameters.
    Tiny,
    /// The benchmark model: 4 layers, d 256, 4 heads, context 128 (about 5.3M parameters).
    Small,
    /// 6 layers, d 320, 5 heads, context 128 (about 10M parameters): the ingest benchmark's model.
    Medium,
    /// GPT-2 base shape: 12 layers, d 768, 12 heads, context 1024.
    Base,
}

impl Preset {
    /// All presets, in order of size.
    pub const ALL: [Preset; 4] = [Preset::Tiny, Preset::Small, Preset::Medium, Preset::Base];

    /// The preset's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Medium => "medium",
            Preset::Base => "base",
        }
    }

    /// Parses a preset name.
    pub fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The preset's shape for a vocabulary of `vocab_size` tokens.
    pub fn config(self, vocab_size: usize) -> GptConfig {
        let (n_layer, n_head, n_embd, n_ctx) = match self {
            Preset::Tiny => (2, 2, 32, 64),
            Preset::Small => (4, 4, 256, 128),
            Preset::Medium => (6, 5, 320, 128),
            Preset::Base => (12, 12, 768, 1024),
        };
        GptConfig {
            n_layer,
            n_head,
            n_embd,
            n_ctx,
            vocab_size,
        }
    }
}

/// Why a configuration cannot describe a model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("every size must be at least 1, got {0:?}")]
    Zero(GptConfig),
    #[error("n_head {n_head} does not divide n_embd {n_embd}")]
    HeadsDoNotDivide { n_head: usize, n_embd: usize },
    #[error("the model would have {0} parameters, more than this engine addresses")]
    TooLarge(u128),
}

impl GptConfig {
    /// Checks that the shape is usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = *self;
        if c.n_layer == 0 || c.n_head == 0 || c.n_embd == 0 || c.n_ctx == 0 || c.vocab_size == 0 {
            return Err(ConfigError::Zero(c));
        }
        if !c.n_embd.is_multiple_of(c.n_head) {
            return Err(ConfigError::HeadsDoNotDivide {
                n_head: c.n_head,
                n_embd: c.n_embd,
            });
        }
        let n = c.n_params_u128();
        if n > (u32::MAX as u128) {
            return Err(ConfigError::TooLarge(n));
        }
        Ok(())
    }

    fn n_params_u128(&self) -> u128 {
        let (l, c, t, v) = (
            self.n_layer as u128,
            self.n_embd as u128,
            self.n_ctx as u128,
            self.vocab_size as u128,
        );
        v * c + t * c + l * (12 * c * c + 13 * c) + 2 * c
    }

    /// Number of parameters (the embedding is tied to the output head and counted once).
    pub fn n_params(&self) -> usize {
        self.n_params_u128() as usize
    }

    /// Bytes the CPU backend allocates to train on `batch x seq` windows: parameters,
    /// gradients and two AdamW moments, plus the activations it keeps for the backward
    /// pass (the same sizes as `cpu::Acts`).
    pub fn training_bytes(&self, batch: usize, seq: usize) -> u64 {
        4 * (4 * self.n_params() as u64 + self.activation_floats(batch, seq, true))
    }

    /// Bytes an evaluation backend (`Purpose::Eval`) holds once it has run a `batch x seq`
    /// batch: the parameters and the forward's activations, no gradients, no optimizer
    /// state, no gradient scratch. What sizes the coordinator's pool of scoring backends.
    pub fn eval_bytes(&self, batch: usize, seq: usize) -> u64 {
        4 * (self.n_params() as u64 + self.activation_floats(batch, seq, false))
    }

    /// Values (4 bytes each) of `cpu::Acts` for `batch x seq` windows, with or without
    /// the gradient scratch.
    fn activation_floats(&self, batch: usize, seq: usize, with_grads: bool) -> u64 {
        let (b, t, c, nh, v) = (
            batch as u64,
            seq as u64,
            self.n_embd as u64,
            self.n_head as u64,
            self.vocab_size as u64,
        );
        let n = b * t;
        let per_block = 16 * n * c + 4 * n + b * nh * t * t;
        let outside_blocks = n * (2 * c + v + 4);
        let gradient_scratch = if with_grads { 13 * n * c } else { 0 };
        self.n_layer as u64 * per_block + outside_blocks + gradient_scratch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(preset: Preset, expect: expect_test::Expect) {
        let config = preset.config(8192);
        config.validate().expect("preset is valid");
        expect.assert_eq(&format!(
            "{} {:?} params={}",
            preset.name(),
            config,
            config.n_params()
        ));
    }

    #[test]
    fn presets() {
        check(
            Preset::Tiny,
            expect_test::expect![
                "tiny GptConfig { n_layer: 2, n_head: 2, n_embd: 32, n_ctx: 64, vocab_size: 8192 } params=289664"
            ],
        );
        check(
            Preset::Small,
            expect_test::expect![
                "small GptConfig { n_layer: 4, n_head: 4, n_embd: 256, n_ctx: 128, vocab_size: 8192 } params=5289472"
            ],
        );
        check(
            Preset::Medium,
            expect_test::expect![
                "medium GptConfig { n_layer: 6, n_head: 5, n_embd: 320, n_ctx: 128, vocab_size: 8192 } params=10060800"
            ],
        );
        check(
            Preset::Base,
            expect_test::expect![
                "base GptConfig { n_layer: 12, n_head: 12, n_embd: 768, n_ctx: 1024, vocab_size: 8192 } params=92133888"
            ],
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        let mut c = Preset::Tiny.config(100);
        c.n_head = 3;
        assert_eq!(
            c.validate(),
            Err(ConfigError::HeadsDoNotDivide {
                n_head: 3,
                n_embd: 32
            })
        );
        c.n_layer = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Zero(_))));
    }
}
