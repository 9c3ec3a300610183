//! LoRA adapters on a frozen Llama: their configuration, their tensors under PEFT's names,
//! PEFT's initialization, and merging an adapter into its base.
//!
//! An adapter adds to a projection `y = x W^T` (W stored `[out, in]`) the low-rank term
//! `(alpha / rank) (x A^T) B^T`, with `A` of shape `[rank, in]` and `B` of `[out, rank]`.
//! Only `A` and `B` train; `W` stays as the base has it. The adapter vector is its own
//! flat vector, ordered layer by layer, and within a layer by [`LoraTarget::ALL`] (q, k,
//! v, o, gate, up, down, whatever order the config lists them in), `A` before `B`:
//!
//! ```text
//! for i in 0..layers, for each target in q, k, v, o, gate, up, down order:
//!   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [rank, in]
//!   base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, rank]
//! ```
//!
//! These are the names and shapes of PEFT's `adapter_model.safetensors`, so an exported
//! adapter is the vector cut at these offsets.

use serde::{Deserialize, Serialize};

use crate::matmul::{Par, View, ViewMut, matmul};
use crate::params::{LayoutBuilder, ParamLayout, TensorKind};
use crate::{LlamaConfig, LlamaLayout};

/// A projection of a Llama block that an adapter can target (PEFT's `target_modules`
/// without the `_proj`). The serde names (`"q"`, `"gate"`, ...) are part of a run's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    /// Every target, in the order the adapter vector lays them out.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The HF module path inside a decoder layer (`self_attn.q_proj`).
    pub fn module(self) -> &'static str {
        match self {
            LoraTarget::Q => "self_attn.q_proj",
            LoraTarget::K => "self_attn.k_proj",
            LoraTarget::V => "self_attn.v_proj",
            LoraTarget::O => "self_attn.o_proj",
            LoraTarget::Gate => "mlp.gate_proj",
            LoraTarget::Up => "mlp.up_proj",
            LoraTarget::Down => "mlp.down_proj",
        }
    }

    /// `(out, in)` of the projection in a Llama of shape `c`.
    pub fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        match self {
            LoraTarget::Q => (q, c.hidden),
            LoraTarget::K | LoraTarget::V => (kv, c.hidden),
            LoraTarget::O => (c.hidden, q),
            LoraTarget::Gate | LoraTarget::Up => (c.intermediate, c.hidden),
            LoraTarget::Down => (c.hidden, c.intermediate),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A LoRA adapter's shape: PEFT's `r`, `lora_alpha` and `target_modules` (no dropout, no
/// bias). Serialized as `{"rank":16,"alpha":32.0,"targets":["q","k",...]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// The rank `r` of `A` (`[r, in]`) and `B` (`[out, r]`); at least 1.
    pub rank: usize,
    /// `lora_alpha`: the adapter's output is scaled by `alpha / rank`.
    pub alpha: f64,
    /// The projections that get an adapter: non-empty, each at most once.
    pub targets: Vec<LoraTarget>,
}

// `validate` rejects a NaN alpha and JSON cannot carry one, so equality is an
// equivalence and a `ModelSpec` (which is `Eq`) can hold a `LoraConfig`.
impl Eq for LoraConfig {}

/// Why a LoRA configuration cannot describe an adapter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoraConfigError {
    #[error("LoRA rank must be at least 1")]
    ZeroRank,
    #[error("LoRA alpha {0} must be finite and positive")]
    BadAlpha(String),
    #[error("LoRA needs at least one target projection")]
    NoTargets,
    #[error("LoRA target {0:?} is listed twice")]
    DuplicateTarget(LoraTarget),
    #[error("the adapter would have {0} parameters, more than this engine addresses")]
    TooLarge(u128),
}

impl LoraConfig {
    /// Checks the rank, alpha and targets (for a Llama of shape `c`, which sizes it).
    pub fn validate(&self, c: &LlamaConfig) -> Result<(), LoraConfigError> {
        if self.rank == 0 {
            return Err(LoraConfigError::ZeroRank);
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LoraConfigError::BadAlpha(self.alpha.to_string()));
        }
        if self.targets.is_empty() {
            return Err(LoraConfigError::NoTargets);
        }
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].contains(t) {
                return Err(LoraConfigError::DuplicateTarget(*t));
            }
        }
        let per_layer: u128 = self
            .targets
            .iter()
            .map(|t| {
                let (o, i) = t.shape(c);
                self.rank as u128 * (o as u128 + i as u128)
            })
            .sum();
        let n = per_layer * c.layers as u128;
        if n > u32::MAX as u128 {
            return Err(LoraConfigError::TooLarge(n));
        }
        Ok(())
    }

    /// The factor `alpha / rank` of the adapter's output.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// Floats in the adapter vector of a Llama of shape `c`.
    pub fn n_params(&self, c: &LlamaConfig) -> usize {
        let per_layer: usize = self
            .targets
            .iter()
            .map(|t| {
                let (o, i) = t.shape(c);
                self.rank * (o + i)
            })
            .sum();
        per_layer * c.layers
    }

    fn targets_in_order(&self) -> impl Iterator<Item = LoraTarget> + '_ {
        LoraTarget::ALL
            .into_iter()
            .filter(|t| self.targets.contains(t))
    }
}

