//! The CPU backend: forward, backward, AdamW and KV-cache decoding on a rayon pool.
//!
//! Activations are kept in preallocated buffers sized for the last batch shape (as in
//! llm.c); a step allocates nothing large. Matrix products go through `gemm`, the rest
//! through the fused kernels of `ops`.

use std::sync::Arc;

use rayon::prelude::*;

use crate::matmul::{Par, View, ViewMut, matmul};
use crate::ops::{self, AttnShape};
use crate::params::{BlockOffsets, GptLayout};
use crate::{Backend, Batch, EngineError, GptConfig, OptimizerConfig, Purpose, StepStats};

/// Activations of one block, kept for the backward pass.
struct BlockActs {
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    atty: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    res3: Vec<f32>,
}

/// All buffers of one batch shape.
struct Acts {
    b: usize,
    t: usize,
    inputs: Vec<u32>,
    encoded: Vec<f32>,
    blocks: Vec<BlockActs>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    logits: Vec<f32>,
    losses: Vec<f32>,
    // Gradient scratch.
    dres: Vec<f32>,
    dc: Vec<f32>,
    dqkv: Vec<f32>,
    dfch: Vec<f32>,
    dfch_gelu: Vec<f32>,
}

impl Acts {
    /// Buffers for `b x t` windows; the gradient scratch only `with_grads`.
    fn new(config: &GptConfig, b: usize, t: usize, with_grads: bool) -> Acts {
        let (c, nh, v) = (config.n_embd, config.n_head, config.vocab_size);
        let n = b * t;
        let z = |len: usize| vec![0.0f32; len];
        let g = |len: usize| if with_grads { z(len) } else { Vec::new() };
        let blocks = (0..config.n_layer)
            .map(|_| BlockActs {
                ln1: z(n * c),
                ln1_mean: z(n),
                ln1_rstd: z(n),
                qkv: z(n * 3 * c),
                att: z(b * nh * t * t),
                atty: z(n * c),
                res2: z(n * c),
                ln2: z(n * c),
                ln2_mean: z(n),
                ln2_rstd: z(n),
                fch: z(n * 4 * c),
                fch_gelu: z(n * 4 * c),
                res3: z(n * c),
            })
            .collect();
        Acts {
            b,
            t,
            inputs: vec![0; n],
            encoded: z(n * c),
            blocks,
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            logits: z(n * v),
            losses: z(n),
            dres: g(n * c),
            dc: g(n * c),
            dqkv: g(n * 3 * c),
            dfch: g(n * 4 * c),
            dfch_gelu: g(n * 4 * c),
        }
    }
}

/// KV cache and scratch for one generation.
struct DecodeState {
    pos: usize,
    /// Per layer, `[n_ctx, n_embd]`: keys, and values.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// The scratch below holds the rows of one pass (one token, or up to
    /// [`PREFILL_ROWS_MAX`] of a prompt), sized by [`DecodeState::rows`].
    x: Vec<f32>,
    ln: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    y: Vec<f32>,
    /// The MLP's hidden rows before GELU, and after.
    pre: Vec<f32>,
    h: Vec<f32>,
    /// `[rows, positions attended]`: each row's attention scores.
    scores: Vec<f32>,
    /// The logits after the last token fed.
    logits: Vec<f32>,
}

impl DecodeState {
    /// Sizes the scratch for `n` rows of width `c` attending over at most `positions`.
    fn rows(&mut self, c: usize, n: usize, positions: usize) {
        self.x.resize(n * c, 0.0);
        self.ln.resize(n * c, 0.0);
        self.mean.resize(n, 0.0);
        self.rstd.resize(n, 0.0);
        self.qkv.resize(n * 3 * c, 0.0);
        self.y.resize(n * c, 0.0);
        self.pre.resize(n * 4 * c, 0.0);
        self.h.resize(n * 4 * c, 0.0);
        self.scores.resize(n * positions, 0.0);
    }
}

/// Prompt rows one prefill pass runs at once: bounds a pass's scratch (`[rows, 4 *
/// n_embd]` and `[rows, context]` floats) whatever the prompt's length.
const PREFILL_ROWS_MAX: usize = 256;

