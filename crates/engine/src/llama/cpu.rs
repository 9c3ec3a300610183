//! The Llama CPU backend: forward, backward, AdamW and KV-cache decoding on a rayon pool.
//!
//! Built like the GPT-2 backend ([`crate::cpu`]): preallocated activation buffers sized
//! for the last batch shape, matrix products through the same bounds-checked `gemm`
//! front, the same AdamW ([`crate::ops::adamw`]) and the same loss kernel. Matrices are
//! stored `[out, in]` as HF stores them, so a forward product reads each weight
//! transposed (`x @ W^T`) and a weight gradient is `dW += dy^T @ x`.
//!
//! With a LoRA adapter ([`LlamaCpuBackend::open_lora`]) the base is frozen: it has no
//! gradient and no AdamW moments, the backward pass skips every base weight gradient
//! (and the embedding's and the first layer's input gradients, which nothing reads),
//! and each targeted projection adds `scale (x A^T) B^T` ([`Adapter`]).

use std::sync::Arc;

use rayon::prelude::*;

use super::ops::{self as lops, GqaShape, RopeTables};
use super::{LlamaConfig, LlamaLayout};
use crate::lora::{LoraConfig, LoraLayout, LoraTarget};
use crate::matmul::{Par, View, ViewMut, matmul};
use crate::{Architecture, Backend, Batch, EngineError, OptimizerConfig, Purpose, StepStats, ops};

/// Activations of one block, kept for the backward pass.
struct BlockActs {
    /// Normalized input of attention, and its reciprocal RMS per row.
    h1: Vec<f32>,
    rstd1: Vec<f32>,
    /// q, k, v of each token, rotary applied to q and k.
    qkv: Vec<f32>,
    /// Attention probabilities, `[b, heads, t, t]`.
    att: Vec<f32>,
    /// Attention output, token-major, before `o_proj`.
    atty: Vec<f32>,
    /// Residual after attention.
    res2: Vec<f32>,
    h2: Vec<f32>,
    rstd2: Vec<f32>,
    /// gate and up projections of each token.
    gate_up: Vec<f32>,
    /// silu(gate) * up.
    act: Vec<f32>,
    /// Residual after the MLP: the block's output.
    res3: Vec<f32>,
}

/// All buffers of one batch shape.
struct Acts {
    b: usize,
    t: usize,
    inputs: Vec<u32>,
    encoded: Vec<f32>,
    blocks: Vec<BlockActs>,
    /// Head-major attention outputs of the block being computed (scratch).
    heads: Vec<f32>,
    hf: Vec<f32>,
    rstdf: Vec<f32>,
    logits: Vec<f32>,
    losses: Vec<f32>,
    // Gradient scratch.
    dres: Vec<f32>,
    dc: Vec<f32>,
    datty: Vec<f32>,
    dqkv: Vec<f32>,
    dq_heads: Vec<f32>,
    dk_heads: Vec<f32>,
    dv_heads: Vec<f32>,
    dact: Vec<f32>,
    dgate_up: Vec<f32>,
    /// Per layer, each adapter's `scale (x A^T)` (`[n, rank]`, one after another in
    /// target order); empty without an adapter.
    lora_u: Vec<Vec<f32>>,
    /// The gradient of one group's `u`s (scratch, `[n, rank * members]`; see [`GROUPS`]).
    lora_du: Vec<f32>,
}

impl Acts {
    /// Buffers for `b x t` windows; the gradient scratch only `with_grads`.
    fn new(
        config: &LlamaConfig,
        b: usize,
        t: usize,
        with_grads: bool,
        lora: Option<&LoraConfig>,
    ) -> Acts {
        let (d, f, v) = (config.hidden, config.intermediate, config.vocab_size);
        let (nh, nkv, hd) = (config.heads, config.kv_heads, config.head_dim);
        let (n, w) = (b * t, config.qkv_width());
        let z = |len: usize| vec![0.0f32; len];
        let g = |len: usize| if with_grads { z(len) } else { Vec::new() };
        let blocks = (0..config.layers)
            .map(|_| BlockActs {
                h1: z(n * d),
                rstd1: z(n),
                qkv: z(n * w),
                att: z(b * nh * t * t),
                atty: z(n * nh * hd),
                res2: z(n * d),
                h2: z(n * d),
                rstd2: z(n),
                gate_up: z(n * 2 * f),
                act: z(n * f),
                res3: z(n * d),
            })
            .collect();
        Acts {
            b,
            t,
            inputs: vec![0; n],
            encoded: z(n * d),
            blocks,
            heads: z(n * nh * hd),
            hf: z(n * d),
            rstdf: z(n),
            logits: z(n * v),
            losses: z(n),
            dres: g(n * d),
            dc: g(n * d),
            datty: g(n * nh * hd),
            dqkv: g(n * w),
            dq_heads: g(n * nh * hd),
            dk_heads: g(n * nkv * hd),
            dv_heads: g(n * nkv * hd),
            dact: g(n * f),
            dgate_up: g(n * 2 * f),
            lora_u: (0..config.layers)
                .map(|_| z(n * lora_widths(config, lora).0))
                .collect(),
            lora_du: g(n * lora_widths(config, lora).1),
        }
    }
}

