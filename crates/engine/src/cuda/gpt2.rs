//! GPT-2 on an NVIDIA GPU: the CPU engine's model, step for step (`cpu.rs`), with the
//! activations and matrix-product inputs in bf16 ([`Precision::Bf16`], what `cuda`
//! means) or f32 ([`Precision::F32`], for checks against the CPU), the master weights,
//! gradients and AdamW moments in f32 either way.
//!
//! Attention is fused ([`Attention::Flash`]: FlashAttention-2's tiling on the tensor
//! cores, the scores never stored, a deterministic backward) in bf16 with heads of 64,
//! which every GPT-2 preset from `small` up has; otherwise, and with f32, the scores are
//! materialized and multiplied by cuBLASLt ([`Attention::Materialized`]).
//!
//! Training, evaluation and KV-cache decoding run here. Decoding feeds new rows through
//! the forward pass's kernels and products, with attention over the cache by
//! `decode_attention` (heads of at most 64, which every preset has).

use cudarc::driver::CudaFunction;

use super::blas::{Blas, Elem, Gemm};
use super::kernels::{
    Arg, FLASH_THREADS, Flash, Kernels, Master, SUM_CHUNK, SUM_FINAL_COLS, SUM_PARTIAL_COLS,
    THREADS, flash_grid,
};
pub use super::kernels::{FLASH_HEAD_SIZE, Precision};
use super::profile::Profile;
use super::{CudaError, DeviceMem, Gpu};
use crate::params::{GptLayout, ParamLayout};
use crate::{Backend, Batch, EngineError, GptConfig, OptimizerConfig, Purpose, StepStats};

/// How attention is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    /// Fused kernels (bf16, heads of [`FLASH_HEAD_SIZE`]): memory linear in the context.
    Flash,
    /// Scores and probabilities stored per head ([b, nh, t, t]) and multiplied by
    /// cuBLASLt: any precision and head size, memory quadratic in the context.
    Materialized,
}

/// One block's saved activations.
struct BlockActs {
    ln1: DeviceMem,
    ln1_mean: DeviceMem,
    ln1_rstd: DeviceMem,
    qkv: DeviceMem,
    /// Materialized: the probabilities [b, nh, t, t]; flash: each row's log-sum-exp of
    /// scaled scores [b, nh, t] (f32), all the backward pass needs to rebuild them.
    att: DeviceMem,
    atty: DeviceMem,
    res2: DeviceMem,
    ln2: DeviceMem,
    ln2_mean: DeviceMem,
    ln2_rstd: DeviceMem,
    fch: DeviceMem,
    fch_gelu: DeviceMem,
    res3: DeviceMem,
}

/// Gradient scratch, shared by every block (a training backend only).
struct GradActs {
    dres: DeviceMem,
    dc: DeviceMem,
    dfch: DeviceMem,
    dfch_gelu: DeviceMem,
    dqkv: DeviceMem,
    dy: DeviceMem,
    dq: DeviceMem,
    dk: DeviceMem,
    dv: DeviceMem,
    datt: DeviceMem,
    dpreatt: DeviceMem,
    /// Flash: each row's sum of d(atty) * atty per head [b, nh, t] (f32).
    dsum: DeviceMem,
    partial_a: DeviceMem,
    partial_b: DeviceMem,
}

/// Activations for one batch shape.
struct Acts {
    b: usize,
    t: usize,
    inputs: DeviceMem,
    targets: DeviceMem,
    encoded: DeviceMem,
    blocks: Vec<BlockActs>,
    lnf: DeviceMem,
    lnf_mean: DeviceMem,
    lnf_rstd: DeviceMem,
    logits: DeviceMem,
    losses: DeviceMem,
    q: DeviceMem,
    k: DeviceMem,
    v: DeviceMem,
    preatt: DeviceMem,
    y: DeviceMem,
    grads: Option<GradActs>,
    /// The host's copy of the inputs (the embedding gradient is bucketed on the host).
    host_inputs: Vec<u32>,
}

impl Acts {
    fn new(
        gpu: &Gpu,
        config: &GptConfig,
        x: usize,
        b: usize,
        t: usize,
        grads: bool,
        attention: Attention,
    ) -> Result<Acts, CudaError> {
        let (c, v, nh) = (config.n_embd, config.vocab_size, config.n_head);
        let n = b * t;
        let flash = attention == Attention::Flash;
        let a = |elems: usize| gpu.alloc(elems * x);
        let f = |elems: usize| gpu.alloc(elems * 4);
        // Scratch only the materialized path uses: one element with flash.
        let m = |elems: usize| gpu.alloc(if flash { 1 } else { elems } * x);
        let att = b * nh * t * t;
        let saved = |_: ()| if flash { f(b * nh * t) } else { a(att) };
        let mut blocks = Vec::with_capacity(config.n_layer);
        for _ in 0..config.n_layer {
            blocks.push(BlockActs {
                ln1: a(n * c)?,
                ln1_mean: f(n)?,
                ln1_rstd: f(n)?,
                qkv: a(n * 3 * c)?,
                att: saved(())?,
                atty: a(n * c)?,
                res2: a(n * c)?,
                ln2: a(n * c)?,
                ln2_mean: f(n)?,
                ln2_rstd: f(n)?,
                fch: a(n * 4 * c)?,
                fch_gelu: a(n * 4 * c)?,
                res3: a(n * c)?,
            });
        }
        let chunks = n.div_ceil(SUM_CHUNK);
        let grads = if grads {
            Some(GradActs {
                dres: a(n * c)?,
                dc: a(n * c)?,
                dfch: a(n * 4 * c)?,
                dfch_gelu: a(n * 4 * c)?,
                dqkv: a(n * 3 * c)?,
                dy: m(n * c)?,
                dq: m(n * c)?,
                dk: m(n * c)?,
                dv: m(n * c)?,
                datt: m(att)?,
                dpreatt: m(att)?,
                dsum: f(if flash { b * nh * t } else { 1 })?,
                partial_a: f(chunks * 4 * c)?,
                partial_b: f(chunks * 4 * c)?,
            })
        } else {
            None
        };
        Ok(Acts {
            b,
            t,
            inputs: gpu.alloc(n * 4)?,
            targets: gpu.alloc(n * 4)?,
            encoded: a(n * c)?,
            blocks,
            lnf: a(n * c)?,
            lnf_mean: f(n)?,
            lnf_rstd: f(n)?,
            logits: a(n * v)?,
            losses: f(n)?,
            q: m(n * c)?,
            k: m(n * c)?,
            v: m(n * c)?,
            preatt: m(att)?,
            y: m(n * c)?,
            grads,
            host_inputs: Vec::new(),
        })
    }
}

