//! A Llama on an NVIDIA GPU: the CPU engine's model (`llama/cpu.rs`), step for step, in
//! bf16 activations and matrix-product inputs with f32 master weights, gradients and
//! AdamW moments; every tensor trained, or a LoRA adapter on a frozen base.
//!
//! Attention is the fused kernels GPT-2 uses (FlashAttention-2's tiling, a deterministic
//! backward), reading grouped queries' keys and values from the qkv rows in place:
//! heads of 64 only (SmolLM2's), so a Llama with other heads, or f32, answers
//! [`CudaError::Unsupported`]. Decoding keeps each layer's qkv rows as its KV cache
//! (the products write there), a prompt going in as matrices of up to 256 rows.
//!
//! A LoRA product is four cuBLASLt products a target on top of the frozen one (`u =
//! scale x A^T`, `y += u B^T`; backward `dB = dy^T u`, `du = scale dy B`, `dA = du^T x`,
//! `dx += du A`), each target's `u` saved for the backward pass.

use std::sync::Arc;

use super::blas::{Blas, Elem, Gemm};
use super::kernels::{
    Arg, FLASH_HEAD_SIZE, FLASH_THREADS, Kernels, Master, Precision, SUM_CHUNK, SUM_FINAL_COLS,
    SUM_PARTIAL_COLS, THREADS, flash_grid,
};
use super::profile::Profile;
use super::{CudaError, DeviceMem, Gpu};
use crate::llama::ops::RopeTables;
use crate::{
    Backend, Batch, EngineError, LlamaConfig, LlamaLayout, LoraConfig, LoraLayout, LoraTarget,
    OptimizerConfig, Purpose, StepStats,
};

/// One layer's saved activations (bf16 unless said).
struct LayerActs {
    h1: DeviceMem,
    /// f32 [n].
    rstd1: DeviceMem,
    /// [n, (heads + 2 kv_heads) head_dim], q and k rotated.
    qkv: DeviceMem,
    /// Each row's log-sum-exp of scaled scores (base 2), f32 [b, heads, t].
    lse: DeviceMem,
    atty: DeviceMem,
    res2: DeviceMem,
    h2: DeviceMem,
    rstd2: DeviceMem,
    /// [n, 2 intermediate], gate then up.
    gate_up: DeviceMem,
    act: DeviceMem,
    res3: DeviceMem,
    /// The adapter's `u = scale x A^T` of each adapted target, [n, rank] each, in
    /// [`LoraTarget::ALL`] order (empty without an adapter).
    u: Vec<Option<DeviceMem>>,
}

/// Gradient scratch, shared by every layer (a training backend only).
struct GradActs {
    dres: DeviceMem,
    dc: DeviceMem,
    dact: DeviceMem,
    dgate_up: DeviceMem,
    datty: DeviceMem,
    dqkv: DeviceMem,
    /// Each row's sum of d(atty) * atty per head, f32 [b, heads, t].
    dsum: DeviceMem,
    /// A target's `du` [n, rank] (with an adapter).
    du: DeviceMem,
    partial: DeviceMem,
}

/// Activations for one batch shape.
struct Acts {
    b: usize,
    t: usize,
    inputs: DeviceMem,
    targets: DeviceMem,
    encoded: DeviceMem,
    layers: Vec<LayerActs>,
    hf: DeviceMem,
    rstdf: DeviceMem,
    logits: DeviceMem,
    losses: DeviceMem,
    grads: Option<GradActs>,
    host_inputs: Vec<u32>,
    /// Buckets of the embedding gradient: tokens, starts, rows (n + 1 each).
    buckets: [DeviceMem; 3],
}

/// Rows one decoding pass takes (a longer prompt goes in several), as the CPU's.
const PREFILL_ROWS_MAX: usize = 256;

/// KV-cache decoding: each layer's qkv rows of every position fed so far (the products
/// write there, q and k rotated in place, so the cache needs no copy), and scratch for
/// up to [`PREFILL_ROWS_MAX`] new rows.
struct DecodeState {
    pos: usize,
    /// Per layer, [max_seq, qkv width].
    cache: Vec<DeviceMem>,
    inputs: DeviceMem,
    x: DeviceMem,
    r2: DeviceMem,
    h: DeviceMem,
    rstd: DeviceMem,
    atty: DeviceMem,
    gate_up: DeviceMem,
    act: DeviceMem,
    /// The adapter's `u` of each target ([`LoraTarget::ALL`] order), reused by every
    /// layer.
    u: Vec<Option<DeviceMem>>,
    /// The last row's logits: bf16 from the product, f32 on the device and on the host.
    logits_x: DeviceMem,
    logits: DeviceMem,
    host_logits: Vec<f32>,
}

/// The LoRA adapter: what trains when the base is frozen.
struct Adapter {
    lora: LoraConfig,
    layout: LoraLayout,
    master: Master,
    scale: f32,
}

/// A row-major operand of a product: a device pointer and its row stride (elements).
#[derive(Clone, Copy)]
struct M(u64, usize);

/// A Llama backend on one GPU.
pub struct LlamaCuda {
    // Field order is drop order: everything on the GPU goes before the context.
    acts: Option<Acts>,
    decode: Option<DecodeState>,
    /// The base; it trains unless there is an adapter.
    base: Master,
    adapter: Option<Adapter>,
    /// With an adapter: the host's copy of the frozen base, for `params`.
    frozen: Option<Arc<Vec<f32>>>,
    rope_cos: DeviceMem,
    rope_sin: DeviceMem,
    kernels: Kernels,
    profile: Option<Profile>,
    blas: Blas,
    config: LlamaConfig,
    layout: LlamaLayout,
    precision: Precision,
    purpose: Purpose,
    gpu: Gpu,
}