impl Acts {
    /// Floats the buffers hold (token ids count as one each: both are 4 bytes).
    #[cfg(test)]
    fn floats(&self) -> usize {
        let block = |a: &BlockActs| {
            [
                &a.h1, &a.rstd1, &a.qkv, &a.att, &a.atty, &a.res2, &a.h2, &a.rstd2, &a.gate_up,
                &a.act, &a.res3,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>()
        };
        self.inputs.len()
            + self.blocks.iter().map(block).sum::<usize>()
            + self.lora_u.iter().map(|u| u.len()).sum::<usize>()
            + self.lora_du.len()
            + [
                &self.encoded,
                &self.heads,
                &self.hf,
                &self.rstdf,
                &self.logits,
                &self.losses,
                &self.dres,
                &self.dc,
                &self.datty,
                &self.dqkv,
                &self.dq_heads,
                &self.dk_heads,
                &self.dv_heads,
                &self.dact,
                &self.dgate_up,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>()
    }
}

/// Floats [`Acts::new`] allocates for `b x t` windows, computed without allocating.
pub(crate) fn acts_floats(
    config: &LlamaConfig,
    b: usize,
    t: usize,
    with_grads: bool,
    lora: Option<&LoraConfig>,
) -> usize {
    let (d, f, v) = (config.hidden, config.intermediate, config.vocab_size);
    let (nh, nkv, hd) = (config.heads, config.kv_heads, config.head_dim);
    let (n, w) = (b * t, config.qkv_width());
    let block = n * d * 4 + n * 2 + n * w + b * nh * t * t + n * nh * hd + n * 3 * f;
    let forward = n + config.layers * block + n * d * 2 + n * nh * hd + n * 2 + n * v;
    let grads = if with_grads {
        n * d * 2 + n * nh * hd * 2 + n * w + n * nkv * hd * 2 + n * 3 * f
    } else {
        0
    };
    let (u, du, _) = lora_widths(config, lora);
    let adapter = config.layers * n * u + if with_grads { n * du } else { 0 };
    forward + grads + adapter
}

/// Bytes a backend of `config` (with adapter `lora`) for `purpose` holds once it has
/// run a `batch x seq` batch: the parameters and for training the gradients and two
/// AdamW moments of what trains (the whole model, or with LoRA the adapter alone), the
/// rotary tables and the activations.
pub(crate) fn backend_bytes(
    config: &LlamaConfig,
    lora: Option<&LoraConfig>,
    purpose: Purpose,
    batch: usize,
    seq: usize,
) -> u64 {
    let train = purpose == Purpose::Train;
    let copies = if train { 4 } else { 1 };
    let params = match lora {
        None => config.n_params() * copies,
        Some(lora) => {
            config.n_params() + lora.n_params(config) * copies + lora_widths(config, Some(lora)).2
        }
    };
    let rope = 2 * config.max_seq * (config.head_dim / 2);
    4 * (params + rope + acts_floats(config, batch, seq, train, lora)) as u64
}

/// KV cache and scratch for one generation.
struct DecodeState {
    pos: usize,
    /// Per layer, `[max_seq, kv_heads * head_dim]`: rotated keys, and values.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// The scratch below holds the rows of one pass (one token, or up to
    /// [`PREFILL_ROWS_MAX`] of a prompt), sized by [`DecodeState::rows`].
    x: Vec<f32>,
    h: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    y: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    /// `[rows, positions attended]`: each row's attention scores.
    scores: Vec<f32>,
    /// The logits after the last token fed.
    logits: Vec<f32>,
    /// An adapter's `u` rows (empty without an adapter).
    lora_u: Vec<f32>,
}

impl DecodeState {
    /// Sizes the scratch for `n` rows attending over at most `positions` positions, with
    /// `lora_width` adapter floats per row (the adapter's buffers must be exact).
    fn rows(&mut self, c: &LlamaConfig, n: usize, positions: usize, lora_width: usize) {
        self.x.resize(n * c.hidden, 0.0);
        self.h.resize(n * c.hidden, 0.0);
        self.rstd.resize(n, 0.0);
        self.qkv.resize(n * c.qkv_width(), 0.0);
        self.y.resize(n * c.heads * c.head_dim, 0.0);
        self.gate_up.resize(n * 2 * c.intermediate, 0.0);
        self.act.resize(n * c.intermediate, 0.0);
        self.scores.resize(n * positions, 0.0);
        self.lora_u.resize(n * lora_width, 0.0);
    }
}

/// Prompt rows one prefill pass runs at once: bounds a pass's scratch (`[rows, 2 *
/// intermediate]` and `[rows, context]` floats) whatever the prompt's length. Past a
/// few dozen rows gemm is as fast per row as it gets.
const PREFILL_ROWS_MAX: usize = 256;

/// What the forward pass ends with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// The raw logits stay in the logits buffer.
    Logits,
    /// The mean loss; the logits buffer holds probabilities after it.
    Loss,
    /// The mean loss; the logits buffer holds d(loss)/d(logits) for `backward`.
    LossAndGrad,
}

/// The targets that read the same input, in [`LoraTarget::ALL`] order: q, k and v read
/// the attention's normalized input, gate and up the MLP's. The `A` products of a
/// group's targets run as one product over their stacked `A`s (`x [A_q; A_k; A_v]^T`),
/// which reads `x` once instead of once per target, and so do their backward's `dA` and
/// `dx` products.
const GROUPS: [&[LoraTarget]; 4] = [
    &[LoraTarget::Q, LoraTarget::K, LoraTarget::V],
    &[LoraTarget::O],
    &[LoraTarget::Gate, LoraTarget::Up],
    &[LoraTarget::Down],
];

/// Which of [`GROUPS`] a target is in.
fn group_of(target: LoraTarget) -> usize {
    match target {
        LoraTarget::Q | LoraTarget::K | LoraTarget::V => 0,
        LoraTarget::O => 1,
        LoraTarget::Gate | LoraTarget::Up => 2,
        LoraTarget::Down => 3,
    }
}

/// The targets of `group` that `lora` adapts, in order.
fn group_targets(lora: &LoraConfig, group: usize) -> impl Iterator<Item = LoraTarget> + '_ {
    GROUPS[group]
        .iter()
        .copied()
        .filter(|t| lora.targets.contains(t))
}

/// Floats of a LoRA adapter's activations per token (each target's `u` row); of its
/// gradient scratch per token (the `du` rows of the widest group); and the floats of
/// the scratch that holds a group's stacked `A`s or their gradient.
fn lora_widths(config: &LlamaConfig, lora: Option<&LoraConfig>) -> (usize, usize, usize) {
    let Some(lora) = lora else {
        return (0, 0, 0);
    };
    let (mut du, mut stack) = (0, 0);
    for group in GROUPS {
        let members = group.iter().filter(|t| lora.targets.contains(t)).count();
        du = du.max(members * lora.rank);
        if members > 1 {
            let inp = group[0].shape(config).1;
            stack = stack.max(members * lora.rank * inp);
        }
    }
    (lora.rank * lora.targets.len(), du, stack)
}

/// A LoRA adapter on the frozen base: its parameters and, for training, their gradient
/// and AdamW moments (the only optimizer state of a LoRA backend).
///
/// A layer's `u` buffer holds, for each group of [`GROUPS`] in order, an `[n, members *
/// rank]` block whose columns are its members' `u = scale (x A^T)`, one `rank` wide each.
struct Adapter {
    config: LlamaConfig,
    lora: LoraConfig,
    layout: LoraLayout,
    /// For each group: its block's first float per row of `u` (a layer's `u` buffer is
    /// `[n, rank * targets]` floats, the groups' blocks one after another), and its width.
    blocks: [(usize, usize); 4],
    scale: f32,
    par: Par,
    params: Vec<f32>,
    grads: Vec<f32>,
    adam: ops::Moments,
    /// A group's stacked `A`s, or their gradient (scratch; empty if no group has two
    /// members).
    stack: Vec<f32>,
}

impl Adapter {
    fn new(
        config: LlamaConfig,
        lora: LoraConfig,
        params: Vec<f32>,
        purpose: Purpose,
        par: Par,
    ) -> Adapter {
        let mut blocks = [(0, 0); 4];
        let mut next = 0;
        for (group, block) in blocks.iter_mut().enumerate() {
            let width = group_targets(&lora, group).count() * lora.rank;
            *block = (next, width);
            next += width;
        }
        let n = match purpose {
            Purpose::Train => params.len(),
            Purpose::Eval => 0,
        };
        Adapter {
            layout: LoraLayout::new(&config, &lora),
            scale: lora.scale(),
            stack: vec![0.0; lora_widths(&config, Some(&lora)).2],
            config,
            lora,
            blocks,
            par,
            params,
            grads: vec![0.0; n],
            adam: ops::Moments::new(n),
        }
    }