/// Rows one decoding pass takes (a longer prompt goes in several), as the Llama's.
const PREFILL_ROWS_MAX: usize = 256;

/// The widest head `decode_attention` takes (two columns a lane of a warp).
const DECODE_HEAD_MAX: usize = 64;

/// KV-cache decoding: each layer's qkv rows of every position fed so far (the qkv
/// product writes there, so the cache needs no copy; a row's q is scratch once it has
/// attended), and scratch for up to [`PREFILL_ROWS_MAX`] new rows.
struct DecodeState {
    pos: usize,
    /// Per layer, [n_ctx, 3 n_embd].
    cache: Vec<DeviceMem>,
    inputs: DeviceMem,
    /// The residual stream, and its copy after attention.
    x: DeviceMem,
    r2: DeviceMem,
    /// A layernorm's output, and its statistics (f32, unused after).
    ln: DeviceMem,
    mean: DeviceMem,
    rstd: DeviceMem,
    atty: DeviceMem,
    fch: DeviceMem,
    fch_gelu: DeviceMem,
    /// The last row's logits: in the activations' precision from the product, f32 on
    /// the device and on the host.
    logits_x: DeviceMem,
    logits: DeviceMem,
    host_logits: Vec<f32>,
}

/// A GPT-2 backend on one GPU.
pub struct Gpt2Cuda {
    // Field order is drop order: everything on the GPU goes before the context.
    acts: Option<Acts>,
    decode: Option<DecodeState>,
    /// Every parameter (they all train).
    master: Master,
    /// Buckets of the token-embedding gradient: tokens, starts, rows.
    buckets: [DeviceMem; 3],
    kernels: Kernels,
    attention: Attention,
    /// Per-phase GPU times, when `HIVETRAIN_CUDA_PROFILE` is set.
    profile: Option<Profile>,
    blas: Blas,
    config: GptConfig,
    layout: GptLayout,
    table: ParamLayout,
    precision: Precision,
    purpose: Purpose,
    gpu: Gpu,
}