impl LlamaCuda {
    /// A backend of `config` training every tensor, holding `params` ([`LlamaLayout`]
    /// order) on GPU `ordinal`.
    pub fn open(
        config: LlamaConfig,
        params: &[f32],
        ordinal: usize,
        purpose: Purpose,
    ) -> Result<LlamaCuda, EngineError> {
        LlamaCuda::open_with(config, params, ordinal, purpose, Precision::Bf16)
    }

    /// [`Self::open`] in `precision`. [`Precision::F32`] evaluates and decodes only (its
    /// attention is the decoding kernel, run over every row; there is no f32 backward):
    /// f32 activations and true f32 products, for answers that match f32 references.
    pub fn open_with(
        config: LlamaConfig,
        params: &[f32],
        ordinal: usize,
        purpose: Purpose,
        precision: Precision,
    ) -> Result<LlamaCuda, EngineError> {
        LlamaCuda::build(config, None, params, None, ordinal, (purpose, precision))
    }

    /// A backend with a LoRA adapter (`adapter`, [`LoraLayout`] order) on the frozen
    /// `base`: only the adapter has gradients and moments on the GPU.
    pub fn open_lora(
        config: LlamaConfig,
        lora: LoraConfig,
        base: Arc<Vec<f32>>,
        adapter: &[f32],
        ordinal: usize,
        purpose: Purpose,
    ) -> Result<LlamaCuda, EngineError> {
        lora.validate(&config).map_err(crate::SpecError::from)?;
        let want = lora.n_params(&config);
        if adapter.len() != want {
            return Err(EngineError::ParamCount {
                got: adapter.len(),
                want,
            });
        }
        let frozen = base.clone();
        LlamaCuda::build(
            config,
            Some((lora, adapter)),
            &base,
            Some(frozen),
            ordinal,
            (purpose, Precision::Bf16),
        )
    }