/// Offsets of one adapter's `A` and `B` in the adapter vector.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoraOffsets {
    pub(crate) a: usize,
    pub(crate) b: usize,
}

/// The adapter vector's named tensors (offsets from 0) and, per layer and target, where
/// its `A` and `B` are.
#[derive(Clone, Debug)]
pub struct LoraLayout {
    table: ParamLayout,
    pub(crate) blocks: Vec<[Option<LoraOffsets>; 7]>,
}

impl LoraLayout {
    pub fn new(config: &LlamaConfig, lora: &LoraConfig) -> LoraLayout {
        let r = lora.rank;
        let mut b = LayoutBuilder::default();
        let mut blocks = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut block = [None; 7];
            for target in lora.targets_in_order() {
                let (out, inp) = target.shape(config);
                let p = format!("base_model.model.model.layers.{i}.{}", target.module());
                let a = b.push(
                    format!("{p}.lora_A.weight"),
                    vec![r, inp],
                    TensorKind::Matrix,
                );
                let bo = b.push(
                    format!("{p}.lora_B.weight"),
                    vec![out, r],
                    TensorKind::Matrix,
                );
                block[target.index()] = Some(LoraOffsets { a, b: bo });
            }
            blocks.push(block);
        }
        LoraLayout {
            table: b.finish(),
            blocks,
        }
    }

    /// The adapter's tensors, in flat order, offsets from the adapter vector's start.
    pub fn table(&self) -> &ParamLayout {
        &self.table
    }

    /// Where layer `layer`'s adapter of `target` is, if it has one.
    pub(crate) fn get(&self, layer: usize, target: LoraTarget) -> Option<LoraOffsets> {
        self.blocks[layer][target.index()]
    }
}

/// An adapter initialized as PEFT initializes one: each `A` from
/// `kaiming_uniform_(a = sqrt(5))`, which is U(-1/sqrt(in), 1/sqrt(in)), each `B` zero
/// (so the adapted model starts as its base). The draws come from stream 1 of a ChaCha8
/// generator seeded with `seed`: same seed, same bits, any machine, and independent of
/// the base's draws from the same seed (stream 0).
pub fn init_adapter(config: &LlamaConfig, lora: &LoraConfig, seed: u64) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let layout = LoraLayout::new(config, lora);
    let mut adapter = vec![0.0f32; layout.table.len()];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    for tensor in layout.table.tensors() {
        if !tensor.name.ends_with("lora_A.weight") {
            continue;
        }
        let bound = 1.0 / (tensor.shape[1] as f32).sqrt();
        // The bound is finite and positive: `in` is at least 1.
        let Ok(uniform) = rand_distr::Uniform::new(-bound, bound) else {
            continue;
        };
        for x in &mut adapter[tensor.range()] {
            *x = uniform.sample(&mut rng);
        }
    }
    adapter
}