    /// The range of `group`'s block in a layer's `u` buffer of `u_len` floats, the rows
    /// `n` and the block's width; `None` if the group has no adapted target.
    fn block(&self, group: usize, u_len: usize) -> Option<(std::ops::Range<usize>, usize, usize)> {
        let (start, width) = self.blocks[group];
        if width == 0 {
            return None;
        }
        let n = u_len / (self.lora.rank * self.lora.targets.len());
        Some((n * start..n * (start + width), n, width))
    }

    /// The `A`s of `group`'s targets in layer `l`, stacked (`[members * rank, in]`):
    /// the parameters themselves for a group of one, else a copy in `self.stack`.
    fn stacked_a(&mut self, l: usize, group: usize, inp: usize) -> &[f32] {
        let r = self.lora.rank;
        let mut members = group_targets(&self.lora, group)
            .filter_map(|t| self.layout.get(l, t))
            .peekable();
        let Some(first) = members.next() else {
            return &[];
        };
        if members.peek().is_none() {
            return &self.params[first.a..first.a + r * inp];
        }
        let chunk = r * inp;
        let mut len = 0;
        for ab in std::iter::once(first).chain(members) {
            self.stack[len..len + chunk].copy_from_slice(&self.params[ab.a..ab.a + chunk]);
            len += chunk;
        }
        &self.stack[..len]
    }

    /// `u = scale (x A^T)` for every adapted target of `group` in layer `l`, as one
    /// product over the group's stacked `A`s, into the group's block of `u` (the layer's
    /// buffer); nothing if the group has no adapted target.
    fn down(&mut self, (l, group): (usize, usize), x: View<'_>, u: &mut [f32], par: Par) {
        let Some((range, n, width)) = self.block(group, u.len()) else {
            return;
        };
        let inp = GROUPS[group][0].shape(&self.config).1;
        let scale = self.scale;
        let a = self.stacked_a(l, group, inp);
        let u = &mut u[range];
        matmul(
            ViewMut::rows(u, n, width),
            x,
            View::rows(a, width, inp).t(),
            false,
            par,
        );
        for x in u.iter_mut() {
            *x *= scale;
        }
    }

