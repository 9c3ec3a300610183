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
//! Two architectures (GPT-2 and Llama) and two trainable layouts. With every tensor
//! trained a delta is exactly the flat parameter vector in its layout's order, so a GPT-2
//! delta's bytes are what they were before the spec existed. With a LoRA adapter (Llama
//! only) the full parameter vector is the base followed by the adapter
//! ([`crate::lora::LoraLayout`] order), and a delta is the adapter part alone.

use serde::{Deserialize, Serialize};

use crate::lora::{LoraConfig, LoraConfigError, LoraLayout};
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
    /// vector.
    All,
    /// A LoRA adapter on a frozen Llama base: the trainable tensors are the adapter's
    /// `A` and `B` matrices (PEFT's names), which follow the base in the full vector.
    /// Serialized as `{"lora":{"rank":16,"alpha":32.0,"targets":["q","v"]}}`.
    Lora(LoraConfig),
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
    #[error(transparent)]
    Lora(#[from] LoraConfigError),
    #[error("model {name} is a {family}; a LoRA adapter needs a Llama")]
    LoraNeedsLlama { name: String, family: &'static str },
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

    /// A Llama of shape `config` with a LoRA adapter `lora` on a frozen base.
    pub fn llama_lora(name: &str, config: LlamaConfig, lora: LoraConfig) -> ModelSpec {
        ModelSpec {
            name: name.to_string(),
            architecture: Architecture::Llama(config),
            trainable: Trainable::Lora(lora),
        }
    }

    /// Checks that the shape and the trainable layout are usable.
    pub fn validate(&self) -> Result<(), SpecError> {
        match &self.architecture {
            Architecture::Gpt2(config) => config.validate()?,
            Architecture::Llama(config) => config.validate()?,
        }
        match (&self.trainable, &self.architecture) {
            (Trainable::All, _) => Ok(()),
            (Trainable::Lora(lora), Architecture::Llama(config)) => Ok(lora.validate(config)?),
            (Trainable::Lora(_), other) => Err(SpecError::LoraNeedsLlama {
                name: self.name.clone(),
                family: other.family(),
            }),
        }
    }

    /// The Llama shape and adapter of a LoRA spec; `None` for every other spec.
    pub fn lora(&self) -> Option<(&LlamaConfig, &LoraConfig)> {
        match (&self.architecture, &self.trainable) {
            (Architecture::Llama(config), Trainable::Lora(lora)) => Some((config, lora)),
            _ => None,
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

    /// The full parameter vector's named tensors (frozen and trained alike): the base's,
    /// then a LoRA adapter's.
    pub fn layout(&self) -> ParamLayout {
        let base = self.base_layout();
        match self.lora() {
            None => base,
            Some((config, lora)) => base.then(LoraLayout::new(config, lora).table()),
        }
    }

    /// The base model's named tensors (without an adapter).
    pub fn base_layout(&self) -> ParamLayout {
        match &self.architecture {
            Architecture::Gpt2(config) => ParamLayout::new(config),
            Architecture::Llama(config) => LlamaLayout::new(config).into_table(),
        }
    }

    /// Floats of the base model (the full vector without an adapter).
    pub fn base_len(&self) -> usize {
        match &self.architecture {
            Architecture::Gpt2(config) => config.n_params(),
            Architecture::Llama(config) => config.n_params(),
        }
    }

    /// Floats in the full parameter vector (what a checkpoint holds): the base and, with
    /// LoRA, the adapter after it.
    pub fn n_params(&self) -> usize {
        self.base_len() + self.lora().map_or(0, |(c, lora)| lora.n_params(c))
    }

    /// Parameters initialized from `seed` as the architecture's reference
    /// implementation initializes them (same seed, same bits, any machine); with LoRA the
    /// base is followed by an adapter initialized as PEFT does
    /// ([`crate::lora::init_adapter`]).
    pub fn init_params(&self, seed: u64) -> Result<Vec<f32>, crate::EngineError> {
        let mut params = match &self.architecture {
            Architecture::Gpt2(config) => crate::init_params(config, seed)?,
            Architecture::Llama(config) => crate::llama::init_params(config, seed)?,
        };
        if let Some((config, lora)) = self.lora() {
            lora.validate(config).map_err(SpecError::from)?;
            params.extend(crate::lora::init_adapter(config, lora, seed));
        }
        Ok(params)
    }

    /// The tensors a unit trains, in the order a delta carries them. Their offsets are
    /// into the full parameter vector.
    pub fn trainable_tensors(&self) -> Vec<TensorSpec> {
        match self.trainable {
            Trainable::All => self.layout().tensors().to_vec(),
            Trainable::Lora(_) => {
                let base = self.base_len();
                self.layout()
                    .tensors()
                    .iter()
                    .filter(|t| t.offset >= base)
                    .cloned()
                    .collect()
            }
        }
    }

    /// Floats in a delta: the whole vector, or a LoRA adapter's floats.
    pub fn trainable_len(&self) -> usize {
        self.n_params() - self.frozen_len()
    }

    /// Floats at the start of the full vector that a unit does not train.
    fn frozen_len(&self) -> usize {
        match self.trainable {
            Trainable::All => 0,
            Trainable::Lora(_) => self.base_len(),
        }
    }

    /// Training FLOPs per token: the rule credit is computed from. For every weight
    /// trained it is the usual 6 per parameter (2 forward, 4 backward: the activation
    /// and the weight gradients).
    ///
    /// With a LoRA adapter the base is frozen: 2 per base parameter forward, 2 more for
    /// the backward of the activations through it, and no weight gradient, so 4 N for the
    /// base's N multiplied parameters; plus 6 per adapter parameter (an adapter is two
    /// ordinary products, `x A^T` and `u B^T`, trained in full):
    /// `flops/token = 4 N_base + 6 N_adapter`.
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
            Trainable::Lora(_) => 4 * multiplied as u64 + 6 * self.trainable_len() as u64,
        }
    }

    /// The delta a unit sends: `base - trained` over the trainable tensors, in delta
    /// order. With every tensor trained this is the element-wise difference of the
    /// whole vectors; with LoRA, of the adapter parts.
    pub fn delta(&self, base: &[f32], trained: &[f32]) -> Result<Vec<f32>, SpecError> {
        self.check_params("the base", base.len())?;
        self.check_params("the trained model", trained.len())?;
        let frozen = self.frozen_len();
        Ok(base[frozen..]
            .iter()
            .zip(&trained[frozen..])
            .map(|(b, t)| b - t)
            .collect())
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
        let frozen = self.frozen_len();
        let mut applied = base.to_vec();
        for (p, d) in applied[frozen..].iter_mut().zip(delta) {
            *p -= d;
        }
        Ok(applied)
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

    #[test]
    fn lora_specs() {
        let lora = LoraConfig {
            rank: 16,
            alpha: 32.0,
            targets: crate::lora::LoraTarget::ALL.to_vec(),
        };
        // 30 layers x 16 x (q 576+576, k 192+576, v 192+576, o 576+576, gate and up
        // 1536+576 each, down 576+1536) = 4,884,480 adapter floats; flops/token =
        // 4 x 134,515,008 + 6 x 4,884,480.
        check(
            &ModelSpec::llama_lora(
                "smollm2-lora",
                LlamaConfig::smollm2_135m(2048),
                lora.clone(),
            ),
            expect_test::expect![[r#"
                {"name":"smollm2-lora","architecture":{"llama":{"hidden":576,"intermediate":1536,"layers":30,"heads":9,"kv_heads":3,"head_dim":64,"vocab_size":49152,"rope_theta":100000.0,"rms_eps":0.00001,"tie_embeddings":true,"max_seq":2048}},"trainable":{"lora":{"rank":16,"alpha":32.0,"targets":["q","k","v","o","gate","up","down"]}}}
                id=smollm2-lora-c80777e43aa8b90a params=139399488 trainable=4884480 tensors=420 first=base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight flops/token=567366912"#]],
        );
        let gpt = ModelSpec {
            trainable: Trainable::Lora(lora.clone()),
            ..ModelSpec::preset(Preset::Tiny, 97)
        };
        expect_test::expect!["model tiny is a gpt2; a LoRA adapter needs a Llama"].assert_eq(
            &gpt.validate()
                .map_or_else(|e| e.to_string(), |()| "ok".into()),
        );
        let empty = ModelSpec::llama_lora(
            "empty",
            LlamaConfig::smollm2_135m(64),
            LoraConfig {
                targets: vec![],
                ..lora
            },
        );
        expect_test::expect!["LoRA needs at least one target projection"].assert_eq(
            &empty
                .validate()
                .map_or_else(|e| e.to_string(), |()| "ok".into()),
        );
    }

    /// A LoRA delta is the difference of the adapter parts; the base is left as it is.
    #[test]
    fn lora_delta_carries_the_adapter_only() {
        let config = LlamaConfig {
            hidden: 8,
            intermediate: 12,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            vocab_size: 11,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            tie_embeddings: true,
            max_seq: 4,
        };
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec![crate::lora::LoraTarget::V],
        };
        let spec = ModelSpec::llama_lora("micro", config, lora);
        let (n, base_len) = (spec.n_params(), spec.base_len());
        assert_eq!(spec.trainable_len(), 2 * 8 + 4 * 2);
        assert_eq!(spec.trainable_tensors()[0].offset, base_len);
        let base: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut trained = base.clone();
        trained[base_len + 3] += 1.0;
        trained[0] += 5.0; // a change of the frozen base is not carried
        let delta = spec.delta(&base, &trained).expect("delta");
        assert_eq!(delta.len(), spec.trainable_len());
        assert_eq!(delta.iter().filter(|&&d| d != 0.0).count(), 1);
        assert_eq!(delta[3], -1.0);
        let applied = spec.apply_delta(&base, &delta).expect("apply");
        assert_eq!(applied[base_len + 3], base[base_len + 3] + 1.0);
        assert_eq!(applied[0], base[0]);
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
