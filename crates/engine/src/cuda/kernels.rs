//! What every model on the GPU shares: the compiled kernels (`kernels/models.cu`, one
//! module loaded once per backend), how a kernel is launched, and [`Master`]: the f32
//! master weights of what trains, their floatX copy, gradients, AdamW's moments and the
//! one-launch AdamW update with its fixed-order gradient norm.

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::blas::Elem;
use super::{CudaError, DeviceMem, Gpu};
use crate::OptimizerConfig;
use crate::params::ParamLayout;

/// The kernels compiled without HT_BF16 (everything f32).
pub(crate) const PTX_F32: &str = include_str!("../../kernels/models.f32.ptx");
/// The kernels compiled with HT_BF16.
pub(crate) const PTX_BF16: &str = include_str!("../../kernels/models.bf16.ptx");

/// Threads of a block for the element-wise and row kernels.
pub(crate) const THREADS: u32 = 256;
/// Rows a column-sum partial covers (gradients of biases and norm gains; `SUM_ROWS` in
/// models.cu), and the columns of one partial block and one final block.
pub(crate) const SUM_CHUNK: usize = 64;
pub(crate) const SUM_PARTIAL_COLS: usize = 64;
pub(crate) const SUM_FINAL_COLS: usize = 32;
/// Blocks of the gradient-norm reduction: fixed, so its order is too.
const NORM_BLOCKS: usize = 1024;

/// What the activations and matrix inputs are stored as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// bf16 activations and products with f32 accumulation: the speed path.
    Bf16,
    /// f32 everywhere (products without TF32): the same arithmetic as the CPU engine up
    /// to summation order, for checks.
    F32,
}

impl Precision {
    pub(crate) fn elem(self) -> Elem {
        match self {
            Precision::Bf16 => Elem::Bf16,
            Precision::F32 => Elem::F32,
        }
    }

    /// Bytes of one activation.
    pub(crate) fn size(self) -> usize {
        match self {
            Precision::Bf16 => 2,
            Precision::F32 => 4,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }
}

macro_rules! kernels {
    ($($name:ident),* $(,)?) => {
        /// Every kernel of one build of `models.cu`, from one loaded module.
        pub(crate) struct Kernels {
            $(pub(crate) $name: CudaFunction,)*
            /// The fused attention kernels (in the bf16 build only).
            pub(crate) flash: Option<Flash>,
        }
        impl Kernels {
            pub(crate) fn load(gpu: &Gpu, precision: Precision) -> Result<Kernels, CudaError> {
                let ptx = match precision {
                    Precision::Bf16 => PTX_BF16,
                    Precision::F32 => PTX_F32,
                };
                let module = gpu.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))?;
                let flash = match precision {
                    Precision::Bf16 => Some(Flash {
                        forward: module.load_function("flash_forward")?,
                        backward_sum: module.load_function("flash_backward_sum")?,
                        backward_kv: module.load_function("flash_backward_kv")?,
                        backward_q: module.load_function("flash_backward_q")?,
                    }),
                    Precision::F32 => None,
                };
                Ok(Kernels { $($name: module.load_function(stringify!($name))?,)* flash })
            }
        }
    };
}

kernels!(
    cast_to_x,
    encoder_forward,
    layernorm_forward,
    attn_permute,
    attn_unpermute,
    attn_softmax,
    gelu_forward,
    softmax_xent,
    gelu_backward,
    column_sum_partial,
    column_sum_final,
    layernorm_param_partial,
    layernorm_backward_input,
    attn_softmax_backward,
    attn_permute_backward,
    attn_unpermute_backward,
    wpe_backward,
    wte_backward,
    embed_forward,
    rmsnorm_forward,
    rmsnorm_backward_input,
    rmsnorm_param_partial,
    rope,
    decode_attention,
    cast_from_x,
    swiglu_forward,
    swiglu_backward,
    sum_squares_partial,
    adamw,
);

/// The fused attention kernels.
pub(crate) struct Flash {
    pub(crate) forward: CudaFunction,
    pub(crate) backward_sum: CudaFunction,
    pub(crate) backward_kv: CudaFunction,
    pub(crate) backward_q: CudaFunction,
}

/// The head size the fused attention kernels are built for (`FA_D` in models.cu).
pub const FLASH_HEAD_SIZE: usize = 64;
/// Rows a fused attention block takes (`FA_TILE`) and its threads (`FA_THREADS`).
pub(crate) const FLASH_TILE: usize = 64;
pub(crate) const FLASH_THREADS: u32 = 128;

