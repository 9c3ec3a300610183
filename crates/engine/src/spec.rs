//! What a run trains, as one value: the architecture and its shape, the named tensors of
//! the full parameter vector, and the trainable layout (which of them a unit trains and
//! a delta carries, in which order).
//!
//! Everything above the engine that used to assume "the model is GPT-2" or "a delta is
//! the whole parameter vector" asks the [`ModelSpec`] instead: the coordinator sizes
//! deltas and the outer optimizer by [`ModelSpec::trainable_len`], credits work by
//! [`ModelSpec::train_flops_per_token`], and workers build their backend from the spec
//! the run announces. A new architecture (Llama) is a new [`Architecture`] variant; a
//! frozen base with trained adapters (LoRA) is a new [`Trainable`] variant whose tensors
//! are the adapters. Neither changes a caller.
//!
//! Two architectures (GPT-2 and Llama) and one trainable layout (every tensor trained).
//! A delta is then exactly the flat parameter vector in its layout's order, so a GPT-2
//! delta's bytes are what they were before the spec existed.

use serde::{Deserialize, Serialize};

use crate::{
    ConfigError, GptConfig, LlamaConfig, LlamaConfigError, LlamaLayout, ParamLayout, Preset,
    TensorSpec,
};

/// The network's family and shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// A GPT-2 decoder: learned positions, LayerNorm, GELU, tied output head.
    Gpt2(GptConfig),
    /// A Llama decoder (HF `LlamaForCausalLM`): rotary positions, RMSNorm, grouped-query
    /// attention, SwiGLU, tied or untied head. SmolLM2 is one.
    Llama(LlamaConfig),
}

impl Architecture {
    /// Longest sequence the model takes.
    pub fn n_ctx(&self) -> usize {
        match self {
            Architecture::Gpt2(c) => c.n_ctx,
            Architecture::Llama(c) => c.max_seq,
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        match self {
            Architecture::Gpt2(c) => c.vocab_size,
            Architecture::Llama(c) => c.vocab_size,
        }
    }

    /// The family's name as HF's `model_type` spells it.
    pub fn family(&self) -> &'static str {
        match self {
            Architecture::Gpt2(_) => "gpt2",
            Architecture::Llama(_) => "llama",
        }
    }
}

/// Which tensors a unit trains and a delta carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    /// Every tensor of the parameter vector, in its flat order: a delta is the whole
    /// vector. (LoRA will add a variant naming a rank and target modules; its tensors are
    /// the adapters, and the base stays frozen.)
    All,
}

/// A run's model: architecture, parameter layout and trainable layout.
///
/// Serialized as `{"name":"small","architecture":{"gpt2":{..}},"trainable":"all"}`; the
/// protocol carries it in `RunInfo`, and [`ModelSpec::id`] names it in one string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A human name (the preset that produced it: `tiny`, `small`, ...). Part of the id.
    pub name: String,
    pub architecture: Architecture,
    pub trainable: Trainable,
}

/// Why a spec cannot describe a model, or a vector does not fit it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Llama(#[from] LlamaConfigError),
    #[error("model {name} is a {family}; {what} needs a GPT-2")]
    NotGpt2 {
        name: String,
        family: &'static str,
        what: &'static str,
    },
    #[error("{what} has {got} floats, the model's {layout} layout has {want}")]
    Length {
        what: &'static str,
        layout: &'static str,
        got: usize,
        want: usize,
    },
}

impl ModelSpec {
    /// The spec of a preset at a vocabulary of `vocab_size` tokens, every tensor trained.
    pub fn preset(preset: Preset, vocab_size: usize) -> ModelSpec {
        ModelSpec::gpt2(preset.name(), preset.config(vocab_size))
    }

    /// A GPT-2 of shape `config`, every tensor trained.
    pub fn gpt2(name: &str, config: GptConfig) -> ModelSpec {
        ModelSpec {
            name: name.to_string(),
            architecture: Architecture::Gpt2(config),
            trainable: Trainable::All,
        }
    }

    /// A Llama of shape `config`, every tensor trained.
    pub fn llama(name: &str, config: LlamaConfig) -> ModelSpec {
        ModelSpec {
            name: name.to_string(),
            architecture: Architecture::Llama(config),
            trainable: Trainable::All,
        }
    }

    /// Checks that the shape is usable.
    pub fn validate(&self) -> Result<(), SpecError> {
        match &self.architecture {
            Architecture::Gpt2(config) => Ok(config.validate()?),
            Architecture::Llama(config) => Ok(config.validate()?),
        }
    }

