//! hivetrain's training engine: GPT-2 and Llama decoders with hand-written forward and
//! backward passes.
//!
//! What goes in: a [`ModelSpec`] (or a [`GptConfig`]), a seed or a flat parameter
//! vector, and batches of token ids. What comes out: losses, trained parameters (one flat `f32` vector in the
//! order [`params`] documents), safetensors checkpoints with HF GPT-2 names, and
//! generated tokens.
//!
//! Every device implements [`Backend`]; callers (the CLI, the worker, benchmarks) hold a
//! `Box<dyn Backend>` from [`open_model`] (or [`open_backend`] for a GPT-2) and never
//! see device or architecture types. Two devices: the CPU, with a backend per
//! architecture ([`cpu::CpuBackend`] for GPT-2, [`llama::cpu::LlamaCpuBackend`]), and
//! NVIDIA GPUs ([`cuda`]: GPT-2 today, [`cuda::Gpt2Cuda`]), chosen by a device name
//! ([`resolve_device`]).

pub mod checkpoint;
mod class;
pub mod config;
pub mod cpu;
pub mod cuda;
mod ftz;
pub mod generate;
pub mod llama;
pub mod lora;
mod matmul;
mod ops;
pub mod optim;
pub mod params;
pub mod spec;
pub mod train;

pub use class::{CROSS_CLASS_REPLAY_TOLERANCE, GPU_CPU_REPLAY_TOLERANCE, cpu_class};
pub use config::{ConfigError, GptConfig, Preset};
pub use llama::{LlamaConfig, LlamaConfigError, LlamaLayout};
pub use lora::{LoraConfig, LoraConfigError, LoraLayout, LoraTarget};
pub use matmul::gram;
pub use optim::{LrSchedule, OptimizerConfig};
pub use params::{ParamLayout, TensorKind, TensorSpec};
pub use spec::{Architecture, ModelSpec, SpecError, Trainable};

/// A target that counts in no loss and no gradient: PyTorch's `ignore_index` (chat data
/// marks the prompt's tokens with it, so only the assistant's answers train).
pub const IGNORE_TARGET: u32 = u32::MAX;

/// A batch of `batch x seq` token windows, row-major; `targets` are `inputs` shifted by one,
/// or [`IGNORE_TARGET`]. The loss is the mean over the targets that count.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [u32],
    pub batch: usize,
    pub seq: usize,
}

/// What one optimizer step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy of the batch before the update, in nats per token.
    pub loss: f32,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f32,
}

/// Errors of the engine: all are caller mistakes that a caller can report as such.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    LlamaConfig(#[from] LlamaConfigError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(
        "batch shape {batch}x{seq} needs {want} tokens, got {inputs} inputs and {targets} targets"
    )]
    BatchShape {
        batch: usize,
        seq: usize,
        want: usize,
        inputs: usize,
        targets: usize,
    },
    #[error("sequence length {seq} is outside 1..={n_ctx} (the model's context)")]
    SequenceLength { seq: usize, n_ctx: usize },
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("parameter vector has {got} floats, the model has {want}")]
    ParamCount { got: usize, want: usize },
    #[error("generation reached the model's context of {n_ctx} tokens")]
    ContextFull { n_ctx: usize },
    #[error(
        "unknown device {0:?}: expected auto, cpu, cpu:N, cuda or cuda:N (N a thread count for cpu, a GPU number for cuda)"
    )]
    UnknownDevice(String),
    #[error(transparent)]
    Cuda(#[from] cuda::CudaError),
    #[error("this backend was opened for evaluation: it holds no gradients or optimizer state")]
    EvalOnly,
}

/// What a backend is opened for. Only a training backend allocates gradients and
/// AdamW's moments (three more vectors the size of the parameters); scoring, holdout
/// evaluation and serving run forward passes only. The forward pass is the same code
/// either way, so an evaluation backend's losses are bit-identical to a training
/// backend's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Forward, backward and optimizer steps.
    Train,
    /// Forward passes only: `eval_loss` and decoding. `train_step` and `loss_and_grad`
    /// answer [`EngineError::EvalOnly`].
    Eval,
}