/// The fused attention kernels' grid: query (or key) tiles, heads, batch rows.
pub(crate) fn flash_grid(t: usize, nh: usize, b: usize) -> (u32, u32, u32) {
    (t.div_ceil(FLASH_TILE) as u32, nh as u32, b as u32)
}

/// One kernel argument, as the kernel's C type: a pointer, `int`, `long` or `float`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    Int(i32),
    Long(i64),
    Float(f32),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::Ptr(v)
    }
}

impl From<i32> for Arg {
    fn from(v: i32) -> Arg {
        Arg::Int(v)
    }
}

impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::Long(v)
    }
}

impl From<f32> for Arg {
    fn from(v: f32) -> Arg {
        Arg::Float(v)
    }
}

impl Gpu {
    /// Launches `f` on the stream.
    pub(crate) fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        let mut builder = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(v) => builder.arg(v),
                Arg::Int(v) => builder.arg(v),
                Arg::Long(v) => builder.arg(v),
                Arg::Float(v) => builder.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every call site pushes arguments whose types and order match the
        // kernel's signature in models.cu (pointers as u64, `int` as i32, `long` as i64,
        // `float` as f32), and the pointers name live allocations large enough for the
        // shapes passed with them.
        unsafe { builder.launch(cfg) }?;
        Ok(())
    }

    /// Launches `f` over `n` threads, [`THREADS`] a block.
    pub(crate) fn launch1(
        &self,
        f: &CudaFunction,
        n: usize,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        let blocks = n.div_ceil(THREADS as usize) as u32;
        self.launch(f, (blocks.max(1), 1, 1), THREADS, args)
    }

    /// Launches `f` with one warp a row over `rows` rows.
    pub(crate) fn launch_rows(
        &self,
        f: &CudaFunction,
        rows: usize,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        let per_block = THREADS as usize / 32;
        let blocks = rows.div_ceil(per_block) as u32;
        self.launch(f, (blocks.max(1), 1, 1), THREADS, args)
    }
}

/// What trains, on the GPU: the f32 master weights, their floatX copy the products read
/// (none in f32, which reads the master), and for training the gradients and AdamW's
/// moments, with AdamW's table of tensors (where each ends, whether it decays).
pub(crate) struct Master {
    pub(crate) len: usize,
    pub(crate) params: DeviceMem,
    params_x: Option<DeviceMem>,
    pub(crate) grads: Option<DeviceMem>,
    adam_m: Option<DeviceMem>,
    adam_v: Option<DeviceMem>,
    norm_partial: DeviceMem,
    tensor_ends: DeviceMem,
    tensor_decays: DeviceMem,
    tensors: usize,
    step: u32,
}

impl Master {
    /// A set laid out as `table`, holding `params`; gradients and moments when `train`.
    pub(crate) fn new(
        gpu: &Gpu,
        kernels: &Kernels,
        table: &ParamLayout,
        params: &[f32],
        precision: Precision,
        train: bool,
    ) -> Result<Master, CudaError> {
        let len = table.len();
        let opt = |on: bool| -> Result<Option<DeviceMem>, CudaError> {
            on.then(|| gpu.alloc(len * 4)).transpose()
        };
        let tensors = table.tensors().len();
        let mut master = Master {
            len,
            params: gpu.alloc(len * 4)?,
            params_x: match precision {
                Precision::Bf16 => Some(gpu.alloc(len * 2)?),
                Precision::F32 => None,
            },
            grads: opt(train)?,
            adam_m: opt(train)?,
            adam_v: opt(train)?,
            norm_partial: gpu.alloc(NORM_BLOCKS * 8)?,
            tensor_ends: gpu.alloc(tensors * 8)?,
            tensor_decays: gpu.alloc(tensors * 4)?,
            tensors,
            step: 0,
        };
        let ends: Vec<i64> = table
            .tensors()
            .iter()
            .map(|t| (t.offset + t.len()) as i64)
            .collect();
        let decays: Vec<i32> = table
            .tensors()
            .iter()
            .map(|t| i32::from(t.kind.decays()))
            .collect();
        debug_assert!(ends.windows(2).all(|w| w[0] <= w[1]), "tensors in order");
        gpu.upload(&master.tensor_ends, 0, &ends)?;
        gpu.upload(&master.tensor_decays, 0, &decays)?;
        master.upload(gpu, kernels, params)?;
        master.reset_moments(gpu)?;
        Ok(master)
    }

