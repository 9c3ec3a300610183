//! Export for PyTorch: a LoRA adapter as a PEFT adapter directory (and back), and a base
//! Llama, with or without an adapter merged in, as an HF `LlamaForCausalLM` directory.
//!
//! ```text
//! PEFT dir          adapter_config.json        peft's LoraConfig (r, lora_alpha, target_modules, ...)
//!                   adapter_model.safetensors  engine::checkpoint::trained_to_bytes: PEFT names, f32
//! merged HF dir     config.json, model.safetensors (HF names, f32), tokenizer.json,
//!                   tokenizer_config.json (chat template, bos/eos/pad), generation_config.json
//! ```
//!
//! The engine's parameters are in HF's layout already: the GGUF loader un-permutes the
//! rotary rows of q and k ([`crate::llama::unpermute_rows`]), so the merged weights are
//! written as they are, and an adapter's `A`/`B` act on the same rows as PEFT's.
//!
//! Every directory is written into a temporary sibling and renamed into place, so a
//! failure leaves nothing half-written; an existing directory is replaced only if it
//! holds nothing but the files this module writes.
//!
//! **Architecture Invariant:** reading an adapter checks everything (config keys, target
//! modules, every tensor's presence, dtype and shape, no extra tensors) before it returns;
//! nothing here panics on a file's contents.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use engine::checkpoint::{
    CheckpointError, SPEC_METADATA_KEY, trained_from_bytes, trained_to_bytes,
};
use engine::lora::{LoraConfig, LoraLayout, LoraTarget};
use engine::{Architecture, LlamaConfig, ModelSpec, Trainable};
use safetensors::{Dtype, SafeTensors};
use sha2::Digest;

use crate::Pretrained;

/// Metadata key of an adapter file: the sha256 (hex) of the base model file it was
/// trained on.
pub const BASE_SHA256_METADATA_KEY: &str = "hivetrain.base_sha256";
/// Metadata key of an adapter file: the run's version it holds.
pub const VERSION_METADATA_KEY: &str = "hivetrain.version";
/// A PEFT directory's config file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// A PEFT directory's weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Largest `adapter_config.json` read (PEFT's is about 1.5 KB).
pub const ADAPTER_CONFIG_BYTES_MAX: u64 = 1 << 20;
/// Largest adapter weights file read: 1 GiB (a rank-64 adapter on every projection of
/// SmolLM2-135M is 78 MB in f32).
pub const ADAPTER_BYTES_MAX: u64 = 1 << 30;