/// A GPT on the CPU.
pub struct CpuBackend {
    config: GptConfig,
    layout: GptLayout,
    params: Vec<f32>,
    /// Train: gradients and AdamW's moments, each the size of `params`. Eval: empty.
    purpose: Purpose,
    grads: Vec<f32>,
    adam: ops::Moments,
    acts: Option<Acts>,
    decode: Option<DecodeState>,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
}

/// `dw += x^T @ dy` for a weight `dw` of shape `[i, o]`, inputs `x` `[n, i]` and output
/// gradients `dy` `[n, o]`. Computed as `dw^T += dy^T @ x`: in isolation `gemm` ran these long-K
/// (K = tokens) shapes 5-15% faster in that form than in the direct one.
fn weight_grad(dw: &mut [f32], x: &[f32], dy: &[f32], (i, o): (usize, usize), par: Par) {
    let n = x.len() / i;
    matmul(
        ViewMut::transposed(dw, i, o),
        View::rows(dy, n, o).t(),
        View::rows(x, n, i),
        true,
        par,
    );
}

/// Two disjoint mutable ranges of one slice (`a` before `b`).
fn two_mut(
    buf: &mut [f32],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start, "ranges overlap");
    let (lo, hi) = buf.split_at_mut(b.start);
    (&mut lo[a], &mut hi[..b.end - b.start])
}

/// The engine's rayon pool of `threads` threads, each flushing subnormals to zero.
pub(crate) fn thread_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, EngineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("engine-{i}"))
        .start_handler(|_| crate::ftz::enable_on_this_thread())
        .build()
        .map(Arc::new)
        .map_err(|_| EngineError::UnknownDevice(format!("cpu:{threads}")))
}

/// Checks a batch's shape against a model's context and vocabulary.
/// The checks every backend's KV-cache decoding makes before it feeds `tokens` at
/// position `pos`: at least one token, each in the vocabulary, and room for all of them
/// in the context (nothing is fed otherwise).
pub(crate) fn check_decode(
    tokens: &[u32],
    pos: usize,
    n_ctx: usize,
    vocab_size: usize,
) -> Result<(), EngineError> {
    if tokens.is_empty() {
        return Err(EngineError::SequenceLength { seq: 0, n_ctx });
    }
    if let Some(&token) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(EngineError::TokenOutOfRange { token, vocab_size });
    }
    if pos + tokens.len() > n_ctx {
        return Err(EngineError::ContextFull { n_ctx });
    }
    Ok(())
}

pub(crate) fn check_batch(
    batch: &Batch<'_>,
    n_ctx: usize,
    vocab_size: usize,
) -> Result<(), EngineError> {
    let want = batch.batch * batch.seq;
    if batch.batch == 0 || batch.inputs.len() != want || batch.targets.len() != want {
        return Err(EngineError::BatchShape {
            batch: batch.batch,
            seq: batch.seq,
            want,
            inputs: batch.inputs.len(),
            targets: batch.targets.len(),
        });
    }
    if batch.seq == 0 || batch.seq > n_ctx {
        return Err(EngineError::SequenceLength {
            seq: batch.seq,
            n_ctx,
        });
    }
    if let Some(&token) = batch.inputs.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(EngineError::TokenOutOfRange { token, vocab_size });
    }
    if let Some(&token) = batch
        .targets
        .iter()
        .find(|&&t| t as usize >= vocab_size && t != crate::IGNORE_TARGET)
    {
        return Err(EngineError::TokenOutOfRange { token, vocab_size });
    }
    Ok(())
}

impl CpuBackend {
    /// A training backend holding `params` (in flat order), computing on `threads` threads.
    pub fn new(config: GptConfig, params: Vec<f32>, threads: usize) -> Result<Self, EngineError> {
        CpuBackend::open(config, params, threads, Purpose::Train)
    }

