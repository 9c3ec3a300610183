//! The Llama architecture: its shape ([`LlamaConfig`]), its named tensors under HF's
//! `LlamaForCausalLM` names ([`LlamaLayout`]), its initialization, and (in [`cpu`]) its
//! CPU backend.
//!
//! Llama differs from GPT-2 in every block: RMSNorm instead of LayerNorm, rotary position
//! embeddings instead of learned ones, grouped-query attention (fewer key/value heads than
//! query heads), a SwiGLU MLP, no biases, and an output head that may be tied to the
//! embedding or not. The layout keeps HF's names and HF's `[out, in]` matrix storage
//! (`torch.nn.Linear`), so a safetensors or GGUF file maps onto it tensor by tensor.
//!
//! ```text
//! model.embed_tokens.weight                          [vocab, hidden]
//! for i in 0..layers:
//!   model.layers.{i}.input_layernorm.weight          [hidden]
//!   model.layers.{i}.self_attn.q_proj.weight         [heads * head_dim, hidden]
//!   model.layers.{i}.self_attn.k_proj.weight         [kv_heads * head_dim, hidden]
//!   model.layers.{i}.self_attn.v_proj.weight         [kv_heads * head_dim, hidden]
//!   model.layers.{i}.self_attn.o_proj.weight         [hidden, heads * head_dim]
//!   model.layers.{i}.post_attention_layernorm.weight [hidden]
//!   model.layers.{i}.mlp.gate_proj.weight            [intermediate, hidden]
//!   model.layers.{i}.mlp.up_proj.weight              [intermediate, hidden]
//!   model.layers.{i}.mlp.down_proj.weight            [hidden, intermediate]
//! model.norm.weight                                  [hidden]
//! lm_head.weight                                     [vocab, hidden]   (untied only)
//! ```
//!
//! q, k and v are adjacent, and so are gate and up: stored `[out, in]`, each pair or
//! triple is one taller matrix, so the backend runs one product for q, k and v and one
//! for gate and up.

pub mod cpu;
pub(crate) mod ops;

use serde::{Deserialize, Serialize};

use crate::params::{LayoutBuilder, ParamLayout, TensorKind};

/// Standard deviation of HF's Llama initialization (`initializer_range`) for every
/// matrix and the embedding.
pub const INIT_STD: f32 = 0.02;

/// Longest `max_seq` accepted: the rotary tables and the KV cache are allocated for it
/// up front, so an absurd value must be an error rather than an allocation failure.
/// SmolLM2's context is 8,192.
pub const MAX_SEQ_LIMIT: usize = 1 << 17;

/// The shape of a Llama decoder, in HF `LlamaConfig`'s terms.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Width of the residual stream (`hidden_size`).
    pub hidden: usize,
    /// Width of the SwiGLU MLP (`intermediate_size`).
    pub intermediate: usize,
    /// Number of decoder blocks (`num_hidden_layers`).
    pub layers: usize,
    /// Query heads (`num_attention_heads`).
    pub heads: usize,
    /// Key/value heads (`num_key_value_heads`); must divide `heads`.
    pub kv_heads: usize,
    /// Width of one head; even, since rotary embeddings turn pairs of elements.
    pub head_dim: usize,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
    /// Base of the rotary frequencies (`rope_theta`).
    pub rope_theta: f64,
    /// Added to the mean square in RMSNorm (`rms_norm_eps`).
    pub rms_eps: f64,
    /// Whether the output head is the embedding (`tie_word_embeddings`).
    pub tie_embeddings: bool,
    /// Longest sequence the backend takes: the length of the rotary tables and the KV
    /// cache (`max_position_embeddings` or less).
    pub max_seq: usize,
}

// `validate` rejects NaN in the two float fields, and JSON cannot carry one, so equality
// of configs is an equivalence; a `ModelSpec` (which is `Eq`) can then hold one.
impl Eq for LlamaConfig {}

/// Why a configuration cannot describe a Llama.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LlamaConfigError {
    #[error("every size of a Llama must be at least 1, got {0:?}")]
    Zero(LlamaConfig),
    #[error("kv_heads {kv_heads} does not divide heads {heads}")]
    KvHeadsDoNotDivide { heads: usize, kv_heads: usize },
    #[error("head_dim {0} is odd; rotary embeddings turn pairs of elements")]
    OddHeadDim(usize),
    #[error("rope_theta {rope_theta} and rms_eps {rms_eps} must be finite and positive")]
    BadFloat { rope_theta: f64, rms_eps: f64 },
    #[error("max_seq {0} is more than this engine allocates for ({MAX_SEQ_LIMIT})")]
    SequenceTooLong(usize),
    #[error("the Llama would have {0} parameters, more than this engine addresses")]
    TooLarge(u128),
}

impl Eq for LlamaConfigError {}

impl LlamaConfig {
    /// SmolLM2-135M's shape (see `../shared/OPEN-MODELS.md`) with a context of `max_seq`.
    pub fn smollm2_135m(max_seq: usize) -> LlamaConfig {
        LlamaConfig {
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rope_theta: 100_000.0,
            rms_eps: 1e-5,
            tie_embeddings: true,
            max_seq,
        }
    }