    pub(crate) fn reset_moments(&mut self, gpu: &Gpu) -> Result<(), CudaError> {
        for m in [&self.adam_m, &self.adam_v].into_iter().flatten() {
            gpu.zero(m)?;
        }
        self.step = 0;
        gpu.sync()
    }

    /// Replaces the weights (`params.len()` is `len`, checked by the caller).
    pub(crate) fn upload(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        params: &[f32],
    ) -> Result<(), CudaError> {
        gpu.upload(&self.params, 0, params)?;
        if let Some(px) = &self.params_x {
            let n = params.len() as i64;
            gpu.launch1(
                &kernels.cast_to_x,
                n as usize,
                &[px.ptr.into(), self.params.ptr.into(), n.into()],
            )?;
        }
        gpu.sync()
    }

    /// The weights; a failed copy from a GPU that worked a moment ago is a broken
    /// device, and the callers' traits have no error there, so it reads as NaN, which
    /// every validator refuses.
    pub(crate) fn download(&self, gpu: &Gpu) -> Vec<f32> {
        let mut out = vec![0.0f32; self.len];
        if gpu.download(&mut out, &self.params, 0).is_err() {
            out.fill(f32::NAN);
        }
        out
    }

    /// The gradients (zeros for a set that does not train).
    pub(crate) fn download_grads(&self, gpu: &Gpu) -> Result<Vec<f32>, CudaError> {
        let mut grads = vec![0.0f32; self.len];
        if let Some(g) = &self.grads {
            gpu.download(&mut grads, g, 0)?;
        }
        Ok(grads)
    }

    /// The pointer the products read tensor `offset` from.
    pub(crate) fn px(&self, offset: usize) -> u64 {
        match &self.params_x {
            Some(px) => px.ptr + (offset * 2) as u64,
            None => self.params.ptr + (offset * 4) as u64,
        }
    }

    /// The pointer of tensor `offset`'s gradient (f32); 0 without gradients.
    pub(crate) fn grad(&self, offset: usize) -> u64 {
        self.grads
            .as_ref()
            .map_or(0, |g| g.ptr + (offset * 4) as u64)
    }

    /// The global gradient norm (f64 partials in a fixed order, summed on the host).
    fn grad_norm(&self, gpu: &Gpu, kernels: &Kernels) -> Result<f32, CudaError> {
        let Some(grads) = &self.grads else {
            unreachable!("a training backend has gradients")
        };
        let n = self.len as i64;
        gpu.launch(
            &kernels.sum_squares_partial,
            (NORM_BLOCKS as u32, 1, 1),
            THREADS,
            &[self.norm_partial.ptr.into(), grads.ptr.into(), n.into()],
        )?;
        let mut partial = vec![0.0f64; NORM_BLOCKS];
        gpu.download(&mut partial, &self.norm_partial, 0)?;
        Ok(partial.iter().sum::<f64>().sqrt() as f32)
    }

    /// Clips and applies one AdamW update, as `ops::adamw` does; returns the pre-clip
    /// norm. `phase` marks the profile.
    pub(crate) fn adamw(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        opt: &OptimizerConfig,
        lr: f32,
        phase: &dyn Fn(&'static str) -> Result<(), CudaError>,
    ) -> Result<f32, CudaError> {
        phase("grad norm")?;
        let norm = self.grad_norm(gpu, kernels)?;
        phase("adamw")?;
        let clip = if opt.grad_clip > 0.0 && norm > opt.grad_clip {
            opt.grad_clip / (norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        let step = self.step as i32;
        let bc1 = 1.0 - opt.beta1.powi(step);
        let bc2_sqrt = (1.0 - opt.beta2.powi(step)).sqrt();
        let step_size = lr / bc1;
        let (Some(grads), Some(m), Some(v)) = (&self.grads, &self.adam_m, &self.adam_v) else {
            unreachable!("a training backend has gradients and moments")
        };
        let decay = 1.0 - lr * opt.weight_decay;
        let (tensors, n) = (self.tensors as i32, self.len as i64);
        gpu.launch1(
            &kernels.adamw,
            self.len,
            &[
                self.params.ptr.into(),
                self.px(0).into(),
                grads.ptr.into(),
                m.ptr.into(),
                v.ptr.into(),
                self.tensor_ends.ptr.into(),
                self.tensor_decays.ptr.into(),
                tensors.into(),
                n.into(),
                opt.beta1.into(),
                opt.beta2.into(),
                opt.eps.into(),
                decay.into(),
                step_size.into(),
                bc2_sqrt.into(),
                clip.into(),
            ],
        )?;
        Ok(norm)
    }
}