    /// A backend for `purpose`: an evaluation backend allocates no gradients, no AdamW
    /// moments and no gradient scratch.
    pub fn open(
        config: GptConfig,
        params: Vec<f32>,
        threads: usize,
        purpose: Purpose,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let layout = GptLayout::new(&config);
        if params.len() != layout.len() {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want: layout.len(),
            });
        }
        let threads = threads.max(1);
        let pool = thread_pool(threads)?;
        let n = match purpose {
            Purpose::Train => layout.len(),
            Purpose::Eval => 0,
        };
        Ok(CpuBackend {
            config,
            layout,
            params,
            purpose,
            grads: vec![0.0; n],
            adam: ops::Moments::new(n),
            acts: None,
            decode: None,
            pool,
            threads,
        })
    }

    fn check_trainable(&self) -> Result<(), EngineError> {
        match self.purpose {
            Purpose::Train => Ok(()),
            Purpose::Eval => Err(EngineError::EvalOnly),
        }
    }

    fn check_batch(&self, batch: &Batch<'_>) -> Result<(), EngineError> {
        check_batch(batch, self.config.n_ctx, self.config.vocab_size)
    }

    /// Forward pass; returns the mean loss. With `grad`, leaves d(loss)/d(logits) in the
    /// logits buffer for `backward`.
    fn forward(&mut self, batch: &Batch<'_>, grad: bool) -> f32 {
        let config = self.config;
        let (b, t) = (batch.batch, batch.seq);
        if !matches!(&self.acts, Some(a) if a.b == b && a.t == t) {
            self.acts = None; // free the old buffers before allocating new ones
            self.acts = Some(Acts::new(&config, b, t, self.purpose == Purpose::Train));
        }
        let Some(acts) = self.acts.as_mut() else {
            unreachable!("allocated above")
        };
        let (params, layout, threads) = (&self.params, &self.layout, self.threads);
        let (c, v, n) = (config.n_embd, config.vocab_size, b * t);
        let shape = AttnShape {
            t,
            c,
            nh: config.n_head,
        };
        let par = Par::Threads(threads);
        let w = |off: usize, len: usize| &params[off..off + len];
        acts.inputs.copy_from_slice(batch.inputs);

        // Token plus position embedding.
        let wte = w(layout.wte, v * c);
        let wpe = w(layout.wpe, config.n_ctx * c);
        acts.encoded
            .par_chunks_mut(c)
            .zip(batch.inputs.par_iter())
            .enumerate()
            .for_each(|(i, (row, &tok))| {
                let te = &wte[tok as usize * c..(tok as usize + 1) * c];
                let pe = &wpe[(i % t) * c..(i % t + 1) * c];
                for j in 0..c {
                    row[j] = te[j] + pe[j];
                }
            });

        for l in 0..config.n_layer {
            let o: BlockOffsets = layout.blocks[l];
            let (before, rest) = acts.blocks.split_at_mut(l);
            let residual: &[f32] = if l == 0 {
                &acts.encoded
            } else {
                &before[l - 1].res3
            };
            let a = &mut rest[0];
            ops::layernorm_forward(
                &mut a.ln1,
                &mut a.ln1_mean,
                &mut a.ln1_rstd,
                residual,
                w(o.ln1_w, c),
                w(o.ln1_b, c),
            );
            ops::fill_rows(&mut a.qkv, w(o.qkv_b, 3 * c));
            matmul(
                ViewMut::rows(&mut a.qkv, n, 3 * c),
                View::rows(&a.ln1, n, c),
                View::rows(w(o.qkv_w, 3 * c * c), c, 3 * c),
                true,
                par,
            );
            ops::attention_forward(&mut a.atty, &mut a.att, &a.qkv, shape);
            ops::fill_rows_residual(&mut a.res2, residual, w(o.proj_b, c));
            matmul(
                ViewMut::rows(&mut a.res2, n, c),
                View::rows(&a.atty, n, c),
                View::rows(w(o.proj_w, c * c), c, c),
                true,
                par,
            );
            ops::layernorm_forward(
                &mut a.ln2,
                &mut a.ln2_mean,
                &mut a.ln2_rstd,
                &a.res2,
                w(o.ln2_w, c),
                w(o.ln2_b, c),
            );
            ops::fill_rows(&mut a.fch, w(o.fc_b, 4 * c));
            matmul(
                ViewMut::rows(&mut a.fch, n, 4 * c),
                View::rows(&a.ln2, n, c),
                View::rows(w(o.fc_w, 4 * c * c), c, 4 * c),
                true,
                par,
            );
            ops::gelu_forward(&mut a.fch_gelu, &a.fch);
            ops::fill_rows_residual(&mut a.res3, &a.res2, w(o.fcproj_b, c));
            matmul(
                ViewMut::rows(&mut a.res3, n, c),
                View::rows(&a.fch_gelu, n, 4 * c),
                View::rows(w(o.fcproj_w, 4 * c * c), 4 * c, c),
                true,
                par,
            );
        }
        let last: &[f32] = match acts.blocks.last() {
            Some(block) => &block.res3,
            None => &acts.encoded,
        };
        ops::layernorm_forward(
            &mut acts.lnf,
            &mut acts.lnf_mean,
            &mut acts.lnf_rstd,
            last,
            w(layout.lnf_w, c),
            w(layout.lnf_b, c),
        );
        // Tied output head: logits = lnf @ wte^T.
        matmul(
            ViewMut::rows(&mut acts.logits, n, v),
            View::rows(&acts.lnf, n, c),
            View::rows(wte, v, c).t(),
            false,
            par,
        );
        let counted = ops::counted(batch.targets);
        let grad_scale = grad.then_some(1.0 / counted.max(1) as f32);
        ops::softmax_cross_entropy(
            &mut acts.logits,
            &mut acts.losses,
            batch.targets,
            v,
            grad_scale,
        );
        ops::mean_loss(&acts.losses, counted)
    }

    /// Backward pass after `forward(.., grad = true)`; overwrites `self.grads`.
    fn backward(&mut self) {
        let config = self.config;
        let Some(acts) = self.acts.as_mut() else {
            unreachable!("forward runs first")
        };
        let (params, layout, grads, threads) =
            (&self.params, &self.layout, &mut self.grads, self.threads);
        let (b, t) = (acts.b, acts.t);
        let (c, v, n) = (config.n_embd, config.vocab_size, b * t);
        let shape = AttnShape {
            t,
            c,
            nh: config.n_head,
        };
        let par = Par::Threads(threads);
        let w = |off: usize, len: usize| &params[off..off + len];
        grads.par_chunks_mut(1 << 16).for_each(|g| g.fill(0.0));

        let last: &[f32] = match acts.blocks.last() {
            Some(block) => &block.res3,
            None => &acts.encoded,
        };
        let wte = w(layout.wte, v * c);
        // Output head: d(lnf) = dlogits @ wte; d(wte) += dlogits^T @ lnf.
        matmul(
            ViewMut::rows(&mut acts.dc, n, c),
            View::rows(&acts.logits, n, v),
            View::rows(wte, v, c),
            false,
            par,
        );
        weight_grad(
            &mut grads[layout.wte..layout.wte + v * c],
            &acts.logits,
            &acts.lnf,
            (v, c),
            par,
        );
        acts.dres.par_chunks_mut(1 << 16).for_each(|g| g.fill(0.0));
        {
            let (dw, db) = two_mut(
                grads,
                layout.lnf_w..layout.lnf_w + c,
                layout.lnf_b..layout.lnf_b + c,
            );
            ops::layernorm_backward(
                &mut acts.dres,
                dw,
                db,
                &acts.dc,
                last,
                w(layout.lnf_w, c),
                &acts.lnf_mean,
                &acts.lnf_rstd,
            );
        }

        for l in (0..config.n_layer).rev() {
            let o = layout.blocks[l];
            let residual: &[f32] = if l == 0 {
                &acts.encoded
            } else {
                &acts.blocks[l - 1].res3
            };
            let a = &acts.blocks[l];
            // MLP.
            matmul(
                ViewMut::rows(&mut acts.dfch_gelu, n, 4 * c),
                View::rows(&acts.dres, n, c),
                View::rows(w(o.fcproj_w, 4 * c * c), 4 * c, c).t(),
                false,
                par,
            );
            weight_grad(
                &mut grads[o.fcproj_w..o.fcproj_w + 4 * c * c],
                &a.fch_gelu,
                &acts.dres,
                (4 * c, c),
                par,
            );
            ops::bias_backward(&mut grads[o.fcproj_b..o.fcproj_b + c], &acts.dres);
            ops::gelu_backward(&mut acts.dfch, &a.fch, &acts.dfch_gelu);
            matmul(
                ViewMut::rows(&mut acts.dc, n, c),
                View::rows(&acts.dfch, n, 4 * c),
                View::rows(w(o.fc_w, 4 * c * c), c, 4 * c).t(),
                false,
                par,
            );
            weight_grad(
                &mut grads[o.fc_w..o.fc_w + 4 * c * c],
                &a.ln2,
                &acts.dfch,
                (c, 4 * c),
                par,
            );
            ops::bias_backward(&mut grads[o.fc_b..o.fc_b + 4 * c], &acts.dfch);
            {
                let (dw, db) = two_mut(grads, o.ln2_w..o.ln2_w + c, o.ln2_b..o.ln2_b + c);
                ops::layernorm_backward(
                    &mut acts.dres,
                    dw,
                    db,
                    &acts.dc,
                    &a.res2,
                    w(o.ln2_w, c),
                    &a.ln2_mean,
                    &a.ln2_rstd,
                );
            }
            // Attention.
            matmul(
                ViewMut::rows(&mut acts.dc, n, c),
                View::rows(&acts.dres, n, c),
                View::rows(w(o.proj_w, c * c), c, c).t(),
                false,
                par,
            );
            weight_grad(
                &mut grads[o.proj_w..o.proj_w + c * c],
                &a.atty,
                &acts.dres,
                (c, c),
                par,
            );
            ops::bias_backward(&mut grads[o.proj_b..o.proj_b + c], &acts.dres);
            ops::attention_backward(&mut acts.dqkv, &acts.dc, &a.att, &a.qkv, shape);
            matmul(
                ViewMut::rows(&mut acts.dc, n, c),
                View::rows(&acts.dqkv, n, 3 * c),
                View::rows(w(o.qkv_w, 3 * c * c), c, 3 * c).t(),
                false,
                par,
            );
            weight_grad(
                &mut grads[o.qkv_w..o.qkv_w + 3 * c * c],
                &a.ln1,
                &acts.dqkv,
                (c, 3 * c),
                par,
            );
            ops::bias_backward(&mut grads[o.qkv_b..o.qkv_b + 3 * c], &acts.dqkv);
            {
                let (dw, db) = two_mut(grads, o.ln1_w..o.ln1_w + c, o.ln1_b..o.ln1_b + c);
                ops::layernorm_backward(
                    &mut acts.dres,
                    dw,
                    db,
                    &acts.dc,
                    residual,
                    w(o.ln1_w, c),
                    &a.ln1_mean,
                    &a.ln1_rstd,
                );
            }
        }
        // Embeddings: scatter-add in token order (sequential, so deterministic).
        for (i, &tok) in acts.inputs.iter().enumerate() {
            let g = &acts.dres[i * c..(i + 1) * c];
            let te = layout.wte + tok as usize * c;
            for (x, y) in grads[te..te + c].iter_mut().zip(g) {
                *x += y;
            }
            let pe = layout.wpe + (i % t) * c;
            for (x, y) in grads[pe..pe + c].iter_mut().zip(g) {
                *x += y;
            }
        }
    }

    /// Clips the gradient and applies one AdamW update. Returns the pre-clip norm.
    fn adamw(&mut self, opt: &OptimizerConfig, lr: f32) -> f32 {
        self.adam.update(
            &mut self.params,
            &self.grads,
            self.layout.tensors(),
            opt,
            lr,
        )
    }

    /// Feeds `tokens` at the next positions of the KV cache, [`PREFILL_ROWS_MAX`] rows
    /// per pass; returns the logits after the last. Nothing is fed unless all of them fit.
    fn decode_tokens(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        let config = self.config;
        let pos = self.decode.as_ref().map_or(0, |s| s.pos);
        check_decode(tokens, pos, config.n_ctx, config.vocab_size)?;
        let c = config.n_embd;
        self.decode.get_or_insert_with(|| DecodeState {
            pos: 0,
            k: vec![vec![0.0; config.n_ctx * c]; config.n_layer],
            v: vec![vec![0.0; config.n_ctx * c]; config.n_layer],
            x: Vec::new(),
            ln: Vec::new(),
            mean: Vec::new(),
            rstd: Vec::new(),
            qkv: Vec::new(),
            y: Vec::new(),
            pre: Vec::new(),
            h: Vec::new(),
            scores: Vec::new(),
            logits: vec![0.0; config.vocab_size],
        });
        for chunk in tokens.chunks(PREFILL_ROWS_MAX) {
            self.decode_pass(chunk);
        }
        match &self.decode {
            Some(s) => Ok(&s.logits),
            None => unreachable!("created above"),
        }
    }

    /// One pass of [`CpuBackend::decode_tokens`]: the rows of `tokens` through every
    /// layer as matrices (the training forward's kernels), each row attending to the
    /// cache up to its own position; the head runs on the last row only.
    fn decode_pass(&mut self, tokens: &[u32]) {
        let config = self.config;
        let Some(s) = self.decode.as_mut() else {
            unreachable!("decode_tokens creates the state")
        };
        let (params, layout) = (&self.params, &self.layout);
        let (c, v, nh) = (config.n_embd, config.vocab_size, config.n_head);
        let hs = c / nh;
        let scale = 1.0 / (hs as f32).sqrt();
        let w = |off: usize, len: usize| &params[off..off + len];
        let (pos, n) = (s.pos, tokens.len());
        s.rows(c, n, pos + n);
        let wte = w(layout.wte, v * c);
        for (i, (row, &tok)) in s.x.chunks_exact_mut(c).zip(tokens).enumerate() {
            let (tok, wpe) = (tok as usize, layout.wpe + (pos + i) * c);
            for j in 0..c {
                row[j] = wte[tok * c + j] + params[wpe + j];
            }
        }
        // One row (a decode step) runs each product on the calling thread, as decoding
        // always has; a prompt's rows are a matrix product over the threads.
        let par = if n == 1 {
            Par::Single
        } else {
            Par::Threads(self.threads)
        };
        // `y (+)= x @ weight` for a Conv1D weight `[inp, out]`.
        let linear = |y: &mut [f32], x: &[f32], weight: &[f32], (inp, out)| {
            matmul(
                ViewMut::rows(y, n, out),
                View::rows(x, n, inp),
                View::rows(weight, inp, out),
                true,
                par,
            );
        };
        self.pool.install(|| {
            for l in 0..config.n_layer {
                let o = layout.blocks[l];
                let (ln_w, ln_b) = (w(o.ln1_w, c), w(o.ln1_b, c));
                ops::layernorm_forward(&mut s.ln, &mut s.mean, &mut s.rstd, &s.x, ln_w, ln_b);
                ops::fill_rows(&mut s.qkv, w(o.qkv_b, 3 * c));
                linear(&mut s.qkv, &s.ln, w(o.qkv_w, 3 * c * c), (c, 3 * c));
                for (i, row) in s.qkv.chunks_exact(3 * c).enumerate() {
                    let at = pos + i;
                    s.k[l][at * c..(at + 1) * c].copy_from_slice(&row[c..2 * c]);
                    s.v[l][at * c..(at + 1) * c].copy_from_slice(&row[2 * c..]);
                }
                let cache = (&s.k[l][..], &s.v[l][..]);
                s.y.par_chunks_mut(c)
                    .zip(s.scores.par_chunks_mut(pos + n))
                    .zip(s.qkv.par_chunks(3 * c))
                    .enumerate()
                    .for_each(|(i, ((y, scores), q))| {
                        for h in 0..nh {
                            ops::attend_cached(
                                &mut y[h * hs..(h + 1) * hs],
                                &q[h * hs..(h + 1) * hs],
                                cache,
                                (c, h * hs),
                                scale,
                                &mut scores[..=pos + i],
                            );
                        }
                    });
                for row in s.x.chunks_exact_mut(c) {
                    for (x, b) in row.iter_mut().zip(w(o.proj_b, c)) {
                        *x += b;
                    }
                }
                linear(&mut s.x, &s.y, w(o.proj_w, c * c), (c, c));
                let (ln_w, ln_b) = (w(o.ln2_w, c), w(o.ln2_b, c));
                ops::layernorm_forward(&mut s.ln, &mut s.mean, &mut s.rstd, &s.x, ln_w, ln_b);
                ops::fill_rows(&mut s.pre, w(o.fc_b, 4 * c));
                linear(&mut s.pre, &s.ln, w(o.fc_w, 4 * c * c), (c, 4 * c));
                ops::gelu_forward(&mut s.h, &s.pre);
                for row in s.x.chunks_exact_mut(c) {
                    for (x, b) in row.iter_mut().zip(w(o.fcproj_b, c)) {
                        *x += b;
                    }
                }
                linear(&mut s.x, &s.h, w(o.fcproj_w, 4 * c * c), (4 * c, c));
            }
            let last = &s.x[(n - 1) * c..];
            layernorm_row(&mut s.ln[..c], last, w(layout.lnf_w, c), w(layout.lnf_b, c));
            ops::matvec(&mut s.logits, wte, &s.ln[..c], false);
        });
        s.pos += n;
    }
}