    /// The GPT-2 shape, for what only GPT-2 has today (its checkpoint format); `what`
    /// names that use in the error a Llama gets.
    pub fn gpt_config(&self, what: &'static str) -> Result<&GptConfig, SpecError> {
        match &self.architecture {
            Architecture::Gpt2(config) => Ok(config),
            other => Err(SpecError::NotGpt2 {
                name: self.name.clone(),
                family: other.family(),
                what,
            }),
        }
    }

    /// Longest sequence the model takes.
    pub fn n_ctx(&self) -> usize {
        self.architecture.n_ctx()
    }

    /// The full parameter vector's named tensors (frozen and trained alike).
    pub fn layout(&self) -> ParamLayout {
        match &self.architecture {
            Architecture::Gpt2(config) => ParamLayout::new(config),
            Architecture::Llama(config) => LlamaLayout::new(config).into_table(),
        }
    }

    /// Floats in the full parameter vector (what a checkpoint holds).
    pub fn n_params(&self) -> usize {
        match &self.architecture {
            Architecture::Gpt2(config) => config.n_params(),
            Architecture::Llama(config) => config.n_params(),
        }
    }

    /// Parameters initialized from `seed` as the architecture's reference
    /// implementation initializes them (same seed, same bits, any machine).
    pub fn init_params(&self, seed: u64) -> Result<Vec<f32>, crate::EngineError> {
        match &self.architecture {
            Architecture::Gpt2(config) => crate::init_params(config, seed),
            Architecture::Llama(config) => Ok(crate::llama::init_params(config, seed)?),
        }
    }

    /// The tensors a unit trains, in the order a delta carries them. Their offsets are
    /// into the full parameter vector.
    pub fn trainable_tensors(&self) -> Vec<TensorSpec> {
        match self.trainable {
            Trainable::All => self.layout().tensors().to_vec(),
        }
    }

    /// Floats in a delta.
    pub fn trainable_len(&self) -> usize {
        match self.trainable {
            Trainable::All => self.n_params(),
        }
    }

    /// Training FLOPs per token: the rule credit is computed from. For every weight
    /// trained it is the usual 6 per parameter (2 forward, 4 backward: the activation
    /// and the weight gradients). A frozen base will cost 4 per frozen parameter (no
    /// weight gradient) plus 6 per adapter parameter.
    ///
    /// GPT-2 counts every parameter (its rule since the first run; credit history
    /// depends on it). A Llama counts the parameters that enter a matrix product: an
    /// untied input embedding is a table lookup and costs nothing, so it is left out;
    /// a tied one is the output head and counts once. Attention's `t^2` terms are left
    /// out, as in the usual 6N rule.
    pub fn train_flops_per_token(&self) -> u64 {
        let multiplied = match &self.architecture {
            Architecture::Gpt2(config) => config.n_params(),
            Architecture::Llama(config) if config.tie_embeddings => config.n_params(),
            Architecture::Llama(config) => config.n_params() - config.vocab_size * config.hidden,
        };
        match self.trainable {
            Trainable::All => 6 * multiplied as u64,
        }
    }

    /// The delta a unit sends: `base - trained` over the trainable tensors, in delta
    /// order. With every tensor trained this is the element-wise difference of the
    /// whole vectors.
    pub fn delta(&self, base: &[f32], trained: &[f32]) -> Result<Vec<f32>, SpecError> {
        self.check_params("the base", base.len())?;
        self.check_params("the trained model", trained.len())?;
        match self.trainable {
            Trainable::All => Ok(base.iter().zip(trained).map(|(b, t)| b - t).collect()),
        }
    }

    /// The parameters `base - delta`: a delta applied to the tensors it carries, every
    /// other tensor as in `base`.
    pub fn apply_delta(&self, base: &[f32], delta: &[f32]) -> Result<Vec<f32>, SpecError> {
        self.check_params("the base", base.len())?;
        if delta.len() != self.trainable_len() {
            return Err(SpecError::Length {
                what: "the delta",
                layout: "trainable",
                got: delta.len(),
                want: self.trainable_len(),
            });
        }
        match self.trainable {
            Trainable::All => Ok(base.iter().zip(delta).map(|(b, d)| b - d).collect()),
        }
    }