impl Gpt2Cuda {
    /// A backend of `config` holding `params` on GPU `ordinal`.
    pub fn open(
        config: GptConfig,
        params: &[f32],
        ordinal: usize,
        precision: Precision,
        purpose: Purpose,
    ) -> Result<Gpt2Cuda, EngineError> {
        config.validate()?;
        if !config.n_embd.is_multiple_of(8) {
            // The row kernels read eight values at a time (every preset's width is a
            // multiple of 64).
            return Err(CudaError::Unsupported {
                what: "a GPT-2 whose n_embd is not a multiple of 8",
            }
            .into());
        }
        let layout = GptLayout::new(&config);
        let table = ParamLayout::new(&config);
        if params.len() != table.len() {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want: table.len(),
            });
        }
        let gpu = Gpu::open(ordinal)?;
        let kernels = Kernels::load(&gpu, precision)?;
        let attention =
            if kernels.flash.is_some() && config.n_embd / config.n_head == FLASH_HEAD_SIZE {
                Attention::Flash
            } else {
                Attention::Materialized
            };
        let blas = Blas::new(&gpu, precision.elem())?;
        let train = purpose == Purpose::Train;
        let n_ctx = config.n_ctx;
        let master = Master::new(&gpu, &kernels, &table, params, precision, train)?;
        Ok(Gpt2Cuda {
            acts: None,
            decode: None,
            master,
            buckets: [
                gpu.alloc(n_ctx * 4)?,
                gpu.alloc(n_ctx * 4)?,
                gpu.alloc(n_ctx * 4)?,
            ],
            kernels,
            attention,
            profile: Profile::from_env(),
            blas,
            config,
            layout,
            table,
            precision,
            purpose,
            gpu,
        })
    }

    /// The GPU this backend runs on.
    pub fn gpu(&self) -> &super::GpuInfo {
        &self.gpu.info
    }

    /// How this backend computes attention.
    pub fn attention(&self) -> Attention {
        self.attention
    }

    /// Computes attention as `attention` says from the next batch on (the fused kernels
    /// need bf16 and heads of [`FLASH_HEAD_SIZE`]); for comparing the two paths.
    pub fn set_attention(&mut self, attention: Attention) -> Result<(), EngineError> {
        let hs = self.config.n_embd / self.config.n_head;
        if attention == Attention::Flash && (self.kernels.flash.is_none() || hs != FLASH_HEAD_SIZE)
        {
            return Err(CudaError::Unsupported {
                what: "fused attention other than in bf16 with heads of 64",
            }
            .into());
        }
        if attention != self.attention {
            self.attention = attention;
            self.acts = None;
        }
        Ok(())
    }

    /// The pointer the forward pass reads tensor `offset` from.
    fn px(&self, offset: usize) -> u64 {
        self.master.px(offset)
    }

    fn grad(&self, offset: usize) -> u64 {
        self.master.grad(offset)
    }

    fn launch1(&self, f: &CudaFunction, n: usize, args: &[Arg]) -> Result<(), CudaError> {
        self.gpu.launch1(f, n, args)
    }

    fn launch_rows(&self, f: &CudaFunction, rows: usize, args: &[Arg]) -> Result<(), CudaError> {
        self.gpu.launch_rows(f, rows, args)
    }

    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        self.gpu.launch(f, grid, block, args)
    }

    /// `out[n, o] = inp[n, i] @ w[i, o] + bias (+ out when accumulate)`.
    fn linear(
        &self,
        out: u64,
        inp: u64,
        w: u64,
        bias: u64,
        (n, i, o): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<(), CudaError> {
        // Column-major: out^T [o, n] = w^T [o, i] (w row-major [i, o], ld o) x inp^T [i, n].
        self.blas.gemm(
            Gemm {
                transa: false,
                transb: false,
                m: o as u64,
                n: n as u64,
                k: i as u64,
                lda: o as i64,
                ldb: i as i64,
                ldd: o as i64,
                alpha: 1.0,
                beta: if accumulate { 1.0 } else { 0.0 },
                batch: None,
            },
            w,
            inp,
            out,
            self.precision.elem(),
            Some(bias),
        )
    }

    /// The backward of [`Self::linear`]: `dinp = dout @ w^T`, `dw = inp^T @ dout` (f32),
    /// `dbias = sum of dout's rows` (f32).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dinp: u64,
        dw: u64,
        dbias: u64,
        dout: u64,
        inp: u64,
        w: u64,
        (n, i, o): (usize, usize, usize),
        g: &GradActs,
    ) -> Result<(), CudaError> {
        // dinp^T [i, n] = (w^T)^T [i, o] x dout^T [o, n].
        self.blas.gemm(
            Gemm {
                transa: true,
                transb: false,
                m: i as u64,
                n: n as u64,
                k: o as u64,
                lda: o as i64,
                ldb: o as i64,
                ldd: i as i64,
                alpha: 1.0,
                beta: 0.0,
                batch: None,
            },
            w,
            dout,
            dinp,
            self.precision.elem(),
            None,
        )?;
        // dw^T [o, i] = dout^T [o, n] x inp [n, i].
        self.blas.gemm(
            Gemm {
                transa: false,
                transb: true,
                m: o as u64,
                n: i as u64,
                k: n as u64,
                lda: o as i64,
                ldb: i as i64,
                ldd: o as i64,
                alpha: 1.0,
                beta: 0.0,
                batch: None,
            },
            dout,
            inp,
            dw,
            Elem::F32,
            None,
        )?;
        self.phase("bias gradients")?;
        self.column_sum(dbias, dout, n, o, g)
    }

    /// `out[j] = sum over rows of x[:, j]` (f32), in a fixed order.
    fn column_sum(
        &self,
        out: u64,
        x: u64,
        n: usize,
        c: usize,
        g: &GradActs,
    ) -> Result<(), CudaError> {
        let chunks = n.div_ceil(SUM_CHUNK);
        let (ni, ci) = (n as i32, c as i32);
        self.launch(
            &self.kernels.column_sum_partial,
            (c.div_ceil(SUM_PARTIAL_COLS) as u32, chunks as u32, 1),
            THREADS,
            &[g.partial_a.ptr.into(), x.into(), ni.into(), ci.into()],
        )?;
        self.column_sum_final(out, g.partial_a.ptr, chunks, c)
    }

    /// `out[j] = the sum over r of partial[r, j]`, `chunks` rows of `c`, in order.
    fn column_sum_final(
        &self,
        out: u64,
        partial: u64,
        chunks: usize,
        c: usize,
    ) -> Result<(), CudaError> {
        let (ri, ci, zero) = (chunks as i32, c as i32, 0i32);
        self.launch(
            &self.kernels.column_sum_final,
            (c.div_ceil(SUM_FINAL_COLS) as u32, 1, 1),
            THREADS,
            &[
                out.into(),
                partial.into(),
                ri.into(),
                ci.into(),
                zero.into(),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: u64,
        mean: u64,
        rstd: u64,
        inp: u64,
        w: usize,
        b: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        let (w, b) = (self.px(w), self.px(b));
        let (ni, ci) = (n as i32, self.config.n_embd as i32);
        self.launch_rows(
            &self.kernels.layernorm_forward,
            n,
            &[
                out.into(),
                mean.into(),
                rstd.into(),
                inp.into(),
                w.into(),
                b.into(),
                ni.into(),
                ci.into(),
            ],
        )
    }

    /// `dinp += LN'(dout)`; the parameters' gradients written (f32).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: u64,
        dout: u64,
        inp: u64,
        (mean, rstd): (u64, u64),
        (w, b): (usize, usize),
        n: usize,
        g: &GradActs,
    ) -> Result<(), CudaError> {
        let c = self.config.n_embd;
        let (ni, ci) = (n as i32, c as i32);
        let wp = self.px(w);
        self.launch_rows(
            &self.kernels.layernorm_backward_input,
            n,
            &[
                dinp.into(),
                dout.into(),
                inp.into(),
                wp.into(),
                mean.into(),
                rstd.into(),
                ni.into(),
                ci.into(),
            ],
        )?;
        let chunks = n.div_ceil(SUM_CHUNK);
        self.phase("layernorm bwd params")?;
        self.launch(
            &self.kernels.layernorm_param_partial,
            (c.div_ceil(SUM_PARTIAL_COLS) as u32, chunks as u32, 1),
            THREADS,
            &[
                g.partial_a.ptr.into(),
                g.partial_b.ptr.into(),
                dout.into(),
                inp.into(),
                mean.into(),
                rstd.into(),
                ni.into(),
                ci.into(),
            ],
        )?;
        self.column_sum_final(self.grad(w), g.partial_a.ptr, chunks, c)?;
        self.column_sum_final(self.grad(b), g.partial_b.ptr, chunks, c)
    }

    /// Attention scores, per head of `count`: `d[t, t] = x[t, hs] y[t, hs]^T`, row-major
    /// (`q k^T`; backward `dy v^T`). Column-major that is `d^T = y x^T`: A is `y`'s
    /// column-major view (`y^T`) under op T, B is `x`'s (`x^T`).
    fn head_scores(
        &self,
        x: u64,
        y: u64,
        d: u64,
        (t, hs, count): (usize, usize, usize),
    ) -> Result<(), CudaError> {
        let g = heads(
            true,
            false,
            (t, t, hs),
            (hs, hs, t),
            count,
            (t * hs, t * hs, t * t),
        );
        self.blas.gemm(g, y, x, d, self.precision.elem(), None)
    }

    /// Scores applied to heads, per head of `count`: `d[t, hs] = p[t, t] v[t, hs]`, or
    /// `p^T v` with `transpose`, row-major (`att v`; backward `att^T dy`, `dpre k`,
    /// `dpre^T q`). Column-major that is `d^T = v^T p^T`: a row-major `p` read
    /// column-major is `p^T` already, and op T on it gives `p` for the transposed case.
    fn head_mix(
        &self,
        p: u64,
        v: u64,
        d: u64,
        transpose: bool,
        (t, hs, count): (usize, usize, usize),
    ) -> Result<(), CudaError> {
        let g = heads(
            false,
            transpose,
            (hs, t, t),
            (hs, t, hs),
            count,
            (t * hs, t * t, t * hs),
        );
        self.blas.gemm(g, v, p, d, self.precision.elem(), None)
    }

    fn check_batch(&self, batch: &Batch<'_>) -> Result<(), EngineError> {
        crate::cpu::check_batch(batch, self.config.n_ctx, self.config.vocab_size)
    }

    fn ensure_acts(&mut self, b: usize, t: usize) -> Result<(), CudaError> {
        if !matches!(&self.acts, Some(a) if a.b == b && a.t == t) {
            self.acts = None;
            let x = self.precision.size();
            let train = self.purpose == Purpose::Train;
            self.acts = Some(Acts::new(
                &self.gpu,
                &self.config,
                x,
                b,
                t,
                train,
                self.attention,
            )?);
        }
        Ok(())
    }

    /// The forward pass; returns the mean loss. With `grad`, leaves d(loss)/d(logits)
    /// in the logits for `backward`.
    fn forward(&mut self, batch: &Batch<'_>, grad: bool) -> Result<f32, CudaError> {
        let (b, t) = (batch.batch, batch.seq);
        self.ensure_acts(b, t)?;
        let Some(acts) = self.acts.as_mut() else {
            unreachable!("allocated above")
        };
        let targets: Vec<i32> = batch.targets.iter().map(|&x| x as i32).collect();
        acts.host_inputs = batch.inputs.to_vec();
        self.gpu.upload(&acts.inputs, 0, batch.inputs)?;
        self.gpu.upload(&acts.targets, 0, &targets)?;
        let Some(acts) = self.acts.as_ref() else {
            unreachable!("allocated above")
        };
        let config = self.config;
        let (c, v, nh) = (config.n_embd, config.vocab_size, config.n_head);
        let hs = c / nh;
        let n = b * t;
        let x = self.precision.size() as u64;
        let (ni, ti, ci) = (n as i32, t as i32, c as i32);
        let (bi, nhi, hsi) = (b as i32, nh as i32, hs as i32);
        let rows = (b * nh * t) as i32;
        let scale = 1.0 / (hs as f32).sqrt();
        let (wte, wpe) = (self.px(self.layout.wte), self.px(self.layout.wpe));
        self.phase("embed")?;
        self.launch1(
            &self.kernels.encoder_forward,
            n * c,
            &[
                acts.encoded.ptr.into(),
                acts.inputs.ptr.into(),
                wte.into(),
                wpe.into(),
                ni.into(),
                ti.into(),
                ci.into(),
            ],
        )?;
        for (layer, a) in acts.blocks.iter().enumerate() {
            let o = self.layout.blocks[layer];
            let residual = if layer == 0 {
                acts.encoded.ptr
            } else {
                acts.blocks[layer - 1].res3.ptr
            };
            self.phase("layernorm")?;
            self.layernorm_forward(
                a.ln1.ptr,
                a.ln1_mean.ptr,
                a.ln1_rstd.ptr,
                residual,
                o.ln1_w,
                o.ln1_b,
                n,
            )?;
            self.phase("matmul qkv")?;
            self.linear(
                a.qkv.ptr,
                a.ln1.ptr,
                self.px(o.qkv_w),
                self.px(o.qkv_b),
                (n, c, 3 * c),
                false,
            )?;
            self.phase("attention")?;
            if let Some(flash) = self.flash_kernels() {
                // atty = softmax(q k^T) v, straight from qkv's layout to atty's.
                let (q, k, v) = self.qkv_parts(a.qkv.ptr);
                let c3 = 3 * ci;
                self.launch(
                    &flash.forward,
                    flash_grid(t, nh, b),
                    FLASH_THREADS,
                    &[
                        a.atty.ptr.into(),
                        a.att.ptr.into(),
                        q.into(),
                        k.into(),
                        v.into(),
                        ti.into(),
                        nhi.into(),
                        1i32.into(),
                        c3.into(),
                        c3.into(),
                        ci.into(),
                        scale.into(),
                    ],
                )?;
            } else {
                self.launch1(
                    &self.kernels.attn_permute,
                    n * c,
                    &[
                        acts.q.ptr.into(),
                        acts.k.ptr.into(),
                        acts.v.ptr.into(),
                        a.qkv.ptr.into(),
                        bi.into(),
                        ti.into(),
                        nhi.into(),
                        hsi.into(),
                    ],
                )?;
                // preatt = q k^T per head.
                self.head_scores(acts.q.ptr, acts.k.ptr, acts.preatt.ptr, (t, hs, b * nh))?;
                self.launch_rows(
                    &self.kernels.attn_softmax,
                    b * nh * t,
                    &[
                        a.att.ptr.into(),
                        acts.preatt.ptr.into(),
                        scale.into(),
                        rows.into(),
                        ti.into(),
                    ],
                )?;
                // y = att v per head.
                self.head_mix(a.att.ptr, acts.v.ptr, acts.y.ptr, false, (t, hs, b * nh))?;
                self.launch1(
                    &self.kernels.attn_unpermute,
                    n * c,
                    &[
                        a.atty.ptr.into(),
                        acts.y.ptr.into(),
                        bi.into(),
                        ti.into(),
                        nhi.into(),
                        hsi.into(),
                    ],
                )?;
            }
            self.phase("matmul proj")?;
            self.gpu.copy(a.res2.ptr, residual, n * c * x as usize)?;
            self.linear(
                a.res2.ptr,
                a.atty.ptr,
                self.px(o.proj_w),
                self.px(o.proj_b),
                (n, c, c),
                true,
            )?;
            self.phase("layernorm")?;
            self.layernorm_forward(
                a.ln2.ptr,
                a.ln2_mean.ptr,
                a.ln2_rstd.ptr,
                a.res2.ptr,
                o.ln2_w,
                o.ln2_b,
                n,
            )?;
            self.phase("matmul fc")?;
            self.linear(
                a.fch.ptr,
                a.ln2.ptr,
                self.px(o.fc_w),
                self.px(o.fc_b),
                (n, c, 4 * c),
                false,
            )?;
            let n4 = (n * 4 * c) as i64;
            self.phase("gelu")?;
            self.launch1(
                &self.kernels.gelu_forward,
                (n * 4 * c).div_ceil(8),
                &[a.fch_gelu.ptr.into(), a.fch.ptr.into(), n4.into()],
            )?;
            self.phase("matmul fcproj")?;
            self.gpu.copy(a.res3.ptr, a.res2.ptr, n * c * x as usize)?;
            self.linear(
                a.res3.ptr,
                a.fch_gelu.ptr,
                self.px(o.fcproj_w),
                self.px(o.fcproj_b),
                (n, 4 * c, c),
                true,
            )?;
        }
        let last = acts.blocks.last().map_or(acts.encoded.ptr, |a| a.res3.ptr);
        self.phase("layernorm")?;
        self.layernorm_forward(
            acts.lnf.ptr,
            acts.lnf_mean.ptr,
            acts.lnf_rstd.ptr,
            last,
            self.layout.lnf_w,
            self.layout.lnf_b,
            n,
        )?;
        // logits^T [v, n] = (wte^T)^T [v, c] x lnf^T [c, n]; wte is row-major [v, c].
        self.phase("matmul logits")?;
        self.blas.gemm(
            Gemm {
                transa: true,
                transb: false,
                m: v as u64,
                n: n as u64,
                k: c as u64,
                lda: c as i64,
                ldb: c as i64,
                ldd: v as i64,
                alpha: 1.0,
                beta: 0.0,
                batch: None,
            },
            wte,
            acts.lnf.ptr,
            acts.logits.ptr,
            self.precision.elem(),
            None,
        )?;
        let counted = crate::ops::counted(batch.targets);
        let grad_scale = if grad {
            1.0 / counted.max(1) as f32
        } else {
            0.0
        };
        let vi = v as i32;
        self.phase("softmax xent")?;
        self.launch(
            &self.kernels.softmax_xent,
            (n as u32, 1, 1),
            1024,
            &[
                acts.logits.ptr.into(),
                acts.losses.ptr.into(),
                acts.targets.ptr.into(),
                ni.into(),
                vi.into(),
                grad_scale.into(),
            ],
        )?;
        let mut losses = vec![0.0f32; n];
        self.phase("loss download")?;
        self.gpu.download(&mut losses, &acts.losses, 0)?;
        Ok(crate::ops::mean_loss(&losses, counted))
    }

    /// The backward pass after `forward(.., true)`: writes every gradient.
    fn backward(&mut self) -> Result<(), CudaError> {
        let Some(acts) = self.acts.as_ref() else {
            unreachable!("forward runs first")
        };
        let Some(g) = acts.grads.as_ref() else {
            unreachable!("a training backend allocates gradient scratch")
        };
        let config = self.config;
        let (b, t) = (acts.b, acts.t);
        let (c, v, nh) = (config.n_embd, config.vocab_size, config.n_head);
        let hs = c / nh;
        let n = b * t;
        let (bi, ti, ci, nhi, hsi) = (b as i32, t as i32, c as i32, nh as i32, hs as i32);
        let rows = (b * nh * t) as i32;
        let scale = 1.0 / (hs as f32).sqrt();
        let wte = self.px(self.layout.wte);
        self.phase("matmul logits bwd")?;
        // Head: dlnf = dlogits @ wte; dwte = dlogits^T @ lnf (the first write of dwte).
        // dlnf^T [c, n] = wte^T [c, v] (row-major [v, c], ld c) x dlogits^T [v, n].
        self.blas.gemm(
            Gemm {
                transa: false,
                transb: false,
                m: c as u64,
                n: n as u64,
                k: v as u64,
                lda: c as i64,
                ldb: v as i64,
                ldd: c as i64,
                alpha: 1.0,
                beta: 0.0,
                batch: None,
            },
            wte,
            acts.logits.ptr,
            g.dc.ptr,
            self.precision.elem(),
            None,
        )?;
        // dwte^T [c, v] = lnf^T [c, n] x dlogits [n, v].
        self.blas.gemm(
            Gemm {
                transa: false,
                transb: true,
                m: c as u64,
                n: v as u64,
                k: n as u64,
                lda: c as i64,
                ldb: v as i64,
                ldd: c as i64,
                alpha: 1.0,
                beta: 0.0,
                batch: None,
            },
            acts.lnf.ptr,
            acts.logits.ptr,
            self.grad(self.layout.wte),
            Elem::F32,
            None,
        )?;
        self.phase("layernorm bwd")?;
        self.gpu.zero(&g.dres)?;
        let last = acts.blocks.last().map_or(acts.encoded.ptr, |a| a.res3.ptr);
        self.layernorm_backward(
            g.dres.ptr,
            g.dc.ptr,
            last,
            (acts.lnf_mean.ptr, acts.lnf_rstd.ptr),
            (self.layout.lnf_w, self.layout.lnf_b),
            n,
            g,
        )?;
        for layer in (0..config.n_layer).rev() {
            let o = self.layout.blocks[layer];
            let a = &acts.blocks[layer];
            let residual = if layer == 0 {
                acts.encoded.ptr
            } else {
                acts.blocks[layer - 1].res3.ptr
            };
            // MLP.
            self.phase("matmul fcproj bwd")?;
            self.linear_backward(
                g.dfch_gelu.ptr,
                self.grad(o.fcproj_w),
                self.grad(o.fcproj_b),
                g.dres.ptr,
                a.fch_gelu.ptr,
                self.px(o.fcproj_w),
                (n, 4 * c, c),
                g,
            )?;
            let n4 = (n * 4 * c) as i64;
            self.phase("gelu bwd")?;
            self.launch1(
                &self.kernels.gelu_backward,
                (n * 4 * c).div_ceil(8),
                &[
                    g.dfch.ptr.into(),
                    a.fch.ptr.into(),
                    g.dfch_gelu.ptr.into(),
                    n4.into(),
                ],
            )?;
            self.phase("matmul fc bwd")?;
            self.linear_backward(
                g.dc.ptr,
                self.grad(o.fc_w),
                self.grad(o.fc_b),
                g.dfch.ptr,
                a.ln2.ptr,
                self.px(o.fc_w),
                (n, c, 4 * c),
                g,
            )?;
            self.phase("layernorm bwd")?;
            self.layernorm_backward(
                g.dres.ptr,
                g.dc.ptr,
                a.res2.ptr,
                (a.ln2_mean.ptr, a.ln2_rstd.ptr),
                (o.ln2_w, o.ln2_b),
                n,
                g,
            )?;
            // Attention.
            self.phase("matmul proj bwd")?;
            self.linear_backward(
                g.dc.ptr,
                self.grad(o.proj_w),
                self.grad(o.proj_b),
                g.dres.ptr,
                a.atty.ptr,
                self.px(o.proj_w),
                (n, c, c),
                g,
            )?;
            self.phase("attention bwd")?;
            if let Some(flash) = self.flash_kernels() {
                self.flash_backward(flash, a, g, (b, t))?;
            } else {
                self.launch1(
                    &self.kernels.attn_unpermute_backward,
                    n * c,
                    &[
                        g.dy.ptr.into(),
                        g.dc.ptr.into(),
                        bi.into(),
                        ti.into(),
                        nhi.into(),
                        hsi.into(),
                    ],
                )?;
                self.launch1(
                    &self.kernels.attn_permute,
                    n * c,
                    &[
                        acts.q.ptr.into(),
                        acts.k.ptr.into(),
                        acts.v.ptr.into(),
                        a.qkv.ptr.into(),
                        bi.into(),
                        ti.into(),
                        nhi.into(),
                        hsi.into(),
                    ],
                )?;
                let bh = b * nh;
                // datt = dy v^T.
                self.head_scores(g.dy.ptr, acts.v.ptr, g.datt.ptr, (t, hs, bh))?;
                // dv = att^T dy.
                self.head_mix(a.att.ptr, g.dy.ptr, g.dv.ptr, true, (t, hs, bh))?;
                self.launch_rows(
                    &self.kernels.attn_softmax_backward,
                    bh * t,
                    &[
                        g.dpreatt.ptr.into(),
                        g.datt.ptr.into(),
                        a.att.ptr.into(),
                        scale.into(),
                        rows.into(),
                        ti.into(),
                    ],
                )?;
                // dq = dpre k, dk = dpre^T q.
                self.head_mix(g.dpreatt.ptr, acts.k.ptr, g.dq.ptr, false, (t, hs, bh))?;
                self.head_mix(g.dpreatt.ptr, acts.q.ptr, g.dk.ptr, true, (t, hs, bh))?;
                self.launch1(
                    &self.kernels.attn_permute_backward,
                    n * c,
                    &[
                        g.dqkv.ptr.into(),
                        g.dq.ptr.into(),
                        g.dk.ptr.into(),
                        g.dv.ptr.into(),
                        bi.into(),
                        ti.into(),
                        nhi.into(),
                        hsi.into(),
                    ],
                )?;
            }
            self.phase("matmul qkv bwd")?;
            self.linear_backward(
                g.dc.ptr,
                self.grad(o.qkv_w),
                self.grad(o.qkv_b),
                g.dqkv.ptr,
                a.ln1.ptr,
                self.px(o.qkv_w),
                (n, c, 3 * c),
                g,
            )?;
            self.phase("layernorm bwd")?;
            self.layernorm_backward(
                g.dres.ptr,
                g.dc.ptr,
                residual,
                (a.ln1_mean.ptr, a.ln1_rstd.ptr),
                (o.ln1_w, o.ln1_b),
                n,
                g,
            )?;
        }
        // Embeddings.
        self.phase("embed bwd")?;
        let dwpe = self.grad(self.layout.wpe);
        self.launch1(
            &self.kernels.wpe_backward,
            t * c,
            &[
                dwpe.into(),
                g.dres.ptr.into(),
                bi.into(),
                ti.into(),
                ci.into(),
            ],
        )?;
        // Bucket the rows by token on the host (stable: rows in order within a bucket).
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by_key(|&r| acts.host_inputs[r as usize]);
        let (mut tokens, mut starts) = (Vec::new(), Vec::new());
        for (i, &r) in order.iter().enumerate() {
            let tok = acts.host_inputs[r as usize] as i32;
            if tokens.last() != Some(&tok) {
                tokens.push(tok);
                starts.push(i as i32);
            }
        }
        starts.push(n as i32);
        let rows_i: Vec<i32> = order.iter().map(|&r| r as i32).collect();
        let need = n.max(starts.len()) * 4;
        if self.buckets[2].bytes < need {
            self.buckets = [
                self.gpu.alloc(need)?,
                self.gpu.alloc(need)?,
                self.gpu.alloc(need)?,
            ];
        }
        self.gpu.upload(&self.buckets[0], 0, &tokens)?;
        self.gpu.upload(&self.buckets[1], 0, &starts)?;
        self.gpu.upload(&self.buckets[2], 0, &rows_i)?;
        let dwte = self.grad(self.layout.wte);
        let cols = c.div_ceil(THREADS as usize) as u32;
        self.launch(
            &self.kernels.wte_backward,
            (tokens.len() as u32, cols, 1),
            THREADS,
            &[
                dwte.into(),
                g.dres.ptr.into(),
                self.buckets[0].ptr.into(),
                self.buckets[1].ptr.into(),
                self.buckets[2].ptr.into(),
                ci.into(),
            ],
        )?;
        Ok(())
    }

    /// Marks the start of phase `label` on the stream when profiling.
    fn phase(&self, label: &'static str) -> Result<(), CudaError> {
        match &self.profile {
            Some(p) => p.mark(&self.gpu.stream, label),
            None => Ok(()),
        }
    }

    /// The fused kernels, when this backend's attention is [`Attention::Flash`].
    fn flash_kernels(&self) -> Option<&Flash> {
        match self.attention {
            Attention::Flash => self.kernels.flash.as_ref(),
            Attention::Materialized => None,
        }
    }

    /// Where q, k and v of `qkv` [n, 3c] start (their rows are 3c apart).
    fn qkv_parts(&self, qkv: u64) -> (u64, u64, u64) {
        let part = (self.config.n_embd * self.precision.size()) as u64;
        (qkv, qkv + part, qkv + 2 * part)
    }

    /// Attention's backward pass with the fused kernels: from d(atty) in `g.dc` to
    /// dqkv, rebuilding the probabilities from the saved log-sum-exp.
    fn flash_backward(
        &self,
        flash: &Flash,
        a: &BlockActs,
        g: &GradActs,
        (b, t): (usize, usize),
    ) -> Result<(), CudaError> {
        let (c, nh) = (self.config.n_embd, self.config.n_head);
        let scale = 1.0 / (FLASH_HEAD_SIZE as f32).sqrt();
        let (ti, nhi, ci, c3) = (t as i32, nh as i32, c as i32, 3 * c as i32);
        let rows = (b * t) as i32;
        self.launch_rows(
            &flash.backward_sum,
            b * t * nh,
            &[
                g.dsum.ptr.into(),
                g.dc.ptr.into(),
                a.atty.ptr.into(),
                rows.into(),
                nhi.into(),
                ti.into(),
                ci.into(),
            ],
        )?;
        let (q, k, v) = self.qkv_parts(a.qkv.ptr);
        let (dq, dk, dv) = self.qkv_parts(g.dqkv.ptr);
        let shared: [Arg; 11] = [
            q.into(),
            k.into(),
            v.into(),
            g.dc.ptr.into(),
            a.att.ptr.into(),
            g.dsum.ptr.into(),
            ti.into(),
            nhi.into(),
            1i32.into(),
            c3.into(),
            c3.into(),
        ];
        let tail: [Arg; 2] = [ci.into(), scale.into()];
        let args = |out: &[Arg]| -> Vec<Arg> {
            out.iter()
                .chain(shared.iter())
                .chain(tail.iter())
                .copied()
                .collect()
        };
        self.launch(
            &flash.backward_kv,
            flash_grid(t, nh, b),
            FLASH_THREADS,
            &args(&[dk.into(), dv.into()]),
        )?;
        self.launch(
            &flash.backward_q,
            flash_grid(t, nh, b),
            FLASH_THREADS,
            &args(&[dq.into()]),
        )
    }

    /// Clips and applies one AdamW update; returns the pre-clip norm.
    /// Feeds `tokens` at the next positions of the KV cache, [`PREFILL_ROWS_MAX`] rows a
    /// pass; returns the logits after the last. Nothing is fed unless all of them fit.
    fn decode_tokens(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        let c = self.config;
        if c.n_embd / c.n_head > DECODE_HEAD_MAX {
            return Err(CudaError::Unsupported {
                what: "decoding a GPT-2 whose heads are wider than 64",
            }
            .into());
        }
        let pos = self.decode.as_ref().map_or(0, |s| s.pos);
        crate::cpu::check_decode(tokens, pos, c.n_ctx, c.vocab_size)?;
        if self.decode.is_none() {
            self.decode = Some(self.decode_state()?);
        }
        for chunk in tokens.chunks(PREFILL_ROWS_MAX) {
            self.decode_pass(chunk)?;
        }
        let Some(s) = self.decode.as_mut() else {
            unreachable!("created above")
        };
        self.gpu.download(&mut s.host_logits, &s.logits, 0)?;
        Ok(&s.host_logits)
    }

    fn decode_state(&self) -> Result<DecodeState, CudaError> {
        let config = self.config;
        let (c, v) = (config.n_embd, config.vocab_size);
        let x = self.precision.size();
        let gpu = &self.gpu;
        let m = PREFILL_ROWS_MAX.min(config.n_ctx);
        let a = |elems: usize| gpu.alloc(elems * x);
        let f = |elems: usize| gpu.alloc(elems * 4);
        let mut cache = Vec::with_capacity(config.n_layer);
        for _ in 0..config.n_layer {
            cache.push(a(config.n_ctx * 3 * c)?);
        }
        Ok(DecodeState {
            pos: 0,
            cache,
            inputs: gpu.alloc(m * 4)?,
            x: a(m * c)?,
            r2: a(m * c)?,
            ln: a(m * c)?,
            mean: f(m)?,
            rstd: f(m)?,
            atty: a(m * c)?,
            fch: a(m * 4 * c)?,
            fch_gelu: a(m * 4 * c)?,
            logits_x: a(v)?,
            logits: f(v)?,
            host_logits: vec![0.0; v],
        })
    }

    /// One pass of [`Self::decode_tokens`]: the rows of `tokens` (at positions pos ..)
    /// through every block with the training forward's kernels and products, each row
    /// attending to the cache up to its own position; the head runs on the last row only.
    fn decode_pass(&mut self, tokens: &[u32]) -> Result<(), CudaError> {
        let Some(s) = self.decode.as_ref() else {
            unreachable!("decode_tokens creates the state")
        };
        let config = self.config;
        let (c, v, nh) = (config.n_embd, config.vocab_size, config.n_head);
        let hs = c / nh;
        let x = self.precision.size();
        let m = tokens.len();
        let pos0 = s.pos;
        let (mi, ci) = (m as i32, c as i32);
        let scale = 1.0 / (hs as f32).sqrt();
        self.gpu.upload(&s.inputs, 0, tokens)?;
        // Row i is position pos0 + i: the position table from row pos0 on, and t = m so
        // that row i takes its row i.
        let wte = self.px(self.layout.wte);
        let wpe = self.px(self.layout.wpe) + (pos0 * c * x) as u64;
        self.launch1(
            &self.kernels.encoder_forward,
            m * c,
            &[
                s.x.ptr.into(),
                s.inputs.ptr.into(),
                wte.into(),
                wpe.into(),
                mi.into(),
                mi.into(),
                ci.into(),
            ],
        )?;
        for (layer, cache) in s.cache.iter().enumerate() {
            let o = self.layout.blocks[layer];
            let rows = cache.ptr + (pos0 * 3 * c * x) as u64;
            self.layernorm_forward(
                s.ln.ptr, s.mean.ptr, s.rstd.ptr, s.x.ptr, o.ln1_w, o.ln1_b, m,
            )?;
            self.linear(
                rows,
                s.ln.ptr,
                self.px(o.qkv_w),
                self.px(o.qkv_b),
                (m, c, 3 * c),
                false,
            )?;
            let (_, k0, v0) = self.qkv_parts(cache.ptr);
            self.launch(
                &self.kernels.decode_attention,
                (m as u32, nh as u32, 1),
                128,
                &[
                    s.atty.ptr.into(),
                    rows.into(),
                    k0.into(),
                    v0.into(),
                    (pos0 as i32).into(),
                    mi.into(),
                    1i32.into(),
                    (3 * ci).into(),
                    ci.into(),
                    scale.into(),
                    (hs as i32).into(),
                ],
            )?;
            self.gpu.copy(s.r2.ptr, s.x.ptr, m * c * x)?;
            self.linear(
                s.r2.ptr,
                s.atty.ptr,
                self.px(o.proj_w),
                self.px(o.proj_b),
                (m, c, c),
                true,
            )?;
            self.layernorm_forward(
                s.ln.ptr, s.mean.ptr, s.rstd.ptr, s.r2.ptr, o.ln2_w, o.ln2_b, m,
            )?;
            self.linear(
                s.fch.ptr,
                s.ln.ptr,
                self.px(o.fc_w),
                self.px(o.fc_b),
                (m, c, 4 * c),
                false,
            )?;
            let n4 = m * 4 * c;
            self.launch1(
                &self.kernels.gelu_forward,
                n4.div_ceil(8),
                &[s.fch_gelu.ptr.into(), s.fch.ptr.into(), (n4 as i64).into()],
            )?;
            self.gpu.copy(s.x.ptr, s.r2.ptr, m * c * x)?;
            self.linear(
                s.x.ptr,
                s.fch_gelu.ptr,
                self.px(o.fcproj_w),
                self.px(o.fcproj_b),
                (m, 4 * c, c),
                true,
            )?;
        }
        // The head on the last row only: logits^T [v, 1] = (wte^T)^T [v, c] x ln^T [c, 1].
        let last = s.x.ptr + ((m - 1) * c * x) as u64;
        self.layernorm_forward(
            s.ln.ptr,
            s.mean.ptr,
            s.rstd.ptr,
            last,
            self.layout.lnf_w,
            self.layout.lnf_b,
            1,
        )?;
        self.blas.gemm(
            Gemm {
                transa: true,
                transb: false,
                m: v as u64,
                n: 1,
                k: c as u64,
                lda: c as i64,
                ldb: c as i64,
                ldd: v as i64,
                alpha: 1.0,
                beta: 0.0,
                batch: None,
            },
            wte,
            s.ln.ptr,
            s.logits_x.ptr,
            self.precision.elem(),
            None,
        )?;
        self.launch1(
            &self.kernels.cast_from_x,
            v,
            &[
                s.logits.ptr.into(),
                s.logits_x.ptr.into(),
                (v as i64).into(),
            ],
        )?;
        if let Some(s) = self.decode.as_mut() {
            s.pos += m;
        }
        Ok(())
    }

    fn adamw(&mut self, opt: &OptimizerConfig, lr: f32) -> Result<f32, CudaError> {
        let profile = &self.profile;
        let stream = &self.gpu.stream;
        let phase = |label| match profile {
            Some(p) => p.mark(stream, label),
            None => Ok(()),
        };
        self.master.adamw(&self.gpu, &self.kernels, opt, lr, &phase)
    }

    fn check_trainable(&self) -> Result<(), EngineError> {
        match self.purpose {
            Purpose::Train => Ok(()),
            Purpose::Eval => Err(EngineError::EvalOnly),
        }
    }
}