    /// `target`'s `u` in its group's block `u_block` (`[n, width]`).
    fn u_of<'a>(&self, target: LoraTarget, u_block: &'a [f32], n: usize, width: usize) -> View<'a> {
        let j = group_targets(&self.lora, group_of(target))
            .position(|t| t == target)
            .unwrap_or(0);
        View::strided(&u_block[j * self.lora.rank..], n, self.lora.rank, width, 1)
    }

    /// `y += u B^T` for `target` of layer `l`, its `u` computed by [`Adapter::down`];
    /// nothing if `target` has no adapter.
    fn up(&self, (l, target): (usize, LoraTarget), y: ViewMut<'_>, u: &[f32], par: Par) {
        let Some(ab) = self.layout.get(l, target) else {
            return;
        };
        let Some((range, n, width)) = self.block(group_of(target), u.len()) else {
            return;
        };
        let (r, out) = (self.lora.rank, target.shape(&self.config).0);
        matmul(
            y,
            self.u_of(target, &u[range], n, width),
            View::rows(&self.params[ab.b..ab.b + out * r], out, r).t(),
            true,
            par,
        );
    }

    /// The backward of [`Adapter::down`] and [`Adapter::up`] for `group` of layer `l`,
    /// given each target's
    /// output gradient `dy`: writes `dB = dy^T u` and `dA = scale (dy B)^T x` (the
    /// group's `dA`s as one product), and adds `scale (dy B) A` to `dx` when there is one
    /// (one product over the stacked `A`s). `du` is scratch.
    fn backward(
        &mut self,
        (l, group): (usize, usize),
        dys: &[(LoraTarget, View<'_>)],
        x: View<'_>,
        u: &[f32],
        du: &mut [f32],
        dx: Option<ViewMut<'_>>,
    ) {
        let Some((range, n, width)) = self.block(group, u.len()) else {
            return;
        };
        let (r, par) = (self.lora.rank, self.par);
        let inp = GROUPS[group][0].shape(&self.config).1;
        let u = &u[range];
        let du = &mut du[..n * width];
        let mut members = Vec::with_capacity(GROUPS[group].len());
        for &(target, dy) in dys {
            let Some(ab) = self.layout.get(l, target) else {
                continue;
            };
            let j = members.len();
            members.push(ab);
            let out = target.shape(&self.config).0;
            let u_target = self.u_of(target, u, n, width);
            matmul(
                ViewMut::rows(&mut self.grads[ab.b..ab.b + out * r], out, r),
                dy.t(),
                u_target,
                false,
                par,
            );
            matmul(
                ViewMut::strided(&mut du[j * r..], n, r, width, 1),
                dy,
                View::rows(&self.params[ab.b..ab.b + out * r], out, r),
                false,
                par,
            );
        }
        for x in du.iter_mut() {
            *x *= self.scale;
        }
        let du = View::rows(du, n, width);
        let chunk = r * inp;
        match members.as_slice() {
            [ab] => matmul(
                ViewMut::rows(&mut self.grads[ab.a..ab.a + chunk], r, inp),
                du.t(),
                x,
                false,
                par,
            ),
            _ => {
                let da = &mut self.stack[..members.len() * chunk];
                matmul(ViewMut::rows(da, width, inp), du.t(), x, false, par);
                for (j, ab) in members.iter().enumerate() {
                    self.grads[ab.a..ab.a + chunk].copy_from_slice(&da[j * chunk..(j + 1) * chunk]);
                }
            }
        }
        if let Some(dx) = dx {
            let a = self.stacked_a(l, group, inp);
            matmul(dx, du, View::rows(a, width, inp), true, par);
        }
    }
}

/// A Llama on the CPU.
pub struct LlamaCpuBackend {
    config: LlamaConfig,
    layout: LlamaLayout,
    rope: RopeTables,
    /// The base's parameters (the whole model without an adapter). With a LoRA adapter
    /// the base is frozen and may be shared with other backends and its owner
    /// ([`LlamaCpuBackend::open_lora_shared`]); training every tensor, this backend holds
    /// the only reference and AdamW updates it in place.
    params: Arc<Vec<f32>>,
    purpose: Purpose,
    /// Training every tensor: gradients and AdamW's moments, each the size of `params`.
    /// Evaluation or a frozen base (LoRA): empty.
    grads: Vec<f32>,
    adam: ops::Moments,
    /// The LoRA adapter, if the base is frozen.
    lora: Option<Adapter>,
    acts: Option<Acts>,
    decode: Option<DecodeState>,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
}

/// `dw += dy^T @ x` for a weight `dw` stored `[o, i]`, inputs `x` `[n, i]` and output
/// gradients `dy` `[n, o]`.
fn weight_grad(dw: &mut [f32], x: &[f32], dy: &[f32], (o, i): (usize, usize), par: Par) {
    let n = x.len() / i;
    matmul(
        ViewMut::rows(dw, o, i),
        View::rows(dy, n, o).t(),
        View::rows(x, n, i),
        true,
        par,
    );
}

impl LlamaCpuBackend {
    /// A backend for `purpose` holding `params` (in [`LlamaLayout`] order), computing on
    /// `threads` threads. An evaluation backend allocates no gradients, no AdamW moments
    /// and no gradient scratch.
    pub fn open(
        config: LlamaConfig,
        params: Vec<f32>,
        threads: usize,
        purpose: Purpose,
    ) -> Result<Self, EngineError> {
        LlamaCpuBackend::open_arc(config, Arc::new(params), threads, purpose)
    }

    fn open_arc(
        config: LlamaConfig,
        params: Arc<Vec<f32>>,
        threads: usize,
        purpose: Purpose,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let layout = LlamaLayout::new(&config);
        if params.len() != layout.table().len() {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want: layout.table().len(),
            });
        }
        let threads = threads.max(1);
        let pool = crate::cpu::thread_pool(threads)?;
        let n = match purpose {
            Purpose::Train => params.len(),
            Purpose::Eval => 0,
        };
        Ok(LlamaCpuBackend {
            rope: RopeTables::new(config.head_dim, config.max_seq, config.rope_theta),
            config,
            layout,
            params,
            purpose,
            grads: vec![0.0; n],
            adam: ops::Moments::new(n),
            lora: None,
            acts: None,
            decode: None,
            pool,
            threads,
        })
    }

    /// A backend with a LoRA adapter on a frozen base: `params` is the full vector, the
    /// base ([`LlamaLayout`] order) followed by the adapter ([`LoraLayout`] order). Only
    /// the adapter has a gradient and AdamW moments.
    pub fn open_lora(
        config: LlamaConfig,
        lora: LoraConfig,
        mut params: Vec<f32>,
        threads: usize,
        purpose: Purpose,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        lora.validate(&config).map_err(crate::SpecError::from)?;
        let (base, adapter) = (config.n_params(), lora.n_params(&config));
        if params.len() != base + adapter {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want: base + adapter,
            });
        }
        let adapter_params = params.split_off(base);
        params.shrink_to_fit();
        LlamaCpuBackend::open_lora_shared(
            config,
            lora,
            Arc::new(params),
            adapter_params,
            threads,
            purpose,
        )
    }

    /// A backend with a LoRA adapter (`adapter`, [`LoraLayout`] order) on the frozen
    /// `base` ([`LlamaLayout`] order), which it shares rather than copies: every backend
    /// of a LoRA run (a worker's, the coordinator's scoring, re-runs, holdout and
    /// serving) reads the one base its owner loaded.
    pub fn open_lora_shared(
        config: LlamaConfig,
        lora: LoraConfig,
        base: Arc<Vec<f32>>,
        adapter: Vec<f32>,
        threads: usize,
        purpose: Purpose,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        lora.validate(&config).map_err(crate::SpecError::from)?;
        let want = lora.n_params(&config);
        if adapter.len() != want {
            return Err(EngineError::ParamCount {
                got: adapter.len(),
                want,
            });
        }
        let adapter_params = adapter;
        let mut backend = LlamaCpuBackend::open_arc(config, base, threads, Purpose::Eval)?;
        backend.purpose = purpose;
        backend.lora = Some(Adapter::new(
            config,
            lora,
            adapter_params,
            purpose,
            Par::Threads(backend.threads),
        ));
        Ok(backend)
    }

    /// The logits of every position of one sequence (`[tokens.len(), vocab]`), from the
    /// full forward pass: what KV-cache decoding must reproduce.
    pub fn logits(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        let batch = Batch {
            inputs: tokens,
            targets: tokens,
            batch: 1,
            seq: tokens.len(),
        };
        self.check_batch(&batch)?;
        let pool = self.pool.clone();
        pool.install(|| self.forward(&batch, Finish::Logits));
        match &self.acts {
            Some(acts) => Ok(&acts.logits),
            None => unreachable!("forward allocates the activations"),
        }
    }

    fn check_trainable(&self) -> Result<(), EngineError> {
        match self.purpose {
            Purpose::Train => Ok(()),
            Purpose::Eval => Err(EngineError::EvalOnly),
        }
    }

    fn check_batch(&self, batch: &Batch<'_>) -> Result<(), EngineError> {
        crate::cpu::check_batch(batch, self.config.max_seq, self.config.vocab_size)
    }

    /// Forward pass; returns the mean loss (0 with [`Finish::Logits`]).
    fn forward(&mut self, batch: &Batch<'_>, finish: Finish) -> f32 {
        let config = self.config;
        let (b, t) = (batch.batch, batch.seq);
        if !matches!(&self.acts, Some(a) if a.b == b && a.t == t) {
            self.acts = None; // free the old buffers before allocating new ones
            self.acts = Some(Acts::new(
                &config,
                b,
                t,
                self.purpose == Purpose::Train,
                self.lora.as_ref().map(|a| &a.lora),
            ));
        }
        let Some(acts) = self.acts.as_mut() else {
            unreachable!("allocated above")
        };
        let (params, layout, rope) = (&self.params, &self.layout, &self.rope);
        let mut adapter = self.lora.as_mut();
        let (nq, nkv) = (
            config.heads * config.head_dim,
            config.kv_heads * config.head_dim,
        );
        let (d, f, v, n) = (config.hidden, config.intermediate, config.vocab_size, b * t);
        let (nh, hd, w) = (config.heads, config.head_dim, config.qkv_width());
        let rotated = (nh + config.kv_heads) * hd;
        let shape = GqaShape {
            t,
            heads: nh,
            kv_heads: config.kv_heads,
            head_dim: hd,
        };
        let eps = config.rms_eps as f32;
        let par = Par::Threads(self.threads);
        let p = |off: usize, len: usize| &params[off..off + len];
        acts.inputs.copy_from_slice(batch.inputs);

        let embed = p(layout.embed, v * d);
        acts.encoded
            .par_chunks_mut(d)
            .zip(batch.inputs.par_iter())
            .for_each(|(row, &tok)| {
                row.copy_from_slice(&embed[tok as usize * d..(tok as usize + 1) * d]);
            });

        for l in 0..config.layers {
            let o = layout.blocks[l];
            let (before, rest) = acts.blocks.split_at_mut(l);
            let residual: &[f32] = if l == 0 {
                &acts.encoded
            } else {
                &before[l - 1].res3
            };
            let a = &mut rest[0];
            let u = &mut acts.lora_u[l];
            lops::rmsnorm_forward(&mut a.h1, &mut a.rstd1, residual, p(o.attn_norm, d), eps);
            matmul(
                ViewMut::rows(&mut a.qkv, n, w),
                View::rows(&a.h1, n, d),
                View::rows(p(o.qkv, w * d), w, d).t(),
                false,
                par,
            );
            if let Some(ad) = adapter.as_mut() {
                ad.down((l, 0), View::rows(&a.h1, n, d), u, par);
                for (target, col, width) in [
                    (LoraTarget::Q, 0, nq),
                    (LoraTarget::K, nq, nkv),
                    (LoraTarget::V, nq + nkv, nkv),
                ] {
                    let y = ViewMut::strided(&mut a.qkv[col..], n, width, w, 1);
                    ad.up((l, target), y, u, par);
                }
            }
            rope.rotate_rows(&mut a.qkv, w, rotated, t, false);
            lops::attention_forward(&mut acts.heads, &mut a.att, &a.qkv, shape);
            lops::heads_to_tokens(&mut a.atty, nh * hd, 0, &acts.heads, (t, nh, hd));
            a.res2.copy_from_slice(residual);
            matmul(
                ViewMut::rows(&mut a.res2, n, d),
                View::rows(&a.atty, n, nh * hd),
                View::rows(p(o.o, d * nh * hd), d, nh * hd).t(),
                true,
                par,
            );
            if let Some(ad) = adapter.as_mut() {
                ad.down((l, 1), View::rows(&a.atty, n, nh * hd), u, par);
                ad.up((l, LoraTarget::O), ViewMut::rows(&mut a.res2, n, d), u, par);
            }
            lops::rmsnorm_forward(&mut a.h2, &mut a.rstd2, &a.res2, p(o.mlp_norm, d), eps);
            matmul(
                ViewMut::rows(&mut a.gate_up, n, 2 * f),
                View::rows(&a.h2, n, d),
                View::rows(p(o.gate_up, 2 * f * d), 2 * f, d).t(),
                false,
                par,
            );
            if let Some(ad) = adapter.as_mut() {
                ad.down((l, 2), View::rows(&a.h2, n, d), u, par);
                for (target, col) in [(LoraTarget::Gate, 0), (LoraTarget::Up, f)] {
                    let y = ViewMut::strided(&mut a.gate_up[col..], n, f, 2 * f, 1);
                    ad.up((l, target), y, u, par);
                }
            }
            lops::swiglu_forward(&mut a.act, &a.gate_up, f);
            a.res3.copy_from_slice(&a.res2);
            matmul(
                ViewMut::rows(&mut a.res3, n, d),
                View::rows(&a.act, n, f),
                View::rows(p(o.down, d * f), d, f).t(),
                true,
                par,
            );
            if let Some(ad) = adapter.as_mut() {
                ad.down((l, 3), View::rows(&a.act, n, f), u, par);
                ad.up(
                    (l, LoraTarget::Down),
                    ViewMut::rows(&mut a.res3, n, d),
                    u,
                    par,
                );
            }
        }
        let last: &[f32] = match acts.blocks.last() {
            Some(block) => &block.res3,
            None => &acts.encoded,
        };
        lops::rmsnorm_forward(&mut acts.hf, &mut acts.rstdf, last, p(layout.norm, d), eps);
        matmul(
            ViewMut::rows(&mut acts.logits, n, v),
            View::rows(&acts.hf, n, d),
            View::rows(p(layout.head, v * d), v, d).t(),
            false,
            par,
        );
        let counted = ops::counted(batch.targets);
        let grad_scale = match finish {
            Finish::Logits => return 0.0,
            Finish::Loss => None,
            Finish::LossAndGrad => Some(1.0 / counted.max(1) as f32),
        };
        ops::softmax_cross_entropy(
            &mut acts.logits,
            &mut acts.losses,
            batch.targets,
            v,
            grad_scale,
        );
        ops::mean_loss(&acts.losses, counted)
    }

    /// Backward pass after `forward(.., Finish::LossAndGrad)`; overwrites `self.grads`.
    fn backward(&mut self) {
        let config = self.config;
        let Some(acts) = self.acts.as_mut() else {
            unreachable!("forward runs first")
        };
        let (params, layout, rope, grads) =
            (&self.params, &self.layout, &self.rope, &mut self.grads);
        let mut adapter = self.lora.as_mut();
        // Without an adapter every tensor trains; with one the base is frozen, and no
        // base weight gradient is computed.
        let full = adapter.is_none();
        let (b, t) = (acts.b, acts.t);
        let (d, f, v, n) = (config.hidden, config.intermediate, config.vocab_size, b * t);
        let (nh, nkv, hd, w) = (
            config.heads,
            config.kv_heads,
            config.head_dim,
            config.qkv_width(),
        );
        let shape = GqaShape {
            t,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        };
        let par = Par::Threads(self.threads);
        let p = |off: usize, len: usize| &params[off..off + len];
        grads.par_chunks_mut(1 << 16).for_each(|g| g.fill(0.0));

        let last: &[f32] = match acts.blocks.last() {
            Some(block) => &block.res3,
            None => &acts.encoded,
        };
        // Output head: d(hf) = dlogits @ head; d(head) += dlogits^T @ hf.
        matmul(
            ViewMut::rows(&mut acts.dc, n, d),
            View::rows(&acts.logits, n, v),
            View::rows(p(layout.head, v * d), v, d),
            false,
            par,
        );
        if full {
            weight_grad(
                &mut grads[layout.head..layout.head + v * d],
                &acts.hf,
                &acts.logits,
                (v, d),
                par,
            );
        }
        acts.dres.par_chunks_mut(1 << 16).for_each(|g| g.fill(0.0));
        lops::rmsnorm_backward(
            &mut acts.dres,
            if full {
                &mut grads[layout.norm..layout.norm + d]
            } else {
                &mut []
            },
            &acts.dc,
            last,
            p(layout.norm, d),
            &acts.rstdf,
        );

        for l in (0..config.layers).rev() {
            let o = layout.blocks[l];
            let residual: &[f32] = if l == 0 {
                &acts.encoded
            } else {
                &acts.blocks[l - 1].res3
            };
            let a = &acts.blocks[l];
            let u = &acts.lora_u[l];
            // With a frozen embedding nothing reads the first layer's input gradient.
            let need_dx = full || l > 0;
            // MLP.
            matmul(
                ViewMut::rows(&mut acts.dact, n, f),
                View::rows(&acts.dres, n, d),
                View::rows(p(o.down, d * f), d, f),
                false,
                par,
            );
            if full {
                weight_grad(
                    &mut grads[o.down..o.down + d * f],
                    &a.act,
                    &acts.dres,
                    (d, f),
                    par,
                );
            }
            if let Some(ad) = adapter.as_mut() {
                ad.backward(
                    (l, 3),
                    &[(LoraTarget::Down, View::rows(&acts.dres, n, d))],
                    View::rows(&a.act, n, f),
                    u,
                    &mut acts.lora_du,
                    Some(ViewMut::rows(&mut acts.dact, n, f)),
                );
            }
            lops::swiglu_backward(&mut acts.dgate_up, &a.gate_up, &acts.dact, f);
            matmul(
                ViewMut::rows(&mut acts.dc, n, d),
                View::rows(&acts.dgate_up, n, 2 * f),
                View::rows(p(o.gate_up, 2 * f * d), 2 * f, d),
                false,
                par,
            );
            if full {
                weight_grad(
                    &mut grads[o.gate_up..o.gate_up + 2 * f * d],
                    &a.h2,
                    &acts.dgate_up,
                    (2 * f, d),
                    par,
                );
            }
            if let Some(ad) = adapter.as_mut() {
                let dgate_up = |col: usize| View::strided(&acts.dgate_up[col..], n, f, 2 * f, 1);
                ad.backward(
                    (l, 2),
                    &[
                        (LoraTarget::Gate, dgate_up(0)),
                        (LoraTarget::Up, dgate_up(f)),
                    ],
                    View::rows(&a.h2, n, d),
                    u,
                    &mut acts.lora_du,
                    Some(ViewMut::rows(&mut acts.dc, n, d)),
                );
            }
            lops::rmsnorm_backward(
                &mut acts.dres,
                if full {
                    &mut grads[o.mlp_norm..o.mlp_norm + d]
                } else {
                    &mut []
                },
                &acts.dc,
                &a.res2,
                p(o.mlp_norm, d),
                &a.rstd2,
            );
            // Attention.
            matmul(
                ViewMut::rows(&mut acts.datty, n, nh * hd),
                View::rows(&acts.dres, n, d),
                View::rows(p(o.o, d * nh * hd), d, nh * hd),
                false,
                par,
            );
            if full {
                weight_grad(
                    &mut grads[o.o..o.o + d * nh * hd],
                    &a.atty,
                    &acts.dres,
                    (d, nh * hd),
                    par,
                );
            }
            if let Some(ad) = adapter.as_mut() {
                ad.backward(
                    (l, 1),
                    &[(LoraTarget::O, View::rows(&acts.dres, n, d))],
                    View::rows(&a.atty, n, nh * hd),
                    u,
                    &mut acts.lora_du,
                    Some(ViewMut::rows(&mut acts.datty, n, nh * hd)),
                );
            }
            lops::attention_backward(
                (&mut acts.dq_heads, &mut acts.dk_heads, &mut acts.dv_heads),
                &acts.datty,
                &a.att,
                &a.qkv,
                shape,
            );
            lops::heads_to_tokens(&mut acts.dqkv, w, 0, &acts.dq_heads, (t, nh, hd));
            lops::heads_to_tokens(&mut acts.dqkv, w, nh * hd, &acts.dk_heads, (t, nkv, hd));
            lops::heads_to_tokens(
                &mut acts.dqkv,
                w,
                (nh + nkv) * hd,
                &acts.dv_heads,
                (t, nkv, hd),
            );
            // The rotation is orthogonal: its backward is the rotation back.
            rope.rotate_rows(&mut acts.dqkv, w, (nh + nkv) * hd, t, true);
            if need_dx {
                matmul(
                    ViewMut::rows(&mut acts.dc, n, d),
                    View::rows(&acts.dqkv, n, w),
                    View::rows(p(o.qkv, w * d), w, d),
                    false,
                    par,
                );
            }
            if full {
                weight_grad(
                    &mut grads[o.qkv..o.qkv + w * d],
                    &a.h1,
                    &acts.dqkv,
                    (w, d),
                    par,
                );
            }
            if let Some(ad) = adapter.as_mut() {
                let (nq, nk) = (nh * hd, nkv * hd);
                let dqkv =
                    |col: usize, width: usize| View::strided(&acts.dqkv[col..], n, width, w, 1);
                ad.backward(
                    (l, 0),
                    &[
                        (LoraTarget::Q, dqkv(0, nq)),
                        (LoraTarget::K, dqkv(nq, nk)),
                        (LoraTarget::V, dqkv(nq + nk, nk)),
                    ],
                    View::rows(&a.h1, n, d),
                    u,
                    &mut acts.lora_du,
                    need_dx.then(|| ViewMut::rows(&mut acts.dc, n, d)),
                );
            }
            if need_dx {
                lops::rmsnorm_backward(
                    &mut acts.dres,
                    if full {
                        &mut grads[o.attn_norm..o.attn_norm + d]
                    } else {
                        &mut []
                    },
                    &acts.dc,
                    residual,
                    p(o.attn_norm, d),
                    &a.rstd1,
                );
            }
        }
        if !full {
            return;
        }
        // Embedding: scatter-add in token order (sequential, so deterministic).
        for (i, &tok) in acts.inputs.iter().enumerate() {
            let g = &acts.dres[i * d..(i + 1) * d];
            let te = layout.embed + tok as usize * d;
            for (x, y) in grads[te..te + d].iter_mut().zip(g) {
                *x += y;
            }
        }
    }

    /// One AdamW update of what trains: the whole model, or the adapter alone.
    fn adamw(&mut self, opt: &OptimizerConfig, lr: f32) -> f32 {
        match self.lora.as_mut() {
            None => self.adam.update(
                // The only reference: a backend training every tensor never shares.
                Arc::make_mut(&mut self.params).as_mut_slice(),
                &self.grads,
                self.layout.table().tensors(),
                opt,
                lr,
            ),
            Some(ad) => ad.adam.update(
                &mut ad.params,
                &ad.grads,
                ad.layout.table().tensors(),
                opt,
                lr,
            ),
        }
    }

    /// Feeds `tokens` at the next positions of the KV cache, [`PREFILL_ROWS_MAX`] rows
    /// per pass; returns the logits after the last. Nothing is fed unless all of them fit.
    fn decode_tokens(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        let c = self.config;
        let pos = self.decode.as_ref().map_or(0, |s| s.pos);
        crate::cpu::check_decode(tokens, pos, c.max_seq, c.vocab_size)?;
        let kv = c.kv_heads * c.head_dim;
        self.decode.get_or_insert_with(|| DecodeState {
            pos: 0,
            k: vec![vec![0.0; c.max_seq * kv]; c.layers],
            v: vec![vec![0.0; c.max_seq * kv]; c.layers],
            x: Vec::new(),
            h: Vec::new(),
            rstd: Vec::new(),
            qkv: Vec::new(),
            y: Vec::new(),
            gate_up: Vec::new(),
            act: Vec::new(),
            scores: Vec::new(),
            logits: vec![0.0; c.vocab_size],
            lora_u: Vec::new(),
        });
        for chunk in tokens.chunks(PREFILL_ROWS_MAX) {
            self.decode_pass(chunk);
        }
        match &self.decode {
            Some(s) => Ok(&s.logits),
            None => unreachable!("created above"),
        }
    }

    /// One pass of [`LlamaCpuBackend::decode_tokens`]: the rows of `tokens` through every
    /// layer as matrices (the training forward's kernels), each row attending to the
    /// cache up to its own position; the head runs on the last row only.
    fn decode_pass(&mut self, tokens: &[u32]) {
        let config = self.config;
        let Some(s) = self.decode.as_mut() else {
            unreachable!("decode_tokens creates the state")
        };
        let (params, layout, rope) = (&self.params, &self.layout, &self.rope);
        let mut adapter = self.lora.as_mut();
        let (d, f, v) = (config.hidden, config.intermediate, config.vocab_size);
        let (nh, nkv, hd, w) = (
            config.heads,
            config.kv_heads,
            config.head_dim,
            config.qkv_width(),
        );
        let (group, kvw, nq) = (nh / nkv, nkv * hd, nh * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let eps = config.rms_eps as f32;
        let p = |off: usize, len: usize| &params[off..off + len];
        let (pos, n) = (s.pos, tokens.len());
        let lora_width = lora_widths(&config, adapter.as_ref().map(|a| &a.lora)).0;
        s.rows(&config, n, pos + n, lora_width);
        for (row, &tok) in s.x.chunks_exact_mut(d).zip(tokens) {
            row.copy_from_slice(p(layout.embed + tok as usize * d, d));
        }
        // One row (a decode step) splits each product over the weight's rows; a prompt's
        // rows are a matrix product over the threads.
        let par = if n == 1 {
            Par::Single
        } else {
            Par::Threads(self.threads)
        };
        let linear = |y: &mut [f32], x: &[f32], weight: &[f32], (out, inp), accumulate| {
            if n == 1 {
                ops::matvec(y, weight, x, accumulate);
            } else {
                matmul(
                    ViewMut::rows(y, n, out),
                    View::rows(x, n, inp),
                    View::rows(weight, out, inp).t(),
                    accumulate,
                    par,
                );
            }
        };
        self.pool.install(|| {
            for l in 0..config.layers {
                let o = layout.blocks[l];
                lops::rmsnorm_forward(&mut s.h, &mut s.rstd, &s.x, p(o.attn_norm, d), eps);
                linear(&mut s.qkv, &s.h, p(o.qkv, w * d), (w, d), false);
                if let Some(ad) = adapter.as_mut() {
                    ad.down((l, 0), View::rows(&s.h, n, d), &mut s.lora_u, par);
                    for (target, col, width) in [
                        (LoraTarget::Q, 0, nq),
                        (LoraTarget::K, nq, kvw),
                        (LoraTarget::V, nq + kvw, kvw),
                    ] {
                        let y = ViewMut::strided(&mut s.qkv[col..], n, width, w, 1);
                        ad.up((l, target), y, &s.lora_u, par);
                    }
                }
                for (i, row) in s.qkv.chunks_exact_mut(w).enumerate() {
                    let at = pos + i;
                    rope.rotate(&mut row[..nq + kvw], at, false);
                    s.k[l][at * kvw..(at + 1) * kvw].copy_from_slice(&row[nq..nq + kvw]);
                    s.v[l][at * kvw..(at + 1) * kvw].copy_from_slice(&row[nq + kvw..]);
                }
                let cache = (&s.k[l][..], &s.v[l][..]);
                s.y.par_chunks_mut(nq)
                    .zip(s.scores.par_chunks_mut(pos + n))
                    .zip(s.qkv.par_chunks(w))
                    .enumerate()
                    .for_each(|(i, ((y, scores), q))| {
                        for h in 0..nh {
                            ops::attend_cached(
                                &mut y[h * hd..(h + 1) * hd],
                                &q[h * hd..(h + 1) * hd],
                                cache,
                                (kvw, h / group * hd),
                                scale,
                                &mut scores[..=pos + i],
                            );
                        }
                    });
                linear(&mut s.x, &s.y, p(o.o, d * nq), (d, nq), true);
                if let Some(ad) = adapter.as_mut() {
                    ad.down((l, 1), View::rows(&s.y, n, nq), &mut s.lora_u, par);
                    let y = ViewMut::rows(&mut s.x, n, d);
                    ad.up((l, LoraTarget::O), y, &s.lora_u, par);
                }
                lops::rmsnorm_forward(&mut s.h, &mut s.rstd, &s.x, p(o.mlp_norm, d), eps);
                linear(
                    &mut s.gate_up,
                    &s.h,
                    p(o.gate_up, 2 * f * d),
                    (2 * f, d),
                    false,
                );
                if let Some(ad) = adapter.as_mut() {
                    ad.down((l, 2), View::rows(&s.h, n, d), &mut s.lora_u, par);
                    for (target, col) in [(LoraTarget::Gate, 0), (LoraTarget::Up, f)] {
                        let y = ViewMut::strided(&mut s.gate_up[col..], n, f, 2 * f, 1);
                        ad.up((l, target), y, &s.lora_u, par);
                    }
                }
                lops::swiglu_forward(&mut s.act, &s.gate_up, f);
                linear(&mut s.x, &s.act, p(o.down, d * f), (d, f), true);
                if let Some(ad) = adapter.as_mut() {
                    ad.down((l, 3), View::rows(&s.act, n, f), &mut s.lora_u, par);
                    let y = ViewMut::rows(&mut s.x, n, d);
                    ad.up((l, LoraTarget::Down), y, &s.lora_u, par);
                }
            }
            let h = &mut s.h[..d];
            lops::rmsnorm_row(h, &s.x[(n - 1) * d..], p(layout.norm, d), eps);
            ops::matvec(&mut s.logits, p(layout.head, v * d), h, false);
        });
        s.pos += n;
    }
}

