//! Where each tensor lives in the one flat parameter vector, under its HF name.
//!
//! [`ParamLayout`] is the table of named tensors any architecture has; GPT-2's offsets
//! (`GptLayout`) are below, Llama's are in [`crate::llama`]. For GPT-2 the order is the
//! order of the table below; it is part of hivetrain's wire format
//! (a weight delta is a flat vector in this order), so it only ever changes with a
//! protocol version.
//!
//! ```text
//! transformer.wte.weight                 [vocab, d]
//! transformer.wpe.weight                 [ctx, d]
//! for i in 0..n_layer:
//!   transformer.h.{i}.ln_1.weight        [d]
//!   transformer.h.{i}.ln_1.bias          [d]
//!   transformer.h.{i}.attn.c_attn.weight [d, 3d]   (Conv1D layout: [in, out])
//!   transformer.h.{i}.attn.c_attn.bias   [3d]
//!   transformer.h.{i}.attn.c_proj.weight [d, d]
//!   transformer.h.{i}.attn.c_proj.bias   [d]
//!   transformer.h.{i}.ln_2.weight        [d]
//!   transformer.h.{i}.ln_2.bias          [d]
//!   transformer.h.{i}.mlp.c_fc.weight    [d, 4d]
//!   transformer.h.{i}.mlp.c_fc.bias      [4d]
//!   transformer.h.{i}.mlp.c_proj.weight  [4d, d]
//!   transformer.h.{i}.mlp.c_proj.bias    [d]
//! transformer.ln_f.weight                [d]
//! transformer.ln_f.bias                  [d]
//! ```
//!
//! The output head is tied to `transformer.wte.weight` and has no entry of its own.

use crate::GptConfig;

/// How a tensor is initialized and whether AdamW decays it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// Token or position embedding: N(0, 0.02), decayed.
    Embedding,
    /// A matrix: N(0, 0.02), decayed.
    Matrix,
    /// A matrix that writes into the residual stream: N(0, 0.02 / sqrt(2 n_layer)), decayed.
    ResidualMatrix,
    /// A bias: zeros, not decayed.
    Bias,
    /// A LayerNorm gain: ones, not decayed.
    Gain,
}

impl TensorKind {
    /// Whether AdamW's weight decay applies (matrices and embeddings, as in nanoGPT).
    pub fn decays(self) -> bool {
        matches!(
            self,
            TensorKind::Embedding | TensorKind::Matrix | TensorKind::ResidualMatrix
        )
    }
}

/// One tensor of the flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub kind: TensorKind,
}

impl TensorSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Offsets of one block's tensors in the flat vector.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockOffsets {
    pub(crate) ln1_w: usize,
    pub(crate) ln1_b: usize,
    pub(crate) qkv_w: usize,
    pub(crate) qkv_b: usize,
    pub(crate) proj_w: usize,
    pub(crate) proj_b: usize,
    pub(crate) ln2_w: usize,
    pub(crate) ln2_b: usize,
    pub(crate) fc_w: usize,
    pub(crate) fc_b: usize,
    pub(crate) fcproj_w: usize,
    pub(crate) fcproj_b: usize,
}

/// The named tensors of a flat parameter vector, in flat order.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    tensors: Vec<TensorSpec>,
    len: usize,
}

/// Appends tensors one after another, each at the end of the one before.
#[derive(Default)]
pub(crate) struct LayoutBuilder {
    tensors: Vec<TensorSpec>,
    offset: usize,
}

impl LayoutBuilder {
    /// Appends a tensor and returns its offset.
    pub(crate) fn push(&mut self, name: String, shape: Vec<usize>, kind: TensorKind) -> usize {
        let spec = TensorSpec {
            name,
            shape,
            offset: self.offset,
            kind,
        };
        let offset = self.offset;
        self.offset += spec.len();
        self.tensors.push(spec);
        offset
    }

    pub(crate) fn finish(self) -> ParamLayout {
        ParamLayout {
            tensors: self.tensors,
            len: self.offset,
        }
    }
}