/// The boundary between hivetrain and a device. Everything above it is device-free.
///
/// A backend owns the parameters, the gradients, the optimizer state and the KV cache
/// of one model, wherever they live.
///
/// Two vectors name what a backend holds. The *full* vector ([`Backend::params`]) is
/// every float of the model in [`ModelSpec::layout`] order: the whole model when every
/// tensor trains, and the frozen base followed by the adapter with LoRA. The
/// *trainable* vector ([`Backend::trainable`]) is what the optimizer updates and a delta
/// carries, in [`ModelSpec::trainable_tensors`] order: the same as the full vector when
/// every tensor trains, the adapter alone with LoRA. Callers that train use
/// `trainable`/`set_trainable` whatever the spec; `params` is for checkpoints and for
/// loading a whole model.
pub trait Backend: Send {
    /// The model's family and shape.
    fn architecture(&self) -> Architecture;
    /// A human-readable device description (`cpu (2 threads)`).
    fn device(&self) -> String;
    /// The full vector: all parameters, flat, in [`ModelSpec::layout`] order.
    fn params(&self) -> Vec<f32>;
    /// Replaces the full vector; the optimizer state is kept (call `reset_optimizer`).
    fn set_params(&mut self, params: &[f32]) -> Result<(), EngineError>;
    /// The trainable vector (see the trait's doc): `params()` when every tensor trains.
    fn trainable(&self) -> Vec<f32>;
    /// Replaces the trainable vector, the frozen part unchanged; the optimizer state is
    /// kept.
    fn set_trainable(&mut self, trainable: &[f32]) -> Result<(), EngineError>;
    /// Forgets AdamW's moments and step count.
    fn reset_optimizer(&mut self);
    /// One forward, backward and AdamW update at learning rate `lr`.
    fn train_step(
        &mut self,
        batch: &Batch<'_>,
        optimizer: &OptimizerConfig,
        lr: f32,
    ) -> Result<StepStats, EngineError>;
    /// Mean loss of a batch, parameters unchanged.
    fn eval_loss(&mut self, batch: &Batch<'_>) -> Result<f32, EngineError>;
    /// The loss and the gradient of the trainable vector for a batch, parameters
    /// unchanged (for checks).
    fn loss_and_grad(&mut self, batch: &Batch<'_>) -> Result<(f32, Vec<f32>), EngineError>;
    /// Clears the KV cache before a new generation.
    fn decode_reset(&mut self);
    /// Feeds one token at the next position; returns the logits for the position after.
    fn decode_step(&mut self, token: u32) -> Result<&[f32], EngineError>;
    /// Feeds `tokens` (at least one) at the next positions in one pass, each row's
    /// products as one matrix product rather than a row at a time; returns the logits
    /// for the position after the last. What a prompt goes in by: the same logits as
    /// `decode_step` token by token, up to f32 rounding (a product of many rows sums in
    /// gemm's tile order). Nothing is fed when the tokens do not all fit in the context
    /// ([`EngineError::ContextFull`]).
    fn decode_prefill(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError>;
}

/// Opens a training backend by device name (`cpu`, `cpu:4` for four threads).
pub fn open_backend(
    device: &str,
    config: GptConfig,
    params: Vec<f32>,
) -> Result<Box<dyn Backend>, EngineError> {
    open_model(
        device,
        &ModelSpec::gpt2("gpt2", config),
        params,
        Purpose::Train,
    )
}

/// Opens a backend of `spec`'s model on `device` for `purpose`, holding `params` (the
/// full parameter vector). What callers that run a spec'd model use: the device is a
/// setting, the architecture and the trainable layout come from the spec.
pub fn open_model(
    device: &str,
    spec: &ModelSpec,
    params: Vec<f32>,
    purpose: Purpose,
) -> Result<Box<dyn Backend>, EngineError> {
    let threads = match resolve_device(device)? {
        Device::Cpu { threads } => threads,
        Device::Cuda { ordinal } => return open_cuda(ordinal, spec, &params, purpose),
    };
    if let Trainable::Lora(_) = &spec.trainable {
        spec.validate()?;
        if params.len() != spec.n_params() {
            return Err(EngineError::ParamCount {
                got: params.len(),
                want: spec.n_params(),
            });
        }
        let mut base = params;
        let adapter = base.split_off(spec.n_params() - spec.trainable_len());
        return open_model_frozen(device, spec, std::sync::Arc::new(base), adapter, purpose);
    }
    Ok(match spec.architecture {
        Architecture::Gpt2(config) => {
            Box::new(cpu::CpuBackend::open(config, params, threads, purpose)?)
        }
        Architecture::Llama(config) => Box::new(llama::cpu::LlamaCpuBackend::open(
            config, params, threads, purpose,
        )?),
    })
}

/// [`open_model`] for a model whose vector is `frozen` followed by `trainable`: with a
/// LoRA adapter the backend shares `frozen` (the pretrained base) instead of copying it,
/// so a process holds its base once however many backends it opens; with every tensor
/// trained `frozen` is empty.
pub fn open_model_frozen(
    device: &str,
    spec: &ModelSpec,
    frozen: std::sync::Arc<Vec<f32>>,
    trainable: Vec<f32>,
    purpose: Purpose,
) -> Result<Box<dyn Backend>, EngineError> {
    if let Trainable::Lora(lora) = &spec.trainable {
        spec.validate()?;
        let Architecture::Llama(config) = spec.architecture else {
            unreachable!("validate accepts LoRA on a Llama only")
        };
        let threads = match resolve_device(device)? {
            Device::Cpu { threads } => threads,
            Device::Cuda { ordinal } => {
                return Ok(Box::new(cuda::LlamaCuda::open_lora(
                    config,
                    lora.clone(),
                    frozen,
                    &trainable,
                    ordinal,
                    purpose,
                )?));
            }
        };
        return Ok(Box::new(llama::cpu::LlamaCpuBackend::open_lora_shared(
            config,
            lora.clone(),
            frozen,
            trainable,
            threads,
            purpose,
        )?));
    }
    let params = if frozen.is_empty() {
        trainable
    } else {
        [&frozen[..], &trainable[..]].concat()
    };
    open_model(device, spec, params, purpose)
}

/// Bytes a CPU backend of `spec`'s model for `purpose` holds once it has run a
/// `batch x seq` batch ([`GptConfig::training_bytes`], [`GptConfig::eval_bytes`]): what
/// sizes a pool of backends by a memory budget without opening one to measure it.
pub fn backend_bytes(spec: &ModelSpec, purpose: Purpose, batch: usize, seq: usize) -> u64 {
    let lora = match &spec.trainable {
        Trainable::All => None,
        Trainable::Lora(lora) => Some(lora),
    };
    match (&spec.architecture, purpose) {
        (Architecture::Gpt2(config), Purpose::Train) => config.training_bytes(batch, seq),
        (Architecture::Gpt2(config), Purpose::Eval) => config.eval_bytes(batch, seq),
        (Architecture::Llama(config), purpose) => {
            llama::cpu::backend_bytes(config, lora, purpose, batch, seq)
        }
    }
}

/// Bytes of the frozen floats of `spec` (with LoRA the pretrained base; nothing when
/// every tensor trains): the part of [`backend_bytes`] that backends opened by
/// [`open_model_frozen`] share instead of each holding a copy.
pub fn frozen_bytes(spec: &ModelSpec) -> u64 {
    4 * (spec.n_params() - spec.trainable_len()) as u64
}

/// The CUDA backend for `spec`: GPT-2 with every tensor trained, in bf16.
fn open_cuda(
    ordinal: usize,
    spec: &ModelSpec,
    params: &[f32],
    purpose: Purpose,
) -> Result<Box<dyn Backend>, EngineError> {
    match (&spec.architecture, &spec.trainable) {
        (Architecture::Gpt2(config), Trainable::All) => Ok(Box::new(cuda::Gpt2Cuda::open(
            *config,
            params,
            ordinal,
            cuda::gpt2::Precision::Bf16,
            purpose,
        )?)),
        (Architecture::Llama(config), Trainable::All) => Ok(Box::new(cuda::LlamaCuda::open(
            *config, params, ordinal, purpose,
        )?)),
        (Architecture::Llama(config), Trainable::Lora(lora)) => {
            spec.validate()?;
            if params.len() != spec.n_params() {
                return Err(EngineError::ParamCount {
                    got: params.len(),
                    want: spec.n_params(),
                });
            }
            let (base, adapter) = params.split_at(spec.n_params() - spec.trainable_len());
            Ok(Box::new(cuda::LlamaCuda::open_lora(
                *config,
                lora.clone(),
                std::sync::Arc::new(base.to_vec()),
                adapter,
                ordinal,
                purpose,
            )?))
        }
        (Architecture::Gpt2(_), Trainable::Lora(_)) => {
            spec.validate()?;
            unreachable!("validate accepts LoRA on a Llama only")
        }
    }
}

/// Where a backend computes, once a device name is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU on `threads` threads.
    Cpu { threads: usize },
    /// NVIDIA GPU number `ordinal`, checked to work ([`cuda::probe`]).
    Cuda { ordinal: usize },
}

/// Resolves a device name: `cpu` (every core), `cpu:N` (N threads), `cuda` (GPU 0),
/// `cuda:N`, or `auto` (GPU 0 when it works, else every core). A GPU that cannot be
/// used is a [`cuda::CudaError`] saying why and what to do.
pub fn resolve_device(device: &str) -> Result<Device, EngineError> {
    let unknown = || EngineError::UnknownDevice(device.to_string());
    let number = |n: &str| n.parse::<usize>().map_err(|_| unknown());
    let cuda = |ordinal: usize| -> Result<Device, EngineError> {
        cuda::probe(ordinal)?;
        Ok(Device::Cuda { ordinal })
    };
    match device.split_once(':') {
        None if device == "auto" => Ok(match cuda::probe(0) {
            Ok(_) => Device::Cuda { ordinal: 0 },
            Err(_) => Device::Cpu {
                threads: default_threads(),
            },
        }),
        None if device == "cpu" => Ok(Device::Cpu {
            threads: default_threads(),
        }),
        None if device == "cuda" => cuda(0),
        Some(("cpu", n)) => match number(n)? {
            0 => Err(unknown()),
            threads => Ok(Device::Cpu { threads }),
        },
        Some(("cuda", n)) => cuda(number(n)?),
        _ => Err(unknown()),
    }
}

/// Checks a device name without opening anything that lasts (a GPU is probed).
pub fn check_device(device: &str) -> Result<(), EngineError> {
    resolve_device(device).map(|_| ())
}

/// The number of threads a `cpu` backend uses by default: the machine's cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Parameters initialized as GPT-2 does, from a seed (same seed, same bits, any machine).
pub fn init_params(config: &GptConfig, seed: u64) -> Result<Vec<f32>, EngineError> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    config.validate()?;
    let layout = ParamLayout::new(config);
    let mut params = vec![0.0f32; layout.len()];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let residual_std = 0.02 / ((2 * config.n_layer) as f32).sqrt();
    for spec in layout.tensors() {
        let slice = &mut params[spec.range()];
        let std = match spec.kind {
            TensorKind::Bias => {
                slice.fill(0.0);
                continue;
            }
            TensorKind::Gain => {
                slice.fill(1.0);
                continue;
            }
            TensorKind::Embedding | TensorKind::Matrix => 0.02,
            TensorKind::ResidualMatrix => residual_std,
        };
        let normal =
            rand_distr::Normal::new(0.0f32, std).map_err(|_| ConfigError::Zero(*config))?;
        for x in slice.iter_mut() {
            *x = normal.sample(&mut rng);
        }
    }
    Ok(params)
}