/// The files a PEFT adapter directory holds.
const PEFT_FILES: [&str; 2] = [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE];
/// The files a merged HF directory holds.
const HF_FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// Why an adapter or a model could not be read or exported. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {bytes} bytes, more than the {max} this reader takes", .path.display())]
    TooLarge { path: PathBuf, bytes: u64, max: u64 },
    #[error("{}: {what}", .path.display())]
    Malformed { path: PathBuf, what: String },
    #[error("{}: unsupported adapter: {what}", .path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("{}: tensor {name} is missing", .path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor {name} is not part of this adapter (rank, targets and base shape say which are)", .path.display())]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{}: tensor {name} has shape {got:?}; the adapter config on this base needs {want:?}", .path.display())]
    Shape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error(
        "{}: the adapter was trained on a base with sha256 {adapter}, but the base given has sha256 {base}",
        .path.display()
    )]
    WrongBase {
        path: PathBuf,
        adapter: String,
        base: String,
    },
    #[error("{}: {what}", .path.display())]
    Output { path: PathBuf, what: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl ExportError {
    fn io(path: &Path, source: std::io::Error) -> ExportError {
        ExportError::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn malformed(path: &Path, what: impl Into<String>) -> ExportError {
        ExportError::Malformed {
            path: path.to_owned(),
            what: what.into(),
        }
    }

    fn unsupported(path: &Path, what: impl Into<String>) -> ExportError {
        ExportError::Unsupported {
            path: path.to_owned(),
            what: what.into(),
        }
    }
}

/// A LoRA adapter for a base Llama, read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub lora: LoraConfig,
    /// The `A` and `B` matrices in [`LoraLayout`] order.
    pub tensors: Vec<f32>,
    /// The sha256 (hex) of the base model file, if the file records it.
    pub base_sha256: Option<String>,
    /// The run's version it holds, if the file records it.
    pub version: Option<u64>,
}

impl Adapter {
    /// Refuses an adapter that records a base other than the one whose file has sha256
    /// `base_sha256`; `path` names the adapter in the error. An adapter that records no
    /// base passes.
    pub fn check_base(&self, path: &Path, base_sha256: &str) -> Result<(), ExportError> {
        match &self.base_sha256 {
            Some(h) if !h.eq_ignore_ascii_case(base_sha256) => Err(ExportError::WrongBase {
                path: path.to_owned(),
                adapter: h.clone(),
                base: base_sha256.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// The metadata written beside the tensors.
    fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        if let Some(h) = &self.base_sha256 {
            m.insert(BASE_SHA256_METADATA_KEY.to_owned(), h.clone());
        }
        if let Some(v) = self.version {
            m.insert(VERSION_METADATA_KEY.to_owned(), v.to_string());
        }
        m
    }
}

/// PEFT's module name of a target (`q_proj`).
pub fn peft_module(target: LoraTarget) -> &'static str {
    let module = target.module();
    module.rsplit('.').next().unwrap_or(module)
}

/// The target of PEFT's module name `name` (`q_proj`, or a dotted path ending in it).
pub fn target_of_module(name: &str) -> Option<LoraTarget> {
    let last = name.rsplit('.').next().unwrap_or(name);
    LoraTarget::ALL
        .into_iter()
        .find(|t| peft_module(*t) == last)
}

/// The sha256 (hex) of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String, ExportError> {
    let mut file = std::fs::File::open(path).map_err(|e| ExportError::io(path, e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| ExportError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The file whose sha256 names a base model: a GGUF file itself, or an HF directory's
/// `model.safetensors`.
pub fn base_weights_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_owned()
    }
}

/// Reads at most `max` bytes of `path`, refusing a larger file.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ExportError> {
    let file = std::fs::File::open(path).map_err(|e| ExportError::io(path, e))?;
    let len = file.metadata().map_err(|e| ExportError::io(path, e))?.len();
    if len > max {
        return Err(ExportError::TooLarge {
            path: path.to_owned(),
            bytes: len,
            max,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ExportError::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(ExportError::TooLarge {
            path: path.to_owned(),
            bytes: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

/// The spec an adapter on `base` is written under (the base's shape; the name only
/// labels it).
fn adapter_spec(name: &str, base: &LlamaConfig, lora: &LoraConfig) -> ModelSpec {
    ModelSpec::llama_lora(name, *base, lora.clone())
}

/// Whether two Llama shapes are the same network (the context length only sizes caches).
fn same_shape(a: &LlamaConfig, b: &LlamaConfig) -> bool {
    LlamaConfig { max_seq: 0, ..*a } == LlamaConfig { max_seq: 0, ..*b }
}

/// Reads an adapter file hivetrain wrote ([`trained_to_bytes`] of a LoRA spec: PEFT's
/// tensors with the spec in the metadata), for a base of shape `base`.
pub fn read_adapter_file(path: &Path, base: &LlamaConfig) -> Result<Adapter, ExportError> {
    let bytes = read_bounded(path, ADAPTER_BYTES_MAX)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| ExportError::malformed(path, format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let json = metadata.get(SPEC_METADATA_KEY).ok_or_else(|| {
        ExportError::malformed(
            path,
            format!(
                "no {SPEC_METADATA_KEY} in its metadata, so not an adapter hivetrain wrote; give a PEFT directory (with {ADAPTER_CONFIG_FILE}) instead"
            ),
        )
    })?;
    let spec: ModelSpec = serde_json::from_str(json)
        .map_err(|e| ExportError::malformed(path, format!("{SPEC_METADATA_KEY}: {e}")))?;
    let (config, lora) = match (&spec.architecture, &spec.trainable) {
        (Architecture::Llama(c), Trainable::Lora(l)) => (*c, l.clone()),
        _ => {
            return Err(ExportError::unsupported(
                path,
                format!(
                    "it holds model {} ({} with every tensor trained), not a LoRA adapter",
                    spec.id(),
                    spec.architecture.family()
                ),
            ));
        }
    };
    if !same_shape(&config, base) {
        return Err(ExportError::malformed(
            path,
            format!("the adapter is for a Llama of shape {config:?}, the base is {base:?}"),
        ));
    }
    let trained = trained_from_bytes(path, &bytes, &spec)?;
    let base_sha256 = trained.metadata.get(BASE_SHA256_METADATA_KEY).cloned();
    let version = match trained.metadata.get(VERSION_METADATA_KEY) {
        Some(v) => Some(v.parse::<u64>().map_err(|e| {
            ExportError::malformed(path, format!("{VERSION_METADATA_KEY} {v:?}: {e}"))
        })?),
        None => None,
    };
    Ok(Adapter {
        lora,
        tensors: trained.trainable,
        base_sha256,
        version,
    })
}

/// The `adapter_config.json` PEFT's `LoraConfig` writes for `lora` (peft 0.21's keys; the
/// ones that do not apply are at their defaults).
pub fn peft_adapter_config(lora: &LoraConfig, base_model_name_or_path: &str) -> serde_json::Value {
    let mut modules: Vec<&str> = lora.targets.iter().map(|t| peft_module(*t)).collect();
    modules.sort_unstable();
    serde_json::json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": lora.alpha,
        "lora_bias": false,
        "lora_dropout": 0.0,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": lora.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": modules,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": null,
        "use_dora": false,
        "use_rslora": false,
    })
}

/// The bytes of a PEFT `adapter_model.safetensors` of `adapter` on a base of shape
/// `base` named `name`: [`trained_to_bytes`] of the LoRA spec, with the adapter's base
/// hash and version in the metadata.
pub fn adapter_bytes(
    name: &str,
    base: &LlamaConfig,
    adapter: &Adapter,
) -> Result<Vec<u8>, ExportError> {
    let spec = adapter_spec(name, base, &adapter.lora);
    trained_to_bytes(&spec, &adapter.tensors, &adapter.metadata())
        .map_err(|what| ExportError::malformed(Path::new(ADAPTER_WEIGHTS_FILE), what))
}

/// Writes the PEFT adapter directory `dir`: `adapter_config.json` and
/// `adapter_model.safetensors` of `adapter` on `base` (`base_model_name_or_path` goes
/// into the config; `name` labels the spec in the weights' metadata).
pub fn write_peft_dir(
    dir: &Path,
    name: &str,
    base: &LlamaConfig,
    adapter: &Adapter,
    base_model_name_or_path: &str,
) -> Result<(), ExportError> {
    let lora_error = |e: engine::lora::LoraConfigError| {
        ExportError::malformed(&dir.join(ADAPTER_CONFIG_FILE), e.to_string())
    };
    adapter.lora.validate(base).map_err(lora_error)?;
    let config = peft_adapter_config(&adapter.lora, base_model_name_or_path);
    let weights = adapter_bytes(name, base, adapter)?;
    write_dir_atomic(dir, &PEFT_FILES, |tmp| {
        write_file(&tmp.join(ADAPTER_CONFIG_FILE), &pretty(&config)?)?;
        write_file(&tmp.join(ADAPTER_WEIGHTS_FILE), &weights)
    })
}

/// A bool key of `adapter_config.json` that must be absent, null or `want`.
fn require_flag(
    path: &Path,
    config: &serde_json::Value,
    key: &str,
    want: bool,
) -> Result<(), ExportError> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::Bool(b)) if *b == want => Ok(()),
        Some(other) => Err(ExportError::unsupported(
            path,
            format!("{key} is {other}; hivetrain's adapters have {want}"),
        )),
    }
}

/// A key of `adapter_config.json` that must be absent, null, or empty.
fn require_empty(path: &Path, config: &serde_json::Value, key: &str) -> Result<(), ExportError> {
    let empty = match config.get(key) {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Object(o)) => o.is_empty(),
        Some(serde_json::Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    };
    if empty {
        Ok(())
    } else {
        Err(ExportError::unsupported(
            path,
            format!("{key} is set; hivetrain's adapters have one rank, one alpha and every layer"),
        ))
    }
}

/// The [`LoraConfig`] of a PEFT `adapter_config.json`, refusing what hivetrain's LoRA
/// does not compute (DoRA, rsLoRA, per-module ranks, biases, extra trained modules).
pub fn parse_peft_config(path: &Path, text: &str) -> Result<LoraConfig, ExportError> {
    let config: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ExportError::malformed(path, format!("not JSON: {e}")))?;
    if !config.is_object() {
        return Err(ExportError::malformed(path, "not a JSON object"));
    }
    match config.get("peft_type").and_then(|v| v.as_str()) {
        Some("LORA") => {}
        Some(other) => {
            return Err(ExportError::unsupported(
                path,
                format!("peft_type {other:?}; hivetrain reads \"LORA\""),
            ));
        }
        None => return Err(ExportError::malformed(path, "peft_type is missing")),
    }
    let rank = match config.get("r") {
        Some(v) => v
            .as_u64()
            .filter(|r| (1..=1 << 16).contains(r))
            .ok_or_else(|| {
                ExportError::malformed(path, format!("r is {v}, not a rank from 1 to 65536"))
            })? as usize,
        None => return Err(ExportError::malformed(path, "r (the rank) is missing")),
    };
    let alpha = match config.get("lora_alpha") {
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite() && *a > 0.0)
            .ok_or_else(|| {
                ExportError::malformed(path, format!("lora_alpha is {v}, not a positive number"))
            })?,
        None => return Err(ExportError::malformed(path, "lora_alpha is missing")),
    };
    let modules: Vec<&str> = match config.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|m| {
                m.as_str().ok_or_else(|| {
                    ExportError::malformed(path, format!("target_modules holds {m}, not a name"))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(serde_json::Value::String(s)) => {
            return Err(ExportError::unsupported(
                path,
                format!(
                    "target_modules is the pattern {s:?}; hivetrain reads a list of module names"
                ),
            ));
        }
        _ => return Err(ExportError::malformed(path, "target_modules is missing")),
    };
    let mut targets = Vec::with_capacity(modules.len());
    for m in &modules {
        let target = target_of_module(m).ok_or_else(|| {
            ExportError::unsupported(
                path,
                format!(
                    "target module {m:?}; hivetrain's LoRA targets {}",
                    LoraTarget::ALL.map(peft_module).join(", ")
                ),
            )
        })?;
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    match config.get("bias").and_then(|b| b.as_str()) {
        None | Some("none") => {}
        Some(other) => {
            return Err(ExportError::unsupported(
                path,
                format!("bias {other:?}; hivetrain's adapters have none"),
            ));
        }
    }
    require_flag(path, &config, "use_dora", false)?;
    require_flag(path, &config, "use_rslora", false)?;
    require_flag(path, &config, "fan_in_fan_out", false)?;
    require_flag(path, &config, "lora_bias", false)?;
    for key in [
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "layers_to_transform",
        "layer_replication",
        "trainable_token_indices",
        "target_parameters",
    ] {
        require_empty(path, &config, key)?;
    }
    Ok(LoraConfig {
        rank,
        alpha,
        targets,
    })
}

/// Reads the PEFT adapter directory `dir` for a base of shape `base`: refuses an
/// unsupported config, missing, extra or misshapen tensors, and truncated files.
/// Tensors may be F32, F16 or BF16 (PEFT saves in the model's dtype).
pub fn read_peft_dir(dir: &Path, base: &LlamaConfig) -> Result<Adapter, ExportError> {
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = read_bounded(&config_path, ADAPTER_CONFIG_BYTES_MAX)?;
    let text = String::from_utf8(text)
        .map_err(|_| ExportError::malformed(&config_path, "not UTF-8 text"))?;
    let lora = parse_peft_config(&config_path, &text)?;
    lora.validate(base)
        .map_err(|e| ExportError::malformed(&config_path, e.to_string()))?;

    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let bytes = read_bounded(&path, ADAPTER_BYTES_MAX)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| ExportError::malformed(&path, format!("not a valid safetensors file: {e}")))?;
    let metadata: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| ExportError::malformed(&path, format!("not a valid safetensors file: {e}")))?;
    let layout = LoraLayout::new(base, &lora);
    let mut out = vec![0.0f32; layout.table().len()];
    for spec in layout.table().tensors() {
        let view = tensors
            .tensor(&spec.name)
            .map_err(|_| ExportError::MissingTensor {
                path: path.clone(),
                name: spec.name.clone(),
            })?;
        if view.shape() != spec.shape.as_slice() {
            return Err(ExportError::Shape {
                path: path.clone(),
                name: spec.name.clone(),
                got: view.shape().to_vec(),
                want: spec.shape.clone(),
            });
        }
        let ty = match view.dtype() {
            Dtype::F32 => crate::quant::GgmlType::F32,
            Dtype::F16 => crate::quant::GgmlType::F16,
            Dtype::BF16 => crate::quant::GgmlType::Bf16,
            other => {
                return Err(ExportError::unsupported(
                    &path,
                    format!(
                        "tensor {} is {other:?}; this reader takes F32, F16 and BF16",
                        spec.name
                    ),
                ));
            }
        };
        // safetensors checked that the data's length fits the shape and dtype.
        crate::quant::dequantize(ty, view.data(), &mut out[spec.range()]);
    }
    if tensors.len() != layout.table().tensors().len() {
        let mut names = tensors.names();
        names.sort_unstable();
        if let Some(extra) = names
            .into_iter()
            .find(|n| !layout.table().tensors().iter().any(|t| &t.name == n))
        {
            return Err(ExportError::UnexpectedTensor {
                path,
                name: extra.to_owned(),
            });
        }
    }
    let version = match metadata.get(VERSION_METADATA_KEY) {
        Some(v) => Some(v.parse::<u64>().map_err(|e| {
            ExportError::malformed(&path, format!("{VERSION_METADATA_KEY} {v:?}: {e}"))
        })?),
        None => None,
    };
    Ok(Adapter {
        lora,
        tensors: out,
        base_sha256: metadata.get(BASE_SHA256_METADATA_KEY).cloned(),
        version,
    })
}

/// HF's `config.json` of a `LlamaForCausalLM` of shape `c`, float32.
pub fn hf_config_json(
    c: &LlamaConfig,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden,
        "intermediate_size": c.intermediate,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq,
        "rope_theta": c.rope_theta,
        "rope_scaling": null,
        "rms_norm_eps": c.rms_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": true,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    })
}

/// Writes the HF `LlamaForCausalLM` directory `dir` of `base` with `adapter` merged in
/// (`W + (alpha / rank) B A`, [`engine::lora::merge`]), or of the base itself without
/// one. The context length written is the base's `max_seq` as loaded.
pub fn write_hf_dir(
    dir: &Path,
    base: &Pretrained,
    adapter: Option<&Adapter>,
) -> Result<(), ExportError> {
    let c = &base.config;
    let merged;
    let params: &[f32] = match adapter {
        Some(a) => {
            a.lora
                .validate(c)
                .map_err(|e| ExportError::malformed(&base.path, e.to_string()))?;
            if a.tensors.len() != a.lora.n_params(c) || base.params.len() != c.n_params() {
                return Err(ExportError::malformed(
                    &base.path,
                    format!(
                        "the adapter has {} floats and the base {}; the shapes need {} and {}",
                        a.tensors.len(),
                        base.params.len(),
                        a.lora.n_params(c),
                        c.n_params()
                    ),
                ));
            }
            merged = engine::lora::merge(c, &a.lora, &base.params, &a.tensors);
            &merged
        }
        None => &base.params,
    };
    let mut extra = HashMap::new();
    if let Some(a) = adapter {
        extra.extend(a.metadata());
    }
    let weights = trained_to_bytes(&ModelSpec::llama(&base.name, *c), params, &extra)
        .map_err(|what| ExportError::malformed(&base.path, what))?;
    let token = |id: Option<u32>| id.and_then(|id| base.tokenizer.id_to_token(id));
    let (bos, eos) = (token(base.bos_token_id), token(base.eos_token_id));
    let mut tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": c.max_seq,
        "add_bos_token": base.add_bos,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": null,
    });
    if let Some(t) = &base.chat_template {
        tokenizer_config["chat_template"] = t.source().into();
    }
    let generation_config = serde_json::json!({
        "bos_token_id": base.bos_token_id,
        "eos_token_id": base.eos_token_id,
        "pad_token_id": base.eos_token_id,
    });
    let config = hf_config_json(c, base.bos_token_id, base.eos_token_id);
    write_dir_atomic(dir, &HF_FILES, |tmp| {
        write_file(&tmp.join("config.json"), &pretty(&config)?)?;
        write_file(&tmp.join("model.safetensors"), &weights)?;
        let tokenizer_path = tmp.join("tokenizer.json");
        base.tokenizer
            .save(&tokenizer_path, false)
            .map_err(|e| ExportError::malformed(&tokenizer_path, e.to_string()))?;
        write_file(
            &tmp.join("tokenizer_config.json"),
            &pretty(&tokenizer_config)?,
        )?;
        write_file(
            &tmp.join("generation_config.json"),
            &pretty(&generation_config)?,
        )
    })
}

fn pretty(value: &serde_json::Value) -> Result<Vec<u8>, ExportError> {
    let mut text = serde_json::to_vec_pretty(value)
        .map_err(|e| ExportError::malformed(Path::new("json"), e.to_string()))?;
    text.push(b'\n');
    Ok(text)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(|e| ExportError::io(path, e))?;
    file.write_all(bytes)
        .map_err(|e| ExportError::io(path, e))?;
    file.sync_all().map_err(|e| ExportError::io(path, e))
}

/// Fills a fresh temporary sibling of `dir` with `fill`, then renames it to `dir`. An
/// existing `dir` is replaced only if it holds nothing but `files` (a previous export);
/// otherwise nothing is written. On any failure the temporary directory is removed.
pub(crate) fn write_dir_atomic(
    dir: &Path,
    files: &[&str],
    fill: impl FnOnce(&Path) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let output = |what: String| ExportError::Output {
        path: dir.to_owned(),
        what,
    };
    let name = dir
        .file_name()
        .ok_or_else(|| output("not a directory name to write".into()))?
        .to_string_lossy()
        .into_owned();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let existing = match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut foreign = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| ExportError::io(dir, e))?;
                let file = entry.file_name().to_string_lossy().into_owned();
                if !files.contains(&file.as_str()) {
                    foreign.push(file);
                }
            }
            if !foreign.is_empty() {
                foreign.sort();
                return Err(output(format!(
                    "exists and holds other files ({}); give a new or empty directory, or one this command wrote",
                    foreign.join(", ")
                )));
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(ExportError::io(dir, e)),
    };
    std::fs::create_dir_all(parent).map_err(|e| ExportError::io(parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|()| {
        if existing {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(dir, &old).map_err(|e| ExportError::io(dir, e))?;
            std::fs::rename(&tmp, dir).map_err(|e| ExportError::io(dir, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| ExportError::io(&old, e))
        } else {
            std::fs::rename(&tmp, dir).map_err(|e| ExportError::io(dir, e))
        }
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// A base and its adapter as the engine runs them: [`ModelSpec::llama_lora`] and the full
/// parameter vector (the base's `params`, then the adapter), for `engine::open_model`.
pub fn with_adapter(
    name: &str,
    config: &LlamaConfig,
    mut params: Vec<f32>,
    adapter: &Adapter,
) -> (ModelSpec, Vec<f32>) {
    params.extend_from_slice(&adapter.tensors);
    (adapter_spec(name, config, &adapter.lora), params)
}

/// A deterministic non-zero adapter, for checks that need one to change a model's output:
/// each `A` as PEFT initializes it ([`engine::lora::init_adapter`] with `seed`), each `B`
/// from U(-b, b) drawn from stream 2 of a ChaCha8 generator seeded with `seed`.
/// (`cargo xtask random-adapter` writes one; scripts/check_peft_export.py uses it.)
pub fn random_adapter_tensors(
    config: &LlamaConfig,
    lora: &LoraConfig,
    seed: u64,
    b: f32,
) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut tensors = engine::lora::init_adapter(config, lora, seed);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(2);
    for t in LoraLayout::new(config, lora).table().tensors() {
        if t.name.ends_with("lora_B.weight") {
            for x in &mut tensors[t.range()] {
                *x = b * (rng.random::<f32>() * 2.0 - 1.0);
            }
        }
    }
    tensors
}