/// The base parameters with the adapter merged in: each targeted `W` becomes
/// `W + (alpha / rank) B A`. `base` is in [`LlamaLayout`] order, `adapter` in
/// [`LoraLayout`] order; the result has the base's layout. Panics if the lengths do not
/// fit the shapes (callers check them against the spec first).
pub fn merge(config: &LlamaConfig, lora: &LoraConfig, base: &[f32], adapter: &[f32]) -> Vec<f32> {
    let base_layout = LlamaLayout::new(config);
    let layout = LoraLayout::new(config, lora);
    assert_eq!(base.len(), base_layout.table().len(), "merge: base length");
    assert_eq!(adapter.len(), layout.table.len(), "merge: adapter length");
    let mut merged = base.to_vec();
    let scale = lora.scale();
    let r = lora.rank;
    for (l, offsets) in base_layout.blocks.iter().enumerate() {
        for target in lora.targets_in_order() {
            let Some(ab) = layout.get(l, target) else {
                continue;
            };
            let (out, inp) = target.shape(config);
            let w = match target {
                LoraTarget::Q => offsets.qkv,
                LoraTarget::K => offsets.qkv + config.heads * config.head_dim * config.hidden,
                LoraTarget::V => {
                    offsets.qkv + (config.heads + config.kv_heads) * config.head_dim * config.hidden
                }
                LoraTarget::O => offsets.o,
                LoraTarget::Gate => offsets.gate_up,
                LoraTarget::Up => offsets.gate_up + config.intermediate * config.hidden,
                LoraTarget::Down => offsets.down,
            };
            let scaled_b: Vec<f32> = adapter[ab.b..ab.b + out * r]
                .iter()
                .map(|x| x * scale)
                .collect();
            matmul(
                ViewMut::rows(&mut merged[w..w + out * inp], out, inp),
                View::rows(&scaled_b, out, r),
                View::rows(&adapter[ab.a..ab.a + r * inp], r, inp),
                true,
                Par::Single,
            );
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micro() -> LlamaConfig {
        LlamaConfig {
            hidden: 8,
            intermediate: 12,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 2,
            vocab_size: 5,
            rope_theta: 10_000.0,
            rms_eps: 1e-6,
            tie_embeddings: true,
            max_seq: 4,
        }
    }

    #[track_caller]
    fn check(json: &str, expect: expect_test::Expect) {
        let got = match serde_json::from_str::<LoraConfig>(json) {
            Err(e) => format!("json error: {e}"),
            Ok(lora) => match lora.validate(&micro()) {
                Err(e) => format!("error: {e}"),
                Ok(()) => {
                    let layout = LoraLayout::new(&micro(), &lora);
                    let tensors: Vec<String> = layout
                        .table()
                        .tensors()
                        .iter()
                        .filter(|t| t.name.contains(".0."))
                        .map(|t| format!("{} {:?} @{}", t.name, t.shape, t.offset))
                        .collect();
                    format!(
                        "floats={} scale={}\n{}",
                        lora.n_params(&micro()),
                        lora.scale(),
                        tensors.join("\n")
                    )
                }
            },
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn configs_and_layouts() {
        // Listed out of order: the layout is in q, k, v, o, gate, up, down order.
        check(
            r#"{"rank":2,"alpha":8,"targets":["down","q","v"]}"#,
            expect_test::expect![[r#"
                floats=192 scale=4
                base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [2, 8] @0
                base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight [8, 2] @16
                base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight [2, 8] @32
                base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight [4, 2] @48
                base_model.model.model.layers.0.mlp.down_proj.lora_A.weight [2, 12] @56
                base_model.model.model.layers.0.mlp.down_proj.lora_B.weight [8, 2] @80"#]],
        );
        check(
            r#"{"rank":1,"alpha":1,"targets":["q","k","v","o","gate","up","down"]}"#,
            expect_test::expect![[r#"
                floats=232 scale=1
                base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [1, 8] @0
                base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight [8, 1] @8
                base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight [1, 8] @16
                base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight [4, 1] @24
                base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight [1, 8] @28
                base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight [4, 1] @36
                base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight [1, 8] @40
                base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight [8, 1] @48
                base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight [1, 8] @56
                base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight [12, 1] @64
                base_model.model.model.layers.0.mlp.up_proj.lora_A.weight [1, 8] @76
                base_model.model.model.layers.0.mlp.up_proj.lora_B.weight [12, 1] @84
                base_model.model.model.layers.0.mlp.down_proj.lora_A.weight [1, 12] @96
                base_model.model.model.layers.0.mlp.down_proj.lora_B.weight [8, 1] @108"#]],
        );
        check(
            r#"{"rank":0,"alpha":8,"targets":["q"]}"#,
            expect_test::expect!["error: LoRA rank must be at least 1"],
        );
        check(
            r#"{"rank":4,"alpha":0,"targets":["q"]}"#,
            expect_test::expect!["error: LoRA alpha 0 must be finite and positive"],
        );
        check(
            r#"{"rank":4,"alpha":8,"targets":[]}"#,
            expect_test::expect!["error: LoRA needs at least one target projection"],
        );
        check(
            r#"{"rank":4,"alpha":8,"targets":["q","v","q"]}"#,
            expect_test::expect!["error: LoRA target Q is listed twice"],
        );
        check(
            r#"{"rank":4,"alpha":8,"targets":["q_proj"]}"#,
            expect_test::expect![[
                r#"json error: unknown variant `q_proj`, expected one of `q`, `k`, `v`, `o`, `gate`, `up`, `down` at line 1 column 39"#
            ]],
        );
        check(
            r#"{"rank":4,"alpha":8,"targets":["q"],"dropout":0.1}"#,
            expect_test::expect![
                "json error: unknown field `dropout`, expected one of `rank`, `alpha`, `targets` at line 1 column 45"
            ],
        );
    }

    /// PEFT's init: B zero, A inside its bound and not all equal, same seed same bits.
    #[test]
    fn init_is_peft_s_and_seeded() {
        let lora = LoraConfig {
            rank: 3,
            alpha: 6.0,
            targets: LoraTarget::ALL.to_vec(),
        };
        let a = init_adapter(&micro(), &lora, 5);
        assert_eq!(a, init_adapter(&micro(), &lora, 5));
        assert_ne!(a, init_adapter(&micro(), &lora, 6));
        let layout = LoraLayout::new(&micro(), &lora);
        for t in layout.table().tensors() {
            let x = &a[t.range()];
            if t.name.ends_with("lora_B.weight") {
                assert!(x.iter().all(|&v| v == 0.0), "{}", t.name);
            } else {
                let bound = 1.0 / (t.shape[1] as f32).sqrt();
                assert!(x.iter().all(|v| v.abs() <= bound), "{}", t.name);
                assert!(x.iter().any(|&v| v != x[0]), "{}", t.name);
            }
        }
    }
}