    fn build(
        config: LlamaConfig,
        lora: Option<(LoraConfig, &[f32])>,
        params: &[f32],
        frozen: Option<Arc<Vec<f32>>>,
        ordinal: usize,
        (purpose, precision): (Purpose, Precision),
    ) -> Result<LlamaCuda, EngineError> {
        config.validate()?;
        if precision == Precision::F32 && purpose == Purpose::Train {
            return Err(CudaError::Unsupported {
                what: "training a Llama in f32 (f32 evaluates and decodes; bf16 trains)",
            }
            .into());
        }
        if config.head_dim != FLASH_HEAD_SIZE {
            return Err(CudaError::Unsupported {
                what: "a Llama whose heads are not 64 wide",
            }
            .into());
        }
        if !config.hidden.is_multiple_of(8) || !config.intermediate.is_multiple_of(8) {
            return Err(CudaError::Unsupported {
                what: "a Llama whose hidden or intermediate size is not a multiple of 8",
            }
            .into());
        }
        let layout = LlamaLayout::new(&config);
        if params.len() != layout.table().len() {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want: layout.table().len(),
            });
        }
        let gpu = Gpu::open(ordinal)?;
        let kernels = Kernels::load(&gpu, precision)?;
        let blas = Blas::new(&gpu, precision.elem())?;
        let train = purpose == Purpose::Train;
        let base = Master::new(
            &gpu,
            &kernels,
            layout.table(),
            params,
            precision,
            train && lora.is_none(),
        )?;
        let adapter = match lora {
            Some((lora, adapter)) => {
                let ad_layout = LoraLayout::new(&config, &lora);
                let master =
                    Master::new(&gpu, &kernels, ad_layout.table(), adapter, precision, train)?;
                Some(Adapter {
                    scale: lora.scale(),
                    lora,
                    layout: ad_layout,
                    master,
                })
            }
            None => None,
        };
        let rope = RopeTables::new(config.head_dim, config.max_seq, config.rope_theta);
        let table = |v: &[f32]| -> Result<DeviceMem, CudaError> {
            let mem = gpu.alloc(v.len() * 4)?;
            gpu.upload(&mem, 0, v)?;
            Ok(mem)
        };
        let (rope_cos, rope_sin) = (table(&rope.cos)?, table(&rope.sin)?);
        Ok(LlamaCuda {
            acts: None,
            decode: None,
            base,
            adapter,
            frozen,
            rope_cos,
            rope_sin,
            kernels,
            profile: Profile::from_env(),
            blas,
            config,
            layout,
            precision,
            purpose,
            gpu,
        })
    }

    /// The GPU this backend runs on.
    pub fn gpu(&self) -> &super::GpuInfo {
        &self.gpu.info
    }

    /// What trains: the adapter, or the base.
    fn trained(&self) -> &Master {
        match &self.adapter {
            Some(ad) => &ad.master,
            None => &self.base,
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

    fn phase(&self, label: &'static str) -> Result<(), CudaError> {
        match &self.profile {
            Some(p) => p.mark(&self.gpu.stream, label),
            None => Ok(()),
        }
    }

    fn px(&self, offset: usize) -> u64 {
        self.base.px(offset)
    }

    /// The gradient of base tensor `offset` when the base trains.
    fn full_grad(&self, offset: usize) -> Option<u64> {
        match self.adapter {
            None => Some(self.base.grad(offset)),
            Some(_) => None,
        }
    }

    /// Row-major `d[m, n] = alpha op(a) op(b) + beta d`: `op(a)` is `[m, k]` (`a` stored
    /// so, or `[k, m]` with `ta`), `op(b)` is `[k, n]` (`b` stored so, or `[n, k]` with
    /// `tb`). Column-major, that is `d^T = op(b)^T op(a)^T`.
    #[allow(clippy::too_many_arguments)]
    fn mm(
        &self,
        d: M,
        a: M,
        b: M,
        (m, n, k): (usize, usize, usize),
        (ta, tb): (bool, bool),
        (alpha, beta): (f32, f32),
        d_elem: Elem,
    ) -> Result<(), CudaError> {
        self.blas.gemm(
            Gemm {
                transa: tb,
                transb: ta,
                m: n as u64,
                n: m as u64,
                k: k as u64,
                lda: b.1 as i64,
                ldb: a.1 as i64,
                ldd: d.1 as i64,
                alpha,
                beta,
                batch: None,
            },
            b.0,
            a.0,
            d.0,
            d_elem,
            None,
        )
    }

    /// `y[n, o] (+)= x[n, i] W^T` for a weight stored `[o, i]` (HF's `nn.Linear`).
    fn linear(
        &self,
        y: M,
        x: M,
        w: u64,
        (n, i, o): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<(), CudaError> {
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.mm(
            y,
            x,
            M(w, i),
            (n, o, i),
            (false, true),
            (1.0, beta),
            self.precision.elem(),
        )
    }

    /// The backward of [`Self::linear`] without accumulation: `dx = dy W` (when `dx`
    /// is given) and, when the base trains, `dW = dy^T x` (f32).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dx: Option<M>,
        dy: M,
        x: M,
        w: usize,
        (n, i, o): (usize, usize, usize),
    ) -> Result<(), CudaError> {
        if let Some(dx) = dx {
            self.mm(
                dx,
                dy,
                M(self.px(w), i),
                (n, i, o),
                (false, false),
                (1.0, 0.0),
                self.precision.elem(),
            )?;
        }
        if let Some(dw) = self.full_grad(w) {
            self.mm(
                M(dw, i),
                dy,
                x,
                (o, i, n),
                (true, false),
                (1.0, 0.0),
                Elem::F32,
            )?;
        }
        Ok(())
    }

    /// `y += scale (x A^T) B^T` for `target` of `layer`, saving `u = scale x A^T`;
    /// nothing without an adapter on it.
    fn lora_forward(
        &self,
        (layer, target): (usize, LoraTarget),
        x: M,
        y: M,
        u: &[Option<DeviceMem>],
        n: usize,
    ) -> Result<(), CudaError> {
        let Some(ad) = &self.adapter else {
            return Ok(());
        };
        let (Some(ab), Some(u)) = (ad.layout.get(layer, target), &u[target as usize]) else {
            return Ok(());
        };
        let (out, inp) = target.shape(&self.config);
        let r = ad.lora.rank;
        self.mm(
            M(u.ptr, r),
            x,
            M(ad.master.px(ab.a), inp),
            (n, r, inp),
            (false, true),
            (ad.scale, 0.0),
            self.precision.elem(),
        )?;
        self.mm(
            y,
            M(u.ptr, r),
            M(ad.master.px(ab.b), r),
            (n, out, r),
            (false, true),
            (1.0, 1.0),
            self.precision.elem(),
        )
    }

    /// The backward of [`Self::lora_forward`] given the target's output gradient `dy`:
    /// `dB = dy^T u`, `du = scale dy B`, `dA = du^T x`, and `dx += du A` when `dx` is
    /// given.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        (layer, target): (usize, LoraTarget),
        dy: M,
        x: M,
        u: &[Option<DeviceMem>],
        du: &DeviceMem,
        dx: Option<M>,
        n: usize,
    ) -> Result<(), CudaError> {
        let Some(ad) = &self.adapter else {
            return Ok(());
        };
        let (Some(ab), Some(u)) = (ad.layout.get(layer, target), &u[target as usize]) else {
            return Ok(());
        };
        let (out, inp) = target.shape(&self.config);
        let r = ad.lora.rank;
        self.mm(
            M(ad.master.grad(ab.b), r),
            dy,
            M(u.ptr, r),
            (out, r, n),
            (true, false),
            (1.0, 0.0),
            Elem::F32,
        )?;
        self.mm(
            M(du.ptr, r),
            dy,
            M(ad.master.px(ab.b), r),
            (n, r, out),
            (false, false),
            (ad.scale, 0.0),
            self.precision.elem(),
        )?;
        self.mm(
            M(ad.master.grad(ab.a), inp),
            M(du.ptr, r),
            x,
            (r, inp, n),
            (true, false),
            (1.0, 0.0),
            Elem::F32,
        )?;
        if let Some(dx) = dx {
            self.mm(
                dx,
                M(du.ptr, r),
                M(ad.master.px(ab.a), inp),
                (n, inp, r),
                (false, false),
                (1.0, 1.0),
                self.precision.elem(),
            )?;
        }
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        (out, rstd): (u64, u64),
        inp: u64,
        w: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        let (ni, ci) = (n as i32, self.config.hidden as i32);
        let eps = self.config.rms_eps as f32;
        self.gpu.launch_rows(
            &self.kernels.rmsnorm_forward,
            n,
            &[
                out.into(),
                rstd.into(),
                inp.into(),
                self.px(w).into(),
                ni.into(),
                ci.into(),
                eps.into(),
            ],
        )
    }

    /// `dinp += RMSNorm'(dout)`, and the gain's gradient when the base trains.
    fn rmsnorm_backward(
        &self,
        (dinp, dout): (u64, u64),
        (inp, rstd): (u64, u64),
        w: usize,
        n: usize,
        g: &GradActs,
    ) -> Result<(), CudaError> {
        let c = self.config.hidden;
        let (ni, ci) = (n as i32, c as i32);
        self.gpu.launch_rows(
            &self.kernels.rmsnorm_backward_input,
            n,
            &[
                dinp.into(),
                dout.into(),
                inp.into(),
                self.px(w).into(),
                rstd.into(),
                ni.into(),
                ci.into(),
            ],
        )?;
        let Some(dw) = self.full_grad(w) else {
            return Ok(());
        };
        let chunks = n.div_ceil(SUM_CHUNK);
        self.gpu.launch(
            &self.kernels.rmsnorm_param_partial,
            (c.div_ceil(SUM_PARTIAL_COLS) as u32, chunks as u32, 1),
            THREADS,
            &[
                g.partial.ptr.into(),
                dout.into(),
                inp.into(),
                rstd.into(),
                ni.into(),
                ci.into(),
            ],
        )?;
        let (ri, zero) = (chunks as i32, 0i32);
        self.gpu.launch(
            &self.kernels.column_sum_final,
            (c.div_ceil(SUM_FINAL_COLS) as u32, 1, 1),
            THREADS,
            &[
                dw.into(),
                g.partial.ptr.into(),
                ri.into(),
                ci.into(),
                zero.into(),
            ],
        )
    }

    /// Rotates (or with `inverse` rotates back) the q and k heads of `qkv` rows, row `r`
    /// to position `pos0 + r % t`.
    fn rope(
        &self,
        qkv: u64,
        (b, t, pos0): (usize, usize, usize),
        inverse: bool,
    ) -> Result<(), CudaError> {
        let c = self.config;
        let heads = c.heads + c.kv_heads;
        let half = c.head_dim / 2;
        let n = b * t;
        self.gpu.launch1(
            &self.kernels.rope,
            n * heads * half,
            &[
                qkv.into(),
                self.rope_cos.ptr.into(),
                self.rope_sin.ptr.into(),
                (n as i32).into(),
                (t as i32).into(),
                (pos0 as i32).into(),
                (c.qkv_width() as i32).into(),
                (heads as i32).into(),
                (half as i32).into(),
                i32::from(inverse).into(),
            ],
        )
    }

    /// Where q, k and v of a qkv buffer start.
    fn qkv_parts(&self, qkv: u64) -> (u64, u64, u64) {
        let c = self.config;
        let x = self.precision.size();
        let (nq, nkv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        (qkv, qkv + (nq * x) as u64, qkv + ((nq + nkv) * x) as u64)
    }

    fn ensure_acts(&mut self, b: usize, t: usize) -> Result<(), CudaError> {
        if matches!(&self.acts, Some(a) if a.b == b && a.t == t) {
            return Ok(());
        }
        self.acts = None;
        let c = self.config;
        let x = self.precision.size();
        let gpu = &self.gpu;
        let n = b * t;
        let (d, f, w, nq) = (
            c.hidden,
            c.intermediate,
            c.qkv_width(),
            c.heads * c.head_dim,
        );
        let a = |elems: usize| gpu.alloc(elems * x);
        let fl = |elems: usize| gpu.alloc(elems * 4);
        let rank = self.adapter.as_ref().map(|ad| ad.lora.rank);
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let mut u = Vec::with_capacity(LoraTarget::ALL.len());
            for target in LoraTarget::ALL {
                let on = self
                    .adapter
                    .as_ref()
                    .is_some_and(|ad| ad.layout.get(l, target).is_some());
                u.push(match (on, rank) {
                    (true, Some(r)) => Some(a(n * r)?),
                    _ => None,
                });
            }
            layers.push(LayerActs {
                h1: a(n * d)?,
                rstd1: fl(n)?,
                qkv: a(n * w)?,
                lse: fl(b * c.heads * t)?,
                atty: a(n * nq)?,
                res2: a(n * d)?,
                h2: a(n * d)?,
                rstd2: fl(n)?,
                gate_up: a(n * 2 * f)?,
                act: a(n * f)?,
                res3: a(n * d)?,
                u,
            });
        }
        let grads = if self.purpose == Purpose::Train {
            Some(GradActs {
                dres: a(n * d)?,
                dc: a(n * d)?,
                dact: a(n * f)?,
                dgate_up: a(n * 2 * f)?,
                datty: a(n * nq)?,
                dqkv: a(n * w)?,
                dsum: fl(b * c.heads * t)?,
                du: a(n * rank.unwrap_or(1))?,
                partial: fl(n.div_ceil(SUM_CHUNK) * d)?,
            })
        } else {
            None
        };
        self.acts = Some(Acts {
            b,
            t,
            inputs: gpu.alloc(n * 4)?,
            targets: gpu.alloc(n * 4)?,
            encoded: a(n * d)?,
            layers,
            hf: a(n * d)?,
            rstdf: fl(n)?,
            logits: a(n * c.vocab_size)?,
            losses: fl(n)?,
            grads,
            host_inputs: Vec::new(),
            buckets: [
                gpu.alloc((n + 1) * 4)?,
                gpu.alloc((n + 1) * 4)?,
                gpu.alloc((n + 1) * 4)?,
            ],
        });
        Ok(())
    }

    /// The forward pass; returns the mean loss. With `grad`, leaves d(loss)/d(logits)
    /// in the logits for `backward`.
    fn forward(&mut self, batch: &Batch<'_>, grad: bool) -> Result<f32, CudaError> {
        let (b, t) = (batch.batch, batch.seq);
        self.ensure_acts(b, t)?;
        let targets: Vec<i32> = batch.targets.iter().map(|&x| x as i32).collect();
        let Some(acts) = self.acts.as_mut() else {
            unreachable!("allocated above")
        };
        acts.host_inputs = batch.inputs.to_vec();
        self.gpu.upload(&acts.inputs, 0, batch.inputs)?;
        self.gpu.upload(&acts.targets, 0, &targets)?;
        let Some(acts) = self.acts.as_ref() else {
            unreachable!("allocated above")
        };
        let c = self.config;
        let x = self.precision.size();
        let n = b * t;
        let (d, f, v, w) = (c.hidden, c.intermediate, c.vocab_size, c.qkv_width());
        let (nh, nkv, hd) = (c.heads, c.kv_heads, c.head_dim);
        let nq = nh * hd;
        let (ni, di) = (n as i32, d as i32);
        let scale = 1.0 / (hd as f32).sqrt();
        self.phase("embed")?;
        self.gpu.launch1(
            &self.kernels.embed_forward,
            (n * d).div_ceil(8),
            &[
                acts.encoded.ptr.into(),
                acts.inputs.ptr.into(),
                self.px(self.layout.embed).into(),
                ni.into(),
                di.into(),
            ],
        )?;
        for (l, a) in acts.layers.iter().enumerate() {
            let o = self.layout.blocks[l];
            let residual = if l == 0 {
                acts.encoded.ptr
            } else {
                acts.layers[l - 1].res3.ptr
            };
            self.phase("rmsnorm")?;
            self.rmsnorm_forward((a.h1.ptr, a.rstd1.ptr), residual, o.attn_norm, n)?;
            self.phase("matmul qkv")?;
            self.linear(
                M(a.qkv.ptr, w),
                M(a.h1.ptr, d),
                self.px(o.qkv),
                (n, d, w),
                false,
            )?;
            self.phase("lora")?;
            let (q, k, vv) = self.qkv_parts(a.qkv.ptr);
            for (target, y) in [(LoraTarget::Q, q), (LoraTarget::K, k), (LoraTarget::V, vv)] {
                self.lora_forward((l, target), M(a.h1.ptr, d), M(y, w), &a.u, n)?;
            }
            self.phase("rope")?;
            self.rope(a.qkv.ptr, (b, t, 0), false)?;
            self.phase("attention")?;
            let (ti, wi, nqi) = (t as i32, w as i32, nq as i32);
            match &self.kernels.flash {
                Some(flash) => self.gpu.launch(
                    &flash.forward,
                    flash_grid(t, nh, b),
                    FLASH_THREADS,
                    &[
                        a.atty.ptr.into(),
                        a.lse.ptr.into(),
                        q.into(),
                        k.into(),
                        vv.into(),
                        ti.into(),
                        (nh as i32).into(),
                        ((nh / nkv) as i32).into(),
                        wi.into(),
                        wi.into(),
                        nqi.into(),
                        scale.into(),
                    ],
                )?,
                // f32 (evaluation only): the decoding kernel over every row, no
                // log-sum-exp kept.
                None => self.gpu.launch(
                    &self.kernels.decode_attention,
                    (t as u32, nh as u32, b as u32),
                    128,
                    &[
                        a.atty.ptr.into(),
                        q.into(),
                        k.into(),
                        vv.into(),
                        0i32.into(),
                        ti.into(),
                        ((nh / nkv) as i32).into(),
                        wi.into(),
                        nqi.into(),
                        scale.into(),
                        (hd as i32).into(),
                    ],
                )?,
            }
            self.phase("matmul o")?;
            self.gpu.copy(a.res2.ptr, residual, n * d * x)?;
            self.linear(
                M(a.res2.ptr, d),
                M(a.atty.ptr, nq),
                self.px(o.o),
                (n, nq, d),
                true,
            )?;
            self.phase("lora")?;
            self.lora_forward(
                (l, LoraTarget::O),
                M(a.atty.ptr, nq),
                M(a.res2.ptr, d),
                &a.u,
                n,
            )?;
            self.phase("rmsnorm")?;
            self.rmsnorm_forward((a.h2.ptr, a.rstd2.ptr), a.res2.ptr, o.mlp_norm, n)?;
            self.phase("matmul gate up")?;
            self.linear(
                M(a.gate_up.ptr, 2 * f),
                M(a.h2.ptr, d),
                self.px(o.gate_up),
                (n, d, 2 * f),
                false,
            )?;
            self.phase("lora")?;
            let up = a.gate_up.ptr + (f * x) as u64;
            for (target, y) in [(LoraTarget::Gate, a.gate_up.ptr), (LoraTarget::Up, up)] {
                self.lora_forward((l, target), M(a.h2.ptr, d), M(y, 2 * f), &a.u, n)?;
            }
            self.phase("swiglu")?;
            self.gpu.launch1(
                &self.kernels.swiglu_forward,
                (n * f).div_ceil(8),
                &[
                    a.act.ptr.into(),
                    a.gate_up.ptr.into(),
                    ni.into(),
                    (f as i32).into(),
                ],
            )?;
            self.phase("matmul down")?;
            self.gpu.copy(a.res3.ptr, a.res2.ptr, n * d * x)?;
            self.linear(
                M(a.res3.ptr, d),
                M(a.act.ptr, f),
                self.px(o.down),
                (n, f, d),
                true,
            )?;
            self.phase("lora")?;
            self.lora_forward(
                (l, LoraTarget::Down),
                M(a.act.ptr, f),
                M(a.res3.ptr, d),
                &a.u,
                n,
            )?;
        }
        let last = acts.layers.last().map_or(acts.encoded.ptr, |a| a.res3.ptr);
        self.phase("rmsnorm")?;
        self.rmsnorm_forward((acts.hf.ptr, acts.rstdf.ptr), last, self.layout.norm, n)?;
        self.phase("matmul logits")?;
        self.linear(
            M(acts.logits.ptr, v),
            M(acts.hf.ptr, d),
            self.px(self.layout.head),
            (n, d, v),
            false,
        )?;
        let counted = crate::ops::counted(batch.targets);
        let grad_scale = if grad {
            1.0 / counted.max(1) as f32
        } else {
            0.0
        };
        self.phase("softmax xent")?;
        self.gpu.launch(
            &self.kernels.softmax_xent,
            (n as u32, 1, 1),
            1024,
            &[
                acts.logits.ptr.into(),
                acts.losses.ptr.into(),
                acts.targets.ptr.into(),
                ni.into(),
                (v as i32).into(),
                grad_scale.into(),
            ],
        )?;
        let mut losses = vec![0.0f32; n];
        self.phase("loss download")?;
        self.gpu.download(&mut losses, &acts.losses, 0)?;
        Ok(crate::ops::mean_loss(&losses, counted))
    }

    /// The backward pass after `forward(.., true)`: writes the gradient of what trains.
    fn backward(&mut self) -> Result<(), CudaError> {
        let Some(acts) = self.acts.as_ref() else {
            unreachable!("forward runs first")
        };
        let Some(g) = acts.grads.as_ref() else {
            unreachable!("a training backend allocates gradient scratch")
        };
        let c = self.config;
        let x = self.precision.size();
        let (b, t) = (acts.b, acts.t);
        let n = b * t;
        let (d, f, v, w) = (c.hidden, c.intermediate, c.vocab_size, c.qkv_width());
        let (nh, hd) = (c.heads, c.head_dim);
        let nq = nh * hd;
        let full = self.adapter.is_none();
        self.phase("matmul logits bwd")?;
        // dhf = dlogits head; dhead = dlogits^T hf (the embedding's first write when tied).
        self.linear_backward(
            Some(M(g.dc.ptr, d)),
            M(acts.logits.ptr, v),
            M(acts.hf.ptr, d),
            self.layout.head,
            (n, d, v),
        )?;
        self.phase("rmsnorm bwd")?;
        self.gpu.zero(&g.dres)?;
        let last = acts.layers.last().map_or(acts.encoded.ptr, |a| a.res3.ptr);
        self.rmsnorm_backward(
            (g.dres.ptr, g.dc.ptr),
            (last, acts.rstdf.ptr),
            self.layout.norm,
            n,
            g,
        )?;
        for l in (0..c.layers).rev() {
            let o = self.layout.blocks[l];
            let a = &acts.layers[l];
            let residual = if l == 0 {
                acts.encoded.ptr
            } else {
                acts.layers[l - 1].res3.ptr
            };
            // With a frozen embedding nothing reads the first layer's input gradient.
            let need_dx = full || l > 0;
            // MLP.
            self.phase("matmul down bwd")?;
            self.linear_backward(
                Some(M(g.dact.ptr, f)),
                M(g.dres.ptr, d),
                M(a.act.ptr, f),
                o.down,
                (n, f, d),
            )?;
            self.phase("lora bwd")?;
            self.lora_backward(
                (l, LoraTarget::Down),
                M(g.dres.ptr, d),
                M(a.act.ptr, f),
                &a.u,
                &g.du,
                Some(M(g.dact.ptr, f)),
                n,
            )?;
            self.phase("swiglu bwd")?;
            self.gpu.launch1(
                &self.kernels.swiglu_backward,
                (n * f).div_ceil(8),
                &[
                    g.dgate_up.ptr.into(),
                    a.gate_up.ptr.into(),
                    g.dact.ptr.into(),
                    (n as i32).into(),
                    (f as i32).into(),
                ],
            )?;
            self.phase("matmul gate up bwd")?;
            self.linear_backward(
                Some(M(g.dc.ptr, d)),
                M(g.dgate_up.ptr, 2 * f),
                M(a.h2.ptr, d),
                o.gate_up,
                (n, d, 2 * f),
            )?;
            self.phase("lora bwd")?;
            let dup = g.dgate_up.ptr + (f * x) as u64;
            for (target, dy) in [(LoraTarget::Gate, g.dgate_up.ptr), (LoraTarget::Up, dup)] {
                self.lora_backward(
                    (l, target),
                    M(dy, 2 * f),
                    M(a.h2.ptr, d),
                    &a.u,
                    &g.du,
                    Some(M(g.dc.ptr, d)),
                    n,
                )?;
            }
            self.phase("rmsnorm bwd")?;
            self.rmsnorm_backward(
                (g.dres.ptr, g.dc.ptr),
                (a.res2.ptr, a.rstd2.ptr),
                o.mlp_norm,
                n,
                g,
            )?;
            // Attention.
            self.phase("matmul o bwd")?;
            self.linear_backward(
                Some(M(g.datty.ptr, nq)),
                M(g.dres.ptr, d),
                M(a.atty.ptr, nq),
                o.o,
                (n, nq, d),
            )?;
            self.phase("lora bwd")?;
            self.lora_backward(
                (l, LoraTarget::O),
                M(g.dres.ptr, d),
                M(a.atty.ptr, nq),
                &a.u,
                &g.du,
                Some(M(g.datty.ptr, nq)),
                n,
            )?;
            self.phase("attention bwd")?;
            self.flash_backward(a, g, (b, t))?;
            self.phase("rope bwd")?;
            // The rotation is orthogonal: its backward is the rotation back.
            self.rope(g.dqkv.ptr, (b, t, 0), true)?;
            self.phase("matmul qkv bwd")?;
            self.linear_backward(
                need_dx.then_some(M(g.dc.ptr, d)),
                M(g.dqkv.ptr, w),
                M(a.h1.ptr, d),
                o.qkv,
                (n, d, w),
            )?;
            self.phase("lora bwd")?;
            let (dq, dk, dv) = self.qkv_parts(g.dqkv.ptr);
            for (target, dy) in [
                (LoraTarget::Q, dq),
                (LoraTarget::K, dk),
                (LoraTarget::V, dv),
            ] {
                self.lora_backward(
                    (l, target),
                    M(dy, w),
                    M(a.h1.ptr, d),
                    &a.u,
                    &g.du,
                    need_dx.then_some(M(g.dc.ptr, d)),
                    n,
                )?;
            }
            if need_dx {
                self.phase("rmsnorm bwd")?;
                self.rmsnorm_backward(
                    (g.dres.ptr, g.dc.ptr),
                    (residual, a.rstd1.ptr),
                    o.attn_norm,
                    n,
                    g,
                )?;
            }
        }
        if !full {
            return Ok(());
        }
        self.phase("embed bwd")?;
        if !self.config.tie_embeddings {
            // The head's product wrote its own tensor: the embedding's starts at zero.
            let bytes = self.config.vocab_size * d * 4;
            self.gpu
                .memset_zero(self.base.grad(self.layout.embed), bytes)?;
        }
        self.embedding_backward(g, n)
    }

    /// `dembed[token] += the rows of dres that hold token`, bucketed by token on the
    /// host so no two blocks write one row (as GPT-2's).
    fn embedding_backward(&self, g: &GradActs, n: usize) -> Result<(), CudaError> {
        let Some(acts) = self.acts.as_ref() else {
            unreachable!("forward runs first")
        };
        let d = self.config.hidden;
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
        let rows: Vec<i32> = order.iter().map(|&r| r as i32).collect();
        let buckets = &acts.buckets;
        self.gpu.upload(&buckets[0], 0, &tokens)?;
        self.gpu.upload(&buckets[1], 0, &starts)?;
        self.gpu.upload(&buckets[2], 0, &rows)?;
        let cols = d.div_ceil(THREADS as usize) as u32;
        self.gpu.launch(
            &self.kernels.wte_backward,
            (tokens.len() as u32, cols, 1),
            THREADS,
            &[
                self.base.grad(self.layout.embed).into(),
                g.dres.ptr.into(),
                buckets[0].ptr.into(),
                buckets[1].ptr.into(),
                buckets[2].ptr.into(),
                (d as i32).into(),
            ],
        )
    }

    /// Attention's backward with the fused kernels: from d(atty) in `g.datty` to dqkv,
    /// the key/value gradients summed over each group's query heads in order.
    fn flash_backward(
        &self,
        a: &LayerActs,
        g: &GradActs,
        (b, t): (usize, usize),
    ) -> Result<(), CudaError> {
        let Some(flash) = &self.kernels.flash else {
            unreachable!("the bf16 build has the fused kernels")
        };
        let c = self.config;
        let (nh, nkv) = (c.heads, c.kv_heads);
        let nq = nh * c.head_dim;
        let scale = 1.0 / (FLASH_HEAD_SIZE as f32).sqrt();
        let (ti, nhi, wi, nqi) = (t as i32, nh as i32, c.qkv_width() as i32, nq as i32);
        self.gpu.launch_rows(
            &flash.backward_sum,
            b * t * nh,
            &[
                g.dsum.ptr.into(),
                g.datty.ptr.into(),
                a.atty.ptr.into(),
                ((b * t) as i32).into(),
                nhi.into(),
                ti.into(),
                nqi.into(),
            ],
        )?;
        let (q, k, v) = self.qkv_parts(a.qkv.ptr);
        let (dq, dk, dv) = self.qkv_parts(g.dqkv.ptr);
        let shared: [Arg; 11] = [
            q.into(),
            k.into(),
            v.into(),
            g.datty.ptr.into(),
            a.lse.ptr.into(),
            g.dsum.ptr.into(),
            ti.into(),
            nhi.into(),
            ((nh / nkv) as i32).into(),
            wi.into(),
            wi.into(),
        ];
        let tail: [Arg; 2] = [nqi.into(), scale.into()];
        let args = |out: &[Arg]| -> Vec<Arg> {
            out.iter()
                .chain(shared.iter())
                .chain(tail.iter())
                .copied()
                .collect()
        };
        self.gpu.launch(
            &flash.backward_kv,
            flash_grid(t, nkv, b),
            FLASH_THREADS,
            &args(&[dk.into(), dv.into()]),
        )?;
        self.gpu.launch(
            &flash.backward_q,
            flash_grid(t, nh, b),
            FLASH_THREADS,
            &args(&[dq.into()]),
        )
    }

    /// Feeds `tokens` at the next positions of the KV cache, [`PREFILL_ROWS_MAX`] rows a
    /// pass; returns the logits after the last. Nothing is fed unless all of them fit.
    fn decode_tokens(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        let c = self.config;
        let pos = self.decode.as_ref().map_or(0, |s| s.pos);
        crate::cpu::check_decode(tokens, pos, c.max_seq, c.vocab_size)?;
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
        let c = self.config;
        let x = self.precision.size();
        let gpu = &self.gpu;
        let m = PREFILL_ROWS_MAX;
        let (d, f, w, nq) = (
            c.hidden,
            c.intermediate,
            c.qkv_width(),
            c.heads * c.head_dim,
        );
        let a = |elems: usize| gpu.alloc(elems * x);
        let mut cache = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            cache.push(a(c.max_seq * w)?);
        }
        let mut u = Vec::with_capacity(LoraTarget::ALL.len());
        for target in LoraTarget::ALL {
            u.push(match &self.adapter {
                Some(ad) if ad.lora.targets.contains(&target) => Some(a(m * ad.lora.rank)?),
                _ => None,
            });
        }
        Ok(DecodeState {
            pos: 0,
            cache,
            inputs: gpu.alloc(m * 4)?,
            x: a(m * d)?,
            r2: a(m * d)?,
            h: a(m * d)?,
            rstd: gpu.alloc(m * 4)?,
            atty: a(m * nq)?,
            gate_up: a(m * 2 * f)?,
            act: a(m * f)?,
            u,
            logits_x: a(c.vocab_size)?,
            logits: gpu.alloc(c.vocab_size * 4)?,
            host_logits: vec![0.0; c.vocab_size],
        })
    }

    /// One pass of [`Self::decode_tokens`]: the rows of `tokens` through every layer as
    /// matrices (the training forward's kernels and products), each row attending to the
    /// cache up to its own position; the head runs on the last row only.
    fn decode_pass(&mut self, tokens: &[u32]) -> Result<(), CudaError> {
        let Some(s) = self.decode.as_ref() else {
            unreachable!("decode_tokens creates the state")
        };
        let c = self.config;
        let x = self.precision.size();
        let m = tokens.len();
        let pos0 = s.pos;
        let (d, f, v, w) = (c.hidden, c.intermediate, c.vocab_size, c.qkv_width());
        let (nh, nkv, hd) = (c.heads, c.kv_heads, c.head_dim);
        let nq = nh * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        self.gpu.upload(&s.inputs, 0, tokens)?;
        self.gpu.launch1(
            &self.kernels.embed_forward,
            (m * d).div_ceil(8),
            &[
                s.x.ptr.into(),
                s.inputs.ptr.into(),
                self.px(self.layout.embed).into(),
                (m as i32).into(),
                (d as i32).into(),
            ],
        )?;
        for (l, cache) in s.cache.iter().enumerate() {
            let o = self.layout.blocks[l];
            let rows = cache.ptr + (pos0 * w * x) as u64;
            self.rmsnorm_forward((s.h.ptr, s.rstd.ptr), s.x.ptr, o.attn_norm, m)?;
            self.linear(M(rows, w), M(s.h.ptr, d), self.px(o.qkv), (m, d, w), false)?;
            let (q, k, vv) = self.qkv_parts(rows);
            for (target, y) in [(LoraTarget::Q, q), (LoraTarget::K, k), (LoraTarget::V, vv)] {
                self.lora_forward((l, target), M(s.h.ptr, d), M(y, w), &s.u, m)?;
            }
            self.rope(rows, (1, m, pos0), false)?;
            let (_, k0, v0) = self.qkv_parts(cache.ptr);
            self.gpu.launch(
                &self.kernels.decode_attention,
                (m as u32, nh as u32, 1),
                128,
                &[
                    s.atty.ptr.into(),
                    rows.into(),
                    k0.into(),
                    v0.into(),
                    (pos0 as i32).into(),
                    (m as i32).into(),
                    ((nh / nkv) as i32).into(),
                    (w as i32).into(),
                    (nq as i32).into(),
                    scale.into(),
                    (hd as i32).into(),
                ],
            )?;
            self.gpu.copy(s.r2.ptr, s.x.ptr, m * d * x)?;
            self.linear(
                M(s.r2.ptr, d),
                M(s.atty.ptr, nq),
                self.px(o.o),
                (m, nq, d),
                true,
            )?;
            self.lora_forward(
                (l, LoraTarget::O),
                M(s.atty.ptr, nq),
                M(s.r2.ptr, d),
                &s.u,
                m,
            )?;
            self.rmsnorm_forward((s.h.ptr, s.rstd.ptr), s.r2.ptr, o.mlp_norm, m)?;
            self.linear(
                M(s.gate_up.ptr, 2 * f),
                M(s.h.ptr, d),
                self.px(o.gate_up),
                (m, d, 2 * f),
                false,
            )?;
            let up = s.gate_up.ptr + (f * x) as u64;
            for (target, y) in [(LoraTarget::Gate, s.gate_up.ptr), (LoraTarget::Up, up)] {
                self.lora_forward((l, target), M(s.h.ptr, d), M(y, 2 * f), &s.u, m)?;
            }
            self.gpu.launch1(
                &self.kernels.swiglu_forward,
                (m * f).div_ceil(8),
                &[
                    s.act.ptr.into(),
                    s.gate_up.ptr.into(),
                    (m as i32).into(),
                    (f as i32).into(),
                ],
            )?;
            self.gpu.copy(s.x.ptr, s.r2.ptr, m * d * x)?;
            self.linear(
                M(s.x.ptr, d),
                M(s.act.ptr, f),
                self.px(o.down),
                (m, f, d),
                true,
            )?;
            self.lora_forward(
                (l, LoraTarget::Down),
                M(s.act.ptr, f),
                M(s.x.ptr, d),
                &s.u,
                m,
            )?;
        }
        // The head on the last row only.
        let last = s.x.ptr + ((m - 1) * d * x) as u64;
        self.rmsnorm_forward((s.h.ptr, s.rstd.ptr), last, self.layout.norm, 1)?;
        self.linear(
            M(s.logits_x.ptr, v),
            M(s.h.ptr, d),
            self.px(self.layout.head),
            (1, d, v),
            false,
        )?;
        self.gpu.launch1(
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
        let master = match self.adapter.as_mut() {
            Some(ad) => &mut ad.master,
            None => &mut self.base,
        };
        master.adamw(&self.gpu, &self.kernels, opt, lr, &phase)
    }
}