/// GPT-2's table with the offsets its CPU backend reads.
#[derive(Clone, Debug)]
pub(crate) struct GptLayout {
    table: ParamLayout,
    pub(crate) wte: usize,
    pub(crate) wpe: usize,
    pub(crate) blocks: Vec<BlockOffsets>,
    pub(crate) lnf_w: usize,
    pub(crate) lnf_b: usize,
}

impl ParamLayout {
    /// GPT-2's table for `config`.
    pub fn new(config: &GptConfig) -> ParamLayout {
        GptLayout::new(config).table
    }

    /// Total number of floats.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every tensor, in flat order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The tensor with this HF name.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// This table followed by `tail`'s tensors, shifted to start at the end of this one.
    pub(crate) fn then(&self, tail: &ParamLayout) -> ParamLayout {
        let shifted = tail.tensors.iter().map(|t| TensorSpec {
            offset: t.offset + self.len,
            ..t.clone()
        });
        ParamLayout {
            tensors: self.tensors.iter().cloned().chain(shifted).collect(),
            len: self.len + tail.len,
        }
    }
}

impl GptLayout {
    pub(crate) fn new(config: &GptConfig) -> GptLayout {
        let (d, v, t) = (config.n_embd, config.vocab_size, config.n_ctx);
        let mut tensors = Vec::new();
        let mut offset = 0;
        let mut push = |name: String, shape: Vec<usize>, kind: TensorKind| {
            let spec = TensorSpec {
                name,
                shape,
                offset,
                kind,
            };
            offset += spec.len();
            tensors.push(spec);
            offset - tensors[tensors.len() - 1].len()
        };
        let wte = push(
            "transformer.wte.weight".into(),
            vec![v, d],
            TensorKind::Embedding,
        );
        let wpe = push(
            "transformer.wpe.weight".into(),
            vec![t, d],
            TensorKind::Embedding,
        );
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("transformer.h.{i}.");
            blocks.push(BlockOffsets {
                ln1_w: push(format!("{p}ln_1.weight"), vec![d], TensorKind::Gain),
                ln1_b: push(format!("{p}ln_1.bias"), vec![d], TensorKind::Bias),
                qkv_w: push(
                    format!("{p}attn.c_attn.weight"),
                    vec![d, 3 * d],
                    TensorKind::Matrix,
                ),
                qkv_b: push(
                    format!("{p}attn.c_attn.bias"),
                    vec![3 * d],
                    TensorKind::Bias,
                ),
                proj_w: push(
                    format!("{p}attn.c_proj.weight"),
                    vec![d, d],
                    TensorKind::ResidualMatrix,
                ),
                proj_b: push(format!("{p}attn.c_proj.bias"), vec![d], TensorKind::Bias),
                ln2_w: push(format!("{p}ln_2.weight"), vec![d], TensorKind::Gain),
                ln2_b: push(format!("{p}ln_2.bias"), vec![d], TensorKind::Bias),
                fc_w: push(
                    format!("{p}mlp.c_fc.weight"),
                    vec![d, 4 * d],
                    TensorKind::Matrix,
                ),
                fc_b: push(format!("{p}mlp.c_fc.bias"), vec![4 * d], TensorKind::Bias),
                fcproj_w: push(
                    format!("{p}mlp.c_proj.weight"),
                    vec![4 * d, d],
                    TensorKind::ResidualMatrix,
                ),
                fcproj_b: push(format!("{p}mlp.c_proj.bias"), vec![d], TensorKind::Bias),
            });
        }
        let lnf_w = push("transformer.ln_f.weight".into(), vec![d], TensorKind::Gain);
        let lnf_b = push("transformer.ln_f.bias".into(), vec![d], TensorKind::Bias);
        debug_assert_eq!(offset, config.n_params());
        GptLayout {
            table: ParamLayout {
                tensors,
                len: offset,
            },
            wte,
            wpe,
            blocks,
            lnf_w,
            lnf_b,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len
    }

    pub(crate) fn tensors(&self) -> &[TensorSpec] {
        &self.table.tensors
    }
}