/// LayerNorm of one row.
fn layernorm_row(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32]) {
    let (mut m, mut r) = ([0.0f32], [0.0f32]);
    ops::layernorm_forward(out, &mut m, &mut r, x, w, b);
}

impl Backend for CpuBackend {
    fn architecture(&self) -> crate::Architecture {
        crate::Architecture::Gpt2(self.config)
    }

    fn device(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn params(&self) -> Vec<f32> {
        self.params.clone()
    }

    fn set_params(&mut self, params: &[f32]) -> Result<(), EngineError> {
        if params.len() != self.params.len() {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want: self.params.len(),
            });
        }
        self.params.copy_from_slice(params);
        self.decode = None;
        Ok(())
    }

    /// Every GPT-2 tensor trains: the trainable vector is the full one.
    fn trainable(&self) -> Vec<f32> {
        self.params()
    }

    fn set_trainable(&mut self, trainable: &[f32]) -> Result<(), EngineError> {
        self.set_params(trainable)
    }

    fn reset_optimizer(&mut self) {
        self.adam.reset();
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
            let loss = self.forward(batch, true);
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
        let loss = pool.install(|| self.forward(batch, false));
        Ok(loss)
    }

    fn loss_and_grad(&mut self, batch: &Batch<'_>) -> Result<(f32, Vec<f32>), EngineError> {
        self.check_trainable()?;
        self.check_batch(batch)?;
        let pool = self.pool.clone();
        let loss = pool.install(|| {
            let loss = self.forward(batch, true);
            self.backward();
            loss
        });
        Ok((loss, self.grads.clone()))
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

    impl Acts {
        /// Floats (and u32 token ids) held, counted field by field.
        fn len(&self) -> usize {
            let blocks: usize = self
                .blocks
                .iter()
                .map(|a| {
                    a.ln1.len()
                        + a.ln1_mean.len()
                        + a.ln1_rstd.len()
                        + a.qkv.len()
                        + a.att.len()
                        + a.atty.len()
                        + a.res2.len()
                        + a.ln2.len()
                        + a.ln2_mean.len()
                        + a.ln2_rstd.len()
                        + a.fch.len()
                        + a.fch_gelu.len()
                        + a.res3.len()
                })
                .sum();
            blocks
                + self.inputs.len()
                + self.encoded.len()
                + self.lnf.len()
                + self.lnf_mean.len()
                + self.lnf_rstd.len()
                + self.logits.len()
                + self.losses.len()
                + self.dres.len()
                + self.dc.len()
                + self.dqkv.len()
                + self.dfch.len()
                + self.dfch_gelu.len()
        }
    }

    #[test]
    fn memory_estimate_counts_every_buffer() {
        for (preset, b, t) in [
            (crate::Preset::Tiny, 3, 17),
            (crate::Preset::Small, 16, 128),
        ] {
            let config = preset.config(8192);
            let acts = Acts::new(&config, b, t, true);
            let want = 4 * (4 * config.n_params() + acts.len()) as u64;
            assert_eq!(config.training_bytes(b, t), want, "{preset:?}");
            let acts = Acts::new(&config, b, t, false);
            let want = 4 * (config.n_params() + acts.len()) as u64;
            assert_eq!(config.eval_bytes(b, t), want, "{preset:?} eval");
        }
    }
}