    /// A stable name of the whole spec: `name-` and the first 16 hex digits of the
    /// blake3 hash of its JSON (field order is fixed by the struct), so two runs that
    /// announce the same id train the same tensors of the same model.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let hash = blake3::hash(&json).to_hex();
        format!("{}-{}", self.name, &hash.as_str()[..16])
    }

    fn check_params(&self, what: &'static str, got: usize) -> Result<(), SpecError> {
        if got == self.n_params() {
            return Ok(());
        }
        Err(SpecError::Length {
            what,
            layout: "parameter",
            got,
            want: self.n_params(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(spec: &ModelSpec, expect: expect_test::Expect) {
        spec.validate().expect("valid");
        let tensors = spec.trainable_tensors();
        expect.assert_eq(&format!(
            "{}\nid={} params={} trainable={} tensors={} first={} flops/token={}",
            serde_json::to_string(spec).expect("json"),
            spec.id(),
            spec.n_params(),
            spec.trainable_len(),
            tensors.len(),
            tensors[0].name,
            spec.train_flops_per_token(),
        ));
        let back: ModelSpec =
            serde_json::from_str(&serde_json::to_string(spec).expect("json")).expect("parse");
        assert_eq!(&back, spec);
    }

    #[test]
    fn presets() {
        check(
            &ModelSpec::preset(Preset::Tiny, 8192),
            expect_test::expect![[r#"
                {"name":"tiny","architecture":{"gpt2":{"n_layer":2,"n_head":2,"n_embd":32,"n_ctx":64,"vocab_size":8192}},"trainable":"all"}
                id=tiny-1c5409fae64940e1 params=289664 trainable=289664 tensors=28 first=transformer.wte.weight flops/token=1737984"#]],
        );
        check(
            &ModelSpec::preset(Preset::Small, 8192),
            expect_test::expect![[r#"
                {"name":"small","architecture":{"gpt2":{"n_layer":4,"n_head":4,"n_embd":256,"n_ctx":128,"vocab_size":8192}},"trainable":"all"}
                id=small-94649b435eeefc3e params=5289472 trainable=5289472 tensors=52 first=transformer.wte.weight flops/token=31736832"#]],
        );
    }

    #[test]
    fn llama_specs() {
        check(
            &ModelSpec::llama("smollm2-135m", LlamaConfig::smollm2_135m(2048)),
            expect_test::expect![[r#"
                {"name":"smollm2-135m","architecture":{"llama":{"hidden":576,"intermediate":1536,"layers":30,"heads":9,"kv_heads":3,"head_dim":64,"vocab_size":49152,"rope_theta":100000.0,"rms_eps":0.00001,"tie_embeddings":true,"max_seq":2048}},"trainable":"all"}
                id=smollm2-135m-1fb1f0dde1e21086 params=134515008 trainable=134515008 tensors=272 first=model.embed_tokens.weight flops/token=807090048"#]],
        );
        check(
            &ModelSpec::llama(
                "untied",
                LlamaConfig {
                    tie_embeddings: false,
                    ..LlamaConfig::smollm2_135m(128)
                },
            ),
            expect_test::expect![[r#"
                {"name":"untied","architecture":{"llama":{"hidden":576,"intermediate":1536,"layers":30,"heads":9,"kv_heads":3,"head_dim":64,"vocab_size":49152,"rope_theta":100000.0,"rms_eps":0.00001,"tie_embeddings":false,"max_seq":128}},"trainable":"all"}
                id=untied-94d3039ab3e1ce57 params=162826560 trainable=162826560 tensors=273 first=model.embed_tokens.weight flops/token=807090048"#]],
        );
        let spec = ModelSpec::llama("smollm2-135m", LlamaConfig::smollm2_135m(2048));
        let got = match spec.gpt_config("a GPT-2 checkpoint") {
            Ok(config) => format!("{config:?}"),
            Err(e) => e.to_string(),
        };
        expect_test::expect!["model smollm2-135m is a llama; a GPT-2 checkpoint needs a GPT-2"]
            .assert_eq(&got);
    }

    /// With every tensor trained, a delta and its application are the element-wise
    /// differences of whole vectors, so deltas keep the bytes they had before the spec.
    #[test]
    fn delta_round_trip_and_lengths() {
        let spec = ModelSpec::preset(Preset::Tiny, 97);
        let n = spec.n_params();
        let base: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.25).collect();
        let trained: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.5).collect();
        let delta = spec.delta(&base, &trained).expect("delta");
        let want: Vec<f32> = base.iter().zip(&trained).map(|(b, t)| b - t).collect();
        assert_eq!(delta, want);
        let applied = spec.apply_delta(&base, &delta).expect("apply");
        assert_eq!(applied, trained);
        assert_eq!(
            spec.apply_delta(&base, &delta[1..]),
            Err(SpecError::Length {
                what: "the delta",
                layout: "trainable",
                got: n - 1,
                want: n
            })
        );
        assert!(spec.delta(&base[1..], &trained).is_err());
    }
}