/// A strided batch of head products: `(transa, transb, (m, n, k), (lda, ldb, ldd),
/// count, (stride_a, stride_b, stride_d))`.
fn heads(
    transa: bool,
    transb: bool,
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldd): (usize, usize, usize),
    count: usize,
    (sa, sb, sd): (usize, usize, usize),
) -> Gemm {
    Gemm {
        transa,
        transb,
        m: m as u64,
        n: n as u64,
        k: k as u64,
        lda: lda as i64,
        ldb: ldb as i64,
        ldd: ldd as i64,
        alpha: 1.0,
        beta: 0.0,
        batch: Some((count as i32, sa as i64, sb as i64, sd as i64)),
    }
}

impl Drop for Gpt2Cuda {
    fn drop(&mut self) {
        // Wait for queued work before its buffers are freed.
        let _ = self.gpu.sync();
        if let Some(p) = &self.profile {
            eprint!("{}", p.report());
        }
    }
}

impl Backend for Gpt2Cuda {
    fn architecture(&self) -> crate::Architecture {
        crate::Architecture::Gpt2(self.config)
    }

    fn device(&self) -> String {
        format!(
            "cuda:{} ({}, {})",
            self.gpu.info.ordinal,
            self.gpu.info.name,
            self.precision.name()
        )
    }