impl Drop for LlamaCuda {
    fn drop(&mut self) {
        // Wait for queued work before its buffers are freed.
        let _ = self.gpu.sync();
        if let Some(p) = &self.profile {
            eprint!("{}", p.report());
        }
    }
}

impl Backend for LlamaCuda {
    fn architecture(&self) -> crate::Architecture {
        crate::Architecture::Llama(self.config)
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
        match (&self.frozen, &self.adapter) {
            (Some(base), Some(ad)) => {
                let mut out = Vec::with_capacity(base.len() + ad.master.len);
                out.extend_from_slice(base);
                out.extend(ad.master.download(&self.gpu));
                out
            }
            _ => self.base.download(&self.gpu),
        }
    }

    fn set_params(&mut self, params: &[f32]) -> Result<(), EngineError> {
        let base = self.layout.table().len();
        let want = base + self.adapter.as_ref().map_or(0, |ad| ad.master.len);
        if params.len() != want {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want,
            });
        }
        let (head, tail) = params.split_at(base);
        self.base.upload(&self.gpu, &self.kernels, head)?;
        if let Some(ad) = self.adapter.as_mut() {
            ad.master.upload(&self.gpu, &self.kernels, tail)?;
            self.frozen = Some(Arc::new(head.to_vec()));
        }
        Ok(())
    }

    fn trainable(&self) -> Vec<f32> {
        self.trained().download(&self.gpu)
    }

    fn set_trainable(&mut self, trainable: &[f32]) -> Result<(), EngineError> {
        let want = self.trained().len;
        if trainable.len() != want {
            return Err(EngineError::ParamCount {
                got: trainable.len(),
                want,
            });
        }
        let (gpu, kernels) = (&self.gpu, &self.kernels);
        let master = match self.adapter.as_mut() {
            Some(ad) => &mut ad.master,
            None => &mut self.base,
        };
        Ok(master.upload(gpu, kernels, trainable)?)
    }

    fn reset_optimizer(&mut self) {
        let gpu = &self.gpu;
        let master = match self.adapter.as_mut() {
            Some(ad) => &mut ad.master,
            None => &mut self.base,
        };
        let _ = master.reset_moments(gpu);
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
        Ok((loss, self.trained().download_grads(&self.gpu)?))
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