    /// Checks that the shape is usable.
    pub fn validate(&self) -> Result<(), LlamaConfigError> {
        let c = *self;
        let sizes = [
            c.hidden,
            c.intermediate,
            c.layers,
            c.heads,
            c.kv_heads,
            c.head_dim,
            c.vocab_size,
            c.max_seq,
        ];
        if sizes.contains(&0) {
            return Err(LlamaConfigError::Zero(c));
        }
        if c.max_seq > MAX_SEQ_LIMIT {
            return Err(LlamaConfigError::SequenceTooLong(c.max_seq));
        }
        if !c.heads.is_multiple_of(c.kv_heads) {
            return Err(LlamaConfigError::KvHeadsDoNotDivide {
                heads: c.heads,
                kv_heads: c.kv_heads,
            });
        }
        if !c.head_dim.is_multiple_of(2) {
            return Err(LlamaConfigError::OddHeadDim(c.head_dim));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(c.rope_theta) || !positive(c.rms_eps) {
            return Err(LlamaConfigError::BadFloat {
                rope_theta: c.rope_theta,
                rms_eps: c.rms_eps,
            });
        }
        // The activations of one sequence must be addressable too (n_params bounds the
        // products of sizes that appear in the layout).
        let n = c.n_params_u128();
        if n > u32::MAX as u128 {
            return Err(LlamaConfigError::TooLarge(n));
        }
        Ok(())
    }

    fn n_params_u128(&self) -> u128 {
        let (d, f, l, v) = (
            self.hidden as u128,
            self.intermediate as u128,
            self.layers as u128,
            self.vocab_size as u128,
        );
        let hd = self.head_dim as u128;
        let (q, kv) = (self.heads as u128 * hd, self.kv_heads as u128 * hd);
        let block = 2 * d + (q + 2 * kv) * d + d * q + 3 * f * d;
        let head = if self.tie_embeddings { 0 } else { v * d };
        v * d + l * block + d + head
    }

    /// Number of parameters (a tied head counted once).
    pub fn n_params(&self) -> usize {
        self.n_params_u128() as usize
    }

    /// Width of the q, k and v rows of one token together.
    pub(crate) fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// Offsets of one block's tensors in the flat vector.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LlamaBlockOffsets {
    pub(crate) attn_norm: usize,
    /// q, then k, then v: together one `[qkv_width, hidden]` matrix.
    pub(crate) qkv: usize,
    pub(crate) o: usize,
    pub(crate) mlp_norm: usize,
    /// gate, then up: together one `[2 * intermediate, hidden]` matrix.
    pub(crate) gate_up: usize,
    pub(crate) down: usize,
}

/// Llama's table of named tensors with the offsets its CPU backend reads.
#[derive(Clone, Debug)]
pub struct LlamaLayout {
    table: ParamLayout,
    pub(crate) embed: usize,
    pub(crate) blocks: Vec<LlamaBlockOffsets>,
    pub(crate) norm: usize,
    /// The output head: the embedding's offset when tied.
    pub(crate) head: usize,
}

impl LlamaLayout {
    pub fn new(config: &LlamaConfig) -> LlamaLayout {
        let (d, v, f, hd) = (
            config.hidden,
            config.vocab_size,
            config.intermediate,
            config.head_dim,
        );
        let mut b = LayoutBuilder::default();
        let embed = b.push(
            "model.embed_tokens.weight".into(),
            vec![v, d],
            TensorKind::Embedding,
        );
        let mut blocks = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("model.layers.{i}.");
            let attn_norm = b.push(
                format!("{p}input_layernorm.weight"),
                vec![d],
                TensorKind::Gain,
            );
            let qkv = b.push(
                format!("{p}self_attn.q_proj.weight"),
                vec![config.heads * hd, d],
                TensorKind::Matrix,
            );
            for name in ["k_proj", "v_proj"] {
                b.push(
                    format!("{p}self_attn.{name}.weight"),
                    vec![config.kv_heads * hd, d],
                    TensorKind::Matrix,
                );
            }
            let o = b.push(
                format!("{p}self_attn.o_proj.weight"),
                vec![d, config.heads * hd],
                TensorKind::Matrix,
            );
            let mlp_norm = b.push(
                format!("{p}post_attention_layernorm.weight"),
                vec![d],
                TensorKind::Gain,
            );
            let gate_up = b.push(
                format!("{p}mlp.gate_proj.weight"),
                vec![f, d],
                TensorKind::Matrix,
            );
            b.push(
                format!("{p}mlp.up_proj.weight"),
                vec![f, d],
                TensorKind::Matrix,
            );
            let down = b.push(
                format!("{p}mlp.down_proj.weight"),
                vec![d, f],
                TensorKind::Matrix,
            );
            blocks.push(LlamaBlockOffsets {
                attn_norm,
                qkv,
                o,
                mlp_norm,
                gate_up,
                down,
            });
        }
        let norm = b.push("model.norm.weight".into(), vec![d], TensorKind::Gain);
        let head = if config.tie_embeddings {
            embed
        } else {
            b.push("lm_head.weight".into(), vec![v, d], TensorKind::Matrix)
        };
        let table = b.finish();
        debug_assert_eq!(table.len(), config.n_params());
        LlamaLayout {
            table,
            embed,
            blocks,
            norm,
            head,
        }
    }

