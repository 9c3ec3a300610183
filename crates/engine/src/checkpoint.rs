//! Checkpoints as safetensors with HF GPT-2 tensor names, and export for HF transformers.
//!
//! A hivetrain checkpoint is a plain `model.safetensors` that HF's `GPT2LMHeadModel`
//! loads; hivetrain's own config travels in the file's metadata under
//! [`CONFIG_METADATA_KEY`], with any other string metadata the caller adds.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::{GptConfig, ParamLayout};

/// Metadata key holding the model's [`GptConfig`] as JSON.
pub const CONFIG_METADATA_KEY: &str = "hivetrain.config";

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "{path} has no hivetrain config in its metadata (key {CONFIG_METADATA_KEY}); was it written by hivetrain?"
    )]
    NoConfig { path: PathBuf },
    #[error("{path}: the config in its metadata is invalid: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("{path} lacks tensor {name}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {got:?}, the config needs {want:?}")]
    Shape {
        path: PathBuf,
        name: String,
        want: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: tensor {name} is {got:?}, expected F32")]
    Dtype {
        path: PathBuf,
        name: String,
        got: Dtype,
    },
    #[error("cannot serialize a checkpoint for {path}: {message}")]
    Serialize { path: PathBuf, message: String },
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub config: GptConfig,
    pub params: Vec<f32>,
    pub metadata: HashMap<String, String>,
}

/// Serializes parameters to safetensors bytes, with the config and `extra` as metadata.
///
/// The bytes depend only on the arguments: the metadata is written in key order. (The
/// `safetensors` crate, 0.8, writes its metadata from a `HashMap` in that map's random
/// iteration order, so the same checkpoint got another hash in every process; the
/// header is therefore written here, in the crate's layout otherwise: tensors in name
/// order, each `{"dtype", "shape", "data_offsets"}`, the header padded with spaces to a
/// multiple of 8 bytes.)
pub fn to_bytes(
    config: &GptConfig,
    params: &[f32],
    extra: &HashMap<String, String>,
) -> Result<Vec<u8>, String> {
    let layout = ParamLayout::new(config);
    if params.len() != layout.len() {
        return Err(format!(
            "parameter vector has {} floats, the config needs {}",
            params.len(),
            layout.len()
        ));
    }
    let config_json = serde_json::to_string(config).map_err(|e| e.to_string())?;
    let mut metadata: BTreeMap<&str, &str> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    metadata.insert("format", "pt");
    metadata.insert(CONFIG_METADATA_KEY, &config_json);

    /// One tensor's header entry, its fields in the order the crate writes them.
    #[derive(serde::Serialize)]
    struct Entry<'a> {
        dtype: &'static str,
        shape: &'a [usize],
        data_offsets: [usize; 2],
    }
    let mut specs: Vec<_> = layout.tensors().iter().collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let json = |e: serde_json::Error| e.to_string();
    let mut header = String::from("{\"__metadata__\":");
    header.push_str(&serde_json::to_string(&metadata).map_err(json)?);
    let mut offset = 0;
    for spec in &specs {
        let entry = Entry {
            dtype: "F32",
            shape: &spec.shape,
            data_offsets: [offset, offset + spec.len() * 4],
        };
        offset += spec.len() * 4;
        header.push(',');
        header.push_str(&serde_json::to_string(&spec.name).map_err(json)?);
        header.push(':');
        header.push_str(&serde_json::to_string(&entry).map_err(json)?);
    }
    header.push('}');
    let padded = header.len().next_multiple_of(8);
    let mut bytes = Vec::with_capacity(8 + padded + offset);
    bytes.extend_from_slice(&(padded as u64).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(8 + padded, b' ');
    let floats: &[u8] = bytemuck::cast_slice(params);
    for spec in &specs {
        bytes.extend_from_slice(&floats[spec.offset * 4..(spec.offset + spec.len()) * 4]);
    }
    Ok(bytes)
}

/// Writes a checkpoint atomically (temp file, fsync, rename).
pub fn save(
    path: &Path,
    config: &GptConfig,
    params: &[f32],
    extra: &HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let bytes = to_bytes(config, params, extra).map_err(|message| CheckpointError::Serialize {
        path: path.to_owned(),
        message,
    })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let err = |source| CheckpointError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads a checkpoint written by [`save`] (or exported for HF by hivetrain).
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_bytes(path, &bytes, None)
}

/// Parses checkpoint bytes. `config` overrides the config in the metadata (for files
/// that lack one); `path` only names the source in errors.
pub fn from_bytes(
    path: &Path,
    bytes: &[u8],
    config: Option<GptConfig>,
) -> Result<Checkpoint, CheckpointError> {
    let p = || path.to_owned();
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Format {
        path: p(),
        message: e.to_string(),
    })?;
    let metadata: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Format {
        path: p(),
        message: e.to_string(),
    })?;
    let config = match config {
        Some(config) => config,
        None => {
            let json = metadata
                .get(CONFIG_METADATA_KEY)
                .ok_or_else(|| CheckpointError::NoConfig { path: p() })?;
            serde_json::from_str::<GptConfig>(json).map_err(|e| CheckpointError::BadConfig {
                path: p(),
                message: e.to_string(),
            })?
        }
    };
    config.validate().map_err(|e| CheckpointError::BadConfig {
        path: p(),
        message: e.to_string(),
    })?;
    let layout = ParamLayout::new(&config);
    let mut params = vec![0.0f32; layout.len()];
    for spec in layout.tensors() {
        let view = tensors
            .tensor(&spec.name)
            .map_err(|_| CheckpointError::MissingTensor {
                path: p(),
                name: spec.name.clone(),
            })?;
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Dtype {
                path: p(),
                name: spec.name.clone(),
                got: view.dtype(),
            });
        }
        if view.shape() != spec.shape.as_slice() {
            return Err(CheckpointError::Shape {
                path: p(),
                name: spec.name.clone(),
                want: spec.shape.clone(),
                got: view.shape().to_vec(),
            });
        }
        for (dst, src) in params[spec.range()]
            .iter_mut()
            .zip(view.data().chunks_exact(4))
        {
            *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        }
    }
    Ok(Checkpoint {
        config,
        params,
        metadata,
    })
}

/// The `config.json` HF transformers needs to load the model as `GPT2LMHeadModel`.
pub fn hf_config_json(config: &GptConfig, eos_token_id: Option<u32>) -> serde_json::Value {
    let eos = eos_token_id.unwrap_or(0);
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "use_cache": true,
        "tie_word_embeddings": true,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    })
}