    fn params(&self) -> Vec<f32> {
        self.master.download(&self.gpu)
    }

    fn set_params(&mut self, params: &[f32]) -> Result<(), EngineError> {
        if params.len() != self.table.len() {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want: self.table.len(),
            });
        }
        Ok(self.master.upload(&self.gpu, &self.kernels, params)?)
    }

    fn trainable(&self) -> Vec<f32> {
        self.params()
    }

    fn set_trainable(&mut self, trainable: &[f32]) -> Result<(), EngineError> {
        self.set_params(trainable)
    }

    fn reset_optimizer(&mut self) {
        let _ = self.master.reset_moments(&self.gpu);
    }

    fn train_step(
        &mut self,
        batch: &Batch<'_>,
        optimizer: &OptimizerConfig,
        lr: f32,
    ) -> Result<StepStats, EngineError> {
        self.check_trainable()?;
        self.check_batch(batch)?;
        if let Some(p) = &self.profile {
            p.begin();
        }
        let loss = self.forward(batch, true)?;
        self.backward()?;
        let grad_norm = self.adamw(optimizer, lr)?;
        self.phase("end")?;
        self.gpu.sync()?;
        if let Some(p) = &self.profile {
            p.end()?;
        }
        Ok(StepStats { loss, grad_norm })
    }

    fn eval_loss(&mut self, batch: &Batch<'_>) -> Result<f32, EngineError> {
        self.check_batch(batch)?;
        Ok(self.forward(batch, false)?)
    }

    fn loss_and_grad(&mut self, batch: &Batch<'_>) -> Result<(f32, Vec<f32>), EngineError> {
        self.check_trainable()?;
        self.check_batch(batch)?;
        let loss = self.forward(batch, true)?;
        self.backward()?;
        Ok((loss, self.master.download_grads(&self.gpu)?))
    }

    fn decode_reset(&mut self) {
        if let Some(s) = self.decode.as_mut() {
            s.pos = 0;
        }
    }

    fn decode_step(&mut self, token: u32) -> Result<&[f32], EngineError> {
        self.decode_tokens(&[token])
    }

    fn decode_prefill(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        self.decode_tokens(tokens)
    }
}