    /// The named tensors, in flat order.
    pub fn table(&self) -> &ParamLayout {
        &self.table
    }

    pub(crate) fn into_table(self) -> ParamLayout {
        self.table
    }
}

/// Parameters initialized as HF initializes a Llama (every matrix and the embedding
/// N(0, [`INIT_STD`]), norms one), from a seed: same seed, same bits, any machine.
pub fn init_params(config: &LlamaConfig, seed: u64) -> Result<Vec<f32>, LlamaConfigError> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    config.validate()?;
    let layout = LlamaLayout::new(config);
    let mut params = vec![0.0f32; layout.table.len()];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal =
        rand_distr::Normal::new(0.0f32, INIT_STD).map_err(|_| LlamaConfigError::Zero(*config))?;
    for spec in layout.table.tensors() {
        let slice = &mut params[spec.range()];
        match spec.kind {
            TensorKind::Gain => slice.fill(1.0),
            TensorKind::Bias => slice.fill(0.0),
            TensorKind::Embedding | TensorKind::Matrix | TensorKind::ResidualMatrix => {
                for x in slice.iter_mut() {
                    *x = normal.sample(&mut rng);
                }
            }
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(config: LlamaConfig, expect: expect_test::Expect) {
        let got = match config.validate() {
            Ok(()) => {
                let layout = LlamaLayout::new(&config);
                let names: Vec<String> = layout
                    .table()
                    .tensors()
                    .iter()
                    .filter(|t| !t.name.starts_with("model.layers.") || t.name.contains(".0."))
                    .map(|t| format!("{} {:?}", t.name, t.shape))
                    .collect();
                format!("params={}\n{}", config.n_params(), names.join("\n"))
            }
            Err(e) => format!("error: {e}"),
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn smollm2_layout_matches_the_published_count() {
        // OPEN-MODELS.md: 134,515,008 parameters in the GGUF (tied head).
        check(
            LlamaConfig::smollm2_135m(2048),
            expect_test::expect![[r#"
                params=134515008
                model.embed_tokens.weight [49152, 576]
                model.layers.0.input_layernorm.weight [576]
                model.layers.0.self_attn.q_proj.weight [576, 576]
                model.layers.0.self_attn.k_proj.weight [192, 576]
                model.layers.0.self_attn.v_proj.weight [192, 576]
                model.layers.0.self_attn.o_proj.weight [576, 576]
                model.layers.0.post_attention_layernorm.weight [576]
                model.layers.0.mlp.gate_proj.weight [1536, 576]
                model.layers.0.mlp.up_proj.weight [1536, 576]
                model.layers.0.mlp.down_proj.weight [576, 1536]
                model.norm.weight [576]"#]],
        );
    }

    #[test]
    fn untied_head_and_bad_shapes() {
        let tiny = LlamaConfig {
            hidden: 8,
            intermediate: 12,
            layers: 1,
            heads: 4,
            kv_heads: 2,
            head_dim: 2,
            vocab_size: 5,
            rope_theta: 10_000.0,
            rms_eps: 1e-6,
            tie_embeddings: false,
            max_seq: 4,
        };
        check(
            tiny,
            expect_test::expect![[r#"
                params=584
                model.embed_tokens.weight [5, 8]
                model.layers.0.input_layernorm.weight [8]
                model.layers.0.self_attn.q_proj.weight [8, 8]
                model.layers.0.self_attn.k_proj.weight [4, 8]
                model.layers.0.self_attn.v_proj.weight [4, 8]
                model.layers.0.self_attn.o_proj.weight [8, 8]
                model.layers.0.post_attention_layernorm.weight [8]
                model.layers.0.mlp.gate_proj.weight [12, 8]
                model.layers.0.mlp.up_proj.weight [12, 8]
                model.layers.0.mlp.down_proj.weight [8, 12]
                model.norm.weight [8]
                lm_head.weight [5, 8]"#]],
        );
        check(
            LlamaConfig {
                kv_heads: 3,
                ..tiny
            },
            expect_test::expect!["error: kv_heads 3 does not divide heads 4"],
        );
        check(
            LlamaConfig {
                head_dim: 3,
                ..tiny
            },
            expect_test::expect![
                "error: head_dim 3 is odd; rotary embeddings turn pairs of elements"
            ],
        );
        check(
            LlamaConfig {
                rms_eps: f64::NAN,
                ..tiny
            },
            expect_test::expect![
                "error: rope_theta 10000 and rms_eps NaN must be finite and positive"
            ],
        );
        check(
            LlamaConfig { layers: 0, ..tiny },
            expect_test::expect![
                "error: every size of a Llama must be at least 1, got LlamaConfig { hidden: 8, intermediate: 12, layers: 0, heads: 4, kv_heads: 2, head_dim: 2, vocab_size: 5, rope_theta: 10000.0, rms_eps: 1e-6, tie_embeddings: false, max_seq: 4 }"
            ],
        );
    }
}