impl Backend for LlamaCpuBackend {
    fn architecture(&self) -> Architecture {
        Architecture::Llama(self.config)
    }

    fn device(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    /// The base, followed with LoRA by the adapter.
    fn params(&self) -> Vec<f32> {
        match &self.lora {
            None => self.params.to_vec(),
            Some(ad) => [&self.params[..], &ad.params[..]].concat(),
        }
    }

    fn set_params(&mut self, params: &[f32]) -> Result<(), EngineError> {
        let base = self.params.len();
        let want = base + self.lora.as_ref().map_or(0, |ad| ad.params.len());
        if params.len() != want {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want,
            });
        }
        // A shared frozen base is copied before it is written.
        Arc::make_mut(&mut self.params).copy_from_slice(&params[..base]);
        if let Some(ad) = self.lora.as_mut() {
            ad.params.copy_from_slice(&params[base..]);
        }
        self.decode = None;
        Ok(())
    }

    /// The adapter with LoRA, else every parameter.
    fn trainable(&self) -> Vec<f32> {
        match &self.lora {
            None => self.params.to_vec(),
            Some(ad) => ad.params.clone(),
        }
    }

    fn set_trainable(&mut self, trainable: &[f32]) -> Result<(), EngineError> {
        let Some(ad) = self.lora.as_mut() else {
            return self.set_params(trainable);
        };
        if trainable.len() != ad.params.len() {
            return Err(EngineError::ParamCount {
                got: trainable.len(),
                want: ad.params.len(),
            });
        }
        ad.params.copy_from_slice(trainable);
        self.decode = None;
        Ok(())
    }

    fn reset_optimizer(&mut self) {
        self.adam.reset();
        if let Some(ad) = self.lora.as_mut() {
            ad.adam.reset();
        }
    }

    fn train_step(
        &mut self,
        batch: &Batch<'_>,
        optimizer: &OptimizerConfig,
        lr: f32,
    ) -> Result<StepStats, EngineError> {
        self.check_trainable()?;
        self.check_batch(batch)?;
        let pool = self.pool.clone();
        let stats = pool.install(|| {
            let loss = self.forward(batch, Finish::LossAndGrad);
            self.backward();
            let grad_norm = self.adamw(optimizer, lr);
            StepStats { loss, grad_norm }
        });
        self.decode = None;
        Ok(stats)
    }

    fn eval_loss(&mut self, batch: &Batch<'_>) -> Result<f32, EngineError> {
        self.check_batch(batch)?;
        let pool = self.pool.clone();
        Ok(pool.install(|| self.forward(batch, Finish::Loss)))
    }

    fn loss_and_grad(&mut self, batch: &Batch<'_>) -> Result<(f32, Vec<f32>), EngineError> {
        self.check_trainable()?;
        self.check_batch(batch)?;
        let pool = self.pool.clone();
        let loss = pool.install(|| {
            let loss = self.forward(batch, Finish::LossAndGrad);
            self.backward();
            loss
        });
        let grads = match &self.lora {
            None => self.grads.clone(),
            Some(ad) => ad.grads.clone(),
        };
        Ok((loss, grads))
    }

    fn decode_reset(&mut self) {
        if let Some(state) = self.decode.as_mut() {
            state.pos = 0;
        }
    }

    fn decode_step(&mut self, token: u32) -> Result<&[f32], EngineError> {
        self.decode_tokens(&[token])
    }

    fn decode_prefill(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        self.decode_tokens(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        LlamaConfig {
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
        }
    }

    /// What a backend answers to one bad request, as text.
    #[track_caller]
    fn check(
        request: impl FnOnce(&mut LlamaCpuBackend) -> Result<(), EngineError>,
        expect: expect_test::Expect,
    ) {
        let config = tiny();
        let params = super::super::init_params(&config, 1).expect("init");
        let mut backend = LlamaCpuBackend::open(config, params, 1, Purpose::Train).expect("open");
        let got = match request(&mut backend) {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn the_stated_activation_floats_are_those_allocated() {
        for (b, t, grads) in [(1, 4, true), (2, 3, false), (3, 4, true)] {
            let lora = LoraConfig {
                rank: 3,
                alpha: 6.0,
                targets: vec![LoraTarget::V, LoraTarget::Down],
            };
            for lora in [None, Some(&lora)] {
                let acts = Acts::new(&tiny(), b, t, grads, lora);
                assert_eq!(
                    acts.floats(),
                    acts_floats(&tiny(), b, t, grads, lora),
                    "{b}x{t} {grads} {lora:?}"
                );
            }
        }
    }

    #[test]
    fn ignored_targets_count_in_no_loss_and_no_gradient() {
        // One window with a target ignored, then a window whose targets are all ignored:
        // the same loss and the same step as the first window alone.
        let ig = crate::IGNORE_TARGET;
        let first = ([3u32, 1, 4, 1], [1u32, ig, 1, 5]);
        let second = ([9u32, 2, 6, 5], [ig; 4]);
        let step = |inputs: &[u32], targets: &[u32]| {
            let config = tiny();
            let params = super::super::init_params(&config, 3).expect("init");
            let mut m = LlamaCpuBackend::open(config, params, 1, Purpose::Train).expect("open");
            let batch = Batch {
                inputs,
                targets,
                batch: inputs.len() / 4,
                seq: 4,
            };
            let loss = m.eval_loss(&batch).expect("loss");
            let stats = m
                .train_step(&batch, &crate::OptimizerConfig::default(), 1e-2)
                .expect("step");
            assert_eq!(loss, stats.loss);
            (loss, m.params())
        };
        let (alone, alone_params) = step(&first.0, &first.1);
        let both_inputs = [first.0, second.0].concat();
        let both_targets = [first.1, second.1].concat();
        let (both, both_params) = step(&both_inputs, &both_targets);
        assert_eq!(alone, both);
        for (i, (a, b)) in alone_params.iter().zip(&both_params).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                "param {i}: {a} vs {b}"
            );
        }
        // Every target ignored: loss 0 (the step only decays the weights).
        let (none, _) = step(&second.0, &second.1);
        assert_eq!(none, 0.0);
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let batch = |inputs: &'static [u32], b: usize, t: usize| Batch {
            inputs,
            targets: inputs,
            batch: b,
            seq: t,
        };
        check(
            |m| m.eval_loss(&batch(&[1, 2, 3, 4, 5], 1, 5)).map(drop),
            expect_test::expect!["sequence length 5 is outside 1..=4 (the model's context)"],
        );
        check(
            |m| m.eval_loss(&batch(&[1, 2, 11], 1, 3)).map(drop),
            expect_test::expect!["token id 11 is outside the vocabulary of 11"],
        );
        check(
            |m| {
                let inputs = [1, crate::IGNORE_TARGET];
                m.eval_loss(&Batch {
                    inputs: &inputs,
                    targets: &[2, 3],
                    batch: 1,
                    seq: 2,
                })
                .map(drop)
            },
            expect_test::expect!["token id 4294967295 is outside the vocabulary of 11"],
        );
        check(
            |m| m.eval_loss(&batch(&[1, 2, 3], 2, 2)).map(drop),
            expect_test::expect!["batch shape 2x2 needs 4 tokens, got 3 inputs and 3 targets"],
        );
        check(
            |m| m.set_params(&[0.0; 3]),
            expect_test::expect!["parameter vector has 3 floats, the model has 592"],
        );
        check(
            |m| {
                for token in [1, 2, 3, 4] {
                    m.decode_step(token)?;
                }
                m.decode_step(5).map(drop)
            },
            expect_test::expect!["generation reached the model's context of 4 tokens"],
        );
        check(
            |m| m.decode_prefill(&[]).map(drop),
            expect_test::expect!["sequence length 0 is outside 1..=4 (the model's context)"],
        );
        check(
            |m| m.decode_prefill(&[1, 2, 11]).map(drop),
            expect_test::expect!["token id 11 is outside the vocabulary of 11"],
        );
        check(
            |m| {
                m.decode_prefill(&[1, 2])?;
                // Three more do not fit in 4: none is fed, so two still do.
                let full = m.decode_prefill(&[3, 4, 5]).map(drop);
                m.decode_prefill(&[3, 4])?;
                full
            },
            expect_test::expect!["generation reached the model's context of 4 tokens"],
        );
        check(
            |m| m.logits(&[]).map(drop),
            expect_test::expect!["sequence length 0 is outside 1..=4 (the model's context)"],
        );
        check(
            |m| {
                LlamaCpuBackend::open(
                    LlamaConfig {
                        kv_heads: 0,
                        ..tiny()
                    },
                    m.params(),
                    1,
                    Purpose::Eval,
                )
                .map(drop)
            },
            expect_test::expect![
                "every size of a Llama must be at least 1, got LlamaConfig { hidden: 8, intermediate: 12, layers: 1, heads: 2, kv_heads: 0, head_dim: 4, vocab_size: 11, rope_theta: 10000.0, rms_eps: 1e-5, tie_embeddings: true, max_seq: 4 }"
            ],
        );
    }
}
